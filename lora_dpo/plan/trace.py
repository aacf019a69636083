"""One training step traced on fake tensors: the UNet is built from its config with no storage (the meta device),
given LoRA as the trainer gives it (`step.build_policy`), fed fake tensors (torch's FakeTensorMode: shapes and
dtypes, no data) and run through `step.dpo_step` and `backward()` under a `StepProbe`: the function the trainer
runs, so the plan cannot drift from the code. Also the VAE encoding a batch, which an uncached step adds, and what
an `[online]` round's generation runs: the denoiser's inference pass and the VAE decoding its latents.

CUDA autocast runs GroupNorm and LayerNorm in fp32 where CPU autocast keeps bf16; `_cuda_autocast_norms` makes the
trace do what CUDA does. Every measure is cached here, once per process (`_UNETS`, `_STEPS`, `_ENCODES`,
`_INFERENCE`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils import _pytree as pytree

from lora_dpo import models, step
from lora_dpo.plan.bases import Architecture
from lora_dpo.plan.probe import StepProbe, aten
from lora_dpo.recipe import LoraRecipe, ObjectiveRecipe


@dataclass(frozen=True)
class StepKey:
    """What shapes one step's memory and compute. `lora_fp32` and `cuda_autocast` are the trainer's way (fp32
    adapters on a bf16 base; CUDA's autocast policy); turning them off reproduces simpler setups (anchors.md)."""

    resolution: int
    batch_size: int
    lora: LoraRecipe
    objective: ObjectiveRecipe
    precision: str
    checkpointing: bool
    lora_fp32: bool = True
    cuda_autocast: bool = True


@dataclass(frozen=True)
class StepMeasure:
    flops: dict[str, float]  # per phase
    peak: int  # bytes of live tensors at the step's peak: weights, batch, activations, gradients
    peak_phase: str
    phase_peaks: dict[str, int]
    resident: int  # bytes live before the step: the UNet's weights (base and LoRA) and the batch
    base_params: int
    base_bytes: int
    lora_numels: tuple[int, ...]  # every LoRA tensor's size: gradients and optimizer state
    linear_params: int  # the base's nn.Linear weights: what a 4-bit base quantises
    largest_linear: int


_UNETS: dict[tuple, tuple[Any, Any, int, int]] = {}
_STEPS: dict[tuple, StepMeasure] = {}


@contextlib.contextmanager
def _cuda_autocast_norms() -> Iterator[None]:
    """While CPU autocast is on, run group_norm and layer_norm in fp32, as CUDA autocast does (they are on its
    fp32 list, not on the CPU's): their saved inputs and outputs are then fp32, as on the GPU."""
    def fp32(op: Any) -> Callable[..., Any]:
        def kernel(*args: Any, **kwargs: Any) -> Any:
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)):
                args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.float() if t.is_floating_point() else t,
                                                    (args, kwargs))
                return op(*args, **kwargs)

        return kernel

    library = torch.library.Library("aten", "IMPL")
    try:
        library.impl("group_norm", fp32(aten.group_norm.default), "AutocastCPU")
        library.impl("layer_norm", fp32(aten.layer_norm.default), "AutocastCPU")
        yield
    finally:
        library._destroy()


def _fake_unet(arch: Architecture, key: StepKey) -> tuple[Any, Any, int, int]:
    """(fake mode, UNet with LoRA as the trainer builds it, base Linear parameters, largest Linear), cached."""
    cache_key = (arch.name, key.precision, key.lora, key.lora_fp32)
    if cache_key not in _UNETS:
        from torch._subclasses.fake_tensor import FakeTensorMode

        unet = models.unet_from_config(arch.unet, models.DTYPES[key.precision], "meta")
        linears = [m.weight.numel() for m in unet.modules() if type(m) is torch.nn.Linear]
        step.build_policy(unet, key.lora, seed=0, precision=key.precision, lora_fp32=key.lora_fp32)
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode:  # the meta tensors become fake CPU tensors: autocast applies to them
            unet._apply(lambda t: torch.empty(t.shape, dtype=t.dtype))
        _UNETS[cache_key] = (mode, unet, sum(linears), max(linears))
    return _UNETS[cache_key]


