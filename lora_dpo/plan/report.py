"""The plan as text: `render` sets memory and compute with checkpointing off and on beside each GPU and lists what
to change when the step does not fit; `grid` is the Markdown table over ranks and resolutions."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import replace

from lora_dpo import models
from lora_dpo.plan.bases import architecture
from lora_dpo.plan.estimates import Plan, Setting, estimate, generation_hours, optimizer_bytes, seconds_per_pair
from lora_dpo.plan.gpus import CONTEXT_GIB, FRAGMENTATION, GiB, Gpu, find_gpu
from lora_dpo.plan.trace import measure_step
from lora_dpo.recipe import Recipe


def _size(n: float, unit: int) -> str:
    return f"{n / unit:.2f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds < 1 else f"{seconds * 1e3:,.0f}"


def _hours(h: float, unit: str = "") -> str:
    """Hours as the table prints them (`unit`: what follows hours); under 0.1 h in minutes or seconds, so a tiny
    run still reads."""
    if h >= 0.1:
        return f"{h:,.1f}{unit}"
    return f"{h * 60:.2g} min" if h * 60 >= 0.1 else f"{h * 3600:.2g} s"


def _pair(a: float, b: float, width: int) -> str:
    """Hours at 100 % and 50 % of a card's peak: `a` right-aligned in `width`, then ` / b` in 7."""
    return f"{_hours(a):>{width}} / {_hours(b):<7}"


def _amount(n: float) -> str:
    return f"{n:,.0f}" if n >= 1000 else f"{n:.3g}"


def _generation_lines(plan: Plan, unit: int, unit_name: str) -> list[str]:
    """An online recipe's generation: its images per round and for the run, what an image costs per part, the
    run's total beside the training's, and the memory while generating beside the step's."""
    gen, off, on, train = plan.generation, plan.off, plan.on, plan.recipe.train
    assert gen is not None  # only called for an online recipe
    counts, cfg = gen.counts, plan.recipe.online
    own, held = gen.images_per_round
    guidance = (f"{gen.passes} latents a step: classifier-free guidance {gen.guidance_scale:g}" if gen.passes == 2
                else f"one latent a step, guidance {gen.guidance_scale:g} an input")
    of = f" of {counts.train:,}" if counts.train_read else ""
    flop, flop_name, run_name = (1e12, "TFLOP", "PFLOP") if gen.image_flops >= 1e12 else (1e9, "GFLOP", "TFLOP")
    lines = [
        f"online: {cfg.rounds} rounds; each draws {counts.per_round:,}{of} training prompts x "
        f"{gen.samples} samples + {counts.heldout:,} held-out prompts x {gen.seeds} seeds = {own + held:,} images; "
        f"the base's held-out images once: {gen.base_images:,}; the run: {gen.images:,} images ({counts.note})",
        f"  each image: {gen.steps} inference steps, the denoiser on {guidance} ({gen.guidance_from}); no "
        "backward, no reference pass; one VAE decode (an image at a time); the scorers",
        "",
        f"{'generation (' + flop_name + ' per image, ' + run_name + ' the run)':<52}{'per image':>9}{'the run':>11}",
    ]
    parts = gen.flops
    labels = {"denoiser": f"denoiser, {gen.steps} steps x {gen.passes} latent(s)", "VAE decode": "VAE decode",
              "text encoders": "text encoders, a call per prompt", "scorers": f"scorers: {', '.join(cfg.scorers)} "
              "(2 x parameters x tokens)"}
    for part, label in labels.items():
        lines.append(f"  {label:<50}{_amount(parts[part] / gen.images / flop):>9}"
                     f"{_amount(parts[part] / flop / 1e3):>11}")
    lines.append(f"  {'total':<50}{_amount(gen.total_flops / gen.images / flop):>9}"
                 f"{_amount(gen.total_flops / flop / 1e3):>11}")
    training = off.total_flops * train.max_steps * train.gradient_accumulation
    lines.append(f"  {'training, for comparison (ckpt off)':<50}{'':>9}{_amount(training / flop / 1e3):>11}")
    peaks = [plan.generating_peak(est) for est in (off, on)]
    step_label = "the step's peak, for comparison"
    parts_peak = {f"the denoiser on {gen.passes * gen.batch} latents": gen.denoise.transient,
                  "the VAE decoding an image": gen.decode.transient, "the scorers' weights": gen.scorer_bytes}
    where = max(parts_peak, key=parts_peak.get)
    lines += [
        "",
        f"{'memory while generating (' + unit_name + ')':<52}{'ckpt off':>9}{'ckpt on':>9}",
        f"  {'peak: weights, optimizer state; no gradients':<50}{peaks[0] / unit:>9.2f}{peaks[1] / unit:>9.2f}",
        f"    reached in {where}",
        f"  {step_label:<50}{off.peak / unit:>9.2f}{on.peak / unit:>9.2f}",
        f"  {'scorers, fp32, only while a round scores':<50}{gen.scorer_bytes / unit:>9.2f}"
        f"{gen.scorer_bytes / unit:>9.2f}",
        f"  {'a card needs: (higher peak) x 1.10 + ctx':<50}{plan.online_required(off) / unit:>9.2f}"
        f"{plan.online_required(on) / unit:>9.2f}",
    ]
    below = all(peak <= est.peak for peak, est in zip(peaks, (off, on), strict=True))
    if not below:
        lines.append("  generating peaks above the step: the run needs more than the step alone (the row above)")
    else:
        lines.append("  generating peaks below the step: the run fits wherever the step fits")
    return lines


