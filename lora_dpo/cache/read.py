"""Reading a finished cache for training: `LatentCache` (the manifest, shards memory-mapped lazily per process),
`CachedPairs` (encoded pairs keyed by draw number, like `data.PreferenceDataset`), `collate_encoded` (an
`EncodedBatch`) and `cached_datasets` (the trainer's `data.Datasets` from `[data].cache`, after checking the cache
fits the recipe).
"""

from __future__ import annotations

import bisect
import json
import logging
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lora_dpo import data
from lora_dpo.cache.layout import FORMAT, MANIFEST, identity
from lora_dpo.recipe import Recipe
from lora_dpo.step import EncodedBatch

log = logging.getLogger(__name__)


class LatentCache:
    """A finished cache folder: its manifest, and its shards opened lazily (memory-mapped) in each process."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise data.DataError(f"[data].cache = {str(folder)!r}: no {MANIFEST}, so not a finished cache; write it "
                                 "with `lora-dpo cache RECIPE --out FOLDER` (a rerun finishes an interrupted one)")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise data.DataError(f"{path}: cache format {self.manifest.get('format')}, this lora-dpo reads {FORMAT}; "
                                 "rebuild the cache")
        self._handles: OrderedDict[str, Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "manifest": self.manifest}  # file handles stay in their process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.folder, self.manifest, self._handles = state["folder"], state["manifest"], OrderedDict()

    def problems(self, recipe: Recipe) -> list[str]:
        made, wanted = self.manifest["identity"], identity(recipe)
        return [f"{key} = {made.get(key)!r} in the cache, {value!r} in the recipe"
                for key, value in wanted.items() if made.get(key) != value]

    def check(self, recipe: Recipe) -> None:
        """Refuse a cache made for another model, resolution or data, saying which keys differ."""
        problems = self.problems(recipe)
        if problems:
            raise data.DataError(f"[data].cache = {str(self.folder)!r} was made for another setup: "
                                 + "; ".join(problems) + ". Rebuild it with `lora-dpo cache RECIPE --out FOLDER`, or "
                                 "point [data].cache at a matching one")
        if self.manifest["seed"] != recipe.train.seed:
            log.warning("the cache's crops, flips and held-out split were drawn with train.seed = %d; this run's "
                        "seed %d changes only the order, noise and timesteps", self.manifest["seed"], recipe.train.seed)

    def open(self, name: str) -> Any:
        from safetensors import safe_open

        if name not in self._handles:
            self._handles[name] = safe_open(self.folder / f"{name}.safetensors", framework="pt")
            while len(self._handles) > 64:  # bounded: a cache of 850K pairs has thousands of shards
                self._handles.popitem(last=False)
        self._handles.move_to_end(name)
        return self._handles[name]

    def row(self, name: str, row: int) -> dict[str, Tensor]:
        handle = self.open(name)
        names = handle.keys()  # a safetensors handle is not iterable
        return {key: handle.get_slice(key)[row:row + 1][0] for key in names}

    def prompt(self, prompt_id: int) -> dict[str, Tensor]:
        size = self.manifest["shard_size"]
        return self.row(f"prompts-{prompt_id // size:05d}", prompt_id % size)


class CachedPairs(torch.utils.data.Dataset):
    """Encoded pairs keyed by draw number, like `data.PreferenceDataset`: pair `key % len`, caption dropout drawn
    per key. Latents and time ids come back as float32 (as the live encoder returns them), embeddings in
    `embed_dtype` (the text encoders' dtype in a live run)."""

    def __init__(self, cache: LatentCache, kind: str, seed: int, caption_dropout: float = 0.0,
                 embed_dtype: torch.dtype = torch.float32) -> None:
        self.cache, self.kind, self.seed, self.embed_dtype = cache, kind, seed, embed_dtype
        self.caption_dropout = caption_dropout if kind == "train" else 0.0
        shards = [s for s in cache.manifest["shards"][kind] if s["count"]]
        self.names = [s["name"] for s in shards]
        self.offsets = [0]
        for shard in shards:
            self.offsets.append(self.offsets[-1] + shard["count"])

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, key: int) -> dict[str, Tensor]:
        index = key % len(self)
        shard = bisect.bisect_right(self.offsets, index) - 1
        item = self.cache.row(self.names[shard], index - self.offsets[shard])
        prompt_id = int(item.pop("prompt_ids"))
        if data.caption_dropped(self.seed, key, self.caption_dropout):
            prompt_id = 0  # the empty prompt
        item = {k: v.float() for k, v in item.items()}
        return item | {k: v.to(self.embed_dtype) for k, v in self.cache.prompt(prompt_id).items()}


def collate_encoded(items: list[dict[str, Tensor]]) -> EncodedBatch:
    """Cached items -> an `EncodedBatch`; what the cache does not hold (SD 1.5 has
    no pooled embeddings or time ids) is None."""

    def stack(name: str) -> Tensor | None:
        return torch.stack([item[name] for item in items]) if name in items[0] else None

    return EncodedBatch(stack("latents_w"), stack("latents_l"), stack("prompt_embeds"), stack("pooled"),
                        stack("time_ids_w"), stack("time_ids_l"), stack("labels"))


def cached_datasets(recipe: Recipe, draws: int, embed_dtype: torch.dtype, start: int = 0) -> data.Datasets:
    """The trainer's datasets from `[data].cache`, after checking the cache fits the recipe; the training stream
    of `draws` goes on from draw `start` (a resume)."""
    cache = LatentCache(recipe.data.cache)
    cache.check(recipe)
    seed = recipe.train.seed
    train = CachedPairs(cache, "train", seed, recipe.data.caption_dropout, embed_dtype)
    if not len(train):
        raise data.DataError(f"[data].cache = {recipe.data.cache!r} holds no training pairs")
    val = CachedPairs(cache, "val", seed, embed_dtype=embed_dtype)
    manifest = cache.manifest
    if recipe.data.crop == "random" or recipe.data.random_flip:
        log.info("the latent cache holds one crop and flip per pair: every pass reuses the first pass's")
    summary = (f"latent cache {recipe.data.cache}: {len(train)} train / {len(val)} held out; VAE and text encoders "
               f"not loaded ({manifest['encoder_bytes'] / 2**20:.1f} MiB as the cache writer held them)")
    stats = data.PairStats(manifest["read"], manifest["kept"], Counter(manifest["dropped"]), manifest["skipped"],
                           manifest["converted"])
    summary += f"; held out: {manifest['heldout']}"
    return data.Datasets(train, val if len(val) else None, data.StreamSampler(len(train), draws, seed, start=start),
                         collate_encoded, stats, summary, recipe.data.num_workers, heldout=manifest["heldout"],
                         heldout_rows=manifest["heldout_rows"])
