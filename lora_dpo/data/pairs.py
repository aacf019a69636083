"""From records to training pairs: the ties policy and the winner/loser swap (`orient`, the only place in the
project where labels are read), the held-out split by prompt, and the runs of pairs stored together (parquet row groups)
that the sampler shuffles as blocks.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from lora_dpo.data.records import HELD_OUT_PROMPT, DataError, Pair, PairRecord, PairStats, ParquetCell
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
            held_here = 0 if cfg.val_split else cfg.val_pairs  # with val_split the held-out pairs come from there
            if cfg.max_pairs is not None and len(pairs) >= cfg.max_pairs + held_here:
                break
    return pairs, stats


def pick_prompts(pairs: list[Pair], val_pairs: int, seed: int) -> tuple[set[str], list[Pair]]:
    """Held-out prompts, drawn in an order seeded by `seed`, until their pairs number `val_pairs` (0: all): the
    prompts and exactly `val_pairs` of their pairs (the last prompt's first ones, in source order)."""
    if not val_pairs or val_pairs >= len(pairs):
        return {pair.prompt for pair in pairs}, list(pairs)
    prompts = sorted({pair.prompt for pair in pairs})  # sorted first: the draw must not depend on set order
    random.Random(seed).shuffle(prompts)
    by_prompt: dict[str, list[int]] = {}
    for index, pair in enumerate(pairs):
        by_prompt.setdefault(pair.prompt, []).append(index)
    held_prompts: set[str] = set()
    held: set[int] = set()
    for prompt in prompts:
        if len(held) >= val_pairs:
            break
        held_prompts.add(prompt)
        held.update(by_prompt[prompt][: val_pairs - len(held)])
    return held_prompts, [pair for index, pair in enumerate(pairs) if index in held]


def drop_prompts(pairs: list[Pair], prompts: set[str] | frozenset[str], stats: PairStats | None) -> list[Pair]:
    """The pairs whose prompt is not held out; the others are moved from `stats.kept` to its drops."""
    kept = [pair for pair in pairs if pair.prompt not in prompts]
    if stats is not None and len(kept) < len(pairs):
        stats.kept -= len(pairs) - len(kept)
        stats.dropped[HELD_OUT_PROMPT] += len(pairs) - len(kept)
    return kept


def split_pairs(pairs: list[Pair], val_pairs: int, seed: int,
                stats: PairStats | None = None) -> tuple[list[Pair], list[Pair]]:
    """A held-out set that generalises: whole prompts are held out (so no held-out image or prompt is ever trained
    on), drawn deterministically from the seed until they give `val_pairs` pairs; training keeps only the pairs
    of other prompts. The last held-out prompt's pairs beyond `val_pairs` are in neither set (counted in `stats`
    as "held-out prompt"). The same seed and data always hold out the same pairs; order is kept."""
    if not val_pairs:
        return list(pairs), []
    held_prompts, held = pick_prompts(pairs, val_pairs, seed)
    train = [pair for pair in pairs if pair.prompt not in held_prompts]
    if not train:
        raise DataError(f"[data].val_pairs = {val_pairs} holds out every prompt ({len(held_prompts)} prompts, "
                        f"{len(pairs)} pairs): no training pairs left; lower it")
    surplus = len(pairs) - len(train) - len(held)
    if stats is not None and surplus:
        stats.kept -= surplus
        stats.dropped[HELD_OUT_PROMPT] += surplus
    return train, held


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
