"""Evaluation: does the adapter win, and can a person see it?

`evaluate_adapter` (the `lora-dpo eval` command) generates, for every prompt and seed, one image with the base
and one per adapter strength (same seed, scheduler, steps and guidance), scores them with reward models and
reports the adapter's win rate with a bootstrap interval over prompts, plus grids to look at. During training,
`TrainingSampler` draws the same side-by-side grid from the UNet being trained, and `plot_training` draws the
run's curves from `metrics.jsonl`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

from lora_dpo import models
from lora_dpo.export import ADAPTER_FILE
from lora_dpo.recipe import Recipe

log = logging.getLogger(__name__)


class EvalError(ValueError):
    """An evaluation that cannot run: the message names the input and says what to do."""


ADAPTER_NAME = "adapter"  # the name the adapter is loaded under in the pipeline
PROMPT_COLUMNS = ("prompt", "caption", "text")  # looked for, in this order and case-insensitively
PARTI = ("nateraw/parti-prompts", "train")  # PartiPrompts (1632 prompts, column `Prompt`)
HPSV2_REPO = "zhwang/HPDv2"  # the HPS v2 benchmark: benchmark/<style>.json, 800 prompts each
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")
DEFAULT_SAMPLE_PROMPTS = 4  # training samples when [sample].prompts is empty
SCORE_CHUNK = 32  # images held in memory at once while scoring
PNG_KEY = "lora-dpo"  # PNG text chunk that makes a saved image reusable: prompt, seed, settings fingerprint


# --------------------------------------------------------------------------------------------------
# Prompt sets


def load_prompts(spec: str, limit: int | None = None) -> list[str]:
    """Prompts from a `.txt` (one a line), a `.csv`/`.tsv`/`.jsonl`/`.json` with a prompt column (a `.json`
    may also be a list of strings), `parti` (PartiPrompts), `hpsv2` or `hpsv2:<style>` (the HPS v2
    benchmark), a local dataset folder, or a hub dataset id `owner/name[:split]`."""
    key, path = spec.strip().lower(), Path(spec)
    if key in ("parti", "partiprompts"):
        prompts = _dataset_prompts(*PARTI)
    elif key.split(":")[0] in ("hpsv2", "hps"):
        prompts = _hpsv2_prompts(key)
    elif path.is_file():
        prompts = _file_prompts(path)
    elif path.is_dir():
        prompts = _dataset_prompts(str(path), "train")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", spec.strip()):
        name, _, split = spec.strip().partition(":")
        prompts = _dataset_prompts(name, split or "train")
    else:
        raise EvalError(f"--prompts {spec!r}: no such file, and not `parti`, `hpsv2[:STYLE]` or a hub dataset id")
    prompts = [str(p).strip() for p in prompts if p is not None and str(p).strip()]
    if not prompts:
        raise EvalError(f"--prompts {spec!r}: no prompts found")
    return prompts[:limit] if limit else prompts


def _column(columns: Sequence[str], where: str) -> str:
    lower = {c.lower(): c for c in columns}
    for name in PROMPT_COLUMNS:
        if name in lower:
            return lower[name]
    raise EvalError(f"{where}: no prompt column (looked for {', '.join(PROMPT_COLUMNS)}); found {list(columns)}")


def _file_prompts(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".txt":
        return text.splitlines()
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        column = _column(reader.fieldnames or [], str(path))
        return [row[column] for row in reader]
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise EvalError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    elif suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise EvalError(f"{path}: not valid JSON ({err.msg})") from None
        if isinstance(rows, list) and all(isinstance(r, str) for r in rows):
            return rows  # the HPS v2 benchmark files are plain lists of prompts
    else:
        raise EvalError(f"{path}: expected a .txt, .csv, .tsv, .jsonl or .json prompt file")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise EvalError(f"{path}: expected a list of prompts or of objects with a prompt key")
    column = _column(sorted({k for r in rows for k in r}), str(path))
    return [r.get(column) for r in rows]


def _dataset_prompts(name: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise EvalError(f"--prompts {name!r}: hub and folder datasets need the `datasets` package "
                        "(pip install datasets)") from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types; all mean "cannot use this name"
        raise EvalError(f"--prompts {name!r}: cannot load split {split!r} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); check the name, split and network") from None
    return list(dataset[_column(dataset.column_names, name)])


def _hpsv2_prompts(key: str) -> list[str]:
    """The benchmark ships as JSON lists of strings, which `datasets` cannot read as a table: fetch the files
    and read them like a local `.json` prompt file."""
    style = key.partition(":")[2]
    if style and style not in HPSV2_STYLES:
        raise EvalError(f"--prompts {key!r}: HPS v2 styles are {', '.join(HPSV2_STYLES)}")
    from huggingface_hub import hf_hub_download

    prompts: list[str] = []
    for name in [style] if style else HPSV2_STYLES:
        try:
            path = hf_hub_download(HPSV2_REPO, f"benchmark/{name}.json", repo_type="dataset")
        except Exception as err:
            raise EvalError(f"--prompts {key!r}: cannot download {HPSV2_REPO}/benchmark/{name}.json "
                            f"({type(err).__name__}); check your network, or pass a local copy") from None
        prompts += _file_prompts(Path(path))
    return prompts


# --------------------------------------------------------------------------------------------------
# Win rate


@dataclass(frozen=True)
class WinRate:
    """How often the adapter's image beats the base's image from the same prompt and seed.

    `rate` counts a tie as half a win; `low`, `high` are the bootstrap interval of the rate, `diff_low`,
    `diff_high` that of `mean_diff` (adapter minus base score)."""

    rate: float
    low: float
    high: float
    mean_diff: float
    diff_low: float
    diff_high: float
    wins: int
    ties: int
    losses: int
    n: int


def win_rate(adapter: Any, base: Any, groups: Any = None, *, draws: int = 2000, confidence: float = 0.95,
             seed: int = 0) -> WinRate:
    """Win rate of `adapter` scores over `base` scores, compared element by element, with a percentile
    bootstrap interval. `groups` (e.g. the prompt of each comparison) are resampled as whole clusters: the
    seeds of one prompt are not independent evidence, so they must not narrow the interval as if they were."""
    a, b = np.asarray(adapter, dtype=np.float64).ravel(), np.asarray(base, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two equal-length, non-empty score lists; got {a.size} and {b.size}")
    outcome = np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))  # (N,)
    diff = a - b
    _, group = np.unique(np.arange(a.size) if groups is None else np.asarray(groups).ravel(), return_inverse=True)
    if group.size != a.size:
        raise ValueError(f"got {group.size} group labels for {a.size} comparisons")
    G = int(group.max()) + 1
    counts = np.bincount(group, minlength=G).astype(np.float64)  # (G,) comparisons per group
    # Each draw takes G groups with replacement: how often each group is taken is multinomial.
    taken = np.random.default_rng(seed).multinomial(G, np.full(G, 1.0 / G), size=draws).astype(np.float64)
    total = taken @ counts  # (draws,)
    rates = taken @ np.bincount(group, outcome, G) / total
    diffs = taken @ np.bincount(group, diff, G) / total
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(rates, [tail, 1.0 - tail])
    diff_low, diff_high = np.quantile(diffs, [tail, 1.0 - tail])
    return WinRate(rate=float(outcome.mean()), low=float(low), high=float(high), mean_diff=float(diff.mean()),
                   diff_low=float(diff_low), diff_high=float(diff_high), wins=int((outcome == 1).sum()),
                   ties=int((outcome == 0.5).sum()), losses=int((outcome == 0).sum()), n=int(a.size))


# --------------------------------------------------------------------------------------------------
# Grids


@dataclass
class GridRow:
    """One row of a grid: images side by side, a short note under each, the caption under the row."""

    images: list[Image.Image]
    caption: str
    notes: list[str] = field(default_factory=list)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _fit(image: Image.Image, cell: int) -> Image.Image:
    """Nearest-neighbour when enlarging (a 64 px image shows its real pixels), Lanczos when shrinking."""
    method = Image.Resampling.NEAREST if max(image.size) < cell else Image.Resampling.LANCZOS
    return ImageOps.contain(image.convert("RGB"), (cell, cell), method)


def make_grid(rows: Sequence[GridRow], titles: Sequence[str], cell: int | None = None) -> Image.Image:
    """Columns titled `titles`, one row per GridRow, the row's caption (wrapped, at most 3 lines) under it.
    Cells are `cell` px square; by default the images' own size, kept between 128 px (narrower cells cannot
    carry a readable note) and 256 px (a grid of 1024 px images would weigh megabytes)."""
    cell = max(128, cell or min(256, max(rows[0].images[0].size) if rows else 256))
    font, small, pad, gap = _font(14), _font(12), 6, 4
    line, small_line = 18, 15
    width = pad * 2 + len(titles) * cell + (len(titles) - 1) * gap
    chars = max(20, int((width - 2 * pad) / 7.5))  # ~7.5 px per character of the 14 px default font
    notes_lines = max((len(n.splitlines()) for r in rows for n in r.notes), default=0)
    captions = [textwrap.wrap(r.caption, chars, max_lines=3, placeholder=" ...") for r in rows]
    heights = [cell + notes_lines * small_line + len(c) * line + 3 * pad for c in captions]
    header = line + 2 * pad
    grid = Image.new("RGB", (width, header + sum(heights)), "white")
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(titles):
        draw.text((pad + column * (cell + gap) + cell / 2, pad), title, fill="black", font=font, anchor="ma")
    y = header
    for row, caption, height in zip(rows, captions, heights, strict=True):
        for column, image in enumerate(row.images):
            x = pad + column * (cell + gap)
            fitted = _fit(image, cell)
            grid.paste(fitted, (x + (cell - fitted.width) // 2, y + (cell - fitted.height) // 2))
            if column < len(row.notes):
                draw.multiline_text((x + 2, y + cell + 2), row.notes[column], fill=(70, 70, 70), font=small,
                                    spacing=2)
        text_y = y + cell + notes_lines * small_line + pad
        for number, text in enumerate(caption):
            draw.text((pad, text_y + number * line), text, fill="black", font=font)
        y += height
        draw.line((0, y - 1, width, y - 1), fill=(200, 200, 200))
    return grid


# --------------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class Generation:
    """Everything that must be equal for base and adapter images to be compared, and for a saved image to be
    reused by a later run."""

    base: str
    adapter_sha256: str
    scheduler: str
    steps: int
    guidance_scale: float
    resolution: int
    precision: str

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def variant_name(scale: float | None) -> str:
    """`base` for the adapter off, `adapter-<scale>` (e.g. `adapter-0.5`) for the adapter at a strength."""
    return "base" if scale is None else f"adapter-{scale:g}"


def image_path(images_dir: Path, index: int, seed: int, variant: str) -> Path:
    return images_dir / f"{index:05d}_{seed}_{variant}.png"


def _save_png(image: Image.Image, path: Path, stamp: dict[str, Any]) -> None:
    """Written under a temporary name and renamed: an interrupted run never leaves a half image to reuse."""
    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(stamp, sort_keys=True))
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def _reusable(path: Path, stamp: dict[str, Any]) -> bool:
    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            return json.loads(image.text.get(PNG_KEY, "null")) == stamp
    except (OSError, ValueError):
        return False


def adapter_file(adapter: Path) -> Path:
    """A run folder (`adapters/<run>`) or the adapter's `.safetensors` file itself."""
    path = adapter / ADAPTER_FILE if adapter.is_dir() else adapter
    if not path.is_file() or path.suffix != ".safetensors":
        raise EvalError(f"{adapter}: no adapter here; pass a run folder holding {ADAPTER_FILE} or a "
                        ".safetensors LoRA file")
    return path