def render(plan: Plan, gpus: list[Gpu]) -> str:
    """The plan as text: memory and compute with checkpointing off and on, the GPUs, what to change."""
    recipe, arch, off, on = plan.recipe, plan.arch, plan.off, plan.on
    key, m = off.setting.key, off.step
    unit, unit_name = (GiB, "GiB") if off.peak >= GiB else (2**20, "MiB")
    flop, flop_name = (1e12, "TFLOP") if off.total_flops >= 1e12 else (1e9, "GFLOP")
    lora_params = sum(m.lora_numels)
    dtype = str(models.DTYPES[key.precision]).removeprefix("torch.")
    optimizer = off.setting.optimizer
    yardstick = find_gpu("rtx4090")  # the consumer card the shipped recipes are sized for
    chosen = plan.choice(yardstick.memory_gib)
    hours = seconds_per_pair(chosen.total_flops, key.batch_size, yardstick, 0.5) * plan.pairs / 3600
    gen = plan.generation
    time_text = f"{hours:,.1f} h"
    if gen:
        hours_gen = generation_hours(gen, yardstick, 0.5)
        time_text = (f"{_hours(hours, ' h')} training + {_hours(hours_gen, ' h')} generation = "
                     f"{_hours(hours + hours_gen, ' h')}")
    lines = [
        f"the run: {recipe.train.max_steps:,} steps x {plan.pairs // recipe.train.max_steps:,} pairs = "
        f"{plan.pairs:,} pairs; {time_text} on an {yardstick.card} at 50 % of its peak (every GPU "
        "below)",
        "",
        f"{arch.name} ({recipe.model.base}): {key.batch_size} pair(s) per step at {key.resolution} px, LoRA rank "
        f"{key.lora.rank} on {', '.join(models.target_modules(key.lora, arch.family))} "
        f"({lora_params / 1e6:.2f} M parameters)",
        f"objective {key.objective.kind}, precision {key.precision}, {optimizer}, accumulation "
        f"{off.setting.accumulation}, gradient checkpointing {json.dumps(recipe.train.gradient_checkpointing)}; "
        + ("data cached" if off.setting.cached else "data encoded every step (VAE and text encoders on the GPU)"),
        "",
        f"{'memory (' + unit_name + ')':<52}{'ckpt off':>9}{'ckpt on':>9}",
    ]

    def row(label: str, a: float, b: float, fmt: Callable[[float], str]) -> None:
        if a or b:
            lines.append(f"  {label:<50}{fmt(a):>9}{fmt(b):>9}")

    def size(n: float) -> str:
        return _size(n, unit)

    lora_bytes = 4 * lora_params
    row(f"UNet weights, {dtype} ({m.base_params / 1e6:,.1f} M parameters)", m.base_bytes, m.base_bytes, size)
    row("NF4 base: its Linear weights at ~0.52 bytes", -off.quantized_saving, -on.quantized_saving, size)
    row("LoRA weights, fp32", lora_bytes, lora_bytes, size)
    row(f"optimizer state, {optimizer} (AdamW 32-bit: {size(optimizer_bytes(m.lora_numels, 'adamw'))})",
        off.optimizer_state, on.optimizer_state, size)
    row("gradients kept across accumulation, fp32", off.grads_carried, on.grads_carried, size)
    row("activations, gradients, batch at the step's peak", off.step.peak - m.base_bytes - lora_bytes,
        on.step.peak - m.base_bytes - lora_bytes, size)
    row("VAE and text encoder weights (no cache)", off.encoder_weights, on.encoder_weights, size)
    row("VAE encoding a batch, above the step's peak", off.encode_excess, on.encode_excess, size)
    row("peak", off.peak, on.peak, size)
    lines.append(f"  {'  reached in':<50}{off.peak_phase:>18} / {on.peak_phase}")
    row(f"a card needs: peak x {1 + FRAGMENTATION:.2f} + {CONTEXT_GIB} GiB CUDA context", off.required,
        on.required, size)
    lines += ["", f"{'compute (' + flop_name + ' per step)':<52}{'ckpt off':>9}{'ckpt on':>9}"]

    def flops(n: float) -> str:
        return f"{n / flop:.2f}"

    for phase, label in (("policy forward", f"policy forward ({2 * key.batch_size} images)"),
                         ("reference forward", f"reference forward ({2 * key.batch_size} images, adapters off)"),
                         ("backward", "backward (and recompute, with checkpointing)")):
        row(label, off.flops.get(phase, 0), on.flops.get(phase, 0), flops)
    row(f"UNet step (checkpointing: +{plan.recompute:.0%})", off.unet_flops, on.unet_flops, flops)
    row("VAE encode (no cache)", off.flops.get("VAE encode", 0), on.flops.get("VAE encode", 0), flops)
    row("text encoders (no cache; 2 x parameters x tokens)", off.flops.get("text encoders", 0),
        on.flops.get("text encoders", 0), flops)
    row("total", off.total_flops, on.total_flops, flops)
    if gen:
        lines += ["", *_generation_lines(plan, unit, unit_name)]

    lines += ["", f"per GPU: does the step fit, and the floor time per pair at 100 % / 50 % of the card's dense bf16 "
                  f"peak; the run is {plan.pairs:,} pairs" + ("; online: its generation's hours and the total at "
                                                              "the same rates" if gen else ""),
              f"  {'GPU':<11}{'card':<23}{'GiB':>4}  {'ckpt off':<9}{'ckpt on':<8}{'runs':<9}"
              + (f"{'ms per pair':>16}{'training h':>19}{'generation h':>18}{'total h':>15}" if gen else
                 f"{'ms per pair':>16}{'hours for the run':>22}")]
    for gpu in gpus:
        chosen = plan.choice(gpu.memory_gib)
        fits = [("yes" if est.required <= gpu.memory_gib * GiB else "no") for est in (off, on, chosen)]
        pick = ("ckpt on" if chosen is on else "ckpt off") if fits[2] == "yes" else "no fit"
        times = [seconds_per_pair(chosen.total_flops, key.batch_size, gpu, u) for u in (1.0, 0.5)]
        train_h = [t * plan.pairs / 3600 for t in times]
        text = (f"  {gpu.name:<11}{gpu.card:<23}{gpu.memory_gib:>4g}  {fits[0]:<9}{fits[1]:<8}{pick:<9}"
                f"{_ms(times[0]):>9} / {_ms(times[1]):<5}")
        if gen:
            gen_h = [generation_hours(gen, gpu, u) for u in (1.0, 0.5)]
            text += (_pair(*train_h, 11) + _pair(*gen_h, 10)
                     + _pair(train_h[0] + gen_h[0], train_h[1] + gen_h[1], 10)).rstrip()
        else:
            text += f"{train_h[0]:>12,.1f} / {train_h[1]:,.1f}"
        lines.append(text)
    if gen:
        fit = [gpu.name for gpu in gpus if plan.online_required(plan.choice(gpu.memory_gib)) <= gpu.memory_gib * GiB]
        lines.append(f"  the whole online run (the step or a round's generating and scoring, whichever peaks higher) "
                     f"fits: {', '.join(fit) or 'none of these'}")
    misfits = [gpu for gpu in gpus if plan.choice(gpu.memory_gib).required > gpu.memory_gib * GiB]
    if misfits:
        smallest = min(misfits, key=lambda gpu: gpu.memory_gib)
        lines += ["", f"does not fit {', '.join(g.name for g in misfits)} as the recipe stands; change, cheapest "
                      "first (each on top of the ones above):"]
        for change in plan.ladder(smallest.memory_gib):
            est = change.estimate
            fit = [g.name for g in misfits if est.required <= g.memory_gib * GiB]
            lines.append(f"  {change.what:<44} card needs {size(est.required):>6} {unit_name}, "
                         f"{est.total_flops / key.batch_size / flop:.1f} {flop_name}/pair; cost: {change.cost}"
                         + (f"; fits {', '.join(fit)}" if fit else ""))
        fix = plan.fix(smallest.memory_gib)
        lines.append(f"to fit {smallest.name}: " + (" ".join(f"--set {c.recipe}" for c in fix) + f" (card needs "
                     f"{size(fix[-1].estimate.required)} {unit_name})" if fix else "no change above is enough"))
    lines += ["", f"planned in {plan.seconds:.0f} s: lora_dpo.step.dpo_step and backward traced on fake tensors; "
                  f"allowance not calibrated on a GPU yet (README, `plan --measure`)"]
    if recipe.train.compile:  # fake tensors cannot run compiled kernels: the trace is of the eager step
        lines.append("[train].compile = true: traced eager; the compiled step's peak measured 0.93-1.00x the eager "
                     "one's on the tiny step on a CPU (docs/performance.md), not yet on a GPU: `plan --measure` there "
                     "measures the compiled step")
    return "\n".join(lines)


