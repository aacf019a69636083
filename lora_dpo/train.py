"""The training run: `setup` builds the parts in dependency order, `fit` only loops.

recipe -> data (live, streamed, or a latent cache) + base model + LoRA -> optimizer -> loop of `dpo_step` ->
checkpoints -> adapter file.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_dpo import cache, checkpoint, data, evaluate, files, guards, models, plan
from lora_dpo.export import ADAPTER_FILE, save_adapter
from lora_dpo.objectives import get_objective
from lora_dpo.recipe import ObjectiveRecipe, Recipe, RecipeError, TrainRecipe
from lora_dpo.step import EncodedBatch, StepOutput, dpo_step, encode_batch, make_accelerator

log = logging.getLogger(__name__)



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
    sampler: evaluate.TrainingSampler | None = None
    start_step: int = 0
    skipped_steps: int = 0  # optimizer steps skipped so far for a NaN/Inf loss or gradient
    data_summary: str = ""
    history: list[dict[str, float]] = field(default_factory=list)
    data_stats: data.PairStats = field(default_factory=data.PairStats)  # what reading the source found
    loader_stats: data.PairStats = field(default_factory=data.PairStats)  # what this process's loaders found


def _optimizer(cfg: TrainRecipe, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """The recipe's optimizer, on every device: bitsandbytes' AdamW8bit steps CPU tensors too (0.50+)."""
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                  weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    # fused: one kernel for all the adapter tensors (hundreds of small ones) instead of a loop over them;
    # measured 15x faster on the CPU, where it was 6 % of the tiny model's step
    return torch.optim.AdamW(params, **kwargs, fused=True if device.type in ("cpu", "cuda") else None)


def resolve_precision(cfg: TrainRecipe) -> str:
    """The recipe's mixed precision, unless this device cannot run it: then an error naming the key, or, where
    the recipe opts in with `device_fallback`, the nearest precision it can run, said at start. accelerate
    autocasts bf16 on CPUs but runs no fp16 autocast or loss scaling there (it would silently train in fp32)."""
    if cfg.mixed_precision != "fp16" or torch.cuda.is_available():
        return cfg.mixed_precision
    if not cfg.device_fallback:
        raise RecipeError('[train].mixed_precision = "fp16": accelerate runs no fp16 autocast or loss scaling on '
                          'the CPU; use "bf16" (the CPU autocasts it) or "no", or set [train].device_fallback = '
                          'true to run bf16 here and fp16 on a GPU')
    log.warning('[train].mixed_precision = "fp16" cannot run on the CPU; running "bf16" instead '
                "([train].device_fallback = true)")
    return "bf16"


def build_policy(recipe: Recipe, unet: Any, device: torch.device, checkpointing: bool,
                 precision: str) -> tuple[Any, torch.optim.Optimizer]:
    """The frozen UNet on the device (4-bit NF4 first, if the recipe asks; its matmuls in `precision`), LoRA on
    it, gradient checkpointing, the optimizer: built the same way for training and for `lora-dpo bench`."""
    if recipe.model.quantize == "nf4":
        models.quantize_nf4(unet, models.DTYPES[precision], device)
    unet.to(device)
    torch.manual_seed(recipe.train.seed)  # lora_A's random init is part of the run: same seed, same adapter
    lora_config = models.add_lora(unet, recipe.lora)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return lora_config, _optimizer(recipe.train, models.lora_parameters(unet), device)


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
    files.make_folder(run_dir)
    files.remove_temporaries(run_dir)  # what a killed write left behind
    if (run_dir / ADAPTER_FILE).exists() and not (recipe.output.overwrite or resume):
        raise RecipeError(f"{run_dir} already holds a finished adapter; choose another [output].name, "
                          "or pass --overwrite to replace it")
    earlier = checkpoint.list_checkpoints(run_dir)
    if earlier and not resume:
        if not recipe.output.overwrite:
            raise RecipeError(f"{run_dir} holds checkpoints of an unfinished run (latest: {earlier[-1].name}); "
                              "continue it with --resume latest, or pass --overwrite to start over")
        checkpoint.remove_checkpoints(run_dir)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    precision = resolve_precision(cfg)
    accelerator = make_accelerator(precision, gradient_accumulation_steps=cfg.gradient_accumulation,
                                   log_with="tensorboard", project_dir=run_dir)
    accelerator.init_trackers("tensorboard")  # `tensorboard --logdir adapters/<run>/tensorboard`
    device = accelerator.device
    _check_parallelism(accelerator, cfg)

    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None  # before any weight is loaded
    checkpointing, why = plan.resolve_checkpointing(recipe, free)
    accelerator.print(f"lora-dpo: gradient checkpointing {'on' if checkpointing else 'off'}: {why}")
    weight_dtype = models.DTYPES[precision]
    draws = cfg.max_steps * cfg.gradient_accumulation * cfg.batch_size * accelerator.num_processes
    if recipe.data.cache:  # encoded already: the VAE and the text encoders are never loaded
        parts = cache.cached_datasets(recipe, draws, weight_dtype)
    else:
        parts = data.build_datasets(recipe.data, cfg.seed, draws, cfg.batch_size, accelerator.process_index,
                                    accelerator.num_processes)

    base = models.load_base(recipe.model, with_encoders=not recipe.data.cache, weight_dtype=weight_dtype,
                            vae_dtype=models.DTYPES[recipe.model.vae_dtype])
    for module in (base.vae, *base.text_encoders):  # the UNet goes to the device in build_policy
        if module is not None:
            module.to(device)
    lora_config, optimizer = build_policy(recipe, base.unet, device, checkpointing, precision)
    schedule = "constant_with_warmup" if cfg.lr_schedule == "constant" and cfg.warmup_steps else cfg.lr_schedule
    lr_scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=cfg.warmup_steps,  # diffusers' `constant`

                                 num_training_steps=cfg.max_steps)                  # ignores any warmup

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
              val_loader, data_summary=parts.summary, data_stats=parts.stats)
    if recipe.sample.every and recipe.data.cache:
        log.warning("[sample].every: sample grids need the VAE and text encoders, which a cached run never loads; "
                    "no grids this run (`lora-dpo eval` the adapter afterwards)")
    elif recipe.sample.every and accelerator.is_main_process:  # grids from the UNet being trained, no copy
        prompts = recipe.sample.prompts or evaluate.default_sample_prompts(parts.prompts)
        run.sampler = evaluate.TrainingSampler(base, accelerator.unwrap_model(unet), recipe, prompts,
                                               run_dir / "samples")
    if resume:
        _resume(run, resume)
    return run


def _check_parallelism(accelerator: Any, cfg: TrainRecipe) -> None:
    """Refuse, before anything loads, the launch layouts that shard parameters (FSDP, DeepSpeed ZeRO-3): the
    adapter and checkpoints are saved from the main process's own copy of the LoRA weights, which must be
    whole. Data parallel (DDP, ZeRO-2) keeps whole replicas, and for a LoRA nothing else is worth having."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and kind != DistributedType.DEEPSPEED:
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


