"""`lora-dpo plan`: the memory and time of one training step, predicted in seconds, on any machine.

No weights, no GPU, no download. The UNet is built from its config with no storage (the meta device), given
fake tensors (torch's FakeTensorMode: shapes and dtypes, no data) and run through `step.dpo_step` and
`backward()`: the function the trainer runs, so the plan cannot drift from the code. A dispatch mode
(`StepProbe`) sees every ATen op of that step: it adds up its FLOPs with torch.utils.flop_counter's formulas and
the bytes of every live tensor storage (released when the storage is), per phase (policy forward, reference
forward, backward). One pass measures both: the probe holds only numbers, so counting cannot inflate memory.

Computed from the real parameter shapes, not measured: optimizer state (AdamW 8 bytes per LoRA parameter,
bitsandbytes 8-bit ~2), a 4-bit base (the base's Linear weights at NF4's ~0.52 bytes), the text encoders' weights
and FLOPs (2 x parameters x tokens). Modelled, because this trace runs on the CPU: CUDA autocast runs GroupNorm
and LayerNorm in fp32 where CPU autocast keeps bf16 (`_cuda_autocast_norms` makes the trace do what CUDA does),
and the CUDA context and allocator fragmentation (`required`, a stated allowance).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from lora_dpo import models, step
from lora_dpo.errors import LoraDpoError
from lora_dpo.recipe import LoraRecipe, ModelRecipe, ObjectiveRecipe, Recipe

GiB = 2**30
aten = torch.ops.aten


class PlanError(LoraDpoError, ValueError):
    """Bad input to the planner (an unknown GPU name); the message names it and the valid choices."""


# --------------------------------------------------------------------------------------------------
# GPUs: memory and dense bf16 tensor-core peak (FP32 accumulate). Consumer rates: SMs x boost clock x 512
# FLOP per SM per clock, the rate that gives NVIDIA's own 165 TFLOP/s (RTX 4090) and 71 (RTX 3090).


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    tflops: float
    card: str
    aliases: tuple[str, ...] = ()


GPUS = (
    Gpu("8GB", 8, 30.2, "RTX 4060 8GB class"),
    Gpu("12GB", 12, 25.5, "RTX 3060 12GB class"),
    Gpu("16GB", 16, 44.1, "RTX 4060 Ti 16GB class"),
    Gpu("24GB", 24, 165.2, "RTX 4090 class"),
    Gpu("rtx3090", 24, 71.0, "RTX 3090 24GB", ("3090",)),
    Gpu("rtx4090", 24, 165.2, "RTX 4090 24GB", ("4090",)),
    Gpu("a100-40gb", 40, 312.0, "A100 40GB", ("a100",)),
    Gpu("a100-80gb", 80, 312.0, "A100 80GB"),
    Gpu("h100", 80, 989.4, "H100 SXM 80GB", ("h10080gb",)),
)
_CLASSES = [gpu for gpu in GPUS if gpu.name.endswith("GB")]


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find_gpu(name: str) -> Gpu:
    """A GPU of the table by name (case and punctuation ignored), or any size like `10GB`: that memory, at the
    rate of the consumer class nearest in memory."""
    key = _norm(name)
    for gpu in GPUS:
        if key in (_norm(gpu.name), *gpu.aliases):
            return gpu
    size = re.fullmatch(r"(\d+(?:\.\d+)?)(gb|gib|g)", key)
    if size and float(size[1]) > 0:
        memory = float(size[1])
        rate = min(_CLASSES, key=lambda gpu: (abs(gpu.memory_gib - memory), gpu.memory_gib))
        return Gpu(f"{memory:g}GB", memory, rate.tflops, f"any, at {rate.name} rate")
    raise PlanError(f"--gpu {name!r}: unknown GPU; known: {', '.join(g.name for g in GPUS)}, or a size like 10GB")


def parse_list(option: str, text: str) -> list[int]:
    """`8,64` -> [8, 64], for the table options."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise PlanError(f"{option} {text!r}: expected whole numbers separated by commas, e.g. 8,64") from None
    if min(values) < 1:
        raise PlanError(f"{option} {text!r}: values must be >= 1")
    return values


