"""`lora-dpo bench --suite gpu`: the checks to run the day a CUDA GPU is at hand, in one command.

On the SDXL architecture with random weights (no download), at 1024 px, with the settings users train with
(bf16, 8-bit AdamW), it records:
  a) the DPO step with and without gradient checkpointing: measured peak allocated / reserved memory beside
     `lora-dpo plan`'s prediction for the same setting, and their ratio;
  b) for the same runs, seconds per step and the overhead against the bare passes (what `bench` measures);
  c) the 8-bit optimizer state checkpointed, loaded into a fresh optimizer: one more step from both, the same adapter;
  d) one fp16 step with loss scaling (accelerate's GradScaler): the loss is finite, the scaler's scale;
  e) one step on a 4-bit NF4 base: its peak memory beside the plan's;
  f) resume bit-exactness, [train].deterministic off and on: a step from a checkpoint against it uninterrupted;
  g) [train].compile off and on: seconds per step, the compile's cost, graphs made after the first step (none).

Every item catches its own failure (out of memory, an error) and records it, so one does not hide the others.
Without CUDA the same code runs on the tiny base at 64 px with the same recipe settings (nothing is swapped
for the CPU here); the CPU has no allocator statistics, so the measured peaks read "n/a (CPU)".
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import resource
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from lora_dpo import bench, checkpoint, models, plan
from lora_dpo.recipe import Recipe, RecipeError
from lora_dpo.seeds import dropout_seed, noise_generators
from lora_dpo.step import (
    build_policy,
    dpo_step,
    make_accelerator,
    make_optimizer,
    random_batch,
    resolve_precision,
    train_step,
    unwrap,
    use_deterministic_kernels,
)

log = logging.getLogger(__name__)

ARCHS = (*(f.name for f in models.FAMILIES), "tiny")  # random weights only: no download, no recipe model
GiB = 2**30
CPU = "n/a (CPU)"
OPTIMIZER_CLASSES = {"adamw8bit": "AdamW8bit", "adamw": "AdamW"}  # recipe value -> the class that should step


@dataclass
class Check:
    """One item's outcome. status: "ok", "pass", "fail: why", "out of memory" or "error: Type: message"."""

    item: str
    status: str
    optimizer: str | None = None  # the optimizer class that really ran (a swapped one shows here)
    precision: str | None = None
    checkpointing: bool | None = None
    seconds_per_step: float | None = None
    bare_seconds: float | None = None
    overhead: float | None = None  # step / bare passes; ideal 1.0
    peak_allocated_gib: float | None = None  # CUDA only
    peak_reserved_gib: float | None = None
    planned_allocated_gib: float | None = None  # `lora-dpo plan`: the step's live tensors at their peak
    planned_reserved_gib: float | None = None  # and that x (1 + plan.FRAGMENTATION)
    allocated_ratio: float | None = None  # measured / planned
    reserved_ratio: float | None = None
    loss: float | None = None
    loss_scale: float | None = None  # d) the GradScaler's scale after the step
    bit_identical: bool | None = None  # c, f) resumed and uninterrupted adapters equal bit for bit
    recompiles: int | None = None  # graphs torch.compile made after the first step (g: must be 0)
    seconds: float | None = None  # wall time of the whole item, building the model included
    notes: str = ""


@dataclass(frozen=True)
class Suite:
    """What every item shares: the architecture, the recipe with the suite's settings, the timing."""

    arch: str
    recipe: Recipe
    resolution: int
    steps: int
    warmup: int
    max_memory_gb: float | None = None

    def recipe_with(self, **changes: Any) -> Recipe:
        """The suite's recipe with `section__key=value` changes, validated like a recipe file."""
        recipe = self.recipe
        for name, value in changes.items():
            recipe = bench._with(recipe, name.replace("__", "."), value)
        return recipe


# --------------------------------------------------------------------------------------------------
# Helpers shared by the items


def _accelerator(recipe: Recipe) -> Any:
    """A fresh Accelerator in the recipe's precision, whatever an earlier item's was (d's is fp16), refused by name
    where this device cannot run it, as the trainer refuses it."""
    return make_accelerator(resolve_precision(recipe.train))


