"""The commands around data and adapters: label, pairs, eval, export, merge, inspect, push."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from lora_dpo.cli.common import _fail, _quiet_imports, app, user_errors

ScorerOption = Annotated[list[str], typer.Option(help="KIND[@SOURCE][:WEIGHT], repeatable: pickscore, hps, clip, "
                                                     "aesthetic (e.g. --scorer pickscore --scorer aesthetic@F:0.3).")]


@app.command()
def label(
    data: Annotated[str, typer.Argument(help="Pairs to relabel: any [data].source (.jsonl, .csv, .parquet, hub id).")],
    scorer: ScorerOption,
    out: Annotated[Path, typer.Option(help="Output parquet in the Pick-a-Pic layout (label_0 = P(image 0 wins)).")],
    ties: Annotated[str, typer.Option(help="Human ties: drop them, as training does, or relabel them.")] = "drop",
    strict: Annotated[bool, typer.Option(help="Stop at the first unusable row instead of skipping it.")] = False,
    soft: Annotated[bool, typer.Option(help="Soft labels sigmoid(score difference) instead of 1/0.")] = False,
    batch_size: Annotated[int, typer.Option(help="Pairs scored per batch.")] = 16,
    device: Annotated[str, typer.Option(help="Device for the scorers.")] = "cpu",
) -> None:
    """Label pairs with reward models (AI feedback, as in the paper); resumable. The data's ties policy and
    filters apply first; unusable rows are skipped and counted. Train on the result with `[data] source = "OUT"`."""
    _quiet_imports()
    from lora_dpo import rewards

    with user_errors():
        scorers = rewards.build_scorers(scorer, device=device)
        summary = rewards.relabel_source(data, scorers, out, ties=ties, strict=strict, hard=not soft,
                                         batch_size=batch_size)
    for line in summary.lines(out):
        typer.echo(line)


@app.command()
def pairs(
    prompts: Annotated[str, typer.Argument(help="A .txt (one prompt a line) or anything `eval --prompts` takes.")],
    base: Annotated[str, typer.Option(help="Base pipeline: hub id, folder or `tiny`.")],
    scorer: ScorerOption,
    out: Annotated[Path, typer.Option(help="Output parquet in the Pick-a-Pic layout; `train` reads it as it is.")],
    adapter: Annotated[Path | None, typer.Option(help="Generate with base + this adapter (the next on-policy "
                                                 "round).")] = None,
    images_per_prompt: Annotated[int, typer.Option(min=2, help="Images per prompt; best vs worst is the pair.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of each prompt's first image (then seed + 1, ...).")] = 0,
    steps: Annotated[int, typer.Option(min=1, help="Inference steps.")] = 30,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale; default: the pipeline's own.")] = None,
    resolution: Annotated[int | None, typer.Option(min=8, help="Image size; default: the base's.")] = None,
    precision: Annotated[str, typer.Option(help="no, fp16 or bf16 on GPU; the CPU runs fp32.")] = "bf16",
) -> None:
    """A preference set from prompts alone: N images per prompt, scored, best vs worst; resumable (images are
    reused), with grids of what was chosen over what. Train on it with `[data] source = "OUT"`."""
    logging.basicConfig(level=logging.INFO, format="lora-dpo: %(message)s")
    _quiet_imports()
    from lora_dpo import pairs as pairs_module

    with user_errors():
        summary = pairs_module.run(prompts, base, scorer, out, adapter=adapter, images_per_prompt=images_per_prompt,
                                   seed=seed, steps=steps, guidance_scale=guidance,
                                   resolution=resolution, precision=precision)
    for line in summary.lines(out):
        typer.echo(line)


@app.command("eval")
def eval_(
    adapter: Annotated[Path, typer.Argument(help="Run folder (adapters/<run>) or its .safetensors LoRA file.")],
    prompts: Annotated[str, typer.Option(help="A .txt (one prompt a line), a .csv/.tsv/.jsonl/.json with a prompt "
                                         "column (a run's heldout.jsonl: the prompts it never trained on), "
                                         "`parti`, `hpsv2[:STYLE]`, or a hub dataset id[:split]. Each distinct "
                                         "prompt once.")],
    base: Annotated[str | None, typer.Option(help="Base pipeline: hub id, folder or `tiny`; default: the "
                                             "[model].base of the recipe.toml beside the adapter.")] = None,
    scorer: Annotated[list[str] | None, typer.Option(help="Reward model KIND[@SOURCE]: pickscore, clip, hps, "
                                                     "aesthetic, shapes (the demo's built-in pixel judge, no "
                                                     "download) or brightness (mean brightness: a reward made to be "
                                                     "gamed); repeat for several.")] = None,
    scale: Annotated[list[str] | None, typer.Option(help="Adapter strength(s), repeated or comma-separated; "
                                                    "each adds a column (default 1.0).")] = None,
    seed: Annotated[list[str] | None, typer.Option(help="Seed(s): one image per prompt and seed "
                                                   "(default 0).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N prompts.")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Inference steps.")] = 30,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale; default: the pipeline's own.")] = None,
    resolution: Annotated[int | None, typer.Option(min=8, help="Image size; default: the base's.")] = None,
    precision: Annotated[str, typer.Option(help="no, fp16 or bf16 on GPU; the CPU runs fp32.")] = "bf16",
    out: Annotated[Path | None, typer.Option(help="Output folder; default: <adapter folder>/eval.")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads for torch; default: torch's.")] = None,
) -> None:
    """Base vs base + adapter on a prompt set: win rates with 95 % intervals, report.md/json and grids."""
    if precision not in ("no", "fp16", "bf16"):
        _fail(f"--precision {precision!r}: expected no, fp16 or bf16")
    logging.basicConfig(level=logging.INFO, format="lora-dpo: %(message)s")
    _quiet_imports()
    import torch

    from lora_dpo import evaluate

    if threads:
        torch.set_num_threads(threads)
    with user_errors():
        scales = evaluate.parse_numbers(scale, [1.0], float, "--scale")
        seeds = evaluate.parse_numbers(seed, [0], int, "--seed")
        prompt_list = evaluate.load_prompts(prompts, limit)
        scorers = evaluate.build_scorers(scorer or [])
        out_dir = out or evaluate.adapter_file(adapter).parent / "eval"
        report = evaluate.evaluate_adapter(adapter, prompt_list, prompts, scorers, out_dir, base=base, scales=scales,
                                           seeds=seeds, steps=steps, guidance_scale=guidance, resolution=resolution,
                                           precision=precision)
    for line in evaluate.summary_lines(report):
        typer.echo(line)
    typer.echo(f"wrote {out_dir / 'report.md'}, {out_dir / 'report.json'} and {len(report['grids'])} grid(s)")


@app.command("export")
def export_(
    adapter: Annotated[str, typer.Argument(help="Adapter: run folder, .safetensors file or hub id (either format).")],
    out: Annotated[Path, typer.Option("--out", help="File to write (.safetensors).")],
    format_: Annotated[str, typer.Option("--format", help="`kohya` (ComfyUI, A1111, Forge) or `diffusers`.")] = "kohya",
    dtype: Annotated[str, typer.Option(help="Weight precision: fp16, bf16 or fp32.")] = "fp16",
    base: Annotated[str | None, typer.Option(help="Base the adapter is for (default: from its metadata).")] = None,
) -> None:
    """Convert an adapter to the kohya/webui or the diffusers format."""
    _quiet_imports()
    from lora_dpo.export import export_adapter

    with user_errors():
        path = export_adapter(adapter, out, format_, dtype, base)  # type: ignore[arg-type]
    typer.echo(f"wrote {path} ({format_}, {dtype})")


@app.command()
def merge(
    adapter: Annotated[str, typer.Argument(help="Adapter: run folder, .safetensors file or hub id.")],
    base: Annotated[str, typer.Option(help="Base: hub id, diffusers folder, single-file checkpoint or `tiny`.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the pipeline into (`diffusers`), or the "
                                      ".safetensors file to write (`single-file`).")],
    scale: Annotated[float, typer.Option(help="Adapter strength fused into the weights.")] = 1.0,
    dtype: Annotated[str, typer.Option(help="Precision of the written weights: fp32, fp16 or bf16.")] = "fp32",
    format_: Annotated[str, typer.Option("--format", help="`diffusers`: a pipeline folder (diffusers' "
                                         "from_pretrained); `single-file`: one checkpoint in Stability's original "
                                         "layout, what AUTOMATIC1111, Forge and ComfyUI's checkpoint loader open "
                                         "(v-prediction bases keep their v_pred / ztsnr keys).")] = "diffusers",
) -> None:
    """Write the base with the adapter fused in (no LoRA loading needed to use it): a diffusers pipeline folder, or
    a single-file checkpoint for A1111, Forge and ComfyUI."""
    _quiet_imports()
    from lora_dpo.export import merge_adapter
    from lora_dpo.models import STORAGE_DTYPES

    if dtype not in STORAGE_DTYPES:
        _fail(f"--dtype {dtype}: choose one of {', '.join(STORAGE_DTYPES)}")
    with user_errors():
        path = merge_adapter(adapter, base, scale, out, dtype, format_)
    if format_ == "single-file":
        typer.echo(f"wrote {path}: put it in the tool's checkpoint folder (A1111/Forge models/Stable-diffusion, "
                   "ComfyUI models/checkpoints)")
    else:
        typer.echo(f"wrote {path}: load it with DiffusionPipeline.from_pretrained({str(path)!r})")


@app.command()
def inspect(
    adapter: Annotated[str, typer.Argument(help="Adapter file, folder or hub id; ours or made elsewhere.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Describe an adapter from its file alone: base, rank, alpha, targets, size, and how it was trained."""
    import json

    from lora_dpo.export import inspect_adapter

    with user_errors():
        info = inspect_adapter(adapter)
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    for key, value in info.items():
        typer.echo(f"{key:>20}: {', '.join(map(str, value)) if isinstance(value, list) else value}")


@app.command()
def push(
    adapter: Annotated[Path, typer.Argument(help="Run folder (adapters/<run>).")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo to create or update, owner/name.")],
    private: Annotated[bool, typer.Option(help="Create the repo private.")] = False,
) -> None:
    """Upload a run folder to the Hugging Face hub as a model repo (card, adapter, recipe; no checkpoints)."""
    _quiet_imports()
    from lora_dpo.publish import push as push_folder

    with user_errors():
        url = push_folder(adapter, repo_id, private)
    typer.echo(f"uploaded {adapter} to {url}")


