"""Online Diffusion-DPO: `fit_rounds` trains the run's adapter round after round on pairs of its own images.

Each round: generate `samples_per_prompt` images per prompt with the model being trained (adapters on: the base
itself in round 1, whose LoRA is still zero), score them, pair them (`[online].pair_rule`), train
`steps_per_round` optimizer steps on the pairs with the same adapter, optimizer and learning-rate schedule, the
reference the frozen base with adapters off as always; then measure the round on held-out prompts.

Kill-safe and exact: a round ends on a checkpoint (`Run.end_step`), so a resume finds the adapter every round's
images were drawn with; a round's images are kept a prompt at a time and never drawn again; its data set is
complete once `round.json` is written; a round measured once is not measured again.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from lora_dpo import checkpoint, data, guards, models, online
from lora_dpo.cache.read import collate_encoded
from lora_dpo.evaluate import pipeline_from_parts
from lora_dpo.recipe import Recipe
from lora_dpo.step import launched_with_deepspeed, unwrap
from lora_dpo.train.build import Run
from lora_dpo.train.loop import fit, record_metrics, save_run_checkpoint


def prepare(recipe: Recipe) -> online.Prompts:
    """An online recipe's prompts, and its scorers loaded once, before any weight of the base loads: a launch of
    several processes, a missing prompt file or a scorer that cannot load is one line here."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or launched_with_deepspeed():
        raise online.OnlineError("[online].rounds: an online run generates, scores and trains in one process, without "
                                 "DeepSpeed; launch it with `lora-dpo train`, not `accelerate launch`")
    prompts = online.split_prompts(recipe.online, recipe.train.seed)
    with online.loaded_scorers(recipe.online.scorers):  # each scoring phase loads them again, and frees them
        pass
    return prompts


def summary_line(recipe: Recipe, prompts: online.Prompts) -> str:
    """What the run trains on, for its opening lines and metrics.json."""
    cfg = recipe.online
    per_round = cfg.prompts_per_round or len(prompts.train)
    return (f"online: {cfg.rounds} rounds x {cfg.steps_per_round} steps; each draws {cfg.samples_per_prompt} images "
            f"for {min(per_round, len(prompts.train))} of {len(prompts.train)} training prompts, pairs them "
            f"({cfg.pair_rule}) by {', '.join(cfg.scorers)}; {len(prompts.heldout)} held-out prompts measure "
            "each round")


def fit_rounds(run: Run, prompts: online.Prompts) -> dict[str, Any]:
    """Every round from the one the run stands in (a resume goes on mid-round, or generates the next round's
    images with the checkpoint's adapter); returns the last `fit`'s summary with every round's record."""
    recipe, cfg = run.recipe, run.recipe.online
    pipe = pipeline_from_parts(run.base, unwrap(run.unet), recipe.model.revision)
    guidance = run.base.family.pipeline_guidance_scale() if cfg.guidance_scale is None else cfg.guidance_scale
    settings = dict(steps=cfg.steps, guidance_scale=float(guidance), resolution=recipe.data.resolution)
    per_step = recipe.train.batch_size * recipe.train.gradient_accumulation * run.accelerator.num_processes
    started, first = time.perf_counter(), run.start_step // cfg.steps_per_round
    if not checkpoint.list_checkpoints(run.run_dir):  # step 0's: a kill in round 1's generation resumes too
        save_run_checkpoint(run, 0, 0, guards.BadSteps(recipe.train.max_bad_steps))
    if first == cfg.rounds:  # killed after the last checkpoint, before the adapter was written: nothing to train
        run.train_loader = []
        summary = fit(run)
    for index in range(first, cfg.rounds):
        if index:  # the round before, if a kill came between its last checkpoint and its measurement
            _measure(run, pipe, prompts, index - 1, settings)
        run.train_loader = None  # the last round's pairs: freed before this round's are read
        record, paths, round_prompts = _round_data(run, pipe, prompts, index, settings)
        dataset = online.round_dataset(run.base, recipe, record, paths, round_prompts, run.accelerator.device)
        draws = cfg.steps_per_round * per_step
        done = run.start_pairs - index * draws  # pairs of this round consumed before a resume
        sampler = data.StreamSampler(len(dataset), draws, recipe.train.seed * 1_000_003 + index, start=done)
        run.train_loader = torch.utils.data.DataLoader(dataset, batch_size=recipe.train.batch_size, sampler=sampler,
                                                       collate_fn=collate_encoded)
        run.end_step, run.progress = (index + 1) * cfg.steps_per_round, f"round {index + 1}/{cfg.rounds}"
        summary = fit(run)
        run.start_step, run.start_pairs = summary["steps"], summary["steps"] * per_step
        run.bad_steps = (summary["skipped_steps"], 0)  # a round ends on a checkpoint, so never inside a bad run
    _measure(run, pipe, prompts, cfg.rounds - 1, settings)
    rounds = [_round_summary(run, i) for i in range(cfg.rounds)]
    return {**summary, "seconds": round(time.perf_counter() - started, 2), "rounds": rounds}


