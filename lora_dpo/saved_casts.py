"""Saved-tensor hooks that keep autocast's casts for backward in fewer bytes, exactly (the policy forward of
`step.dpo_step` runs under them). Pure torch: no model, no recipe."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class CompactSavedCasts:
    """Saved-tensor hooks for the policy's forward that keep autocast's casts for backward in fewer bytes, exactly.
    CUDA autocast runs GroupNorm and LayerNorm in fp32: each norm saves an fp32 copy of its bf16 input (twice the
    bytes of the input it was cast from), and every Linear after a norm casts the norm's fp32 output to bf16 again,
    a new copy per consumer (to_q, to_k, to_v and their LoRA). Both are casts, so the bytes can go without changing
    a value: an fp32 upcast of a bf16/fp16 tensor is kept in that dtype and upcast again when backward reads it
    (bf16 -> fp32 -> bf16 is exact), and the second and later casts of one tensor to one dtype are kept as the first
    (a cast is deterministic). A cast is recognised by its autograd node (`ToCopyBackward0`), its source's dtype by
    the source node's input metadata: no value is read, so the planner's fake tensors take the same path.
    Checkpointed blocks save through torch.utils.checkpoint's own hooks, which take precedence inside them.

    Installed hooks turn off autograd's check that a saved tensor was not modified in place before backward reads
    it (else a wrong gradient, silently); these hooks do it themselves, for every saved tensor: its version when
    saved against its version when read, and autograd's RuntimeError on a mismatch. A compacted cast keeps none of
    the saved tensor's bytes but its version counter (`_version_counter`), so the check is exact there too; its
    message names no node (autograd adds "which is output 0 of X"). Where a tensor was saved as its own op's output,
    the message names the node that modified it, where autograd names that op. A later cast kept as the first is
    read from the first: if the first is modified in place after the later one was saved, reading the later one
    raises, even in a backward that never reads the first (where autograd, which kept the later one, would not)."""

    def __init__(self) -> None:
        # (source node, output index, dtype) -> (source node, the first cast, its version then)
        self._casts: dict[tuple[int, int, torch.dtype], tuple[Any, Tensor, int]] = {}

    @staticmethod
    def _cast_source(tensor: Tensor) -> tuple[Any, int, torch.dtype] | None:
        """(source node, its output index, source dtype) when `tensor` is a differentiable cast, else None."""
        node = tensor.grad_fn
        if type(node).__name__ != "ToCopyBackward0":
            return None
        source, index = node.next_functions[0]
        metadata = getattr(source, "_input_metadata", None)  # torch's node API; without it nothing is compacted
        if metadata is None:
            return None
        return source, index, metadata[index].dtype

    def pack(self, tensor: Tensor) -> Any:
        cast = tensor._base if tensor._is_view() else tensor  # a Linear saves its input as a 2-D view of the cast
        found = self._cast_source(cast)
        if found is None:
            return _Kept(tensor, tensor._version)
        source, index, source_dtype = found
        if cast is tensor and tensor.dtype == torch.float32 and source_dtype in _LOW_PRECISION:
            # the values of the source, in its bytes; of the fp32 tensor, only its version counter
            return _Upcast(tensor.to(source_dtype), _version_counter(tensor), tensor._version)
        # the node is held with the first cast, so its id is not reused while this forward runs
        source, first, version = self._casts.setdefault((id(source), index, cast.dtype), (source, cast, cast._version))
        changed = first._version != version  # modified in place since it was saved: no longer this cast's values
        if first is cast or changed or (first.shape, first.stride(), first.storage_offset()) != (
                cast.shape, cast.stride(), cast.storage_offset()):
            return _Kept(tensor, tensor._version)
        return _Repeat(first, version, tuple(tensor.shape), tensor.stride(), tensor.storage_offset(),
                       _version_counter(tensor), tensor._version)

    @staticmethod
    def unpack(packed: Any) -> Tensor:
        if isinstance(packed, _Upcast):
            _check_version(packed.counter, packed.version, packed.tensor.shape)
            return packed.tensor.float()
        if isinstance(packed, _Repeat):
            _check_version(packed.first, packed.first_version)  # what it is read from (as when first saved)
            _check_version(packed.counter, packed.version, packed.size)
            return packed.first.as_strided(packed.size, packed.stride, packed.offset)
        _check_version(packed.tensor, packed.version)
        return packed.tensor

    def __enter__(self) -> None:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        self._casts.clear()


def saves_upcasts(weights: torch.dtype, device: torch.device) -> bool:
    """Whether a forward run here (under the autocast on now, if any) saves fp32 upcasts of bf16/fp16 tensors: what
    `CompactSavedCasts` keeps in fewer bytes. Without autocast, on low-precision `weights`: peft's fp32 cast of every
    LoRA input. Under autocast: where it runs norms in fp32 (CUDA's policy, and the planner's emulation of it); CPU
    autocast keeps them in bf16, and LoRA inputs stay as they come (`models.lora`): nothing is upcast. Asked of autocast
    itself, on a (2,) tensor: no device is assumed, and fake tensors answer the same."""
    kind = device.type
    if not torch.is_autocast_enabled(kind):
        return weights != torch.float32
    probe = torch.ones(2, device=device, dtype=torch.get_autocast_dtype(kind))
    return torch.nn.functional.layer_norm(probe, (2,)).dtype == torch.float32


def _version_counter(tensor: Tensor) -> Tensor:
    """A tensor of no bytes whose `_version` is `tensor`'s: an in-place change of `tensor` or of any view of it shows
    there, while `tensor`'s memory can be freed. A detached alias shares the version counter and not the autograd
    history; set_() points it at an empty storage, an in-place op that bumps the shared counter: undone at once."""
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(tensor):
        counter = tensor.detach()
        counter.set_()
    return counter


_NODE_SUFFIX = re.compile(r"Backward\d*$")  # autograd's message names MulBackward0 `Mul`


def _check_version(tensor: Tensor, saved: int, shape: tuple[int, ...] | None = None) -> None:
    """autograd's own check of a saved tensor, in its words: `tensor` (or the counter of one, of `shape`) is still
    at the version it was saved at. The type as torch names it: autograd writes bf16 as ATen does, `CPUBFloat16Type`."""
    if tensor._version == saved:
        return
    node = tensor.grad_fn
    made = f", which is output {tensor.output_nr} of {_NODE_SUFFIX.sub('', node.name())}," if node else ""
    raise RuntimeError(
        "one of the variables needed for gradient computation has been modified by an inplace operation: "
        f"[{tensor.type()} {list(tensor.shape if shape is None else shape)}]{made} is at version {tensor._version}; "
        f"expected version {saved} instead. Hint: enable anomaly detection to find the operation that failed to "
        "compute its gradient, with torch.autograd.set_detect_anomaly(True, check_nan=False).")


@dataclass(frozen=True)
class _Kept:
    tensor: Tensor  # saved as autograd made it
    version: int  # its version when saved


@dataclass(frozen=True)
class _Upcast:
    tensor: Tensor  # saved in its low precision; backward reads it upcast to fp32
    counter: Tensor  # the version counter of the fp32 tensor autograd saved
    version: int  # its version when saved


@dataclass(frozen=True)
class _Repeat:
    first: Tensor  # the first cast of the same tensor to the same dtype; backward reads this view of it
    first_version: int  # its version when it was saved: a changed first is no longer the same cast
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    counter: Tensor  # the version counter of the cast autograd saved
    version: int
