import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import replace

from lora_dpo import cache, data
from lora_dpo.recipe import DataRecipe
from lora_dpo.train import fit, setup
from lora_dpo.train.loop import _encode

ROOT = Path(__file__).parent.parent
# Where the cached and the live pair coincide in every pass: one crop, no flip (the cache stores one of each)
SAME_EVERY_PASS = {"crop": "center", "random_flip": False, "caption_dropout": 0.5}


def _spy_on_encoder_loading(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every load of a VAE or a CLIP text encoder (the loading still happens)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    loads: list[str] = []
    for cls in (AutoencoderKL, CLIPTextModel, CLIPTextModelWithProjection):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            loads.append(klass.__name__)
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return loads


def test_training_from_the_cache_matches_live_training_without_loading_encoders(
        tiny_recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same seed, so the same draws, noise and timesteps: the loss and the held-out metrics of every logged step
    equal the live run's to float tolerance, with caption dropout at 50 % (decided per draw on both paths)."""
    live = tiny_recipe(data=SAME_EVERY_PASS, train={"max_steps": 6, "log_every": 1, "val_every": 3})
    manifest = cache.build_cache(live, tmp_path / "cache", shard_size=8, dtype="fp32", batch_size=3)
    assert manifest["counts"] == {"train": 20, "val": 4, "prompts": 1 + len({p["prompt"] for p in _lines(live)})}
    assert [s["count"] for s in manifest["shards"]["train"]] == [8, 8, 4]
    assert manifest["identity"]["data.resolution"] == 64 and manifest["encoder_bytes"] > 0
    assert manifest["family"] == "sdxl"  # the base's family by name (`Family.name`), not an SDXL flag

    live_run = setup(live, tmp_path / "live")
    fit(live_run)

    loads = _spy_on_encoder_loading(monkeypatch)
    cached = tiny_recipe(data={**SAME_EVERY_PASS, "cache": str(tmp_path / "cache")},
                         train={"max_steps": 6, "log_every": 1, "val_every": 3})
    run = setup(cached, tmp_path / "cached")
    assert loads == [] and run.base.vae is None and run.base.text_encoders == ()
    assert "VAE and text encoders not loaded" in run.data_summary

    # the first batch, encoded live and read from the cache
    live_first = _encode(live_run, next(iter(live_run.train_loader)))
    cached_first = _encode(run, next(iter(run.train_loader)))
    for name in ("latents_w", "latents_l", "prompt_embeds", "pooled", "time_ids_w", "time_ids_l", "labels"):
        torch.testing.assert_close(getattr(cached_first, name), getattr(live_first, name), rtol=1e-5, atol=1e-5)

    fit(run)
    assert loads == []
    assert [h["step"] for h in run.history] == [h["step"] for h in live_run.history]
    for mine, theirs in zip(run.history, live_run.history, strict=True):
        for key in ("loss", "val_loss", "val_reward_accuracy", "model_w", "ref_l"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (mine["step"], key)


def _lines(recipe) -> list[dict]:
    return [json.loads(line) for line in Path(recipe.data.source).read_text().splitlines()]


def test_a_cache_for_another_model_resolution_or_data_is_refused(tiny_recipe, tmp_path: Path) -> None:
    recipe = tiny_recipe(data={"val_pairs": 0})
    cache.build_cache(recipe, tmp_path / "cache", dtype="fp16")
    other = tiny_recipe(model={"base": str(tmp_path / "another-base")}, data={
        "cache": str(tmp_path / "cache"), "resolution": 32, "source": str(tmp_path / "other.jsonl"), "val_pairs": 0})
    with pytest.raises(data.DataError) as err:
        cache.cached_datasets(other, draws=4, embed_dtype=torch.float32)
    message = str(err.value)
    assert "was made for another setup" in message and "Rebuild it with `lora-dpo cache" in message
    other_base = str(tmp_path / "another-base")
    assert f"model.base = {recipe.model.base!r} in the cache, {other_base!r} in the recipe" in message
    assert "data.resolution = 64 in the cache, 32 in the recipe" in message
    assert "data.source =" in message
    with pytest.raises(data.DataError, match="not a finished cache"):
        cache.LatentCache(tmp_path)


def test_an_interrupted_cache_resumes_and_skips_unusable_pairs(tiny_recipe, tmp_path: Path) -> None:
    """Kill a build after some shards (delete one shard's note and the manifest): the rerun writes only what is
    missing. A truncated image is left out and named in the manifest; another cache in the folder is refused."""
    source = tmp_path / "pairs.jsonl"
    shapes = tiny_recipe().data.source
    lines = [{**row, "chosen": str(Path(shapes).parent / row["chosen"]), "rejected": str(Path(shapes).parent /
              row["rejected"])} for row in map(json.loads, Path(shapes).read_text().splitlines()[:9])]
    broken = tmp_path / "broken.png"
    broken.write_bytes(Path(lines[0]["chosen"]).read_bytes()[:100])
    lines.append({**lines[1], "chosen": str(broken), "prompt": "a broken image"})  # its own prompt: always encoded
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    recipe = tiny_recipe(data={"source": str(source), "val_pairs": 2})
    out = tmp_path / "cache"
    first = cache.build_cache(recipe, out, shard_size=3)
    surplus = first["dropped"].get(data.HELD_OUT_PROMPT, 0)  # other pairs of a held-out prompt: in neither set
    assert first["counts"]["train"] + first["counts"]["val"] + surplus == 9 and first["counts"]["val"] <= 2
    assert list(first["skipped"].values()) == ["undecodable image"] and f"{source}:10" in first["skipped"]
    assert (first["read"], first["kept"] + surplus) == (10, 10)  # decoding, not reading, shows the broken image
    assert "prompts never trained on" in first["heldout"] and len(first["heldout_rows"]) == 2

    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    (out / "train-00001.json").unlink()
    (out / cache.MANIFEST).unlink()
    assert cache.build_cache(recipe, out, shard_size=3) == first
    rewritten = {p.name for p in out.glob("*.safetensors") if p.stat().st_mtime_ns != stamps[p.name]}
    assert rewritten == {"train-00001.safetensors"}

    with pytest.raises(data.DataError, match="holds a cache made from other data or settings"):
        cache.build_cache(tiny_recipe(data={"source": str(source), "val_pairs": 1}), out, shard_size=3)


def test_data_throughput_of_parquet_jsonl_and_cache_in_one_run(tmp_path: Path) -> None:
    rows = cache.measure_data_throughput(DataRecipe(resolution=32, shuffle_buffer=8), shapes=(77, 64, 32),
                                         n_pairs=12, image_size=48, batch_size=4, workdir=tmp_path)
    assert [r["path"].split()[0] for r in rows] == ["parquet", "jsonl", "latent"]
    assert all(r["pairs"] == 12 and r["pairs_per_s"] > 0 for r in rows)
    assert list(tmp_path.iterdir()) == []  # the generated sets are removed


def test_cache_command_writes_a_cache_a_recipe_trains_from(tiny_base_dir: Path, shapes_jsonl: Path,
                                                           tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\nbase = "{tiny_base_dir}"\n[data]\nsource = "{shapes_jsonl}"\nresolution = 64\n'
                      f'val_pairs = 4\ncache = "{tmp_path / "cache"}"\n')
    result = subprocess.run([sys.executable, "-m", "lora_dpo", "cache", str(recipe), "--shard-size", "16"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"wrote {tmp_path / 'cache'}: 20 train and 4 held-out pairs" in result.stdout
    manifest = json.loads((tmp_path / "cache" / cache.MANIFEST).read_text())
    assert manifest["dtype"] == "fp16" and [s["count"] for s in manifest["shards"]["train"]] == [16, 4]


# The cache package's floors, lowest first: each module imports only those before it; of the rest of lora-dpo it
# uses the trainer's lower floors (data, models, step) and never the trainer, the planner or the CLI
CACHE_MODULES = ("layout", "write", "read", "throughput")
BELOW_CACHE = {"lora_dpo.data", "lora_dpo.models", "lora_dpo.recipe", "lora_dpo.step", "lora_dpo.synthetic",
               "lora_dpo.errors", "lora_dpo.files"}


def test_the_cache_package_imports_one_way() -> None:
    package = Path(cache.__file__).parent
    assert {p.stem for p in package.glob("*.py")} == {"__init__", *CACHE_MODULES}
    for floor, name in enumerate(CACHE_MODULES):
        imports = set()
        for node in ast.walk(ast.parse((package / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_dpo"):
                imports |= {f"lora_dpo.{a.name}" for a in node.names} if node.module == "lora_dpo" else {node.module}
            elif isinstance(node, ast.Import):
                imports |= {a.name for a in node.names if a.name.startswith("lora_dpo")}
        inside = {m.removeprefix("lora_dpo.cache.") for m in imports if m.startswith("lora_dpo.cache.")}
        assert inside <= set(CACHE_MODULES[:floor]), f"cache.{name} imports {inside - set(CACHE_MODULES[:floor])}"
        outside = {m for m in imports if not m.startswith("lora_dpo.cache.")}
        assert outside <= BELOW_CACHE, f"cache.{name} imports {outside - BELOW_CACHE}"
    assert all(hasattr(cache, name) for name in cache.__all__)


def test_everything_that_changes_a_cached_latent_is_in_the_cache_identity(tiny_recipe) -> None:
    """Each of these settings changes the pairs, the pixels or the encoder weights a cache holds: changing any one
    changes its identity (so `cached_datasets` refuses the cache). Caption dropout is decided when reading."""
    from lora_dpo.cache.layout import identity

    recipe = tiny_recipe()
    changes = {"model": {"base": "other", "revision": "v2", "variant": "fp16", "vae": "other-vae", "vae_dtype": "fp16"},
               "data": {"source": "other.jsonl", "split": "test", "val_split": "validation",
                        "columns": (("caption", "text"),), "ties": "keep", "max_pairs": 7, "val_pairs": 1,
                        "resolution": 32, "crop": "center", "random_flip": False}}
    for section, values in changes.items():
        for key, value in values.items():
            other = identity(replace(recipe, section, **{key: value}))
            assert other != identity(recipe) and f"{section}.{key}" in other, f"{section}.{key}"
    assert identity(replace(recipe, "data", caption_dropout=0.3)) == identity(recipe)
