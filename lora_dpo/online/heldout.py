"""Each round measured on prompts it never trained on: images from the adapter and from the base (adapters off)
with the same seeds, every scorer's win rate of the adapter over the base and mean score difference, each with its
bootstrap interval over prompts (`evaluate.win_rate`, as `lora-dpo eval` reports them), and a base | adapter grid.

The base's images are made once for the whole run (`<run>/rounds/heldout-base/`); each round's are in its folder
(`heldout/`), with `heldout.json` (written last: a round measured already is not measured again on a resume) and
`grid.png`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from lora_dpo import files, models
from lora_dpo.evaluate import GridRow, image_path, make_grid, win_rate
from lora_dpo.online.rounds import ROUNDS_DIR, VARIANT, generate
from lora_dpo.pairs import score_folder

HELDOUT_FILE = "heldout.json"
GRID_PROMPTS = 8  # rows of a round's grid


def base_folder(run_dir: Path) -> Path:
    """Where the base's held-out images are: made once for the whole run, every round compares with them."""
    return run_dir / ROUNDS_DIR / "heldout-base"


def read_heldout(folder: Path) -> dict[str, Any] | None:
    """A measured round's results (`heldout.json`), or None."""
    path = folder / HELDOUT_FILE
    return files.read_json(path, "online held-out results") if path.is_file() else None


def measure_round(pipe: Any, family: Any, round_index: int, step: int, folder: Path, run_dir: Path,
                  prompts: Sequence[str], scorers: Sequence[tuple[Any, float]], *, seeds: int, steps: int,
                  guidance_scale: float, resolution: int) -> dict[str, Any]:
    """Round `round_index` measured on the held-out `prompts` with the denoiser in `pipe` as it is now (after the
    round's training): its images and the base's from seeds 0 .. seeds - 1, scored; per scorer, the adapter's win
    rate over the base and mean score difference with 95 % intervals resampling prompts. Writes the round's grid
    and `heldout.json`; returns what that holds."""
    seed_list = list(range(seeds))
    denoiser = getattr(pipe, family.denoiser_folder)
    settings = dict(steps=steps, guidance_scale=guidance_scale, resolution=resolution)
    with models.adapters_disabled(denoiser):  # made once: a later round finds them on disk
        generate(pipe, family, prompts, seed_list, base_folder(run_dir), desc="held out, base", **settings)
    generate(pipe, family, prompts, seed_list, folder / "heldout", desc=f"round {round_index + 1} held out",
             **settings)
    names = [scorer.name for scorer, _ in scorers]
    base = score_folder(prompts, seed_list, VARIANT, base_folder(run_dir) / "images", scorers)  # [K, P, N]
    adapter = score_folder(prompts, seed_list, VARIANT, folder / "heldout" / "images", scorers)
    groups = np.repeat(np.arange(len(prompts)), len(seed_list))  # the bootstrap resamples whole prompts
    results = {}
    for k, name in enumerate(names):
        rate = win_rate(adapter[k].numpy().ravel(), base[k].numpy().ravel(), groups)
        results[name] = {**asdict(rate), "mean_base": float(base[k].mean()), "mean_adapter": float(adapter[k].mean())}
    record = {"round": round_index + 1, "step": step, "prompts": len(prompts), "seeds": seed_list, "scorers": results}
    _grid(folder / "grid.png", run_dir, folder, prompts, seed_list, names, base, adapter, round_index)
    files.write_text(folder / HELDOUT_FILE, json.dumps(record, indent=1))
    return record


def _grid(path: Path, run_dir: Path, folder: Path, prompts: Sequence[str], seeds: Sequence[int],
          names: Sequence[str], base: Tensor, adapter: Tensor, round_index: int) -> None:
    """Base | adapter for the first held-out prompts, every seed, each image with its scores (base and adapter:
    scores [K, P, N], scorer, prompt, seed)."""
    rows, titles = [], [f"{kind}, seed {seed}" for seed in seeds for kind in ("base", f"round {round_index + 1}")]
    for p, prompt in enumerate(prompts[:GRID_PROMPTS]):
        images, notes = [], []
        for s, seed in enumerate(seeds):
            for where, scores in ((base_folder(run_dir), base), (folder / "heldout", adapter)):
                with Image.open(image_path(where / "images", p, seed, VARIANT)) as image:
                    images.append(image.convert("RGB"))
                notes.append("\n".join(f"{name} {float(scores[k, p, s]):.3f}" for k, name in enumerate(names)))
        rows.append(GridRow(images, f"#{p}: {prompt}", notes))
    with files.atomic_file(path) as tmp:
        make_grid(rows, titles).save(tmp, format="PNG", optimize=True)


def metrics_record(record: dict[str, Any]) -> dict[str, float]:
    """A round's held-out results as flat metrics for metrics.jsonl and the trackers: per scorer, the win rate
    and its interval, the mean score difference and its interval."""
    out: dict[str, float] = {"step": record["step"], "round": record["round"]}
    for name, r in record["scorers"].items():
        out |= {f"heldout_{name}_win_rate": r["rate"], f"heldout_{name}_win_rate_low": r["low"],
                f"heldout_{name}_win_rate_high": r["high"], f"heldout_{name}_score_diff": r["mean_diff"],
                f"heldout_{name}_score_diff_low": r["diff_low"], f"heldout_{name}_score_diff_high": r["diff_high"]}
    return out