def _planned(recipe: Recipe, checkpointing: bool) -> plan.Estimate:
    """`lora-dpo plan`'s estimate of the setting as the bench runs it: latents and embeddings fed ready (no VAE
    or text encoders on the device), the base in NF4 when the recipe quantises it."""
    setting = plan.Setting.from_recipe(recipe, checkpointing)
    setting = dataclasses.replace(setting, cached=True, base_4bit=recipe.model.quantize == "nf4")
    return plan.estimate(plan.architecture(recipe.model), setting)


def _beside_plan(check: Check, recipe: Recipe) -> Check:
    """Add the plan's prediction and measured / planned. A failing plan is a note, not a lost measurement."""
    try:
        estimate = _planned(recipe, bool(check.checkpointing))
    except Exception as err:
        log.warning("%s: the plan failed", check.item, exc_info=True)
        check.notes = f"{check.notes}; plan failed: {type(err).__name__}: {err}".lstrip("; ")
        return check
    check.planned_allocated_gib = estimate.peak / GiB
    check.planned_reserved_gib = estimate.peak * (1 + plan.FRAGMENTATION) / GiB
    if check.peak_allocated_gib is not None:
        check.allocated_ratio = check.peak_allocated_gib / check.planned_allocated_gib
        check.reserved_ratio = check.peak_reserved_gib / check.planned_reserved_gib
    return check


def _swap_note(recipe: Recipe, ran: str | None) -> str:
    """Say so when the optimizer that stepped is not the recipe's: the check would then not test users' path."""
    asked = recipe.train.optimizer
    return "" if ran in (None, OPTIMIZER_CLASSES[asked]) else f"asked for {asked}, {ran} ran"


def _measured(suite: Suite, item: str, recipe: Recipe, steps: int, warmup: int) -> tuple[Check, Any, bench.Result]:
    """bench's measurement (train_step vs the bare passes) of one recipe: a Check, the accelerator, bench's row."""
    accelerator = _accelerator(recipe)
    case = bench.Case(item, recipe, suite.resolution, max_memory_gb=suite.max_memory_gb)
    r = bench.measure(suite.arch, case, accelerator, steps, warmup)
    status = r.status if r.status != "ok" or math.isfinite(r.loss) else "fail: the loss is not finite"
    check = Check(item, status, r.optimizer, accelerator.mixed_precision, recipe.train.gradient_checkpointing,
                  r.seconds_per_step, r.bare_seconds, r.overhead, r.peak_allocated_gib, r.peak_reserved_gib,
                  loss=r.loss, notes=_swap_note(recipe, r.optimizer), recompiles=r.recompiles)
    return check, accelerator, r


# --------------------------------------------------------------------------------------------------
# The items, one function each


def check_step(suite: Suite, item: str, checkpointing: bool) -> Check:
    """a) + b): the users' step (bf16, 8-bit AdamW) timed and measured by bench, beside the plan."""
    recipe = suite.recipe_with(train__gradient_checkpointing=checkpointing)
    check = _measured(suite, item, recipe, suite.steps, suite.warmup)[0]
    return _beside_plan(check, recipe)


def _trainable(suite: Suite, item: str, recipe: Recipe, accelerator: Any) -> tuple[Any, Any, list[Any], Any]:
    """The suite's base as the trainer's policy with gradient checkpointing (the smallest step: items c and f test
    state, not speed), prepared, its LoRA parameters and one random batch: (base, unet, parameters, batch)."""
    device, weight_dtype = accelerator.device, models.DTYPES[accelerator.mixed_precision]
    bench._set_memory_cap(device, suite.max_memory_gb)
    base = bench.build_base(suite.arch, bench.Case(item, recipe, suite.resolution), weight_dtype, device)
    build_policy(base.unet, recipe.lora, recipe.train.seed, precision=accelerator.mixed_precision,
                 quantize=recipe.model.quantize, device=device, checkpointing=True)
    unet = accelerator.prepare(base.unet)
    inner = unwrap(unet)
    batch = random_batch(inner.config, recipe.train.batch_size, suite.resolution, device, weight_dtype,
                         torch.Generator().manual_seed(recipe.train.seed))
    unet.train()
    return base, unet, models.lora_parameters(inner), batch