def step_batch(arch: Architecture, key: StepKey, device: torch.device | str = "cpu",
               generator: torch.Generator | None = None) -> step.EncodedBatch:
    """An EncodedBatch as `encode_batch` makes it: fp32 latents, prompt embeddings in the encoders' dtype; random
    from `generator`, or without one uninitialised (under FakeTensorMode: shapes only)."""
    return step.random_batch(arch.unet, key.batch_size, key.resolution, device, models.DTYPES[key.precision],
                             generator, arch.latent_factor, arch.max_length)


def _autocast(key: StepKey) -> contextlib.AbstractContextManager:
    """The trainer's precision: accelerate runs the UNet under CUDA autocast with bf16/fp16; `no` is plain fp32."""
    if key.precision == "no":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    if key.cuda_autocast:
        stack.enter_context(_cuda_autocast_norms())
    stack.enter_context(torch.autocast("cpu", dtype=models.DTYPES[key.precision]))
    return stack


def _uncached() -> contextlib.AbstractContextManager:
    """FakeTensorMode's dispatch cache costs more than it saves on one pass of a UNet (measured: 7.4 s instead of
    8.2-9.2 s of CPU for an SDXL step)."""
    import torch._dynamo.config

    return torch._dynamo.config.patch(fake_tensor_cache_enabled=False)


def measure_step(arch: Architecture, key: StepKey) -> StepMeasure:
    """One training step (policy, reference, loss, backward) on fake tensors; cached per architecture and key."""
    cache_key = (arch.name, key)
    if cache_key in _STEPS:
        return _STEPS[cache_key]
    mode, unet, linear_params, largest_linear = _fake_unet(arch, key)
    if key.checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    scheduler = arch.family.training_scheduler(arch.scheduler, {})
    base = models.BaseModel(source=arch.name, unet=unet, noise_scheduler=scheduler, family=arch.family)
    lora = [p for p in unet.parameters() if p.requires_grad]
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    with mode:
        batch = step_batch(arch, key)
        probe = StepProbe()
        for tensor in (*unet.parameters(), *unet.buffers(), *(t for t in vars(batch).values() if t is not None)):
            probe.track(tensor)
        resident = probe.live
        try:
            with probe, _autocast(key), _uncached():
                out = step.dpo_step(unet, base, batch, key.objective, torch.Generator().manual_seed(0))
                out.loss.backward()
        finally:
            for param in lora:
                param.grad = None
    measure = StepMeasure(
        flops=dict(probe.flops), peak=probe.peak, peak_phase=probe.peak_phase, phase_peaks=dict(probe.phase_peaks),
        resident=resident, base_params=sum(p.numel() for p in frozen),
        base_bytes=sum(p.numel() * p.element_size() for p in frozen), lora_numels=tuple(p.numel() for p in lora),
        linear_params=linear_params, largest_linear=largest_linear)
    _STEPS[cache_key] = measure
    return measure


@dataclass(frozen=True)
class EncodeMeasure:
    flops: float
    weights: int  # the VAE's bytes
    transient: int  # bytes live above the weights at the encoder's peak (pixels included)


_ENCODES: dict[tuple, EncodeMeasure] = {}


def _fake_vae(arch: Architecture, vae_dtype: str, phase: str) -> tuple[Any, Any, StepProbe, int]:
    """The family's VAE (its class) frozen in `vae_dtype`, built on the meta device and given fake weights: (the
    `FakeTensorMode` to trace in, the VAE, a probe of `phase` tracking its weights, their bytes)."""
    import diffusers
    from torch._subclasses.fake_tensor import FakeTensorMode

    with torch.device("meta"):
        vae = getattr(diffusers, arch.family.vae_class).from_config(arch.vae)
    vae = vae.to(models.DTYPES[vae_dtype]).requires_grad_(False).eval()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        vae._apply(lambda t: torch.empty(t.shape, dtype=t.dtype))
        probe = StepProbe(phase=phase)
        for param in vae.parameters():
            probe.track(param)
    return mode, vae, probe, probe.live


