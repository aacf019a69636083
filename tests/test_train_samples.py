"""Samples and the training plot, made while training, on the tiny base: the base | adapter grids drawn from the
UNet being trained (without changing what it learns), the default sample prompts, and the curves plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lora_dpo import recipe
from lora_dpo.export import ADAPTER_FILE
from lora_dpo.train import samples as train_samples
from lora_dpo.train import setup, train

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def test_training_samples_grids_and_plots_without_changing_the_adapter(tiny_recipe, tmp_path: Path) -> None:
    sample = {"every": 2, "prompts": PROMPTS[:2], "seeds": [0, 1], "steps": 2}
    torch.manual_seed(0)  # the LoRA init draws from the global RNG: the two runs below must start alike
    train(tiny_recipe(sample=sample, output={"name": "sampled"}))
    run_dir = tmp_path / "adapters" / "sampled"
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["base.png", "prompts.json",
                                                                        "step-000002.png", "step-000004.png"]
    prompts = json.loads((run_dir / "samples" / "prompts.json").read_text())  # the card's gallery captions
    assert prompts and all(isinstance(p, str) and p for p in prompts)
    with Image.open(run_dir / "samples" / "step-000004.png") as grid:
        assert grid.width == 2 * 6 + 2 * 128 + 4  # base | adapter
        assert grid.height > 4 * 128  # 2 prompts x 2 seeds
    with Image.open(run_dir / "training.png") as plot:
        assert plot.size == (700, 750)
    torch.manual_seed(0)
    train(tiny_recipe(output={"name": "plain"}))
    sampled, plain = load_file(run_dir / ADAPTER_FILE), load_file(tmp_path / "adapters" / "plain" / ADAPTER_FILE)
    for key, value in plain.items():  # sampling draws no training randomness and leaves the modes as they were
        torch.testing.assert_close(sampled[key], value, rtol=0, atol=0)

    run = setup(tiny_recipe(sample=sample, output={"name": "modes"}), tmp_path / "modes")
    run.unet.train()
    trainable = [name for name, p in run.unet.named_parameters() if p.requires_grad]
    assert run.sampler.maybe_sample(1) is None  # not due
    assert run.sampler.maybe_sample(2) == tmp_path / "modes" / "samples" / "step-000002.png"
    assert run.unet.training
    assert [name for name, p in run.unet.named_parameters() if p.requires_grad] == trainable


def test_sampling_defaults_to_held_out_prompts_and_seed_lists_are_checked(tiny_recipe, tmp_path: Path) -> None:
    run = setup(tiny_recipe(sample={"every": 1, "steps": 1}), tmp_path)
    held_out = [pair.prompt for pair in run.val_loader.dataset.pairs]
    assert [prompt for prompt, _ in run.sampler.rows] == list(dict.fromkeys(held_out))[:4]
    assert setup(tiny_recipe(), tmp_path / "off").sampler is None
    with pytest.raises(recipe.RecipeError, match=r"\[sample\].seeds = \['a'\] must be a list of whole numbers"):
        tiny_recipe(sample={"seeds": ["a"]})
    assert tiny_recipe(sample={"seeds": 3}).sample.seeds == (3,)


def test_plot_reads_metrics_with_and_without_held_out_records(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    assert train_samples.plot_training(metrics, tmp_path / "a.png") is None  # nothing logged yet
    records = [{"step": 0, "val_reward_accuracy": 0.5}]
    records += [{"step": s, "lr": 1e-3, "loss": math.log(2) - s / 100, "reward_accuracy": 0.5 + s / 100,
                 **({"val_reward_accuracy": 0.5 + s / 200} if s % 20 == 0 else {})} for s in range(10, 60, 10)]
    metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert train_samples.plot_training(metrics, tmp_path / "curves.png") == tmp_path / "curves.png"
    with Image.open(tmp_path / "curves.png") as image:
        assert image.size == (700, 750)
