"""Fetching and decoding the image an `ImageRef` points to: `ImageReader` (with an LRU of parquet row-group
columns, per process), `decode_image` (the image, or why it is unusable), `to_rgb` (any convertible mode to RGB),
`decode_pair` (both images of a pair as training accepts them, or why not) and `open_image` (RGB, or a `DataError`).
"""

from __future__ import annotations

import io
from collections import OrderedDict
from typing import Any

import numpy as np
from PIL import Image

from lora_dpo.data.records import DataError, HubCell, ImageRef, ParquetCell


class ImageReader:
    """Fetches what an ImageRef points to, in whichever process runs it. Parquet row-group columns are kept in an
    LRU of `capacity` entries (the sampler reads a window of row groups at a time); caches are per process and
    are not pickled to loader workers."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self.reads = 0  # row-group columns read from disk (a cache miss each)
        self._columns: OrderedDict[tuple[str, int, str], Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"capacity": self.capacity}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["capacity"])

    def _column(self, file: str, group: int, column: str) -> Any:
        key = (file, group, column)
        if key in self._columns:
            self._columns.move_to_end(key)
            return self._columns[key]
        import pyarrow.parquet as pq

        values = pq.ParquetFile(file).read_row_group(group, columns=[column]).column(0)
        self.reads += 1
        self._columns[key] = values
        while len(self._columns) > self.capacity:
            self._columns.popitem(last=False)
        return values

    def read(self, ref: ImageRef) -> bytes | str | None:
        """Encoded bytes or a file path; None when the row has no image."""
        if isinstance(ref, ParquetCell):
            return self._column(ref.file, ref.group, ref.column)[ref.row].as_py()
        if isinstance(ref, HubCell):
            ref = ref.table.images[ref.row][ref.column]
        if isinstance(ref, dict):  # a `datasets` Image column, undecoded
            return ref.get("bytes") or ref.get("path")
        return ref


def decode_image(data: bytes | str | None) -> Image.Image | str:
    """The decoded image (any mode), or why it cannot be used."""
    if not data:
        return "missing image"
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        image.load()  # decodes everything: a truncated file fails here, not later in a worker's transform
    except FileNotFoundError:
        return "missing image"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return "undecodable image"
    return image


def to_rgb(image: Image.Image) -> Image.Image | str:
    """The image in RGB, or why it cannot be. Transparency is composited on white (what a viewer shows, and what
    a plain `convert` would turn black); 16- and 32-bit greyscale is scaled to 8 bits (`convert` would clip it);
    CMYK, palette, greyscale and the rest through PIL's own conversion."""
    if image.mode == "RGB":
        return image
    try:
        if image.mode in ("I", "F") or image.mode.startswith("I;16"):
            grey = np.asarray(image, dtype=np.float64)
            if image.mode != "F" and grey.max(initial=0) > 255:  # a 16-bit image, however PIL labels it
                grey = grey / 257.0
            return Image.fromarray(np.clip(grey, 0, 255).round().astype(np.uint8), "L").convert("RGB")
        if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            rgba = (image.convert("LA") if image.mode == "La" else image).convert("RGBA")  # PIL: no La -> RGBA
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return image.convert("RGB")
    except (ValueError, OSError):  # a mode PIL cannot convert to RGB (e.g. LAB on some versions)
        return f"unconvertible image ({image.mode})"


def decode_pair(image_0: ImageRef, image_1: ImageRef, reader: ImageReader,
                where: str = "") -> tuple[Image.Image, Image.Image, dict[str, str]] | str:
    """Both images of a pair, decoded and made RGB, or why the pair is unusable: the one rule training and
    labelling share. The dict names the images converted from another mode ("where (w|l)" -> mode)."""
    raw = (reader.read(image_0), reader.read(image_1))
    if raw[0] and raw[0] == raw[1]:
        return "identical images"
    images, converted = [], {}
    for data, which in zip(raw, ("w", "l"), strict=True):
        image = decode_image(data)
        if isinstance(image, str):
            return image
        mode, image = image.mode, to_rgb(image)  # a PNG with alpha, a greyscale scan: usable, once made RGB
        if isinstance(image, str):
            return image
        if mode != "RGB":
            converted[f"{where} ({which})"] = mode
        images.append(image)
    return images[0], images[1], converted


def open_image(ref: ImageRef, where: str, reader: ImageReader | None = None) -> Image.Image:
    """An image as RGB whatever its mode (for scoring and labelling), or a DataError naming the row."""
    image = decode_image((reader or ImageReader()).read(ref))
    if not isinstance(image, str):
        image = to_rgb(image)
    if isinstance(image, str):
        raise DataError(f"{where}: {image}")
    return image
