"""Fetching and decoding the image an `ImageRef` points to: `ImageReader` (with an LRU of parquet row-group
columns, per process), `decode_image` (the image, or why it is unusable), `decode_pair` (both images of a pair as
training accepts them, or why not) and `open_image` (RGB, or a `DataError`).
"""

from __future__ import annotations

import io
from collections import OrderedDict
from typing import Any

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


def decode_pair(image_0: ImageRef, image_1: ImageRef, reader: ImageReader) -> tuple[Image.Image, Image.Image] | str:
    """Both images of a pair, decoded, or why the pair is unusable: the one rule training and labelling share."""
    raw = (reader.read(image_0), reader.read(image_1))
    if raw[0] and raw[0] == raw[1]:
        return "identical images"
    images = []
    for data in raw:
        image = decode_image(data)
        if isinstance(image, str):
            return image
        if image.mode != "RGB":  # Pick-a-Pic is all RGB: another mode is a broken or foreign row
            return f"{image.mode} image (not RGB)"
        images.append(image)
    return images[0], images[1]


def open_image(ref: ImageRef, where: str, reader: ImageReader | None = None) -> Image.Image:
    """An image as RGB whatever its mode (for scoring and labelling), or a DataError naming the row."""
    image = decode_image((reader or ImageReader()).read(ref))
    if isinstance(image, str):
        raise DataError(f"{where}: {image}")
    return image.convert("RGB")
