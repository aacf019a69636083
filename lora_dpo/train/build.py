"""Building a training run: outputs and data checked first (cheap, and where users make mistakes), then the
base, the policy, the optimizer and schedule, the loaders, the accelerator's wrapping; and resuming a checkpoint.

recipe -> data (live, streamed, or a latent cache) + base model -> policy (step.build_policy) -> a `Run`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_dpo import cache, checkpoint, data, files, guards, models, online, plan, step, trackers
from lora_dpo.export import ADAPTER_FILE
from lora_dpo.recipe import Recipe, RecipeError, TrainRecipe, warmup_problem
from lora_dpo.train import samples

log = logging.getLogger(__name__)
HELDOUT_FILE = "heldout.jsonl"  # one line per held-out pair: prompt, where it was read, label


@dataclass
class Run:
    """Everything `fit` needs, built by `setup`."""

    recipe: Recipe
    run_dir: Path
    accelerator: Any
    base: models.BaseModel
    unet: Any
    lora_config: Any
    optimizer: Any
    lr_scheduler: Any
    train_loader: Any
    val_loader: Any | None
    sampler: samples.TrainingSampler | None = None
    start_step: int = 0
    start_pairs: int = 0  # pairs of the run's stream of draws consumed before this process started (a resume)
    bad_steps: tuple[int, int] = (0, 0)  # the guard's counts so far: (skipped for NaN/Inf in all, in a row)
    data_summary: str = ""
    heldout: str = "no held-out pairs"  # how the held-out set was chosen: for metrics.json and the model card
    history: list[dict[str, float]] = field(default_factory=list)
    data_stats: data.PairStats = field(default_factory=data.PairStats)  # what reading the source found
    loader_stats: data.PairStats = field(default_factory=data.PairStats)  # what this process's loaders found
    stream_positions: dict[int, Any] | None = None  # a stream's: part -> its position after the last batch consumed
    end_step: int | None = None  # where this `fit` ends (an online round's last step): a checkpoint is written there
    progress: str = ""  # what the progress bar says it trains (an online round); empty: the objective


def _loader(dataset: torch.utils.data.Dataset, sampler: Any, batch_size: int, num_workers: int, pin: bool,
            collate: Any, prefetch_factor: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                                       num_workers=num_workers, pin_memory=pin, persistent_workers=num_workers > 0,
                                       prefetch_factor=prefetch_factor if num_workers else None,
                                       worker_init_fn=guards.ignore_interrupts if num_workers else None)


def setup(recipe: Recipe, run_dir: Path, resume: str | None = None) -> Run:
    """Check outputs and data first (cheap, and where users make mistakes), then load weights."""
    from diffusers.optimization import get_scheduler

    cfg = recipe.train
    problem = warmup_problem(cfg)  # a schedule's meaning changed: refused before anything is written or loaded
    if problem:
        raise RecipeError(problem)
    models.check_recipe_keys(recipe.model)  # another family's [model] keys (a DDPM schedule's on a flow base, ...)
    files.make_folder(run_dir)
    files.remove_temporaries(run_dir)  # what a killed write left behind
    if (run_dir / ADAPTER_FILE).exists() and not (recipe.output.overwrite or resume):
        raise RecipeError(f"{run_dir} already holds a finished adapter; choose another [output].name, "
                          "or pass --overwrite to replace it")
    resuming = _checkpoint_to_resume(recipe, run_dir, resume) if resume else None  # checked before anything loads
    earlier = checkpoint.list_checkpoints(run_dir)
    if earlier and not resume and not recipe.output.overwrite:
        raise RecipeError(f"{run_dir} holds checkpoints of an unfinished run (latest: {earlier[-1].name}); "
                          "continue it with --resume latest, or pass --overwrite to start over")
    if not resume:  # a new run here: the earlier one's checkpoints and finished adapter go (a later --resume of
        checkpoint.remove_checkpoints(run_dir)  # this run must not find that run finished)
        for finished in (ADAPTER_FILE, "metrics.json"):
            (run_dir / finished).unlink(missing_ok=True)
        shutil.rmtree(run_dir / online.ROUNDS_DIR, ignore_errors=True)  # an earlier online run's images and pairs
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    step.use_deterministic_kernels(cfg.deterministic)
    precision = step.resolve_precision(cfg)
    trackers.check_installed(recipe.output.report_to)
    log_with, init_kwargs = trackers.accelerate_trackers(trackers.resolve(recipe.output.report_to), run_dir)
    accelerator = step.make_accelerator(precision, gradient_accumulation_steps=cfg.gradient_accumulation,
                                        log_with=log_with or None, project_dir=run_dir)
    accelerator.init_trackers(recipe.output.project, config=trackers.run_config(recipe), init_kwargs=init_kwargs)
    device = accelerator.device
    _check_parallelism(accelerator, cfg)
    models.check_compiler(cfg.compile, device)  # before any weight loads
    start_pairs = 0 if resuming is None else _resume_position(resuming, recipe, accelerator.num_processes)

    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None  # before any weight is loaded
    checkpointing, why = plan.resolve_checkpointing(recipe, free)
    accelerator.print(f"lora-dpo: gradient checkpointing {'on' if checkpointing else 'off'}: {why}")
    weight_dtype = models.DTYPES[precision]
    draws = cfg.max_steps * cfg.gradient_accumulation * cfg.batch_size * accelerator.num_processes
    streamed = recipe.data.streaming and not recipe.data.cache
    if recipe.online.rounds:  # the rounds make their own data from the run's images (`train.online`; one process)
        parts = None
    elif recipe.data.cache:  # encoded already: the VAE and the text encoders are never loaded
        parts = cache.cached_datasets(recipe, draws, weight_dtype, start_pairs)
    else:  # a resumed stream starts each part where the checkpoint says it stood
        stream = resuming.state.get("stream") if resuming is not None and streamed else None
        parts = data.build_datasets(recipe.data, cfg.seed, draws, cfg.batch_size, accelerator.process_index,
                                    accelerator.num_processes, start_pairs, stream)

    base = models.load_base(recipe.model, with_encoders=not recipe.data.cache, weight_dtype=weight_dtype,
                            vae_dtype=models.DTYPES[recipe.model.vae_dtype])
    for module in (base.vae, *base.text_encoders):  # the UNet goes to the device in step.build_policy
        if module is not None:
            module.to(device)
    lora_config = step.build_policy(base.unet, recipe.lora, cfg.seed, precision=precision,
                                    quantize=recipe.model.quantize, device=device, checkpointing=checkpointing,
                                    compile=cfg.compile)
    optimizer = step.make_optimizer(cfg, models.lora_parameters(base.unet), device)
    lr_scheduler = get_scheduler(cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps,
                                 num_training_steps=cfg.max_steps)

    if parts is None:  # online: each round sets its own loader
        unet, optimizer = accelerator.prepare(base.unet, optimizer)
        run = Run(recipe, run_dir, accelerator, base, unet, lora_config, optimizer, lr_scheduler, None, None,
                  heldout="each round on held-out prompts (rounds/round-NNN/heldout.json)")
        return _finish_setup(run, resuming, start_pairs, [])
    pin = device.type == "cuda"
    train_loader = _loader(parts.train, parts.sampler, cfg.batch_size, parts.num_workers, pin, parts.collate,
                           recipe.data.prefetch_factor)
    val_loader = None
    if parts.val is not None:
        val_loader = _loader(parts.val, range(len(parts.val)), cfg.batch_size, 0, pin, parts.collate,
                             recipe.data.prefetch_factor)
    if parts.sampler is None:  # a stream divides itself between processes and workers: accelerate must not
        unet, optimizer = accelerator.prepare(base.unet, optimizer)
    else:
        unet, optimizer, train_loader = accelerator.prepare(base.unet, optimizer, train_loader)

    run = Run(recipe, run_dir, accelerator, base, unet, lora_config, optimizer, lr_scheduler, train_loader,
              val_loader, data_summary=parts.summary, heldout=parts.heldout, data_stats=parts.stats,
              stream_positions={} if streamed else None)
    return _finish_setup(run, resuming, start_pairs, parts.prompts, parts.heldout_rows)


def _finish_setup(run: Run, resuming: Resume | None, start_pairs: int, prompts: Sequence[str],
                  heldout_rows: list[dict[str, Any]] | None = None) -> Run:
    """The held-out pairs' file, the sampler of training grids and the checkpoint's state, into a built run."""
    recipe, accelerator = run.recipe, run.accelerator
    if accelerator.is_main_process and heldout_rows:  # which pairs were never trained on, to measure again
        files.write_text(run.run_dir / HELDOUT_FILE, "".join(json.dumps(row) + "\n" for row in heldout_rows))
    if recipe.sample.every and recipe.data.cache:
        log.warning("[sample].every: sample grids need the VAE and text encoders, which a cached run never loads; "
                    "no grids this run (`lora-dpo eval` the adapter afterwards)")
    elif recipe.sample.every and not (recipe.sample.prompts or prompts):
        log.info("[sample].every: no [sample].prompts, so no training grids; each online round draws its own "
                 "(rounds/round-NNN/grid.png)")
    elif recipe.sample.every and accelerator.is_main_process:
        # grids from the UNet being trained, no copy
        prompts = list(recipe.sample.prompts) or samples.default_sample_prompts(prompts)
        run.sampler = samples.TrainingSampler(run.base, step.unwrap(run.unet), recipe, prompts,
                                              run.run_dir / "samples")
    if resuming is not None:
        _restore(run, resuming, start_pairs)
    return run


def _check_parallelism(accelerator: Any, cfg: TrainRecipe) -> None:
    """Refuse, before anything loads, the launch layouts that shard parameters (FSDP, DeepSpeed ZeRO-3): the
    adapter and checkpoints are saved from the main process's own copy of the LoRA weights, which must be
    whole. Data parallel (DDP, ZeRO-2) keeps whole replicas, and for a LoRA nothing else is worth having."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if step.launched_with_deepspeed() and kind != DistributedType.DEEPSPEED:
        raise RecipeError(f"launched with a DeepSpeed config, but accelerate set up {kind.value} instead "
                          "(ACCELERATE_USE_CPU=true or --cpu turn DeepSpeed off without a word): unset them, or "
                          "launch with recipes/accelerate/ddp.yaml")
    zero3 = kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3
    if kind == DistributedType.FSDP or zero3:
        raise RecipeError(f"accelerate {'DeepSpeed ZeRO-3' if zero3 else 'FSDP'} shards the parameters, and "
                          "lora-dpo saves adapters from whole ones: launch with recipes/accelerate/ddp.yaml (the base "
                          "fits on each GPU; the adapter's gradients are a few MB) or deepspeed_zero2.yaml")
    if kind == DistributedType.DEEPSPEED and cfg.checkpoint_every:
        raise RecipeError("[train].checkpoint_every: DeepSpeed partitions the optimizer state across processes, and "
                          "lora-dpo's checkpoints hold it whole: launch with recipes/accelerate/ddp.yaml to keep "
                          "resumable checkpoints, or set train.checkpoint_every = 0")
    if kind == DistributedType.DEEPSPEED:
        _deepspeed_settings(accelerator, cfg)
        accelerator.print("lora-dpo: DeepSpeed steps the optimizer inside backward, so lora-dpo cannot skip a step "
                          "itself: DeepSpeed skips an update whose gradients are NaN/Inf (its gradient norm then reads "
                          "inf), lora-dpo counts it as a bad step and holds the LR schedule back, and "
                          "[train].max_bad_steps in a row stop the run; should DeepSpeed apply such an update, the "
                          "run stops at once")


