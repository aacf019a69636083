"""Building a cache: `build_cache` reads and filters the recipe's pairs as the live loader would, splits them,
encodes each pair's first-pass draw with the VAE (and every distinct prompt with the text encoders) and writes the
shards this process owns, skipping those already finished; then the manifest.

Writing is resumable and parallel: a shard is written under a temporary name and renamed, its JSON note last, so a
shard with its note is complete and a rerun skips it. Shards are numbered over the whole cache and dealt out
round-robin to the processes of `accelerate launch`, so a resume may use another number of processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lora_dpo import data, files, models
from lora_dpo.cache.layout import FORMAT, KINDS, MANIFEST, Shard, identity, plan_shards, save_shard
from lora_dpo.recipe import Recipe
from lora_dpo.step import make_accelerator

log = logging.getLogger(__name__)


def _note(folder: Path, name: str) -> dict[str, Any] | None:
    """A shard's note, or None while the shard is unfinished (no note, or no tensors)."""
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() and (folder / f"{name}.safetensors").is_file() else None


def _fingerprint(recipe: Recipe, dtype: str, shard_size: int, pairs: list[data.Pair], n_train: int) -> str:
    """A hash of everything the cache's contents depend on: the format, the recipe's `identity`, the seed, the
    storage dtype, the shard size and every pair (where it was read, its prompt and label)."""
    digest = hashlib.sha256(json.dumps([FORMAT, identity(recipe), recipe.train.seed, dtype, shard_size, n_train],
                                       sort_keys=True).encode())
    for pair in pairs:
        digest.update(f"{pair.where}\0{pair.prompt}\0{pair.label}\n".encode())
    return digest.hexdigest()[:16]


def _encode_pairs(base: models.BaseModel, dataset: data.PreferenceDataset, shard: Shard, prompt_ids: dict[str, int],
                  batch_size: int, storage: torch.dtype, device: torch.device, strict: bool) -> tuple[dict, dict]:
    """One shard of pairs -> tensors and its note (count, skipped rows). Unusable pairs are left out."""
    parts: dict[str, list[Tensor]] = {"latents_w": [], "latents_l": [], "time_ids_w": [], "time_ids_l": []}
    labels, ids, stats, items = [], [], data.PairStats(), []
    for index in range(shard.start, shard.stop):
        item = dataset.load(index, key=index)  # the first pass's draw of this pair (key = index)
        if isinstance(item, str):
            stats.skip(dataset.pairs[index].where, item, strict and item not in data.POLICY_DROPS)
        else:
            stats.converted.update(item["converted"])
            items.append(item)
            labels.append(item["label"])
            ids.append(prompt_ids[item["prompt"]])
        if items and (len(items) == batch_size or index == shard.stop - 1):
            batch = data.collate([{**it, "stats": data.PairStats()} for it in items])
            latents = models.encode_images(base.vae, torch.cat([batch.pixels_w, batch.pixels_l]).to(device),
                                             base.family)
            for name, value in zip(("latents_w", "latents_l"), latents.chunk(2), strict=True):
                parts[name].append(value.to("cpu", storage))
            parts["time_ids_w"].append(batch.time_ids_w)
            parts["time_ids_l"].append(batch.time_ids_l)
            items = []
    tensors = {name: torch.cat(values) for name, values in parts.items() if values}
    if not base.family.uses_geometry:  # the data computes it for every base; only some denoisers read it
        tensors = {k: v for k, v in tensors.items() if not k.startswith("time_ids")}
    if labels:
        tensors |= {"labels": torch.tensor(labels, dtype=torch.float32), "prompt_ids": torch.tensor(ids)}
    return tensors, {"count": len(labels), "skipped": stats.skipped, "converted": stats.converted}


def _encode_prompts(base: models.BaseModel, prompts: list[str], batch_size: int, storage: torch.dtype,
                    device: torch.device) -> tuple[dict, dict]:
    embeds, pooled = [], []
    for start in range(0, len(prompts), batch_size):
        e, p = models.encode_prompts(base, prompts[start:start + batch_size], device)
        embeds.append(e.to("cpu", storage))
        if p is not None:
            pooled.append(p.to("cpu", storage))
    tensors = {"prompt_embeds": torch.cat(embeds)} | ({"pooled": torch.cat(pooled)} if pooled else {})
    return tensors, {"count": len(prompts)}


def _module_bytes(*modules: Any) -> int:
    return sum(t.numel() * t.element_size() for m in modules if m is not None
               for t in [*m.parameters(), *m.buffers()])