# The allowance on top of the tensors: the CUDA context with cuBLAS/cuDNN workspaces (~0.5-1 GiB) and the caching
# allocator's fragmentation (reserved over allocated, 5-15 %). Not yet calibrated on a GPU: `plan --measure` does.
CONTEXT_GIB = 0.75
FRAGMENTATION = 0.10


def required(peak: float) -> float:
    """Bytes a card needs for a step whose live tensors peak at `peak`."""
    return peak * (1 + FRAGMENTATION) + CONTEXT_GIB * GiB


# --------------------------------------------------------------------------------------------------
# The architecture of the recipe's base, from configs only


KNOWN_BASES = {
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "CompVis/stable-diffusion-v1-4": "sd15",
}


@dataclass(frozen=True)
class Architecture:
    """What the plan needs of a base: UNet, VAE and scheduler configs, and the text encoders' sizes."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    encoder_params: tuple[int, ...]
    max_length: int = 77

    @property
    def is_sdxl(self) -> bool:
        return models.is_sdxl_unet(self.unet)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)


def architecture(model: ModelRecipe) -> Architecture:
    """`tiny` / `tiny-sd15`, a known hub id (shipped configs), or a local folder / hub id whose configs are read
    (KBs only)."""
    if model.base in models.TINY_BASES:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        arch = models.TINY_BASES[model.base]
        config = CLIPTextConfig(**models.tiny_text_config())
        encoders = (CLIPTextModel, CLIPTextModelWithProjection) if arch == "sdxl" else (CLIPTextModel,)
        params = tuple(_count_params(lambda cls=cls: cls(config)) for cls in encoders)
        return Architecture(model.base, models.tiny_unet_config(arch), dict(models.TINY_VAE),
                            dict(models.TINY_SCHEDULER), params)
    if model.base in KNOWN_BASES:
        arch = KNOWN_BASES[model.base]
        text = models.shipped_config(arch, "text")
        return Architecture(arch, models.shipped_config(arch, "unet"), models.shipped_config(arch, "vae"),
                            models.shipped_config(arch, "scheduler"), tuple(text["encoder_params"]), text["max_length"])
    return _read_architecture(model)


def _count_params(build: Callable[[], torch.nn.Module]) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def _read_architecture(model: ModelRecipe) -> Architecture:
    def read(source: str, part: str, needed: bool = True) -> dict[str, Any] | None:
        try:
            if Path(source).exists():
                return json.loads((Path(source) / part).read_text())
            from huggingface_hub import hf_hub_download

            return json.loads(Path(hf_hub_download(source, part, revision=model.revision)).read_text())
        except Exception as err:
            if not needed:
                return None
            known = ", ".join([*models.TINY_BASES, *KNOWN_BASES])
            raise models.ModelError(
                f"[model].base = {source!r}: cannot read {part} ({type(err).__name__}); the plan needs a local "
                f"diffusers folder, a reachable hub id, or one it knows: {known}") from None

    import transformers

    unet = read(model.base, "unet/config.json")
    vae = read(model.vae, "config.json") if model.vae else read(model.base, "vae/config.json")
    encoders = [read(model.base, f"{name}/config.json", needed=False) for name in ("text_encoder", "text_encoder_2")]
    params = tuple(
        _count_params(lambda c=c: getattr(transformers, c["architectures"][0])(transformers.AutoConfig.for_model(**c)))
        for c in encoders if c)
    return Architecture(model.base, unet, vae, read(model.base, "scheduler/scheduler_config.json"), params)


# --------------------------------------------------------------------------------------------------
# The probe: FLOPs and live tensor bytes of every op, per phase


def cpu_attention_flops() -> dict[Any, Callable[..., int]]:
    """CPU attention runs the CPU flash kernel, which flop_counter has no formula for: it does the same matmuls
    as the CUDA kernels, so it gets their formulas. Also for FlopCounterMode(custom_mapping=...)."""
    from torch.utils.flop_counter import flop_registry

    flash = "_scaled_dot_product_flash_attention"
    like = {getattr(aten, f"{flash}_for_cpu"): getattr(aten, flash),
            getattr(aten, f"{flash}_for_cpu_backward"): getattr(aten, f"{flash}_backward")}
    return {op: flop_registry[kernel].__wrapped__ for op, kernel in like.items()}  # the formulas on shapes


def _flop_formulas() -> dict[Any, Callable[..., int]]:
    from torch.utils.flop_counter import flop_registry, shape_wrapper

    return {**flop_registry, **{op: shape_wrapper(f) for op, f in cpu_attention_flops().items()}}


class StepProbe(TorchDispatchMode):
    """Adds up FLOPs and keeps the bytes of every live tensor storage, per phase. Phases: `backward` while the
    autograd engine runs a node (checkpoint recomputation included), `reference forward` without autograd (the
    reference runs under no_grad), else `policy forward`; or one fixed `phase` for the whole pass."""

    def __init__(self, phase: str | None = None) -> None:
        super().__init__()
        self.fixed_phase = phase
        self.formulas = _flop_formulas()
        self.live = 0
        self.peak = 0
        self.peak_phase = ""
        self.flops: Counter[str] = Counter()
        self.phase_peaks: Counter[str] = Counter()
        self._sizes: dict[int, int] = {}

    def track(self, tensor: torch.Tensor) -> None:
        """Count a storage once, until it is freed (storages keep one Python object while they live)."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key not in self._sizes:
            self._sizes[key] = size = storage.nbytes()
            self.live += size
            weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def phase(self) -> str:
        if self.fixed_phase:
            return self.fixed_phase
        if torch._C._current_autograd_node() is not None:
            return "backward"
        return "policy forward" if torch.is_grad_enabled() else "reference forward"

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func.overloadpacket not in self.formulas and func is not torch.ops.prim.device.default:
            with self:  # composite ops (aten.linear under inference mode): count what they decompose into
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        if func is torch.ops.prim.device.default:
            return out
        phase = self.phase()
        formula = self.formulas.get(func.overloadpacket)
        if formula is not None:
            self.flops[phase] += formula(*args, **kwargs, out_val=out)
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        self.phase_peaks[phase] = max(self.phase_peaks[phase], self.live)
        if self.live > self.peak:
            self.peak, self.peak_phase = self.live, phase
        return out


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


