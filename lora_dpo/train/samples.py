"""Samples and the training plot, made while a run trains: `TrainingSampler` draws the side-by-side base | adapter
grid from the UNet being trained (through a stock pipeline built around the parts already in memory), and
`plot_training` draws the run's curves from `metrics.jsonl`."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lora_dpo import card, models
from lora_dpo.evaluate import GridRow, decode_latents, generate, make_grid, pipeline_from_parts
from lora_dpo.recipe import Recipe

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_PROMPTS = 4  # training samples when [sample].prompts is empty


def default_sample_prompts(prompts: Sequence[str], n: int = DEFAULT_SAMPLE_PROMPTS) -> list[str]:
    """The first `n` distinct prompts, in order."""
    return list(dict.fromkeys(p for p in prompts if p))[:n]


class TrainingSampler:
    """Side-by-side grids while training: the base images once (`samples/base.png`), then base | adapter
    every `[sample].every` steps and at the end (`samples/step-000100.png`), from the UNet being trained."""

    def __init__(self, base: models.BaseModel, unet: Any, recipe: Recipe, prompts: Sequence[str],
                 out_dir: Path) -> None:
        self.cfg, self.resolution, self.out_dir = recipe.sample, recipe.data.resolution, out_dir
        self.pipe, self.pipe_family = pipeline_from_parts(base, unet, recipe.model.revision), base.family
        self.rows = [(prompt, seed) for prompt in prompts for seed in self.cfg.seeds]
        self.base_images: list[Image.Image] | None = None

    @torch.no_grad()
    def _draw(self) -> list[Image.Image]:
        """The pipeline's latents, decoded (`decode_latents`). Eager, under [train].compile too: grids are drawn
        every few hundred steps in shapes training never runs (the guidance batch, adapters off and on), whose
        graphs would cost a compile each and count towards torch's limit of graphs per block
        (`models.compile_blocks`)."""
        images = []
        for prompt, seed in self.rows:
            with torch.compiler.set_stance("force_eager"):
                latents = generate(self.pipe, prompt, seed, self.cfg.steps, self.cfg.guidance_scale,
                                   self.resolution, output_type="latent")
            images += decode_latents(self.pipe, self.pipe_family, latents, self.resolution)
        return images

    def maybe_sample(self, step: int, final: bool = False) -> Path | None:
        """Sample when `step` is due; puts the UNet back in the train/eval mode it was in."""
        if not (final or step % self.cfg.every == 0):
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        unet = getattr(self.pipe, self.pipe_family.denoiser_folder)  # the UNet or transformer being trained
        with models.eval_mode(unet):
            if self.base_images is None:
                with models.adapters_disabled(unet):
                    self.base_images = self._draw()
                make_grid(self._rows([self.base_images]), ["base"]).save(self.out_dir / "base.png")
                # the rows' prompts beside the grids: the model card's gallery captions them (card.widget)
                prompts = json.dumps([prompt for prompt, _ in self.rows])
                (self.out_dir / card.SAMPLE_PROMPTS_FILE).write_text(prompts, encoding="utf-8")
            adapter_images = self._draw()
        path = self.out_dir / f"step-{step:06d}.png"
        make_grid(self._rows([self.base_images, adapter_images]), ["base", f"adapter, step {step}"]).save(path)
        log.info("samples: %s", path)
        return path

    def _rows(self, columns: list[list[Image.Image]]) -> list[GridRow]:
        return [GridRow([column[k] for column in columns], f"seed {seed}: {prompt}")
                for k, (prompt, seed) in enumerate(self.rows)]


def plot_training(metrics_file: Path, out_file: Path, round_steps: int | None = None) -> Path | None:
    """Training loss, training and held-out reward accuracy, and learning rate against steps (a PNG); an online
    run (`round_steps`: its steps per round) has its rounds' ends marked and each round's held-out win rates over
    the base drawn beside the accuracy. Uses matplotlib's Agg canvas directly: no display, no global pyplot
    state."""
    if not metrics_file.is_file():
        return None
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not records:
        return None
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[float], list[float]]:
        points = [(r["step"], r[key]) for r in records if key in r]
        return [p[0] for p in points], [p[1] for p in points]

    figure = Figure(figsize=(7, 7.5), layout="constrained")
    loss_axes, accuracy_axes, lr_axes = figure.subplots(3, 1, sharex=True)
    for axes, keys, ylabel in ((loss_axes, ("loss", "val_loss"), "loss"),
                               (accuracy_axes, ("reward_accuracy", "val_reward_accuracy"), "reward accuracy"),
                               (lr_axes, ("lr",), "learning rate")):
        for key in keys:
            steps, values = series(key)
            if steps:
                axes.plot(steps, values, marker="o" if key.startswith("val_") else None, markersize=3,
                          label={"val_loss": "held out", "val_reward_accuracy": "held out"}.get(key, "training"))
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if len(axes.lines) > 1:
            axes.legend(loc="best")
    accuracy_axes.axhline(0.5, color="grey", linestyle=":", linewidth=1)  # a fresh adapter: every pair a tie
    if round_steps:
        for key in dict.fromkeys(k for r in records for k in r if k.endswith("_win_rate")):
            steps, values = series(key)
            accuracy_axes.plot(steps, values, marker="s", markersize=4, label=key.replace("_", " "))
        accuracy_axes.legend(loc="best")
        for axes in (loss_axes, accuracy_axes, lr_axes):
            for end in range(round_steps, records[-1]["step"] + 1, round_steps):
                axes.axvline(end, color="tab:purple", alpha=0.4, linewidth=1)  # a round ends: new pairs from here
    lr_axes.set_ylim(bottom=0)  # a constant rate reads as flat, not as noise around it
    lr_axes.set_xlabel("optimizer step")
    loss_axes.set_title(f"{metrics_file.parent.name}: training curves")
    figure.savefig(out_file, dpi=100)
    return out_file
