"""A hub split streamed, never downloaded whole.

`StreamingPreferenceDataset` (an IterableDataset): each process, and each loader worker in it, is a *part* that
reads its own files of the split, in a seeded order each pass, row group by row group; applies the ties policy and
leaves out held-out prompts as rows arrive; and shuffles the usable pairs within windows of `shuffle_buffer`
(each window permuted by an RNG seeded by (seed, part, pass, window)). So where a part stands is a small JSON
position (pass, file, row group and row where its current window starts, window number, entries of the window
already passed, items yielded): every item carries its part's position after it, and a resume starts each part
there, reading again at most the row group and the window it stopped in, instead of replaying the stream.

`stream_holdout`: the held-out set, by prompt. A stable hash of (seed, prompt) decides whether a prompt is held
out, so all its pairs are, whatever the prompt's frequency; the measured pairs are the first `val_pairs` of them in
the stream's head (or the first pairs of `[data].val_split`), and the training stream leaves out the others by the
same hash, counted as held out, not measured.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lora_dpo.data.dataset import caption_dropped, make_item
from lora_dpo.data.hub import hub_dataset
from lora_dpo.data.images import ImageReader
from lora_dpo.data.pairs import orient
from lora_dpo.data.records import POLICY_DROPS, DataError, HeldOut, Pair, PairRecord, PairStats
from lora_dpo.data.rows import column_names, pickapic_record
from lora_dpo.recipe import DataRecipe

HELD_OUT_SHARE = 0.01  # prompts a stream holds out where the split's size is unknown (or large): see stream_holdout
ROWS_PER_READ = 64  # rows `datasets` formats at a time
FULL = 1 << 64  # prompt codes are 64-bit
START: dict[str, int] = {"epoch": 0, "file": 0, "group": 0, "row": 0, "window": 0, "kept": 0, "offset": 0,
                         "count": 0}  # a part's position before its first item


def prompt_code(prompt: str, seed: int) -> int:
    """A stable 64-bit hash of (seed, prompt): the same on every process, worker and run; another seed, others."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{prompt}".encode(), digest_size=8).digest(), "big")


def _records(batches: Iterator[dict[str, list]], cfg: DataRecipe, meta: list[str], label: str, skip: int = 0,
             numbered: bool = False) -> Iterator[tuple[str, PairRecord]]:
    """(identity, record) of each row of `datasets` column batches, the first `skip` rows passed over without a
    record. A row is known by a hash of its caption and first image (stream rows have no stable number across
    passes): the measured held-out rows are left out of training by it, and a bad row met again is reported
    once. Rows of a stream read once in source order (the held-out head) are `numbered` in `where` too."""
    cols, reader, number = column_names(cfg), ImageReader(), 0
    for batch in batches:
        size = len(batch[cols["caption"]])
        for i in range(max(0, skip - number), size):
            images = (reader.read(batch[cols["jpg_0"]][i]), reader.read(batch[cols["jpg_1"]][i]))
            caption = str(batch[cols["caption"]][i] or "")
            first = images[0] if isinstance(images[0], bytes) else str(images[0]).encode()
            key = hashlib.blake2b(caption.encode() + b"\0" + first, digest_size=12).hexdigest()
            at = f" {number + i}" if numbered else ""
            where = f"{label} row{at} {caption[:40]!r} #{key[:8]}"
            yield key, pickapic_record({c: batch[cols[c]][i] for c in meta}, where, *images)
        number += size


@dataclass(frozen=True)
class StreamHoldout:
    """What the training stream leaves out: pairs whose prompt's code (`prompt_code`) is below `limit` (held out
    of the training split by hash) or in `codes` (the prompts of `[data].val_split`'s held-out pairs), counted as
    held out, not measured; and silently the measured rows themselves (`keys`: the head counted them). Pickled to
    every loader worker: no prompt, no image."""

    seed: int
    limit: int = 0
    codes: frozenset[int] = frozenset()
    keys: frozenset[str] = frozenset()

    def holds(self, prompt: str) -> bool:
        if not self.limit and not self.codes:
            return False
        code = prompt_code(prompt, self.seed)
        return code < self.limit or code in self.codes