# --------------------------------------------------------------------------------------------------
# Measuring one step on fake tensors


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


def _batch(arch: Architecture, key: StepKey, device: torch.device | str = "cpu",
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
    from diffusers import DDPMScheduler

    cache_key = (arch.name, key)
    if cache_key in _STEPS:
        return _STEPS[cache_key]
    mode, unet, linear_params, largest_linear = _fake_unet(arch, key)
    if key.checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    base = models.BaseModel(source=arch.name, unet=unet, noise_scheduler=DDPMScheduler.from_config(arch.scheduler),
                            is_sdxl=arch.is_sdxl)
    lora = [p for p in unet.parameters() if p.requires_grad]
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    with mode:
        batch = _batch(arch, key)
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


def measure_encode(arch: Architecture, resolution: int, batch_size: int, vae_dtype: str) -> EncodeMeasure:
    """`models.encode_images` of a batch's 2B images on fake tensors: what an uncached step adds."""
    from diffusers import AutoencoderKL
    from torch._subclasses.fake_tensor import FakeTensorMode

    cache_key = (arch.name, resolution, batch_size, vae_dtype)
    if cache_key not in _ENCODES:
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(arch.vae)
        vae = vae.to(models.DTYPES[vae_dtype]).requires_grad_(False).eval()
        with FakeTensorMode(allow_non_fake_inputs=True):
            vae._apply(lambda t: torch.empty(t.shape, dtype=t.dtype))
            probe = StepProbe(phase="encode")
            for param in vae.parameters():
                probe.track(param)
            weights = probe.live
            pixels = torch.empty(2 * batch_size, 3, resolution, resolution)
            probe.track(pixels)
            with probe, _uncached():
                models.encode_images(vae, pixels)
        _ENCODES[cache_key] = EncodeMeasure(sum(probe.flops.values()), weights, probe.peak - weights)
    return _ENCODES[cache_key]


# --------------------------------------------------------------------------------------------------
# From measurements to a plan


@dataclass(frozen=True)
class Setting:
    """A recipe's choices that the plan varies: the step's key plus what is computed around it."""

    key: StepKey
    optimizer: str
    accumulation: int
    vae_dtype: str
    cached: bool = False  # latents and prompt embeddings precomputed: no VAE or text encoders on the GPU
    base_4bit: bool = False  # the base's Linear weights in 4-bit NF4 (QLoRA)

    @classmethod
    def from_recipe(cls, recipe: Recipe, checkpointing: bool) -> Setting:
        train = recipe.train
        key = StepKey(recipe.data.resolution, train.batch_size, recipe.lora, recipe.objective, train.mixed_precision,
                      checkpointing)
        return cls(key, train.optimizer, train.gradient_accumulation, recipe.model.vae_dtype,
                   cached=recipe.data.cache is not None)

    def with_key(self, **changes: Any) -> Setting:
        return replace(self, key=replace(self.key, **changes))


def optimizer_bytes(numels: tuple[int, ...], optimizer: str) -> int:
    """AdamW's two moments per LoRA parameter: fp32 (8 bytes); bitsandbytes 8-bit: 1 byte each plus an fp32
    absmax per 256-block, and tensors under 4096 elements keep fp32 state (bitsandbytes' min_8bit_size)."""
    if optimizer == "adamw":
        return 8 * sum(numels)
    return sum(8 * n if n < 4096 else 2 * n + 8 * math.ceil(n / 256) for n in numels)


NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits, an 8-bit absmax per 64-block, an fp32 one per 256 of those


@dataclass(frozen=True)
class Estimate:
    """Memory (bytes) and compute (FLOPs) of one training step of a setting; the memory terms add up to `peak`."""

    setting: Setting
    step: StepMeasure
    optimizer_state: int
    grads_carried: int  # gradients kept across the micro-steps of an accumulation
    encoder_weights: int  # VAE and text encoders, resident when the data is not cached
    encode_excess: int  # how far encoding a batch rises above the step's own peak
    quantized_saving: int
    flops: dict[str, float]  # per phase, plus the encoders when the data is not cached

    @property
    def peak(self) -> int:
        return (self.step.peak + self.encode_excess + self.optimizer_state + self.grads_carried
                + self.encoder_weights - self.quantized_saving)

    @property
    def peak_phase(self) -> str:
        return "VAE encode" if self.encode_excess else self.step.peak_phase

    @property
    def required(self) -> float:
        return required(self.peak)

    @property
    def unet_flops(self) -> float:
        return sum(self.step.flops.values())

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())