def _resume(run: Run, which: str) -> None:
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    found = checkpoint.list_checkpoints(run.run_dir)
    path = (found[-1] if found else None) if which == "latest" else Path(which)
    if path is None or not (path / "state.json").is_file():
        raise RecipeError(f"--resume {which}: no checkpoint found in {run.run_dir if which == 'latest' else path}")
    lora, optimizer_state, state = checkpoint.load_checkpoint(path)
    if state["fingerprint"] != run.recipe.fingerprint():
        log.warning("resuming %s, saved with a different recipe (fingerprint %s, now %s)", path,
                    state["fingerprint"], run.recipe.fingerprint())
    unet = run.accelerator.unwrap_model(run.unet)
    files.check_tensors(lora, get_peft_model_state_dict(unet), path / checkpoint.ADAPTER, "checkpoint's adapter")
    set_peft_model_state_dict(unet, lora)
    checkpoint.restore_optimizer(run.optimizer, run.lr_scheduler, optimizer_state, state, path,
                                 run.accelerator.scaler)
    run.train_loader = run.accelerator.skip_first_batches(run.train_loader, state["micro_steps"])
    run.start_step = state["step"]
    run.skipped_steps = int(state.get("skipped_steps", 0))
    run.history = state["history"]
    if run.accelerator.is_main_process:
        checkpoint.rewind_metrics(run.run_dir / "metrics.jsonl", run.start_step)
    log.info("resumed from %s at step %d", path, run.start_step)


