"""Pairs -> training items and batches. `transform_pair` resizes, crops and flips both images of a pair alike and
computes SDXL's micro-conditioning from what it really did; `PreferenceDataset` decodes pairs keyed by draw number
(every random choice seeded by (seed, key), so a resumed run sees the same data) and falls back to another pair
when one proves unusable only on decoding; `collate` makes a `PreferenceBatch`; `StreamSampler` orders the whole
run's draws as one stream.

An item carries the rows it skipped (`PairStats`) to the main process inside the batch, perhaps from a loader
worker, where the trainer adds them up for the end-of-run summary.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lora_dpo.data.images import ImageReader, decode_pair
from lora_dpo.data.records import POLICY_DROPS, DataError, Pair, PairStats
from lora_dpo.recipe import DataRecipe

MAX_FALLBACKS = 64  # unusable pairs in a row before giving up: then the data, not a row, is broken


def transform_pair(images: tuple[Image.Image, Image.Image], resolution: int, crop: str, flip: bool,
                   rng: random.Random) -> tuple[Tensor, Tensor]:
    """Resize each image's shorter side to `resolution`, crop a square at the same relative position and flip
    both or neither. Returns pixels (2, 3, R, R) in [-1, 1] and SDXL time ids (2, 6): original (h, w), crop
    top-left (y, x) and target (h, w), per image, from what was really done to it."""
    u, v, mirror = rng.random(), rng.random(), flip and rng.random() < 0.5
    pixels, time_ids = [], []
    for image in images:
        width, height = image.size
        scale = resolution / min(width, height)
        new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        if crop == "center":
            top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
        else:
            top, left = round(u * (new_h - resolution)), round(v * (new_w - resolution))
        image = image.crop((left, top, left + resolution, top + resolution))
        if mirror:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = new_w - resolution - left  # the crop's position in the mirrored image
        pixels.append(torch.from_numpy(np.array(image)).permute(2, 0, 1))
        time_ids.append(torch.tensor([height, width, top, left, resolution, resolution], dtype=torch.float32))
    return torch.stack(pixels).float() / 127.5 - 1.0, torch.stack(time_ids)


def caption_dropped(seed: int, key: int, probability: float) -> bool:
    """Whether draw `key` trains on the empty prompt. Its own random stream, apart from the crop's, so that the
    latent cache (which keeps every prompt's embedding and the empty one) decides exactly as the live loader."""
    return probability > 0 and random.Random(f"caption:{seed}:{key}").random() < probability


def make_item(pair: Pair, reader: ImageReader, cfg: DataRecipe, seed: int, key: int, train: bool) -> dict | str:
    """Pair decoded, made RGB and transformed with draw `key`'s crop and flip (full prompt), or why it is
    unusable. `converted` names the images that were in another mode ("where (w|l)" -> mode)."""
    decoded = decode_pair(pair.image_w, pair.image_l, reader, pair.where)
    if isinstance(decoded, str):
        return decoded
    images, converted = decoded[:2], decoded[2]
    rng = random.Random(seed * 1_000_003 + key)
    crop = cfg.crop if train else "center"
    pixels, time_ids = transform_pair((images[0], images[1]), cfg.resolution, crop, train and cfg.random_flip, rng)
    return {"prompt": pair.prompt, "pixels": pixels, "time_ids": time_ids, "label": pair.label,
            "converted": converted}


@dataclass
class PreferenceBatch:
    """B pairs. pixels_* (B, 3, R, R) in [-1, 1]; time_ids_* (B, 6); labels (B,) = P(w preferred); stats: the
    rows the loader read, dropped or skipped while making this batch (counted in the main process);
    stream_positions: for a stream, part -> where that part stands after this batch (JSON; a resume starts there)."""

    prompts: list[str]
    pixels_w: Tensor
    pixels_l: Tensor
    time_ids_w: Tensor
    time_ids_l: Tensor
    labels: Tensor
    stats: PairStats = field(default_factory=PairStats)
    stream_positions: dict[int, Any] = field(default_factory=dict)

    def pin_memory(self) -> PreferenceBatch:
        """Called by DataLoader(pin_memory=True): page-locked pixels copy to the GPU asynchronously."""
        self.pixels_w, self.pixels_l = self.pixels_w.pin_memory(), self.pixels_l.pin_memory()
        return self


class PreferenceDataset(torch.utils.data.Dataset):
    """Items are keyed by a draw number from `StreamSampler`: the pair is `key % len`, and every random choice
    (crop, flip, caption dropout, the fallback for an unusable pair) is seeded by (seed, key), so a resumed run
    sees the same data."""

    def __init__(self, pairs: list[Pair], cfg: DataRecipe, seed: int, train: bool = True,
                 reader: ImageReader | None = None) -> None:
        self.pairs, self.cfg, self.seed, self.train = pairs, cfg, seed, train
        self.reader = reader or ImageReader()
        self._unusable: dict[int, str] = {}  # per process: pairs found unusable, not decoded again

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int, key: int) -> dict | str:
        """Pair `index` with draw `key`'s crop and flip and its full prompt, or why it is unusable."""
        if index in self._unusable:
            return self._unusable[index]
        item = make_item(self.pairs[index], self.reader, self.cfg, self.seed, key, self.train)
        if isinstance(item, str):
            self._unusable[index] = item
        return item

    def __getitem__(self, key: int) -> dict[str, Any]:
        index, stats = key % len(self.pairs), PairStats()
        fallback = random.Random(f"fallback:{self.seed}:{key}")
        for _ in range(MAX_FALLBACKS):
            item = self.load(index, key)
            if not isinstance(item, str):
                break
            # identical images show only here in parquet without an are_different column: a drop, never an error
            stats.skip(self.pairs[index].where, item, self.cfg.strict and item not in POLICY_DROPS)
            index = fallback.randrange(len(self.pairs))
        else:
            raise DataError(f"{MAX_FALLBACKS} pairs in a row were unusable ({stats.skipped_summary()}): the data "
                            "looks broken; check [data].source and [data].columns")
        if self.train and caption_dropped(self.seed, key, self.cfg.caption_dropout):
            item["prompt"] = ""
        stats.converted.update(item["converted"])
        return {**item, "stats": stats}