def grid(recipe: Recipe, ranks: list[int], resolutions: list[int], gpus: list[Gpu]) -> str:
    """A Markdown table, rank x resolution rows, one column per GPU: the cheapest of checkpointing off, on, on with
    cached data that fits, and its floor time per pair at 100 % of the card's peak; `no` when none fits."""
    arch = architecture(recipe.model)
    rows = ["| rank | px | card needs (GiB): ckpt off / on / on + cache | TFLOP per pair, encoding included: off / on "
            "| " + " | ".join(g.name for g in gpus) + " |", "|" + "---|" * (4 + len(gpus))]
    batch = recipe.train.batch_size
    for rank in ranks:
        for resolution in resolutions:
            variant = dataclasses.replace(recipe, lora=replace(recipe.lora, rank=rank, alpha=float(rank)),
                                          data=replace(recipe.data, resolution=resolution))
            off, on = (estimate(arch, Setting.from_recipe(variant, c)) for c in (False, True))
            cached = estimate(arch, replace(on.setting, cached=True))
            options = ((off, "off"), (on, "on"), (cached, "on + cache"))
            cells = []
            for gpu in gpus:
                fit = [(est, name) for est, name in options if est.required <= gpu.memory_gib * GiB]
                ms = seconds_per_pair(fit[0][0].total_flops, batch, gpu) * 1e3 if fit else 0
                cells.append(f"{fit[0][1]}: {ms:,.0f} ms" if fit else "no")
            rows.append(f"| {rank} | {resolution} | {' / '.join(f'{e.required / GiB:.1f}' for e, _ in options)} | "
                        f"{off.total_flops / batch / 1e12:.1f} / {on.total_flops / batch / 1e12:.1f} | "
                        + " | ".join(cells) + " |")
    return "\n".join(rows)