@dataclass
class StreamHead:
    """What reading a stream's held-out set found: the set, what training leaves out, the measured pairs' counts
    (the trainer's data stats: the training stream counts every other row), the rows read and their counts, and
    how the held-out prompts were chosen (for the data summary)."""

    heldout: HeldOut
    leave_out: StreamHoldout
    stats: PairStats
    rows: int = 0
    head: PairStats = dataclasses.field(default_factory=PairStats)
    how: str = ""


def _split_size(dataset: Any, split: str) -> int | None:
    """Rows in the split where `datasets` knows it (a hub dataset's card, `info.splits`), else None."""
    info = getattr(dataset.info, "splits", None) or {}
    rows = info[split].num_examples if split in info else 0
    return rows or None


def _read_head(cfg: DataRecipe, seed: int, limit: int, stop: bool) -> tuple[list[Pair], set[str], PairStats, int,
                                                                          Counter]:
    """The split in source order: the first `val_pairs` usable pairs whose prompt's code is below `limit` (with
    `stop`, reading ends there), their rows' keys, the counts of the rows read, how many, and usable pairs per
    prompt code (to raise the limit if the split ends first)."""
    dataset, meta = hub_dataset(cfg, streaming=True)
    held: list[Pair] = []
    keys: set[str] = set()
    stats, seen, rows = PairStats(), Counter(), 0
    label = f"{cfg.source}[{cfg.split}]"
    for key, record in _records(dataset.iter(batch_size=ROWS_PER_READ), cfg, meta, label, numbered=True):
        rows += 1
        pair = orient(record, cfg, stats)
        if pair is None:
            continue
        code = prompt_code(pair.prompt, seed)
        seen[code] += 1
        if code >= limit:
            continue
        stats.held += 1
        if len(held) < cfg.val_pairs:
            held.append(pair)
            keys.add(key)
            stats.measured += 1
            if stop and len(held) == cfg.val_pairs:
                break
    return held, keys, stats, rows, seen


def stream_holdout(cfg: DataRecipe, seed: int) -> StreamHead:
    """The held-out set of a stream, by prompt, read without buffering the stream: from `[data].val_split`, or
    from the training split's head. There a prompt is held out when its code falls in the lowest share s of codes,
    s = val_pairs / min(N, val_pairs / HELD_OUT_SHARE) for a split of N rows (where `datasets` knows N; else s =
    HELD_OUT_SHARE): about val_pairs held-out pairs lie in the first min(N, 100 x val_pairs) rows, the head read
    here, and the measured set is the first val_pairs of them. Should the split end first, the share is raised to
    the prompts read, in code order, until their pairs number val_pairs, and the split is read once more."""
    if cfg.val_split:
        return _other_split(cfg, seed)
    if not cfg.val_pairs:
        return StreamHead(HeldOut([]), StreamHoldout(seed), PairStats(), how="nothing held out ([data].val_pairs = 0)")
    size = _split_size(hub_dataset(cfg, streaming=True)[0], cfg.split)
    head = min(size, math.ceil(cfg.val_pairs / HELD_OUT_SHARE)) if size else None
    limit = min(FULL, math.ceil(FULL * cfg.val_pairs / head)) if head else round(FULL * HELD_OUT_SHARE)
    why = (f"the split's {size} rows, as `datasets` knows them" if size else "the split's size is unknown")
    held, keys, stats, rows, seen = _read_head(cfg, seed, limit, stop=True)
    if len(held) < cfg.val_pairs:  # the split ended first: it is small, and read whole, so its prompts are known
        codes, total = sorted(seen), 0
        for code in codes:
            total += seen[code]
            if total >= cfg.val_pairs:
                break
        if not codes or code == codes[-1]:
            raise DataError(f"[data].val_pairs = {cfg.val_pairs} holds out every prompt of [data].source = "
                            f"{cfg.source!r} [{cfg.split}] ({sum(seen.values())} usable pairs, {len(seen)} prompts): "
                            "lower it, or set [data].val_split")
        limit, why = code + 1, f"raised until they hold {cfg.val_pairs} pairs: the split's {rows} rows were read"
        held, keys, stats, rows, _ = _read_head(cfg, seed, limit, stop=False)
    how = (f"prompts held out: those whose hash with seed {seed} falls in the lowest {100 * limit / FULL:.3g} % "
           f"({why})")
    measured = PairStats(read=len(held), kept=len(held), held=len(held), measured=len(held))
    return StreamHead(HeldOut(held), StreamHoldout(seed, limit=limit, keys=frozenset(keys)), measured, rows, stats,
                      how)


