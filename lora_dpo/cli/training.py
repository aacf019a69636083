"""The commands that train and measure: train, cache, plan, bench, tiny-base, recipe-doc."""

from __future__ import annotations

import atexit
import gc
import logging
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lora_dpo.errors import LoraDpoError  # every problem a user can cause or meet: one line, exit code 2

if TYPE_CHECKING:
    from lora_dpo.recipe import Recipe

from lora_dpo.cli.common import SetOption, _fail, _quiet_imports, app, user_errors


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
    from lora_dpo import hub
    from lora_dpo import recipe as recipe_module
    from lora_dpo.errors import Interrupted

    # Python's full garbage collections over the ~570k objects that importing the stack and loading the base
    # leave behind cost ~1.3 s before the first step, and ~1.5 s more at exit (tiny base, 2-core CPU; the diffusers
    # DPO example pays them too): starting up makes few reference cycles. None until the loop starts
    # (`train` then freezes what setup made and turns collection on: the loop's garbage is collected), and none
    # at interpreter teardown (the last exit handler freezes everything).
    gc.disable()
    atexit.register(gc.freeze)
    try:
        overrides = [*(set_ or []), *(["output.overwrite=true"] if overwrite else [])]
        loaded = recipe_module.load(recipe, overrides)
        _quiet_imports()
        from lora_dpo import models

        models.check_recipe_keys(loaded.model)  # another family's [model] keys: before the hub or any folder
        hub.preflight_model(loaded.model)
        logging.basicConfig(level=logging.INFO, format="lora-dpo: %(message)s")
        from lora_dpo.train import train as run_training

        run_training(loaded, recipe, resume)
    except Interrupted as err:
        again = ["lora-dpo", "train", str(recipe), *(f"--set={s}" for s in set_ or []), "--resume", "latest"]
        typer.echo(f"lora-dpo: {err}; resume with: {shlex.join(again)}", err=True)
        raise typer.Exit(err.exit_code) from None
    except LoraDpoError as err:
        _fail(str(err))


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

    with user_errors():
        loaded = recipe_module.load(recipe, set_ or [])
        folder = out or (Path(loaded.data.cache) if loaded.data.cache else None)
        if folder is None:
            _fail("say where to write the cache: --out FOLDER, or [data].cache in the recipe")
        logging.basicConfig(level=logging.INFO, format="lora-dpo: %(message)s")
        _quiet_imports()
        from lora_dpo.cache import build_cache

        manifest = build_cache(loaded, folder, shard_size=shard_size, dtype=dtype, batch_size=batch_size)
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
    floor: Annotated[bool, typer.Option(help="With --resolutions: also print a Markdown table of checkpointing off "
                                        "and on x NF4 base off and on at those resolutions, each peak beside the "
                                        "memory floor (the bare bf16 step) and the GPUs it fits.")] = False,
) -> None:
    """Predict the memory and time of a training step on each GPU, and what to change when it does not fit.
    Needs no GPU, no weights, no download: the step is traced on fake tensors from the model's config."""
    from lora_dpo import recipe as recipe_module

    with user_errors():
        loaded = recipe_module.load(recipe, set_ or [])
        _quiet_imports()
        from lora_dpo import plan as planner

        gpus = [planner.find_gpu(name) for name in gpu] if gpu else list(planner.GPUS)
        table = [planner.parse_list(name, text) for name, text in (("--ranks", ranks), ("--resolutions", resolutions))
                 if text]
        if floor and not resolutions:
            raise planner.PlanError("--floor needs --resolutions, e.g. --floor --resolutions 512,1024")
        if len(table) == 1 and not (floor and not ranks):
            raise planner.PlanError("--ranks and --resolutions go together, e.g. --ranks 8,64 --resolutions 512,1024")
        typer.echo(planner.render(planner.make_plan(loaded), gpus))
        if len(table) == 2:
            typer.echo("\n" + planner.grid(loaded, table[0], table[1], gpus))
        if floor:
            typer.echo("\n" + planner.floor_table(loaded, table[-1], gpus))
        if measure:
            import torch

            typer.echo("\n" + planner.compare_on_device(loaded, torch.device("cuda" if torch.cuda.is_available()
                                                                            else "cpu")))


@app.command("tiny-base")
def tiny_base(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the pipeline into.")],
    warmup_steps: Annotated[int, typer.Option(help="Plain denoising steps that warm the random UNet up.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    arch: Annotated[str | None, typer.Option(
        help="A base family's name: sdxl (what `tiny` names; the default), sd15, sd3, flux or flux2 (what "
             "`tiny-sd15`, `tiny-sd3`, `tiny-flux`, `tiny-flux2` name; the flow ones are never warmed up).")] = None,
) -> None:
    """Write a tiny pipeline of a base family's architecture with random weights (offline demo and tests)."""
    _quiet_imports()
    from lora_dpo.models import TINY_BASES, build_tiny_base
    from lora_dpo.models.tiny import tiny_family

    with user_errors():
        family = tiny_family(arch) if arch is not None else TINY_BASES["tiny"]
        path = build_tiny_base(out_dir, warmup_steps=warmup_steps, seed=seed, replace=True, arch=family)
    typer.echo(f"wrote {path}: load it with {family.pipeline_class}.from_pretrained({str(path)!r})")


