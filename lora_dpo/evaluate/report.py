"""The evaluation and its report: `evaluate_adapter` (the `lora-dpo eval` command) generates, scores the images
with reward models (`build_scorers`, `score_images`), and writes the report as data (`build_report`,
`report.json`), as text (`write_markdown`, `summary_lines`) and as grids (`write_grids`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lora_dpo.evaluate.errors import EvalError
from lora_dpo.evaluate.generation import (
    adapter_file,
    base_from_recipe,
    generate_images,
    image_path,
    label,
    open_generation,
    variant_name,
)
from lora_dpo.evaluate.grids import GridRow, make_grid
from lora_dpo.evaluate.winrate import win_rate

log = logging.getLogger(__name__)

SCORE_CHUNK = 32  # images held in memory at once while scoring
# Below this many prompts the bootstrap, which can only resample the prompts it has, gives intervals too narrow (and
# too lumpy) to trust: a report says so next to every interval instead of printing it as a result.
FEW_PROMPTS = 20


def score_images(scorers: Sequence[Any], prompts: Sequence[str], seeds: Sequence[int], variants: Sequence[str],
                 images_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    """scores[scorer name][variant]: array (prompts, seeds). Images are read in chunks, not all at once."""
    keys = [(index, seed) for index in range(len(prompts)) for seed in seeds]
    scores: dict[str, dict[str, np.ndarray]] = {}
    for scorer in scorers:
        scores[scorer.name] = {}
        for variant in variants:
            values = []
            for start in range(0, len(keys), SCORE_CHUNK):
                chunk = keys[start:start + SCORE_CHUNK]
                images = [Image.open(image_path(images_dir, i, s, variant)).convert("RGB") for i, s in chunk]
                values.append(scorer.score([prompts[i] for i, _ in chunk], images).detach().double().cpu().numpy())
            scores[scorer.name][variant] = np.concatenate(values).reshape(len(prompts), len(seeds))
    return scores


def build_scorers(specs: Sequence[str]) -> list[Any]:
    """Scorers from `KIND[@SOURCE]` specs (lora_dpo.rewards), on the GPU when there is one. A `:WEIGHT` only
    matters when scorers are mixed to relabel pairs; here every scorer is reported on its own."""
    from lora_dpo import rewards

    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorers = []
    for spec in specs:
        try:
            kind, source, weight = rewards.parse_scorer_spec(spec)
            if weight != 1.0:
                log.warning("--scorer %s: the weight has no effect in eval; every scorer is reported on its own", spec)
            scorers.append(rewards.build_scorer(kind, source, device=device))
        except (ValueError, OSError) as err:
            raise EvalError(f"--scorer {spec!r}: {str(err).splitlines()[0]}") from None
    names = [scorer.name for scorer in scorers]
    if len(set(names)) != len(names):
        raise EvalError(f"--scorer: give each kind once (got {', '.join(names)})")
    return scorers


def build_report(meta: dict[str, Any], prompts: Sequence[str], seeds: Sequence[int], scales: Sequence[float],
                 scores: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """The whole evaluation as plain data: settings, per-scorer and per-scale summary, per-prompt scores."""
    groups = np.repeat(np.arange(len(prompts)), len(seeds))  # the bootstrap resamples prompts
    summary: dict[str, dict[str, Any]] = {}
    for name, by_variant in scores.items():
        base = by_variant["base"]
        summary[name] = {}
        for scale in scales:
            adapter = by_variant[variant_name(scale)]
            result = asdict(win_rate(adapter.ravel(), base.ravel(), groups))
            summary[name][f"{scale:g}"] = {**result, "mean_base": float(base.mean()),
                                           "mean_adapter": float(adapter.mean()),
                                           "interval_note": interval_note(result, len(prompts))}
    per_prompt = [
        {"index": index, "prompt": prompt,
         "scores": {name: {variant: values[index].tolist() for variant, values in by_variant.items()}
                    for name, by_variant in scores.items()}}
        for index, prompt in enumerate(prompts)]
    return {**meta, "seeds": list(seeds), "scales": list(scales), "n_prompts": len(prompts),
            "summary": summary, "per_prompt": per_prompt}


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _prompts(n: int) -> str:
    return _count(n, "prompt")


def _flat(low: float, high: float) -> bool:
    return high - low < 1e-12  # every resampled prompt set gave the same value: no interval, not certainty


def interval_note(result: dict[str, Any], n_prompts: int) -> str:
    """Why the win rate's interval is not to be read as a result ("" when it may be): a zero-width one (every
    resampled set of prompts gives the same rate, e.g. 75 % on each of 3 prompts), or too few prompts."""
    notes = []
    if _flat(result["low"], result["high"]):
        notes.append(f"no interval: resampling the {_prompts(n_prompts)} never moves the rate")
    if n_prompts < FEW_PROMPTS:
        notes.append(f"{_prompts(n_prompts)} are too few to trust an interval (evaluate {FEW_PROMPTS} or more)"
                     if n_prompts > 1 else f"1 prompt is too few for an interval (evaluate {FEW_PROMPTS} or more)")
    return "; ".join(notes)


def _rate_interval(r: dict[str, Any], n_prompts: int) -> str:
    """The win rate's 95 % interval as a phrase, with what it is over, or why there is none."""
    shown = "" if _flat(r["low"], r["high"]) else f"95 % CI {r['low']:.1%} - {r['high']:.1%} over {_prompts(n_prompts)}"
    note = r.get("interval_note", "")
    return "; ".join(part for part in (shown, note) if part)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """For the terminal: per scorer, what its scores mean, then one line per strength."""
    lines, units = [], report.get("scorer_units", {})
    n_prompts, n_seeds = report["n_prompts"], len(report["seeds"])
    for name, by_scale in report["summary"].items():
        if units.get(name):
            lines.append(f"{name}: {units[name]}")
        for scale, r in by_scale.items():
            lines.append(f"{name}, {label(float(scale))}: wins {r['rate']:.1%} of {_count(r['n'], 'comparison')} "
                         f"({_prompts(n_prompts)} x {_count(n_seeds, 'seed')}); {_rate_interval(r, n_prompts)}; "
                         f"mean difference {r['mean_diff']:+.4g}")
    return lines


