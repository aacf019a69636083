"""One Diffusion-DPO training step: the one piece of code the trainer, the benchmark and the memory planner all
run, with everything it needs built here once: the accelerator and its precision, the policy (the frozen UNet
with LoRA, as the trainer builds it, on real or fake weights), the optimizer, the batch structures (and random
batches of the right shapes), the recipe-to-loss mapping, and the micro-step with
accumulation, clipping and the NaN/Inf guard.

Shapes: B pairs; latents (B, C, h, w); the policy sees winners and losers stacked as 2B, with the same noise
and the same timestep for both images of a pair (Wallace et al. 2023, Sec. 4). How noise is added, what is
predicted and how the denoiser is called is the base's family's (`BaseModel.family`); this module names none.
"""

from __future__ import annotations

import logging
import math
import os
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor

from lora_dpo import guards, models
from lora_dpo.data import PreferenceBatch
from lora_dpo.models import BaseModel, adapters_disabled, encode_images, encode_prompts
from lora_dpo.objectives import OBJECTIVES, dpo_logits, error_accuracy, implicit_reward_accuracy, mapo_loss, sft_loss
from lora_dpo.recipe import LoraRecipe, ObjectiveRecipe, RecipeError, TrainRecipe
from lora_dpo.saved_casts import CompactSavedCasts, saves_upcasts
from lora_dpo.seeds import lora_init_seed

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# The accelerator and its precision


def resolve_precision(cfg: TrainRecipe) -> str:
    """The recipe's mixed precision, unless this device cannot run it: then an error naming the key, or, where
    the recipe opts in with `device_fallback`, the nearest precision it can run, said at start. accelerate
    autocasts bf16 on CPUs but runs no fp16 autocast or loss scaling there (it would silently train in fp32)."""
    if cfg.mixed_precision != "fp16" or torch.cuda.is_available():
        return cfg.mixed_precision
    if not cfg.device_fallback:
        raise RecipeError('[train].mixed_precision = "fp16": accelerate runs no fp16 autocast or loss scaling on '
                          'the CPU; use "bf16" (the CPU autocasts it) or "no", or set [train].device_fallback = '
                          'true to run bf16 here and fp16 on a GPU')
    log.warning('[train].mixed_precision = "fp16" cannot run on the CPU; running "bf16" instead '
                "([train].device_fallback = true)")
    return "bf16"


def launched_with_deepspeed() -> bool:
    """`accelerate launch` with a DeepSpeed config (what accelerate itself reads, before any Accelerator exists)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(mixed_precision: str, **kwargs: Any) -> Any:
    """An `accelerate.Accelerator` with this run's mixed precision. accelerate keeps one AcceleratorState per
    process and refuses a second Accelerator with another precision; a process that runs several trainings or
    benchmarks (a notebook, the tests) starts each from a clean state. The process group (PartialState) stays."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    AcceleratorState._reset_state(reset_partial_state=False)
    cpu = not torch.cuda.is_available()
    if cpu and launched_with_deepspeed():
        # Launched with a DeepSpeed config on a machine without CUDA (CI, a laptop): accelerate runs DeepSpeed
        # only with cpu=False. With cpu=True it silently drops DeepSpeed and runs DDP over gloo (the yaml's
        # `use_cpu` is ignored), so the DeepSpeed path would never be exercised; with cpu=False alone it picks
        # no process group that DeepSpeed's CPU accelerator can use and every rank believes it is alone. gloo
        # is the CPU's backend; DeepSpeed's CPU accelerator runs its collectives over it.
        cpu = False
        kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu, **kwargs)