def collate(items: list[dict[str, Any]]) -> PreferenceBatch:
    pixels = torch.stack([item["pixels"] for item in items])  # (B, 2, 3, R, R)
    time_ids = torch.stack([item["time_ids"] for item in items])  # (B, 2, 6)
    stats = PairStats()
    for item in items:
        stats.merge(item["stats"])
    return PreferenceBatch(
        prompts=[item["prompt"] for item in items], pixels_w=pixels[:, 0], pixels_l=pixels[:, 1],
        time_ids_w=time_ids[:, 0], time_ids_l=time_ids[:, 1],
        labels=torch.tensor([item["label"] for item in items], dtype=torch.float32), stats=stats,
        stream_positions=dict(item["position"] for item in items if "position" in item))  # the last item's wins


class StreamSampler(torch.utils.data.Sampler[int]):
    """The whole run's draws as one stream: epoch e yields e * n + (an order of range(n) seeded by (seed, e)).
    One pass over the loader is the whole run, so the loop has no epochs; a resume starts the stream at `start`
    draws, whatever the launch layout it continues on.

    With `blocks` (start offsets of pairs stored together, e.g. parquet row groups) the order shuffles whole
    blocks, then the pairs within each window of at least `window` pairs: a pass reads each block about once."""

    def __init__(self, n: int, draws: int, seed: int, blocks: list[int] | None = None, window: int = 1,
                 start: int = 0) -> None:
        self.n, self.draws, self.seed, self.blocks, self.window = n, draws, seed, blocks, window
        self.start = start  # draws already consumed (a resume): the stream goes on from there

    def __len__(self) -> int:
        return self.draws - self.start

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        if not self.blocks:
            return torch.randperm(self.n, generator=generator).tolist()
        bounds = [*self.blocks, self.n]
        order: list[int] = []
        window: list[int] = []
        for block in torch.randperm(len(self.blocks), generator=generator).tolist():
            window.extend(range(bounds[block], bounds[block + 1]))
            if len(window) >= self.window:
                order.extend(window[i] for i in torch.randperm(len(window), generator=generator).tolist())
                window = []
        order.extend(window[i] for i in torch.randperm(len(window), generator=generator).tolist())
        return order

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.n)  # a resume orders only the epochs it still needs
        emitted = self.start
        while emitted < self.draws:
            for index in self._order(epoch)[offset: offset + self.draws - emitted]:
                yield epoch * self.n + index
            emitted += min(self.n - offset, self.draws - emitted)
            epoch, offset = epoch + 1, 0