def _save_and_load(folder: Path, inner: Any, optimizer: Any, recipe: Recipe) -> tuple[dict[str, Any], tuple]:
    """A checkpoint at step 2 through `lora_dpo.checkpoint`, read back: (the adapter saved, what was read)."""
    from diffusers.optimization import get_scheduler
    from peft.utils import get_peft_model_state_dict

    saved = {k: v.detach().clone() for k, v in get_peft_model_state_dict(inner).items()}
    path = checkpoint.save_checkpoint(folder, 2, saved, optimizer, get_scheduler("constant", optimizer),
                                      {"pairs": 2, "history": [], "fingerprint": recipe.fingerprint()})
    return saved, (*checkpoint.load_checkpoint(path), path)


def _resume(accelerator: Any, recipe: Recipe, inner: Any, params: list[Any], loaded: tuple) -> Any:
    """What `_save_and_load` read, resumed: its adapter in the UNet, a fresh optimizer restored from its state."""
    from diffusers.optimization import get_scheduler
    from peft.utils import set_peft_model_state_dict

    lora, optimizer_state, state, path = loaded
    set_peft_model_state_dict(inner, lora)
    fresh = accelerator.prepare(make_optimizer(recipe.train, params, accelerator.device))
    checkpoint.restore_optimizer(fresh, get_scheduler("constant", fresh), optimizer_state, state, path)
    return fresh


def check_resume(suite: Suite, item: str) -> Check:
    """c): train two steps, save a checkpoint, load it into a fresh optimizer, take one more step from both.
    Both optimizers step on the same gradients, computed once: the comparison then tests the saved state, not
    whether the GPU's kernels are deterministic (some attention and convolution backward kernels are not: item f)."""
    recipe = suite.recipe_with(train__gradient_checkpointing=True)
    accelerator = _accelerator(recipe)
    base = None
    try:
        base, unet, params, batch = _trainable(suite, item, recipe, accelerator)
        optimizer = accelerator.prepare(make_optimizer(recipe.train, params, accelerator.device))
        noise = torch.Generator(accelerator.device).manual_seed(recipe.train.seed)
        for _ in range(2):  # the first step creates the state, the second updates it
            out = train_step(accelerator, unet, base, batch, recipe.objective, recipe.train.max_grad_norm, noise,
                             optimizer, params).output
        with tempfile.TemporaryDirectory() as tmp:
            saved, loaded = _save_and_load(Path(tmp), unwrap(unet), optimizer, recipe)
            # the uninterrupted run: one more step on fresh gradients
            accelerator.backward(dpo_step(unet, base, batch, recipe.objective, noise).loss)
            grads = [p.grad.detach().clone() for p in params]
            optimizer.step()
            continued = [p.detach().clone() for p in params]
            # the resumed run: the saved adapter, a fresh optimizer with the saved state, the same gradients
            fresh = _resume(accelerator, recipe, unwrap(unet), params, loaded)
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad
            fresh.step()
        lora, optimizer_state = loaded[:2]
        adapter_same = saved.keys() == lora.keys() and all(torch.equal(saved[k].cpu(), lora[k]) for k in saved)
        step_same = all(torch.equal(a, p) for a, p in zip(continued, params, strict=True))
        status = "pass" if adapter_same and step_same else "fail: " + (
            "the adapters differ after one more step" if adapter_same else "the saved adapter reads back different")
        ran = type(optimizer.optimizer).__name__
        notes = [_swap_note(recipe, ran), f"{len(optimizer_state['state'])} parameters' state saved and restored"]
        return Check(item, status, ran, accelerator.mixed_precision, True, loss=float(out.metrics["loss"]),
                     bit_identical=adapter_same and step_same, notes="; ".join(n for n in notes if n))
    finally:
        accelerator.free_memory()
        del base