def use_deterministic_kernels(on: bool) -> None:
    """[train].deterministic: torch's deterministic kernels (an op without one raises, naming itself), cuDNN's with
    no benchmarking (it may pick another algorithm each run), and what cuBLAS needs, read once, at its first use in the
    process. Off: torch's defaults (a process may train more than once)."""
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if on and workspace not in (None, ":4096:8", ":16:8"):
        raise RecipeError(f"[train].deterministic = true: CUBLAS_WORKSPACE_CONFIG={workspace} leaves cuBLAS "
                          "nondeterministic: unset it (lora-dpo sets :4096:8) or set :4096:8 or :16:8")
    if on and workspace is None and torch.cuda.is_initialized():
        raise RecipeError("[train].deterministic = true: this process used CUDA before CUBLAS_WORKSPACE_CONFIG could "
                          "be set (cuBLAS reads it once): set CUBLAS_WORKSPACE_CONFIG=:4096:8 before it starts, or "
                          "train in a new process")
    if on:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace or ":4096:8"
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on


# --------------------------------------------------------------------------------------------------
# The policy: the frozen UNet made trainable the one way the trainer does it


def build_policy(unet: Any, lora: LoraRecipe, seed: int, *, precision: str, quantize: str = "none",
                 device: torch.device | str | None = None, checkpointing: bool = False,
                 lora_fp32: bool = True, compile: bool = False) -> Any:
    """The frozen UNet as the policy: NF4 first, if asked (its matmuls in `precision`), on `device` (None: where it
    is, e.g. `meta` for the planner's fake weights), LoRA with its seeded init (fp32 adapters on any base;
    `lora_fp32=False` keeps the base's dtype, the planner's comparison), gradient checkpointing, and last (on the
    blocks as they train: LoRA in them) [train].compile's compiled blocks. Returns the peft LoraConfig;
    `models.lora_parameters(unet)` are what trains."""
    models.check_compiler(compile, torch.device(device or "cpu"))
    if quantize == "nf4":
        models.quantize_nf4(unet, models.DTYPES[precision], torch.device(device or "cpu"))
    if device is not None:
        unet.to(device)
    torch.manual_seed(lora_init_seed(seed))  # lora_A's random init is part of the run: same seed, same adapter
    if lora_fp32:
        config = models.add_lora(unet, lora)
    else:
        config = models.lora_config(lora, models.denoiser_family(unet.config))
        unet.add_adapter(config)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    if compile:
        models.compile_blocks(unet)
    return config