# DeepSpeed config key -> the recipe's key that decides it (0 = no clipping, for both)
_DEEPSPEED_KEYS = {"gradient_clipping": "max_grad_norm", "gradient_accumulation_steps": "gradient_accumulation",
                   "train_micro_batch_size_per_gpu": "batch_size"}


def _deepspeed_settings(accelerator: Any, cfg: TrainRecipe) -> None:
    """DeepSpeed clips gradients, accumulates and counts the micro-batch itself, from its own config, and
    accelerate fills a value left out ("auto") with a default of its own (gradient_clipping 1.0) or quietly
    prefers DeepSpeed's over the recipe's (accumulation). The recipe decides, as under DDP: a value left out is
    set from the recipe, one set in the accelerate or DeepSpeed config must equal it, or the run stops here."""
    plugin = accelerator.state.deepspeed_plugin
    mismatched = []
    for key, recipe_key in _DEEPSPEED_KEYS.items():
        wanted = getattr(cfg, recipe_key)
        value = plugin.deepspeed_config.get(key, "auto")
        if value == "auto":
            plugin.deepspeed_config[key] = wanted
        elif float(value) != float(wanted):
            mismatched.append(f"DeepSpeed's {key} = {value} but [train].{recipe_key} = {wanted}")
    if accelerator.gradient_accumulation_steps != cfg.gradient_accumulation and not mismatched:
        # the launcher's --gradient_accumulation_steps (ACCELERATE_GRADIENT_ACCUMULATION_STEPS) overrides the recipe's
        mismatched.append(f"accelerate's gradient_accumulation_steps = {accelerator.gradient_accumulation_steps} but "
                          f"[train].gradient_accumulation = {cfg.gradient_accumulation}")
    if mismatched:
        raise RecipeError("; ".join(mismatched) + ". DeepSpeed would apply its own values and the "
                          "recipe's would not hold: remove them from the accelerate config (deepspeed_config) or the "
                          "DeepSpeed JSON, or the launch flags (--gradient_clipping, --gradient_accumulation_steps), "
                          "so the recipe decides; or make them equal")