@app.command()
def bench(
    recipe: Annotated[Path | None, typer.Option(help="Recipe whose settings (and, with --arch recipe, model) to "
                                                     "measure; default: the built-in defaults.")] = None,
    arch: Annotated[str | None, typer.Option(help="tiny | a base family's name: sdxl, sd15, sd3, flux (random "
                                                  "weights from the shipped config, no download) | recipe (the "
                                                  "recipe's own model). Default: sdxl on a GPU, tiny on the CPU; "
                                                  "recipe when --recipe is given.")] = None,
    resolution: Annotated[list[int] | None, typer.Option(help="Pixels (square); repeat for several. Default: "
                                                              "1024 and 512 for sdxl, 512 sd15, 1024 sd3 and "
                                                              "flux, 64 tiny.")] = None,
    steps: Annotated[int, typer.Option(help="Timed steps per case (the median is reported).")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed steps first (allocator, kernels, compilation).")] = 2,
    max_memory_gb: Annotated[float | None, typer.Option(help="Cap CUDA memory at this many GiB, as on a smaller "
                                                             "card (24, 16, 12).")] = None,
    compare: Annotated[list[str] | None, typer.Option(help="KEY=V1,V2: also run with KEY at each value, the rest "
                                                           "as the baseline. KEY: a recipe key or checkpointing, "
                                                           "optimizer, rank, quantize, batch_size, compile, encode "
                                                           "(cache|live), sdpa (auto|math|flash|efficient|cudnn), "
                                                           "fullgraph (the whole UNet compiled), max_memory_gb. "
                                                           "Repeatable.")] = None,
    set_: SetOption = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch. Default: the recipe's train.num_threads, "
                                                     "else 1 on a CPU (as recipes/tiny.toml: two threads on a busy "
                                                     "2-core machine were ~30x slower), torch's own on a GPU.",
                                                min=1)] = None,
    data_only: Annotated[bool, typer.Option(help="Measure only how fast each data path (parquet, JSONL images, "
                                                 "latent cache) feeds the trainer, in pairs/s.")] = False,
    pairs: Annotated[int, typer.Option(help="With --data-only: pairs drawn through each path.", min=2)] = 64,
    suite: Annotated[str | None, typer.Option(help="`gpu`: the GPU check (docs/gpu-check.md): SDXL at 1024 px, "
                                                   "bf16 + 8-bit AdamW with checkpointing off and on, measured "
                                                   "beside the plan; checkpoint + resume of the optimizer state; "
                                                   "an fp16 step; an NF4 step; train.compile off and on. Without "
                                                   "CUDA: the tiny base.")] = None,
    out: Annotated[Path, typer.Option(help="With --suite: the JSON file to write.")] = Path("bench-gpu.json"),
) -> None:
    """Time the training step and measure its peak memory; compare settings side by side."""
    import json

    from lora_dpo import bench as bench_module
    from lora_dpo import recipe as recipe_module

    with user_errors():
        loaded = (recipe_module.load(recipe, set_ or []) if recipe else
                  recipe_module.from_dict({}, "--set", tuple(set_ or [])))
        loaded = _bench_threads(loaded, threads)
        logging.basicConfig(level=logging.WARNING, format="lora-dpo: %(message)s")
        _quiet_imports()
        if data_only:
            from lora_dpo.cache import format_throughput, measure_data_throughput, text_shapes

            rows = measure_data_throughput(loaded.data, text_shapes(loaded.model), n_pairs=pairs,
                                           batch_size=loaded.train.batch_size, seed=loaded.train.seed)
            typer.echo(format_throughput(rows, pairs, loaded))
            return
        if suite is not None:
            if json_out:
                raise recipe_module.RecipeError("--suite writes its JSON to --out (default bench-gpu.json)")
            from lora_dpo import gpu_check

            typer.echo(gpu_check.run_command(suite, loaded, arch, resolution, steps, warmup, max_memory_gb, compare,
                                             out))
            return

        chosen = arch or bench_module.default_arch(recipe is not None)
        if chosen not in bench_module.ARCHS:
            raise recipe_module.RecipeError(f"--arch {chosen!r}: choose from {', '.join(bench_module.ARCHS)}")
        resolutions = resolution or bench_module.default_resolutions(chosen, loaded)
        cases = bench_module.make_cases(loaded, resolutions, bench_module.parse_compare(compare or []), max_memory_gb)
        report = bench_module.run_bench(chosen, cases, steps=steps, warmup=warmup)
    typer.echo(bench_module.format_report(report))
    if json_out:
        json_out.write_text(json.dumps(report, indent=1) + "\n")


def _bench_threads(loaded: Recipe, threads: int | None) -> Recipe:
    """--threads, else the recipe's, else one thread on a CPU: what the measured tables used."""
    import dataclasses

    import torch

    chosen = threads or loaded.train.num_threads or (None if torch.cuda.is_available() else 1)
    return dataclasses.replace(loaded, train=dataclasses.replace(loaded.train, num_threads=chosen))


@app.command("recipe-doc")
def recipe_doc(
    other_tools: Annotated[bool, typer.Option(help="Print instead which recipe key does the job of each flag of "
                                                   "diffusers' Diffusion-DPO examples and of sd-scripts.")] = False,
) -> None:
    """Print the recipe reference (every key, type, default) as a Markdown table."""
    from lora_dpo.recipe import aliases, describe

    if other_tools:
        typer.echo("| their name | in | here | note |\n|---|---|---|---|")
        for name, tools, here, note in aliases.rows():
            typer.echo(f"| `{name}` | {tools} | `{here}` | {note} |")
        return
    typer.echo("| key | type | default | meaning |\n|---|---|---|---|")
    for key, type_name, default, help_text in describe():
        typer.echo(f"| `{key}` | {type_name} | `{default}` | {help_text} |")