def write_markdown(report: dict[str, Any], path: Path) -> None:
    """A readable report: the headline table, how to read it, the grids, then every prompt."""
    gen = report["generation"]
    n = report["n_prompts"] * len(report["seeds"])
    lines = [
        f"# Evaluation of `{report['adapter']}`", "",
        f"Adapter file `{report['adapter_file']}`, sha256 `{report['adapter_sha256']}`.", "",
        f"Base `{report['base']}`; prompts `{report['prompts']}` ({report['n_prompts']} prompts x "
        f"{len(report['seeds'])} seeds = {n} comparisons per strength); {gen['steps']} steps of "
        f"{gen['scheduler']}, guidance {gen['guidance_scale']:g}, {gen['resolution']} px, {gen['precision']}.", "",
    ]
    n_prompts = report["n_prompts"]
    if report["summary"] and n_prompts < FEW_PROMPTS:
        lines += [f"**Only {_prompts(n_prompts)}: too few to trust the intervals below.** Each resamples these "
                  f"{_prompts(n_prompts)}, so it is narrower than the truth: read the table as a first look, not a "
                  f"result, and evaluate {FEW_PROMPTS} or more (e.g. `--prompts parti --limit 100`).", ""]
    if report["summary"]:
        lines += [f"| scorer | images | win rate (95 % CI over {_prompts(n_prompts)}) | mean diff (95 % CI) | "
                  "base mean | adapter mean | wins / ties / losses |", "|---|---|---|---|---|---|---|"]
        for name, by_scale in report["summary"].items():
            for scale, r in by_scale.items():
                rate = "no interval" if _flat(r["low"], r["high"]) else f"{r['low']:.1%} - {r['high']:.1%}"
                diff = ("no interval" if _flat(r["diff_low"], r["diff_high"]) else
                        f"{r['diff_low']:+.4g} - {r['diff_high']:+.4g}")
                lines.append(
                    f"| {name} | {label(float(scale))} | **{r['rate']:.1%}** ({rate}) | {r['mean_diff']:+.4g} "
                    f"({diff}) | {r['mean_base']:.4g} | {r['mean_adapter']:.4g} | {r['wins']} / {r['ties']} / "
                    f"{r['losses']} |")
        lines += ["", "The win rate is the share of (prompt, seed) comparisons in which the scorer rates the adapter's "
                  "image above the base's image from the same seed; a tie counts half. 50 % means no difference. The "
                  "interval resamples whole prompts (bootstrap): when it excludes 50 %, the difference is unlikely to "
                  "be chance at this number of prompts; \"no interval\" means every resampled set of prompts gave the "
                  "same value, which is not certainty. `adapter x1` is the adapter as trained, `adapter x0.5` its "
                  "weights halved. Scores of different scorers are on different scales; compare win rates, not raw "
                  "means, across scorers.", ""]
        units = report.get("scorer_units", {})
        lines += ["What the scores mean:", "", *(f"- **{name}**: {units.get(name) or 'in the scorer’s own unit'}"
                                                for name in report["summary"]), ""]
    else:
        lines += ["No scorer was given (`--scorer pickscore`): images and grids only.", ""]
    lines += ["## Grids", "", "Columns: the base, then the adapter at each strength; same seed in every column.", ""]
    lines += [f"![grid {number}]({grid})\n" for number, grid in enumerate(report["grids"])]
    if report["summary"]:
        variants = ["base", *(variant_name(s) for s in report["scales"])]
        lines += ["## Per prompt", "", "Mean score over seeds.", "",
                  "| # | prompt | scorer | " + " | ".join(label(s) for s in [None, *report["scales"]]) + " |",
                  "|---|---|---|" + "---|" * len(variants)]
        for row in report["per_prompt"]:
            prompt = row["prompt"].replace("|", "\\|")
            for name, by_variant in row["scores"].items():
                values = " | ".join(f"{np.mean(by_variant[v]):.4g}" for v in variants)
                lines.append(f"| {row['index']} | {prompt} | {name} | {values} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_grids(report: dict[str, Any], images_dir: Path, grids_dir: Path, rows_per_grid: int = 8,
                cell: int | None = None) -> list[Path]:
    """Grids of `rows_per_grid` (prompt, seed) rows: base | adapter at each strength, under each image its
    scores (and, for the adapter, the difference to the base)."""
    grids_dir.mkdir(parents=True, exist_ok=True)
    for old in grids_dir.glob("grid-*.png"):  # a rerun on fewer prompts must not leave stale grids behind
        old.unlink()
    variants = ["base", *(variant_name(s) for s in report["scales"])]
    titles = [label(s) for s in [None, *report["scales"]]]
    keys = [(entry, k, seed) for entry in report["per_prompt"] for k, seed in enumerate(report["seeds"])]
    paths = []
    for number, start in enumerate(range(0, len(keys), rows_per_grid)):
        rows = []  # opened grid by grid: thousands of prompts must not hold thousands of files open
        for entry, k, seed in keys[start:start + rows_per_grid]:
            notes = ["\n".join(f"{name} {scores[v][k]:.3f}" + ("" if v == "base" else
                                                                 f" ({scores[v][k] - scores['base'][k]:+.3f})")
                               for name, scores in entry["scores"].items())
                     for v in variants]
            images = [Image.open(image_path(images_dir, entry["index"], seed, v)) for v in variants]
            rows.append(GridRow(images, f"#{entry['index']} seed {seed}: {entry['prompt']}", notes))
        path = grids_dir / f"grid-{number:03d}.png"
        make_grid(rows, titles, cell).save(path, optimize=True)
        paths.append(path)
    return paths


