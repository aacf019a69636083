"""The `lora-dpo` command: parses arguments and delegates; user errors become one line and exit code 2."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lora_dpo.errors import LoraDpoError  # every problem a user can cause or meet: one line, exit code 2

if TYPE_CHECKING:
    from lora_dpo.recipe import Recipe

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Align text-to-image diffusion models to human preferences with LoRA + Diffusion-DPO.")

SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: section.key=value; "
                                                         "section.key=none unsets an optional one.")]


def _quiet_imports() -> None:
    """The stack logs noise on CPU-only installs (bitsandbytes' missing kernels, transformers' torchvision)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _fail(message: str) -> None:
    typer.echo(f"lora-dpo: error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    set_: SetOption = None,
    resume: Annotated[str | None, typer.Option(
        help="Continue from a checkpoint folder, or from the run's newest checkpoint: `--resume latest` (or "
             "`--resume` alone, last or before another option).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier run of the same name (adapter or checkpoints).")]
    = False,
) -> None:
    """Train a LoRA adapter with the recipe's objective; writes adapters/<run>/."""
    from lora_dpo import recipe as recipe_module
    from lora_dpo.errors import Interrupted

    try:
        overrides = [*(set_ or []), *(["output.overwrite=true"] if overwrite else [])]
        loaded = recipe_module.load(recipe, overrides)
        logging.basicConfig(level=logging.INFO, format="lora-dpo: %(message)s")
        _quiet_imports()
        from lora_dpo.train import train as run_training

        run_training(loaded, recipe, resume)
    except Interrupted as err:
        again = ["lora-dpo", "train", str(recipe), *(f"--set={s}" for s in set_ or []), "--resume", "latest"]
        typer.echo(f"lora-dpo: {err}; resume with: {shlex.join(again)}", err=True)
        raise typer.Exit(err.exit_code) from None
    except LoraDpoError as err:
        _fail(str(err))


@app.command()
def label(
    data: Annotated[str, typer.Argument(help="Pairs to relabel: a .jsonl, a .parquet file or folder.")],
    scorer: Annotated[list[str], typer.Option(help="KIND[@SOURCE][:WEIGHT], repeatable: pickscore, hps, clip, "
                                                   "aesthetic (e.g. --scorer pickscore --scorer aesthetic@F:0.3).")],
    out: Annotated[Path, typer.Option(help="Output parquet in the Pick-a-Pic layout (label_0 = P(image 0 wins)).")],
    soft: Annotated[bool, typer.Option(help="Soft labels sigmoid(score difference) instead of 1/0.")] = False,
    batch_size: Annotated[int, typer.Option(help="Pairs scored per batch.")] = 16,
    device: Annotated[str, typer.Option(help="Device for the scorers.")] = "cpu",
) -> None:
    """Label pairs with reward models (AI feedback, as in the paper); resumable. Train on the result with
    `[data] source = "OUT"`."""
    _quiet_imports()
    from lora_dpo import rewards
    from lora_dpo.data import open_image, read_records
    from lora_dpo.recipe import DataRecipe

    try:
        scorers = rewards.build_scorers(scorer, device=device)
        records = read_records(DataRecipe(source=data))
        rows = ((r.where, r.prompt, open_image(r.image_0, r.where), open_image(r.image_1, r.where)) for r in records)
        summary = rewards.label_pairs(rows, scorers, out, batch_size=batch_size, hard=not soft)
    except (LoraDpoError, ValueError) as err:  # the scorers raise ValueError on a bad spec
        _fail(str(err))
    typer.echo(f"labelled {summary.n_pairs} pairs into {out}: {summary.n_swapped} swapped (the scorers prefer "
               f"image 1), {summary.n_ties} ties; mean scores {summary.mean_scores}")


def _numbers(values: list[str] | None, default: list, cast: type, option: str) -> list:
    """Repeated and/or comma-separated numbers: `--scale 0.5 --scale 1` or `--scale 0.5,1`."""
    from lora_dpo.evaluate import EvalError

    try:
        return [cast(v) for text in values for v in text.split(",") if v.strip()] if values else default
    except ValueError:
        raise EvalError(f"{option} {', '.join(values)}: expected numbers, e.g. {option} 0.5,1.0") from None


