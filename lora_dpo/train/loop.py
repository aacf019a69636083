"""The training loop: `fit` guards it, `_loop` loops: one `step.train_step` per micro-batch, an optimizer step every
`gradient_accumulation` of them, logging, validation, sample grids and checkpoints on their intervals.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from lora_dpo import checkpoint, data, guards, models, trackers
from lora_dpo.objectives import OBJECTIVES
from lora_dpo.seeds import dropout_seed, first_pair, noise_generators, validation_generator
from lora_dpo.step import EncodedBatch, dpo_step, encode_batch, train_step, unwrap
from lora_dpo.train.build import Run, launch_layout


def _encode(run: Run, batch: data.PreferenceBatch | EncodedBatch) -> EncodedBatch:
    """Live batches go through the frozen VAE and text encoders, and bring the rows their loader skipped;
    batches from the latent cache are encoded already."""
    if isinstance(batch, EncodedBatch):
        return batch.to(run.accelerator.device)
    run.loader_stats.merge(batch.stats)
    if run.stream_positions is not None:
        run.stream_positions.update(batch.stream_positions)
    return encode_batch(run.base, batch, run.accelerator.device)


@torch.no_grad()
def validate(run: Run) -> dict[str, float]:
    """Held-out implicit reward accuracy and margin, with the same noise at every evaluation."""
    unet = unwrap(run.unet)
    device = run.accelerator.device
    totals: dict[str, float] = {}
    count = 0
    with models.eval_mode(unet):  # no LoRA dropout: every evaluation measures the same function of the weights
        for index, batch in enumerate(run.val_loader):
            generator = validation_generator(run.recipe.train.seed, index, device)
            out = dpo_step(unet, run.base, _encode(run, batch), run.recipe.objective, generator)
            size = len(batch.labels)
            for name, value in out.metrics.items():
                totals[name] = totals.get(name, 0.0) + float(value) * size
            count += size
    return {f"val_{name}": total / count for name, total in totals.items()}


def fit(run: Run) -> dict[str, Any]:
    """Train, guarded: SIGINT/SIGTERM stop the run after the current optimizer step and a checkpoint
    (`guards.Interrupted`); running out of GPU memory becomes advice on settings that fit."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    main = run.accelerator.is_main_process
    with (guards.out_of_memory_advice(run.recipe), guards.StopSignals(announce=main) as stop,
          tqdm(total=run.recipe.train.max_steps, initial=run.start_step, desc=run.progress or run.recipe.objective.kind,
               disable=not main) as bar, logging_redirect_tqdm()):  # log lines above the bar, not inside it
        return _loop(run, stop, bar)


