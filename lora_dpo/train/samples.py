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
from lora_dpo.evaluate import EvalError, GridRow, generate, make_grid
from lora_dpo.recipe import Recipe

log = logging.getLogger(__name__)

DEFAULT_SAMPLE_PROMPTS = 4  # training samples when [sample].prompts is empty


def default_sample_prompts(prompts: Sequence[str], n: int = DEFAULT_SAMPLE_PROMPTS) -> list[str]:
    """The first `n` distinct prompts, in order."""
    return list(dict.fromkeys(p for p in prompts if p))[:n]


def pipeline_from_parts(base: models.BaseModel, unet: Any, revision: str | None = None) -> Any:
    """A stock pipeline around parts already in memory (no second UNet): the base's VAE, encoders and
    tokenizers, the given UNet, and a fresh instance of the base's own inference scheduler (with what a single-file
    base's marker keys change in it)."""
    if base.vae is None or not base.text_encoders:
        raise EvalError("[sample].every needs the base's VAE and text encoders in memory")
    import diffusers

    # the scheduler's JSON (any scheduler class reads any config; a flow base's training schedule is no class's)
    config = diffusers.DDPMScheduler.load_config(base.source, subfolder="scheduler", revision=revision)
    scheduler = models.inference_scheduler(config, base.scheduler_overrides)  # a v_pred file samples as v_pred
    # what the base's model_index.json sets of the class's own arguments (a step-distilled FLUX.2 klein: no CFG)
    keys = base.family.pipeline_config_keys
    index = models.read_pipeline_json(base.source, "model_index.json", revision) if keys else {}
    # the family's pipeline class, its watermark off (the grids compare base and adapter pixel for pixel)
    pipe = base.family.build_pipeline(unet, base.vae, scheduler, base.tokenizers, base.text_encoders,
                                      **base.family.unwatermarked, **{k: index[k] for k in keys if k in index})
    pipe.set_progress_bar_config(disable=True)
    return pipe


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
        """The pipeline returns latents, decoded here by the VAE in its own precision: under mixed precision
        the latents come out in bf16/fp16 while the VAE may stay fp32 (the inverse of models.encode_images).
        Eager, under [train].compile too: grids are drawn every few hundred steps in shapes training never runs
        (the guidance batch, adapters off and on), whose graphs would cost a compile each and count towards torch's
        limit of graphs per block (`models.compile_blocks`)."""
        vae, images = self.pipe.vae, []
        for prompt, seed in self.rows:
            with torch.compiler.set_stance("force_eager"):
                latents = generate(self.pipe, prompt, seed, self.cfg.steps, self.cfg.guidance_scale,
                                   self.resolution, output_type="latent")
            # (B, C, h, w) as the VAE decodes them: FLUX's pipeline hands its latents back packed into tokens
            latents = self.pipe_family.decodable_latents(vae, latents, self.resolution, self.resolution)
            decoded = vae.decode(latents).sample.float()
            images += self.pipe.image_processor.postprocess(decoded, output_type="pil")
        return images

    def maybe_sample(self, step: int, final: bool = False) -> Path | None:
        """Sample when `step` is due; puts the UNet back in the train/eval mode it was in."""
        if not (final or step % self.cfg.every == 0):
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        unet = getattr(self.pipe, self.pipe_family.denoiser_folder)  # the UNet or transformer being trained
        was_training = unet.training
        unet.eval()
        try:
            if self.base_images is None:
                with models.adapters_disabled(unet):
                    self.base_images = self._draw()
                make_grid(self._rows([self.base_images]), ["base"]).save(self.out_dir / "base.png")
                # the rows' prompts beside the grids: the model card's gallery captions them (card.widget)
                prompts = json.dumps([prompt for prompt, _ in self.rows])
                (self.out_dir / card.SAMPLE_PROMPTS_FILE).write_text(prompts, encoding="utf-8")
            adapter_images = self._draw()
        finally:
            unet.train(was_training)
        path = self.out_dir / f"step-{step:06d}.png"
        make_grid(self._rows([self.base_images, adapter_images]), ["base", f"adapter, step {step}"]).save(path)
        log.info("samples: %s", path)
        return path

    def _rows(self, columns: list[list[Image.Image]]) -> list[GridRow]:
        return [GridRow([column[k] for column in columns], f"seed {seed}: {prompt}")
                for k, (prompt, seed) in enumerate(self.rows)]


def plot_training(metrics_file: Path, out_file: Path) -> Path | None:
    """Training loss, training and held-out reward accuracy, and learning rate against steps (a PNG).
    Uses matplotlib's Agg canvas directly: no display, no global pyplot state."""
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
    lr_axes.set_ylim(bottom=0)  # a constant rate reads as flat, not as noise around it
    lr_axes.set_xlabel("optimizer step")
    loss_axes.set_title(f"{metrics_file.parent.name}: training curves")
    figure.savefig(out_file, dpi=100)
    return out_file
