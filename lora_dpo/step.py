"""One Diffusion-DPO step: the one function the trainer, the benchmark and the memory planner all run.

Shapes: B pairs; latents (B, C, h, w); the policy sees winners and losers stacked as 2B, with the same noise
and the same timestep for both images of a pair (Wallace et al. 2023, Sec. 4).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor

from lora_dpo.data import PreferenceBatch
from lora_dpo.models import BaseModel, adapters_disabled, encode_images, encode_prompts, unet_forward
from lora_dpo.objectives import dpo_logits, error_accuracy, get_objective, implicit_reward_accuracy
from lora_dpo.recipe import ObjectiveRecipe


def make_accelerator(mixed_precision: str, **kwargs: Any) -> Any:
    """An `accelerate.Accelerator` with this run's mixed precision. accelerate keeps one AcceleratorState per
    process and refuses a second Accelerator with another precision; a process that runs several trainings or
    benchmarks (a notebook, the tests) starts each from a clean state. The process group (PartialState) stays."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    AcceleratorState._reset_state(reset_partial_state=False)
    cpu = not torch.cuda.is_available()
    if cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # Launched with a DeepSpeed config on a machine without CUDA (CI, a laptop): accelerate runs DeepSpeed
        # only with cpu=False. With cpu=True it silently drops DeepSpeed and runs DDP over gloo (the yaml's
        # `use_cpu` is ignored), so the DeepSpeed path would never be exercised; with cpu=False alone it picks
        # no process group that DeepSpeed's CPU accelerator can use and every rank believes it is alone. gloo
        # is the CPU's backend; DeepSpeed's CPU accelerator runs its collectives over it.
        cpu = False
        kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, **kwargs)


@dataclass
class EncodedBatch:
    """A preference batch in the UNet's space. latents_* (B, C, h, w); prompt_embeds (B, S, D); pooled (B, P)
    and time_ids_* (B, 6) for SDXL, None for SD 1.5; labels (B,)."""

    latents_w: Tensor
    latents_l: Tensor
    prompt_embeds: Tensor
    pooled: Tensor | None
    time_ids_w: Tensor | None
    time_ids_l: Tensor | None
    labels: Tensor

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> EncodedBatch:
        def move(t: Tensor | None, cast: bool = True) -> Tensor | None:
            if t is None:
                return None
            return t.to(device, dtype if cast and dtype is not None else t.dtype, non_blocking=True)

        return EncodedBatch(move(self.latents_w), move(self.latents_l), move(self.prompt_embeds), move(self.pooled),
                            move(self.time_ids_w), move(self.time_ids_l), move(self.labels, cast=False))

    def pin_memory(self) -> EncodedBatch:
        """Called by DataLoader(pin_memory=True) on batches from the latent cache: page-locked host memory lets
        `to(device, non_blocking=True)` overlap the copy with compute."""
        for name, value in vars(self).items():
            if value is not None:
                setattr(self, name, value.pin_memory())
        return self


def encode_batch(base: BaseModel, batch: PreferenceBatch, device: torch.device) -> EncodedBatch:
    """Frozen VAE and text encoders, no gradient: pixels and prompts -> latents and embeddings."""
    embeds, pooled = encode_prompts(base, batch.prompts, device)
    latents = encode_images(base.vae, torch.cat([batch.pixels_w, batch.pixels_l]).to(device))  # (2B, C, h, w)
    latents_w, latents_l = latents.chunk(2)
    sdxl = base.is_sdxl
    return EncodedBatch(latents_w, latents_l, embeds, pooled,
                        batch.time_ids_w.to(device) if sdxl else None, batch.time_ids_l.to(device) if sdxl else None,
                        batch.labels.to(device))


@dataclass
class StepOutput:
    """The mean loss (with graph) and detached per-step metrics, kept on device: reading them is a sync."""

    loss: Tensor
    metrics: dict[str, Tensor]


def _stack(a: Tensor | None, b: Tensor | None, pair: bool) -> Tensor | None:
    if a is None:
        return None
    return torch.cat([a, b]) if pair else a