def make_optimizer(cfg: TrainRecipe, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """The recipe's optimizer, on every device: bitsandbytes' AdamW8bit steps CPU tensors too (0.50+)."""
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                  weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    # fused: one kernel for all the adapter tensors (hundreds of small ones) instead of a loop over them;
    # measured 15x faster on the CPU, where it was 6 % of the tiny model's step
    return torch.optim.AdamW(params, **kwargs, fused=True if device.type in ("cpu", "cuda") else None)


# --------------------------------------------------------------------------------------------------
# Batches


@dataclass
class EncodedBatch:
    """A preference batch in the denoiser's space. latents_* (B, C, h, w); prompt_embeds (B, S, D); pooled (B, P)
    where the family's denoiser reads one, else None; time_ids_* (B, 6), the geometry, where it reads that
    (`Family.uses_geometry`), else None; labels (B,)."""

    latents_w: Tensor
    latents_l: Tensor
    prompt_embeds: Tensor
    pooled: Tensor | None
    time_ids_w: Tensor | None
    time_ids_l: Tensor | None
    labels: Tensor

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> EncodedBatch:
        """On `device`; floating tensors (not labels) cast to `dtype` if given."""
        values = [None if t is None else t.to(device, dtype if dtype is not None and name != "labels" else t.dtype,
                                              non_blocking=True)
                  for name, t in vars(self).items()]
        return EncodedBatch(*values)

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
    pixels = torch.cat([batch.pixels_w, batch.pixels_l]).to(device)
    latents = encode_images(base.vae, pixels, base.family)  # (2B, C, h, w)
    latents_w, latents_l = latents.chunk(2)
    geometry = base.family.uses_geometry  # the data computes it for every base; only some denoisers read it
    return EncodedBatch(latents_w, latents_l, embeds, pooled,
                        batch.time_ids_w.to(device) if geometry else None,
                        batch.time_ids_l.to(device) if geometry else None, batch.labels.to(device))


def random_batch(unet_config: Mapping[str, Any], pairs: int, resolution: int, device: torch.device | str,
                 dtype: torch.dtype, generator: torch.Generator | None = None, latent_factor: int = 8,
                 tokens: int | None = None) -> EncodedBatch:
    """What `encode_batch` hands the step, of the denoiser's shapes (its family reads them from its config):
    latents (B, C, R/f, R/f) in float32, prompt embeddings (B, tokens, D) (None: the family's `prompt_tokens`:
    77 for CLIP, 333 SD3, 512 FLUX) and, where the family's denoiser reads them, pooled (B, P) in the encoders'
    dtype and time ids (B, 6). Random from `generator`; without one, uninitialised (the planner's fake tensors
    have shapes, not values)."""
    family = models.denoiser_family(unet_config)
    size = resolution // latent_factor
    tokens = family.prompt_tokens if tokens is None else tokens

    def tensor(*shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        if generator is None:
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.randn(shape, generator=generator).to(device, dtype)

    latents = (tensor(pairs, family.latent_channels(unet_config), size, size) for _ in range(2))
    embeds = tensor(pairs, tokens, family.text_width(unet_config), dtype=dtype)
    pooled = time_ids = None
    width = family.pooled_width(unet_config)
    if width is not None:
        pooled = tensor(pairs, width, dtype=dtype)
    if family.uses_geometry:
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * pairs,
                                dtype=torch.float32, device=device)
    return EncodedBatch(*latents, embeds, pooled, time_ids, time_ids, torch.ones(pairs, device=device))


# --------------------------------------------------------------------------------------------------
# The DPO step: noise, policy and reference errors, the objective


@dataclass
class StepOutput:
    """The mean loss (with graph) and detached per-step metrics, kept on device: reading them is a sync."""

    loss: Tensor
    metrics: dict[str, Tensor]


# accelerate's extract_model_from_parallel walks every module of the model (looking for torch.compile'd regions) at
# every call: 1.6 ms on the tiny UNet, 1 % of its CPU step. What a wrapper (DDP, DeepSpeed, torch.compile) holds
# never changes, so each wrapper is unwrapped once. Weak both ways: the entry neither keeps the wrapper alive nor,
# when the model is its own entry (not wrapped), itself.
_UNWRAPPED: weakref.WeakKeyDictionary[Any, weakref.ref[Any]] = weakref.WeakKeyDictionary()


def unwrap(unet: Any) -> Any:
    """`accelerate.utils.extract_model_from_parallel(unet)`, computed once per wrapper. A model no wrapper holds
    (one process, not compiled) is its own: accelerate would import DeepSpeed to look for its engine, ~2 s of the
    start of every run where DeepSpeed is installed."""
    if not hasattr(unet, "module") and not hasattr(unet, "_orig_mod"):
        return unet
    found = _UNWRAPPED.get(unet)
    inner = None if found is None else found()
    if inner is None:
        inner = extract_model_from_parallel(unet)
        _UNWRAPPED[unet] = weakref.ref(inner)
    return inner


def weights_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the denoiser's base weights: its first floating parameter's (a UNet's conv_in, never quantised;
    FLUX's first is a linear layer, whose NF4 weight is packed uint8 but whose bias is the base's dtype)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _stack(a: Tensor | None, b: Tensor | None, pair: bool) -> Tensor | None:
    if a is None:
        return None
    return torch.cat([a, b]) if pair else a


def _errors(unet: torch.nn.Module, base: BaseModel, batch: EncodedBatch, noise: Tensor, timesteps: Tensor,
            pair: bool, dtype: torch.dtype | None = None) -> Tensor:
    """Per-image mean squared denoising error over (C, h, w): shape (2B,) with the loser, else (B,). `dtype`: the
    denoiser's base weights' (`weights_dtype`); None: read here."""
    dtype = weights_dtype(unwrap(unet)) if dtype is None else dtype
    latents = _stack(batch.latents_w, batch.latents_l, pair)
    repeat = 2 if pair else 1
    noise, timesteps = noise.repeat(repeat, 1, 1, 1), timesteps.repeat(repeat)
    family, scheduler = base.family, base.noise_scheduler
    noisy = family.add_noise(scheduler, latents, noise, timesteps)  # x_t (B or 2B, C, h, w)
    target = family.target(scheduler, latents, noise, timesteps)
    embeds = batch.prompt_embeds.repeat(repeat, 1, 1)
    pooled = None if batch.pooled is None else batch.pooled.repeat(repeat, 1)
    time_ids = _stack(batch.time_ids_w, batch.time_ids_l, pair)
    if noisy.dtype != dtype and not torch.is_autocast_enabled(noisy.device.type):
        # DeepSpeed holds the whole UNet, LoRA included, in the run's precision (bf16) and accelerate autocasts
        # nothing under it: the fp32 latents and embeddings would meet bf16 weights. Elsewhere autocast (bf16,
        # fp16) or fp32 weights ("no") match them already and nothing is cast. time_ids stay fp32: a UNet that
        # reads them embeds them sinusoidally and casts the result itself, as under autocast.
        noisy, embeds = noisy.to(dtype), embeds.to(dtype)
        pooled = None if pooled is None else pooled.to(dtype)
    prediction = family.denoise(unet, noisy, timesteps, embeds, pooled, time_ids, scheduler)
    return (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


def sample_noise(base: BaseModel, latents: Tensor,
                 generator: torch.Generator | Sequence[torch.Generator]) -> tuple[Tensor, Tensor]:
    """Noise (B, C, h, w) like `latents` and timesteps (B,), drawn on the generator's device (no host sync).
    One generator draws the whole batch; a sequence of B generators draws pair b from generator b alone, so
    a pair's noise does not depend on which process or micro-batch it lands in (multi-GPU == one GPU)."""
    allowed = base.train_timesteps  # [model].timesteps: a distilled base's few steps; (): every timestep
    family, scheduler = base.family, base.noise_scheduler
    if isinstance(generator, torch.Generator):  # the noise first, then the timesteps, from each generator
        noise = torch.randn(latents.shape, generator=generator, device=generator.device)
        timesteps = family.sample_timesteps(scheduler, latents.shape[0], generator, allowed)
    else:
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g, device=g.device) for g in generator])
        timesteps = torch.cat([family.sample_timesteps(scheduler, 1, g, allowed) for g in generator])
    return noise.to(latents.device, latents.dtype), timesteps.to(latents.device)