def floor_table(recipe: Recipe, resolutions: list[int], gpus: list[Gpu]) -> str:
    """A Markdown table, resolution x checkpointing off / on x NF4 base off / on (the recipe's rank, data cached or
    not as it says): the plan's peak, the floor, their ratio, what a card needs, and per GPU whether it fits with
    its floor time per pair at 100 % of the card's peak. The floor is measured as docs/performance.md measured
    SDXL's: the bare step's live tensors, bf16 everywhere (bf16 adapters, CPU autocast's bf16 norms), no optimizer
    state or carried gradients, traced the same way; with NF4 less the same 4-bit saving the plan takes off."""
    arch = architecture(recipe.model)
    found = []
    for resolution in resolutions:
        variant = dataclasses.replace(recipe, data=replace(recipe.data, resolution=resolution))
        for checkpointing in (False, True):
            setting = Setting.from_recipe(variant, checkpointing)
            bare = measure_step(arch, replace(setting.key, lora_fp32=False, cuda_autocast=False)).peak
            for nf4 in (False, True):
                est = estimate(arch, replace(setting, base_4bit=nf4))
                found.append((resolution, checkpointing, nf4, est, bare - est.quantized_saving))
    unit, name = (GiB, "GiB") if max(row[3].peak for row in found) >= GiB else (2**20, "MiB")
    rows = [f"| px | ckpt | NF4 | peak ({name}) | floor ({name}) | peak / floor | card needs (GiB) | TFLOP per pair | "
            + " | ".join(g.name for g in gpus) + " |", "|" + "---|" * (8 + len(gpus))]
    for resolution, checkpointing, nf4, est, floor in found:
        batch = est.setting.key.batch_size
        cells = [f"yes: {seconds_per_pair(est.total_flops, batch, gpu) * 1e3:,.0f} ms"
                 if est.required <= gpu.memory_gib * GiB else "no" for gpu in gpus]
        rows.append(f"| {resolution} | {'on' if checkpointing else 'off'} | {'yes' if nf4 else 'no'} | "
                    f"{est.peak / unit:.2f} | {floor / unit:.2f} | {est.peak / floor:.2f}x | "
                    f"{est.required / GiB:.1f} | {est.total_flops / batch / 1e12:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