def _step_seed(run: Run, micro_step: int) -> int:
    """Micro-step m on process r: the seed of torch's global RNG (LoRA dropout), so a resumed run draws exactly
    what an uninterrupted one would, with no RNG state in the checkpoint."""
    accelerator = run.accelerator
    return run.recipe.train.seed * 1_000_003 + micro_step * accelerator.num_processes + accelerator.process_index


def _noise_generators(run: Run, micro_step: int, pairs: int) -> list[torch.Generator]:
    """One generator per pair, seeded by (seed, the pair's position in the run's stream of draws). accelerate
    deals process r its micro-batch m from batch m * P + r of the stream, so pair i sits at position
    (m * P + r) * B + i whatever P and B are: a resumed run, and P processes x batch B against one process x
    batch P * B, draw the same noise and timestep for the same pair."""
    accelerator = run.accelerator
    first = (micro_step * accelerator.num_processes + accelerator.process_index) * pairs
    return [torch.Generator(accelerator.device).manual_seed((run.recipe.train.seed << 32) + first + i)
            for i in range(pairs)]


@dataclass
class TrainStep:
    """What one micro-step of training did. `finite` carries over to the next micro-step of the same optimizer
    step (every micro-batch's loss must be finite); the rest is decided on an accumulation boundary, in the one
    host sync of an optimizer step, agreed by every process."""

    output: StepOutput
    finite: torch.Tensor | bool  # the loss of every micro-batch of this optimizer step so far was finite
    boundary: bool = False  # this micro-batch ended an optimizer step
    healthy: bool = True  # boundary: the loss and gradients were finite on every process (else the step is skipped)
    applied: bool = False  # boundary: the update reached the weights (not skipped for NaN/Inf or by fp16 scaling)
    stopping: bool = False  # boundary: some process was asked to stop (SIGINT/SIGTERM)


def _finite_norm(norm: torch.Tensor | float | None, device: torch.device) -> torch.Tensor:
    """accelerate's clip_grad_norm_ returns a tensor, or under DeepSpeed the engine's global norm as a float or
    None (not computed yet)."""
    if isinstance(norm, torch.Tensor):
        return torch.isfinite(norm)
    return torch.tensor(norm is None or math.isfinite(norm), device=device)


def train_step(accelerator: Any, unet: Any, base: models.BaseModel, batch: EncodedBatch,
               objective: ObjectiveRecipe, max_grad_norm: float,
               generator: torch.Generator | list[torch.Generator], optimizer: torch.optim.Optimizer,
               params: list[torch.nn.Parameter], finite: torch.Tensor | bool = True,
               stop_requested: bool = False) -> TrainStep:
    """One micro-step as training runs it, and as `lora-dpo bench` times it: the DPO step, backward, and on an
    accumulation boundary clipping, one host sync, and the optimizer step unless the loss or the gradient norm
    was NaN/Inf on some process. fp16's loss scaler skips overflowing steps itself (so its optimizer.step() is
    always called: that is where the scale is lowered). DeepSpeed steps inside `backward` (its optimizer.step()
    does nothing) and skips a step with NaN/Inf gradients itself: its `step_was_skipped` says whether the update
    reached the weights, and its clip_grad_norm_ returns the pre-clip norm, inf for a skipped step (fp16 under
    DeepSpeed: its own loss scaler, untested here: the CPU runs no fp16)."""
    with accelerator.accumulate(unet):
        out = dpo_step(unet, base, batch, objective, generator)
        accelerator.backward(out.loss)
        finite = torch.isfinite(out.metrics["loss"]) & finite
        if not accelerator.sync_gradients:
            return TrainStep(out, finite)
        deepspeed = _deepspeed(accelerator)
        # a loss scaler (torch's, or DeepSpeed's own for fp16) skips an overflowing step and lowers the scale: that
        # skip is its routine, not a bad step, so only the loss decides health; the norm reads inf for it
        scaled = accelerator.scaler is not None or (deepspeed and accelerator.mixed_precision == "fp16")
        norm = accelerator.clip_grad_norm_(params, max_grad_norm or math.inf)  # inf: only measure the norm
        healthy = finite if scaled else finite & _finite_norm(norm, out.loss.device)
        ok, stopping = guards.step_flags(accelerator, healthy, stop_requested)
        if ok or scaled:
            optimizer.step()
        if deepspeed:  # the step happened in backward; only DeepSpeed knows if it was applied
            applied = not optimizer.step_was_skipped
            if applied and not ok:
                raise guards.TrainingError(
                    "DeepSpeed applied an optimizer step whose loss or gradients were NaN/Inf, so the adapter's "
                    "weights are lost. DeepSpeed 0.19.8 skips such steps in fp32 and bf16 (unless its config sets "
                    "bf16.check_grad_overflow = false; older versions may not skip them): upgrade deepspeed, or "
                    "launch with recipes/accelerate/ddp.yaml, where lora-dpo skips them itself")
        else:
            applied = ok and not optimizer.step_was_skipped
        optimizer.zero_grad(set_to_none=True)
    return TrainStep(out, True, boundary=True, healthy=ok, applied=applied, stopping=stopping)


