"""The latent cache: every pair encoded once, so that training never loads the VAE or the text encoders.

A cache folder holds, as safetensors shards with a JSON note each and one `manifest.json`:
  train-NNNNN   latents_w, latents_l (n, C, h, w); time_ids_w, time_ids_l (n, 6) for SDXL; labels (n,);
                prompt_ids (n,): the training pairs, each as the live loader draws it in the first pass (key =
                its index: the same crop, flip and micro-conditioning)
  val-NNNNN     the held-out pairs, centre-cropped and unflipped, as validation sees them
  prompts-NNNNN prompt_embeds (m, S, D) and, for SDXL, pooled (m, P), one row per distinct prompt; row 0 is the
                empty prompt. Prompts are stored once: Pick-a-Pic v2 has ~59K prompts for ~850K pairs, and SDXL's
                embedding of one prompt (77 x 2048) is larger than the latents of both images at 1024 px.
Latents are the VAE posterior's mean, computed by the same `models.encode_images` the live path calls, so a cached
pair equals a live one to float tolerance. Later passes reuse the first pass's crop and flip where the live loader
would draw new ones (identical with `crop = "center"` and `random_flip = false`). Caption dropout is not baked in:
each draw decides it as the live loader does (`data.caption_dropped`) and then reads the empty prompt's row.

Writing is resumable and parallel: a shard is written under a temporary name and renamed, its JSON note last, so a
shard with its note is complete and a rerun skips it. Shards are numbered over the whole cache and dealt out
round-robin to the processes of `accelerate launch`, so a resume may use another number of processes.

This module sits on the trainer's floor: it uses `models` (to encode) and `step.EncodedBatch` (what it yields).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lora_dpo import data, models
from lora_dpo.recipe import DataRecipe, ModelRecipe, Recipe
from lora_dpo.step import EncodedBatch, make_accelerator

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
KINDS = ("train", "val", "prompts")


def identity(recipe: Recipe) -> dict[str, Any]:
    """The settings a cache's contents depend on, named as recipe keys: a cache is refused if any differs."""
    m, d = recipe.model, recipe.data
    return {"model.base": m.base, "model.revision": m.revision, "model.vae": m.vae, "data.source": d.source,
            "data.split": d.split, "data.columns": dict(d.columns), "data.ties": d.ties, "data.max_pairs": d.max_pairs,
            "data.val_pairs": d.val_pairs, "data.resolution": d.resolution, "data.crop": d.crop,
            "data.random_flip": d.random_flip}


# --------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class Shard:
    kind: str  # train, val or prompts
    number: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.number:05d}"