def _other_split(cfg: DataRecipe, seed: int) -> StreamHead:
    """`[data].val_split`'s first `val_pairs` usable pairs (0: all of it); training leaves out their prompts."""
    other = dataclasses.replace(cfg, split=cfg.val_split)
    dataset, meta = hub_dataset(other, streaming=True)
    held: list[Pair] = []
    stats, rows = PairStats(), 0
    label = f"{cfg.source}[{cfg.val_split}]"
    for _, record in _records(dataset.iter(batch_size=ROWS_PER_READ), cfg, meta, label, numbered=True):
        rows += 1
        pair = orient(record, cfg, stats)
        if pair is not None:
            held.append(pair)
            if len(held) == cfg.val_pairs:
                break
    if not held:
        raise DataError(f"[data].val_split = {cfg.val_split!r}: no usable pairs in it ({stats.summary()})")
    codes = frozenset(prompt_code(pair.prompt, seed) for pair in held)
    measured = PairStats(read=len(held), kept=len(held), held=len(held), measured=len(held))
    how = f"prompts held out: the {len(codes)} of those pairs; training leaves out every pair of them"
    return StreamHead(HeldOut(held, cfg.val_split), StreamHoldout(seed, codes=codes), measured, rows, stats, how)


class StreamingPreferenceDataset(torch.utils.data.IterableDataset):
    """Pairs streamed from a hub split, never downloaded whole (see the module's docstring). Each part yields
    exactly its share of the run's draws, passing over its files again (in a new order) as often as needed.

    Draw keys (which seed crop, flip and caption dropout): batch b of this process comes from part-worker b % W,
    as the DataLoader interleaves workers, and its i-th pair has key b * batch_size + i. Items depend on the number
    of processes and workers. `max_pairs` keeps the first pairs of each part in source order (its share of
    max_pairs; the file order is then fixed), reshuffled in new windows every pass.

    Resuming: `positions` (part -> the position its last consumed item carried) starts each part there, and
    `consumed` (batches this process consumed) makes loader worker w serve part-worker (w + consumed) % W, since a
    DataLoader always starts at its worker 0 while the next batch is due from that part. Rows are counted (for
    the closing data line) in the first pass only, and not again when a resume reads a window again."""

    def __init__(self, cfg: DataRecipe, seed: int, draws: int, batch_size: int, holdout: StreamHoldout | None = None,
                 process_index: int = 0, num_processes: int = 1, positions: dict[Any, Any] | None = None,
                 consumed: int = 0) -> None:
        self.cfg, self.seed, self.draws, self.batch_size = cfg, seed, draws, batch_size
        self.holdout = holdout or StreamHoldout(seed)
        self.process_index, self.num_processes = process_index, num_processes
        self.positions = {int(part): dict(at) for part, at in (positions or {}).items()}
        self.consumed = consumed

    def num_files(self) -> int:
        return hub_dataset(self.cfg, streaming=True)[0].num_shards

    def file_order(self, part: int, epoch: int, files: int) -> list[int]:
        """The order in which `part` reads its `files` files (its i-th is file part + i x parts of the split) in
        pass `epoch`: a new one every pass, the windows do the rest; fixed with `max_pairs` (its first pairs)."""
        order = list(range(files))
        if self.cfg.max_pairs is None:
            random.Random(f"files:{self.seed}:{part}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (loader_worker + self.consumed) % workers
        part, parts = self.process_index * workers + worker, self.num_processes * workers
        dataset, meta = hub_dataset(self.cfg, streaming=True)
        if dataset.num_shards < parts:
            raise DataError(f"[data].source = {self.cfg.source!r} has {dataset.num_shards} files and "
                            f"{self.num_processes} processes x {workers} loader workers each need their own: "
                            "launch fewer processes, or lower [data].num_workers")
        files = dataset.shard(num_shards=parts, index=part, contiguous=False)  # files part, part + parts, ...
        yield from self._items(files, meta, part, parts, worker, workers, self.positions.get(part, START))

    def _rows(self, files: Any, meta: list[str], order: list[int], at: tuple[int, int, int]
              ) -> Iterator[tuple[tuple[int, int, int], str, PairRecord]]:
        """The part's rows, its files in `order`, from `at` = (file in order, row group, row), each with the
        position after it and its identity. A file is read one row group at a time (`datasets`' reshard: a
        parquet row group per shard), so starting inside a file reads only the rows of its row group before `at`
        again, and turns none of them into records."""
        first, group, row = at
        label = f"{self.cfg.source}[{self.cfg.split}]"
        for f in range(first, len(order)):
            one = files.shard(num_shards=files.num_shards, index=order[f])
            try:
                groups = one.reshard()
            except NotImplementedError:  # a format `datasets` cannot split further: the whole file is one group
                groups = one
            for g in range(group if f == first else 0, groups.num_shards):
                skip = row if (f, g) == (first, group) else 0
                batches = groups.shard(num_shards=groups.num_shards, index=g).iter(batch_size=ROWS_PER_READ)
                for r, (key, record) in enumerate(_records(batches, self.cfg, meta, label, skip), start=skip):
                    yield (f, g, r + 1), key, record

    def _window(self, rows: Iterator[tuple[tuple[int, int, int], str, PairRecord]], want: int, stats: PairStats,
                end: tuple[int, int, int]) -> tuple[list[Pair], tuple[int, int, int]]:
        """Up to `want` usable training pairs from `rows`, and the position after the last row read."""
        window: list[Pair] = []
        if want <= 0:
            return window, end
        for at, key, record in rows:
            end = at
            if key in self.holdout.keys:  # a measured held-out row: the head counted it
                continue
            pair = orient(record, self.cfg, stats)
            if pair is None:
                continue
            if self.holdout.holds(pair.prompt):  # held out, not measured
                stats.held += 1
                continue
            window.append(pair)
            if len(window) == want:
                break
        return window, end

    def _items(self, files: Any, meta: list[str], part: int, parts: int, worker: int, workers: int,
               start: dict[str, int]) -> Iterator[dict[str, Any]]:
        """The part's items from position `start`: windows of usable pairs, each permuted by its own seeded RNG,
        each item decoded with its draw key and carrying (part, its position after it)."""
        cfg, size = self.cfg, self.batch_size
        cap = None if cfg.max_pairs is None else cfg.max_pairs // parts + (part < cfg.max_pairs % parts)
        reader, stats, at, count = ImageReader(), PairStats(), dict(start), start["count"]
        while True:  # passes over the part's files
            epoch, produced = at["epoch"], 0
            whole = all(at[k] == 0 for k in ("file", "group", "row", "window", "offset"))  # a pass from its start
            order = self.file_order(part, epoch, files.num_shards)
            rows = self._rows(files, meta, order, (at["file"], at["group"], at["row"]))
            while True:  # windows
                # rows of a later pass, or of a window read again on a resume, were counted when first read
                counted = stats if epoch == 0 and at["offset"] == 0 else PairStats()
                want = cfg.shuffle_buffer if cap is None else min(cfg.shuffle_buffer, cap - at["kept"])
                window, end = self._window(rows, want, counted, (at["file"], at["group"], at["row"]))
                if not window:
                    break
                random.Random(f"window:{self.seed}:{part}:{epoch}:{at['window']}").shuffle(window)
                after = {**at, "file": end[0], "group": end[1], "row": end[2], "window": at["window"] + 1,
                         "kept": at["kept"] + len(window), "offset": 0}
                for index in range(at["offset"], len(window)):  # a resumed window's passed entries: not decoded
                    key = ((count // size) * workers + worker) * size + count % size
                    if key >= self.draws:
                        return
                    pair = window[index]
                    item = make_item(pair, reader, cfg, self.seed, key, train=True)
                    if isinstance(item, str):
                        stats.skip(pair.where, item, cfg.strict and item not in POLICY_DROPS)
                        continue
                    if caption_dropped(self.seed, key, cfg.caption_dropout):
                        item["prompt"] = ""
                    count, produced = count + 1, produced + 1
                    stats.converted.update(item["converted"])
                    item["stats"] = stats.drain()
                    position = after if index + 1 == len(window) else {**at, "offset": index + 1}
                    item["position"] = (part, {**position, "count": count})
                    yield item
                at = after
            if whole and not produced:
                raise DataError(f"[data].source = {cfg.source!r}: no usable pairs in this part of the stream "
                                f"(process {self.process_index}, worker {worker}; {stats.summary()})")
            at = {**START, "epoch": epoch + 1, "count": count}