def _deepspeed(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _layout(accelerator: Any) -> str:
    """How this run was launched, as accelerate set it up: what a launch that silently fell back to something
    else (DDP for DeepSpeed, one process for two) shows at start."""
    processes = accelerator.num_processes
    if not _deepspeed(accelerator) and processes == 1:
        return "one process"
    kind = f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}" if _deepspeed(accelerator) else "DDP"
    backend = accelerator.state.backend
    return f"{kind}, {processes} process{'es' if processes > 1 else ''}" + (f", {backend}" if backend else "")


def _encode(run: Run, batch: data.PreferenceBatch | EncodedBatch) -> EncodedBatch:
    """Live batches go through the frozen VAE and text encoders, and bring the rows their loader skipped;
    batches from the latent cache are encoded already."""
    if isinstance(batch, EncodedBatch):
        return batch.to(run.accelerator.device)
    run.loader_stats.merge(batch.stats)
    return encode_batch(run.base, batch, run.accelerator.device)


@torch.no_grad()
def validate(run: Run) -> dict[str, float]:
    """Held-out implicit reward accuracy and margin, with the same noise at every evaluation."""
    unet = run.accelerator.unwrap_model(run.unet)
    device = run.accelerator.device
    totals: dict[str, float] = {}
    count = 0
    was_training = unet.training
    unet.eval()  # no LoRA dropout: every evaluation measures the same function of the weights
    for index, batch in enumerate(run.val_loader):
        generator = torch.Generator(device).manual_seed(run.recipe.train.seed + 7919 * index)
        out = dpo_step(unet, run.base, _encode(run, batch), run.recipe.objective, generator)
        size = len(batch.labels)
        for name, value in out.metrics.items():
            totals[name] = totals.get(name, 0.0) + float(value) * size
        count += size
    unet.train(was_training)
    return {f"val_{name}": total / count for name, total in totals.items()}


def fit(run: Run) -> dict[str, Any]:
    """Train, guarded: SIGINT/SIGTERM stop the run after the current optimizer step and a checkpoint
    (`guards.Interrupted`); running out of GPU memory becomes advice on settings that fit."""
    from tqdm.auto import tqdm

    main = run.accelerator.is_main_process
    with (guards.out_of_memory_advice(run.recipe), guards.StopSignals(announce=main) as stop,
          tqdm(total=run.recipe.train.max_steps, initial=run.start_step, desc=run.recipe.objective.kind,
               disable=not main) as bar):
        return _loop(run, stop, bar)