def plan_shards(counts: dict[str, int], shard_size: int) -> list[Shard]:
    return [Shard(kind, i // shard_size, i, min(i + shard_size, counts[kind]))
            for kind in KINDS for i in range(0, counts[kind], shard_size)]


def _note(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() and (folder / f"{name}.safetensors").is_file() else None


def save_shard(folder: Path, name: str, tensors: dict[str, Tensor], note: dict[str, Any]) -> None:
    """Tensors, then the note that marks the shard complete; each under a temporary name, then renamed."""
    from safetensors.torch import save_file

    tmp = folder / f".{name}.{os.getpid()}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"fingerprint": note["fingerprint"]})
    os.replace(tmp, folder / f"{name}.safetensors")
    tmp.write_text(json.dumps(note))
    os.replace(tmp, folder / f"{name}.json")


def _fingerprint(recipe: Recipe, dtype: str, shard_size: int, pairs: list[data.Pair], n_train: int) -> str:
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
            items.append(item)
            labels.append(item["label"])
            ids.append(prompt_ids[item["prompt"]])
        if items and (len(items) == batch_size or index == shard.stop - 1):
            batch = data.collate([{**it, "stats": data.PairStats()} for it in items])
            latents = models.encode_images(base.vae, torch.cat([batch.pixels_w, batch.pixels_l]).to(device))
            for name, value in zip(("latents_w", "latents_l"), latents.chunk(2), strict=True):
                parts[name].append(value.to("cpu", storage))
            parts["time_ids_w"].append(batch.time_ids_w)
            parts["time_ids_l"].append(batch.time_ids_l)
            items = []
    tensors = {name: torch.cat(values) for name, values in parts.items() if values}
    if not base.is_sdxl:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("time_ids")}
    if labels:
        tensors |= {"labels": torch.tensor(labels, dtype=torch.float32), "prompt_ids": torch.tensor(ids)}
    return tensors, {"count": len(labels), "skipped": stats.skipped}


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

    cfg, seed = recipe.data, recipe.train.seed
    if cfg.streaming:
        raise data.DataError("[data].streaming = true: a cache encodes every pair once, so it reads the whole split "
                             "anyway; set streaming = false (the split is downloaded) or point [data].source at "
                             "local parquet files")
    if dtype not in models.STORAGE_DTYPES:
        raise data.DataError(f"cache dtype {dtype!r}: choose one of {', '.join(models.STORAGE_DTYPES)}")
    accelerator = accelerator or make_accelerator("no")  # encoding runs in the VAE's and encoders' own dtypes
    pairs, stats = data.prepare_pairs(data.read_records(cfg), cfg)
    if not pairs:
        raise data.DataError(f"[data].source = {cfg.source!r}: no usable pairs ({stats.summary()})")
    train_pairs, val_pairs = data.split_pairs(pairs, cfg.val_pairs, seed)
    prompts = ["", *sorted({p.prompt for p in pairs} - {""})]
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
            save_shard(out, shard.name, tensors, {"fingerprint": fingerprint, "is_sdxl": base.is_sdxl,
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
        "shard_size": shard_size, "is_sdxl": next(iter(notes.values()))["is_sdxl"],
        "encoder_bytes": next(n["encoder_bytes"] for n in notes.values() if n["encoder_bytes"] is not None),
        "shards": {kind: [{"name": s.name, "count": notes[s.name]["count"]} for s in shards if s.kind == kind]
                   for kind in KINDS},
        "counts": {kind: sum(notes[s.name]["count"] for s in shards if s.kind == kind) for kind in KINDS},
        "skipped": {where: why for n in notes.values() for where, why in n.get("skipped", {}).items()},
        "data": stats.summary(),
        "read": stats.read, "kept": stats.kept, "dropped": dict(stats.dropped),
    }
    manifest["skipped"] |= stats.skipped  # rows dropped while reading the source, and while encoding it
    if accelerator.is_main_process:
        tmp = out / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, out / MANIFEST)
    accelerator.wait_for_everyone()
    return manifest


# --------------------------------------------------------------------------------------------------
# Reading


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
    def stack(name: str) -> Tensor | None:
        return torch.stack([item[name] for item in items]) if name in items[0] else None

    return EncodedBatch(stack("latents_w"), stack("latents_l"), stack("prompt_embeds"), stack("pooled"),
                        stack("time_ids_w"), stack("time_ids_l"), stack("labels"))


def cached_datasets(recipe: Recipe, draws: int, embed_dtype: torch.dtype) -> data.Datasets:
    """The trainer's datasets from `[data].cache`, after checking the cache fits the recipe."""
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
    stats = data.PairStats(manifest["read"], manifest["kept"], Counter(manifest["dropped"]), manifest["skipped"])
    return data.Datasets(train, val if len(val) else None, data.StreamSampler(len(train), draws, seed),
                         collate_encoded, stats, summary, recipe.data.num_workers)


# --------------------------------------------------------------------------------------------------
# How fast each path feeds the trainer


def text_shapes(cfg: ModelRecipe) -> tuple[int, int, int | None]:
    """(tokens, embedding width, pooled width or None) of the base's prompt embeddings: read from a local
    pipeline's text encoder configs, else from the shipped SDXL or SD 1.5 architecture (guessed from the id)."""
    source = Path(models.resolve_base(cfg.base))
    if (source / "text_encoder" / "config.json").is_file():
        configs = [json.loads((source / f / "config.json").read_text())
                   for f in ("text_encoder", "text_encoder_2") if (source / f / "config.json").is_file()]
        pooled = configs[-1].get("projection_dim") if len(configs) == 2 else None
        return 77, sum(c["hidden_size"] for c in configs), pooled
    text = models.shipped_config("sdxl" if "xl" in cfg.base.lower() else "sd15", "text")
    return text["max_length"], sum(text["hidden_sizes"]), text["pooled_dim"]


def _write_bench_sets(folder: Path, n_pairs: int, image_size: int, seed: int) -> tuple[Path, Path]:
    """The same JPEG pairs as Pick-a-Pic-style parquet (row groups of 100, like `datasets` writes binary columns)
    and as files listed in a JSONL."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lora_dpo import synthetic

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[Any]] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    lines = []
    for index in range(n_pairs):
        prompt, chosen, rejected = synthetic.make_pair(index, image_size, seed)
        encoded = []
        for side, image in (("chosen", chosen), ("rejected", rejected)):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            encoded.append(buffer.getvalue())
            (folder / "images" / f"{index:05d}_{side}.jpg").write_bytes(buffer.getvalue())
        rows["caption"].append(prompt)
        rows["jpg_0"].append(encoded[0])
        rows["jpg_1"].append(encoded[1])
        rows["label_0"].append(1.0)
        lines.append(json.dumps({"prompt": prompt, "chosen": f"images/{index:05d}_chosen.jpg",
                                 "rejected": f"images/{index:05d}_rejected.jpg"}))
    pq.write_table(pa.table(rows), folder / "pairs.parquet", row_group_size=100)
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.parquet", folder / "pairs.jsonl"


def _write_bench_cache(folder: Path, n_pairs: int, resolution: int, shapes: tuple[int, int, int | None],
                       dtype: str, shard_size: int = 512) -> None:
    """A cache of random tensors with the shapes the model would store (contents do not change read speed); one
    prompt per 14 pairs, Pick-a-Pic v2's ratio."""
    tokens, width, pooled = shapes
    n_prompts, storage = max(2, n_pairs // 14), models.STORAGE_DTYPES[dtype]
    generator = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    shards = plan_shards({"train": n_pairs, "val": 0, "prompts": n_prompts}, shard_size)
    note = {"fingerprint": "bench", "is_sdxl": pooled is not None, "encoder_bytes": 0}
    for shard in shards:
        n = shard.stop - shard.start
        if shard.kind == "prompts":
            tensors = {"prompt_embeds": torch.randn(n, tokens, width, generator=generator).to(storage)}
            tensors |= {"pooled": torch.randn(n, pooled, generator=generator).to(storage)} if pooled else {}
        else:
            latent = (n, 4, resolution // 8, resolution // 8)
            tensors = {"latents_w": torch.randn(latent, generator=generator).to(storage),
                       "latents_l": torch.randn(latent, generator=generator).to(storage),
                       "labels": torch.ones(n), "prompt_ids": torch.randint(0, n_prompts, (n,), generator=generator)}
            if pooled:
                tensors |= {"time_ids_w": torch.zeros(n, 6), "time_ids_l": torch.zeros(n, 6)}
        save_shard(folder, shard.name, tensors, {**note, "count": n})
    manifest = {"format": FORMAT, "fingerprint": "bench", "identity": {}, "seed": 0, "dtype": dtype,
                "shard_size": shard_size, "is_sdxl": pooled is not None, "encoder_bytes": 0, "skipped": {},
                "shards": {kind: [{"name": s.name, "count": s.stop - s.start} for s in shards if s.kind == kind]
                           for kind in KINDS}, "data": "benchmark", "read": n_pairs, "kept": n_pairs, "dropped": {}}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _time_loader(loader: torch.utils.data.DataLoader) -> tuple[int, float, float]:
    """(pairs, seconds to the first batch, pairs per second after it: the steady state a training run sees)."""
    started = time.perf_counter()
    batches = iter(loader)
    first = next(batches)
    first_at = time.perf_counter()
    pairs, rest = len(first.labels), 0
    for batch in batches:
        rest += len(batch.labels)
    seconds = time.perf_counter() - first_at
    return pairs + rest, first_at - started, rest / seconds if rest else pairs / (first_at - started)


def measure_data_throughput(cfg: DataRecipe, shapes: tuple[int, int, int | None], n_pairs: int = 64,
                            image_size: int | None = None, batch_size: int = 4, seed: int = 0,
                            cache_dtype: str = "fp16", workdir: Path | None = None) -> list[dict[str, Any]]:
    """Pairs per second that each data path delivers to the training loop on this machine, in one run: decoding
    JPEG pairs from Pick-a-Pic-style parquet, decoding JPEG files listed in a JSONL, and reading a latent cache
    (random contents, the shapes `shapes` of the recipe's model at its resolution). The same generated pairs, at
    `image_size` (default: the recipe's resolution), through the real loaders: the recipe's workers, pinned
    memory on CUDA, its prefetch factor, and the row-group-aware sampler for parquet."""
    image_size = image_size or cfg.resolution
    pin = torch.cuda.is_available()
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = Path(tmp)
        parquet, jsonl = _write_bench_sets(folder / "sets", n_pairs, image_size, seed)
        _write_bench_cache(folder / "cache", n_pairs, cfg.resolution, shapes, cache_dtype)
        for name, source in (("parquet (decode JPEG)", parquet), ("jsonl images (decode JPEG)", jsonl)):
            live_cfg = dataclasses.replace(cfg, source=str(source), val_pairs=0, max_pairs=None, streaming=False,
                                           cache=None, columns=())
            live = data.build_datasets(live_cfg, seed, n_pairs, batch_size)
            rows.append((name, live.train, live.sampler, data.collate, live.num_workers))
        cached = CachedPairs(LatentCache(folder / "cache"), "train", seed)
        rows.append((f"latent cache ({cache_dtype})", cached, data.StreamSampler(n_pairs, n_pairs, seed),
                     collate_encoded, cfg.num_workers))
        results = []
        for name, dataset, sampler, collate_fn, workers in rows:
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn, num_workers=workers,
                pin_memory=pin, prefetch_factor=cfg.prefetch_factor if workers else None)
            pairs, startup, rate = _time_loader(loader)
            results.append({"path": name, "pairs": pairs, "workers": workers, "startup_s": round(startup, 3),
                            "pairs_per_s": round(rate, 1)})
    return results
