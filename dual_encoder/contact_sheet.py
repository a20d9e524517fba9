"""PNG contact sheets: labelled thumbnails in rows, for search results (`search --grid`) and groups of
near-duplicates (`index dedup --grid`). Pillow only: no TensorFlow."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence, Union

from PIL import Image, ImageDraw, ImageOps

from dual_encoder import files, images
from dual_encoder.config import DataConfig

LABEL_HEIGHT = 16
MARGIN = 4


@dataclasses.dataclass(frozen=True)
class Tile:
    """One thumbnail: the image file and the label under it."""

    path: str
    label: str


@dataclasses.dataclass(frozen=True)
class Section:
    """Tiles that start on a row of their own, under an optional heading."""

    tiles: Sequence[Tile]
    heading: Optional[str] = None


def write_sheet(
    title: str,
    sections: Sequence[Section],
    path: Union[str, Path],
    thumb: int = 128,
    columns: int = 5,
    max_pixels: int = DataConfig.max_image_pixels,
) -> Path:
    """Write a PNG: `title` on top, then each section's heading and its tiles, `columns` to a row.

    Thumbnails are upright (EXIF orientation applied, `images.decode`) and padded to `thumb` x `thumb`. Images that
    cannot be opened — missing, not regular files, over `max_pixels`, undecodable — are grey tiles, so the sheet
    always shows every tile.
    """
    widest = max((len(section.tiles) for section in sections), default=1)
    columns = max(1, min(columns, widest or 1))
    cell_w, cell_h = thumb + MARGIN, thumb + LABEL_HEIGHT + MARGIN
    layout, height = [], LABEL_HEIGHT + MARGIN
    for section in sections:
        heading_top = height
        height += LABEL_HEIGHT if section.heading else 0
        layout.append((section, heading_top, height))
        height += max(1, -(-len(section.tiles) // columns)) * cell_h
    sheet = Image.new("RGB", (columns * cell_w + MARGIN, height + (0 if sections else cell_h)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((MARGIN, 2), title, fill="black")
    for section, heading_top, tiles_top in layout:
        if section.heading:
            draw.text((MARGIN, heading_top + 2), section.heading, fill="black")
        for position, tile in enumerate(section.tiles):
            left = MARGIN + (position % columns) * cell_w
            top = tiles_top + (position // columns) * cell_h
            sheet.paste(thumbnail(tile.path, thumb, max_pixels), (left, top))
            draw.text((left, top + thumb + 2), tile.label, fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path


def thumbnail(image_path: str, size: int, max_pixels: int = DataConfig.max_image_pixels) -> Image.Image:
    """The image at `image_path`, upright, padded to `size` x `size` on white; a grey tile if it cannot be read."""
    try:
        image = images.decode(files.read_bytes(image_path), max_pixels, draft=(size, size))  # upright, RGB
    except files.FileRefusedError:  # missing, not a regular file, too large, undecodable
        return Image.new("RGB", (size, size), "lightgrey")
    return ImageOps.pad(image, (size, size), color="white")