def _loop(run: Run, stop: guards.StopSignals, bar: Any) -> dict[str, Any]:
    """The loop: one `dpo_step` per micro-batch, an optimizer step every `gradient_accumulation` of them. A step
    skipped for NaN/Inf still counts as a step and consumes its pairs (the run ends at max_steps, and a resume
    finds the data where an uninterrupted run would); the learning-rate schedule counts applied updates only."""
    cfg, accelerator = run.recipe.train, run.accelerator
    params = models.lora_parameters(accelerator.unwrap_model(run.unet))
    step, micro_step = run.start_step, run.start_step * cfg.gradient_accumulation
    sums: dict[str, torch.Tensor] = {}  # running metric sums over `window` micro-steps, on device: read when logging
    window = 0
    bad = guards.BadSteps(cfg.max_bad_steps, total=run.skipped_steps)
    saved: tuple[int, Path | None] = (-1, None)  # the last checkpoint written: (step, path)
    val_metrics = validate(run) if run.val_loader is not None and step == 0 else {}
    if val_metrics:
        _record(run, {"step": 0, **val_metrics})
    accuracy = "reward_accuracy" if get_objective(run.recipe.objective.kind).needs_reference else "error_accuracy"
    started = time.perf_counter()
    run.unet.train()
    finite: torch.Tensor | bool = True  # every loss of the current optimizer step so far
    for batch in run.train_loader:
        torch.manual_seed(2**63 + _step_seed(run, micro_step))  # LoRA dropout: torch's global RNG, own stream
        encoded = _encode(run, batch)
        result = train_step(accelerator, run.unet, run.base, encoded, run.recipe.objective, cfg.max_grad_norm,
                            _noise_generators(run, micro_step, len(encoded.labels)), run.optimizer, params, finite,
                            stop.signum is not None)
        finite = result.finite
        micro_step += 1
        window += 1
        for name, value in result.output.metrics.items():
            sums[name] = sums.get(name, 0) + value
        if not result.boundary:
            continue
        step += 1
        if result.applied:
            run.lr_scheduler.step()
        bar.update(1)
        bad.record(result.healthy, step, run.recipe, run.run_dir)
        final = step == cfg.max_steps
        log_now = step % cfg.log_every == 0 or final
        val_now = run.val_loader is not None and (step % cfg.val_every == 0 or final)
        if log_now or val_now:
            record: dict[str, float] = {"step": step}
            if log_now:
                sums = accelerator.reduce(sums, "mean")  # every process's pairs, not only the main one's
                record |= {"lr": run.lr_scheduler.get_last_lr()[0]}
                record |= {name: float(total) / window for name, total in sums.items()}
                record |= {"skipped_steps": bad.total} if bad.total else {}
                sums, window = {}, 0
            if val_now:
                val_metrics = validate(run)
                record |= val_metrics
            _record(run, record)
            shown = {"acc": record.get(accuracy), "val_acc": val_metrics.get(f"val_{accuracy}")}
            bar.set_postfix({"loss": f"{record['loss']:.4f}"} if "loss" in record else {},
                            **{k: f"{v:.2f}" for k, v in shown.items() if v is not None})
        if run.sampler is not None:
            run.sampler.maybe_sample(step, final=step == cfg.max_steps)
        checkpoint_due = cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not final
        if checkpoint_due and not bad.in_a_row:  # during a run of bad steps the last good checkpoint stays newest
            saved = (step, _save_checkpoint(run, step, micro_step, bad.total))
        if result.stopping and not final:
            path = saved[1] if saved[0] == step else _save_checkpoint(run, step, micro_step, bad.total)
            raise guards.Interrupted(step, stop.signum or signal.SIGINT, path)
    seconds = time.perf_counter() - started
    final = {k: v for k, v in run.history[-1].items() if k != "step"} if run.history else {}
    skipped = dict(Counter(run.loader_stats.skipped.values()))
    return {"steps": step, "seconds": round(seconds, 2), "data": run.data_summary, "skipped": skipped,
            "skipped_steps": bad.total, **final}


def _record(run: Run, record: dict[str, float]) -> None:
    """Keep a logged record (checkpoints carry the history) and append it to metrics.jsonl."""
    run.history.append(record)
    run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))
    if run.accelerator.is_main_process:
        with open(run.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _check_processes_agree(run: Run) -> str:
    """The adapter's sha256 on this process; with several processes, raise unless all hold the same bytes
    (data parallel training keeps replicas identical; a mismatch means gradients were not synchronised)."""
    import hashlib

    from accelerate.utils import gather_object

    from lora_dpo.export import lora_state_dict

    state = lora_state_dict(run.accelerator.unwrap_model(run.unet))
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].float().numpy().tobytes())
    mine = digest.hexdigest()
    if run.accelerator.num_processes > 1:
        digests = gather_object([mine])
        if len(set(digests)) > 1:
            raise RuntimeError(f"the {len(digests)} processes ended with different adapters "
                               f"({', '.join(d[:12] for d in digests)}): their gradients were not synchronised; "
                               "check the accelerate launch configuration")
    return mine


