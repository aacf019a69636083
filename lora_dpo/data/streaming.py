"""A hub split streamed, never downloaded whole: `StreamingPreferenceDataset` (an IterableDataset: each process
and loader worker reads its own shards, applies the ties policy, and draws pairs from a shuffle buffer) and
`stream_holdout` (the held-out head of the stream, or of another split, kept in memory, by prompt).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lora_dpo.data.dataset import caption_dropped, make_item
from lora_dpo.data.hub import hub_dataset
from lora_dpo.data.images import ImageReader
from lora_dpo.data.pairs import orient
from lora_dpo.data.records import HELD_OUT_PROMPT, POLICY_DROPS, DataError, HeldOut, Pair, PairRecord, PairStats
from lora_dpo.data.rows import column_names, pickapic_record
from lora_dpo.recipe import DataRecipe


def _stream_records(dataset: Any, cfg: DataRecipe, meta: list[str], split: str,
                    numbered: bool = False) -> Iterator[tuple[str, PairRecord]]:
    """(identity, record) of each streamed row. Streams have no stable row numbers (the shard order changes every
    pass), so a row is known by a hash of its caption and first image: held-out rows are left out by it, and a bad
    row met in several passes is reported once. A stream read once in source order (the held-out head) is
    `numbered`: its rows' `where` also gives their position, for heldout.jsonl."""
    cols, reader = column_names(cfg), ImageReader()
    for number, row in enumerate(dataset):
        images = (reader.read(row[cols["jpg_0"]]), reader.read(row[cols["jpg_1"]]))
        caption = str(row[cols["caption"]] or "")
        first = images[0] if isinstance(images[0], bytes) else str(images[0]).encode()
        key = hashlib.blake2b(caption.encode() + b"\0" + first, digest_size=12).hexdigest()
        at = f" {number}" if numbered else ""
        where = f"{cfg.source}[{split}] row{at} {caption[:40]!r} #{key[:8]}"
        yield key, pickapic_record({c: row[cols[c]] for c in meta}, where, *images)


@dataclass(frozen=True)
class StreamHoldout:
    """What the training stream leaves out: the held-out rows' keys (silently: the holdout counted them) and their
    prompts (every other pair with one is left out, and counted). Pickled to every loader worker, so it holds no
    image bytes."""

    keys: frozenset[str]
    prompts: frozenset[str]


def stream_holdout(cfg: DataRecipe) -> tuple[HeldOut, StreamHoldout, PairStats]:
    """The held-out pairs of a stream, read in the source's order: those of the first usable prompts until there
    are `val_pairs` (a later pair of an earlier prompt joins them while there is room), from the training split
    or, with `[data].val_split`, from that split (then `val_pairs` = 0 reads all of it)."""
    held: list[Pair] = []
    keys: set[str] = set()
    stats = PairStats()
    split = cfg.val_split or cfg.split
    if cfg.val_pairs or cfg.val_split:
        dataset, meta = hub_dataset(dataclasses.replace(cfg, split=split), streaming=True)
        for key, record in _stream_records(dataset, cfg, meta, split, numbered=True):
            pair = orient(record, cfg, stats)
            if pair is not None:
                held.append(pair)
                keys.add(key)
                if len(held) == cfg.val_pairs:
                    break
    if cfg.val_split and not held:
        raise DataError(f"[data].val_split = {cfg.val_split!r}: no usable pairs in it ({stats.summary()})")
    return HeldOut(held, cfg.val_split), StreamHoldout(frozenset(keys), frozenset(p.prompt for p in held)), stats


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

    def __init__(self, cfg: DataRecipe, seed: int, draws: int, batch_size: int, holdout: StreamHoldout | None = None,
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
        keys, prompts = (self.holdout.keys, self.holdout.prompts) if self.holdout else (frozenset(), frozenset())
        for key, record in _stream_records(dataset, cfg, meta, cfg.split):
            if key in keys:  # a held-out row itself: the holdout counted it
                continue
            pair = orient(record, cfg, stats)
            if pair is None:
                continue
            if pair.prompt in prompts:  # a later pair of a held-out prompt: neither trained on nor measured
                stats.kept -= 1
                stats.dropped[HELD_OUT_PROMPT] += 1
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
                stats.converted.update(item["converted"])
                item["stats"] = stats.drain()
                yield item
                count, produced = count + 1, produced + 1
            if not produced:
                raise DataError(f"[data].source = {self.cfg.source!r}: no usable pairs in this part of the stream "
                                f"(process {self.process_index}, worker {worker}; {stats.summary()})")
            epoch += 1
