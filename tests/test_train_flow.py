"""Training on the flow-matching bases (SD3, FLUX) on their tiny bases: a real `lora-dpo train` with the shipped
Pick-a-Pic recipe's settings (8-bit AdamW, bf16, gradient checkpointing; NF4 on SD3), SIGKILLed and resumed bit for
bit, its adapter loaded by a fresh stock pipeline; a run from the latent cache equal to the live one; one DPO step
against velocity errors computed here by hand; the recipe's flow keys reaching the noise and the transformer."""

from __future__ import annotations

import os
import signal
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lora_dpo import cache, checkpoint, models, recipe, step
from lora_dpo.export import ADAPTER_FILE
from lora_dpo.objectives import diffusion_dpo_loss
from lora_dpo.train import fit, setup, train
from lora_dpo.train.loop import _encode

RECIPES = Path(__file__).parent.parent / "recipes"
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "flux2": "Flux2KleinPipeline"}
TOKENS = {"sd3": 77 + 256, "flux": 512, "flux2": 512}  # prompt embeddings' S: CLIP 77 + T5 256 (SD3), T5 512 (FLUX),
# Qwen3 512 (FLUX.2 klein)
CHANNELS = {"sd3": 16, "flux": 16, "flux2": 32}  # latent channels of the tiny bases' VAEs


def _shipped(base: Path, data: Path, out: Path, name: str, **changes: dict[str, Any]) -> recipe.Recipe:
    """recipes/sdxl_pickapic.toml's settings on a tiny flow base, as tests/test_shipped_recipes.py swaps them (the
    demo shapes in Pick-a-Pic's layout, 64 px, 3 steps of 16 micro-batches, one thread, checkpointing on), its
    SDXL target modules left to the family's default."""
    raw = tomllib.loads((RECIPES / "sdxl_pickapic.toml").read_text())
    raw["model"] = {"base": str(base)}
    raw["lora"].pop("target_modules")
    raw["data"] |= {"source": f"hf:{data}", "resolution": 64, "val_pairs": 4}
    raw["train"] |= {"max_steps": 3, "checkpoint_every": 1, "log_every": 1, "val_every": 2,
                     "gradient_checkpointing": True, "num_threads": 1}
    raw["sample"] |= {"every": 3, "steps": 2, "seeds": [0]}
    raw["output"] = {"dir": str(out), "name": name}
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    return recipe.from_dict(raw, f"recipes/sdxl_pickapic.toml on {base.name}")


