"""Every shipped Pick-a-Pic recipe runs in CI with its own settings: optimizer (bitsandbytes' 8-bit AdamW), mixed
precision (bf16), accumulation, caption dropout, ties policy, streaming, loader workers. Only what a 2-core CPU with
no hub cannot take is swapped: the base (a tiny one of the same architecture), the data (the demo shapes in
Pick-a-Pic's own layout), the resolution, the run's length and the thread count. Gradient checkpointing is forced
on, since the recipes' `auto` means off on a CPU (host memory), and it is the path a small GPU takes."""

import os
import signal
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lora_dpo import checkpoint, export, recipe
from lora_dpo.export import ADAPTER_FILE
from lora_dpo.train import train

RECIPES = Path(__file__).parent.parent / "recipes"
LENGTH = {"max_steps": 3, "checkpoint_every": 1, "log_every": 1, "val_every": 2}  # 3 x 16 micro-batches


def shipped(name: str, base: Path, data: Path, out: Path, run: str, **changes: dict[str, Any]) -> recipe.Recipe:
    """recipes/<name> with the swaps above (and `changes`, section by section)."""
    raw = tomllib.loads((RECIPES / name).read_text())
    raw["model"] |= {"base": str(base), "variant": None}  # the tiny base has one set of weights
    raw["data"] |= {"source": f"hf:{data}", "resolution": 64, "val_pairs": 4}
    # one torch thread, as the suite runs in process: the killed run is a subprocess, and another thread count
    # reduces floats in another order, so its checkpoint would not be the in-process reference's
    raw["train"] |= {**LENGTH, "gradient_checkpointing": True, "num_threads": 1}
    raw["sample"] |= {"every": LENGTH["max_steps"], "steps": 2, "seeds": [0]}
    raw["output"] = {"dir": str(out), "name": run}
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    return recipe.from_dict(raw, f"recipes/{name} (swapped for the tiny base)")


def _kill_after_two_checkpoints(launch: Any, settings: recipe.Recipe, run_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "killed.toml"
    path.write_text(settings.to_toml())
    proc = launch("train", str(path))
    proc.wait_until(lambda: len(checkpoint.list_checkpoints(run_dir)) >= 2)
    os.killpg(proc.proc.pid, signal.SIGKILL)  # the trainer and its loader workers, as the OOM killer would
    assert proc.wait() == -signal.SIGKILL and not (run_dir / ADAPTER_FILE).exists()
    assert "replac" not in proc.output() and "instead" not in proc.output()  # no setting was swapped on the CPU


@pytest.mark.parametrize(("name", "base_fixture", "pipeline"), [
    ("sdxl_pickapic.toml", "tiny_base_dir", "StableDiffusionXLPipeline"),
    ("sd15_pickapic.toml", "tiny_sd15_base_dir", "StableDiffusionPipeline"),
])
def test_a_shipped_recipe_killed_and_resumed_matches_an_uninterrupted_run_and_loads_in_diffusers(
        name: str, base_fixture: str, pipeline: str, pickapic_shapes: Path, launch: Any, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    import diffusers

    base = request.getfixturevalue(base_fixture)
    killed = shipped(name, base, pickapic_shapes, tmp_path, "killed")
    assert (killed.train.optimizer, killed.train.mixed_precision) == ("adamw8bit", "bf16")
    assert killed.train.gradient_accumulation == 16 and killed.data.caption_dropout == 0.2
    run_dir = tmp_path / "killed"
    _kill_after_two_checkpoints(launch, killed, run_dir, tmp_path)
    resumed = train(killed, resume="latest")
    reference = train(shipped(name, base, pickapic_shapes, tmp_path, "reference"))

    first, second = load_file(reference), load_file(resumed)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first), "the resumed adapter differs"
    optimizer_state = load_file(checkpoint.list_checkpoints(run_dir)[-1] / checkpoint.OPTIMIZER)
    assert any("__bnb_optimizer_quant_state__" in key for key in optimizer_state)  # bitsandbytes' own state
    assert list((run_dir / "samples").glob("*.png"))

    kohya = export.export_adapter(run_dir, tmp_path / "kohya.safetensors", "kohya")
    outputs = []
    for source in (run_dir, kohya):
        pipe = getattr(diffusers, pipeline).from_pretrained(base)
        pipe.load_lora_weights(str(source))
        image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
        outputs.append(image)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=2e-3)  # kohya file is fp16


def test_the_sdxl_recipe_trains_on_a_4bit_base(tiny_base_dir: Path, pickapic_shapes: Path, tmp_path: Path) -> None:
    settings = shipped("sdxl_pickapic.toml", tiny_base_dir, pickapic_shapes, tmp_path, "nf4",
                       model={"quantize": "nf4"}, train={"max_steps": 2, "checkpoint_every": 0},
                       sample={"every": 0})
    weights = load_file(train(settings))
    assert any(v.abs().max() > 0 for k, v in weights.items() if ".lora_B." in k)