def estimate(arch: Architecture, setting: Setting) -> Estimate:
    key = setting.key
    measure = measure_step(arch, key)
    optimizer_state = optimizer_bytes(measure.lora_numels, setting.optimizer)
    grads_carried = 4 * sum(measure.lora_numels) if setting.accumulation > 1 else 0  # fp32
    quantized_saving = 0
    if setting.base_4bit:  # Linear weights stored in NF4; one layer at a time is dequantised for its matmul
        size = models.DTYPES[key.precision].itemsize
        quantized_saving = int(measure.linear_params * (size - NF4_BYTES) - measure.largest_linear * size)
    flops = dict(measure.flops)
    encoder_weights = encode_excess = 0
    if not setting.cached:  # the trainer encodes every batch: VAE and text encoders stay on the GPU
        encode = measure_encode(arch, key.resolution, key.batch_size, setting.vae_dtype)
        text_params = sum(arch.encoder_params)
        encoder_weights = encode.weights + text_params * models.DTYPES[key.precision].itemsize
        encode_excess = max(0, measure.resident + encode.transient - measure.peak)  # encoding precedes the step
        flops["VAE encode"] = encode.flops
        flops["text encoders"] = 2.0 * text_params * arch.max_length * key.batch_size
    return Estimate(setting, measure, optimizer_state, grads_carried, encoder_weights, encode_excess,
                    quantized_saving, flops)


@dataclass(frozen=True)
class Change:
    what: str
    cost: str
    estimate: Estimate


LOWER_RESOLUTIONS = (768, 512, 384, 256)  # the last resort, tried in turn


