"""The captioned-shapes generator: the offline default dataset (1–3 coloured shapes per image, paraphrased captions).

Every caption states only what is drawn: each object's size, colour, shape and place on a 3×3 grid.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

CAPTIONS_FILE = "captions.csv"
IMAGES_DIR = "images"

# --- drawing -----------------------------------------------------------------------------------------------------

_SUPERSAMPLE = 4  # draw large and downsample: anti-aliased edges without per-pixel work


def _polygon(cx: float, cy: float, radii: list[float], rotation: float) -> list[tuple[float, float]]:
    step = 2 * math.pi / len(radii)
    return [
        (cx + r * math.sin(rotation + i * step), cy - r * math.cos(rotation + i * step)) for i, r in enumerate(radii)
    ]


def _draw_circle(draw, cx, cy, r, fill):
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)


def _draw_ring(draw, cx, cy, r, fill):
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(0.35 * r)))


def _draw_square(draw, cx, cy, r, fill):
    half = 0.85 * r
    draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)


def _draw_triangle(draw, cx, cy, r, fill):
    draw.polygon(_polygon(cx, cy + 0.15 * r, [1.15 * r] * 3, 0.0), fill=fill)


def _draw_diamond(draw, cx, cy, r, fill):
    draw.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=fill)


def _draw_star(draw, cx, cy, r, fill):
    draw.polygon(_polygon(cx, cy + 0.08 * r, [1.1 * r, 0.45 * r] * 5, 0.0), fill=fill)


def _draw_cross(draw, cx, cy, r, fill):
    arm = 0.33 * r
    draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
    draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)


# --- vocabulary --------------------------------------------------------------------------------------------------

# name -> (RGB, words a caption may use for it)
COLOURS: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "red": ((215, 30, 35), ("red", "crimson", "scarlet")),
    "orange": ((245, 135, 15), ("orange", "tangerine")),
    "yellow": ((235, 200, 0), ("yellow", "gold")),
    "green": ((25, 150, 50), ("green", "emerald")),
    "blue": ((30, 70, 215), ("blue", "cobalt")),
    "purple": ((125, 40, 165), ("purple", "violet")),
    "pink": ((240, 100, 175), ("pink", "rose")),
    "black": ((20, 20, 20), ("black", "jet black")),
}
# name -> (how to draw it at centre (cx, cy) with radius r, words)
SHAPES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "circle": (_draw_circle, ("circle", "disc", "round shape")),
    "square": (_draw_square, ("square", "block")),
    "triangle": (_draw_triangle, ("triangle", "three-sided shape")),
    "diamond": (_draw_diamond, ("diamond", "rhombus")),
    "star": (_draw_star, ("star", "five-pointed star")),
    "cross": (_draw_cross, ("cross", "plus sign")),
    "ring": (_draw_ring, ("ring", "hoop", "donut")),
}
# name -> (radius as a fraction of the image side, words)
SIZES: dict[str, tuple[float, tuple[str, ...]]] = {
    "small": (0.10, ("small", "little", "tiny")),
    "large": (0.15, ("large", "big")),
}
_ROWS = {0: ("top", "upper"), 1: (), 2: ("bottom", "lower")}
_COLUMNS = {0: "left", 1: "", 2: "right"}


@dataclasses.dataclass(frozen=True)
class Position:
    """A cell of the 3×3 grid and how captions may name it.

    Args:
        column, row: the cell (0–2 each, left to right and top to bottom).
        phrases: adverbial phrases ("in the top left corner").
        labels: short labels ("top left") for the "label: object" templates.
    """

    column: int
    row: int
    phrases: tuple[str, ...]
    labels: tuple[str, ...]


def _position(column: int, row: int) -> Position:
    vertical, horizontal = _ROWS[row], _COLUMNS[column]
    if vertical and horizontal:
        phrases = tuple(p for v in vertical for p in (f"in the {v} {horizontal} corner", f"at the {v} {horizontal}"))
        return Position(column, row, phrases, tuple(f"{v} {horizontal}" for v in vertical))
    if vertical:
        edge = vertical[0]
        return Position(column, row, (f"at the {edge}", f"near the {edge}", f"along the {edge} edge"), (edge,))
    if horizontal:
        side = horizontal
        return Position(column, row, (f"on the {side}", f"at the {side}", f"on the {side} side"), (side,))
    return Position(column, row, ("in the centre", "in the middle", "in the center"), ("centre", "middle", "center"))


_GRID = {
    "top left": (0, 0), "top": (1, 0), "top right": (2, 0),
    "left": (0, 1), "centre": (1, 1), "right": (2, 1),
    "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2),
}  # fmt: skip
POSITIONS: dict[str, Position] = {name: _position(column, row) for name, (column, row) in _GRID.items()}
_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
_OBJECT_COUNT_PROBABILITIES = (0.10, 0.50, 0.40)  # 1, 2, 3 objects: singles have the fewest combinations


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One drawn object, by the keys of `SHAPES`, `COLOURS`, `SIZES` and `POSITIONS`."""

    shape: str
    colour: str
    size: str
    position: str


Scene = tuple[ShapeObject, ...]


def _pick(rng: np.random.Generator, options):
    options = tuple(options)
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator) -> Scene:
    """1–3 objects in distinct grid cells; shape, colour and size drawn independently."""
    count = int(rng.choice([1, 2, 3], p=_OBJECT_COUNT_PROBABILITIES))
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    names = list(POSITIONS)
    return tuple(
        ShapeObject(_pick(rng, SHAPES), _pick(rng, COLOURS), _pick(rng, SIZES), names[int(cell)]) for cell in cells
    )


