"""What the trainer builds its loaders from: `split_live` reads, filters and splits a live source (the latent cache
splits with it too); `build_datasets` wraps that (or, for a stream, its held-out head) as `Datasets` (train and
held-out sets, sampler, collate, counts, how the held-out set was chosen).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from lora_dpo.data.dataset import PreferenceDataset, StreamSampler, collate
from lora_dpo.data.hub import is_hub
from lora_dpo.data.images import ImageReader
from lora_dpo.data.pairs import drop_prompts, locality_blocks, pick_prompts, prepare_pairs, split_pairs
from lora_dpo.data.readers import check_val_split, read_records
from lora_dpo.data.records import DataError, HeldOut, Pair, PairStats
from lora_dpo.data.streaming import StreamingPreferenceDataset, stream_holdout
from lora_dpo.recipe import DataRecipe


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
    heldout: str = "no held-out pairs"  # how the held-out set was chosen (`HeldOut.describe`)
    heldout_rows: list[dict[str, Any]] = field(default_factory=list)  # heldout.jsonl's lines (`HeldOut.rows`)


def split_live(cfg: DataRecipe, seed: int) -> tuple[list[Pair], HeldOut, PairStats]:
    """A live (not streamed) source's training pairs and held-out set: whole prompts held out of the source
    (`split_pairs`), or the pairs of `[data].val_split` (all, or `val_pairs` of them chosen by prompt as
    `split_pairs` would); either way no training pair shares a prompt with a held-out one. The trainer and the
    latent cache both split here, so a cache holds out exactly what a live run would."""
    check_val_split(cfg)
    pairs, stats = prepare_pairs(read_records(cfg), cfg)
    if not pairs:
        raise DataError(f"[data].source = {cfg.source!r}: no usable pairs ({stats.summary()})")
    if cfg.val_split is None:
        train, held = split_pairs(pairs, cfg.val_pairs, seed, stats)
        return train, HeldOut(held), stats
    other = dataclasses.replace(cfg, split=cfg.val_split, max_pairs=None, val_pairs=0)
    candidates, val_stats = prepare_pairs(read_records(other), other)
    if not candidates:
        raise DataError(f"[data].val_split = {cfg.val_split!r}: no usable pairs in it ({val_stats.summary()})")
    _, held = pick_prompts(candidates, cfg.val_pairs, seed)
    train = drop_prompts(pairs, {pair.prompt for pair in held}, stats)
    if not train:
        raise DataError(f"[data].val_split = {cfg.val_split!r} shares every prompt of [data].split = {cfg.split!r}: "
                        "no training pairs left")
    return train, HeldOut(held, cfg.val_split), stats


def build_datasets(cfg: DataRecipe, seed: int, draws: int, batch_size: int, process_index: int = 0,
                   num_processes: int = 1, start: int = 0) -> Datasets:
    """Live sources: read and filter the records (or, for a stream, the held-out head), split, and wrap them.
    `draws` counts the whole run's pairs over all processes; the training stream goes on from draw `start` (a
    resume; a streamed source is replayed by the trainer instead)."""
    if cfg.streaming:
        if not is_hub(cfg.source):
            raise DataError(f"[data].streaming = true needs a hub dataset; {cfg.source!r} is read lazily anyway")
        heldout, leave_out, stats = stream_holdout(cfg)
        train = StreamingPreferenceDataset(cfg, seed, draws // num_processes, batch_size, leave_out, process_index,
                                           num_processes)
        workers = min(cfg.num_workers, train.num_shards())
        summary = (f"streaming {cfg.source} [{cfg.split}]: {len(heldout.pairs)} held out ({heldout.describe()}; "
                   f"{stats.summary()})")
        held = heldout.pairs
        val = PreferenceDataset(held, cfg, seed, train=False) if held else None
        return Datasets(train, val, None, collate, stats, summary, workers, tuple(p.prompt for p in held),
                        heldout.describe(), heldout.rows())
    train_pairs, heldout, stats = split_live(cfg, seed)
    val_pairs = heldout.pairs
    if len(train_pairs) < batch_size:  # a batch larger than the data would only repeat pairs (and fill memory)
        raise DataError(f"[train].batch_size = {batch_size} is larger than the {len(train_pairs)} training pairs of "
                        f"[data].source = {cfg.source!r} ({len(val_pairs)} held out); lower it, or hold out fewer")
    blocks = locality_blocks(train_pairs)
    reader = ImageReader()
    if blocks:  # hold the row groups of a shuffle window (both image columns); sized by the median group, so
        # one short last group does not let the cache grow to thousands of groups
        sizes = sorted(b - a for a, b in zip(blocks, [*blocks[1:], len(train_pairs)], strict=True))
        reader = ImageReader(capacity=2 * (math.ceil(cfg.shuffle_buffer / sizes[len(sizes) // 2]) + 2))
    train = PreferenceDataset(train_pairs, cfg, seed, reader=reader)
    sampler = StreamSampler(len(train_pairs), draws, seed, blocks, cfg.shuffle_buffer, start)
    val = PreferenceDataset(val_pairs, cfg, seed, train=False) if val_pairs else None
    summary = f"{stats.summary()}; {len(train_pairs)} train / {len(val_pairs)} held out ({heldout.describe()})"
    prompts = tuple(p.prompt for p in (val_pairs or train_pairs[:256]))
    return Datasets(train, val, sampler, collate, stats, summary, cfg.num_workers, prompts, heldout.describe(),
                    heldout.rows())