# SD3 on a 4-bit base (its transformer's linear layers in NF4), FLUX.1 and FLUX.2 klein on full-precision ones. The
# shipped rate (1e-5) moves a 3-step tiny adapter too little to see in an image: 1e-3 here.
@pytest.mark.parametrize(("name", "model"), [("sd3", {"quantize": "nf4"}), ("flux", {}), ("flux2", {})])
def test_the_shipped_recipe_on_a_flow_base_killed_and_resumed_matches_and_loads_in_diffusers(
        name: str, model: dict[str, Any], pickapic_shapes: Path, launch: Any, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    import diffusers

    base = request.getfixturevalue(f"tiny_{name}_base_dir")
    changes = {"model": model, "train": {"learning_rate": 1e-3}}
    killed = _shipped(base, pickapic_shapes, tmp_path, "killed", **changes)
    assert (killed.train.optimizer, killed.train.mixed_precision) == ("adamw8bit", "bf16")
    run_dir = tmp_path / "killed"
    path = tmp_path / "killed.toml"
    path.write_text(killed.to_toml())
    proc = launch("train", str(path))
    proc.wait_until(lambda: len(checkpoint.list_checkpoints(run_dir)) >= 2)
    os.killpg(proc.proc.pid, signal.SIGKILL)  # the trainer and its loader workers
    assert proc.wait() == -signal.SIGKILL and not (run_dir / ADAPTER_FILE).exists()
    assert "gradient checkpointing on" in proc.output()
    resumed = train(killed, resume="latest")
    reference = train(_shipped(base, pickapic_shapes, tmp_path, "reference", **changes))

    first, second = load_file(reference), load_file(resumed)
    assert first.keys() == second.keys() and all(k.startswith("transformer.") for k in first)
    assert all(torch.equal(first[k], second[k]) for k in first), "the resumed adapter differs"
    family = models.family_named(name)
    trained = {k.removeprefix("transformer.").split(".lora_")[0] for k in first}
    assert all(m.endswith(family.default_target_modules) for m in trained)  # the family's default targets
    # every default target the tiny transformer has (FLUX.2 klein's list names single blocks 0..23; the tiny has 1)
    singles = family.tiny_denoiser_config().get("num_single_layers", 0)
    present = {t for t in family.default_target_modules
               if not t.startswith("single_transformer_blocks.") or int(t.split(".")[1]) < singles}
    assert {t for t in family.default_target_modules if any(m.endswith(t) for m in trained)} == present
    assert list((run_dir / "samples").glob("step-*.png"))  # grids from the family's pipeline

    images = []
    pipe = getattr(diffusers, PIPELINES[name]).from_pretrained(base)
    for adapter in (None, run_dir):
        if adapter is not None:
            pipe.load_lora_weights(str(adapter))
        images.append(pipe(prompt="a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                           generator=torch.Generator().manual_seed(0)).images)
    assert not torch.equal(images[0], images[1]), "the adapter does not change the stock pipeline's image"


def test_training_from_the_cache_matches_live_training_on_a_flow_base(
        tiny_flow_base: tuple[str, Path], tiny_recipe, tmp_path: Path) -> None:
    """fp32, same seed: the cached batch equals the live one (no geometry stored, pooled always), and every logged
    loss and held-out metric of the cached run equals the live run's to float tolerance; the cached run loads no
    VAE and no text encoder."""
    name, base = tiny_flow_base
    same = {"crop": "center", "random_flip": False, "caption_dropout": 0.5}
    settings = {"max_steps": 4, "log_every": 1, "val_every": 2}
    live = tiny_recipe(model={"base": str(base)}, data=same, train=settings)
    manifest = cache.build_cache(live, tmp_path / "cache", shard_size=8, dtype="fp32", batch_size=3)
    assert manifest["family"] == name
    shard = load_file(tmp_path / "cache" / "train-00000.safetensors")
    assert not any(k.startswith("time_ids") for k in shard) and shard["latents_w"].shape[1:] == (CHANNELS[name], 8, 8)
    prompts = load_file(tmp_path / "cache" / "prompts-00000.safetensors")
    pooled = name != "flux2"  # FLUX.2 klein reads no pooled embedding
    assert prompts["prompt_embeds"].shape[1] == TOKENS[name] and ("pooled" in prompts) == pooled
    assert not pooled or prompts["pooled"].dim() == 2

    live_run = setup(live, tmp_path / "live")
    fit(live_run)
    cached = tiny_recipe(model={"base": str(base)}, data={**same, "cache": str(tmp_path / "cache")}, train=settings)
    run = setup(cached, tmp_path / "cached")
    assert run.base.vae is None and run.base.text_encoders == () and run.base.tokenizers == ()
    live_first = _encode(live_run, next(iter(live_run.train_loader)))
    cached_first = _encode(run, next(iter(run.train_loader)))
    assert cached_first.time_ids_w is None and live_first.time_ids_w is None
    assert (cached_first.pooled is not None) == (live_first.pooled is not None) == pooled
    for field in ("latents_w", "latents_l", "prompt_embeds", "pooled", "labels"):
        if getattr(live_first, field) is not None:
            torch.testing.assert_close(getattr(cached_first, field), getattr(live_first, field), rtol=1e-5, atol=1e-5)
    fit(run)
    assert [h["step"] for h in run.history] == [h["step"] for h in live_run.history]
    for mine, theirs in zip(run.history, live_run.history, strict=True):
        for key in ("loss", "val_loss", "val_reward_accuracy", "model_w", "ref_l"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), (mine["step"], key)


def test_the_cache_command_and_a_cached_bf16_run_on_a_flow_base(tiny_sd3_base_dir: Path, shapes_jsonl: Path,
                                                               tmp_path: Path) -> None:
    """`lora-dpo cache` then `lora-dpo train` from it, both real subprocesses, in bf16 (the cache stores fp16)."""
    import subprocess
    import sys

    path = tmp_path / "r.toml"
    path.write_text(f'[model]\nbase = "{tiny_sd3_base_dir}"\n[data]\nsource = "{shapes_jsonl}"\nresolution = 64\n'
                    f'val_pairs = 4\ncache = "{tmp_path / "cache"}"\n[train]\nmax_steps = 2\nbatch_size = 2\n'
                    f'mixed_precision = "bf16"\nnum_threads = 1\n[output]\ndir = "{tmp_path}"\nname = "cached"\n')
    for command in ("cache", "train"):
        done = subprocess.run([sys.executable, "-m", "lora_dpo", command, str(path)], cwd=Path(__file__).parent.parent,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    assert "VAE and text encoders not loaded" in done.stdout + done.stderr
    weights = load_file(tmp_path / "cached" / ADAPTER_FILE)
    assert weights and all(k.startswith("transformer.") for k in weights)


def test_a_flow_dpo_step_is_the_dpo_loss_of_velocity_errors_by_hand(tiny_flow_base: tuple[str, Path], tiny_recipe,
                                                                     tmp_path: Path) -> None:
    """One `step.dpo_step` on a real batch against its re-implementation here: the same noise and sigma for both
    images of a pair (drawn noise first, then sigma, from the step's generator), x_t = (1 - s) x_0 + s n, target
    n - x_0, the family's transformer call with adapters off (reference) and on (policy), per-image mean squared
    error over (C, h, w), the DPO loss: equal bit for bit. The recipe's flow keys reach the schedule and FLUX's
    guidance the transformer."""
    name, base = tiny_flow_base
    guidance = {"guidance": 2.5} if name == "flux" else {}  # a FLUX key: refused on SD3 (tests/test_family_keys.py)
    run = setup(tiny_recipe(model={"base": str(base), "timestep_sampling": "uniform", "shift": 2.0, **guidance},
                            train={"max_steps": 1}), tmp_path / "hand")
    schedule, family, unet = run.base.noise_scheduler, run.base.family, step.unwrap(run.unet)
    assert schedule.weighting_scheme == "none" and (name != "flux" or schedule.guidance == 2.5)
    assert (schedule.config.shift, schedule.config.use_dynamic_shifting) == (2.0, False)
    with torch.no_grad():
        torch.nn.init.normal_(next(p for n, p in unet.named_parameters() if "lora_B" in n))  # a policy != reference
    batch = _encode(run, next(iter(run.train_loader)))
    assert batch.time_ids_w is None and (batch.pooled is None) == (name == "flux2")
    seen: list[Any] = []
    hook = unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("guidance")),
                                          with_kwargs=True)
    out = step.dpo_step(run.unet, run.base, batch, run.recipe.objective, torch.Generator().manual_seed(7))
    hook.remove()
    if name == "flux":
        assert all(torch.equal(g, torch.full_like(g, 2.5)) for g in seen)

    generator = torch.Generator().manual_seed(7)
    x0 = torch.cat([batch.latents_w, batch.latents_l])  # (2B, C, h, w)
    pairs = batch.latents_w.shape[0]
    noise = torch.randn(batch.latents_w.shape, generator=generator).repeat(2, 1, 1, 1)  # one noise per pair
    timesteps = family.sample_timesteps(schedule, pairs, generator).repeat(2)  # one sigma per pair
    sigma = (timesteps / family.timestep_scale(schedule)).view(-1, 1, 1, 1)
    noisy, target = (1.0 - sigma) * x0 + sigma * noise, noise - x0
    embeds = batch.prompt_embeds.repeat(2, 1, 1)
    pooled = None if batch.pooled is None else batch.pooled.repeat(2, 1)

    def errors() -> torch.Tensor:
        prediction = family.denoise(unet, noisy, timesteps, embeds, pooled, None, schedule)
        return (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (2B,)

    with models.adapters_disabled(unet), torch.inference_mode():
        ref_w, ref_l = errors().clone().chunk(2)
    model_w, model_l = errors().chunk(2)
    cfg = run.recipe.objective
    loss = diffusion_dpo_loss(model_w, model_l, ref_w, ref_l, cfg.beta, batch.labels, cfg.label_smoothing).mean()
    assert torch.equal(out.loss, loss) and not torch.equal(model_w, ref_w)
    assert torch.equal(out.metrics["ref_w"], ref_w.mean()) and torch.equal(out.metrics["model_l"], model_l.mean())


def test_random_batches_have_the_flow_families_shapes() -> None:
    for name in ("sd3", "flux", "flux2"):
        family = models.family_named(name)
        config = family.tiny_denoiser_config()
        batch = step.random_batch(config, 2, 64, "cpu", torch.float32, torch.Generator().manual_seed(0))
        assert batch.latents_w.shape == (2, CHANNELS[name], 8, 8) and batch.time_ids_w is None
        assert batch.prompt_embeds.shape == (2, TOKENS[name], config["joint_attention_dim"])
        width = family.pooled_width(config)  # FLUX.2 klein: none
        assert (batch.pooled is None) if width is None else batch.pooled.shape == (2, width)


def test_the_built_in_flow_bases_are_built_cold_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`[model].base = "tiny-sd3"` / `"tiny-flux"` / `"tiny-flux2"`: built once into the cache home from the family's
    tiny builder (random weights: no DDPM warm-up), then loaded as their stock pipelines."""
    import json

    monkeypatch.setenv("LORA_DPO_HOME", str(tmp_path))
    for name in ("sd3", "flux", "flux2"):
        family = models.family_named(name)
        folder = models.resolve_base(family.tiny_base)
        assert folder == str(tmp_path / family.tiny_folder) == str(models.tiny_base_path(name))
        assert json.loads((Path(folder) / "model_index.json").read_text())["_class_name"] == PIPELINES[name]
        base = models.load_base(recipe.ModelRecipe(base=family.tiny_base))
        assert base.family is family and len(base.text_encoders) == len(family.text_parts)
        assert type(base.unet).__name__ == family.denoiser_class


def test_a_flow_base_is_recorded_as_a_flow_schedule(tiny_flow_base: tuple[str, Path], tiny_base_dir: Path) -> None:
    """What an adapter's header says its base trained on (`modelspec.prediction_type`, zero terminal SNR): a flow
    base's velocity, never a DDPM reading of its scheduler config; an SDXL base's own prediction type."""
    _, base = tiny_flow_base
    flow = models.base_schedule(recipe.from_dict({"model": {"base": str(base)}}).model)
    assert flow == {"prediction_type": "flow", "rescale_betas_zero_snr": False}
    sdxl = models.base_schedule(recipe.from_dict({"model": {"base": str(tiny_base_dir)}}).model)
    assert sdxl == {"prediction_type": "epsilon", "rescale_betas_zero_snr": False}