def evaluate_adapter(adapter: Path, prompts: Sequence[str], prompt_source: str, scorers: Sequence[Any],
                     out_dir: Path, *, base: str | None = None, scales: Sequence[float] = (1.0,),
                     seeds: Sequence[int] = (0,), steps: int = 30, guidance_scale: float | None = None,
                     resolution: int | None = None, precision: str = "bf16", rows_per_grid: int = 8,
                     cell: int | None = None) -> dict[str, Any]:
    """Generate (resumably), score, and write `report.json`, `report.md`, `grids/` and `images/` into
    `out_dir`. Returns the report. `guidance_scale`/`resolution` None: the pipeline's own defaults."""
    adapter_file(adapter)  # a missing adapter fails here, before the base is loaded
    base = base or base_from_recipe(adapter)
    scales, seeds = list(dict.fromkeys(scales)), list(dict.fromkeys(seeds))  # a repeat would be counted twice
    if not scales or any(s <= 0 for s in scales):
        raise EvalError(f"--scale {list(scales)}: give one or more positive adapter strengths")
    pipe, gen = open_generation(base, adapter, steps=steps, guidance_scale=guidance_scale, resolution=resolution,
                                precision=precision)
    images_dir = out_dir / "images"
    made = generate_images(pipe, prompts, seeds, scales, gen, images_dir)
    total = len(prompts) * len(seeds) * (1 + len(scales))
    log.info("generated %d images, reused %d from an earlier run", made, total - made)
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    scores = score_images(scorers, prompts, seeds, ["base", *(variant_name(s) for s in scales)], images_dir)
    # the file scored and its sha256 (of its bytes: what training printed and metrics.json records for this file)
    meta = {"adapter": str(adapter), "adapter_file": str(adapter_file(adapter)), "adapter_sha256": gen.adapter_sha256,
            "base": base, "prompts": prompt_source, "generation": asdict(gen), "images_generated": made,
            "images_reused": total - made,
            "scorer_units": {s.name: getattr(s, "unit", "") for s in scorers}}  # a scorer of your own may say none
    report = build_report(meta, prompts, seeds, scales, scores)
    grids = write_grids(report, images_dir, out_dir / "grids", rows_per_grid, cell)
    report["grids"] = [str(p.relative_to(out_dir)) for p in grids]
    (out_dir / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_markdown(report, out_dir / "report.md")
    return report
