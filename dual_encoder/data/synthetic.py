"""The captioned-shapes generator: the offline default dataset (1–3 coloured shapes per image, paraphrased captions).

Every caption states only what is drawn: each object's size, colour, shape and place on a 3×3 grid.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from dual_encoder.data.sources import CAPTION_LABELS_KEY, LABELS_KEY, NEGATIVES_KEY

CAPTIONS_FILE = "captions.csv"
SCENES_FILE = "scenes.jsonl"
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
# A place a caption may name -> the cells it covers. A corner or the centre is one cell; "top", "left", … are a
# whole side of three cells, so "a star on the left" is true of a star in the top left corner too. Each region
# is named like the cell it is named after, and captions say it with that cell's `POSITIONS` phrases.


def _region(column: int, row: int) -> frozenset[str]:
    if column == 1 and row != 1:  # "at the top": the whole row
        return frozenset(name for name, (_, r) in _GRID.items() if r == row)
    if row == 1 and column != 1:  # "on the left": the whole column
        return frozenset(name for name, (c, _) in _GRID.items() if c == column)
    return frozenset(name for name, cell in _GRID.items() if cell == (column, row))  # a corner, the centre


REGIONS: dict[str, frozenset[str]] = {name: _region(column, row) for name, (column, row) in _GRID.items()}
_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
# 1, 2, 3 objects. The training default has singles rarest (they have the fewest combinations); fresh galleries
# may use other mixes.
OBJECT_COUNT_PROBABILITIES = (0.10, 0.50, 0.40)


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One drawn object, by the keys of `SHAPES`, `COLOURS`, `SIZES` and `POSITIONS` (its grid cell)."""

    shape: str
    colour: str
    size: str
    position: str

    def regions(self) -> list[str]:
        """The `REGIONS` this object lies in (its own cell's region first)."""
        return [self.position] + [name for name, cells in REGIONS.items() if self.position in cells and name != self.position]


Scene = tuple[ShapeObject, ...]


def scene_to_json(scene: Scene) -> list[dict[str, str]]:
    return [dataclasses.asdict(obj) for obj in scene]


def scene_from_json(objects: list[dict[str, str]]) -> Scene:
    return tuple(ShapeObject(**obj) for obj in objects)


def split_scenes(image_ids: Sequence[str], metadata: Sequence[Optional[dict]]) -> dict[str, Scene]:
    """Image id -> scene, from a prepared split's item metadata (`prepare --metadata scenes.jsonl`); ValueError
    if an item has no scene."""
    if not all(meta and isinstance(meta.get("objects"), list) for meta in metadata):
        raise ValueError("the split has no scene metadata: prepare it with --metadata <synthetic>/scenes.jsonl")
    return {image_id: scene_from_json(meta["objects"]) for image_id, meta in zip(image_ids, metadata)}


def read_scenes(path: Path) -> dict[str, Scene]:
    """`scenes.jsonl` as written by `generate_synthetic`: image name -> scene."""
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return {row["image"]: scene_from_json(row["objects"]) for row in rows}


def _pick(rng: np.random.Generator, options):
    options = tuple(options)
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, object_counts: tuple[float, ...] = OBJECT_COUNT_PROBABILITIES) -> Scene:
    """1–3 objects (with probabilities `object_counts`) in distinct grid cells; shape, colour and size drawn
    independently."""
    count = int(rng.choice(np.arange(1, len(object_counts) + 1), p=np.asarray(object_counts) / sum(object_counts)))
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


@dataclasses.dataclass(frozen=True)
class Mention:
    """What a caption says of one object: which of its attributes it names (the shape may be left as "shape").

    Args:
        obj: the object described.
        shape, colour, size: whether each is named.
        region: the `REGIONS` key named for its place, or None.
    """

    obj: ShapeObject
    shape: bool = True
    colour: bool = True
    size: bool = True
    region: Optional[str] = None

    def fits(self, obj: ShapeObject) -> bool:
        """True when everything this mention names is true of `obj`."""
        return (
            (not self.shape or obj.shape == self.obj.shape)
            and (not self.colour or obj.colour == self.obj.colour)
            and (not self.size or obj.size == self.obj.size)
            and (self.region is None or obj.position in REGIONS[self.region])
        )


def fits_scene(mentions: Sequence[Mention], scene: Scene) -> bool:
    """True when distinct objects of `scene` fit each mention (a matching of mentions to objects)."""

    def match(i: int, used: frozenset) -> bool:
        if i == len(mentions):
            return True
        return any(k not in used and mentions[i].fits(obj) and match(i + 1, used | {k}) for k, obj in enumerate(scene))

    return match(0, frozenset())


