"""Sources -> `PairRecord`s, no image decoded: JSONL and CSV files of paths, a folder of `w/` and `l/` images with
`.txt` captions (sd-scripts' DPO layout), local parquet (a file, or a folder of
a split's files; metadata read one row group at a time, images left in the file as `ParquetCell`s), hub
datasets (`hub`), and the generated demo set (`synthetic:shapes[:N]`, written under `files.cache_home()` on first
use). `read_records` picks the reader from `[data].source`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_dpo import synthetic
from lora_dpo.data.hub import is_hub, read_hub
from lora_dpo.data.records import DataError, PairRecord, ParquetCell
from lora_dpo.data.rows import bad_record, check_pickapic_columns, column_names, path_record, pickapic_record
from lora_dpo.files import cache_home
from lora_dpo.recipe import DataRecipe


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
            yield bad_record(where, "malformed row (not valid JSON)")
            continue
        yield path_record(row, where, path.parent, cols)


def _read_csv(path: Path, cols: dict[str, str]) -> Iterator[PairRecord]:
    reader = csv.DictReader(_utf8_lines(path))
    missing = [cols[key] for key in ("prompt", "chosen", "rejected") if cols[key] not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; the header needs prompt, chosen, "
                        "rejected (and optionally label), or map yours with [data].columns")
    for row in reader:
        yield path_record(row, f"{path}:{reader.line_num}", path.parent, cols)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PAIR_FOLDERS = ("w", "l")  # preferred ("winner") and rejected ("loser") images, the same file names in each


def is_pair_folders(path: Path) -> bool:
    return all((path / name).is_dir() for name in PAIR_FOLDERS)


def _images_by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}


def _caption(stem: str, folders: tuple[Path, Path]) -> str | None:
    """`w/<stem>.txt`, else `l/<stem>.txt` (UTF-8, stripped); None if neither exists."""
    for folder in folders:
        text = folder / f"{stem}.txt"
        if text.is_file():
            try:
                return text.read_text(encoding="utf-8").strip()
            except UnicodeDecodeError:
                return None
    return None


def _read_pair_folders(path: Path) -> Iterator[PairRecord]:
    """`w/0001.png` preferred over `l/0001.png` (any image suffix, matched by file stem), the prompt in
    `w/0001.txt` (or `l/0001.txt`). An image without its partner is an unusable row: counted and skipped, or the
    error under `[data].strict`."""
    w_dir, l_dir = path / "w", path / "l"
    winners, losers = _images_by_stem(w_dir), _images_by_stem(l_dir)
    for stem in sorted(winners.keys() | losers.keys()):
        if stem not in losers:
            yield bad_record(str(winners[stem]), "no image of the same name in l/")
            continue
        if stem not in winners:
            yield bad_record(str(losers[stem]), "no image of the same name in w/")
            continue
        caption = _caption(stem, (w_dir, l_dir))
        if caption is None:
            yield bad_record(str(winners[stem]), f"no caption ({stem}.txt in w/ or l/, UTF-8)")
            continue
        yield PairRecord(caption, str(winners[stem].resolve()), str(losers[stem].resolve()), 1.0, str(winners[stem]))


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


def parquet_files(path: Path, split: str, key: str = "[data].split") -> list[Path]:
    """A file, or a folder's parquet files. A folder holding named splits (`train-00000-of-00645.parquet`,
    `validation-...`: the name up to the first `-`) gives the files of `split`, and a DataError listing the splits
    it has when there is none; a folder of files without split names (`a.parquet`) is one split, used whole."""
    if not path.is_dir():
        return [path]
    files = sorted(path.glob("*.parquet"))
    splits = sorted({f.name.split("-")[0] for f in files if "-" in f.name})
    if not splits:
        return files
    chosen = [f for f in files if "-" in f.name and f.name.split("-")[0] == split]
    if not chosen:
        raise DataError(f"{key} = {split!r}: {path} has no `{split}-*.parquet` file; its splits: "
                        f"{', '.join(splits)}")
    return chosen


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
        meta = check_pickapic_columns(handle.schema_arrow.names, cols, str(file))
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
                yield pickapic_record({c: values[c][row] for c in meta}, f"{file} row {start + row}", *cells)
            start += table.num_rows


def synthetic_source(spec: str, resolution: int) -> Path:
    """`synthetic:shapes[:N]` -> the cached demo set's JSONL, written on first use."""
    parts = spec.split(":")
    if parts[1:2] != ["shapes"] or len(parts) > 3 or (len(parts) == 3 and not parts[2].isdigit()):
        raise DataError(f"[data].source = {spec!r}: the generated set is `synthetic:shapes` or `synthetic:shapes:N`")
    n_pairs = int(parts[2]) if len(parts) == 3 else 512
    size = max(96, resolution + resolution // 2)  # larger than the crop, so resize and crop really happen
    folder = cache_home() / f"shapes-{n_pairs}-{size}"
    if not (folder / "pairs.jsonl").is_file():
        synthetic.write_shapes_dataset(folder, n_pairs, size)
    return folder / "pairs.jsonl"


def check_val_split(cfg: DataRecipe) -> None:
    """`[data].val_split` reads another split of the same dataset: a hub dataset's, or a parquet folder's
    `<split>-*.parquet` files. Other sources have no second split: a DataError says so."""
    if cfg.val_split is None or is_hub(cfg.source):
        return
    path = Path(cfg.source)
    if path.is_dir() and any("-" in f.name for f in path.glob("*.parquet")):
        parquet_files(path, cfg.val_split, "[data].val_split")  # raises, listing the splits, when it is absent
        return
    raise DataError(f"[data].val_split = {cfg.val_split!r}: {cfg.source!r} has no named splits (a hub dataset or a "
                    "folder of `<split>-*.parquet` files has); unset it to hold pairs out of the training source "
                    "by prompt")


def read_records(cfg: DataRecipe) -> Iterator[PairRecord]:
    """Every row of `[data].source`, lazily, in the source's order; the reader is chosen by the source's form."""
    source, cols = cfg.source, column_names(cfg)
    if source.startswith("synthetic:"):
        yield from _read_jsonl(synthetic_source(source, cfg.resolution), cols)
        return
    if is_hub(source):
        yield from read_hub(cfg, cols)
        return
    path = Path(source)
    if path.suffix in (".jsonl", ".csv"):
        if not path.is_file():
            raise DataError(f"[data].source = {source!r}: no such file")
        yield from (_read_jsonl if path.suffix == ".jsonl" else _read_csv)(path, cols)
    elif path.is_dir() and is_pair_folders(path):
        yield from _read_pair_folders(path)
    elif path.suffix == ".parquet" or path.is_dir():
        if not path.exists():
            raise DataError(f"[data].source = {source!r}: no such file or folder")
        yield from _read_parquet(path, cfg, cols)
    else:
        raise DataError(f"[data].source = {source!r}: not a .jsonl, .csv, .parquet, folder of parquet files, folder "
                        "with w/ and l/ image folders, hub dataset id or `hf:<id or folder>`")
