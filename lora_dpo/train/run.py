"""`train(recipe)`: build the run, fit it, check that every process holds the same adapter, write the adapter
file (under DeepSpeed from the optimizer's fp32 master weights), the training plot and the closing lines, which
give the adapter file's sha256 (of its bytes, as metrics.json, the model card and eval reports do)."""

from __future__ import annotations

import gc
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lora_dpo import data, files, guards, models, trackers
from lora_dpo.export import ADAPTER_FILE, lora_state_dict, save_adapter
from lora_dpo.recipe import ObjectiveRecipe, Recipe
from lora_dpo.step import is_deepspeed, unwrap
from lora_dpo.train import online, samples
from lora_dpo.train.build import Run, setup
from lora_dpo.train.loop import fit

log = logging.getLogger(__name__)


def _check_processes_agree(run: Run) -> None:
    """With several processes, raise unless all hold the same LoRA weights in the model they train (data parallel
    training keeps replicas identical; a mismatch means gradients were not synchronised). The digest compared is
    of tensors, for this check only: the adapter's sha256 is its file's (`files.sha256`)."""
    import hashlib

    from accelerate.utils import gather_object

    if run.accelerator.num_processes == 1:
        return
    state = lora_state_dict(unwrap(run.unet))
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].float().numpy().tobytes())
    digests = gather_object([digest.hexdigest()])
    if len(set(digests)) > 1:
        raise RuntimeError(f"the {len(digests)} processes ended with different LoRA weights (weight digests "
                           f"{', '.join(d[:12] for d in digests)}): their gradients were not synchronised; check "
                           "the accelerate launch configuration")


def _adapter_weights(run: Run) -> dict[str, Tensor]:
    """The LoRA weights to save, on every process (under DeepSpeed a collective: all must call it). DeepSpeed's
    module holds a bf16/fp16 copy of them, stepped by rounding the fp32 master weights its optimizer updates:
    the adapter is the master copy, not its rounding. DDP and one process train the weights themselves."""
    unet = unwrap(run.unet)
    if not is_deepspeed(run.accelerator):
        return lora_state_dict(unet)
    from deepspeed.utils import safe_get_full_fp32_param
    from peft.utils import get_peft_model_state_dict

    state = unet.state_dict()
    for name, param in unet.named_parameters():  # the same order on every process: each gather is an all-reduce
        if "lora_" not in name:
            continue
        master = safe_get_full_fp32_param(param)  # ZeRO-1/2: the partitions summed into the whole fp32 tensor
        if master is None and param.dtype != torch.float32:  # e.g. ZeRO-0 with fp16: no master copy to read
            log.warning("%s: DeepSpeed keeps no fp32 master copy lora-dpo can read; saving its %s weights", name,
                        param.dtype)
        state[name] = param if master is None else master
    weights = get_peft_model_state_dict(unet, state_dict=state)  # peft's names and selection, master values
    return {k: v.detach().float().cpu().contiguous() for k, v in weights.items()}


def _layout(accelerator: Any) -> str:
    """How this run was launched, as accelerate set it up: what a launch that silently fell back to something
    else (DDP for DeepSpeed, one process for two) shows at start."""
    processes, deepspeed = accelerator.num_processes, is_deepspeed(accelerator)
    if not deepspeed and processes == 1:
        return "one process"
    kind = f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}" if deepspeed else "DDP"
    backend = accelerator.state.backend
    return f"{kind}, {processes} process{'es' if processes > 1 else ''}" + (f", {backend}" if backend else "")


def _objective_summary(cfg: ObjectiveRecipe) -> str:
    if cfg.kind == "mapo":
        return f"mapo, mapo_beta {cfg.mapo_beta:g}, mapo_snr {cfg.mapo_snr:g}"
    return cfg.kind if cfg.kind == "sft" else f"{cfg.kind}, beta {cfg.beta:g}"


