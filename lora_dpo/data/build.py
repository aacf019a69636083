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
                   num_processes: int = 1, start: int = 0, stream: dict[str, Any] | None = None) -> Datasets:
    """Live sources: read and filter the records (or, for a stream, the held-out head), split, and wrap them.
    `draws` counts the whole run's pairs over all processes; the training stream goes on from draw `start` (a
    resume). `stream`: where a streamed run stood (a checkpoint's "stream": each part's position, the layout, the
    batches consumed), so each part reads on from its own position."""
    if cfg.streaming:
        return _stream_datasets(cfg, seed, draws, batch_size, process_index, num_processes, stream)
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


def _stream_datasets(cfg: DataRecipe, seed: int, draws: int, batch_size: int, process_index: int,
                     num_processes: int, resume: dict[str, Any] | None) -> Datasets:
    if not is_hub(cfg.source):
        raise DataError(f"[data].streaming = true needs a hub dataset; {cfg.source!r} is read lazily anyway")
    head = stream_holdout(cfg, seed)
    train = StreamingPreferenceDataset(cfg, seed, draws // num_processes, batch_size, head.leave_out, process_index,
                                       num_processes)
    files = train.num_files()
    if files < num_processes:
        raise DataError(f"[data].source = {cfg.source!r} [{cfg.split}] has {files} files, fewer than the "
                        f"{num_processes} processes, each of which streams its own: launch at most {files}")
    workers = min(cfg.num_workers, files // num_processes)
    if resume is not None:
        check_stream_layout(resume, num_processes, workers)
        train.positions = {int(part): at for part, at in resume["parts"].items()}
        train.consumed = int(resume["batches"])
    held = head.heldout.pairs
    where = f"streaming {cfg.source} [{cfg.split}]"
    rest = "counts the rest as it reads them (the closing data line)"
    if cfg.val_split:
        summary = (f"{where}: {len(held)} pairs held out and measured ({head.heldout.describe()}; the first "
                   f"{head.rows} rows of {cfg.val_split!r}: {head.head.summary()}); training leaves out every pair of "
                   f"their {head.heldout.prompts()} prompts (held out, not measured) and {rest}")
    elif held:
        summary = (f"{where}: {len(held)} pairs held out and measured ({head.heldout.describe()}); {head.how}; the "
                   f"stream's first {head.rows} rows, read to find them: {head.head.summary()}; training leaves out "
                   f"every other pair of a held-out prompt (held out, not measured) and {rest}")
    else:
        summary = f"{where}: nothing held out ([data].val_pairs = 0); training counts pairs as it reads them"
    val = PreferenceDataset(held, cfg, seed, train=False) if held else None
    return Datasets(train, val, None, collate, head.stats, summary, workers, tuple(p.prompt for p in held),
                    head.heldout.describe(), head.heldout.rows())


def check_stream_layout(saved: dict[str, Any], num_processes: int, workers: int) -> None:
    """A stream's positions are per part (process x loader worker, each reading its own files): refuse a resume
    with other parts, naming what changed. 0 and 1 workers are the same single part per process."""
    if int(saved["processes"]) != num_processes:
        raise DataError(f"--resume: the checkpoint streamed its data in {saved['processes']} processes and this "
                        f"launch has {num_processes}; each process streams its own files, so resume it with "
                        f"{saved['processes']} processes (accelerate launch --num_processes {saved['processes']})")
    if max(1, int(saved["workers"])) != max(1, workers):
        raise DataError(f"--resume: the checkpoint streamed its data with {saved['workers']} loader workers per "
                        f"process and this run has {workers} ([data].num_workers); each worker streams its own files, "
                        f"so resume it with [data].num_workers = {saved['workers']}")
