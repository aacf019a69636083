"""What the trainer builds its loaders from: `build_datasets` reads and filters a live source (or, for a stream,
its held-out head), splits it and wraps it as `Datasets` (train and held-out sets, sampler, collate, counts).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lora_dpo.data.dataset import PreferenceDataset, StreamSampler, collate
from lora_dpo.data.hub import is_hub
from lora_dpo.data.images import ImageReader
from lora_dpo.data.pairs import locality_blocks, prepare_pairs, split_pairs
from lora_dpo.data.readers import read_records
from lora_dpo.data.records import DataError, PairStats
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
    sampler = StreamSampler(len(train_pairs), draws, seed, blocks, cfg.shuffle_buffer)
    val = PreferenceDataset(val_pairs, cfg, seed, train=False) if val_pairs else None
    summary = f"{stats.summary()}; {len(train_pairs)} train / {len(val_pairs)} held out"
    prompts = tuple(p.prompt for p in (val_pairs or train_pairs[:256]))
    return Datasets(train, val, sampler, collate, stats, summary, cfg.num_workers, prompts)