@dataclass(frozen=True)
class Resume:
    """The checkpoint a run goes on from, found and checked before anything loads."""

    path: Path
    state: dict[str, Any]  # its state.json


def _checkpoint_to_resume(recipe: Recipe, run_dir: Path, which: str) -> Resume:
    """The checkpoint `--resume which` names, if this recipe can go on from it: the run is not finished (or
    [train].max_steps was raised to train longer) and nothing that shapes the run changed since it was saved."""
    found = checkpoint.list_checkpoints(run_dir)
    path = (found[-1] if found else None) if which == "latest" else Path(which)
    max_steps = recipe.train.max_steps
    done = _finished_steps(run_dir)
    if done is not None and max_steps <= done:
        longer = (f"raise [online].rounds and [train].max_steps together (--set online.rounds="
                  f"{2 * recipe.online.rounds} --set train.max_steps={2 * done})" if recipe.online.rounds else
                  f"raise [train].max_steps (e.g. --set train.max_steps={2 * done})")
        raise RecipeError(f"{run_dir} is a finished run ({done} steps, [train].max_steps = {max_steps}): nothing to "
                          f"resume. To train longer, {longer} and --resume goes on from its last checkpoint; to "
                          "start over, pass --overwrite")
    if path is None or not (path / checkpoint.STATE).is_file():
        where = run_dir if which == "latest" else path
        raise RecipeError(f"--resume {which}: no checkpoint found in {where}"
                          + (" ([train].checkpoint_every = 0 wrote none)" if done is not None else ""))
    state = checkpoint.read_state(path)
    if state["step"] > max_steps:
        raise RecipeError(f"--resume {path}: the checkpoint is at step {state['step']}, past [train].max_steps = "
                          f"{max_steps}; raise it to at least {state['step'] + 1}")
    saved = state.get("recipe")
    if not isinstance(saved, dict):  # written before checkpoints kept their recipe: its fingerprint alone
        if state["fingerprint"] != recipe.fingerprint():
            log.warning("resuming %s, saved with a different recipe (fingerprint %s, now %s)", path,
                        state["fingerprint"], recipe.fingerprint())
        return Resume(path, state)
    changed = recipe.resume_changes(_saved_targets_as_unset(saved, recipe))
    if changed:
        raise RecipeError(f"--resume {path}: the recipe changed {', '.join(changed)} since this checkpoint was "
                          "saved, and that changes the run it would go on with; set it back to resume, or start a "
                          "new run (another [output].name, or --overwrite)")
    fixed = recipe.resume_changes(saved, "warn")
    if fixed:
        log.warning("resuming %s with %s: the run goes on changed from here", path, ", ".join(fixed))
    if state["step"] < max_steps != saved["train"]["max_steps"] and recipe.train.lr_schedule in ("linear", "cosine"):
        log.warning("resuming %s with [train].max_steps %d -> %d: the %s schedule is rebuilt for the new length, so "
                    "the learning rate goes on from where that schedule is at step %d, not where it was", path,
                    saved["train"]["max_steps"], max_steps, recipe.train.lr_schedule, state["step"])
    return Resume(path, state)


