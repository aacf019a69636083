"""Resumable checkpoints, written atomically and only as safetensors and JSON (never pickles).

A checkpoint is a folder `checkpoint-<step>/` with the LoRA weights, the whole optimizer state (at any nesting
depth: bitsandbytes' 8-bit state included) as tensors, and `state.json` (where each of those tensors goes, step,
pairs consumed = the data position (for a stream, each part's own position: `stream`), the launch layout,
scheduler and fp16 loss-scaler states, the guard's counts, the resolved recipe and its fingerprint, history).
It is written to a temporary folder, flushed and renamed (`files.publish_folder`), so a crash or a SIGKILL at
any moment leaves either the whole checkpoint or none; the newest `keep` are kept.

There are no RNG states to save: every random draw of a step (noise, timesteps, data crops and flips, caption
dropout, LoRA dropout) is seeded by (seed, step), so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lora_dpo import files
from lora_dpo.errors import FileFormatError

CHECKPOINT_PREFIX = "checkpoint-"
ADAPTER, OPTIMIZER, STATE = "adapter.safetensors", "optimizer.safetensors", "state.json"
# what state.json must hold, and of which JSON type. Where the data stands is `pairs` (draws consumed, the same on
# any launch layout) beside `layout`; checkpoints written before had `micro_steps` (this layout's micro-batches)
STATE_FIELDS: dict[str, type] = {"step": int, "fingerprint": str, "scheduler": dict, "optimizer": dict,
                                 "history": list}
POSITION_FIELDS = ("pairs", "micro_steps")


def flatten_state(value: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Any nesting of dicts, lists and tuples with tensors in it (an optimizer's `state_dict()`: torch's AdamW,
    or bitsandbytes' AdamW8bit, which nests each parameter's quantised state under `__bnb_optimizer_quant_state__`)
    -> (tensors for safetensors, named by their path, and a JSON skeleton that says where each one goes). The
    skeleton keeps what JSON alone would lose: integer dict keys, tuples, tensors."""
    if isinstance(value, torch.Tensor):
        # clone: optimizers share tensors between parameters (bitsandbytes' qmaps), which safetensors refuses
        return {prefix: value.detach().cpu().clone().contiguous()}, {"tensor": prefix}
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(value, dict):
        items = []
        for key, item in value.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"cannot store a state key of type {type(key).__name__} ({key!r})")
            found, skeleton = flatten_state(item, f"{prefix}{key}.")
            tensors |= found
            items.append([key, skeleton])
        return tensors, {"dict": items}
    if isinstance(value, (list, tuple)):
        skeletons = []
        for index, item in enumerate(value):
            found, skeleton = flatten_state(item, f"{prefix}{index}.")
            tensors |= found
            skeletons.append(skeleton)
        return tensors, {"tuple" if isinstance(value, tuple) else "list": skeletons}
    if value is None or isinstance(value, (bool, int, float, str)):
        return tensors, {"value": value}
    raise TypeError(f"cannot store a state value of type {type(value).__name__} at {prefix.rstrip('.')}")


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """The inverse of `flatten_state`."""
    (kind, content), = skeleton.items()
    if kind == "tensor":
        return tensors[content]
    if kind == "dict":
        return {key: unflatten_state(tensors, item) for key, item in content}
    if kind in ("list", "tuple"):
        items = [unflatten_state(tensors, item) for item in content]
        return tuple(items) if kind == "tuple" else items
    if kind == "value":
        return content
    raise ValueError(f"unknown entry {kind!r}")


def list_checkpoints(run_dir: Path) -> list[Path]:
    steps = {int(p.name.removeprefix(CHECKPOINT_PREFIX)): p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if p.is_dir() and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()}
    return [steps[step] for step in sorted(steps)]