def _changes(setting: Setting, recompute: float) -> Iterator[tuple[str, str, Setting]]:
    """What to change when a step does not fit, cheapest first; each applied on top of the ones before."""
    key = setting.key
    if not key.checkpointing:
        setting = setting.with_key(checkpointing=True)
        yield ("gradient checkpointing on", f"+{recompute:.0%} compute per step", setting)
    if not setting.cached:
        setting = replace(setting, cached=True)
        yield "cache latents and prompt embeddings", "one encoding pass over the data, before training", setting
    if key.lora.rank > 8:
        setting = setting.with_key(lora=replace(key.lora, rank=8, alpha=key.lora.alpha * 8 / key.lora.rank))
        yield f"LoRA rank {key.lora.rank} -> 8", "a smaller adapter", setting
    if setting.optimizer == "adamw":
        setting = replace(setting, optimizer="adamw8bit")
        yield "8-bit AdamW (train.optimizer = \"adamw8bit\")", "none measurable", setting
    if not setting.base_4bit:
        setting = replace(setting, base_4bit=True)
        yield "4-bit NF4 base (QLoRA)", "slower matmuls (weights dequantised on the fly)", setting
    for resolution in (r for r in LOWER_RESOLUTIONS if r < key.resolution):
        setting = setting.with_key(resolution=resolution)
        yield f"resolution {key.resolution} -> {resolution} px", "images below the base's native size", setting


@dataclass
class Plan:
    recipe: Recipe
    arch: Architecture
    off: Estimate  # the recipe with checkpointing off
    on: Estimate  # and on
    seconds: float

    @property
    def pairs(self) -> int:
        """Pairs the whole run trains on (one process)."""
        train = self.recipe.train
        return train.max_steps * train.gradient_accumulation * train.batch_size

    @property
    def recompute(self) -> float:
        """Checkpointing's extra UNet compute, as a fraction."""
        return self.on.unet_flops / self.off.unet_flops - 1

    def choice(self, memory_gib: float) -> Estimate:
        """Checkpointing as the recipe sets it; `auto`: off when that fits the card, else on."""
        value = self.recipe.train.gradient_checkpointing
        if value == "auto":
            return self.off if self.off.required <= memory_gib * GiB else self.on
        return self.on if value else self.off

    def ladder(self, memory_gib: float) -> list[Change]:
        """Changes, cheapest first, each on top of the ones before, until the step fits `memory_gib`."""
        changes: list[Change] = []
        for what, cost, setting in _changes(self.choice(memory_gib).setting, self.recompute):
            changes.append(Change(what, cost, estimate(self.arch, setting)))
            if changes[-1].estimate.required <= memory_gib * GiB:
                break
        return changes


def make_plan(recipe: Recipe) -> Plan:
    started = time.perf_counter()
    arch = architecture(recipe.model)
    off, on = (estimate(arch, Setting.from_recipe(recipe, checkpointing)) for checkpointing in (False, True))
    return Plan(recipe, arch, off, on, time.perf_counter() - started)


def seconds_per_pair(flops_per_step: float, batch_size: int, gpu: Gpu, utilisation: float = 1.0) -> float:
    return flops_per_step / batch_size / (gpu.tflops * 1e12 * utilisation)


# --------------------------------------------------------------------------------------------------
# Automatic gradient checkpointing


def resolve_checkpointing(recipe: Recipe, free_bytes: int | None) -> tuple[bool, str]:
    """The trainer's gradient checkpointing and why. `auto`: on only when the plan's step (checkpointing off) with
    its fragmentation allowance exceeds the device's free memory (the CUDA context is already out of it);
    off on CPU (`free_bytes` None), where memory is the host's and checkpointing would only cost compute."""
    value = recipe.train.gradient_checkpointing
    if value != "auto":
        return bool(value), "set in the recipe"
    if free_bytes is None:
        return False, "auto: off on CPU (host memory; checkpointing would only cost ~24 % more compute)"
    off = estimate(architecture(recipe.model), Setting.from_recipe(recipe, checkpointing=False))
    need = off.peak * (1 + FRAGMENTATION)
    verdict = "fits" if need <= free_bytes else "does not fit"
    why = (f"auto: the plan's step without it needs {need / GiB:.1f} GiB ({off.peak / GiB:.1f} GiB of tensors + "
           f"{FRAGMENTATION:.0%}), which {verdict} in the {free_bytes / GiB:.1f} GiB free")
    return need > free_bytes, why


