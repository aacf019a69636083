"""One row of a source -> a `PairRecord`, in either layout: paths (prompt, chosen, rejected, optional label; JSONL
and CSV) or Pick-a-Pic (caption, jpg_0, jpg_1, label_0 or label_1, has_label, are_different; parquet and hub
splits). `[data].columns` renames the columns. What a row's own fields show to be unusable (a missing file, a bad
label, a malformed line) becomes a record with a `problem`, for the ties policy to count; a column missing from a
whole file is a `DataError`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lora_dpo.data.records import DataError, ImageRef, PairRecord
from lora_dpo.recipe import COLUMN_NAMES, DataRecipe


def column_names(cfg: DataRecipe) -> dict[str, str]:
    """lora-dpo's column name -> the name in the user's data (`[data].columns`)."""
    return {name: name for name in COLUMN_NAMES} | dict(cfg.columns)


def bad_record(where: str, why: str) -> PairRecord:
    """A row that is unusable for reason `why`; the ties policy counts it as skipped."""
    return PairRecord("", "", "", math.nan, where, problem=why)


def _label(value: Any) -> float | None:
    try:
        label = float(value)
    except (TypeError, ValueError):
        return None
    return label if 0.0 <= label <= 1.0 else None


def path_record(row: Any, where: str, folder: Path, cols: dict[str, str]) -> PairRecord:
    """A JSONL line or CSV row of the path layout: prompt, chosen, rejected (paths relative to the file), label."""
    if not isinstance(row, dict):
        return bad_record(where, "malformed row (not an object)")
    absent = [cols[key] for key in ("prompt", "chosen", "rejected") if cols[key] not in row]
    if absent:
        return bad_record(where, f"malformed row (no {', '.join(absent)})")
    raw_label = row.get(cols["label"])
    label = 1.0 if raw_label in (None, "") else _label(raw_label)
    if label is None:
        return bad_record(where, "invalid label")
    images = []
    for key in ("chosen", "rejected"):
        value = row[cols[key]]
        try:
            path = (folder / str(value)).resolve() if value else None
            found = path is not None and path.is_file()
        except (OSError, ValueError):  # a name too long, or with a NUL byte
            found = False
        if not found:
            return bad_record(where, "missing image")
        images.append(str(path))
    return PairRecord(str(row[cols["prompt"]] or ""), images[0], images[1], label, where)


def pickapic_record(row: dict[str, Any], where: str, image_0: ImageRef, image_1: ImageRef) -> PairRecord:
    """A row of the Pick-a-Pic layout; `row` holds the columns present (lora-dpo's names), images aside."""
    if row.get("label_0") is not None:
        label = _label(row["label_0"])
    else:
        label_1 = _label(row.get("label_1"))
        label = None if label_1 is None else 1.0 - label_1
    if label is None:
        return bad_record(where, "invalid label")
    has_label, different = row.get("has_label"), row.get("are_different")
    return PairRecord(str(row["caption"] or ""), image_0, image_1, label, where, has_label=has_label is None
                      or bool(has_label), are_different=different is None or bool(different))


def check_pickapic_columns(names: list[str], cols: dict[str, str], where: str) -> list[str]:
    """The metadata columns present (lora-dpo's names); a DataError if a needed one is missing."""
    missing = [cols[c] for c in ("caption", "jpg_0", "jpg_1") if cols[c] not in names]
    if cols["label_0"] not in names and cols["label_1"] not in names:
        missing.append(f"{cols['label_0']} (or {cols['label_1']})")
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(missing)}; expected the Pick-a-Pic layout (caption, "
                        "jpg_0, jpg_1, label_0 = 1.0 where jpg_0 is preferred), or map yours with [data].columns")
    return [c for c in ("caption", "label_0", "label_1", "has_label", "are_different") if cols[c] in names]