def build_cache(recipe: Recipe, out: Path, *, shard_size: int = 512, dtype: str = "fp16", batch_size: int = 8,
                accelerator: Any = None) -> dict[str, Any]:
    """Encode every pair of the recipe's data once into `out`; returns the manifest. Resumes a partial build of the
    same settings; refuses a folder that holds another cache."""

    models.check_recipe_keys(recipe.model)  # another family's [model] keys: refused before any pair is read
    cfg, seed = recipe.data, recipe.train.seed
    if cfg.streaming:
        raise data.DataError("[data].streaming = true: a cache encodes every pair once, so it reads the whole split "
                             "anyway; set streaming = false (the split is downloaded) or point [data].source at "
                             "local parquet files")
    if dtype not in models.STORAGE_DTYPES:
        raise data.DataError(f"cache dtype {dtype!r}: choose one of {', '.join(models.STORAGE_DTYPES)}")
    accelerator = accelerator or make_accelerator("no")  # encoding runs in the VAE's and encoders' own dtypes
    train_pairs, heldout, stats = data.split_live(cfg, seed)  # exactly the live trainer's split
    val_pairs = heldout.pairs
    prompts = ["", *sorted({p.prompt for p in [*train_pairs, *val_pairs]} - {""})]
    prompt_ids = {prompt: i for i, prompt in enumerate(prompts)}
    fingerprint = _fingerprint(recipe, dtype, shard_size, [*train_pairs, *val_pairs], len(train_pairs))
    out.mkdir(parents=True, exist_ok=True)
    shards = plan_shards({"train": len(train_pairs), "val": len(val_pairs), "prompts": len(prompts)}, shard_size)
    for path in [out / MANIFEST, *(out / f"{s.name}.json" for s in shards)]:
        if path.is_file() and json.loads(path.read_text()).get("fingerprint") != fingerprint:
            raise data.DataError(f"{out} holds a cache made from other data or settings ({path.name}); choose another "
                                 "--out, or delete that folder to rebuild it")

    todo = [s for i, s in enumerate(shards) if i % accelerator.num_processes == accelerator.process_index
            and _note(out, s.name) is None]
    device, storage = accelerator.device, models.STORAGE_DTYPES[dtype]
    encoder_bytes = None
    if todo:
        compute = torch.float32 if device.type == "cpu" else storage  # CPUs run half precision slowly, if at all
        base = models.load_base(recipe.model, with_unet=False, weight_dtype=compute,
                                vae_dtype=models.DTYPES[recipe.model.vae_dtype])
        for module in (base.vae, *base.text_encoders):
            module.to(device)
        encoder_bytes = _module_bytes(base.vae, *base.text_encoders)
        datasets = {"train": data.PreferenceDataset(train_pairs, cfg, seed),
                    "val": data.PreferenceDataset(val_pairs, cfg, seed, train=False)}
        started = time.perf_counter()
        for number, shard in enumerate(todo, start=1):
            if shard.kind == "prompts":
                tensors, note = _encode_prompts(base, prompts[shard.start:shard.stop], batch_size, storage, device)
            else:
                tensors, note = _encode_pairs(base, datasets[shard.kind], shard, prompt_ids, batch_size, storage,
                                              device, cfg.strict)
            save_shard(out, shard.name, tensors, {"fingerprint": fingerprint, "family": base.family.name,
                                                  "encoder_bytes": encoder_bytes, **note})
            log.info("cache: %s done (%d/%d of this process, %.0f s)", shard.name, number, len(todo),
                     time.perf_counter() - started)
    accelerator.wait_for_everyone()
    notes = {s.name: _note(out, s.name) for s in shards}
    missing = [name for name, note in notes.items() if note is None]
    if missing:
        raise data.DataError(f"{out}: shards {', '.join(missing[:5])} were not written (did a process fail?); "
                             "run the same command again to finish the cache")
    manifest = {
        "format": FORMAT, "fingerprint": fingerprint, "identity": identity(recipe), "seed": seed, "dtype": dtype,
        # the base's family (`Family.name`); a shard written before it was recorded has `is_sdxl` instead (nothing
        # reads either: the reader checks the format and the identity)
        "shard_size": shard_size, "family": next((n["family"] for n in notes.values() if "family" in n), None),
        "encoder_bytes": next(n["encoder_bytes"] for n in notes.values() if n["encoder_bytes"] is not None),
        "shards": {kind: [{"name": s.name, "count": notes[s.name]["count"]} for s in shards if s.kind == kind]
                   for kind in KINDS},
        "counts": {kind: sum(notes[s.name]["count"] for s in shards if s.kind == kind) for kind in KINDS},
        "skipped": {where: why for n in notes.values() for where, why in n.get("skipped", {}).items()},
        "read": stats.read, "kept": stats.kept, "dropped": dict(stats.dropped),
        "converted": {where: mode for n in notes.values() for where, mode in n.get("converted", {}).items()},
        "heldout": heldout.describe(), "heldout_rows": heldout.rows(),
    }
    manifest["skipped"] |= stats.skipped  # rows dropped while reading the source, and while encoding it
    stats.skipped, stats.converted = manifest["skipped"], manifest["converted"]
    manifest["data"] = stats.summary()
    if accelerator.is_main_process:
        files.write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    accelerator.wait_for_everyone()
    return manifest