def base_from_recipe(adapter: Path) -> str:
    """The base an adapter was trained on, from the `recipe.toml` written beside it."""
    import tomllib

    path = adapter_file(adapter).parent / "recipe.toml"
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))["model"]["base"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        raise EvalError(f"{adapter}: no recipe.toml with [model].base beside the adapter; pass --base") from None


def load_pipeline(base: str, adapter: Path, device: torch.device, dtype: torch.dtype) -> Any:
    """The stock diffusers pipeline of `base` with the adapter loaded as `load_lora_weights` loads it."""
    from diffusers import DiffusionPipeline

    source = models.resolve_base(base)
    try:
        with warnings.catch_warnings():  # diffusers 0.42 renames torch_dtype; older releases know only that
            warnings.filterwarnings("ignore", ".*torch_dtype.*", FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(source, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise EvalError(f"--base {base!r}: cannot load the pipeline: {str(err).splitlines()[0]}") from None
    if not hasattr(pipe, "load_lora_weights"):
        raise EvalError(f"--base {base!r}: {type(pipe).__name__} does not take LoRA adapters; lora-dpo evaluates "
                        "SD 1.5 and SDXL text-to-image pipelines")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    file = adapter_file(adapter)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=ADAPTER_NAME)
    return pipe


def _use_scale(pipe: Any, scale: float | None) -> None:
    """Adapter off (`None`: exactly the base) or on at `scale`."""
    if scale is None:
        pipe.disable_lora()
    else:
        pipe.enable_lora()
        pipe.set_adapters([ADAPTER_NAME], adapter_weights=[scale])


def generate(pipe: Any, prompt: str, seed: int, steps: int, guidance_scale: float, resolution: int,
             output_type: str = "pil") -> Any:
    """One image (or its latents). The initial noise comes from a CPU generator seeded with `seed`: the same
    noise on any device, so base and adapter images of one seed start from the same point."""
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, height=resolution,
               width=resolution, generator=generator, output_type=output_type)
    return out.images[0] if output_type == "pil" else out.images


def generate_images(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], scales: Sequence[float],
                    gen: Generation, images_dir: Path) -> int:
    """Every (prompt, seed) with the adapter off and at every scale, saved as PNGs in `images_dir`. An image
    already there, made from the same prompt, seed and settings, is reused. Returns how many were made."""
    from tqdm.auto import tqdm

    images_dir.mkdir(parents=True, exist_ok=True)
    made = 0
    for index, prompt in enumerate(tqdm(prompts, desc="eval", unit="prompt")):
        for scale in (None, *scales):
            for seed in seeds:
                variant = variant_name(scale)
                path = image_path(images_dir, index, seed, variant)
                stamp = {"prompt": prompt, "seed": seed, "variant": variant, "settings": gen.fingerprint()}
                if _reusable(path, stamp):
                    continue
                _use_scale(pipe, scale)
                _save_png(generate(pipe, prompt, seed, gen.steps, gen.guidance_scale, gen.resolution), path, stamp)
                made += 1
    return made


