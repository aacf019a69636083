"""`lora-dpo bench`: seconds per step, pairs per second and peak memory of the trainer's own DPO step.

What is timed is `step.train_step` (the DPO step, backward, clipping, the optimizer step) on the UNet that
`step.build_policy` prepares, fed an `EncodedBatch` of random latents and embeddings of the architecture's
shapes: random weights and random data take the same time and memory as real ones, so SDXL is measured
from its shipped config with no download. Next to it, in the same run, on the same UNet and the same
shapes: a bare baseline written by hand, the policy's forward and backward on the pair plus the reference
forward and nothing else. step / bare is the framework's overhead; its ideal is 1.0.

Step and bare iterations alternate and each is timed alone (synchronised on CUDA); the medians are reported,
which keeps the ratio honest on a machine shared with other work. The optimizer steps on every micro-batch
(no accumulation): the upper bound on time, and the optimizer state is in the memory peak.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import platform
import resource
import statistics
import time
import tomllib
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from lora_dpo import models
from lora_dpo.data import PreferenceBatch
from lora_dpo.plan import resolve_checkpointing
from lora_dpo.recipe import Recipe, RecipeError, from_dict
from lora_dpo.step import (
    EncodedBatch,
    build_policy,
    encode_batch,
    make_accelerator,
    make_optimizer,
    random_batch,
    resolve_precision,
    train_step,
    unwrap,
)

log = logging.getLogger(__name__)

ARCHS = ("tiny", *(family.name for family in models.FAMILIES), "recipe")  # --arch: a family's name, random weights
NATIVE_RESOLUTIONS = {"tiny": (64,)} | {family.name: family.bench_resolutions for family in models.FAMILIES}
KNOBS: dict[str, tuple[Any, ...]] = {  # bench-only settings and their choices (the first is the default)
    "encode": ("cache", "live"),
    "sdpa": ("auto", "math", "flash", "efficient", "cudnn"),
    "fullgraph": (False, True),  # the whole UNet compiled, not [train].compile's blocks: measured here, no recipe value
}
ALIASES = {"checkpointing": "train.gradient_checkpointing", "optimizer": "train.optimizer", "rank": "lora.rank",
           "quantize": "model.quantize", "batch_size": "train.batch_size", "compile": "train.compile"}
GIB = 2**30


@dataclass(frozen=True)
class Case:
    """One setting to measure: the recipe the trainer would run, plus the bench-only knobs. `encode`: `cache`
    feeds ready latents and embeddings (VAE and text encoders never on the device), `live` encodes random
    images and prompts every step with them on the device; `sdpa` picks the attention kernel (`auto`: torch
    chooses); `fullgraph` compiles the whole UNet; `max_memory_gb` caps CUDA memory as a smaller card would."""

    label: str
    recipe: Recipe
    resolution: int
    encode: str = "cache"
    sdpa: str = "auto"
    fullgraph: bool = False
    max_memory_gb: float | None = None


@dataclass
class Result:
    case: str
    resolution: int
    status: str  # "ok" or "out of memory"
    seconds_per_step: float | None = None
    pairs_per_second: float | None = None
    bare_seconds: float | None = None
    overhead: float | None = None
    peak_allocated_gib: float | None = None  # CUDA only: the CPU has no allocator statistics
    peak_reserved_gib: float | None = None
    trainable_params: int | None = None
    loss: float | None = None
    optimizer: str | None = None  # the class that stepped: shows it if the recipe's optimizer was swapped
    first_step_seconds: float | None = None  # the first train step, where [train].compile pays its compile
    graphs: int | None = None  # graphs torch.compile made in the first train step (0: eager)
    recompiles: int | None = None  # graphs it made after the first train step (the bare pass's too): must be 0


# --------------------------------------------------------------------------------------------------
# Cases from the command line


def _value(text: str) -> Any:
    """A command-line value read as TOML (`true`, `64`, `1e-5`), else as a plain string."""
    try:
        return tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_compare(specs: list[str]) -> list[tuple[str, list[Any]]]:
    """`KEY=V1,V2` -> (key, [v1, v2]). KEY is a recipe key (`train.gradient_checkpointing`), a short name
    (`checkpointing`, `optimizer`, `rank`, `quantize`, `batch_size`, `compile`) or a bench knob (`encode`, `sdpa`,
    `fullgraph`, `max_memory_gb`)."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = ALIASES.get(key.strip(), key.strip())
        if not sep or not values.strip():
            raise RecipeError(f"--compare {spec!r}: expected KEY=V1,V2, e.g. checkpointing=false,true")
        if key == "train.mixed_precision":
            raise RecipeError("--compare train.mixed_precision: one precision per run; run the bench once per "
                              "precision with --set train.mixed_precision=...")
        if "." not in key and key not in (*KNOBS, "max_memory_gb"):
            raise RecipeError(f"--compare {spec!r}: {key!r} is neither a recipe key (section.key) nor one of "
                              f"{', '.join([*ALIASES, *KNOBS, 'max_memory_gb'])}")
        axes.append((key, [_value(v) for v in values.split(",")]))
    return axes


