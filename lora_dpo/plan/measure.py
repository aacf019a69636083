"""The real step, measured: `measure_real_step` runs the step of `trace.measure_step` on real tensors (random
weights from the config, no download) on a device, and `compare_on_device` sets its peak beside the plan's: an
independent check of the trace on CPU and, on a GPU, the calibration of the allowance (`gpus.required`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from lora_dpo import models, step
from lora_dpo.plan.bases import Architecture, architecture
from lora_dpo.plan.estimates import Setting, resolve_checkpointing
from lora_dpo.plan.gpus import FRAGMENTATION, GiB
from lora_dpo.plan.probe import cpu_attention_flops
from lora_dpo.plan.trace import StepKey, measure_step, step_batch
from lora_dpo.recipe import Recipe


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


def measure_real_step(arch: Architecture, key: StepKey, device: torch.device, compile: bool = False) -> RealMeasure:
    """The step of `measure_step` on real tensors (random weights from the config: no download) on `device`, with
    [train].compile's compiled blocks if `compile` (which fake tensors cannot run: the trace is of the eager step).
    Memory: torch.cuda's peak allocated and reserved on CUDA; on CPU the allocator's record. FLOPs: torch's
    FlopCounterMode, in a separate pass (its module tracking must not touch the memory pass), eager: the same math."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = models.unet_from_config(arch.unet, models.DTYPES[key.precision], device)
    step.build_policy(unet, key.lora, seed=0, precision=key.precision, checkpointing=key.checkpointing,
                      lora_fp32=key.lora_fp32, compile=compile)
    unet.train()
    scheduler = arch.family.training_scheduler(arch.scheduler, {})
    base = models.BaseModel(source=arch.name, unet=unet, noise_scheduler=scheduler, family=arch.family)
    batch = step_batch(arch, key, device, torch.Generator().manual_seed(0))
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
    with counter, torch.compiler.set_stance("force_eager"):
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
    planned, real = measure_step(arch, key), measure_real_step(arch, key, device, recipe.train.compile)
    planned_flops = sum(planned.flops.values())
    compiled = ", compiled blocks: the plan traced them eager" if recipe.train.compile else ""
    line = (f"measured on {device} (checkpointing {'on' if checkpointing else 'off'}, precision {key.precision}"
            f"{compiled}): "
            f"step peak allocated {real.peak / GiB:.3f} GiB, planned {planned.peak / GiB:.3f} "
            f"(measured / planned {real.peak / planned.peak:.3f})")
    if real.reserved is not None:
        line += (f"; reserved {real.reserved / GiB:.3f} GiB (reserved / allocated {real.reserved / real.peak:.3f}; "
                 f"the plan allows {1 + FRAGMENTATION:.2f})")
    return line + f"; FLOPs {real.flops / 1e12:.4g} T, planned {planned_flops / 1e12:.4g} T"
