"""Installing saved-tensor hooks turns off autograd's check that a saved tensor was not modified in place; the
saved-cast hooks do the check themselves. A saved tensor modified in place (then dropped, before backward) raises
autograd's own error, whether the hooks kept it as it was or compacted it; where nothing is modified, the gradients
are autograd's without the hooks, bit for bit."""

from __future__ import annotations

import collections
import contextlib
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from lora_dpo.saved_casts import CompactSavedCasts


def _kinds(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """How the hooks keep each saved tensor: _Kept, _Upcast or _Repeat, counted."""
    kinds: collections.Counter[str] = collections.Counter()
    pack = CompactSavedCasts.pack
    monkeypatch.setattr(CompactSavedCasts, "pack",
                        lambda self, t: kinds.update([type(packed := pack(self, t)).__name__]) or packed)
    return kinds


def _kept(a: torch.Tensor) -> torch.Tensor:
    h = a * 2  # (2, 3) fp32
    y = h.sin()  # saves h
    h.add_(1)
    return y.sum()


def _upcast(a: torch.Tensor) -> torch.Tensor:
    h = (a * 2).bfloat16().float()  # (2, 3) fp32, a cast of a bf16 tensor: kept in bf16
    y = F.layer_norm(h, (3,))  # saves h, as CUDA autocast's fp32 norms save their upcast input
    h.mul_(2)
    return y.sum()


def _repeat(a: torch.Tensor) -> torch.Tensor:
    s = a.view(1, 2, 3) * 2  # (1, 2, 3) fp32
    w = torch.ones(4, 3, dtype=torch.bfloat16, requires_grad=True)
    first, second = s.bfloat16(), s.bfloat16()  # two casts of one tensor, as autocast makes one per Linear
    y = F.linear(first, w) + F.linear(second, w)  # each saves a (2, 3) view of its cast: the second kept as the first
    second.add_(1)
    return y.float().sum()


@pytest.mark.parametrize("forward,kind", [(_kept, "_Kept"), (_upcast, "_Upcast"), (_repeat, "_Repeat")])
def test_a_saved_tensor_modified_in_place_raises_autograds_error(forward: Callable[[torch.Tensor], torch.Tensor],
                                                                 kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The modified tensor is dropped when `forward` returns: only the hooks' record of it is left. A compacted one
    keeps no bytes of it, and its message names no node (autograd's `, which is output 0 of X,`)."""
    kinds = _kinds(monkeypatch)
    errors = []
    for hooks in (False, True):
        a = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
        with CompactSavedCasts() if hooks else contextlib.nullcontext():
            loss = forward(a)
        with pytest.raises(RuntimeError) as raised:
            loss.backward()
        errors.append(str(raised.value))
    without, hooked = errors
    assert kinds[kind] > 0, kinds
    assert "modified by an inplace operation" in without and "is at version 1; expected version 0 instead" in without
    expected = without if kind == "_Kept" else re.sub(r", which is output \d+ of \w+,", "", without)
    assert hooked == expected.replace("CPUBFloat16Type", "torch.BFloat16Tensor")  # ATen's name, torch's


class _Attention(torch.nn.Module):
    """A Linear, a norm, and three projections of the norm's output: what the UNet's attention blocks save."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in, self.norm = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)
        self.q, self.k, self.v = (torch.nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.proj_in(x))  # (B, N, 8)
        return F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h))


def test_without_in_place_changes_the_gradients_are_autograds_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU bf16 autocast with CUDA's fp32 norms (the planner's emulation): the norm saves its input upcast to fp32
    (kept in bf16), each projection casts the norm's fp32 output to bf16 (the second and third kept as the first)."""
    from lora_dpo.plan.trace import _cuda_autocast_norms

    kinds = _kinds(monkeypatch)
    torch.manual_seed(0)
    block = _Attention()
    x = torch.randn(2, 5, 8, requires_grad=True)
    results = []
    for hooks in (False, True):
        saving = CompactSavedCasts() if hooks else contextlib.nullcontext()
        with _cuda_autocast_norms(), torch.autocast("cpu", dtype=torch.bfloat16), saving:
            out = block(x)
        out.float().square().sum().backward()
        results.append([out.detach(), x.grad, *(p.grad for p in block.parameters())])
        x.grad = None
        block.zero_grad(set_to_none=True)
    assert all(kinds[k] > 0 for k in ("_Kept", "_Upcast", "_Repeat")), kinds
    without, hooked = results
    assert all(torch.equal(a, b) for a, b in zip(without, hooked, strict=True))
    assert all(g.abs().sum() > 0 for g in hooked[1:])


def test_a_first_cast_modified_in_place_is_never_read_for_the_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second cast is kept as a view of the first: modified in place, the first no longer holds the second's
    values. A backward that reads only the second raises rather than read them (autograd, which kept the second,
    would not raise: the one case where the hooks are stricter than autograd). Modified before the second is saved,
    the first is not used for it: the second is kept as it is, and the gradient is autograd's."""
    kinds = _kinds(monkeypatch)
    a = torch.randn(2, 3, requires_grad=True)
    w = torch.ones(4, 3, dtype=torch.bfloat16, requires_grad=True)
    with CompactSavedCasts():
        s = a * 2
        first, second = s.bfloat16(), s.bfloat16()
        F.linear(first, w)  # saves the first cast; its output is not part of the loss
        loss = F.linear(second, w).float().sum()
    first.add_(1)
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation: \[torch.BFloat16Tensor \[2, 3\]\], "
                                           r"which is output 0 of Add, is at version 1; expected version 0 instead"):
        loss.backward()
    grads = []
    for hooks in (False, True):
        w.grad = None
        with CompactSavedCasts() if hooks else contextlib.nullcontext():
            s = a * 2
            first = s.bfloat16()
            F.linear(first, w)
            first.add_(1)
            F.linear(s.bfloat16(), w).float().sum().backward()
        grads.append(w.grad)
    assert torch.equal(*grads) and grads[0].abs().sum() > 0
    assert kinds["_Repeat"] == 1, kinds  # the first part's only