def objective_loss(cfg: ObjectiveRecipe, model_w: Tensor, model_l: Tensor | None, ref_w: Tensor | None,
                   ref_l: Tensor | None, labels: Tensor | None, num_timesteps: int) -> Tensor:
    """The recipe's objective on per-pair errors (B,) -> per-pair loss (B,): the one place where [objective] keys
    become loss arguments (the losses themselves know no recipe). Errors the objective does not need are None."""
    objective = OBJECTIVES[cfg.kind]
    if objective.needs_reference:  # dpo, ipo, hinge: on the DPO logit, all read beta and label smoothing
        return objective.loss(model_w, model_l, ref_w, ref_l, cfg.beta, labels, cfg.label_smoothing)
    if cfg.kind == "mapo":
        return mapo_loss(model_w, model_l, cfg.mapo_beta, cfg.mapo_snr, num_timesteps, labels, cfg.label_smoothing)
    return sft_loss(model_w, labels, cfg.label_smoothing)


def dpo_step(unet: torch.nn.Module, base: BaseModel, batch: EncodedBatch, cfg: ObjectiveRecipe,
             generator: torch.Generator | Sequence[torch.Generator],
             forward_autocast: Callable[[], AbstractContextManager[Any]] = nullcontext) -> StepOutput:
    """Sample one noise and timestep per pair, run the reference with adapters off, in inference mode (only if
    the objective needs it), then the policy (on the other image only if the objective needs it), and return the
    objective's mean loss and metrics: `reward_accuracy` and `reward_margin` (the logit x) need the reference;
    `error_accuracy` (e_w < e_l, no reference) needs the other image. `unet` may be wrapped (DDP, DeepSpeed,
    torch.compile): both passes run through the wrapper, the adapters are switched on the model inside it.
    `forward_autocast`: the autocast the wrapper runs the UNet's forward under (accelerate's), if not on here."""
    objective = OBJECTIVES[cfg.kind]
    inner = unwrap(unet)
    dtype = weights_dtype(inner)
    noise, timesteps = sample_noise(base, batch.latents_w, generator)
    ref_w = ref_l = None
    if objective.needs_reference:
        # the reference first: its activations are freed before the policy's, kept for backward, exist (the other
        # order peaks with both alive). Its errors are (2B,) constants of the same noise and timesteps, and it
        # draws nothing at random (adapters off: no LoRA dropout), so the loss and gradients do not change
        with adapters_disabled(inner), torch.inference_mode():
            ref = _errors(unet, base, batch, noise, timesteps, True, dtype)
        ref_w, ref_l = ref.clone().chunk(2)  # (2B,) constants: cloned out of inference mode so autograd can read them
    # the saved-cast hooks only where the policy saves casts they can keep in fewer bytes; elsewhere they compact
    # nothing, and their Python calls for each saved tensor (~960 a tiny step) cost 7-14 % of its CPU step. Either
    # way the values autograd reads are the same
    with forward_autocast():
        compact = saves_upcasts(dtype, batch.latents_w.device)
    with CompactSavedCasts() if compact else nullcontext():
        model = _errors(unet, base, batch, noise, timesteps, objective.needs_loser, dtype)
    model_w, model_l = model.chunk(2) if objective.needs_loser else (model, None)
    num_timesteps = base.noise_scheduler.config.num_train_timesteps
    loss = objective_loss(cfg, model_w, model_l, ref_w, ref_l, batch.labels, num_timesteps).mean()
    metrics = {"loss": loss.detach(), "model_w": model_w.detach().mean()}
    if model_l is not None:
        metrics["model_l"] = model_l.detach().mean()
        metrics["error_accuracy"] = error_accuracy(model_w.detach(), model_l.detach(), batch.labels).mean()
    if ref_w is not None:
        metrics["ref_w"], metrics["ref_l"] = ref_w.mean(), ref_l.mean()
        accuracy = implicit_reward_accuracy(model_w.detach(), model_l.detach(), ref_w, ref_l, batch.labels)
        metrics["reward_accuracy"] = accuracy.mean()
        metrics["reward_margin"] = dpo_logits(model_w.detach(), model_l.detach(), ref_w, ref_l, cfg.beta).mean()
        # likelihood displacement (arXiv 2511.19049): pairs whose preferred image (w, or l where its label says
        # so; w for a tie) the policy now denoises worse than the reference does, though the margin may still grow
        chosen = batch.labels >= 0.5  # (B,)
        rose = torch.where(chosen, model_w.detach() > ref_w, model_l.detach() > ref_l)
        metrics["chosen_error_rose"] = rose.float().mean()
    return StepOutput(loss, metrics)