def measure_encode(arch: Architecture, resolution: int, batch_size: int, vae_dtype: str) -> EncodeMeasure:
    """`models.encode_images` of a batch's 2B images on fake tensors: what an uncached step adds (the family's VAE
    class and latent scaling)."""
    cache_key = (arch.name, resolution, batch_size, vae_dtype)
    if cache_key not in _ENCODES:
        mode, vae, probe, weights = _fake_vae(arch, vae_dtype, "encode")
        with mode:
            pixels = torch.empty(2 * batch_size, 3, resolution, resolution)
            probe.track(pixels)
            with probe, _uncached():
                models.encode_images(vae, pixels, arch.family)
        _ENCODES[cache_key] = EncodeMeasure(sum(probe.flops.values()), weights, probe.peak - weights)
    return _ENCODES[cache_key]


# --------------------------------------------------------------------------------------------------
# Generation (an `[online]` run's rounds): the denoiser's inference forward and the VAE decoding its latents


@dataclass(frozen=True)
class InferenceMeasure:
    flops: float  # the whole pass, for the batch it was traced at
    weights: int  # bytes of the module's weights (the denoiser: base and LoRA; the VAE: its own)
    transient: int  # bytes live above the weights at the pass's peak (inputs included)


_INFERENCE: dict[tuple, InferenceMeasure] = {}


def measure_denoise(arch: Architecture, key: StepKey, images: int) -> InferenceMeasure:
    """One inference step of the pipeline on `images` latents (the batch it doubles for classifier-free guidance
    is the caller's to pass): the denoiser with the trainer's LoRA, in eval and inference mode (no graph, no
    reference pass, no backward), at `key.resolution`, on fake tensors; cached."""
    cache_key = ("denoise", arch.name, key.resolution, key.precision, key.lora, key.lora_fp32, images)
    if cache_key not in _INFERENCE:
        mode, unet, _, _ = _fake_unet(arch, key)
        unet.eval()
        scheduler = arch.family.training_scheduler(arch.scheduler, {})
        with mode:
            batch = step_batch(arch, replace(key, batch_size=images))
            probe = StepProbe(phase="generate")
            for tensor in (*unet.parameters(), *unet.buffers()):
                probe.track(tensor)
            weights = probe.live
            inputs = [t for t in (batch.latents_w, batch.prompt_embeds, batch.pooled, batch.time_ids_w)
                      if t is not None]
            for tensor in inputs:
                probe.track(tensor)
            timesteps = arch.family.sample_timesteps(scheduler, images, torch.Generator().manual_seed(0))
            with probe, _autocast(key), _uncached(), torch.inference_mode():
                arch.family.denoise(unet, batch.latents_w, timesteps, batch.prompt_embeds, batch.pooled,
                                    batch.time_ids_w)
        unet.train()
        _INFERENCE[cache_key] = InferenceMeasure(sum(probe.flops.values()), weights, probe.peak - weights)
    return _INFERENCE[cache_key]


def measure_decode(arch: Architecture, resolution: int, images: int, vae_dtype: str) -> InferenceMeasure:
    """The VAE (the family's class) decoding `images` latents at once on fake tensors (the online trainer decodes
    one image a call: `online.generate`); cached."""
    cache_key = ("decode", arch.name, resolution, images, vae_dtype)
    if cache_key not in _INFERENCE:
        size = resolution // arch.latent_factor
        mode, vae, probe, weights = _fake_vae(arch, vae_dtype, "decode")
        with mode:
            latents = torch.empty(images, arch.vae["latent_channels"], size, size, dtype=models.DTYPES[vae_dtype])
            probe.track(latents)
            with probe, _uncached(), torch.no_grad():
                vae.decode(latents)
        _INFERENCE[cache_key] = InferenceMeasure(sum(probe.flops.values()), weights, probe.peak - weights)
    return _INFERENCE[cache_key]