def check_deterministic(suite: Suite, item: str) -> Check:
    """f): resume bit-exactness with [train].deterministic off, then on. From the seeded adapter: two steps, a
    checkpoint, a third step; then the checkpoint's adapter and optimizer state back and the third step again, with
    the trainer's draws for it. Unlike c, the gradients are computed again: only kernels that are not deterministic
    (or a checkpoint that loses state) can make the two adapters differ. cuBLAS reads its workspace setting once:
    `run_suite` sets it before the first item."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    recipe = suite.recipe_with(train__gradient_checkpointing=True)
    accelerator = _accelerator(recipe)
    train, device = recipe.train, accelerator.device
    same: dict[bool, bool] = {}
    try:
        base, unet, params, batch = _trainable(suite, item, recipe, accelerator)
        inner = unwrap(unet)
        initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(inner).items()}

        def step(optimizer: Any, micro_step: int) -> Any:  # as the trainer takes it: its dropout, its noise
            first = micro_step * train.batch_size  # one process: the micro-batch's first pair in the run's draws
            torch.manual_seed(dropout_seed(train.seed, first, train.batch_size))
            noise = noise_generators(train.seed, first, train.batch_size, device)
            return train_step(accelerator, unet, base, batch, recipe.objective, train.max_grad_norm, noise,
                              optimizer, params).output

        for on in (False, True):
            use_deterministic_kernels(on)
            set_peft_model_state_dict(inner, initial)
            optimizer = accelerator.prepare(make_optimizer(train, params, device))
            for micro_step in range(2):
                step(optimizer, micro_step)
            with tempfile.TemporaryDirectory() as tmp:
                _, loaded = _save_and_load(Path(tmp), inner, optimizer, recipe)
                step(optimizer, 2)
                continued = [p.detach().clone() for p in params]
                out = step(_resume(accelerator, recipe, inner, params, loaded), 2)
            same[on] = all(torch.equal(a, p) for a, p in zip(continued, params, strict=True))
    finally:
        use_deterministic_kernels(False)
        accelerator.free_memory()
    status = "pass" if same[True] else "fail: with [train].deterministic = true the resumed adapter differs"
    ran = type(optimizer.optimizer).__name__
    notes = [_swap_note(recipe, ran), *(f"deterministic {o}: {'bit-identical' if same[o == 'on'] else 'differs'}"
                                        for o in ("off", "on"))]
    return Check(item, status, ran, accelerator.mixed_precision, True, loss=float(out.metrics["loss"]),
                 bit_identical=same[True], notes="; ".join(n for n in notes if n))


def check_fp16(suite: Suite, item: str) -> Check:
    """d): one fp16 step; accelerate scales the loss with a GradScaler (on CUDA; it makes none on the CPU)."""
    recipe = suite.recipe_with(train__mixed_precision="fp16", train__gradient_checkpointing=True)
    check, accelerator, _ = _measured(suite, item, recipe, steps=1, warmup=0)
    if check.status == "ok" and accelerator.scaler is None:
        check.status = "fail: no GradScaler ran (accelerate makes one for fp16 only on CUDA)"
    elif check.status == "ok":
        check.loss_scale = float(accelerator.scaler.get_scale())
    return check


def check_nf4(suite: Suite, item: str) -> Check:
    """e): one step on the 4-bit NF4 base (QLoRA) with checkpointing, beside the plan's 4-bit estimate."""
    recipe = suite.recipe_with(model__quantize="nf4", train__gradient_checkpointing=True)
    return _beside_plan(_measured(suite, item, recipe, steps=1, warmup=0)[0], recipe)


