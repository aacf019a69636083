"""What keeps a long run on a flaky desktop safe: a stop asked for with Ctrl-C or SIGTERM, steps whose loss or
gradients are not finite, and the GPU running out of memory. Each ends in a clean stop with a message that says
what happened and what to do: never a bare traceback, never a damaged checkpoint.

The training loop (`train.fit`) uses these; they know nothing of its internals.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from lora_dpo.checkpoint import list_checkpoints
from lora_dpo.errors import Interrupted, LoraDpoError

__all__ = ["BadSteps", "Interrupted", "StopSignals", "TrainingError"]
from lora_dpo.recipe import Recipe

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingError(LoraDpoError):
    """A run that cannot go on (diverged, out of memory); the message names the settings to change."""


# --------------------------------------------------------------------------------------------------
# Signals


class StopSignals:
    """While active, SIGINT and SIGTERM only ask the loop to stop (`signum` is set): the loop finishes its
    optimizer step, saves a checkpoint and raises `Interrupted`. A second signal stops at once
    (KeyboardInterrupt), which is safe too: checkpoints on disk are always whole. The previous handlers come back
    on exit. Outside the main thread, where Python cannot install handlers, it does nothing."""

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:  # os.write: a handler may run while tqdm is inside a buffered write to stderr
            os.write(2, f"\nlora-dpo: {signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                        "(send it again to stop at once)\n".encode())

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader worker init: Ctrl-C reaches every process of the terminal's group; workers leave it to the
    main process, which stops cleanly after a step that may still need their batches. SIGTERM keeps its default:
    it is how multiprocessing ends workers, and a worker that ignored it would hang the main process's exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def step_flags(accelerator: Any, finite: torch.Tensor, stop: bool) -> tuple[bool, bool]:
    """The one host sync of an optimizer step: (the loss and gradients were finite on every process, some
    process was asked to stop). All processes agree, so they skip a step, or stop, together."""
    flags = torch.stack([(~finite).float(), torch.tensor(float(stop), device=finite.device)])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
    bad, stopping = flags.tolist()
    return bad == 0, stopping > 0


# --------------------------------------------------------------------------------------------------
# Non-finite steps


# what to do about a VAE in fp16 when the base's family knows nothing more precise (`Family.fp16_vae_advice`)
FP16_VAE_ADVICE = ('a VAE may overflow in fp16; set [model].vae_dtype = "no" (or an fp16-safe [model].vae), and '
                   'prefer [train].mixed_precision = "bf16"')


def nonfinite_causes(recipe: Recipe, fp16_vae_advice: str = "") -> list[str]:
    """The usual reasons for NaN/Inf, with the recipe's own values, most likely first. `fp16_vae_advice`: the base
    family's (`Family.fp16_vae_advice`; "": the generic one)."""
    model, train, objective = recipe.model, recipe.train, recipe.objective
    causes = []
    if "fp16" in (model.vae_dtype, train.mixed_precision):
        causes.append(f"fp16: {fp16_vae_advice or FP16_VAE_ADVICE}")
    else:
        causes.append('an fp16 VAE: keep [model].vae_dtype = "no" or use an fp16-safe [model].vae')
    causes.append(f"the learning rate: [train].learning_rate = {train.learning_rate:g} may be too high; try "
                  f"{train.learning_rate / 10:g}")
    causes.append(f"beta: [objective].beta = {objective.beta:g} scales the loss's gradients; try a smaller one"
                  + ("" if train.max_grad_norm > 0 else " or set [train].max_grad_norm = 1.0 (clipping is off)"))
    return causes


class BadSteps:
    """Counts optimizer steps skipped because the loss or the gradients were not finite; `limit` in a row stop
    the run. A skipped step leaves the adapter and the optimizer state as they were."""

    def __init__(self, limit: int, total: int = 0, in_a_row: int = 0, fp16_vae_advice: str = "") -> None:
        self.limit, self.total, self.in_a_row = limit, total, in_a_row  # a resume goes on with its counts
        self.fp16_vae_advice = fp16_vae_advice  # the base family's, for the message that stops the run

    def record(self, ok: bool, step: int, recipe: Recipe, run_dir: Path) -> None:
        if ok:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        log.warning("step %d: loss or gradients are NaN/Inf; step skipped (%d in a row, %d in all)", step,
                    self.in_a_row, self.total)
        if self.in_a_row >= self.limit:
            found = list_checkpoints(run_dir)  # none is written during a run of bad steps: the newest is good
            kept = f"the last good checkpoint is {found[-1]}" if found else "there is no checkpoint yet"
            raise TrainingError(
                f"the loss or the gradients were NaN/Inf for {self.in_a_row} optimizer steps in a row (up to step "
                f"{step}, [train].max_bad_steps = {self.limit}); stopped, and {kept}. Likely causes: "
                + "; ".join(nonfinite_causes(recipe, self.fp16_vae_advice))
                + ". Fix the recipe, then continue with --resume latest")


# --------------------------------------------------------------------------------------------------
# Out of memory


def memory_advice(recipe: Recipe) -> list[str]:
    """Settings that lower the GPU memory a step needs, among those this recipe does not use yet."""
    train, lora = recipe.train, recipe.lora
    advice = []
    if train.gradient_checkpointing is not True:  # "auto" may have judged the fit wrong
        advice.append("[train].gradient_checkpointing = true (recompute activations: far less memory, ~24 % slower)")
    if not recipe.data.cache:
        advice.append('[data].cache = "FOLDER" after `lora-dpo cache` (no VAE or text encoders on the GPU)')
    if recipe.model.quantize == "none":
        advice.append('[model].quantize = "nf4" (the frozen base in 4 bits, QLoRA-style)')
    if train.batch_size > 1:
        advice.append(f"[train].batch_size = 1 with [train].gradient_accumulation = "
                      f"{train.batch_size * train.gradient_accumulation} (the same pairs per optimizer step)")
    if train.optimizer != "adamw8bit":
        advice.append('[train].optimizer = "adamw8bit" (8-bit AdamW states)')
    if train.mixed_precision == "no":
        advice.append('[train].mixed_precision = "bf16"')
    if lora.rank > 4:
        advice.append(f"[lora].rank = {lora.rank // 2} (a smaller adapter and optimizer state)")
    if recipe.data.num_workers > 2:
        advice.append(f"[data].num_workers = 2 (now {recipe.data.num_workers}; each worker holds decoded images "
                      "in pinned memory)")
    return advice


def _memory_numbers() -> str:
    if not torch.cuda.is_available():
        return ""
    try:
        free, total = torch.cuda.mem_get_info()
        peak = torch.cuda.max_memory_allocated()
    except RuntimeError:
        return ""
    return f" (peak {peak / 2**30:.1f} GiB allocated by torch; {free / 2**30:.1f} of {total / 2**30:.1f} GiB free now)"


@contextmanager
def out_of_memory_advice(recipe: Recipe) -> Iterator[None]:
    """Turn the GPU running out of memory into a TrainingError that lists the settings that would fit."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as err:  # the same class as torch.OutOfMemoryError (torch >= 2.5)
        first = ". ".join(str(err).split(". ")[:2]).strip()
        advice = memory_advice(recipe) or ["a smaller [data].resolution, or a GPU with more memory"]
        raise TrainingError(f"out of GPU memory: {first}{_memory_numbers()}. Settings that lower the memory a step "
                            "needs: " + "; ".join(advice) + ". Continue with --resume latest if a checkpoint "
                            "exists (a new [train].optimizer, [lora].rank or [data].resolution needs a new run: a "
                            "checkpoint's state does not fit them)") from None