def _loop(run: Run, stop: guards.StopSignals, bar: Any) -> dict[str, Any]:
    """The loop: one `dpo_step` per micro-batch, an optimizer step every `gradient_accumulation` of them. A step
    skipped for NaN/Inf still counts as a step and consumes its pairs (the run ends at max_steps, and a resume
    finds the data where an uninterrupted run would); the learning-rate schedule counts applied updates only."""
    cfg, accelerator = run.recipe.train, run.accelerator
    params = models.lora_parameters(unwrap(run.unet))
    step, micro_step = run.start_step, 0  # micro_step: micro-batches since this process started
    sums: dict[str, torch.Tensor] = {}  # running metric sums over `window` micro-steps, on device: read when logging
    window = 0
    bad = guards.BadSteps(cfg.max_bad_steps, *run.bad_steps, fp16_vae_advice=run.base.family.fp16_vae_advice)
    saved: tuple[int, Path | None] = (-1, None)  # the last checkpoint written: (step, path)
    val_metrics = validate(run) if run.val_loader is not None and step == 0 else {}
    if val_metrics:
        record_metrics(run, {"step": 0, **val_metrics})
    accuracy = "reward_accuracy" if OBJECTIVES[run.recipe.objective.kind].needs_reference else "error_accuracy"
    started = time.perf_counter()
    run.unet.train()
    finite: torch.Tensor | bool = True  # every loss of the current optimizer step so far
    processes, rank = accelerator.num_processes, accelerator.process_index
    for batch in run.train_loader:
        first = first_pair(run.start_pairs, micro_step, processes, rank, cfg.batch_size)  # its place in the run's draws
        torch.manual_seed(dropout_seed(cfg.seed, first, cfg.batch_size))  # LoRA dropout
        encoded = _encode(run, batch)
        noise = noise_generators(cfg.seed, first, len(encoded.labels), accelerator.device)
        result = train_step(accelerator, run.unet, run.base, encoded, run.recipe.objective, cfg.max_grad_norm,
                            noise, run.optimizer, params, finite, stop.signum is not None)
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
            record_metrics(run, record)
            shown = {"acc": record.get(accuracy), "val_acc": val_metrics.get(f"val_{accuracy}")}
            bar.set_postfix({"loss": f"{record['loss']:.4f}"} if "loss" in record else {},
                            **{k: f"{v:.2f}" for k, v in shown.items() if v is not None})
        grid = run.sampler.maybe_sample(step, final=final) if run.sampler is not None else None
        if grid is not None:
            trackers.log_image(accelerator, "samples", grid, step)
        # the last step too: a finished run can train longer (--resume with a raised [train].max_steps)
        checkpoint_due = ((cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or final))
                          or step == run.end_step)  # an online round's end: the next round's images come from it
        pairs = run.start_pairs + micro_step * processes * cfg.batch_size  # consumed by every process so far
        if checkpoint_due and not bad.in_a_row:  # during a run of bad steps the last good checkpoint stays newest
            saved = (step, save_run_checkpoint(run, step, pairs, bad))
        if result.stopping and not final:
            path = saved[1] if saved[0] == step else save_run_checkpoint(run, step, pairs, bad)
            raise guards.Interrupted(step, stop.signum or signal.SIGINT, path)
    seconds = time.perf_counter() - started
    final = {k: v for k, v in run.history[-1].items() if k != "step"} if run.history else {}
    skipped = dict(Counter(run.loader_stats.skipped.values()))
    return {"steps": step, "seconds": round(seconds, 2), "data": run.data_summary, "heldout": run.heldout,
            "skipped": skipped, "skipped_steps": bad.total, **final}


def record_metrics(run: Run, record: dict[str, float]) -> None:
    """Keep a logged record (checkpoints carry the history) and append it to metrics.jsonl."""
    run.history.append(record)
    run.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))
    if run.accelerator.is_main_process:
        with open(run.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


def save_run_checkpoint(run: Run, step: int, pairs: int, bad: guards.BadSteps) -> Path | None:
    """Write a checkpoint from the main process; returns its path there (None on the others). `pairs`: the draws
    every process consumed so far, the data's position on any launch layout."""
    run.accelerator.wait_for_everyone()
    stream = _stream_state(run, pairs)  # every process takes part: each streams its own parts
    if not run.accelerator.is_main_process:
        return None
    from peft.utils import get_peft_model_state_dict

    unet = unwrap(run.unet)
    extra = {"pairs": pairs, "layout": launch_layout(run.recipe.train, run.accelerator.num_processes),
             "history": run.history, "recipe": run.recipe.to_dict(), "fingerprint": run.recipe.fingerprint(),
             "skipped_steps": bad.total, "bad_steps_in_a_row": bad.in_a_row}
    return checkpoint.save_checkpoint(run.run_dir, step, get_peft_model_state_dict(unet), run.optimizer,
                                      run.lr_scheduler, {**extra, **stream}, keep=run.recipe.train.keep_checkpoints,
                                      scaler=run.accelerator.scaler)


def _stream_state(run: Run, pairs: int) -> dict[str, Any]:
    """A stream's place in state.json (`{"stream": ...}`; empty for other sources): every part's position after
    the batches consumed, gathered from all processes, the layout that reads them (a resume with other parts is
    refused), the batches each process consumed in the whole run (`pairs` / (processes x batch)), and what the
    loaders counted so far (the closing line of a resumed run counts those rows once)."""
    if run.stream_positions is None:
        return {}
    from accelerate.utils import gather_object

    positions: dict[int, Any] = {}
    counted = data.PairStats()
    for mine, stats in gather_object([(run.stream_positions, run.loader_stats)]):
        positions |= mine
        counted.merge(stats)
    return {"stream": {"parts": {str(part): at for part, at in sorted(positions.items())},
                       "processes": run.accelerator.num_processes, "workers": run.train_loader.num_workers,
                       "batches": pairs // (run.accelerator.num_processes * run.recipe.train.batch_size),
                       "stats": counted.to_json()}}