def check_compile(suite: Suite, item: str) -> Check:
    """g): [train].compile off, then on, timed by bench in one process (the same machine and load): the compiled
    step's row; in its notes the eager step, the compile's cost (the first step above eager's first step) and the
    steps a run needs before compiling pays. Fails if a graph is made after the first step."""
    (_, _, off), (on, _, r) = (_measured(suite, item, suite.recipe_with(train__compile=c), suite.steps, suite.warmup)
                               for c in (False, True))
    if off.status != "ok" or on.status != "ok":
        return on if on.status != "ok" else dataclasses.replace(on, status=off.status)
    cost, saved = r.first_step_seconds - off.first_step_seconds, off.seconds_per_step - r.seconds_per_step
    pays = f"pays after {math.ceil(cost / saved)} steps" if saved > 0 else "never pays (no faster)"
    on.notes = "; ".join([*filter(None, [on.notes]), f"eager {off.seconds_per_step:.4f} s/step, overhead "
                          f"{off.overhead:.3f}; x{off.seconds_per_step / r.seconds_per_step:.2f} compiled; compile "
                          f"{cost:.1f} s, {pays}; {r.graphs} graphs"])
    on.status = f"fail: {r.recompiles} graph(s) made after the first step" if r.recompiles else on.status
    return on


# --------------------------------------------------------------------------------------------------
# The suite


ITEMS: tuple[tuple[str, Callable[[Suite, str], Check]], ...] = (
    ("a1 bf16 + 8-bit AdamW, checkpointing off", functools.partial(check_step, checkpointing=False)),
    ("a2 bf16 + 8-bit AdamW, checkpointing on", functools.partial(check_step, checkpointing=True)),
    ("c checkpoint + resume of the optimizer state", check_resume),
    ("d fp16 + loss scaling, one step", check_fp16),
    ("e NF4 base, one step", check_nf4),
    ("f resume bit-exactness, [train].deterministic off and on", check_deterministic),
    ("g [train].compile off and on", check_compile),
)


def _run(suite: Suite, item: str, check: Callable[[Suite, str], Check], device: torch.device) -> Check:
    """Run one item; out of memory or any error becomes its status. Frees the device after it."""
    started = time.perf_counter()
    try:
        result = check(suite, item)
    except torch.OutOfMemoryError:
        result = Check(item, "out of memory")
    except Exception as err:  # one item's failure must not hide the others
        log.warning("%s failed", item, exc_info=True)
        message = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        result = Check(item, f"error: {type(err).__name__}: {message}".rstrip(": "))
    result.seconds = time.perf_counter() - started
    bench._release(device)
    return result


def suite_recipe(recipe: Recipe, arch: str, resolution: int) -> Recipe:
    """The user's recipe (rank, batch, threads...) with what the suite checks: the architecture's base (for the
    plan), the resolution, bf16 and 8-bit AdamW, asked for through the recipe on every device, eager (g compiles)."""
    base = "tiny" if arch == "tiny" else models.family_named(arch).hub_ids[0]
    suite = Suite(arch, recipe, resolution, 1, 0)
    return suite.recipe_with(model__base=base, model__quantize="none", data__resolution=resolution,
                             train__mixed_precision="bf16", train__optimizer="adamw8bit", train__compile=False)


def run_suite(arch: str, recipe: Recipe, resolution: int | None = None, steps: int = 5, warmup: int = 2,
              max_memory_gb: float | None = None) -> dict[str, Any]:
    """Every item in turn; returns {"suite", "settings", "machine", "items", "seconds"}."""
    if arch not in ARCHS:
        raise RecipeError(f"--suite gpu --arch {arch!r}: choose from {', '.join(ARCHS)} (random weights)")
    if steps < 1 or warmup < 0:
        raise RecipeError(f"--steps {steps} / --warmup {warmup}: need at least one timed step")
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    resolution = resolution or bench.NATIVE_RESOLUTIONS[arch][0]
    suite = Suite(arch, suite_recipe(recipe, arch, resolution), resolution, steps, warmup, max_memory_gb)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # cuBLAS reads its workspace setting once, at its first use: set before any item, for item f's deterministic half
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    started = time.perf_counter()
    checks = [_run(suite, item, check, device) for item, check in ITEMS]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # Linux reports KiB
    lora, family = suite.recipe.lora, models.TINY_BASES["tiny"] if arch == "tiny" else models.family_named(arch)
    settings = {"arch": arch, "model": f"{arch} (random weights)", "resolution": resolution,
                "pairs_per_micro_batch": suite.recipe.train.batch_size, "lora_rank": lora.rank,
                "lora_targets": list(models.target_modules(lora, family)), "steps": steps, "warmup": warmup,
                "max_memory_gb": max_memory_gb, "plan_fragmentation": plan.FRAGMENTATION}
    versions = {name: metadata.version(name) for name in ("diffusers", "peft", "accelerate", "bitsandbytes")}
    return {"suite": "gpu", "settings": settings,
            "machine": {**bench.machine(device), **versions, "process_peak_rss_gib": round(rss, 2)},
            "items": [dataclasses.asdict(c) for c in checks], "seconds": round(time.perf_counter() - started, 1)}