def _with(recipe: Recipe, key: str, value: Any) -> Recipe:
    """The recipe with one key changed, validated like a recipe file."""
    raw = recipe.to_dict()
    section, name = key.split(".", 1)
    raw.setdefault(section, {})[name] = value
    return from_dict(raw, "--compare")


def make_cases(recipe: Recipe, resolutions: list[int], compare: list[tuple[str, list[Any]]],
               max_memory_gb: float | None = None) -> list[Case]:
    """The baseline at each resolution, then each compared value with everything else as in the baseline.
    Every value is checked here, before any model is built."""
    variants: list[tuple[str, dict[str, Any]]] = [("baseline", {})]
    for key, values in compare:
        for value in values:
            if "." in key:
                section, name = key.split(".", 1)
                if value == getattr(getattr(recipe, section, None), name, None):
                    continue  # the baseline already runs it
                variants.append((f"{key}={_show(value)}", {"recipe": _with(recipe, key, value)}))
            elif key == "max_memory_gb":
                if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                    raise RecipeError(f"--compare max_memory_gb={value!r}: must be a positive number of GiB")
                variants.append((f"{key}={_show(value)}", {key: float(value)}))
            else:
                if not any(type(value) is type(v) and value == v for v in KNOBS[key]):  # 1 is not True
                    raise RecipeError(f"--compare {key}={_show(value)}: choose from "
                                      f"{', '.join(_show(v) for v in KNOBS[key])}")
                if key == "fullgraph" and value and recipe.train.compile:
                    raise RecipeError("--compare fullgraph=true compiles the whole UNet instead of [train].compile's "
                                      "blocks: set train.compile=false")
                if value != KNOBS[key][0]:
                    variants.append((f"{key}={_show(value)}", {key: value}))
    return [Case(label, **{"recipe": recipe, "max_memory_gb": max_memory_gb, **changes}, resolution=resolution)
            for resolution in resolutions for label, changes in variants]


def default_resolutions(arch: str, recipe: Recipe) -> list[int]:
    return [recipe.data.resolution] if arch == "recipe" else list(NATIVE_RESOLUTIONS[arch])


def default_arch(recipe_given: bool) -> str:
    """--arch when none is given: the recipe's model with --recipe, else the default family on a GPU, the tiny
    base on the CPU."""
    return "recipe" if recipe_given else models.DEFAULT_FAMILY.name if torch.cuda.is_available() else "tiny"


# --------------------------------------------------------------------------------------------------
# Models and batches of the right shapes


def _random_encoders(family: models.Family, weight_dtype: torch.dtype, vae_dtype: torch.dtype) -> dict[str, Any]:
    """VAE and text encoders of a family's shipped architecture with random weights, for `encode = live`. Prompts
    are tokenised with the tiny base's tokenizer: tokenising costs the same, the ids are valid for any CLIP."""
    import diffusers
    import transformers

    encoders = [getattr(transformers, part.encoder_class)(
        transformers.CLIPTextConfig(**family.shipped_config(part.encoder))).to(weight_dtype)
        for part in family.text_parts]
    vae = getattr(diffusers, family.vae_class).from_config(family.shipped_config("vae")).to(vae_dtype)
    tokenizer = models.tiny_tokenizer()
    return {"vae": vae, "text_encoders": tuple(encoders), "tokenizers": (tokenizer,) * len(encoders)}