def _background(rng: np.random.Generator, image_size: int) -> Image.Image:
    """A pale flat colour or a pale two-colour gradient, at `image_size`."""
    start = rng.uniform(185, 250, size=3)
    if rng.random() < 0.5:
        return Image.new("RGB", (image_size, image_size), tuple(int(c) for c in start))
    end = rng.uniform(185, 250, size=3)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(-0.5, 0.5, image_size)
    t = np.clip(math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None] + 0.5, 0, 1)[..., None]
    return Image.fromarray((start * (1 - t) + end * t).astype(np.uint8))


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw `scene` as an RGB image: each object inside its grid cell (so none overlap), colours lightly jittered."""
    side = image_size * _SUPERSAMPLE
    canvas = _background(rng, image_size).resize((side, side), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    cell = side / 3
    for obj in scene:
        position = POSITIONS[obj.position]
        radius = SIZES[obj.size][0] * side * rng.uniform(0.92, 1.0)
        slack = max(0.0, cell / 2 - radius - 0.01 * side)  # keep the object within its cell
        cx = (position.column + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (position.row + 0.5) * cell + rng.uniform(-slack, slack)
        rgb = np.clip(np.array(COLOURS[obj.colour][0]) + rng.integers(-12, 13, size=3), 0, 255)
        SHAPES[obj.shape][0](draw, cx, cy, radius, tuple(int(c) for c in rgb))
    image = canvas.resize((image_size, image_size), Image.Resampling.BOX)
    if rng.random() < 0.4:  # sensor-like noise on some images
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, size=(image_size, image_size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


# --- captions ----------------------------------------------------------------------------------------------------


def _article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _noun_phrase(obj: ShapeObject, rng: np.random.Generator) -> str:
    size = _pick(rng, SIZES[obj.size][1])
    colour = _pick(rng, COLOURS[obj.colour][1])
    shape = _pick(rng, SHAPES[obj.shape][1])
    if rng.random() < 0.7:
        return _article(f"{size} {colour} {shape}")
    return _article(f"{size} {shape} in {colour}")


def _clauses(objects: list[ShapeObject], rng: np.random.Generator) -> str:
    """"a small red circle on the left, a big blue star at the top and ..." """
    parts = [f"{_noun_phrase(o, rng)} {_pick(rng, POSITIONS[o.position].phrases)}" for o in objects]
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _plain(objects, rng):
    return _clauses(objects, rng)


def _there_is(objects, rng):
    return f"there is {_clauses(objects, rng)}"


def _picture_of(objects, rng):
    return f"{_pick(rng, ('an image with', 'a picture of', 'a drawing of'))} {_clauses(objects, rng)}"


def _counted(objects, rng):
    return f"{_COUNT_WORDS[len(objects)]} shape{'s' if len(objects) > 1 else ''}: {_clauses(objects, rng)}"


def _labelled(objects, rng):
    """"left: a little red disc; top: a big blue star" """
    return "; ".join(f"{_pick(rng, POSITIONS[o.position].labels)}: {_noun_phrase(o, rng)}" for o in objects)


def _position_first(objects, rng):
    """"on the left a small red circle, at the top a big blue star" """
    return ", ".join(f"{_pick(rng, POSITIONS[o.position].phrases)} {_noun_phrase(o, rng)}" for o in objects)


# Each template turns the objects (already in a random order) into one caption.
_TEMPLATES = (_plain, _there_is, _picture_of, _counted, _labelled, _position_first)


def caption_scene(scene: Scene, rng: np.random.Generator, count: int) -> list[str]:
    """`count` distinct paraphrases, each naming every object's size, colour, shape and position."""
    captions: dict[str, None] = {}
    for _ in range(50 * count):
        if len(captions) == count:
            break
        objects = [scene[i] for i in rng.permutation(len(scene))]
        captions.setdefault(_pick(rng, _TEMPLATES)(objects, rng), None)
    return list(captions)


def example_queries(n: int, seed: int = 0) -> list[str]:
    """`n` captions of fresh random scenes: queries in the generator's vocabulary (for demos)."""
    rng = np.random.default_rng([seed, 1_000_003])
    return [caption_scene(sample_scene(rng), rng, 1)[0] for _ in range(n)]


def generate_synthetic(
    output: Path, num_images: int, seed: int = 0, image_size: int = 64, progress: bool = False
) -> Path:
    """Write `output/images/NNNNNN.png` and `output/captions.csv` (3–5 captions per image); return the CSV path.

    The CSV (`image`, `caption`; image paths relative to `output/images`) is the `csv` source:
    `read_source("csv", path, path.parent / "images")`. Same seed -> byte-identical files.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    output = Path(output)
    images_dir = output / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    captions_path = output / CAPTIONS_FILE
    width = max(6, len(str(num_images - 1)))
    with open(captions_path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for index in tqdm(range(num_images), desc="generate", unit="img", disable=not progress):
            rng = np.random.default_rng([seed, index])  # per image: any image can be regenerated alone
            scene = sample_scene(rng)
            name = f"{index:0{width}d}.png"
            render_scene(scene, image_size, rng).save(images_dir / name, format="PNG")
            for caption in caption_scene(scene, rng, int(rng.integers(3, 6))):
                writer.writerow([name, caption])
    return captions_path
