"""Preference pairs: sources, the ties policy, the winner/loser swap, the pair transform, and unusable rows.

Flow: a source yields `PairRecord`s (a prompt, two image references, label_0 = the probability that image 0 is
preferred) without decoding any image; `prepare_pairs` applies the ties policy and orients every pair so that
`w` is the preferred image (`_orient` is the only place in the project where labels are read);
`PreferenceDataset` decodes, resizes, crops and flips both images of a pair identically and computes SDXL's
micro-conditioning from what it really did.

At Pick-a-Pic scale (~850K pairs, ~335 GB) no list of pairs holds image bytes. A local parquet pair keeps two
`ParquetCell`s (file, row group, row): a loader worker reads that row group's image column when it needs it and
keeps a few in an LRU, and the sampler shuffles whole row groups and then the pairs within a window of
`shuffle_buffer` pairs, so one pass reads each row group about once instead of once per pair. A downloaded hub
split is memory-mapped Arrow, read by row (`HubCell`). A streamed hub split is an IterableDataset
(`StreamingPreferenceDataset`) with a shuffle buffer.

Unusable rows never end a run unless `[data].strict`: what the metadata shows (a missing file, an empty caption,
a bad label, a malformed line) is dropped by `prepare_pairs`; what only decoding shows (a truncated or
undecodable image, a non-RGB mode) is found in `__getitem__`, perhaps in a worker process. The item then falls
back to another pair chosen by its draw key, and carries the rows it skipped to the main process inside the batch
(`PreferenceBatch.stats`), where the trainer adds them up for the end-of-run summary.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lora_dpo import synthetic
from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import COLUMN_NAMES, DataRecipe

HUB_PREFIX = "hf:"  # `hf:<id or folder>`: read with the `datasets` library, as a hub id would be
MAX_FALLBACKS = 64  # unusable pairs in a row before giving up: then the data, not a row, is broken
POLICY_DROPS = ("ties", "identical images", "unlabelled")  # rows left out by choice, not because they are broken


class DataError(LoraDpoError, ValueError):
    """Preference data that cannot be used; the message names the file and the row."""


# --------------------------------------------------------------------------------------------------
# Records: references to images, never the bytes of a whole set


@dataclass(frozen=True, slots=True)
class ParquetCell:
    """An image that stays in its parquet file until a worker needs it: `column` of `row` in row group `group`."""

    file: str
    group: int
    row: int
    column: str


@dataclass(eq=False)
class HubTable:
    """The image columns of a downloaded hub split (memory-mapped Arrow; pickles as a file reference, so loader
    workers reopen it instead of copying it), images left encoded."""

    name: str
    images: Any  # datasets.Dataset


@dataclass(frozen=True, slots=True)
class HubCell:
    table: HubTable
    row: int
    column: str


ImageRef = str | bytes | ParquetCell | HubCell  # a file path, encoded bytes (streamed rows), or a cell


@dataclass(frozen=True)
class PairRecord:
    prompt: str
    image_0: ImageRef
    image_1: ImageRef
    label_0: float  # probability that image_0 is preferred: 1, 0, or 0.5 for a tie
    where: str  # "file:line" or "file row N", for messages
    problem: str | None = None  # why the row is unusable, when reading it already shows (e.g. "missing image")
    has_label: bool = True  # Pick-a-Pic's has_label
    are_different: bool = True  # Pick-a-Pic's are_different


@dataclass(frozen=True, slots=True)
class Pair:
    """A pair after the ties policy: `w` is the preferred image, `label` the probability it is (>= 0.5)."""

    prompt: str
    image_w: ImageRef
    image_l: ImageRef
    label: float
    where: str


@dataclass
class PairStats:
    """What happened to the source's rows: counted by `prepare_pairs`, then by the loaders (items carry their
    share to the main process) and merged across processes for the end-of-run summary."""

    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # left out by the policy (POLICY_DROPS)
    skipped: dict[str, str] = field(default_factory=dict)  # unusable rows: where -> why, each row once

    def skip(self, where: str, why: str, strict: bool) -> None:
        if strict:
            raise DataError(f"{where}: {why} ([data].strict = true stops at the first unusable row; set it to "
                            "false to skip such rows and count them)")
        self.skipped.setdefault(where, why)

    def drain(self) -> PairStats:
        """A copy of the counts so far, leaving this one empty (a stream hands its counts out with each item)."""
        copy = PairStats(self.read, self.kept, self.dropped.copy(), dict(self.skipped))
        self.read, self.kept, self.dropped, self.skipped = 0, 0, Counter(), {}
        return copy

    def merge(self, other: PairStats) -> None:
        self.read += other.read
        self.kept += other.kept
        self.dropped.update(other.dropped)
        for where, why in other.skipped.items():
            self.skipped.setdefault(where, why)

    def summary(self) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        text = f"{self.read} pairs read, {self.kept} kept; dropped: {drops}"
        return text + "; " + self.skipped_summary() if self.skipped else text

    def skipped_summary(self) -> str:
        if not self.skipped:
            return "no unusable pairs"
        first: dict[str, str] = {}
        for where, why in self.skipped.items():
            first.setdefault(why, where)
        counts = Counter(self.skipped.values())
        return f"skipped {len(self.skipped)} unusable: " + ", ".join(
            f"{n} {why} (first: {first[why]})" for why, n in counts.most_common())


# --------------------------------------------------------------------------------------------------
# Sources


def column_names(cfg: DataRecipe) -> dict[str, str]:
    """lora-dpo's column name -> the name in the user's data (`[data].columns`)."""
    return {name: name for name in COLUMN_NAMES} | dict(cfg.columns)


def _bad(where: str, why: str) -> PairRecord:
    return PairRecord("", "", "", math.nan, where, problem=why)


def _label(value: Any) -> float | None:
    try:
        label = float(value)
    except (TypeError, ValueError):
        return None
    return label if 0.0 <= label <= 1.0 else None


def _path_record(row: Any, where: str, folder: Path, cols: dict[str, str]) -> PairRecord:
    """A JSONL line or CSV row of the path layout: prompt, chosen, rejected (paths relative to the file), label."""
    if not isinstance(row, dict):
        return _bad(where, "malformed row (not an object)")
    absent = [cols[key] for key in ("prompt", "chosen", "rejected") if cols[key] not in row]
    if absent:
        return _bad(where, f"malformed row (no {', '.join(absent)})")
    raw_label = row.get(cols["label"])
    label = 1.0 if raw_label in (None, "") else _label(raw_label)
    if label is None:
        return _bad(where, "invalid label")
    images = []
    for key in ("chosen", "rejected"):
        value = row[cols[key]]
        try:
            path = (folder / str(value)).resolve() if value else None
            found = path is not None and path.is_file()
        except (OSError, ValueError):  # a name too long, or with a NUL byte
            found = False
        if not found:
            return _bad(where, "missing image")
        images.append(str(path))
    return PairRecord(str(row[cols["prompt"]] or ""), images[0], images[1], label, where)


def _utf8_lines(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            yield from handle
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); JSONL and CSV sets are UTF-8 text") from None


def _read_jsonl(path: Path, cols: dict[str, str]) -> Iterator[PairRecord]:
    for number, line in enumerate(_utf8_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            yield _bad(where, "malformed row (not valid JSON)")
            continue
        yield _path_record(row, where, path.parent, cols)


def _read_csv(path: Path, cols: dict[str, str]) -> Iterator[PairRecord]:
    reader = csv.DictReader(_utf8_lines(path))
    missing = [cols[key] for key in ("prompt", "chosen", "rejected") if cols[key] not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; the header needs prompt, chosen, "
                        "rejected (and optionally label), or map yours with [data].columns")
    for row in reader:
        yield _path_record(row, f"{path}:{reader.line_num}", path.parent, cols)


def _pickapic_record(row: dict[str, Any], where: str, image_0: ImageRef, image_1: ImageRef) -> PairRecord:
    """A row of the Pick-a-Pic layout; `row` holds the columns present (lora-dpo's names), images aside."""
    if row.get("label_0") is not None:
        label = _label(row["label_0"])
    else:
        label_1 = _label(row.get("label_1"))
        label = None if label_1 is None else 1.0 - label_1
    if label is None:
        return _bad(where, "invalid label")
    has_label, different = row.get("has_label"), row.get("are_different")
    return PairRecord(str(row["caption"] or ""), image_0, image_1, label, where, has_label=has_label is None
                      or bool(has_label), are_different=different is None or bool(different))


def _check_pickapic_columns(names: list[str], cols: dict[str, str], where: str) -> list[str]:
    """The metadata columns present (lora-dpo's names); a DataError if a needed one is missing."""
    missing = [cols[c] for c in ("caption", "jpg_0", "jpg_1") if cols[c] not in names]
    if cols["label_0"] not in names and cols["label_1"] not in names:
        missing.append(f"{cols['label_0']} (or {cols['label_1']})")
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(missing)}; expected the Pick-a-Pic layout (caption, "
                        "jpg_0, jpg_1, label_0 = 1.0 where jpg_0 is preferred), or map yours with [data].columns")
    return [c for c in ("caption", "label_0", "label_1", "has_label", "are_different") if cols[c] in names]