# --------------------------------------------------------------------------------------------------
# Scoring and the report


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
                                           "mean_adapter": float(adapter.mean())}
    per_prompt = [
        {"index": index, "prompt": prompt,
         "scores": {name: {variant: values[index].tolist() for variant, values in by_variant.items()}
                    for name, by_variant in scores.items()}}
        for index, prompt in enumerate(prompts)]
    return {**meta, "seeds": list(seeds), "scales": list(scales), "n_prompts": len(prompts),
            "summary": summary, "per_prompt": per_prompt}


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per scorer and strength, for the terminal."""
    return [f"{name} x{scale}: adapter wins {r['rate']:.1%} (95 % CI {r['low']:.1%} - {r['high']:.1%}) of {r['n']}; "
            f"mean difference {r['mean_diff']:+.4g}"
            for name, by_scale in report["summary"].items() for scale, r in by_scale.items()]


def write_markdown(report: dict[str, Any], path: Path) -> None:
    """A readable report: the headline table, how to read it, the grids, then every prompt."""
    gen = report["generation"]
    n = report["n_prompts"] * len(report["seeds"])
    lines = [
        f"# Evaluation of `{report['adapter']}`", "",
        f"Base `{report['base']}`; prompts `{report['prompts']}` ({report['n_prompts']} prompts x "
        f"{len(report['seeds'])} seeds = {n} comparisons per strength); {gen['steps']} steps of "
        f"{gen['scheduler']}, guidance {gen['guidance_scale']:g}, {gen['resolution']} px, {gen['precision']}.", "",
    ]
    if report["summary"]:
        lines += ["| scorer | strength | win rate (95 % CI) | mean diff (95 % CI) | base mean | adapter mean | "
                  "wins / ties / losses |", "|---|---|---|---|---|---|---|"]
        for name, by_scale in report["summary"].items():
            for scale, r in by_scale.items():
                lines.append(
                    f"| {name} | {scale} | **{r['rate']:.1%}** ({r['low']:.1%} - {r['high']:.1%}) | "
                    f"{r['mean_diff']:+.4g} ({r['diff_low']:+.4g} - {r['diff_high']:+.4g}) | {r['mean_base']:.4g} | "
                    f"{r['mean_adapter']:.4g} | {r['wins']} / {r['ties']} / {r['losses']} |")
        lines += ["", "The win rate is the share of (prompt, seed) comparisons in which the scorer rates the adapter's "
                  "image above the base's image from the same seed; a tie counts half. 50 % means no difference. The "
                  "interval resamples whole prompts (bootstrap): when it excludes 50 %, the difference is unlikely to "
                  "be chance at this number of prompts. Scores of different scorers are on different scales; "
                  "compare win rates, not raw means, across scorers.", ""]
    else:
        lines += ["No scorer was given (`--scorer pickscore`): images and grids only.", ""]
    lines += ["## Grids", "", "Columns: the base, then the adapter at each strength; same seed in every column.", ""]
    lines += [f"![grid {number}]({grid})\n" for number, grid in enumerate(report["grids"])]
    if report["summary"]:
        variants = ["base", *(variant_name(s) for s in report["scales"])]
        lines += ["## Per prompt", "", "Mean score over seeds.", "",
                  "| # | prompt | scorer | " + " | ".join(variants) + " |",
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
    titles = ["base", *(f"adapter x{s:g}" for s in report["scales"])]
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
    import inspect

    file = adapter_file(adapter)
    base = base or base_from_recipe(adapter)
    scales, seeds = list(dict.fromkeys(scales)), list(dict.fromkeys(seeds))  # a repeat would be counted twice
    if not scales or any(s <= 0 for s in scales):
        raise EvalError(f"--scale {list(scales)}: give one or more positive adapter strengths")
    cuda = torch.cuda.is_available()
    precision = precision if cuda and precision != "no" else "fp32"  # half precision on CPU is slow, poorly supported
    device = torch.device("cuda" if cuda else "cpu")
    pipe = load_pipeline(base, adapter, device, {"fp32": torch.float32, "fp16": torch.float16,
                                                 "bf16": torch.bfloat16}[precision])
    if guidance_scale is None:
        guidance_scale = inspect.signature(pipe.__call__).parameters["guidance_scale"].default
    gen = Generation(base=base, adapter_sha256=hashlib.sha256(file.read_bytes()).hexdigest(),
                     scheduler=type(pipe.scheduler).__name__, steps=steps, guidance_scale=float(guidance_scale),
                     resolution=resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor,
                     precision=precision)
    images_dir = out_dir / "images"
    made = generate_images(pipe, prompts, seeds, scales, gen, images_dir)
    total = len(prompts) * len(seeds) * (1 + len(scales))
    log.info("generated %d images, reused %d from an earlier run", made, total - made)
    del pipe
    if cuda:
        torch.cuda.empty_cache()
    scores = score_images(scorers, prompts, seeds, ["base", *(variant_name(s) for s in scales)], images_dir)
    meta = {"adapter": str(adapter), "base": base, "prompts": prompt_source, "generation": asdict(gen),
            "images_generated": made, "images_reused": total - made}
    report = build_report(meta, prompts, seeds, scales, scores)
    grids = write_grids(report, images_dir, out_dir / "grids", rows_per_grid, cell)
    report["grids"] = [str(p.relative_to(out_dir)) for p in grids]
    (out_dir / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    write_markdown(report, out_dir / "report.md")
    return report


# --------------------------------------------------------------------------------------------------
# During training


def default_sample_prompts(prompts: Sequence[str], n: int = DEFAULT_SAMPLE_PROMPTS) -> list[str]:
    """The first `n` distinct prompts, in order."""
    return list(dict.fromkeys(p for p in prompts if p))[:n]


def pipeline_from_parts(base: models.BaseModel, unet: Any, revision: str | None = None) -> Any:
    """A stock pipeline around parts already in memory (no second UNet): the base's VAE, encoders and
    tokenizers, the given UNet, and a fresh instance of the base's own inference scheduler."""
    import diffusers

    if base.vae is None or not base.text_encoders:
        raise EvalError("[sample].every needs the base's VAE and text encoders in memory")
    config = type(base.noise_scheduler).load_config(base.source, subfolder="scheduler", revision=revision)
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    parts = {"vae": base.vae, "unet": unet, "scheduler": scheduler}
    if base.is_sdxl:
        pipe = diffusers.StableDiffusionXLPipeline(
            text_encoder=base.text_encoders[0], text_encoder_2=base.text_encoders[1], tokenizer=base.tokenizers[0],
            tokenizer_2=base.tokenizers[1], add_watermarker=False, **parts)
    else:
        pipe = diffusers.StableDiffusionPipeline(
            text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0], safety_checker=None,
            feature_extractor=None, requires_safety_checker=False, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class TrainingSampler:
    """Side-by-side grids while training: the base images once (`samples/base.png`), then base | adapter
    every `[sample].every` steps and at the end (`samples/step-000100.png`), from the UNet being trained."""

    def __init__(self, base: models.BaseModel, unet: Any, recipe: Recipe, prompts: Sequence[str],
                 out_dir: Path) -> None:
        self.cfg, self.resolution, self.out_dir = recipe.sample, recipe.data.resolution, out_dir
        self.pipe = pipeline_from_parts(base, unet, recipe.model.revision)
        self.rows = [(prompt, seed) for prompt in prompts for seed in self.cfg.seeds]
        self.base_images: list[Image.Image] | None = None

    @torch.no_grad()
    def _draw(self) -> list[Image.Image]:
        """The pipeline returns latents, decoded here by the VAE in its own precision: under mixed precision
        the latents come out in bf16/fp16 while the VAE may stay fp32 (the inverse of models.encode_images)."""
        vae, images = self.pipe.vae, []
        for prompt, seed in self.rows:
            latents = generate(self.pipe, prompt, seed, self.cfg.steps, self.cfg.guidance_scale, self.resolution,
                               output_type="latent")
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
            decoded = vae.decode(latents).sample.float()
            images += self.pipe.image_processor.postprocess(decoded, output_type="pil")
        return images

    def maybe_sample(self, step: int, final: bool = False) -> Path | None:
        """Sample when `step` is due; puts the UNet back in the train/eval mode it was in."""
        if not (final or step % self.cfg.every == 0):
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        unet = self.pipe.unet
        was_training = unet.training
        unet.eval()
        try:
            if self.base_images is None:
                with models.adapters_disabled(unet):
                    self.base_images = self._draw()
                make_grid(self._rows([self.base_images]), ["base"]).save(self.out_dir / "base.png")
            adapter_images = self._draw()
        finally:
            unet.train(was_training)
        path = self.out_dir / f"step-{step:06d}.png"
        make_grid(self._rows([self.base_images, adapter_images]), ["base", f"adapter, step {step}"]).save(path)
        log.info("samples: %s", path)
        return path

    def _rows(self, columns: list[list[Image.Image]]) -> list[GridRow]:
        return [GridRow([column[k] for column in columns], f"seed {seed}: {prompt}")
                for k, (prompt, seed) in enumerate(self.rows)]


