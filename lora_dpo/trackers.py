"""Experiment trackers (`[output].report_to`), through accelerate: which are installed (and what `all` means), how
accelerate is told (`log_with`, the project, per-tracker run names), the run's config as flat `section.key`
scalars, and images (sample grids, the training plot) sent to every tracker that takes them.

tensorboard writes to `<run>/tensorboard`; every other tracker reads its usual environment (`WANDB_MODE=offline`,
`MLFLOW_TRACKING_URI`, `COMET_API_KEY`, ...): nothing here talks to a network by itself.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_dpo.recipe import ALL_TRACKERS, TRACKERS, Recipe, RecipeError

log = logging.getLogger(__name__)

# The module each tracker's package installs (tensorboard also runs on tensorboardX, as accelerate allows)
MODULES = {name: (name,) for name in TRACKERS} | {"tensorboard": ("tensorboard", "tensorboardX")}


def _installed(name: str) -> bool:
    return any(importlib.util.find_spec(module) for module in MODULES[name])


def resolve(report_to: tuple[str, ...]) -> tuple[str, ...]:
    """The trackers a run reports to: `all` becomes every tracker installed here (in `TRACKERS` order), beside the
    ones named. Resolved here rather than by accelerate, whose `all` would add a second tensorboard writing outside
    `<run>/tensorboard`."""
    names = [n for n in TRACKERS if _installed(n)] if ALL_TRACKERS in report_to else []
    return tuple(dict.fromkeys([*(n for n in report_to if n != ALL_TRACKERS), *names]))


def check_installed(report_to: tuple[str, ...]) -> None:
    """Every tracker named in `[output].report_to` can be imported, or one error names each missing package."""
    missing = [name for name in report_to if name != ALL_TRACKERS and not _installed(name)]
    if missing:
        raise RecipeError(f"[output].report_to = {list(report_to)!r}: " + "; ".join(
            f"{name} is not installed (pip install {TRACKERS[name]})" for name in missing)
            + "; or remove it from the list")


def accelerate_trackers(report_to: tuple[str, ...], run_dir: Path) -> tuple[list[Any], dict[str, dict[str, Any]]]:
    """(`log_with`, `init_kwargs`) for accelerate, from resolved names (`resolve`): tensorboard as its own tracker
    writing to `<run>/tensorboard`, the others by name, each run named after the run folder. The project goes to
    `init_trackers` (accelerate hands it to every tracker as its project or experiment)."""
    from accelerate.tracking import TensorBoardTracker

    name = run_dir.name
    log_with = [TensorBoardTracker("tensorboard", str(run_dir)) if t == "tensorboard" else t for t in report_to]
    init_kwargs = {"wandb": {"name": name}, "mlflow": {"run_name": name}, "trackio": {"name": name},
                   "swanlab": {"experiment_name": name},
                   # accelerate names the clearml task after the project unless told; CLEARML_TASK still wins
                   "clearml": {"task_name": os.environ.get("CLEARML_TASK", name)},
                   "dvclive": {"dir": str(run_dir / "dvclive")}}
    return log_with, {k: v for k, v in init_kwargs.items() if k in report_to}


def run_config(recipe: Recipe) -> dict[str, str | int | float | bool]:
    """The resolved recipe as one flat table of scalars, `section.key` -> value, as trackers store a run's config:
    lists and tables become their JSON text, an unset value the string `None`."""
    flat: dict[str, str | int | float | bool] = {}
    for section, values in recipe.to_dict().items():
        for key, value in values.items():
            scalar = isinstance(value, (str, int, float, bool))
            flat[f"{section}.{key}"] = value if scalar else "None" if value is None else json.dumps(value)
    return flat


# --------------------------------------------------------------------------------------------------
# Images: one function per tracker that takes them (image: a PIL RGB image; tag: "samples", "training_curves")


def _tensorboard(tracker: Any, tag: str, image: Any, path: Path, step: int) -> None:
    import numpy as np

    tracker.writer.add_image(tag, np.asarray(image), global_step=step, dataformats="HWC")
    tracker.writer.flush()


def _wandb(tracker: Any, tag: str, image: Any, path: Path, step: int) -> None:
    tracker.log_images({tag: [image]}, step=step)


def _aim(tracker: Any, tag: str, image: Any, path: Path, step: int) -> None:
    tracker.log_images({tag: (image, path.name)}, step=step)


def _clearml(tracker: Any, tag: str, image: Any, path: Path, step: int) -> None:
    tracker.log_images({tag: image}, step=step)


def _mlflow(tracker: Any, tag: str, image: Any, path: Path, step: int) -> None:
    tracker.log_artifact(str(path), artifact_path=tag)  # the PNG itself, under artifacts/<tag>/


def _comet(tracker: Any, tag: str, image: Any, path: Path, step: int) -> None:
    tracker.tracker.log_image(image, name=tag, step=step)


def _dvclive(tracker: Any, tag: str, image: Any, path: Path, step: int) -> None:
    tracker.tracker.log_image(f"{tag}/{path.name}", image)


def _trackio(tracker: Any, tag: str, image: Any, path: Path, step: int) -> None:
    import trackio

    tracker.log({tag: trackio.Image(image)}, step=step)


IMAGE_LOGGERS: dict[str, Callable[[Any, str, Any, Path, int], None]] = {
    "tensorboard": _tensorboard, "wandb": _wandb, "aim": _aim, "clearml": _clearml, "mlflow": _mlflow,
    "comet_ml": _comet, "dvclive": _dvclive, "swanlab": _wandb, "trackio": _trackio}


def log_image(accelerator: Any, tag: str, path: Path, step: int) -> None:
    """Send the PNG at `path` to every tracker of this run (main process only). A tracker that fails to take it
    gets a warning, never a failed run: the image is on disk either way."""
    if not accelerator.is_main_process or not accelerator.trackers:
        return
    from PIL import Image

    with Image.open(path) as opened:
        image = opened.convert("RGB")
    for tracker in accelerator.trackers:
        send = IMAGE_LOGGERS.get(tracker.name)
        if send is None:  # a tracker of the user's own: metrics only
            continue
        try:
            send(tracker, tag, image, path, step)
        except Exception as err:
            log.warning("%s: %s not sent to %s (%s: %s)", tag, path.name, tracker.name, type(err).__name__, err)
