"""[train].compile: the UNet's repeated blocks compiled with torch.compile (regional compilation), whether this machine
can compile at all, and how many graphs torch has compiled.

Regional, not the whole UNet: diffusers names the blocks a model repeats (`_repeated_blocks`: BasicTransformerBlock,
the attention and feed-forward of every transformer layer, where the LoRA adapters sit) and `compile_repeated_blocks`
compiles each one. Blocks of one shape share their graphs, so a UNet compiles a handful of graphs however deep it is;
the ResnetBlock2Ds come in a dozen shapes each (torch stops after 8 graphs per function and runs the rest eagerly).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lora_dpo.recipe import RecipeError

log = logging.getLogger(__name__)


def compiler_missing(device: torch.device) -> str | None:
    """Why torch.compile's backend (inductor) cannot build kernels on `device`, or None when it can. CPU kernels are
    C++ that inductor compiles with the compiler it finds as torch does: $CXX, else g++ (it runs `--version`); CUDA
    kernels are Triton's (a GPU of compute capability 7.0 or newer)."""
    if device.type == "cpu":
        from torch._inductor import config
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except RuntimeError:  # torch._inductor.exc.InvalidCxxCompiler
            tried = ", ".join(str(c) for c in config.cpp.cxx if c)
            return (f"inductor builds the CPU's kernels with a C++ compiler and found none that runs (tried {tried}): "
                    "install g++ or point CXX at one")
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return ("inductor builds CUDA kernels with Triton, which is not installed or does not support this GPU "
                    "(compute capability 7.0 or newer): pip install triton")
    return None


def check_compiler(compile: bool, device: torch.device) -> None:
    """Refuse [train].compile = true, by name and before any weight loads, where nothing can compile: a quiet eager
    run would be slower than the run asked for, and would hide it."""
    why = compiler_missing(device) if compile else None
    if why:
        raise RecipeError(f"[train].compile = true: {why}; or set [train].compile = false")


# Graphs one block width makes: the policy's forward with its backward (and again for the first block, whose input
# needs no gradient), the reference's, validation's policy and reference (eval mode, no gradient): 5; dynamic
# shapes (a last, smaller batch) may add one to a few of them.
GRAPHS_PER_WIDTH = 8


def compile_blocks(unet: Any) -> int:
    """Compile each of the UNet's repeated blocks in place (diffusers' `compile_repeated_blocks`; the UNet object
    stays what it was: accelerate and DDP wrap it, peft switches its adapters, all as before). Returns how many
    blocks now run compiled; the compile itself happens at their first call, where its time is paid.

    Never a quiet eager block: `fullgraph`, so a block that torch cannot trace whole raises at that first call
    instead of running in pieces with eager code between them; and torch's limit of graphs per function (8, after
    which it runs a function eagerly with a warning) is sized to the blocks' widths (a parameter's shape is part of
    a graph: SD 1.5's transformer blocks come in 3 widths, SDXL's in 2) and made an error when reached. Torch's
    graphs of earlier models are dropped first (`torch.compiler.reset`): a process that builds a compiled policy
    again (a notebook, the bench's cases, the tests) counts this model's alone (the kernels stay in inductor's cache
    on disk: compiling the same graphs again takes seconds)."""
    import torch._dynamo.config

    torch.compiler.reset()
    blocks = [m for m in unet.modules() if type(m).__name__ in (getattr(unet, "_repeated_blocks", None) or ())]
    if not blocks:
        raise RecipeError(f"[train].compile = true: {type(unet).__name__} names no repeated blocks to compile "
                          "(diffusers' `_repeated_blocks`); set [train].compile = false")
    widths = {tuple(tuple(p.shape) for p in block.parameters()) for block in blocks}  # blocks of distinct shapes
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, GRAPHS_PER_WIDTH * len(widths))
    dynamo.fail_on_recompile_limit_hit = True
    for block in blocks:
        block.compile(fullgraph=True)
    log.info("compiling %d %s blocks at their first call", len(blocks), "/".join(unet._repeated_blocks))
    return len(blocks)


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process (torch's own count, never reset): compare it before and after.
    A compiled policy makes the reference's forward and the policy's (with its backward) per shape of block, and
    one more where the first block's input needs no gradient; a count that grows after the first step is a
    recompilation."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