def _article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _noun_phrase(mention: Mention, rng: np.random.Generator) -> str:
    """"a small red circle", "a circle in red", "a red shape", "a star" — only the attributes the mention names."""
    obj = mention.obj
    size = _pick(rng, SIZES[obj.size][1]) + " " if mention.size else ""
    shape = _pick(rng, SHAPES[obj.shape][1]) if mention.shape else "shape"
    if not mention.colour:
        return _article(f"{size}{shape}")
    colour = _pick(rng, COLOURS[obj.colour][1])
    if mention.shape and rng.random() < 0.3:
        return _article(f"{size}{shape} in {colour}")
    return _article(f"{size}{colour} {shape}")


def _place(mention: Mention, rng: np.random.Generator) -> str:
    return _pick(rng, POSITIONS[mention.region].phrases) if mention.region else ""


def _clauses(mentions: list[Mention], rng: np.random.Generator) -> str:
    """"a small red circle on the left, a big blue star at the top and ..." """
    parts = [" ".join(filter(None, (_noun_phrase(m, rng), _place(m, rng)))) for m in mentions]
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def _plain(mentions, count, rng):
    return _clauses(mentions, rng)


def _there_is(mentions, count, rng):
    return f"there is {_clauses(mentions, rng)}"


def _picture_of(mentions, count, rng):
    return f"{_pick(rng, ('an image with', 'a picture of', 'a drawing of'))} {_clauses(mentions, rng)}"


def _counted(mentions, count, rng):
    """"two shapes: ..." naming all of them, or "three shapes, one of them a red star" naming fewer."""
    shapes = f"{_COUNT_WORDS[count]} shape{'s' if count > 1 else ''}"
    if len(mentions) == count:
        return f"{shapes}: {_clauses(mentions, rng)}"
    named = _clauses(mentions, rng)
    return f"{shapes}, one of them {named}" if len(mentions) == 1 else f"{shapes} including {named}"


def _labelled(mentions, count, rng):
    """"left: a little red disc; top: a big blue star" (every mention has a place)."""
    return "; ".join(f"{_pick(rng, POSITIONS[m.region].labels)}: {_noun_phrase(m, rng)}" for m in mentions)


def _position_first(mentions, count, rng):
    """"on the left a small red circle, at the top a big blue star" (every mention has a place)."""
    return ", ".join(f"{_place(m, rng)} {_noun_phrase(m, rng)}" for m in mentions)


# Each template turns mentions (already in a random order) into one caption; the last two need every place named.
_TEMPLATES = (_plain, _there_is, _picture_of, _counted, _labelled, _position_first)
_ANY_MENTION_TEMPLATES = _TEMPLATES[:4]

# How often a partial caption names each attribute of an object it mentions, and mentions only one object.
_NAMES_SHAPE, _NAMES_COLOUR, _NAMES_SIZE, _NAMES_PLACE = 0.9, 0.7, 0.3, 0.3
_ONE_OBJECT = 0.6


def full_mentions(scene: Scene) -> list[Mention]:
    """Every object with every attribute and its own cell: what a full caption says."""
    return [Mention(obj, region=obj.position) for obj in scene]


def partial_mentions(scene: Scene, rng: np.random.Generator) -> list[Mention]:
    """What a person might say of `scene`: one object or a few, each with some of its attributes."""
    count = 1 if len(scene) == 1 or rng.random() < _ONE_OBJECT else int(rng.integers(2, len(scene) + 1))
    mentions = []
    for k in rng.choice(len(scene), size=count, replace=False):
        obj = scene[int(k)]
        shape = bool(rng.random() < _NAMES_SHAPE)
        colour = bool(rng.random() < _NAMES_COLOUR) or not shape  # "a shape" alone says nothing
        region = _pick(rng, obj.regions()) if rng.random() < _NAMES_PLACE else None
        mentions.append(Mention(obj, shape, colour, bool(rng.random() < _NAMES_SIZE), region))
    return mentions


def _template(mentions: Sequence[Mention], rng: np.random.Generator) -> Callable:
    return _pick(rng, _TEMPLATES if all(m.region for m in mentions) else _ANY_MENTION_TEMPLATES)


def render_caption(mentions: list[Mention], count: int, rng: np.random.Generator) -> str:
    """One caption saying `mentions` of a scene of `count` objects, in a random template."""
    return _template(mentions, rng)(mentions, count, rng)


@dataclasses.dataclass(frozen=True)
class Described:
    """One caption's meaning: what it says (its mentions, in caption order) and a hard negative — the same caption,
    same template and words, with one thing changed so that it is false of the scene (`contrast_mentions`) — or
    None."""

    mentions: tuple[Mention, ...]
    negative: Optional[str]
    states_count: bool = False  # "three shapes, one of them a red star" says how many objects there are


