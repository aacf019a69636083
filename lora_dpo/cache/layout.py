"""What a cache folder holds and how it is named: the format number, the manifest's name, the kinds of shard,
`identity` (the recipe keys a cache's contents depend on), the shard plan and `save_shard`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from lora_dpo import files
from lora_dpo.recipe import Recipe

FORMAT = 1
MANIFEST = "manifest.json"
KINDS = ("train", "val", "prompts")


def identity(recipe: Recipe) -> dict[str, Any]:
    """The settings a cache's contents depend on, named as recipe keys: a cache is refused if any differs. The
    encoders and their weights (base, revision, variant, replacement VAE, the VAE's precision), which pairs are
    read and how they are split (source, split, val_split, columns, ties, max_pairs, val_pairs), and the pixels
    encoded (resolution, crop, flip). Not here: what is decided when the cache is read (caption dropout, the
    order), or what only stops a run (strict); the seed is in the cache's fingerprint."""
    m, d = recipe.model, recipe.data
    return {"model.base": m.base, "model.revision": m.revision, "model.variant": m.variant, "model.vae": m.vae,
            "model.vae_dtype": m.vae_dtype, "data.source": d.source, "data.split": d.split,
            "data.val_split": d.val_split, "data.columns": dict(d.columns), "data.ties": d.ties,
            "data.max_pairs": d.max_pairs, "data.val_pairs": d.val_pairs, "data.resolution": d.resolution,
            "data.crop": d.crop, "data.random_flip": d.random_flip}


@dataclass(frozen=True)
class Shard:
    """Pairs (or prompts) `start:stop` of one kind, stored as the files `<kind>-<number>`."""

    kind: str  # train, val or prompts
    number: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.number:05d}"


def plan_shards(counts: dict[str, int], shard_size: int) -> list[Shard]:
    """Every shard of the cache, numbered within its kind; the last of a kind may be short."""
    return [Shard(kind, i // shard_size, i, min(i + shard_size, counts[kind]))
            for kind in KINDS for i in range(0, counts[kind], shard_size)]


def save_shard(folder: Path, name: str, tensors: dict[str, Tensor], note: dict[str, Any]) -> None:
    """Tensors, then the note that marks the shard complete; each under a temporary name, then renamed."""
    from safetensors.torch import save_file

    with files.atomic_file(folder / f"{name}.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"fingerprint": note["fingerprint"]})
    files.write_text(folder / f"{name}.json", json.dumps(note))