def run_command(suite: str, recipe: Recipe, arch: str | None, resolution: list[int] | None, steps: int, warmup: int,
                max_memory_gb: float | None, compare: list[str] | None, out: Path) -> str:
    """`lora-dpo bench --suite NAME`: check the options, run the suite, write its JSON to `out`; the text to print."""
    if suite != "gpu":
        raise RecipeError(f"--suite {suite!r}: the one suite is `gpu`")
    if compare:
        raise RecipeError("--suite gpu runs its own settings; --compare goes with the plain bench")
    chosen = arch or (models.DEFAULT_FAMILY.name if torch.cuda.is_available() else "tiny")
    report = run_suite(chosen, recipe, resolution[0] if resolution else None, steps, warmup, max_memory_gb)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return f"{format_suite(report)}\nwrote {out}"


def _cell(value: Any, spec: str = ".3g") -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "" if value is None else format(value, spec) if isinstance(value, float) else str(value).replace("|", "\\|")


def _row(c: dict[str, Any], cpu: bool) -> str:
    """One item as a Markdown table row; the measured peaks of a step read n/a on the CPU."""
    def peak(key: str) -> str:
        return CPU if cpu and c["seconds_per_step"] is not None else _cell(c[key], ".3f" if "ratio" in key else ".3g")

    notes = [c["notes"]] if c["notes"] else []
    notes += [f"loss {c['loss']:.4g}"] if c["loss"] is not None else []
    notes += [f"loss scale {c['loss_scale']:g}"] if c["loss_scale"] is not None else []
    notes += [f"adapter bit-identical: {_cell(c['bit_identical'])}"] if c["bit_identical"] is not None else []
    notes += [f"{c['seconds']:.1f} s"]
    row = [c["item"], c["status"], c["optimizer"], c["precision"], _cell(c["seconds_per_step"], ".4f"),
           _cell(c["overhead"], ".3f"), peak("peak_allocated_gib"), _cell(c["planned_allocated_gib"]),
           peak("allocated_ratio"), peak("peak_reserved_gib"), _cell(c["planned_reserved_gib"]),
           peak("reserved_ratio"), "; ".join(notes)]
    return "| " + " | ".join(_cell(v) for v in row) + " |"


def format_suite(report: dict[str, Any]) -> str:
    """A Markdown table, one row per item, under a line saying where and what was run."""
    s, m = report["settings"], report["machine"]
    cpu = m["device"] == "cpu"
    where = f"{m['name']} ({m['device']}" + (f", {m['memory_gib']:.0f} GiB)" if m["memory_gib"] else
                                             f", {m['torch_threads']} torch threads)")
    lines = [f"lora-dpo bench --suite gpu: {s['model']} at {s['resolution']} px, {s['pairs_per_micro_batch']} "
             f"pair(s), LoRA rank {s['lora_rank']}, on {where}; {s['warmup']} warm-up + {s['steps']} timed steps "
             f"(medians) for a1/a2 and g, one step for d/e; {report['seconds']:.0f} s", ""]
    header = ["item", "status", "optimizer", "precision", "s/step", "overhead", "peak alloc GiB", "plan alloc GiB",
              "alloc meas/plan", "peak reserved GiB", "plan reserved GiB", "reserved meas/plan", "notes"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [_row(c, cpu) for c in report["items"]]
    ok = sum(c["status"] in ("ok", "pass") for c in report["items"])
    lines += ["", f"{ok} of {len(report['items'])} items ok"
              + ("; the CPU has no allocator statistics: run it on a CUDA GPU for the memory figures" if cpu else "")]
    return "\n".join(lines)