def _check_parquet_types(schema: Any, cols: dict[str, str], file: Path) -> None:
    """A column of the wrong type is the whole file's problem (not a row's to skip): name it. Nulls are rows'."""
    from pyarrow import types

    text = (types.is_string, types.is_large_string)
    image = ("binary (encoded image) or string (path)",
             (types.is_binary, types.is_large_binary, types.is_struct, *text))
    number = ("number", (types.is_integer, types.is_floating))
    expected = {"caption": ("string", text), "jpg_0": image, "jpg_1": image, "label_0": number, "label_1": number}
    problems = [f"{cols[name]} is {schema.field(cols[name]).type}, expected {what}"
                for name, (what, checks) in expected.items()
                if cols[name] in schema.names and not any(check(schema.field(cols[name]).type) for check in checks)]
    if problems:
        raise DataError(f"{file}: {'; '.join(problems)}")


def parquet_files(path: Path, split: str) -> list[Path]:
    """A file, or a folder's parquet files; in a folder holding several splits (`train-00000-of-00645.parquet`,
    `validation-...`), those of `split` only."""
    if not path.is_dir():
        return [path]
    files = sorted(path.glob("*.parquet"))
    return [f for f in files if f.name.split("-")[0] == split] or files


def _read_parquet(path: Path, cfg: DataRecipe, cols: dict[str, str]) -> Iterator[PairRecord]:
    """Reads only the metadata columns, one row group at a time; images stay in the file as cells."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = parquet_files(path, cfg.split)
    if not files:
        raise DataError(f"[data].source = {cfg.source!r}: no .parquet files in this folder (a dataset repository "
                        "or a `datasets` folder? use hf:<folder>)")
    for file in files:
        try:
            handle = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{file}: not a readable parquet file ({err})") from None
        meta = _check_pickapic_columns(handle.schema_arrow.names, cols, str(file))
        _check_parquet_types(handle.schema_arrow, cols, file)
        start = 0
        for group in range(handle.num_row_groups):
            try:
                table = handle.read_row_group(group, columns=[cols[c] for c in meta])
            except (pa.ArrowException, OSError) as err:
                raise DataError(f"{file}: not a readable parquet file (row group {group}: {err})") from None
            values = {c: table.column(cols[c]).to_pylist() for c in meta}
            for row in range(table.num_rows):
                cells = [ParquetCell(str(file), group, row, cols[c]) for c in ("jpg_0", "jpg_1")]
                yield _pickapic_record({c: values[c][row] for c in meta}, f"{file} row {start + row}", *cells)
            start += table.num_rows


def hub_dataset(cfg: DataRecipe, streaming: bool) -> tuple[Any, list[str]]:
    """`datasets.load_dataset(id, split=...)`, images left encoded; returns it and the metadata columns present."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"[data].source = {cfg.source!r}: hub datasets need the `datasets` package "
                        "(pip install datasets)") from None
    name = cfg.source.removeprefix(HUB_PREFIX)
    try:
        dataset = datasets.load_dataset(name, split=cfg.split, streaming=streaming)
    except Exception as err:  # unknown id or split, no network, a folder that is not a dataset: all the user's to fix
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"[data].source = {cfg.source!r}, [data].split = {cfg.split!r}: `datasets` cannot load it "
                        f"({reason}); check the id, the split and your network") from None
    cols = column_names(cfg)
    meta = _check_pickapic_columns(list(dataset.features or {}), cols, cfg.source)
    for column in (cols["jpg_0"], cols["jpg_1"]):
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))  # {"bytes", "path"}, undecoded
    return dataset, meta


