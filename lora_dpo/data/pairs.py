"""From records to training pairs: the ties policy and the winner/loser swap (`orient`, the only place in the
project where labels are read), the held-out split, and the runs of pairs stored together (parquet row groups)
that the sampler shuffles as blocks.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from lora_dpo.data.records import DataError, Pair, PairRecord, PairStats, ParquetCell
from lora_dpo.recipe import DataRecipe


def orient(record: PairRecord, cfg: DataRecipe, stats: PairStats) -> Pair | None:
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
        pair = orient(record, cfg, stats)
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