# --------------------------------------------------------------------------------------------------
# The micro-step as training runs it: backward, accumulation, clipping, the guard, the optimizer step


@dataclass
class TrainStep:
    """What one micro-step of training did. `finite` carries over to the next micro-step of the same optimizer
    step (every micro-batch's loss must be finite); the rest is decided on an accumulation boundary, in the one
    host sync of an optimizer step, agreed by every process."""

    output: StepOutput
    finite: Tensor | bool  # the loss of every micro-batch of this optimizer step so far was finite
    boundary: bool = False  # this micro-batch ended an optimizer step
    healthy: bool = True  # boundary: the loss and gradients were finite on every process (else the step is skipped)
    applied: bool = False  # boundary: the update reached the weights (not skipped for NaN/Inf or by fp16 scaling)
    stopping: bool = False  # boundary: some process was asked to stop (SIGINT/SIGTERM)


def _finite_norm(norm: Tensor | float | None, device: torch.device) -> Tensor:
    """accelerate's clip_grad_norm_ returns a tensor, or under DeepSpeed the engine's global norm as a float or
    None (not computed yet)."""
    if isinstance(norm, Tensor):
        return torch.isfinite(norm)
    return torch.tensor(norm is None or math.isfinite(norm), device=device)


def is_deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def train_step(accelerator: Any, unet: Any, base: BaseModel, batch: EncodedBatch, objective: ObjectiveRecipe,
               max_grad_norm: float, generator: torch.Generator | list[torch.Generator],
               optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], finite: Tensor | bool = True,
               stop_requested: bool = False) -> TrainStep:
    """One micro-step as training runs it, and as `lora-dpo bench` times it: the DPO step, backward, and on an
    accumulation boundary clipping, one host sync, and the optimizer step unless the loss or the gradient norm
    was NaN/Inf on some process: `applied` says whether the update reached the weights. Under fp16's loss scaler
    only the loss decides: the scaler skips a step with Inf gradients itself (its routine, not a bad step); a step
    with a NaN/Inf loss (its gradients may be finite) is not stepped, and the scale is lowered as the scaler would.
    DeepSpeed steps inside `backward` (its optimizer.step() does nothing) and skips a step with NaN/Inf gradients
    itself: its `step_was_skipped` says whether the update reached the weights, and its clip_grad_norm_ returns the
    pre-clip norm, inf for a skipped step (fp16 under DeepSpeed: its own loss scaler, untested here)."""
    with accelerator.accumulate(unet):
        out = dpo_step(unet, base, batch, objective, generator, accelerator.autocast)
        accelerator.backward(out.loss)
        finite = torch.isfinite(out.metrics["loss"]) & finite
        if not accelerator.sync_gradients:
            return TrainStep(out, finite)
        deepspeed = is_deepspeed(accelerator)
        # a loss scaler (torch's, or DeepSpeed's own for fp16) skips an overflowing step and lowers the scale: that
        # skip is its routine, not a bad step, so only the loss decides health; the norm reads inf for it
        scaled = accelerator.scaler is not None or (deepspeed and accelerator.mixed_precision == "fp16")
        norm = accelerator.clip_grad_norm_(params, max_grad_norm or math.inf)  # inf: only measure the norm
        healthy = finite if scaled else finite & _finite_norm(norm, out.loss.device)
        ok, stopping = guards.step_flags(accelerator, healthy, stop_requested)
        if ok:
            optimizer.step()
        elif accelerator.scaler is not None:  # the scale lowered as the scaler lowers it for a step it skips: x the
            scaler = accelerator.scaler       # backoff factor, its count of good steps towards growing it back to 0
            scaler.update(new_scale=scaler.get_scale() * scaler.get_backoff_factor())  # also clears unscale_'s state
            scaler.load_state_dict({**scaler.state_dict(), "_growth_tracker": 0})
        if deepspeed:  # the step happened in backward; only DeepSpeed knows if it was applied
            applied = not optimizer.step_was_skipped
            if applied and not ok:
                raise guards.TrainingError(
                    "DeepSpeed applied an optimizer step whose loss or gradients were NaN/Inf, so the adapter's "
                    "weights are lost: launch with recipes/accelerate/ddp.yaml, where lora-dpo skips such steps "
                    "itself. (DeepSpeed 0.19.8 skips those with NaN/Inf gradients in fp32 and bf16, unless its "
                    "config sets bf16.check_grad_overflow = false; its fp16 loss scaler applies one whose loss alone "
                    "is not finite)")
        else:
            applied = ok and not optimizer.step_was_skipped
        optimizer.zero_grad(set_to_none=True)
    return TrainStep(out, True, boundary=True, healthy=ok, applied=applied, stopping=stopping)