def _read_hub(cfg: DataRecipe, cols: dict[str, str]) -> Iterator[PairRecord]:
    """A downloaded hub split: metadata read in Arrow batches, images left in the memory-mapped table."""
    dataset, meta = hub_dataset(cfg, streaming=False)
    name = cfg.source.removeprefix(HUB_PREFIX)
    table = HubTable(name, dataset.select_columns([cols["jpg_0"], cols["jpg_1"]]))
    start = 0
    for batch in dataset.select_columns([cols[c] for c in meta]).iter(batch_size=10_000):
        size = len(batch[cols["caption"]])
        for i in range(size):
            row = start + i
            yield _pickapic_record({c: batch[cols[c]][i] for c in meta}, f"{name}[{cfg.split}] row {row}",
                                   HubCell(table, row, cols["jpg_0"]), HubCell(table, row, cols["jpg_1"]))
        start += size


def _check_parquet_columns(file: Path, table: Any) -> None:
    """Every Pick-a-Pic column of the type it must have, without nulls; else name the column (and the row)."""
    from pyarrow import types

    text = ("string", types.is_string, types.is_large_string)
    image = ("binary (encoded image) or string (path)", types.is_binary, types.is_large_binary, *text[1:])
    expected_types = {"caption": text, "jpg_0": image, "jpg_1": image,
                      "label_0": ("number", types.is_integer, types.is_floating)}
    problems = []
    for name, (expected, *checks) in expected_types.items():
        if name not in table.column_names:
            continue
        column = table.column(name)
        if not any(check(column.type) for check in checks):
            problems.append(f"{name} is {column.type}, expected {expected}")
        elif column.null_count:
            problems.append(f"{name} is empty (null) in row {column.to_pylist().index(None)}")
    if problems:
        raise DataError(f"{file}: {'; '.join(problems)}")