def _saved_targets_as_unset(saved: dict[str, Any], recipe: Recipe) -> dict[str, Any]:
    """A checkpoint's recipe with `[lora].target_modules` unset where it lists what unset means for this base (its
    family's default): checkpoints written before unset meant the family's default hold the list itself, and
    resuming them with today's default changes nothing."""
    family = models.recipe_base_family(recipe.model) if recipe.lora.target_modules is None else None
    lora = saved.get("lora", {})
    if family is None or tuple(lora.get("target_modules") or ()) != tuple(family.default_target_modules):
        return saved
    return {**saved, "lora": {**lora, "target_modules": None}}


def _finished_steps(run_dir: Path) -> int | None:
    """How many steps the run in `run_dir` finished with (its metrics.json, written beside the adapter), or None
    when it holds no finished adapter."""
    if not (run_dir / ADAPTER_FILE).is_file():
        return None
    summary = files.read_json(run_dir / "metrics.json", "run metrics") if (run_dir / "metrics.json").is_file() else {}
    steps = summary.get("steps") if isinstance(summary, dict) else None
    return steps if isinstance(steps, int) else 0


def launch_layout(cfg: TrainRecipe, processes: int) -> dict[str, int]:
    """What a checkpoint records of how the run was launched: the pairs each optimizer step takes come from it."""
    return {"processes": processes, "batch_size": cfg.batch_size, "gradient_accumulation": cfg.gradient_accumulation}