def describe_scene(scene: Scene, rng: np.random.Generator, count: int, partial: float = 0.0) -> dict[str, Described]:
    """`count` distinct captions of `scene` -> what each says. About `partial` of them are partial
    (`partial_mentions`); at least one is full (`is_full`) unless `partial` is 1; the full ones come first."""
    num_partial = int(rng.binomial(count, partial))
    num_full = count - num_partial if partial >= 1 else max(1, count - num_partial)
    captions: dict[str, Described] = {}
    for wanted, describe in ((num_full, full_mentions), (count, lambda s: partial_mentions(s, rng))):
        for _ in range(50 * count):
            if len(captions) >= wanted:
                break
            mentions = describe(scene)
            mentions = [mentions[i] for i in rng.permutation(len(mentions))]
            words = int(rng.integers(1 << 32))  # the same template and word choices for the caption and its negative
            template = _template(mentions, np.random.default_rng(words))
            caption = render_caption(mentions, len(scene), np.random.default_rng(words))
            changed = contrast_mentions(mentions, scene, rng)
            negative = None if changed is None else render_caption(changed, len(scene), np.random.default_rng(words))
            captions.setdefault(caption, Described(tuple(mentions), negative, template is _counted))
    return captions


def contrast_mentions(mentions: Sequence[Mention], scene: Scene, rng: np.random.Generator) -> Optional[list[Mention]]:
    """`mentions` with one thing changed so that they no longer fit `scene` — another colour, shape, size or place
    for one object, or two objects' colours swapped — or None if no try (of 20) gives one.

    A hard negative, as in NegCLIP (Yuksekgonul et al., 2023): "a blue star" for an image of a red star teaches
    what contrastive training on whole captions learns last, if ever — the colour, and which colour goes with
    which shape."""
    for _ in range(20):
        changed = list(mentions)
        k = int(rng.integers(len(changed)))
        m = changed[k]
        kind = _pick(rng, ("colour", "colour", "shape", "size", "region", "swap"))
        if kind == "swap" and len(changed) > 1 and m.colour:
            other = int(rng.choice([i for i in range(len(changed)) if i != k]))
            o = changed[other]
            if not o.colour or o.obj.colour == m.obj.colour:
                continue
            changed[k] = dataclasses.replace(m, obj=dataclasses.replace(m.obj, colour=o.obj.colour))
            changed[other] = dataclasses.replace(o, obj=dataclasses.replace(o.obj, colour=m.obj.colour))
        elif kind in ("colour", "shape", "size") and getattr(m, kind):
            table = {"colour": COLOURS, "shape": SHAPES, "size": SIZES}[kind]
            value = _pick(rng, [v for v in table if v != getattr(m.obj, kind)])
            changed[k] = dataclasses.replace(m, obj=dataclasses.replace(m.obj, **{kind: value}))
        elif kind == "region" and m.region:
            changed[k] = dataclasses.replace(m, region=_pick(rng, [r for r in REGIONS if r != m.region]))
        else:
            continue
        if not fits_scene(changed, scene):
            return changed
    return None


def is_full(mentions: Sequence[Mention], scene: Scene) -> bool:
    """True when `mentions` name every object of `scene` with every attribute and its own cell."""
    return set(mentions) == set(full_mentions(scene))


# --- labels: what training uses to know which captions fit which images ----------------------------------------


def _label(shape: Optional[str], colour: Optional[str], size: Optional[str], region: Optional[str]) -> str:
    return "|".join(part or "*" for part in (size, colour, shape, region))


def mention_label(mention: Mention) -> str:
    """The one label a mention requires of an image ("*|red|star|left" for "a red star on the left")."""
    obj = mention.obj
    return _label(
        obj.shape if mention.shape else None,
        obj.colour if mention.colour else None,
        obj.size if mention.size else None,
        mention.region,
    )


def object_labels(obj: ShapeObject) -> list[str]:
    """Every label a mention of `obj` can require: each non-empty subset of shape, colour and size, with no
    place or with any region the object lies in."""
    labels = []
    for shape, colour, size in itertools.product((obj.shape, None), (obj.colour, None), (obj.size, None)):
        if shape or colour or size:
            labels += [_label(shape, colour, size, region) for region in (None, *obj.regions())]
    return labels


def count_label(count: int) -> str:
    """The label of a scene of `count` objects, which a caption that says how many there are requires."""
    return f"count={count}"


