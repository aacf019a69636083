"""Saved-tensor hooks that keep autocast's casts for backward in fewer bytes, exactly (the policy forward of
`step.dpo_step` runs under them). Pure torch: no model, no recipe."""

from __future__ import annotations

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
    Checkpointed blocks save through torch.utils.checkpoint's own hooks, which take precedence inside them."""

    def __init__(self) -> None:
        self._casts: dict[tuple[int, int, torch.dtype], tuple[Any, Tensor]] = {}

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
            return tensor
        source, index, source_dtype = found
        if cast is tensor and tensor.dtype == torch.float32 and source_dtype in _LOW_PRECISION:
            return _Upcast(tensor.to(source_dtype))  # the values of the source, in its bytes
        # the node is held with the first cast, so its id is not reused while this forward runs
        source, first = self._casts.setdefault((id(source), index, cast.dtype), (source, cast))
        if first is cast or (first.shape, first.stride(), first.storage_offset()) != (
                cast.shape, cast.stride(), cast.storage_offset()):
            return tensor
        return _Repeat(first, tuple(tensor.shape), tensor.stride(), tensor.storage_offset())

    @staticmethod
    def unpack(packed: Any) -> Tensor:
        if isinstance(packed, _Upcast):
            return packed.tensor.float()
        if isinstance(packed, _Repeat):
            return packed.first.as_strided(packed.size, packed.stride, packed.offset)
        return packed

    def __enter__(self) -> None:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)
        self._casts.clear()


@dataclass(frozen=True)
class _Upcast:
    tensor: Tensor  # saved in its low precision; backward reads it upcast to fp32


@dataclass(frozen=True)
class _Repeat:
    first: Tensor  # the first cast of the same tensor to the same dtype; backward reads this view of it
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
