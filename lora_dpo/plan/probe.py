"""The probe: a dispatch mode that sees every ATen op of a traced step and adds up its FLOPs (the formulas of
torch.utils.flop_counter) and the bytes of every live tensor storage (released when the storage is), per phase.
It holds only numbers, so counting cannot inflate the memory it counts.

Imports nothing of lora-dpo.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


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


def _composite_only(func: Any) -> bool:
    """An op the device runs as the ops it decomposes into (aten.linear), not one with a kernel of its own
    (aten.silu_backward has both: the device runs its one kernel, with no temporaries; the CPU build's kernels
    stand for CUDA's)."""
    return (func is not torch.ops.prim.device.default
            and not torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CPU"))


class StepProbe(TorchDispatchMode):
    """Adds up FLOPs and keeps the bytes of every live tensor storage, per phase. Phases: `backward` while the
    autograd engine runs a node (checkpoint recomputation included), `reference forward` in inference mode (where
    the reference runs), else `policy forward` (saved-tensor hooks included: they run without grad); or one fixed
    `phase` for the whole pass."""

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
        return "reference forward" if torch.is_inference_mode_enabled() else "policy forward"

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func.overloadpacket not in self.formulas and _composite_only(func):
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