def save_checkpoint(run_dir: Path, step: int, lora_state: dict[str, torch.Tensor], optimizer: Any,
                    scheduler: Any, extra: dict[str, Any], keep: int = 2, scaler: Any | None = None) -> Path:
    """Write `checkpoint-<step>/` atomically, then delete all but the newest `keep`. `scaler`: fp16's GradScaler,
    whose loss scale is part of the run (a resume that restarted it at 65536 would take other steps). A full or
    read-only disk raises OutputError naming the checkpoint; the earlier checkpoints are untouched."""
    final = run_dir / f"{CHECKPOINT_PREFIX}{step}"
    with files.writing(final, run_dir), files.atomic_folder(final) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in lora_state.items()}, tmp / ADAPTER)
        tensors, skeleton = flatten_state(optimizer.state_dict())
        save_file(tensors, tmp / OPTIMIZER)
        state = {"step": step, "optimizer": skeleton, "scheduler": scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None, **extra}
        (tmp / STATE).write_text(json.dumps(state, indent=1))
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state.json, checked (read before anything loads: a resume decides from it whether it can
    go on). A truncated, corrupt or foreign one raises FileFormatError naming the file."""
    state = files.read_json(path / STATE, "checkpoint")
    if not isinstance(state, dict):
        raise FileFormatError(f"{path / STATE}: not a lora-dpo checkpoint state (expected a JSON object)")
    problems = [f"`{key}` missing or not a {kind.__name__}" for key, kind in STATE_FIELDS.items()
                if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool)]
    position = next((state[key] for key in POSITION_FIELDS if key in state), None)
    if not isinstance(position, int) or isinstance(position, bool):
        problems.append("`pairs` missing or not an int")
    if not problems and (state["step"] < 0 or position < 0):
        problems.append("negative step")
    if not problems and not isinstance(state["scheduler"].get("last_epoch"), int):
        problems.append("`scheduler.last_epoch` missing")
    if problems:
        raise FileFormatError(f"{path / STATE}: not a lora-dpo checkpoint state: {'; '.join(problems)}")
    return state


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """-> (LoRA weights, optimizer state_dict, state.json). A truncated, corrupt or foreign checkpoint raises
    FileFormatError naming the file; whether the tensors fit the model is the caller's check (`files.check_tensors`)."""
    state = read_state(path)
    tensors = files.read_safetensors(path / OPTIMIZER, "checkpoint's optimizer state")
    try:
        optimizer = unflatten_state(tensors, state["optimizer"])
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise FileFormatError(f"{path / STATE}: the optimizer state does not match {path / OPTIMIZER} "
                              f"({type(err).__name__}: {err})") from None
    return files.read_safetensors(path / ADAPTER, "checkpoint's adapter"), optimizer, state


def restore_optimizer(optimizer: Any, scheduler: Any, optimizer_state: dict[str, Any], state: dict[str, Any],
                      path: Path, scaler: Any | None = None) -> None:
    """Load a checkpoint's optimizer, scheduler and loss-scaler states, or say which checkpoint does not fit."""
    if (scaler is None) != (state.get("scaler") is None):
        raise FileFormatError(f"{path}: the checkpoint was saved {'with' if scaler is None else 'without'} fp16 loss "
                              "scaling and this run is not; resume with the [train].mixed_precision it was saved with")
    try:
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as err:
        raise FileFormatError(f"{path}: the optimizer or scheduler state does not fit this run ({err}); the "
                              "checkpoint was saved with other [train] or [lora] settings") from None


def remove_checkpoints(run_dir: Path) -> None:
    """Delete every checkpoint of a run (an earlier run in the same folder, replaced with --overwrite)."""
    for path in list_checkpoints(run_dir):
        shutil.rmtree(path, ignore_errors=True)  # every process of a multi-GPU run may get here


def rewind_metrics(path: Path, step: int) -> None:
    """Keep only the metrics lines up to `step` (the checkpoint a run resumes from): the steps after it will be
    logged again, and a line cut off by a kill is dropped."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    with files.writing(path, path.parent):
        files.write_text(path, "".join(kept))