def test_the_paper_recipe_differs_from_the_overnight_one_only_in_length() -> None:
    """So the run above covers the paper recipe's settings too (its 2048 micro-batches per step would take CI an
    hour a step)."""
    overnight = recipe.load(RECIPES / "sdxl_pickapic.toml").to_dict()
    paper = recipe.load(RECIPES / "sdxl_pickapic_paper.toml").to_dict()
    differs = {f"{s}.{k}" for s in paper for k in paper[s] if paper[s][k] != overnight[s][k]}
    assert differs == {"train.gradient_accumulation", "train.warmup_steps", "train.lr_schedule", "train.log_every",
                       "train.val_every", "train.checkpoint_every", "sample.every"}
    assert paper["train"]["lr_schedule"] == "constant_with_warmup"  # the warmup it had when `constant` warmed up
    assert paper["train"]["gradient_accumulation"] * paper["train"]["batch_size"] == 2048


def _enforce_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """The alphas_cumprod the DPO reference scripts train Turbo on (`enforce_zero_terminal_snr` in diffusers'
    train_diffusion_dpo_sdxl.py and the official train.py), written here from their steps: sqrt(alpha_bar) shifted
    so the last is 0 and scaled so the first keeps its value; the ratios' cumulative product is alpha_bar again."""
    root = (1 - betas).cumprod(0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    alphas_bar = ((root - last) * first / (first - last)) ** 2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return alphas.cumprod(0)


def test_the_turbo_recipe_trains_and_samples_as_turbo(tiny_base_dir: Path, pickapic_shapes: Path,
                                                      tmp_path: Path) -> None:
    """SDXL-Turbo's recipe is the overnight SDXL one plus Turbo's base, timesteps, zero-terminal-SNR schedule (the
    reference scripts' own), no caption dropout (the official Turbo launcher's), resolution and sampling; on the
    tiny base it trains (on the four timesteps only) and samples at 4 steps without guidance."""
    from lora_dpo import models

    overnight = recipe.load(RECIPES / "sdxl_pickapic.toml").to_dict()
    turbo = recipe.load(RECIPES / "sdxl_turbo_pickapic.toml").to_dict()
    differs = {f"{s}.{k}" for s in turbo for k in turbo[s] if turbo[s][k] != overnight[s][k]}
    assert differs == {"model.base", "model.timesteps", "model.rescale_betas_zero_snr", "data.resolution",
                       "data.caption_dropout", "sample.steps", "sample.guidance_scale"}
    assert turbo["model"]["timesteps"] == [249, 499, 749, 999] and turbo["sample"]["guidance_scale"] == 0.0
    assert turbo["model"]["rescale_betas_zero_snr"] is True and turbo["data"]["caption_dropout"] == 0.0
    settings = shipped("sdxl_turbo_pickapic.toml", tiny_base_dir, pickapic_shapes, tmp_path, "turbo",
                       train={"max_steps": 2, "checkpoint_every": 0}, sample={"every": 2, "steps": 4})
    schedule = models.load_base(settings.model, with_encoders=False, with_unet=False).noise_scheduler
    plain = models.load_base(recipe.ModelRecipe(base=str(tiny_base_dir)), with_encoders=False, with_unet=False)
    torch.testing.assert_close(schedule.alphas_cumprod, _enforce_zero_terminal_snr(plain.noise_scheduler.betas),
                               rtol=0, atol=1e-6)
    weights = load_file(train(settings))
    assert any(v.abs().max() > 0 for k, v in weights.items() if ".lora_B." in k)
    assert (tmp_path / "turbo" / "samples" / "step-000002.png").is_file()


FLOW_RECIPES = ("sd35m_pickapic.toml", "flux_pickapic.toml")


def _tiny_of_its_family(name: str) -> str:
    """The built-in tiny base of the recipe's base's family, through the registry (no family named here)."""
    from lora_dpo import models

    family = models.family_of_base_name(tomllib.loads((RECIPES / name).read_text())["model"]["base"])
    assert family is not None and family.flow_matching, name
    return family.tiny_base


@pytest.mark.parametrize("name", FLOW_RECIPES)
def test_a_shipped_flow_recipe_trains_on_its_familys_tiny_base(name: str, pickapic_shapes: Path,
                                                                tmp_path: Path) -> None:
    """Each flow recipe's own settings (its [model] flow keys, NF4, 8-bit AdamW, bf16, accumulation 16, rank 32 on
    its targets) train a few steps on the tiny base of its family (`tiny-sd3` / `tiny-flux`)."""
    settings = shipped(name, _tiny_of_its_family(name), pickapic_shapes, tmp_path, "flow",
                       train={"max_steps": 2, "checkpoint_every": 0}, sample={"every": 0})
    assert (settings.train.optimizer, settings.train.mixed_precision) == ("adamw8bit", "bf16")
    assert settings.train.gradient_accumulation == 16 and settings.model.timestep_sampling == "logit_normal"
    weights = load_file(train(settings))
    assert any(v.abs().max() > 0 for k, v in weights.items() if ".lora_B." in k)


@pytest.mark.parametrize("name", FLOW_RECIPES)
def test_a_shipped_flow_recipe_is_planned_on_its_familys_tiny_base(name: str) -> None:
    """The planner traces the family's own step (its noising, target and denoiser call) on fake tensors."""
    from lora_dpo import plan

    raw = tomllib.loads((RECIPES / name).read_text())
    raw["model"]["base"] = _tiny_of_its_family(name)
    raw["data"] |= {"resolution": 64, "cache": "unused", "streaming": False}
    built = plan.make_plan(recipe.from_dict(raw, name))
    assert built.on.step.lora_numels and 0 < built.on.peak < built.off.peak + built.off.optimizer_state
    assert built.on.unet_flops > built.off.unet_flops  # checkpointing recomputes
