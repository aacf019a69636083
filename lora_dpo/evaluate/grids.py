"""Grids to look at: images side by side in titled columns, a note under each image and a caption under each
row (`GridRow`, `make_grid`), in PIL's default font."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont, ImageOps


@dataclass
class GridRow:
    """One row of a grid: images side by side, a short note under each, the caption under the row."""

    images: list[Image.Image]
    caption: str
    notes: list[str] = field(default_factory=list)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _fit(image: Image.Image, cell: int) -> Image.Image:
    """Nearest-neighbour when enlarging (a 64 px image shows its real pixels), Lanczos when shrinking."""
    method = Image.Resampling.NEAREST if max(image.size) < cell else Image.Resampling.LANCZOS
    return ImageOps.contain(image.convert("RGB"), (cell, cell), method)


def make_grid(rows: Sequence[GridRow], titles: Sequence[str], cell: int | None = None) -> Image.Image:
    """Columns titled `titles`, one row per GridRow, the row's caption (wrapped, at most 3 lines) under it.
    Cells are `cell` px square; by default the images' own size, kept between 128 px (narrower cells cannot
    carry a readable note) and 256 px (a grid of 1024 px images would weigh megabytes)."""
    cell = max(128, cell or min(256, max(rows[0].images[0].size) if rows else 256))
    font, small, pad, gap = _font(14), _font(12), 6, 4
    line, small_line = 18, 15
    width = pad * 2 + len(titles) * cell + (len(titles) - 1) * gap
    chars = max(20, int((width - 2 * pad) / 7.5))  # ~7.5 px per character of the 14 px default font
    notes_lines = max((len(n.splitlines()) for r in rows for n in r.notes), default=0)
    captions = [textwrap.wrap(r.caption, chars, max_lines=3, placeholder=" ...") for r in rows]
    heights = [cell + notes_lines * small_line + len(c) * line + 3 * pad for c in captions]
    header = line + 2 * pad
    grid = Image.new("RGB", (width, header + sum(heights)), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(titles):
        draw.text((pad + column * (cell + gap) + cell / 2, pad), title, fill="black", font=font, anchor="ma")
    y = header
    for row, caption, height in zip(rows, captions, heights, strict=True):
        for column, image in enumerate(row.images):
            x = pad + column * (cell + gap)
            fitted = _fit(image, cell)
            grid.paste(fitted, (x + (cell - fitted.width) // 2, y + (cell - fitted.height) // 2))
            if column < len(row.notes):
                draw.multiline_text((x + 2, y + cell + 2), row.notes[column], fill=(70, 70, 70), font=small,
                                    spacing=2)
        text_y = y + cell + notes_lines * small_line + pad
        for number, text in enumerate(caption):
            draw.text((pad, text_y + number * line), text, fill="black", font=font)
        y += height
        draw.line((0, y - 1, width, y - 1), fill=(200, 200, 200))
    return grid