def plot_training(metrics_file: Path, out_file: Path) -> Path | None:
    """Training loss, training and held-out reward accuracy, and learning rate against steps (a PNG).
    Uses matplotlib's Agg canvas directly: no display, no global pyplot state."""
    if not metrics_file.is_file():
        return None
    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    if not records:
        return None
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[float], list[float]]:
        points = [(r["step"], r[key]) for r in records if key in r]
        return [p[0] for p in points], [p[1] for p in points]

    figure = Figure(figsize=(7, 7.5), layout="constrained")
    loss_axes, accuracy_axes, lr_axes = figure.subplots(3, 1, sharex=True)
    for axes, keys, ylabel in ((loss_axes, ("loss", "val_loss"), "loss"),
                               (accuracy_axes, ("reward_accuracy", "val_reward_accuracy"), "reward accuracy"),
                               (lr_axes, ("lr",), "learning rate")):
        for key in keys:
            steps, values = series(key)
            if steps:
                axes.plot(steps, values, marker="o" if key.startswith("val_") else None, markersize=3,
                          label={"val_loss": "held out", "val_reward_accuracy": "held out"}.get(key, "training"))
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if len(axes.lines) > 1:
            axes.legend(loc="best")
    accuracy_axes.axhline(0.5, color="grey", linestyle=":", linewidth=1)  # a fresh adapter: every pair a tie
    lr_axes.set_ylim(bottom=0)  # a constant rate reads as flat, not as noise around it
    lr_axes.set_xlabel("optimizer step")
    loss_axes.set_title(f"{metrics_file.parent.name}: training curves")
    figure.savefig(out_file, dpi=100)
    return out_file
