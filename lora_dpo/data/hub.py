"""Hub datasets (`owner/name` or `hf:<id or folder>`), loaded with the `datasets` library, images left encoded:
recognising such a source, loading a split (downloaded or streamed), and reading a downloaded split's rows with
their images left in the memory-mapped Arrow table (`HubCell`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lora_dpo.data.records import DataError, HubCell, HubTable, PairRecord
from lora_dpo.data.rows import check_pickapic_columns, column_names, pickapic_record
from lora_dpo.recipe import DataRecipe

HUB_PREFIX = "hf:"  # `hf:<id or folder>`: read with the `datasets` library, as a hub id would be


def is_hub(source: str) -> bool:
    """`hf:...`, or an id like `owner/name` that is not a local path."""
    if source.startswith(HUB_PREFIX):
        return True
    path = Path(source)
    return not path.exists() and path.suffix not in (".jsonl", ".csv", ".parquet") and source.count("/") == 1


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
    meta = check_pickapic_columns(list(dataset.features or {}), cols, cfg.source)
    for column in (cols["jpg_0"], cols["jpg_1"]):
        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))  # {"bytes", "path"}, undecoded
    return dataset, meta


def read_hub(cfg: DataRecipe, cols: dict[str, str]) -> Iterator[PairRecord]:
    """A downloaded hub split: metadata read in Arrow batches, images left in the memory-mapped table."""
    dataset, meta = hub_dataset(cfg, streaming=False)
    name = cfg.source.removeprefix(HUB_PREFIX)
    table = HubTable(name, dataset.select_columns([cols["jpg_0"], cols["jpg_1"]]))
    start = 0
    for batch in dataset.select_columns([cols[c] for c in meta]).iter(batch_size=10_000):
        size = len(batch[cols["caption"]])
        for i in range(size):
            row = start + i
            yield pickapic_record({c: batch[cols[c]][i] for c in meta}, f"{name}[{cfg.split}] row {row}",
                                  HubCell(table, row, cols["jpg_0"]), HubCell(table, row, cols["jpg_1"]))
        start += size