def build_base(arch: str, case: Case, weight_dtype: torch.dtype, device: torch.device) -> models.BaseModel:
    """The base to measure: a family's shipped architecture or the tiny base with random weights, or (`recipe`)
    the recipe's own model. VAE and text encoders only for `encode = live`."""
    live = case.encode == "live"
    vae_dtype = models.DTYPES[case.recipe.model.vae_dtype]
    if arch == "recipe":
        base = models.load_base(case.recipe.model, with_encoders=live, weight_dtype=weight_dtype,
                                vae_dtype=vae_dtype)
    elif arch == "tiny":
        family = models.TINY_BASES["tiny"]
        pipe = models.build_tiny_pipeline(seed=0, arch=family)
        base = models.BaseModel(source="tiny (random weights)", unet=pipe.unet.requires_grad_(False),
                                noise_scheduler=family.training_scheduler(pipe.scheduler.config, {}),
                                family=family)
        if weight_dtype != torch.float32:
            base.unet.to(weight_dtype)
        if live:
            base.vae = pipe.vae.to(vae_dtype)
            base.text_encoders = tuple(getattr(pipe, part.encoder).to(weight_dtype) for part in family.text_parts)
            base.tokenizers = tuple(getattr(pipe, part.tokenizer) for part in family.text_parts)
    else:
        family = models.family_named(arch)
        torch.manual_seed(0)
        # straight onto the device, in the weights' dtype (quantised layer by layer later, if asked)
        unet = models.unet_from_config(family.shipped_config(family.denoiser_folder), weight_dtype,
                                       "cpu" if case.recipe.model.quantize != "none" else device)
        encoders = _random_encoders(family, weight_dtype, vae_dtype) if live else {}
        base = models.BaseModel(source=f"{arch} (random weights)", unet=unet,
                                noise_scheduler=family.training_scheduler(family.shipped_config("scheduler"), {}),
                                family=family, **encoders)
    for module in (base.vae, *base.text_encoders):
        if module is not None:
            module.requires_grad_(False).eval().to(device)
    return base


def random_pixels(pairs: int, resolution: int, generator: torch.Generator) -> PreferenceBatch:
    """A batch as the data loader hands it (pixels in [-1, 1] on the host), for `encode = live`."""
    pixels = [torch.rand((pairs, 3, resolution, resolution), generator=generator) * 2 - 1 for _ in range(2)]
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * pairs, dtype=torch.float32)
    return PreferenceBatch(["a red circle on a blue square"] * pairs, *pixels, time_ids, time_ids, torch.ones(pairs))


# --------------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Any, *args: Any) -> tuple[float, Any]:
    _sync(device)
    started = time.perf_counter()
    out = fn(*args)
    _sync(device)
    return time.perf_counter() - started, out


BareInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict | None]  # noisy, timesteps, embeddings, added


def bare_step(unet: Any, inputs: tuple[BareInputs, BareInputs]) -> None:
    """The floor the step is measured against: policy forward and backward on the pair (2B images), the
    reference forward with adapters off in inference mode. No noise sampling, loss, metrics or optimizer."""
    (noisy, timesteps, embeds, added), reference = inputs
    prediction = unet(noisy, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    prediction.float().square().mean().backward()
    noisy, timesteps, embeds, added = reference
    with models.adapters_disabled(unwrap(unet)), torch.inference_mode():
        unet(noisy, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added)


def _bare_inputs(batch: EncodedBatch, dtype: torch.dtype) -> tuple[BareInputs, BareInputs]:
    """The policy's inputs, and the same made in inference mode for the reference, as the trainer's are (`dtype`: the
    UNet's weights', to which `step._errors` casts latents and embeddings): a compiled UNet or block guards on such
    differences, and would compile graphs of the bare pass's own."""
    noisy = torch.cat([batch.latents_w, batch.latents_l]).to(dtype)  # (2B, C, h, w): values do not change the time
    timesteps = torch.full((noisy.shape[0],), 500, device=noisy.device)
    added = None
    if batch.pooled is not None:
        added = {"text_embeds": batch.pooled.repeat(2, 1).to(dtype),
                 "time_ids": torch.cat([batch.time_ids_w, batch.time_ids_l])}
    policy = (noisy, timesteps, batch.prompt_embeds.repeat(2, 1, 1).to(dtype), added)
    with torch.inference_mode():
        reference = torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, policy)
    return policy, reference


