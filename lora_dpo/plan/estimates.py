"""From measurements to a plan: a recipe's choices (`Setting`), the memory and compute of its step with what is
computed rather than traced added (optimizer state, gradients kept across accumulation, the encoders' weights and
FLOPs when the data is not cached, a 4-bit base), the changes that make a step fit a card, cheapest first, and the
trainer's automatic gradient checkpointing.

Computed from the real parameter shapes, not measured: optimizer state (AdamW 8 bytes per LoRA parameter,
bitsandbytes 8-bit ~2), a 4-bit base (the base's Linear weights at NF4's ~0.52 bytes), the text encoders' weights
and FLOPs (2 x parameters x tokens).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from lora_dpo import models
from lora_dpo.plan.bases import Architecture, architecture
from lora_dpo.plan.generation import Generation, estimate_generation
from lora_dpo.plan.gpus import FRAGMENTATION, GiB, Gpu, required
from lora_dpo.plan.trace import StepKey, StepMeasure, measure_encode, measure_step
from lora_dpo.recipe import Recipe


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
                   cached=recipe.data.cache is not None, base_4bit=recipe.model.quantize == "nf4")

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
    recipe: str = ""  # what to set for it: `--set` text (a cache: also the command that writes it)


LOWER_RESOLUTIONS = (768, 512, 384, 256)  # the last resort, tried in turn


Apply = Callable[[Setting], Setting]


def _changes(setting: Setting, recompute: float) -> Iterator[tuple[str, str, str, Apply]]:
    """What to change when a step does not fit, cheapest first: (what, cost, what to set, the change itself)."""
    key = setting.key
    if not key.checkpointing:
        yield ("gradient checkpointing on", f"+{recompute:.0%} compute per step", "train.gradient_checkpointing=true",
               lambda s: s.with_key(checkpointing=True))
    if not setting.cached:
        yield ("cache latents and prompt embeddings", "one encoding pass over the data, before training",
               "data.cache=FOLDER (written by `lora-dpo cache`)", lambda s: replace(s, cached=True))
    if key.lora.rank > 8:
        alpha = key.lora.alpha * 8 / key.lora.rank
        yield (f"LoRA rank {key.lora.rank} -> 8", "a smaller adapter", f"lora.rank=8 --set lora.alpha={alpha:g}",
               lambda s: s.with_key(lora=replace(s.key.lora, rank=8, alpha=alpha)))
    if setting.optimizer == "adamw":
        yield ("8-bit AdamW (train.optimizer = \"adamw8bit\")", "none measurable", "train.optimizer=adamw8bit",
               lambda s: replace(s, optimizer="adamw8bit"))
    if not setting.base_4bit:
        yield ("4-bit NF4 base (QLoRA)", "slower matmuls (weights dequantised on the fly)", "model.quantize=nf4",
               lambda s: replace(s, base_4bit=True))
    for resolution in (r for r in LOWER_RESOLUTIONS if r < key.resolution):
        yield (f"resolution {key.resolution} -> {resolution} px", "images below the base's native size",
               f"data.resolution={resolution}", lambda s, r=resolution: s.with_key(resolution=r))


@dataclass
class Plan:
    recipe: Recipe
    arch: Architecture
    off: Estimate  # the recipe with checkpointing off
    on: Estimate  # and on
    seconds: float
    generation: Generation | None = None  # an `[online]` recipe's rounds: the images they draw, decode and score

    @property
    def pairs(self) -> int:
        """Pairs the whole run trains on (one process)."""
        train = self.recipe.train
        return train.max_steps * train.gradient_accumulation * train.batch_size

    @property
    def recompute(self) -> float:
        """Checkpointing's extra UNet compute, as a fraction."""
        return self.on.unet_flops / self.off.unet_flops - 1

    def generating_peak(self, est: Estimate) -> int:
        """Bytes live while a round generates, for the step `est` trains with: what stays resident (the denoiser
        with its adapter, VAE and text encoders, the optimizer state kept across rounds; no gradients: the step
        frees them) plus the denoiser's inference pass, the VAE's decode or the scorers. 0 for an offline recipe."""
        if self.generation is None:
            return 0
        m = est.step
        resident = m.base_bytes + 4 * sum(m.lora_numels) + est.encoder_weights + est.optimizer_state
        return resident - est.quantized_saving + self.generation.transient

    def online_required(self, est: Estimate) -> float:
        """What a card needs for the whole online run: the larger of the step's peak and the generating one (the
        scorers are on the card only while a round scores, `Generation.transient`)."""
        return required(max(est.peak, self.generating_peak(est)))

    def choice(self, memory_gib: float) -> Estimate:
        """Checkpointing as the recipe sets it; `auto`: off when that fits the card, else on."""
        value = self.recipe.train.gradient_checkpointing
        if value == "auto":
            return self.off if self.off.required <= memory_gib * GiB else self.on
        return self.on if value else self.off

    def ladder(self, memory_gib: float) -> list[Change]:
        """Changes, cheapest first, each on top of the ones before, until the step fits `memory_gib`."""
        changes: list[Change] = []
        setting = self.choice(memory_gib).setting
        for what, cost, text, apply in _changes(setting, self.recompute):
            setting = apply(setting)
            changes.append(Change(what, cost, estimate(self.arch, setting), text))
            if changes[-1].estimate.required <= memory_gib * GiB:
                break
        return changes

    def fix(self, memory_gib: float) -> list[Change] | None:
        """The fewest of the ladder's changes that still fit `memory_gib`: the ladder's, less each earlier change
        the last ones fit without (tried latest first); None when even the whole ladder does not fit."""
        start, fits = self.choice(memory_gib).setting, (lambda est: est.required <= memory_gib * GiB)
        ladder = self.ladder(memory_gib)
        steps = list(_changes(start, self.recompute))[:len(ladder)]
        if not ladder or not fits(ladder[-1].estimate):
            return None
        kept = list(range(len(steps)))
        for index in reversed(kept[:-1]):
            trial = [i for i in kept if i != index]
            setting = start
            for i in trial:
                setting = steps[i][3](setting)
            if fits(estimate(self.arch, setting)):
                kept = trial
        setting, changes = start, []
        for i in kept:
            setting = steps[i][3](setting)
            changes.append(Change(steps[i][0], steps[i][1], estimate(self.arch, setting), steps[i][2]))
        return changes


def make_plan(recipe: Recipe) -> Plan:
    started = time.perf_counter()
    arch = architecture(recipe.model)
    off, on = (estimate(arch, Setting.from_recipe(recipe, checkpointing)) for checkpointing in (False, True))
    generation = estimate_generation(recipe, arch, off.setting.key) if recipe.online.rounds else None
    return Plan(recipe, arch, off, on, time.perf_counter() - started, generation)


def seconds_per_pair(flops_per_step: float, batch_size: int, gpu: Gpu, utilisation: float = 1.0) -> float:
    return flops_per_step / batch_size / (gpu.tflops * 1e12 * utilisation)


def generation_hours(generation: Generation, gpu: Gpu, utilisation: float = 1.0) -> float:
    """An online run's generation on `gpu`, at `utilisation` of its dense bf16 peak, as the step is timed."""
    return generation.total_flops / (gpu.tflops * 1e12 * utilisation) / 3600


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