def scene_labels(scene: Scene) -> list[str]:
    """The labels of every object of `scene` and its object count, sorted: a caption fits the scene when the
    scene has each of the caption's labels (`caption_labels`; two mentions of one object are not told apart)."""
    return sorted({label for obj in scene for label in object_labels(obj)} | {count_label(len(scene))})


def caption_labels(described: Described, scene: Scene) -> list[str]:
    """The labels a caption requires of an image: each mention's, and the object count if it states one."""
    labels = {mention_label(m) for m in described.mentions}
    return sorted(labels | ({count_label(len(scene))} if described.states_count else set()))


def caption_scene(scene: Scene, rng: np.random.Generator, count: int, partial: float = 0.0) -> list[str]:
    """The captions of `describe_scene`, full ones first."""
    return list(describe_scene(scene, rng, count, partial))


def example_queries(n: int, seed: int = 0) -> list[str]:
    """`n` full captions of fresh random scenes: queries in the generator's vocabulary (for demos)."""
    rng = np.random.default_rng([seed, 1_000_003])
    return [caption_scene(sample_scene(rng), rng, 1)[0] for _ in range(n)]


@dataclasses.dataclass(frozen=True)
class SyntheticOptions:
    """What the generator draws and writes.

    Args:
        image_size: image side in pixels.
        partial_captions: the expected fraction of an image's captions that are partial (one object or a few,
            some of their attributes), as people write; the rest name everything.
        object_counts: probabilities of 1, 2, 3 objects per image.
        min_captions, max_captions: captions per image (inclusive range).
    """

    image_size: int = 64
    partial_captions: float = 0.6
    object_counts: tuple[float, ...] = OBJECT_COUNT_PROBABILITIES
    min_captions: int = 6
    max_captions: int = 10

    def __post_init__(self):
        if not 0.0 <= self.partial_captions <= 1.0:
            raise ValueError(f"partial_captions must lie in [0, 1], got {self.partial_captions}")
        if len(self.object_counts) not in (1, 2, 3) or min(self.object_counts) < 0 or sum(self.object_counts) <= 0:
            raise ValueError(f"object_counts must be 1-3 non-negative probabilities, got {self.object_counts}")
        if not 1 <= self.min_captions <= self.max_captions:
            raise ValueError(f"need 1 <= min_captions <= max_captions, got {self.min_captions}, {self.max_captions}")


def generate_synthetic(
    output: Path,
    num_images: int,
    seed: int = 0,
    image_size: Optional[int] = None,
    progress: bool = False,
    options: SyntheticOptions = SyntheticOptions(),
) -> Path:
    """Write `output/images/NNNNNN.png`, `output/captions.csv` and `output/scenes.jsonl`; return the CSV path.

    The CSV (`image`, `caption`; image paths relative to `output/images`) is the `csv` source:
    `read_source("csv", path, path.parent / "images")`. `scenes.jsonl` holds each image's scene (objects with
    shape, colour, size and grid cell), its full captions, labels saying which captions fit it (`scene_labels`,
    and per caption its `caption_labels`), and each caption's hard negative (`Described.negative`): the per-image metadata `prepare --metadata` carries into the prepared
    dataset, that training uses to know which captions fit which images, and that judged query sets are made
    from. Same seed -> byte-identical files.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if image_size is not None:
        options = dataclasses.replace(options, image_size=image_size)
    output = Path(output)
    images_dir = output / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    captions_path = output / CAPTIONS_FILE
    width = max(6, len(str(num_images - 1)))
    with open(captions_path, "w", encoding="utf-8", newline="") as handle, open(
        output / SCENES_FILE, "w", encoding="utf-8"
    ) as scenes:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for index in tqdm(range(num_images), desc="generate", unit="img", disable=not progress):
            rng = np.random.default_rng([seed, index])  # per image: any image can be regenerated alone
            scene = sample_scene(rng, options.object_counts)
            name = f"{index:0{width}d}.png"
            render_scene(scene, options.image_size, rng).save(images_dir / name, format="PNG")
            count = int(rng.integers(options.min_captions, options.max_captions + 1))
            captions = describe_scene(scene, rng, count, options.partial_captions)
            for caption in captions:
                writer.writerow([name, caption])
            row = {
                "image": name,
                "objects": scene_to_json(scene),
                "full_captions": [caption for caption, d in captions.items() if is_full(d.mentions, scene)],
                LABELS_KEY: scene_labels(scene),
                CAPTION_LABELS_KEY: {c: caption_labels(d, scene) for c, d in captions.items()},
                NEGATIVES_KEY: {c: d.negative for c, d in captions.items() if d.negative is not None},
            }
            scenes.write(json.dumps(row) + "\n")
    return captions_path