def _sdpa(name: str) -> AbstractContextManager[Any]:
    if name == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    return sdpa_kernel(backends[name])


def _set_memory_cap(device: torch.device, gib: float | None) -> None:
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    if gib is not None and gib * GIB > total:
        log.warning("--max-memory-gb %g is more than this card's %.1f GiB: no cap", gib, total / GIB)
    torch.cuda.set_per_process_memory_fraction(1.0 if gib is None else min(1.0, gib * GIB / total), device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(arch: str, case: Case, accelerator: Any, steps: int, warmup: int) -> Result:
    """Build the case's model as training does, then alternate timed train steps and bare steps."""
    device, recipe = accelerator.device, case.recipe
    weight_dtype = models.DTYPES[accelerator.mixed_precision]
    _set_memory_cap(device, case.max_memory_gb)
    generator = torch.Generator().manual_seed(recipe.train.seed)
    base = None
    try:
        base = build_base(arch, case, weight_dtype, device)
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        checkpointing, _ = resolve_checkpointing(recipe, free)
        build_policy(base.unet, recipe.lora, recipe.train.seed, precision=accelerator.mixed_precision,
                     quantize=recipe.model.quantize, device=device, checkpointing=checkpointing,
                     compile=recipe.train.compile)
        optimizer = make_optimizer(recipe.train, models.lora_parameters(base.unet), device)
        optimizer_name = type(optimizer).__name__
        unet, optimizer = accelerator.prepare(base.unet, optimizer)
        params = models.lora_parameters(unwrap(unet))
        if case.fullgraph:  # in place, inside accelerate's wrapping; graph breaks allowed (diffusers has a few)
            torch.compiler.reset()
            unwrap(unet).compile()
        unet.train()
        pairs = recipe.train.batch_size
        cached = random_batch(unwrap(unet).config, pairs, case.resolution, device, weight_dtype, generator)
        if case.encode == "live":
            pixels = random_pixels(pairs, case.resolution, generator)
            cached = encode_batch(base, pixels, device)  # for the bare baseline: the UNet's inputs, once
        inputs = _bare_inputs(cached, next(unwrap(unet).parameters()).dtype)
        noise = torch.Generator(device).manual_seed(recipe.train.seed)
        _release(device)  # the peak counts from here: weights, adapters, optimizer state, activations
        step_times, bare_times, out, before = [], [], None, models.compiled_graphs()
        with _sdpa(case.sdpa):
            for index in range(warmup + steps):
                batch = cached
                if case.encode == "live":
                    encode_time, batch = _timed(device, encode_batch, base, pixels, device)
                seconds, step = _timed(device, train_step, accelerator, unet, base, batch, recipe.objective,
                                       recipe.train.max_grad_norm, noise, optimizer, params)
                out = step.output
                if case.encode == "live":
                    seconds += encode_time
                if index == 0:  # [train].compile: the compile is paid here, and every graph made
                    first, graphs = seconds, models.compiled_graphs() - before
                bare, _ = _timed(device, bare_step, unet, inputs)
                optimizer.zero_grad(set_to_none=True)
                if index >= warmup:
                    step_times.append(seconds)
                    bare_times.append(bare)
        step_s, bare_s = statistics.median(step_times), statistics.median(bare_times)
        result = Result(case.label, case.resolution, "ok", step_s, pairs / step_s, bare_s, step_s / bare_s,
                        trainable_params=sum(p.numel() for p in params), loss=float(out.metrics["loss"]),
                        optimizer=optimizer_name, first_step_seconds=first, graphs=graphs,
                        recompiles=models.compiled_graphs() - before - graphs)
        if device.type == "cuda":
            result.peak_allocated_gib = torch.cuda.max_memory_allocated(device) / GIB
            result.peak_reserved_gib = torch.cuda.max_memory_reserved(device) / GIB
        return result
    except torch.OutOfMemoryError:
        return Result(case.label, case.resolution, "out of memory")
    finally:
        accelerator.free_memory()
        del base
        _release(device)


def machine(device: torch.device) -> dict[str, Any]:
    """Where the numbers were measured."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        memory = torch.cuda.get_device_properties(device).total_memory / GIB
    else:
        name, memory = platform.processor() or platform.machine(), None
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as handle:
                name = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), name)
    return {"device": device.type, "name": name, "memory_gib": memory, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "platform": platform.platform()}


def run_bench(arch: str, cases: list[Case], steps: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Measure every case in one process; returns {"settings", "machine", "results"}."""
    if arch not in ARCHS:
        raise RecipeError(f"--arch {arch!r}: choose from {', '.join(ARCHS)}")
    if steps < 1 or warmup < 0:
        raise RecipeError(f"--steps {steps} / --warmup {warmup}: need at least one timed step")
    family = models.family_named(arch) if arch not in ("recipe", "tiny") else None
    if family and any(c.encode == "live" for c in cases) and any(
            not part.encoder_class.startswith("CLIP") for part in family.text_parts):
        raise RecipeError(f"--compare encode=live on {family.label}: its text encoders are not CLIP (T5, Qwen), "
                          "which this benchmark does not build with random weights; measure encode=cache, or a "
                          "recipe's own base (--arch recipe)")
    recipe = cases[0].recipe
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    accelerator = make_accelerator(resolve_precision(recipe.train))
    if accelerator.device.type == "cpu" and any(case.max_memory_gb is not None for case in cases):
        log.warning("--max-memory-gb caps CUDA memory; it has no effect on the CPU")
    results = [measure(arch, case, accelerator, steps, warmup) for case in cases]
    model = recipe.model.base if arch == "recipe" else f"{arch} (random weights)"
    settings = {"arch": arch, "model": model, "precision": accelerator.mixed_precision, "steps": steps,
                "warmup": warmup, "pairs_per_micro_batch": recipe.train.batch_size,
                "max_memory_gb": sorted({c.max_memory_gb for c in cases if c.max_memory_gb is not None})}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB
    return {"settings": settings, "machine": {**machine(accelerator.device), "process_peak_rss_gib": round(rss, 2)},
            "results": [dataclasses.asdict(r) for r in results]}


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table, one row per case."""
    s, m = report["settings"], report["machine"]
    where = f"{m['name']} ({m['device']}" + (f", {m['memory_gib']:.0f} GiB)" if m["memory_gib"] else
                                             f", {m['torch_threads']} torch threads)")
    caps = ", ".join(f"{g:g}" for g in s["max_memory_gb"])
    lines = [f"lora-dpo bench: {s['model']} on {where}; precision {s['precision']}; "
             f"{s['pairs_per_micro_batch']} pair(s) per micro-batch; {s['warmup']} warm-up + {s['steps']} timed "
             f"steps (medians)" + (f"; CUDA memory capped at {caps} GiB" if caps else "")]
    header = ("case", "res", "s/step", "pairs/s", "peak alloc GiB", "peak reserved GiB", "bare s", "overhead",
              "1st step s", "graphs", "recompiles")
    rows = [header]
    for r in report["results"]:
        if r["status"] != "ok":
            rows.append((r["case"], str(r["resolution"]), r["status"], *[""] * (len(header) - 3)))
            continue
        gib = ("n/a", "n/a") if r["peak_allocated_gib"] is None else (
            f"{r['peak_allocated_gib']:.2f}", f"{r['peak_reserved_gib']:.2f}")
        rows.append((r["case"], str(r["resolution"]), f"{r['seconds_per_step']:.4f}", f"{r['pairs_per_second']:.2f}",
                     *gib, f"{r['bare_seconds']:.4f}", f"{r['overhead']:.3f}", f"{r['first_step_seconds']:.2f}",
                     str(r["graphs"]), str(r["recompiles"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths, strict=True))).rstrip())
    if m["device"] == "cpu":
        lines.append(f"(CPU: no allocator statistics; the process's peak resident memory was "
                     f"{m['process_peak_rss_gib']:.2f} GiB)")
    return "\n".join(lines)