def _round_data(run: Run, pipe: Any, prompts: online.Prompts, index: int,
                settings: dict[str, Any]) -> tuple[dict[str, Any], list[Path], list[str]]:
    """Round `index`'s record, its latents files (one a prompt) and prompts: generated (going on from the prompts a
    killed run finished; none when the round is complete), scored and paired."""
    recipe, cfg = run.recipe, run.recipe.online
    folder = online.round_folder(run.run_dir, index)
    ids = online.round_prompt_indices(len(prompts.train), cfg, recipe.train.seed, index)
    seeds = online.round_seeds(recipe.train.seed, index, cfg.samples_per_prompt)
    round_prompts = [prompts.train[i] for i in ids]
    with models.eval_mode(unwrap(run.unet)):  # no LoRA dropout: the images are the adapter's as it stands
        paths = online.generate(pipe, run.base.family, round_prompts, seeds, folder,
                                desc=f"round {index + 1}/{cfg.rounds} generating", **settings)
    record = online.read_round(folder, round_prompts)
    if record is None:
        with online.loaded_scorers(cfg.scorers) as scorers:
            record = online.make_round(cfg, index, folder, round_prompts, ids, seeds, scorers)
    run.accelerator.print(f"lora-dpo: round {index + 1}/{cfg.rounds}: {len(record['pairs'])} pairs from "
                          f"{record['prompts']} prompts, mean margin {record['mean_margin']:.4g}; {folder}")
    return record, paths, round_prompts


def _measure(run: Run, pipe: Any, prompts: online.Prompts, index: int, settings: dict[str, Any]) -> None:
    """Round `index` measured on the held-out prompts, unless it was already; its line in metrics.jsonl."""
    folder = online.round_folder(run.run_dir, index)
    if online.read_heldout(folder) is not None:
        return
    cfg = run.recipe.online
    with models.eval_mode(unwrap(run.unet)), online.loaded_scorers(cfg.scorers) as scorers:
        record = online.measure_round(pipe, run.base.family, index, (index + 1) * cfg.steps_per_round, folder,
                                      run.run_dir, prompts.heldout, scorers, seeds=cfg.heldout_seeds, **settings)
    record_metrics(run, online.metrics_record(record))
    lines = [f"{name} win rate {r['rate']:.3f} [{r['low']:.3f}, {r['high']:.3f}], score {r['mean_diff']:+.4g} "
             f"[{r['diff_low']:+.4g}, {r['diff_high']:+.4g}]" for name, r in record["scorers"].items()]
    run.accelerator.print(f"lora-dpo: round {index + 1} on {record['prompts']} held-out prompts, adapter vs base: "
                          + "; ".join(lines))


def _round_summary(run: Run, index: int) -> dict[str, Any]:
    """A round in metrics.json: its pairs and their margin, its images' mean scores, its held-out results."""
    folder = online.round_folder(run.run_dir, index)
    record, heldout = online.read_round(folder) or {}, online.read_heldout(folder) or {}
    return {"round": index + 1, "pairs": len(record.get("pairs", [])), "mean_margin": record.get("mean_margin"),
            "mean_score": record.get("mean_score"), "heldout": heldout.get("scorers")}
