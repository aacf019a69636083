"""Evaluation: does the adapter win, and can a person see it?

`evaluate_adapter` (the `lora-dpo eval` command) generates, for every prompt and seed, one image with the base
and one per adapter strength (same seed, scheduler, steps and guidance), scores them with reward models and
reports the adapter's win rate with a bootstrap interval over prompts, plus grids to look at.

The modules, each importing only those above it:

* `errors`: `EvalError`, the one error this package raises (a `LoraDpoError`).
* `prompts`: `load_prompts` and its sources: prompt files, dataset folders, hub datasets, PartiPrompts, HPS v2;
  `parse_numbers` for the `--scale` and `--seed` lists.
* `winrate`: `WinRate` and `win_rate`, the adapter's win rate with a bootstrap interval over prompts.
* `grids`: `GridRow` and `make_grid`, images side by side with notes and captions.
* `generation`: `Generation` (settings that make images comparable), image paths, stamped PNGs that a later run
  reuses, `load_pipeline` and `open_generation`, seeded `generate`, `generate_or_reuse` (one stamped image), and
  `generate_images` over prompts, seeds and strengths.
* `report`: scoring (`build_scorers`, `score_images`), the report (`build_report`, `summary_lines`,
  `write_markdown`, `write_grids`) and `evaluate_adapter`, which runs them all.

The samples and the plot made while training live in `lora_dpo.train.samples`, beside training.
"""

from __future__ import annotations

from lora_dpo.evaluate.errors import EvalError
from lora_dpo.evaluate.generation import (
    Generation,
    adapter_file,
    base_from_recipe,
    decode_latents,
    generate,
    generate_images,
    generate_or_reuse,
    image_path,
    load_pipeline,
    open_generation,
    pipeline_from_parts,
    variant_name,
)
from lora_dpo.evaluate.grids import GridRow, make_grid
from lora_dpo.evaluate.prompts import load_prompts, parse_numbers
from lora_dpo.evaluate.report import (
    build_report,
    build_scorers,
    evaluate_adapter,
    score_images,
    summary_lines,
    write_grids,
    write_markdown,
)
from lora_dpo.evaluate.winrate import WinRate, win_rate

__all__ = [
    "EvalError",
    "Generation",
    "GridRow",
    "WinRate",
    "adapter_file",
    "base_from_recipe",
    "build_report",
    "build_scorers",
    "decode_latents",
    "evaluate_adapter",
    "generate",
    "generate_images",
    "generate_or_reuse",
    "image_path",
    "load_pipeline",
    "load_prompts",
    "make_grid",
    "open_generation",
    "parse_numbers",
    "pipeline_from_parts",
    "score_images",
    "summary_lines",
    "variant_name",
    "win_rate",
    "write_grids",
    "write_markdown",
]