# --------------------------------------------------------------------------------------------------
# Rendering


def _size(n: float, unit: int) -> str:
    return f"{n / unit:.2f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds < 1 else f"{seconds * 1e3:,.0f}"


def render(plan: Plan, gpus: list[Gpu]) -> str:
    """The plan as text: memory and compute with checkpointing off and on, the GPUs, what to change."""
    recipe, arch, off, on = plan.recipe, plan.arch, plan.off, plan.on
    key, m = off.setting.key, off.step
    unit, unit_name = (GiB, "GiB") if off.peak >= GiB else (2**20, "MiB")
    flop, flop_name = (1e12, "TFLOP") if off.total_flops >= 1e12 else (1e9, "GFLOP")
    lora_params = sum(m.lora_numels)
    dtype = str(models.DTYPES[key.precision]).removeprefix("torch.")
    optimizer = off.setting.optimizer
    lines = [
        f"{arch.name} ({recipe.model.base}): {key.batch_size} pair(s) per step at {key.resolution} px, LoRA rank "
        f"{key.lora.rank} on {', '.join(key.lora.target_modules)} ({lora_params / 1e6:.2f} M parameters)",
        f"objective {key.objective.kind}, precision {key.precision}, {optimizer}, accumulation "
        f"{off.setting.accumulation}, gradient checkpointing {json.dumps(recipe.train.gradient_checkpointing)}; "
        + ("data cached" if off.setting.cached else "data encoded every step (VAE and text encoders on the GPU)"),
        "",
        f"{'memory (' + unit_name + ')':<52}{'ckpt off':>9}{'ckpt on':>9}",
    ]

    def row(label: str, a: float, b: float, fmt: Callable[[float], str]) -> None:
        if a or b:
            lines.append(f"  {label:<50}{fmt(a):>9}{fmt(b):>9}")

    def size(n: float) -> str:
        return _size(n, unit)

    lora_bytes = 4 * lora_params
    row(f"UNet weights, {dtype} ({m.base_params / 1e6:,.1f} M parameters)", m.base_bytes, m.base_bytes, size)
    row("LoRA weights, fp32", lora_bytes, lora_bytes, size)
    row(f"optimizer state, {optimizer} (AdamW 32-bit: {size(optimizer_bytes(m.lora_numels, 'adamw'))})",
        off.optimizer_state, on.optimizer_state, size)
    row("gradients kept across accumulation, fp32", off.grads_carried, on.grads_carried, size)
    row("activations, gradients, batch at the step's peak", off.step.peak - m.base_bytes - lora_bytes,
        on.step.peak - m.base_bytes - lora_bytes, size)
    row("VAE and text encoder weights (no cache)", off.encoder_weights, on.encoder_weights, size)
    row("VAE encoding a batch, above the step's peak", off.encode_excess, on.encode_excess, size)
    row("peak", off.peak, on.peak, size)
    lines.append(f"  {'  reached in':<50}{off.peak_phase:>18} / {on.peak_phase}")
    row(f"a card needs: peak x {1 + FRAGMENTATION:.2f} + {CONTEXT_GIB} GiB CUDA context", off.required,
        on.required, size)
    lines += ["", f"{'compute (' + flop_name + ' per step)':<52}{'ckpt off':>9}{'ckpt on':>9}"]

    def flops(n: float) -> str:
        return f"{n / flop:.2f}"

    for phase, label in (("policy forward", f"policy forward ({2 * key.batch_size} images)"),
                         ("reference forward", f"reference forward ({2 * key.batch_size} images, adapters off)"),
                         ("backward", "backward (and recompute, with checkpointing)")):
        row(label, off.flops.get(phase, 0), on.flops.get(phase, 0), flops)
    row(f"UNet step (checkpointing: +{plan.recompute:.0%})", off.unet_flops, on.unet_flops, flops)
    row("VAE encode (no cache)", off.flops.get("VAE encode", 0), on.flops.get("VAE encode", 0), flops)
    row("text encoders (no cache; 2 x parameters x tokens)", off.flops.get("text encoders", 0),
        on.flops.get("text encoders", 0), flops)
    row("total", off.total_flops, on.total_flops, flops)

    lines += ["", f"per GPU: does the step fit, and the floor time per pair at 100 % / 50 % of the card's dense bf16 "
                  f"peak; the run is {plan.pairs:,} pairs",
              f"  {'GPU':<11}{'card':<23}{'GiB':>4}  {'ckpt off':<9}{'ckpt on':<8}{'runs':<9}"
              f"{'ms per pair':>16}{'hours for the run':>22}"]
    for gpu in gpus:
        chosen = plan.choice(gpu.memory_gib)
        fits = [("yes" if est.required <= gpu.memory_gib * GiB else "no") for est in (off, on, chosen)]
        pick = ("ckpt on" if chosen is on else "ckpt off") if fits[2] == "yes" else "no fit"
        times = [seconds_per_pair(chosen.total_flops, key.batch_size, gpu, u) for u in (1.0, 0.5)]
        lines.append(f"  {gpu.name:<11}{gpu.card:<23}{gpu.memory_gib:>4g}  {fits[0]:<9}{fits[1]:<8}{pick:<9}"
                     f"{_ms(times[0]):>9} / {_ms(times[1]):<5}{times[0] * plan.pairs / 3600:>12,.1f} / "
                     f"{times[1] * plan.pairs / 3600:,.1f}")
    misfits = [gpu for gpu in gpus if plan.choice(gpu.memory_gib).required > gpu.memory_gib * GiB]
    if misfits:
        smallest = min(misfits, key=lambda gpu: gpu.memory_gib)
        lines += ["", f"does not fit {', '.join(g.name for g in misfits)} as the recipe stands; change, cheapest "
                      "first (each on top of the ones above):"]
        for change in plan.ladder(smallest.memory_gib):
            est = change.estimate
            fit = [g.name for g in misfits if est.required <= g.memory_gib * GiB]
            lines.append(f"  {change.what:<44} card needs {size(est.required):>6} {unit_name}, "
                         f"{est.total_flops / key.batch_size / flop:.1f} {flop_name}/pair; cost: {change.cost}"
                         + (f"; fits {', '.join(fit)}" if fit else ""))
    lines += ["", f"planned in {plan.seconds:.0f} s: lora_dpo.step.dpo_step and backward traced on fake tensors; "
                  f"allowance not calibrated on a GPU yet (README, `plan --measure`)"]
    return "\n".join(lines)


