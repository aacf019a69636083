"""How fast each data path feeds the trainer: `measure_data_throughput` times the real loaders over the same
generated pairs as Pick-a-Pic-style parquet, as JPEG files listed in a JSONL, and as a latent cache of random
tensors with the recipe's model's shapes (`text_shapes`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lora_dpo import data, models, synthetic
from lora_dpo.cache.layout import FORMAT, KINDS, MANIFEST, plan_shards, save_shard
from lora_dpo.cache.read import CachedPairs, LatentCache, collate_encoded
from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import DataRecipe, ModelRecipe, Recipe


def text_shapes(cfg: ModelRecipe) -> tuple[int, int, int | None]:
    """(tokens, embedding width, pooled width or None) of the base's prompt embeddings, as its family's denoiser
    reads them: from the base's denoiser config (a tiny base, a known hub id, a local folder or file: no download;
    another hub id: its config JSON from the hub cache or the hub, KBs, as `lora-dpo plan` reads it), else, when
    that cannot be read, from the shipped architecture of the family the hub id names (`Family.metadata_markers`).
    A hub id whose config cannot be read and that names no family is a one-line error: guessing a family would
    time a cache of another model's shapes."""
    if not Path(models.resolve_base(cfg.base)).exists() and not models.family_of_base_name(cfg.base):
        named = models.family_of_metadata(cfg.base.lower())
        try:
            config = models.base_denoiser_config(cfg.base, cfg.revision)
        except LoraDpoError as err:
            if named is None:
                raise models.ModelError(
                    f"[model].base = {cfg.base!r}: its family (and so its cache's shapes) is not known here: no "
                    f"family's name is in the id and its config cannot be read ({str(err).splitlines()[0]}); pass "
                    f"a local diffusers folder or a known hub id ({', '.join(models.KNOWN_BASES)})") from None
            config = named.shipped_config(named.denoiser_folder)
        family = models.family_of_denoiser(config) or named
        if family is None:
            raise models.ModelError(f"[model].base = {cfg.base!r}: its denoiser config is no known family's (known: "
                                    f"{', '.join(f.label for f in models.FAMILIES)}); pass a base of one of them")
    else:
        config = models.base_denoiser_config(cfg.base)
        family = models.denoiser_family(config)
    tokens = family.shipped_config("text")["max_length"]
    return tokens, family.text_width(config), family.pooled_width(config)


def _write_bench_sets(folder: Path, n_pairs: int, image_size: int, seed: int) -> tuple[Path, Path]:
    """The same JPEG pairs as Pick-a-Pic-style parquet (row groups of 100, like `datasets` writes binary columns)
    and as files listed in a JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

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
    note = {"fingerprint": "bench", "encoder_bytes": 0}
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
                "shard_size": shard_size, "encoder_bytes": 0, "skipped": {},
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


def format_throughput(rows: list[dict[str, Any]], pairs: int, recipe: Recipe) -> str:
    """`lora-dpo bench --data-only`'s table: one line per data path."""
    lines = [f"{pairs} pairs of {recipe.data.resolution} px JPEGs, batch {recipe.train.batch_size}",
             f"{'path':30} {'workers':>7} {'startup s':>10} {'pairs/s':>9}"]
    lines += [f"{row['path']:30} {row['workers']:>7} {row['startup_s']:>10.2f} {row['pairs_per_s']:>9.1f}"
              for row in rows]
    return "\n".join(lines)