def _errors(unet: torch.nn.Module, base: BaseModel, batch: EncodedBatch, noise: Tensor, timesteps: Tensor,
            pair: bool) -> Tensor:
    """Per-image mean squared denoising error over (C, h, w): shape (2B,) with the loser, else (B,)."""
    latents = _stack(batch.latents_w, batch.latents_l, pair)
    repeat = 2 if pair else 1
    noise, timesteps = noise.repeat(repeat, 1, 1, 1), timesteps.repeat(repeat)
    scheduler = base.noise_scheduler
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    embeds = batch.prompt_embeds.repeat(repeat, 1, 1)
    pooled = None if batch.pooled is None else batch.pooled.repeat(repeat, 1)
    time_ids = _stack(batch.time_ids_w, batch.time_ids_l, pair)
    dtype = next(extract_model_from_parallel(unet).parameters()).dtype  # conv_in's: never quantised
    if noisy.dtype != dtype and not torch.is_autocast_enabled(noisy.device.type):
        # DeepSpeed holds the whole UNet, LoRA included, in the run's precision (bf16) and accelerate autocasts
        # nothing under it: the fp32 latents and embeddings would meet bf16 weights. Elsewhere autocast (bf16,
        # fp16) or fp32 weights ("no") match them already and nothing is cast. time_ids stay fp32: the UNet
        # embeds them sinusoidally and casts the result itself, as under autocast.
        noisy, embeds = noisy.to(dtype), embeds.to(dtype)
        pooled = None if pooled is None else pooled.to(dtype)
    prediction = unet_forward(unet, noisy, timesteps, embeds, pooled, time_ids)
    return (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


def sample_noise(base: BaseModel, latents: Tensor,
                 generator: torch.Generator | Sequence[torch.Generator]) -> tuple[Tensor, Tensor]:
    """Noise (B, C, h, w) like `latents` and timesteps (B,), drawn on the generator's device (no host sync).
    One generator draws the whole batch; a sequence of B generators draws pair b from generator b alone, so
    a pair's noise does not depend on which process or micro-batch it lands in (multi-GPU == one GPU)."""
    steps = base.noise_scheduler.config.num_train_timesteps
    if isinstance(generator, torch.Generator):
        noise = torch.randn(latents.shape, generator=generator, device=generator.device)
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=generator, device=generator.device)
    else:
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g, device=g.device) for g in generator])
        timesteps = torch.cat([torch.randint(0, steps, (1,), generator=g, device=g.device) for g in generator])
    return noise.to(latents.device, latents.dtype), timesteps.to(latents.device)


def dpo_step(unet: torch.nn.Module, base: BaseModel, batch: EncodedBatch, cfg: ObjectiveRecipe,
             generator: torch.Generator | Sequence[torch.Generator]) -> StepOutput:
    """Sample one noise and timestep per pair, run the policy (on the other image only if the objective needs
    it; and the reference with adapters off, in inference mode, only if it needs that), and return the
    objective's mean loss and metrics: `reward_accuracy` and `reward_margin` (the logit x) need the reference;
    `error_accuracy` (e_w < e_l, no reference) needs the other image. `unet` may be wrapped (DDP, DeepSpeed,
    torch.compile): both passes run through the wrapper, the adapters are switched on the model inside it."""
    objective = get_objective(cfg.kind)
    noise, timesteps = sample_noise(base, batch.latents_w, generator)
    model = _errors(unet, base, batch, noise, timesteps, objective.needs_loser)
    model_w, model_l = model.chunk(2) if objective.needs_loser else (model, None)
    ref_w = ref_l = None
    if objective.needs_reference:
        with adapters_disabled(extract_model_from_parallel(unet)), torch.inference_mode():
            ref = _errors(unet, base, batch, noise, timesteps, pair=True)
        ref_w, ref_l = ref.clone().chunk(2)  # (2B,) constants: cloned out of inference mode so autograd can read them
    num_timesteps = base.noise_scheduler.config.num_train_timesteps
    loss = objective.loss(model_w, model_l, ref_w, ref_l, batch.labels, cfg, num_timesteps).mean()
    metrics = {"loss": loss.detach(), "model_w": model_w.detach().mean()}
    if model_l is not None:
        metrics["model_l"] = model_l.detach().mean()
        metrics["error_accuracy"] = error_accuracy(model_w.detach(), model_l.detach(), batch.labels).mean()
    if ref_w is not None:
        metrics["ref_w"], metrics["ref_l"] = ref_w.mean(), ref_l.mean()
        accuracy = implicit_reward_accuracy(model_w.detach(), model_l.detach(), ref_w, ref_l, batch.labels)
        metrics["reward_accuracy"] = accuracy.mean()
        metrics["reward_margin"] = dpo_logits(model_w.detach(), model_l.detach(), ref_w, ref_l, cfg.beta).mean()
    return StepOutput(loss, metrics)