def _pairs_per_step(layout: dict[str, int]) -> int:
    return layout["processes"] * layout["batch_size"] * layout["gradient_accumulation"]


def _describe_layout(layout: dict[str, int]) -> str:
    processes, pairs = layout["processes"], _pairs_per_step(layout)
    return (f"{pairs} pair{'s' if pairs > 1 else ''} (batch {layout['batch_size']} x accumulation "
            f"{layout['gradient_accumulation']} x {processes} process{'es' if processes > 1 else ''})")


def _resume_position(resuming: Resume, recipe: Recipe, processes: int) -> int:
    """Pairs of the run's stream of draws the checkpoint consumed: where this launch goes on. Another launch layout
    goes on from the same pair with the same per-pair noise when its optimizer steps take as many pairs (the loss is
    a mean over them, so only float rounding differs); otherwise the step count, the schedule and the data would
    part ways, and it is refused. A streamed source deals its shards by process and batch: same layout only."""
    state, now = resuming.state, launch_layout(recipe.train, processes)
    streamed = recipe.data.streaming and not recipe.data.cache
    if streamed and "stream" not in state:
        raise RecipeError(f"--resume {resuming.path}: this checkpoint of a streamed source was saved before streams "
                          "kept their place, and the stream now reads in another order (and holds out other "
                          "prompts): it cannot go on from it; start a new run (--overwrite)")
    saved = state.get("layout")
    if not isinstance(saved, dict):  # written before checkpoints kept their layout: assume this one (as then)
        return state.get("pairs", state.get("micro_steps", 0) * recipe.train.batch_size * processes)
    if saved == now:
        return state["pairs"]
    wanted, have = _pairs_per_step(saved), _pairs_per_step(now)
    if streamed:
        fix = f"launch it as it was saved ({_describe_layout(saved)})"
    elif wanted % (recipe.train.batch_size * processes) == 0:
        fix = (f"set [train].gradient_accumulation = {wanted // (recipe.train.batch_size * processes)} to keep "
               f"{wanted} pairs per step")
    else:
        fix = f"choose [train].batch_size and gradient_accumulation that make {wanted} pairs per step here"
    if streamed or wanted != have:
        raise RecipeError(f"--resume {resuming.path}: its optimizer steps took {_describe_layout(saved)}, this launch "
                          f"takes {_describe_layout(now)}" + (" and a streamed source [data].streaming = true deals "
                          "its shards by launch layout" if streamed and wanted == have else "")
                          + f": {fix}, or start a new run")
    log.info("resuming %s on another launch layout: %s per step as before", resuming.path, _describe_layout(now))
    return state["pairs"]


def _restore(run: Run, resuming: Resume, start_pairs: int) -> None:
    """Load the checkpoint's adapter, optimizer, schedule and loss scale into the built run, and the counts the
    loop goes on from."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    path = resuming.path
    lora, optimizer_state, state = checkpoint.load_checkpoint(path)
    unet = step.unwrap(run.unet)
    files.check_tensors(lora, get_peft_model_state_dict(unet), path / checkpoint.ADAPTER, "checkpoint's adapter")
    set_peft_model_state_dict(unet, lora)
    checkpoint.restore_optimizer(run.optimizer, run.lr_scheduler, optimizer_state, state, path,
                                 run.accelerator.scaler)
    if run.stream_positions is not None:  # the stream starts where it stood (setup); a part that gives no batch
        # before the next checkpoint keeps the position it had
        run.stream_positions = {int(part): at for part, at in state["stream"]["parts"].items()}
        if run.accelerator.is_main_process:  # what the loaders counted before, once (other processes add theirs)
            run.loader_stats.merge(data.PairStats.from_json(state["stream"]["stats"]))
    run.start_step, run.start_pairs = state["step"], start_pairs
    run.bad_steps = (int(state.get("skipped_steps", 0)), int(state.get("bad_steps_in_a_row", 0)))
    run.history = state["history"]
    if run.accelerator.is_main_process:
        checkpoint.rewind_metrics(run.run_dir / "metrics.jsonl", run.start_step)
    log.info("resumed from %s at step %d", path, run.start_step)