def grid(recipe: Recipe, ranks: list[int], resolutions: list[int], gpus: list[Gpu]) -> str:
    """A Markdown table, rank x resolution rows, one column per GPU: the cheapest of checkpointing off, on, on with
    cached data that fits, and its floor time per pair at 100 % of the card's peak; `no` when none fits."""
    arch = architecture(recipe.model)
    rows = ["| rank | px | card needs (GiB): ckpt off / on / on + cache | TFLOP per pair, encoding included: off / on "
            "| " + " | ".join(g.name for g in gpus) + " |", "|" + "---|" * (4 + len(gpus))]
    batch = recipe.train.batch_size
    for rank in ranks:
        for resolution in resolutions:
            variant = dataclasses.replace(recipe, lora=replace(recipe.lora, rank=rank, alpha=float(rank)),
                                          data=replace(recipe.data, resolution=resolution))
            off, on = (estimate(arch, Setting.from_recipe(variant, c)) for c in (False, True))
            cached = estimate(arch, replace(on.setting, cached=True))
            options = ((off, "off"), (on, "on"), (cached, "on + cache"))
            cells = []
            for gpu in gpus:
                fit = [(est, name) for est, name in options if est.required <= gpu.memory_gib * GiB]
                ms = seconds_per_pair(fit[0][0].total_flops, batch, gpu) * 1e3 if fit else 0
                cells.append(f"{fit[0][1]}: {ms:,.0f} ms" if fit else "no")
            rows.append(f"| {rank} | {resolution} | {' / '.join(f'{e.required / GiB:.1f}' for e, _ in options)} | "
                        f"{off.total_flops / batch / 1e12:.1f} / {on.total_flops / batch / 1e12:.1f} | "
                        + " | ".join(cells) + " |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------
# The real step, measured: calibration on a GPU, an independent check of the trace on CPU


@dataclass(frozen=True)
class RealMeasure:
    device: str
    peak: int  # bytes allocated at the step's peak, weights and batch included
    reserved: int | None  # CUDA: what the caching allocator held (fragmentation included)
    flops: float


def _allocated_on_cpu(run: Callable[[], None]) -> int:
    """The CPU allocator's own record of a run (torch.profiler, profile_memory): the peak of bytes allocated
    during it, above what was allocated before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure_real_step(arch: Architecture, key: StepKey, device: torch.device) -> RealMeasure:
    """The step of `measure_step` on real tensors (random weights from the config: no download) on `device`.
    Memory: torch.cuda's peak allocated and reserved on CUDA; on CPU the allocator's record. FLOPs: torch's
    FlopCounterMode, in a separate pass (its module tracking must not touch the memory pass)."""
    from diffusers import DDPMScheduler
    from torch.utils.flop_counter import FlopCounterMode

    unet = models.unet_from_config(arch.unet, models.DTYPES[key.precision], device)
    step.build_policy(unet, key.lora, seed=0, precision=key.precision, checkpointing=key.checkpointing,
                      lora_fp32=key.lora_fp32)
    unet.train()
    base = models.BaseModel(source=arch.name, unet=unet, noise_scheduler=DDPMScheduler.from_config(arch.scheduler),
                            is_sdxl=arch.is_sdxl)
    batch = _batch(arch, key, device, torch.Generator().manual_seed(0))
    dtype = models.DTYPES[key.precision]
    autocast = (contextlib.nullcontext() if key.precision == "no"
                else torch.autocast(device.type, dtype=dtype))

    def run() -> None:
        with autocast:
            out = step.dpo_step(unet, base, batch, key.objective, torch.Generator(device).manual_seed(0))
        out.loss.backward()
        for param in unet.parameters():
            param.grad = None

    run()  # warm-up: lazy CUDA/cuBLAS state, the CPU kernels' first-call buffers
    resident = sum({id(t.untyped_storage()): t.untyped_storage().nbytes()
                    for t in (*unet.parameters(), *(t for t in vars(batch).values() if t is not None))}.values())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # blocks cached while the fp32 weights were built are no part of a step
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        peak, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    else:
        peak, reserved = resident + _allocated_on_cpu(run), None
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention_flops())
    with counter:
        run()
    return RealMeasure(str(device), peak, reserved, float(counter.get_total_flops()))


def compare_on_device(recipe: Recipe, device: torch.device) -> str:
    """Run the recipe's step for real on `device` (random weights) and set its measured peak beside the plan's:
    the check of the trace and, on a GPU, the calibration of the allowance. On CPU the trainer runs fp32 without
    autocast, so that is what is planned and measured there."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    checkpointing, _ = resolve_checkpointing(recipe, free)
    key = Setting.from_recipe(recipe, checkpointing).key
    if device.type != "cuda":
        key = replace(key, precision="no")
    arch = architecture(recipe.model)
    planned, real = measure_step(arch, key), measure_real_step(arch, key, device)
    planned_flops = sum(planned.flops.values())
    line = (f"measured on {device} (checkpointing {'on' if checkpointing else 'off'}, precision {key.precision}): "
            f"step peak allocated {real.peak / GiB:.3f} GiB, planned {planned.peak / GiB:.3f} "
            f"(measured / planned {real.peak / planned.peak:.3f})")
    if real.reserved is not None:
        line += (f"; reserved {real.reserved / GiB:.3f} GiB (reserved / allocated {real.reserved / real.peak:.3f}; "
                 f"the plan allows {1 + FRAGMENTATION:.2f})")
    return line + f"; FLOPs {real.flops / 1e12:.4g} T, planned {planned_flops / 1e12:.4g} T"