def synthetic_source(spec: str, resolution: int) -> Path:
    """`synthetic:shapes[:N]` -> the cached demo set's JSONL, written on first use."""
    from lora_dpo.models import cache_home

    parts = spec.split(":")
    if parts[1:2] != ["shapes"] or len(parts) > 3 or (len(parts) == 3 and not parts[2].isdigit()):
        raise DataError(f"[data].source = {spec!r}: the generated set is `synthetic:shapes` or `synthetic:shapes:N`")
    n_pairs = int(parts[2]) if len(parts) == 3 else 512
    size = max(96, resolution + resolution // 2)  # larger than the crop, so resize and crop really happen
    folder = cache_home() / f"shapes-{n_pairs}-{size}"
    if not (folder / "pairs.jsonl").is_file():
        synthetic.write_shapes_dataset(folder, n_pairs, size)
    return folder / "pairs.jsonl"


def is_hub(source: str) -> bool:
    """`hf:...`, or an id like `owner/name` that is not a local path."""
    if source.startswith(HUB_PREFIX):
        return True
    path = Path(source)
    return not path.exists() and path.suffix not in (".jsonl", ".csv", ".parquet") and source.count("/") == 1


def read_records(cfg: DataRecipe) -> Iterator[PairRecord]:
    source, cols = cfg.source, column_names(cfg)
    if source.startswith("synthetic:"):
        yield from _read_jsonl(synthetic_source(source, cfg.resolution), cols)
        return
    if is_hub(source):
        yield from _read_hub(cfg, cols)
        return
    path = Path(source)
    if path.suffix in (".jsonl", ".csv"):
        if not path.is_file():
            raise DataError(f"[data].source = {source!r}: no such file")
        yield from (_read_jsonl if path.suffix == ".jsonl" else _read_csv)(path, cols)
    elif path.suffix == ".parquet" or path.is_dir():
        if not path.exists():
            raise DataError(f"[data].source = {source!r}: no such file or folder")
        yield from _read_parquet(path, cfg, cols)
    else:
        raise DataError(f"[data].source = {source!r}: not a .jsonl, .csv, .parquet, folder of parquet files, hub "
                        "dataset id or `hf:<id or folder>`")


# --------------------------------------------------------------------------------------------------
# The ties policy and the split


def _orient(record: PairRecord, cfg: DataRecipe, stats: PairStats) -> Pair | None:
    """The pair with the preferred image first, or None (dropped by the policy, or unusable: counted)."""
    stats.read += 1
    if record.problem or not record.prompt.strip():
        stats.skip(record.where, record.problem or "empty caption", cfg.strict)
        return None
    reason = None
    if not record.has_label:
        reason = "unlabelled"
    elif record.label_0 == 0.5 and cfg.ties == "drop":
        reason = "ties"
    elif not record.are_different or (record.image_0 and record.image_0 == record.image_1):
        reason = "identical images"
    if reason:
        stats.dropped[reason] += 1
        return None
    stats.kept += 1
    if record.label_0 >= 0.5:
        return Pair(record.prompt, record.image_0, record.image_1, record.label_0, record.where)
    return Pair(record.prompt, record.image_1, record.image_0, 1.0 - record.label_0, record.where)


def prepare_pairs(records: Iterable[PairRecord], cfg: DataRecipe) -> tuple[list[Pair], PairStats]:
    """Apply the ties policy, drop unusable rows, and orient every pair so that `w` is preferred."""
    stats, pairs = PairStats(), []
    for record in records:
        pair = _orient(record, cfg, stats)
        if pair is not None:
            pairs.append(pair)
            if cfg.max_pairs is not None and len(pairs) >= cfg.max_pairs + cfg.val_pairs:
                break
    return pairs, stats


def split_pairs(pairs: list[Pair], val_pairs: int, seed: int) -> tuple[list[Pair], list[Pair]]:
    """A deterministic held-out split: the same seed and data always hold out the same pairs; order is kept."""
    if val_pairs >= len(pairs):
        raise DataError(f"[data].val_pairs = {val_pairs} leaves no training pairs out of {len(pairs)}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = set(order[:val_pairs])
    return [p for i, p in enumerate(pairs) if i not in held], [p for i, p in enumerate(pairs) if i in held]


def locality_blocks(pairs: list[Pair]) -> list[int] | None:
    """Start offsets of runs of pairs stored in the same parquet row group, or None when reading a pair costs the
    same wherever it is (files, memory-mapped Arrow)."""
    if not pairs or not isinstance(pairs[0].image_w, ParquetCell):
        return None
    starts, previous = [], None
    for index, pair in enumerate(pairs):
        cell = pair.image_w
        here = (cell.file, cell.group) if isinstance(cell, ParquetCell) else None
        if index == 0 or here != previous:
            starts.append(index)
        previous = here
    return starts


# --------------------------------------------------------------------------------------------------
# Reading and decoding images


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


def open_image(ref: ImageRef, where: str, reader: ImageReader | None = None) -> Image.Image:
    """An image as RGB whatever its mode (for scoring and labelling), or a DataError naming the row."""
    image = decode_image((reader or ImageReader()).read(ref))
    if isinstance(image, str):
        raise DataError(f"{where}: {image}")
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------------
# The pair transform


def transform_pair(images: tuple[Image.Image, Image.Image], resolution: int, crop: str, flip: bool,
                   rng: random.Random) -> tuple[Tensor, Tensor]:
    """Resize each image's shorter side to `resolution`, crop a square at the same relative position and flip
    both or neither. Returns pixels (2, 3, R, R) in [-1, 1] and SDXL time ids (2, 6): original (h, w), crop
    top-left (y, x) and target (h, w), per image, from what was really done to it."""
    u, v, mirror = rng.random(), rng.random(), flip and rng.random() < 0.5
    pixels, time_ids = [], []
    for image in images:
        width, height = image.size
        scale = resolution / min(width, height)
        new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        if crop == "center":
            top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
        else:
            top, left = round(u * (new_h - resolution)), round(v * (new_w - resolution))
        image = image.crop((left, top, left + resolution, top + resolution))
        if mirror:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = new_w - resolution - left  # the crop's position in the mirrored image
        pixels.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        time_ids.append(torch.tensor([height, width, top, left, resolution, resolution], dtype=torch.float32))
    return torch.stack(pixels).float() / 127.5 - 1.0, torch.stack(time_ids)


def caption_dropped(seed: int, key: int, probability: float) -> bool:
    """Whether draw `key` trains on the empty prompt. Its own random stream, apart from the crop's, so that the
    latent cache (which keeps every prompt's embedding and the empty one) decides exactly as the live loader."""
    return probability > 0 and random.Random(f"caption:{seed}:{key}").random() < probability


def make_item(pair: Pair, reader: ImageReader, cfg: DataRecipe, seed: int, key: int, train: bool) -> dict | str:
    """Pair decoded and transformed with draw `key`'s crop and flip (full prompt), or why it is unusable."""
    raw = (reader.read(pair.image_w), reader.read(pair.image_l))
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
    rng = random.Random(seed * 1_000_003 + key)
    crop = cfg.crop if train else "center"
    pixels, time_ids = transform_pair((images[0], images[1]), cfg.resolution, crop, train and cfg.random_flip, rng)
    return {"prompt": pair.prompt, "pixels": pixels, "time_ids": time_ids, "label": pair.label}


@dataclass
class PreferenceBatch:
    """B pairs. pixels_* (B, 3, R, R) in [-1, 1]; time_ids_* (B, 6); labels (B,) = P(w preferred); stats: the
    rows the loader read, dropped or skipped while making this batch (counted in the main process)."""

    prompts: list[str]
    pixels_w: Tensor
    pixels_l: Tensor
    time_ids_w: Tensor
    time_ids_l: Tensor
    labels: Tensor
    stats: PairStats = field(default_factory=PairStats)

    def pin_memory(self) -> PreferenceBatch:
        """Called by DataLoader(pin_memory=True): page-locked pixels copy to the GPU asynchronously."""
        self.pixels_w, self.pixels_l = self.pixels_w.pin_memory(), self.pixels_l.pin_memory()
        return self


class PreferenceDataset(torch.utils.data.Dataset):
    """Items are keyed by a draw number from `StreamSampler`: the pair is `key % len`, and every random choice
    (crop, flip, caption dropout, the fallback for an unusable pair) is seeded by (seed, key), so a resumed run
    sees the same data."""

    def __init__(self, pairs: list[Pair], cfg: DataRecipe, seed: int, train: bool = True,
                 reader: ImageReader | None = None) -> None:
        self.pairs, self.cfg, self.seed, self.train = pairs, cfg, seed, train
        self.reader = reader or ImageReader()
        self._unusable: dict[int, str] = {}  # per process: pairs found unusable, not decoded again

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int, key: int) -> dict | str:
        """Pair `index` with draw `key`'s crop and flip and its full prompt, or why it is unusable."""
        if index in self._unusable:
            return self._unusable[index]
        item = make_item(self.pairs[index], self.reader, self.cfg, self.seed, key, self.train)
        if isinstance(item, str):
            self._unusable[index] = item
        return item

    def __getitem__(self, key: int) -> dict[str, Any]:
        index, stats = key % len(self.pairs), PairStats()
        fallback = random.Random(f"fallback:{self.seed}:{key}")
        for _ in range(MAX_FALLBACKS):
            item = self.load(index, key)
            if not isinstance(item, str):
                break
            # identical images show only here in parquet without an are_different column: a drop, never an error
            stats.skip(self.pairs[index].where, item, self.cfg.strict and item not in POLICY_DROPS)
            index = fallback.randrange(len(self.pairs))
        else:
            raise DataError(f"{MAX_FALLBACKS} pairs in a row were unusable ({stats.skipped_summary()}): the data "
                            "looks broken; check [data].source and [data].columns")
        if self.train and caption_dropped(self.seed, key, self.cfg.caption_dropout):
            item["prompt"] = ""
        return {**item, "stats": stats}


def collate(items: list[dict[str, Any]]) -> PreferenceBatch:
    pixels = torch.stack([item["pixels"] for item in items])  # (B, 2, 3, R, R)
    time_ids = torch.stack([item["time_ids"] for item in items])  # (B, 2, 6)
    stats = PairStats()
    for item in items:
        stats.merge(item["stats"])
    return PreferenceBatch(
        prompts=[item["prompt"] for item in items], pixels_w=pixels[:, 0], pixels_l=pixels[:, 1],
        time_ids_w=time_ids[:, 0], time_ids_l=time_ids[:, 1],
        labels=torch.tensor([item["label"] for item in items], dtype=torch.float32), stats=stats)


class StreamSampler(torch.utils.data.Sampler[int]):
    """The whole run's draws as one stream: epoch e yields e * n + (an order of range(n) seeded by (seed, e)).
    One pass over the loader is the whole run, so the loop has no epochs and a resume only skips batches.

    With `blocks` (start offsets of pairs stored together, e.g. parquet row groups) the order shuffles whole
    blocks, then the pairs within each window of at least `window` pairs: a pass reads each block about once."""

    def __init__(self, n: int, draws: int, seed: int, blocks: list[int] | None = None, window: int = 1) -> None:
        self.n, self.draws, self.seed, self.blocks, self.window = n, draws, seed, blocks, window

    def __len__(self) -> int:
        return self.draws

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if not self.blocks:
            return torch.randperm(self.n, generator=generator).tolist()
        bounds = [*self.blocks, self.n]
        order: list[int] = []
        window: list[int] = []
        for block in torch.randperm(len(self.blocks), generator=generator).tolist():
            window.extend(range(bounds[block], bounds[block + 1]))
            if len(window) >= self.window:
                order.extend(window[i] for i in torch.randperm(len(window), generator=generator).tolist())
                window = []
        order.extend(window[i] for i in torch.randperm(len(window), generator=generator).tolist())
        return order

    def __iter__(self) -> Iterator[int]:
        emitted, epoch = 0, 0
        while emitted < self.draws:
            for index in self._order(epoch)[: self.draws - emitted]:
                yield epoch * self.n + index
            emitted += min(self.n, self.draws - emitted)
            epoch += 1


# --------------------------------------------------------------------------------------------------
# Streaming a hub split


def _stream_records(dataset: Any, cfg: DataRecipe, meta: list[str]) -> Iterator[tuple[str, PairRecord]]:
    """(identity, record) of each streamed row. Streams have no stable row numbers (the shard order changes every
    pass), so a row is known by a hash of its caption and first image: held-out rows are left out by it, and a bad
    row met in several passes is reported once."""
    cols, reader = column_names(cfg), ImageReader()
    for row in dataset:
        images = (reader.read(row[cols["jpg_0"]]), reader.read(row[cols["jpg_1"]]))
        caption = str(row[cols["caption"]] or "")
        first = images[0] if isinstance(images[0], bytes) else str(images[0]).encode()
        key = hashlib.blake2b(caption.encode() + b"\0" + first, digest_size=12).hexdigest()
        where = f"{cfg.source}[{cfg.split}] row {caption[:40]!r} #{key[:8]}"
        yield key, _pickapic_record({c: row[cols[c]] for c in meta}, where, *images)


def stream_holdout(cfg: DataRecipe) -> tuple[list[Pair], frozenset[str], PairStats]:
    """The held-out pairs of a stream: the first `val_pairs` usable ones in the source's order (kept in memory),
    and their row keys, which every training pass leaves out."""
    held, keys, stats = [], set(), PairStats()
    if cfg.val_pairs:
        dataset, meta = hub_dataset(cfg, streaming=True)
        for key, record in _stream_records(dataset, cfg, meta):
            pair = _orient(record, cfg, stats)
            if pair is not None:
                held.append(pair)
                keys.add(key)
                if len(held) == cfg.val_pairs:
                    break
    return held, frozenset(keys), stats


def _buffer_shuffle(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Hold `size` items, yield one at random as each new one arrives: a bounded-memory shuffle of a stream."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


class StreamingPreferenceDataset(torch.utils.data.IterableDataset):
    """Pairs streamed from a hub split, never downloaded whole. Each process, and each loader worker in it,
    reads its own shards of the split (files; `datasets` assigns them), applies the ties policy, leaves out the
    held-out rows, draws pairs at random from a buffer of `shuffle_buffer` usable ones, and yields exactly its
    share of the run's draws, passing over its shards again (in a new shard order) as often as needed.

    Draw keys (which seed crop, flip and caption dropout): batch b of this process comes from worker b % W, as
    the DataLoader interleaves workers, and its i-th pair has key b * batch_size + i. Items depend on the number
    of processes and workers. `max_pairs` keeps the first pairs of each part in source order (its share of
    max_pairs), reshuffled in the buffer every pass. A resume replays the stream up to its batch (skipping the
    decoded batches), which re-reads that much of the stream."""

    def __init__(self, cfg: DataRecipe, seed: int, draws: int, batch_size: int, holdout: frozenset[str] = frozenset(),
                 process_index: int = 0, num_processes: int = 1) -> None:
        self.cfg, self.seed, self.draws, self.batch_size, self.holdout = cfg, seed, draws, batch_size, holdout
        self.process_index, self.num_processes = process_index, num_processes

    def num_shards(self) -> int:
        """Shards (files) this process reads: more loader workers than this would sit idle."""
        dataset, _ = hub_dataset(self.cfg, streaming=True)
        return max(1, dataset.num_shards // self.num_processes)

    def _pairs(self, epoch: int, part: int, parts: int, stats: PairStats) -> Iterator[Pair]:
        from datasets.distributed import split_dataset_by_node

        cfg = self.cfg
        dataset, meta = hub_dataset(cfg, streaming=True)
        if self.num_processes > 1:
            dataset = split_dataset_by_node(dataset, self.process_index, self.num_processes)
        if cfg.max_pairs is None:  # a new shard order every pass; the pair buffer below does the rest
            import inspect

            # newer `datasets` also interleave shards in threads (and sleep 5 s when a pass ends): not needed here
            one = {"max_buffer_input_shards": 1} if "max_buffer_input_shards" in inspect.signature(
                dataset.shuffle).parameters else {}
            dataset = dataset.shuffle(seed=self.seed, buffer_size=1, **one)
            dataset.set_epoch(epoch)
        cap = None if cfg.max_pairs is None else cfg.max_pairs // parts + (part < cfg.max_pairs % parts)
        kept = 0
        for key, record in _stream_records(dataset, cfg, meta):
            if key in self.holdout:
                continue
            pair = _orient(record, cfg, stats)
            if pair is None:
                continue
            yield pair
            kept += 1
            if cap is not None and kept >= cap:
                return

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        part, parts = self.process_index * workers + worker, self.num_processes * workers
        size, reader, stats = self.batch_size, ImageReader(), PairStats()
        rng = random.Random(f"stream:{self.seed}:{part}")
        count, epoch = 0, 0
        while True:
            produced = 0
            for pair in _buffer_shuffle(self._pairs(epoch, part, parts, stats), self.cfg.shuffle_buffer, rng):
                key = ((count // size) * workers + worker) * size + count % size
                if key >= self.draws:
                    return
                item = make_item(pair, reader, self.cfg, self.seed, key, train=True)
                if isinstance(item, str):
                    stats.skip(pair.where, item, self.cfg.strict and item not in POLICY_DROPS)
                    continue
                if caption_dropped(self.seed, key, self.cfg.caption_dropout):
                    item["prompt"] = ""
                item["stats"] = stats.drain()
                yield item
                count, produced = count + 1, produced + 1
            if not produced:
                raise DataError(f"[data].source = {self.cfg.source!r}: no usable pairs in this part of the stream "
                                f"(process {self.process_index}, worker {worker}; {stats.summary()})")
            epoch += 1


# --------------------------------------------------------------------------------------------------
# What the trainer builds its loaders from


@dataclass
class Datasets:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    sampler: torch.utils.data.Sampler | None  # None when `train` is a stream (it orders itself)
    collate: Callable[[list[dict[str, Any]]], Any]
    stats: PairStats
    summary: str
    num_workers: int
    prompts: tuple[str, ...] = ()  # held-out (else training) prompts: the default prompts of sample grids


def build_datasets(cfg: DataRecipe, seed: int, draws: int, batch_size: int, process_index: int = 0,
                   num_processes: int = 1) -> Datasets:
    """Live sources: read and filter the records (or, for a stream, the held-out head), split, and wrap them.
    `draws` counts the whole run's pairs over all processes."""
    if cfg.streaming:
        if not is_hub(cfg.source):
            raise DataError(f"[data].streaming = true needs a hub dataset; {cfg.source!r} is read lazily anyway")
        held, keys, stats = stream_holdout(cfg)
        train = StreamingPreferenceDataset(cfg, seed, draws // num_processes, batch_size, keys, process_index,
                                           num_processes)
        workers = min(cfg.num_workers, train.num_shards())
        summary = f"streaming {cfg.source} [{cfg.split}]: {len(held)} held out ({stats.summary()})"
        val = PreferenceDataset(held, cfg, seed, train=False) if held else None
        return Datasets(train, val, None, collate, stats, summary, workers, tuple(p.prompt for p in held))
    pairs, stats = prepare_pairs(read_records(cfg), cfg)
    if not pairs:
        raise DataError(f"[data].source = {cfg.source!r}: no usable pairs ({stats.summary()})")
    train_pairs, val_pairs = split_pairs(pairs, cfg.val_pairs, seed)
    blocks = locality_blocks(train_pairs)
    reader = ImageReader()
    if blocks:  # hold the row groups of a shuffle window (both image columns); sized by the median group, so
        # one short last group does not let the cache grow to thousands of groups
        sizes = sorted(b - a for a, b in zip(blocks, [*blocks[1:], len(train_pairs)], strict=True))
        reader = ImageReader(capacity=2 * (math.ceil(cfg.shuffle_buffer / sizes[len(sizes) // 2]) + 2))
    train = PreferenceDataset(train_pairs, cfg, seed, reader=reader)
    sampler = StreamSampler(len(train_pairs), draws, seed, blocks, cfg.shuffle_buffer)
    val = PreferenceDataset(val_pairs, cfg, seed, train=False) if val_pairs else None
    summary = f"{stats.summary()}; {len(train_pairs)} train / {len(val_pairs)} held out"
    prompts = tuple(p.prompt for p in (val_pairs or train_pairs[:256]))
    return Datasets(train, val, sampler, collate, stats, summary, cfg.num_workers, prompts)
