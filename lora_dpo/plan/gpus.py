"""The cards a plan is set against: memory and dense bf16 peak of each, names as users type them, and the allowance
(CUDA context, allocator fragmentation) a card needs on top of a step's live tensors.

Imports nothing of the planner: every other module of `lora_dpo.plan` may use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lora_dpo.errors import LoraDpoError

GiB = 2**30


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


# --------------------------------------------------------------------------------------------------
# The allowance on top of the tensors: the CUDA context with cuBLAS/cuDNN workspaces (~0.5-1 GiB) and the caching
# allocator's fragmentation (reserved over allocated, 5-15 %). Not yet calibrated on a GPU: `plan --measure` does.
CONTEXT_GIB = 0.75
FRAGMENTATION = 0.10


def required(peak: float) -> float:
    """Bytes a card needs for a step whose live tensors peak at `peak`."""
    return peak * (1 + FRAGMENTATION) + CONTEXT_GIB * GiB