def _accuracy_phrase(key: str, value: float) -> str:
    """"held-out reward accuracy 0.812; " for a `val_` metric, "training reward accuracy ...; " otherwise: a
    number measured on pairs the adapter trained on must not pass for one that generalises."""
    name = key.removeprefix("val_").replace("_", " ")
    return f"{'held-out' if key.startswith('val_') else 'training'} {name} {value:.3f}; "


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
    # an online run's prompts and scorers: a missing file or a scorer that cannot load stops it before the base loads
    prompts = online.prepare(recipe) if recipe.online.rounds else None
    fresh = not run_dir.exists()
    try:
        with guards.out_of_memory_advice(recipe):  # loading the base onto a small GPU may not fit either
            run = setup(recipe, run_dir, resume)
    except BaseException:
        if fresh:  # a run that never started leaves no folder behind (tensorboard logs, temporaries)
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    accelerator = run.accelerator
    if prompts is not None:
        run.data_summary = online.summary_line(recipe, prompts)
    cfg = recipe.train
    effective = cfg.batch_size * cfg.gradient_accumulation * accelerator.num_processes
    accelerator.print(f"lora-dpo: {run.data_summary}")
    accelerator.print(f"lora-dpo: {cfg.max_steps} steps x {effective} pairs (batch {cfg.batch_size} x accumulation "
                      f"{cfg.gradient_accumulation} x {accelerator.num_processes} processes) on "
                      f"{accelerator.device}; objective {_objective_summary(recipe.objective)}")
    accelerator.print(f"lora-dpo: launch: {_layout(accelerator)}")
    if not resume and accelerator.is_main_process:  # one process resets the run's files: the one that writes them
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    accelerator.wait_for_everyone()  # and every process sets off after the reset, never while it happens
    if not gc.isenabled():  # the CLI held collection back through start-up: setup's objects are not scanned again
        gc.freeze()
        gc.enable()
    summary = fit(run) if prompts is None else online.fit_rounds(run, prompts)
    accelerator.wait_for_everyone()
    if prompts is None:  # an online run's data is its rounds' (each round's line says what it made)
        accelerator.print(f"lora-dpo: data: {_data_report(run)}")
    _check_processes_agree(run)
    weights = _adapter_weights(run)
    if accelerator.is_main_process:
        unet = unwrap(run.unet)
        with files.writing(run_dir / ADAPTER_FILE, run_dir):  # disk full: an OutputError, no partial adapter
            path = save_adapter(run_dir, unet, run.lora_config, recipe, summary, weights)
        rounds = recipe.online.steps_per_round if recipe.online.rounds else None
        plot = samples.plot_training(run_dir / "metrics.jsonl", run_dir / "training.png", rounds)
        if plot is not None:
            trackers.log_image(accelerator, "training_curves", plot, summary["steps"])
        keys = ("val_reward_accuracy", "reward_accuracy", "val_error_accuracy", "error_accuracy")
        acc = next((_accuracy_phrase(k, summary[k]) for k in keys if k in summary), "")
        accelerator.print(f"lora-dpo: done in {summary['seconds']:.0f} s; {acc}wrote {path}")
        accelerator.print(f"lora-dpo: load it on its base: {run.base.pipeline_class.__name__}.from_pretrained("
                          f"{models.base_location(recipe.model.base)!r}).load_lora_weights({str(run_dir)!r})")
        # the file's bytes, whole: the value metrics.json, the model card and `lora-dpo eval` reports record
        accelerator.print(f"lora-dpo: adapter sha256 {files.sha256(path)} ({ADAPTER_FILE})")
        processes = accelerator.num_processes
        if processes > 1:
            accelerator.print(f"lora-dpo: LoRA weights identical on all {processes} processes")
    if accelerator.num_processes > 1:
        # Free the DDP model (it holds the process group) on every rank while all are alive: left to interpreter
        # exit, a rank whose peer is gone can block forever in a destructor (seen with gloo under load).
        run.unet = run.optimizer = run.train_loader = run.val_loader = None
        accelerator.free_memory()
        gc.collect()
        accelerator.wait_for_everyone()
    accelerator.end_training()  # stops the trackers, destroys the process group
    return run_dir / ADAPTER_FILE