@app.command("eval")
def eval_(
    adapter: Annotated[Path, typer.Argument(help="Run folder (adapters/<run>) or its .safetensors LoRA file.")],
    prompts: Annotated[str, typer.Option(help="A .txt (one prompt a line), a .csv/.tsv/.jsonl/.json with a prompt "
                                         "column, `parti`, `hpsv2[:STYLE]`, or a hub dataset id[:split].")],
    base: Annotated[str | None, typer.Option(help="Base pipeline: hub id, folder or `tiny`; default: the "
                                             "\\[model].base of the recipe.toml beside the adapter.")] = None,
    scorer: Annotated[list[str] | None, typer.Option(help="Reward model KIND\\[@SOURCE]: pickscore, clip, hps, "
                                                     "aesthetic; repeat for several.")] = None,
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
    try:
        scales = _numbers(scale, [1.0], float, "--scale")
        seeds = _numbers(seed, [0], int, "--seed")
        prompt_list = evaluate.load_prompts(prompts, limit)
        scorers = evaluate.build_scorers(scorer or [])
        out_dir = out or evaluate.adapter_file(adapter).parent / "eval"
        report = evaluate.evaluate_adapter(adapter, prompt_list, prompts, scorers, out_dir, base=base, scales=scales,
                                           seeds=seeds, steps=steps, guidance_scale=guidance, resolution=resolution,
                                           precision=precision)
    except LoraDpoError as err:
        _fail(str(err))
    for line in evaluate.summary_lines(report):
        typer.echo(line)
    typer.echo(f"wrote {out_dir / 'report.md'}, {out_dir / 'report.json'} and {len(report['grids'])} grid(s)")


@app.command()
def cache(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file: its [model] and [data] say what to encode.")],
    set_: SetOption = None,
    out: Annotated[Path | None, typer.Option(help="Cache folder (default: the recipe's [data].cache).")] = None,
    shard_size: Annotated[int, typer.Option(help="Pairs (or prompts) per shard file.", min=1)] = 512,
    dtype: Annotated[str, typer.Option(help="Storage precision: fp16, bf16 or fp32.")] = "fp16",
    batch_size: Annotated[int, typer.Option(help="Pairs encoded at once.", min=1)] = 8,
) -> None:
    """Encode every pair once (VAE latents, text embeddings, micro-conditioning) into a latent cache; train from it
    with `[data] cache = "FOLDER"`. Resumable; under `accelerate launch` each process writes its share of shards."""
    from lora_dpo import recipe as recipe_module

    try:
        loaded = recipe_module.load(recipe, set_ or [])
        folder = out or (Path(loaded.data.cache) if loaded.data.cache else None)
        if folder is None:
            _fail("say where to write the cache: --out FOLDER, or [data].cache in the recipe")
        logging.basicConfig(level=logging.INFO, format="lora-dpo: %(message)s")
        _quiet_imports()
        from lora_dpo.cache import build_cache

        manifest = build_cache(loaded, folder, shard_size=shard_size, dtype=dtype, batch_size=batch_size)
    except LoraDpoError as err:
        _fail(str(err))
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`: one report, not one per process
        return
    counts = manifest["counts"]
    typer.echo(f"wrote {folder}: {counts['train']} train and {counts['val']} held-out pairs, {counts['prompts']} "
               f"prompts; {len(manifest['skipped'])} unusable pairs left out; read from: {manifest['data']}")


@app.command()
def plan(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML file.")],
    gpu: Annotated[list[str] | None, typer.Option(
        "--gpu", help="GPU to plan for, repeatable: 8GB, 12GB, 16GB, 24GB, rtx3090, rtx4090, a100-40gb, a100-80gb, "
        "h100, or any size like 10GB. Default: all of them.")] = None,
    set_: SetOption = None,
    measure: Annotated[bool, typer.Option(
        help="Also run the real step here (random weights, no download) and print its measured peak beside the "
        "plan's.")] = False,
    ranks: Annotated[str | None, typer.Option(help="With --resolutions: also print a Markdown table of these LoRA "
                                              "ranks (e.g. 8,64) x resolutions x GPUs.")] = None,
    resolutions: Annotated[str | None, typer.Option(help="Resolutions of that table, e.g. 512,768,1024.")] = None,
) -> None:
    """Predict the memory and time of a training step on each GPU, and what to change when it does not fit.
    Needs no GPU, no weights, no download: the step is traced on fake tensors from the model's config."""
    from lora_dpo import recipe as recipe_module

    try:
        loaded = recipe_module.load(recipe, set_ or [])
        _quiet_imports()
        from lora_dpo import plan as planner

        gpus = [planner.find_gpu(name) for name in gpu] if gpu else list(planner.GPUS)
        table = [planner.parse_list(name, text) for name, text in (("--ranks", ranks), ("--resolutions", resolutions))
                 if text]
        if len(table) == 1:
            raise planner.PlanError("--ranks and --resolutions go together, e.g. --ranks 8,64 --resolutions 512,1024")
        typer.echo(planner.render(planner.make_plan(loaded), gpus))
        if table:
            typer.echo("\n" + planner.grid(loaded, table[0], table[1], gpus))
        if measure:
            import torch

            typer.echo("\n" + planner.compare_on_device(loaded, torch.device("cuda" if torch.cuda.is_available()
                                                                            else "cpu")))
    except LoraDpoError as err:
        _fail(str(err))


@app.command("tiny-base")
def tiny_base(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the pipeline into.")],
    warmup_steps: Annotated[int, typer.Option(help="Plain denoising steps that warm the random UNet up.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    arch: Annotated[str, typer.Option(help="sdxl (what `tiny` names) or sd15 (what `tiny-sd15` names).")] = "sdxl",
) -> None:
    """Write a tiny SDXL- or SD 1.5-architecture pipeline with random weights (offline demo and tests)."""
    _quiet_imports()
    from lora_dpo.models import build_tiny_base

    try:
        path = build_tiny_base(out_dir, warmup_steps=warmup_steps, seed=seed, replace=True, arch=arch)
    except LoraDpoError as err:
        _fail(str(err))
    pipeline = "StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline"
    typer.echo(f"wrote {path}: load it with {pipeline}.from_pretrained({str(path)!r})")


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

    try:
        path = export_adapter(adapter, out, format_, dtype, base)  # type: ignore[arg-type]
    except LoraDpoError as err:
        _fail(str(err))
    typer.echo(f"wrote {path} ({format_}, {dtype})")


@app.command()
def merge(
    adapter: Annotated[str, typer.Argument(help="Adapter: run folder, .safetensors file or hub id.")],
    base: Annotated[str, typer.Option(help="Base pipeline: hub id, local folder or `tiny`.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the fused pipeline into.")],
    scale: Annotated[float, typer.Option(help="Adapter strength fused into the weights.")] = 1.0,
    dtype: Annotated[str, typer.Option(help="Precision of the written pipeline: fp32, fp16 or bf16.")] = "fp32",
) -> None:
    """Write a full diffusers pipeline with the adapter fused in (no LoRA loading needed to use it)."""
    _quiet_imports()
    from lora_dpo.export import merge_adapter
    from lora_dpo.models import STORAGE_DTYPES

    if dtype not in STORAGE_DTYPES:
        _fail(f"--dtype {dtype}: choose one of {', '.join(STORAGE_DTYPES)}")
    try:
        path = merge_adapter(adapter, base, scale, out, dtype)
    except LoraDpoError as err:
        _fail(str(err))
    typer.echo(f"wrote {path}: load it with DiffusionPipeline.from_pretrained({str(path)!r})")


@app.command()
def inspect(
    adapter: Annotated[str, typer.Argument(help="Adapter file, folder or hub id; ours or made elsewhere.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Describe an adapter from its file alone: base, rank, alpha, targets, size, and how it was trained."""
    import json

    from lora_dpo.export import inspect_adapter

    try:
        info = inspect_adapter(adapter)
    except LoraDpoError as err:
        _fail(str(err))
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
    from lora_dpo.card import push as push_folder

    try:
        url = push_folder(adapter, repo_id, private)
    except LoraDpoError as err:
        _fail(str(err))
    typer.echo(f"uploaded {adapter} to {url}")


@app.command()
def bench(
    recipe: Annotated[Path | None, typer.Option(help="Recipe whose settings (and, with --arch recipe, model) to "
                                                     "measure; default: the built-in defaults.")] = None,
    arch: Annotated[str | None, typer.Option(help="tiny | sdxl | sd15 (random weights from the shipped config, "
                                                  "no download) | recipe (the recipe's own model). Default: sdxl on "
                                                  "a GPU, tiny on the CPU; recipe when --recipe is given.")] = None,
    resolution: Annotated[list[int] | None, typer.Option(help="Pixels (square); repeat for several. Default: "
                                                              "1024 and 512 for sdxl, 512 sd15, 64 tiny.")] = None,
    steps: Annotated[int, typer.Option(help="Timed steps per case (the median is reported).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed steps first (allocator, kernels, compilation).")] = 2,
    max_memory_gb: Annotated[float | None, typer.Option(help="Cap CUDA memory at this many GiB, as on a smaller "
                                                             "card (24, 16, 12).")] = None,
    compare: Annotated[list[str] | None, typer.Option(help="KEY=V1,V2: also run with KEY at each value, the rest "
                                                           "as the baseline. KEY: a recipe key or checkpointing, "
                                                           "optimizer, rank, quantize, batch_size, encode "
                                                           "(cache|live), sdpa (auto|math|flash|efficient|cudnn), "
                                                           "compile, max_memory_gb. Repeatable.")] = None,
    set_: SetOption = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
    data_only: Annotated[bool, typer.Option(help="Measure only how fast each data path (parquet, JSONL images, "
                                                 "latent cache) feeds the trainer, in pairs/s.")] = False,
    pairs: Annotated[int, typer.Option(help="With --data-only: pairs drawn through each path.", min=2)] = 64,
    suite: Annotated[str | None, typer.Option(help="`gpu`: the GPU check (docs/gpu-check.md): SDXL at 1024 px, "
                                                   "bf16 + 8-bit AdamW with checkpointing off and on, measured "
                                                   "beside the plan; checkpoint + resume of the optimizer state; "
                                                   "an fp16 step; an NF4 step. Without CUDA: the tiny base.")] = None,
    out: Annotated[Path, typer.Option(help="With --suite: the JSON file to write.")] = Path("bench-gpu.json"),
) -> None:
    """Time the training step and measure its peak memory; compare settings side by side."""
    import json

    from lora_dpo import bench as bench_module
    from lora_dpo import recipe as recipe_module

    try:
        loaded = (recipe_module.load(recipe, set_ or []) if recipe else
                  recipe_module.from_dict({}, "--set", tuple(set_ or [])))
        logging.basicConfig(level=logging.WARNING, format="lora-dpo: %(message)s")
        _quiet_imports()
        if data_only:
            from lora_dpo.cache import format_throughput, measure_data_throughput, text_shapes

            rows = measure_data_throughput(loaded.data, text_shapes(loaded.model), n_pairs=pairs,
                                           batch_size=loaded.train.batch_size, seed=loaded.train.seed)
            typer.echo(format_throughput(rows, pairs, loaded))
            return
        import torch

        if suite is not None:
            if json_out:
                raise recipe_module.RecipeError("--suite writes its JSON to --out (default bench-gpu.json)")
            _bench_suite(suite, loaded, arch, resolution, steps, warmup, max_memory_gb, compare, out)
            return

        chosen = arch or ("recipe" if recipe else "sdxl" if torch.cuda.is_available() else "tiny")
        if chosen not in bench_module.ARCHS:
            raise recipe_module.RecipeError(f"--arch {chosen!r}: choose from {', '.join(bench_module.ARCHS)}")
        resolutions = resolution or bench_module.default_resolutions(chosen, loaded)
        cases = bench_module.make_cases(loaded, resolutions, bench_module.parse_compare(compare or []), max_memory_gb)
        report = bench_module.run_bench(chosen, cases, steps=steps, warmup=warmup)
    except LoraDpoError as err:
        _fail(str(err))
    typer.echo(bench_module.format_report(report))
    if json_out:
        json_out.write_text(json.dumps(report, indent=1) + "\n")


def _bench_suite(suite: str, loaded: Recipe, arch: str | None, resolution: list[int] | None, steps: int,
                 warmup: int, max_memory_gb: float | None, compare: list[str] | None, out: Path) -> None:
    import json

    import torch

    from lora_dpo import gpu_check
    from lora_dpo.recipe import RecipeError

    if suite != "gpu":
        raise RecipeError(f"--suite {suite!r}: the one suite is `gpu`")
    if compare:
        raise RecipeError("--suite gpu runs its own settings; --compare goes with the plain bench")
    chosen = arch or ("sdxl" if torch.cuda.is_available() else "tiny")
    report = gpu_check.run_suite(chosen, loaded, resolution[0] if resolution else None, steps, warmup, max_memory_gb)
    out.write_text(json.dumps(report, indent=1) + "\n")
    typer.echo(gpu_check.format_suite(report))
    typer.echo(f"wrote {out}")


@app.command("recipe-doc")
def recipe_doc() -> None:
    """Print the recipe reference (every key, type, default) as a Markdown table."""
    from lora_dpo.recipe import describe

    typer.echo("| key | type | default | meaning |\n|---|---|---|---|")
    for key, type_name, default, help_text in describe():
        typer.echo(f"| `{key}` | {type_name} | `{default}` | {help_text} |")


def bare_resume(args: list[str]) -> list[str]:
    """`--resume` with no value means `--resume latest` (typer's options cannot make their value optional)."""
    out = []
    for index, arg in enumerate(args):
        out.append(arg)
        if arg == "--resume" and (index + 1 == len(args) or args[index + 1].startswith("-")):
            out.append("latest")
    return out


def main() -> None:
    sys.argv[1:] = bare_resume(sys.argv[1:])
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