def _save_checkpoint(run: Run, step: int, micro_step: int, skipped_steps: int) -> Path | None:
    """Write a checkpoint from the main process; returns its path there (None on the others)."""
    run.accelerator.wait_for_everyone()
    if not run.accelerator.is_main_process:
        return None
    from peft.utils import get_peft_model_state_dict

    unet = run.accelerator.unwrap_model(run.unet)
    return checkpoint.save_checkpoint(run.run_dir, step, get_peft_model_state_dict(unet), run.optimizer,
                                      run.lr_scheduler, {"micro_steps": micro_step, "history": run.history,
                                                         "fingerprint": run.recipe.fingerprint(),
                                                         "skipped_steps": skipped_steps},
                                      keep=run.recipe.train.keep_checkpoints, scaler=run.accelerator.scaler)


def _objective_summary(recipe: Recipe) -> str:
    cfg = recipe.objective
    if cfg.kind == "mapo":
        return f"mapo, mapo_beta {cfg.mapo_beta:g}, mapo_snr {cfg.mapo_snr:g}"
    return cfg.kind if cfg.kind == "sft" else f"{cfg.kind}, beta {cfg.beta:g}"


def _data_report(run: Run) -> str:
    """What reading the source found plus what every process's loaders skipped while training."""
    from accelerate.utils import gather_object

    report = data.PairStats()
    report.merge(run.data_stats)
    for stats in gather_object([run.loader_stats]):
        report.merge(stats)
    return report.summary()


def train(recipe: Recipe, recipe_path: Path | None = None, resume: str | None = None) -> Path:
    """Train a LoRA adapter as the recipe says; return the adapter file's path."""
    run_dir = Path(recipe.output.dir) / recipe.run_name(recipe_path)
    with guards.out_of_memory_advice(recipe):  # loading the base onto a small GPU may not fit either
        run = setup(recipe, run_dir, resume)
    accelerator = run.accelerator
    cfg = recipe.train
    effective = cfg.batch_size * cfg.gradient_accumulation * accelerator.num_processes
    accelerator.print(f"lora-dpo: {run.data_summary}")
    accelerator.print(f"lora-dpo: {cfg.max_steps} steps x {effective} pairs (batch {cfg.batch_size} x accumulation "
                      f"{cfg.gradient_accumulation} x {accelerator.num_processes} processes) on "
                      f"{accelerator.device}; objective {_objective_summary(recipe)}")
    accelerator.print(f"lora-dpo: launch: {_layout(accelerator)}")
    if not resume:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    summary = fit(run)
    accelerator.wait_for_everyone()
    accelerator.print(f"lora-dpo: data: {_data_report(run)}")
    digest = _check_processes_agree(run)
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(run.unet)
        with files.writing(run_dir / ADAPTER_FILE, run_dir):  # disk full: an OutputError, no partial adapter
            path = save_adapter(run_dir, unet, run.lora_config, run.base.pipeline_class, recipe, summary)
        evaluate.plot_training(run_dir / "metrics.jsonl", run_dir / "training.png")
        keys = ("val_reward_accuracy", "reward_accuracy", "val_error_accuracy", "error_accuracy")
        acc = next((f"{k.removeprefix('val_').replace('_', ' ')} {summary[k]:.3f}; " for k in keys if k in summary), "")
        accelerator.print(f"lora-dpo: done in {summary['seconds']:.0f} s; {acc}wrote {path}")
        processes = accelerator.num_processes
        accelerator.print(f"lora-dpo: adapter sha256 {digest[:16]}"
                          + (f", identical on all {processes} processes" if processes > 1 else ""))
    if accelerator.num_processes > 1:
        # Free the DDP model (it holds the process group) on every rank while all are alive: left to interpreter
        # exit, a rank whose peer is gone can block forever in a destructor (seen with gloo under load).
        run.unet = run.optimizer = run.train_loader = run.val_loader = None
        accelerator.free_memory()
        gc.collect()
        accelerator.wait_for_everyone()
    accelerator.end_training()  # stops the trackers, destroys the process group
    return run_dir / ADAPTER_FILE
