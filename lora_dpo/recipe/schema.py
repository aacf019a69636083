"""The recipe's schema: one typed, frozen tree of settings, the single source of truth. Every key, its type, default
and help text lives in the dataclasses below; the CLI's help and the README's recipe table are generated from them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lora_dpo.recipe.fields import field_
from lora_dpo.recipe.online import OnlineRecipe

Precision = Literal["no", "fp16", "bf16"]
ObjectiveKind = Literal["dpo", "ipo", "hinge", "mapo", "sft"]
# The experiment trackers accelerate speaks (`log_with`; its `LoggerType`, checked by tests/test_trackers.py) -> the
# package `pip install` brings. `all`, as in accelerate, is every one of them that is installed.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "comet_ml": "comet_ml", "mlflow": "mlflow",
            "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}
ALL_TRACKERS = "all"
ColumnMap = tuple[tuple[str, str], ...]  # a TOML table {name = "column in the data"}, kept ordered and frozen

# The column names lora-dpo reads, in the Pick-a-Pic layout (parquet, hub) and the path layout (JSONL, CSV)
COLUMN_NAMES = ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "has_label", "are_different",
                "prompt", "chosen", "rejected", "label")


# What `lora-dpo train --resume` allows a key to do between the checkpoint's recipe and the one resuming it:
# "same": it shapes the run (base, data, objective, adapter, optimizer), so a change is refused; "free": it does
# not (run length, logging, intervals, threads, workers, checkpointing); "layout": it may change if the pairs per
# optimizer step (batch x accumulation x processes) stay the same; "warn": it changes the run, but it is what the
# NaN and out-of-memory advice says to fix before going on (learning rate, beta, clipping, precisions, the VAE,
# NF4, the latent cache): allowed, and said at start. [sample] and [output] are free as a whole.
RESUME_RULES = ("same", "free", "layout", "warn")
FREE_SECTIONS = ("sample", "output")


_f = field_  # short: every key below is one


@dataclass(frozen=True)
class ModelRecipe:
    base: str = _f(
        "stabilityai/stable-diffusion-xl-base-1.0",
        "Hub id or local diffusers folder of the base pipeline (SDXL, SD 1.5, SD3.5, FLUX.1 or FLUX.2 klein), a "
        "single-file "
        "checkpoint "
        "(`model.safetensors`, what A1111/ComfyUI load, or SAI's / BFL's SD3.5 and FLUX.1 files; configs from a "
        "diffusers config folder beside it, else the shipped ones of the family its keys show), or a built-in tiny "
        "base, built "
        "and cached on first use (offline demo and tests): `tiny` (SDXL architecture), `tiny-sd15` (SD 1.5 "
        "architecture: one text encoder, no micro-conditioning), `tiny-sd3`, `tiny-flux` or `tiny-flux2` (random "
        "weights).",
    )
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of the base.")
    variant: str | None = _f(None, "Weight variant to download, e.g. `fp16` (halves the download).")
    vae: str | None = _f(
        None,
        "Hub id or folder of a replacement VAE, e.g. `madebyollin/sdxl-vae-fp16-fix` (SDXL's own VAE "
        "overflows in fp16).",
        resume="warn")
    vae_dtype: Precision = _f("no", "Precision of the frozen VAE: `no` keeps it in fp32 (safe for SDXL's VAE).",
                              resume="warn")
    timesteps: tuple[int, ...] = _f(
        (),
        "Training timesteps, drawn uniformly (the same one for both images of a pair); empty: all of "
        "0..num_train_timesteps-1, as the paper. A few-step distilled base learns only its own steps: SDXL-Turbo "
        "`[249, 499, 749, 999]` (what diffusers' and the official DPO scripts draw for turbo); see docs/turbo.md.",
        min=0,
    )
    rescale_betas_zero_snr: bool = _f(
        False,
        "Rescale the training noise schedule to zero terminal SNR (Lin et al. 2024): the last timestep is pure "
        "noise. The DPO reference scripts train SDXL-Turbo so (diffusers' `--is_turbo`, the official code for a "
        "turbo base: `enforce_zero_terminal_snr`); also for bases trained that way. On by itself for a base whose "
        "scheduler config sets it, or a single file with ComfyUI's `v_pred` and `ztsnr` keys.",
    )
    quantize: Literal["none", "nf4"] = _f(
        "none",
        "`nf4`: store the frozen UNet's linear layers in 4-bit NormalFloat (bitsandbytes, QLoRA-style) and train "
        "the LoRA on top: SDXL's UNet weights shrink from 4.8 to 1.7 GiB (SD 1.5's, mostly convolutions, from 1.6 "
        "to 1.2); the adapter still loads on the full-precision base.",
        resume="warn")
    # Flow-matching bases only (SD3, FLUX: docs/design/flow-dpo-defaults.md, sections 3 and 4); None: the family's
    timestep_sampling: Literal["logit_normal", "uniform", "mode"] | None = _f(
        None,
        "Flow bases (SD3, FLUX): the density training draws sigma from, one draw per pair: `logit_normal` "
        "(sigmoid of a normal draw; Esser et al. 2024), `uniform`, or `mode` (Esser et al.'s mode density). None: "
        "the family's diffusers LoRA example's default: SD3 `logit_normal` (train_dreambooth_lora_sd3.py "
        "--weighting_scheme), FLUX `uniform` (train_dreambooth_lora_flux.py's `none`). No source compares them for "
        "DPO.")
    logit_mean: float | None = _f(
        None, "Flow bases, `logit_normal`: mean of the normal draw; None: 0.0 (the diffusers examples').")
    logit_std: float | None = _f(
        None, "Flow bases, `logit_normal`: standard deviation of the normal draw; None: 1.0 (the diffusers "
        "examples').", min=0.0)
    mode_scale: float | None = _f(
        None, "Flow bases, `mode`: the density's scale; None: 1.29 (the diffusers examples').")
    shift: float | None = _f(
        None,
        "Flow bases: a static timestep shift of the training sigmas, s' = shift s / (1 + (shift - 1) s) (SD3 "
        "paper, Sec. 5.3.2); None: the base's scheduler config (SD3.5: 3.0; FLUX dev: dynamic shifting, so "
        "training sigmas are unshifted, as diffusers' FLUX example draws them).", min=0.0)
    guidance: float | None = _f(
        None,
        "FLUX dev: the value its guidance embedding is fed in training (policy and reference alike); None: 1.0, "
        "as diffusers' README commands, kohya's docs, ai-toolkit and SimpleTuner train (diffusers' and kohya's "
        "code default 3.5). A base without the embedding (schnell) ignores it.", min=0.0)


@dataclass(frozen=True)
class LoraRecipe:
    rank: int = _f(8, "LoRA rank r (the diffusers DPO LoRA example uses 8).", min=1)
    alpha: float = _f(8.0, "LoRA alpha; the update is scaled by alpha / rank.", min=0.0)
    dropout: float = _f(0.0, "Dropout on the LoRA input.", min=0.0, max=1.0)
    target_modules: tuple[str, ...] | None = _f(
        None,
        "Denoiser module names (suffixes) that receive adapters. None: the base family's default: SDXL and SD 1.5 "
        "`to_q`, `to_k`, `to_v`, `to_out.0` (the attention projections, as before this key defaulted to None); SD3 "
        "the attention of both streams (diffusers' SD3 LoRA example); FLUX both streams' attention and "
        "feed-forwards (diffusers' FLUX LoRA example).",
    )


@dataclass(frozen=True)
class DataRecipe:
    source: str = _f(
        "yuvalkirstain/pickapic_v2",
        "Pairs to train on: a `.jsonl` or `.csv` (prompt, chosen, rejected[, label]; image paths relative to "
        "it), a folder holding `w/` and `l/` (preferred and rejected images of the same file names, the prompt in "
        "`w/<name>.txt`: sd-scripts' DPO layout), a `.parquet` file or folder in the Pick-a-Pic layout (caption, "
        "jpg_0, jpg_1, label_0), a hub "
        "dataset id (or `hf:<id or folder>`, read by the `datasets` library), or `synthetic:shapes` (the "
        "generated demo set).",
    )
    split: str = _f("train", "Split to train on: a hub dataset's, or a parquet folder's `<split>-*.parquet` files.")
    val_split: str | None = _f(
        None,
        "Take the held-out pairs from this other split of the same dataset (a hub dataset, or a parquet folder "
        "with `<split>-*.parquet` files), e.g. Pick-a-Pic v2's `validation`, where the paper measured implicit "
        "reward accuracy; training pairs sharing a prompt with them are left out. None: hold out whole prompts of "
        "the training source (see `val_pairs`).",
    )
    streaming: bool = _f(
        False,
        "Hub datasets: stream the rows instead of downloading the whole split first (Pick-a-Pic v2 is ~335 GB). "
        "Each process and loader worker reads its own files, and a resume starts each where the checkpoint says "
        "it stood (same process count and `num_workers`). Prompts are held out by a hash of the prompt and the "
        "seed (see `val_pairs`); `max_pairs` keeps the first usable pairs in source order.",
    )
    shuffle_buffer: int = _f(
        1000, "Streaming: usable pairs each loader worker collects and shuffles as one window (memory ~ 2 images "
        "each); a resume reads at most the window it stopped in again.", min=1)
    columns: ColumnMap = _f(
        (),
        "Column names of your data where they differ from lora-dpo's, as a table "
        "`{ caption = \"text\", jpg_0 = \"image_a\" }`; names: " + ", ".join(COLUMN_NAMES) + ".",
        keys=COLUMN_NAMES,
    )
    strict: bool = _f(
        False,
        "Stop at the first unusable row (missing, truncated or undecodable image, empty caption, bad label) with "
        "an error naming it. Off: such pairs are skipped, counted and summarised at the end. Images in another "
        "mode (RGBA, L, P, CMYK, 16-bit...) are converted to RGB, never skipped.",
    )
    cache: str | None = _f(
        None,
        "Folder of a latent cache written by `lora-dpo cache`: train from it, never loading the VAE or the text "
        "encoders. Refused if it was made for another model, resolution or data.",
        resume="warn")
    resolution: int = _f(1024, "Training resolution in pixels (square); a multiple of 8, the VAE's downsampling.",
                         min=8, multiple=8)
    crop: Literal["random", "center"] = _f("random", "How the resized pair is cropped (the same for both images).")
    random_flip: bool = _f(True, "Flip both images of a pair horizontally with probability 0.5.")
    ties: Literal["drop", "keep"] = _f(
        "drop", "Pairs rated equal (label 0.5): `drop` them (the paper) or `keep` them with a soft label."
    )
    max_pairs: int | None = _f(None, "Use at most this many pairs (after filtering).", min=1)
    val_pairs: int = _f(
        0,
        "Pairs held out to measure reward accuracy during training: whole prompts are held out, drawn from the "
        "seed, until they give this many pairs, and no training pair shares their prompt (0: none). With "
        "`val_split`: at most this many pairs of that split (0: all of it). A stream without `val_split` holds out "
        "every pair of the prompts whose hash with the seed falls in a share of about this many pairs in its "
        "first 100 x val_pairs rows (1 % of prompts on a large split) and measures the first `val_pairs` of them "
        "(docs/data.md).",
        min=0)
    caption_dropout: float = _f(
        0.0, "Probability of training a pair on the empty prompt (the official code uses 0.2).", min=0.0, max=1.0
    )
    num_workers: int = _f(0, "DataLoader worker processes decoding images (a streamed source resumes only with the "
                               "number it was saved with: each worker streams its own files).", min=0, resume="free")
    prefetch_factor: int = _f(2, "Batches each worker prepares ahead (when num_workers > 0).", min=1,
                              resume="free")


@dataclass(frozen=True)
class ObjectiveRecipe:
    kind: ObjectiveKind = _f(
        "dpo",
        "Training objective: `dpo` (Diffusion-DPO, Wallace et al. 2023), `ipo` (Azar et al. 2023), `hinge` "
        "(SLiC, Zhao et al. 2023), `mapo` (Hong et al. 2024, no reference forward) or `sft` (the preferred "
        "image only, no reference, no second image); see the README's table of objectives.",
    )
    beta: float = _f(
        5000.0,
        "dpo, ipo, hinge: regularisation strength beta, in the official Diffusion-DPO code's convention: the "
        "logit is 0.5 x beta x the difference of per-pixel mean squared errors (paper: 2000 for SD 1.5, 5000 "
        "for SDXL). Larger beta keeps the adapter closer to the base. ipo targets a logit of 1/2, hinge of 1.",
        min=0.0,
        kinds=("dpo", "ipo", "hinge"),
        resume="warn")
    label_smoothing: float = _f(
        0.0,
        "Conservative DPO (Mitchell 2023): the probability that a label is flipped (0 = trust the labels); "
        "mixed into every pair's soft label, for every objective.",
        min=0.0,
        max=0.5,
    )
    mapo_beta: float = _f(
        0.1,
        "mapo: weight of the margin term against the preferred image's denoising error (the official "
        "MaPO code's `--beta_mapo`, default 0.1).",
        min=0.0,
        kinds=("mapo",),
    )
    mapo_snr: float = _f(
        0.5,
        "mapo: the constant g in the likelihood score s(e) = g e / (exp(g e) - 1) (the official MaPO code's "
        "`--snr_value`, default 0.5).",
        min=0.0,
        kinds=("mapo",),
    )


@dataclass(frozen=True)
class TrainRecipe:
    seed: int = _f(0, "Seed of every random choice: data order, crops, noise and timesteps.", min=0, max=2**32 - 1)
    learning_rate: float = _f(1e-5, "Peak learning rate of the LoRA weights.", min=0.0, resume="warn")
    lr_schedule: Literal["constant", "constant_with_warmup", "linear", "cosine"] = _f(
        "constant", "The learning-rate schedule, each as diffusers' `get_scheduler` means it: `constant` (no warmup: "
        "`warmup_steps` must be 0), `constant_with_warmup` (linear warmup from 0, then constant), `linear` and "
        "`cosine` (warmup, then down to 0 at `max_steps`).")
    warmup_steps: int = _f(0, "Linear warmup from 0 to `learning_rate`, in optimizer steps (with every schedule but "
                              "`constant`).", min=0)
    max_steps: int = _f(2000, "Optimizer steps to train.", min=1, resume="free")
    batch_size: int = _f(1, "Pairs per micro-batch on each device.", min=1, resume="layout")
    gradient_accumulation: int = _f(1, "Micro-batches accumulated per optimizer step.", min=1, resume="layout")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables clipping).", min=0.0, resume="warn")
    mixed_precision: Precision = _f(
        "bf16", "Compute precision (autocast) and the frozen base's weight dtype, on every device; `fp16` adds "
        "loss scaling and needs a GPU (see `device_fallback`).", resume="warn")
    gradient_checkpointing: bool | Literal["auto"] = _f(
        "auto",
        "Recompute UNet activations in backward: less memory, ~24 % more compute. `auto`: on only when "
        "`lora-dpo plan` predicts the step does not fit the GPU's free memory (off on CPU).",
        resume="free")
    compile: bool = _f(
        False,
        "Compile the UNet's repeated blocks (its transformer blocks, where the adapters sit) with torch.compile: "
        "regional compilation, diffusers' `compile_repeated_blocks`. The first step pays the compile, once per run "
        "(kept in inductor's cache on disk: the next run of the same shapes compiles in seconds); every step after it "
        "is faster. Needs what inductor builds kernels with (a C++ compiler on a CPU, Triton on a GPU): without it "
        "the run stops, naming this key. Losses and gradients agree with eager within float tolerance, not bit for "
        "bit. Measured in docs/performance.md.", resume="free")
    optimizer: Literal["adamw8bit", "adamw"] = _f(
        "adamw8bit", "`adamw8bit` (bitsandbytes' 8-bit AdamW, on GPU and CPU alike) or `adamw` (torch's, fused)."
    )
    weight_decay: float = _f(1e-2, "AdamW weight decay.", min=0.0)
    adam_beta1: float = _f(0.9, "AdamW beta1.", min=0.0, max=1.0)
    adam_beta2: float = _f(0.999, "AdamW beta2.", min=0.0, max=1.0)
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.", min=0.0)
    log_every: int = _f(10, "Optimizer steps between log lines (when metrics are copied from the device).", min=1,
                        resume="free")
    val_every: int = _f(100, "Optimizer steps between validation passes (when data.val_pairs > 0).", min=1,
                        resume="free")
    checkpoint_every: int = _f(500, "Optimizer steps between resumable checkpoints (0 disables); the last step is "
                               "checkpointed too (unless 0, or it is one of a run of NaN steps), so a finished run "
                               "can train longer.", min=0,
                               resume="free")
    keep_checkpoints: int = _f(2, "Checkpoints kept on disk: the newest K; older ones are deleted.", min=1,
                               resume="free")
    max_bad_steps: int = _f(
        5, "Optimizer steps in a row whose loss or gradients are NaN/Inf (each is skipped, the adapter unchanged) "
        "before the run stops.", min=1, resume="free")
    num_threads: int | None = _f(None, "CPU threads for torch (None: torch's default).", min=1, resume="free")
    deterministic: bool = _f(
        False,
        "Deterministic kernels: `torch.use_deterministic_algorithms(True)` (an op without one then raises, naming "
        "itself), `torch.backends.cudnn.deterministic = True`, `torch.backends.cudnn.benchmark = False`, and "
        "`CUBLAS_WORKSPACE_CONFIG=:4096:8` for cuBLAS, set at start (already set, it must be `:4096:8` or `:16:8`; "
        "unset in a process that used CUDA before, the run stops: cuBLAS reads it once). On a GPU some kernels are "
        "slower. Off: torch's defaults. See docs/reliability.md.", resume="free")
    device_fallback: bool = _f(
        False,
        "Where this machine cannot run a setting as written (today only `mixed_precision = \"fp16\"` on a CPU, "
        "which accelerate does not autocast), run the nearest one (`bf16`) and say so at start. Off: stop with an "
        "error naming the key. Nothing is ever replaced without it.")


def warmup_problem(cfg: TrainRecipe) -> str | None:
    """A warmup the schedule would ignore: diffusers' `constant` has none. Until `constant_with_warmup` was a
    choice, lora-dpo warmed `constant` up; refusing it (never silently dropping the warmup) says what changed."""
    if cfg.lr_schedule == "constant" and cfg.warmup_steps:
        return (f"[train].warmup_steps = {cfg.warmup_steps} with lr_schedule = \"constant\": diffusers' constant "
                "schedule has no warmup; write lr_schedule = \"constant_with_warmup\" to warm up (what lora-dpo did "
                "with `constant` before), or warmup_steps = 0")
    return None


def _as_trained(saved: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A checkpoint's recipe in today's names: `constant` with a warmup, from before `constant_with_warmup` was a
    choice, trained as `constant_with_warmup` (so resuming it with that name changes nothing)."""
    train = saved.get("train", {})
    if train.get("lr_schedule") == "constant" and train.get("warmup_steps"):
        return {**saved, "train": {**train, "lr_schedule": "constant_with_warmup"}}
    return saved


@dataclass(frozen=True)
class SampleRecipe:
    every: int = _f(
        0, "Optimizer steps between sample grids (base next to adapter, same seeds) in `samples/`; 0: none.", min=0)
    prompts: tuple[str, ...] = _f(
        (), "Prompts to sample; empty: the first few distinct prompts of the held-out (else training) pairs.")
    seeds: tuple[int, ...] = _f((0,), "Seeds: every prompt is sampled once per seed, with and without the adapter.")
    steps: int = _f(25, "Inference steps per sample (the base pipeline's own scheduler).", min=1)
    guidance_scale: float = _f(5.0, "Classifier-free guidance scale of the samples (SDXL's default 5, SD 1.5's 7.5).",
                               min=0.0)


@dataclass(frozen=True)
class OutputRecipe:
    dir: str = _f("adapters", "Parent folder of runs; each run writes `<dir>/<name>/`.")
    name: str | None = _f(None, "Run name; defaults to the recipe file's stem.")
    overwrite: bool = _f(False, "Allow replacing an earlier run of the same name: its finished adapter, or the "
                                "checkpoints of an unfinished run (deleted when the new run starts).")
    report_to: tuple[str, ...] = _f(
        ("tensorboard",),
        "Experiment trackers that receive the run's config, its metrics, the sample grids and the training plot "
        "(through accelerate): any of " + ", ".join(TRACKERS) + ", or `all` (every one of them installed, as "
        "accelerate means it); `[]`: none. tensorboard writes to `<run>/tensorboard`; the others read their usual "
        "environment (WANDB_MODE, MLFLOW_TRACKING_URI, ...); see docs/trackers.md.",
        choices=(*TRACKERS, ALL_TRACKERS),
    )
    project: str = _f(
        "lora-dpo",
        "The trackers' project the run is logged under (its run is named after `name`): the wandb, trackio, "
        "comet_ml and swanlab project, the mlflow experiment, the clearml project (aim: the run's name, as accelerate "
        "sets it). What "
        "diffusers' scripts call `--tracker_name` and sd-scripts `--log_tracker_name`. It wins over WANDB_PROJECT; "
        "MLFLOW_EXPERIMENT_NAME and CLEARML_PROJECT, when set, win over it (accelerate reads them first).",
    )
    license: str | None = _f(
        None, "License in the model card (hub license id); None: the base's (SDXL `openrail++`, SD 1.5 "
        "`creativeml-openrail-m`), `other` for unknown bases."
    )


@dataclass(frozen=True)
class Recipe:
    model: ModelRecipe = field(default_factory=ModelRecipe)
    lora: LoraRecipe = field(default_factory=LoraRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    objective: ObjectiveRecipe = field(default_factory=ObjectiveRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    online: OnlineRecipe = field(default_factory=OnlineRecipe)
    sample: SampleRecipe = field(default_factory=SampleRecipe)
    output: OutputRecipe = field(default_factory=OutputRecipe)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {}
        for section in dataclasses.fields(self):
            values = getattr(self, section.name)
            hints = typing.get_type_hints(type(values))
            out[section.name] = {k: _plain(v, hints[k]) for k, v in dataclasses.asdict(values).items()}
        return out

    def to_toml(self) -> str:
        """The resolved recipe as TOML; `None` values are written as comments (TOML has no null)."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"# {key} = (unset)" if value is None else f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)

    def fingerprint(self) -> str:
        """A short hash of every setting that shapes the model (all but [sample] and [output]), stamped into
        adapters."""
        settings = {k: v for k, v in self.to_dict().items() if k not in ("sample", "output")}
        if not self.online.rounds:  # an offline run's fingerprint is what it was before [online] existed
            del settings["online"]
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def resume_changes(self, saved: dict[str, dict[str, Any]], rule: str = "same") -> list[str]:
        """The keys of `resume_rule` `rule` whose value differs from `saved` (a checkpoint's `to_dict()`), as
        `[section].key (old -> new)`: with "same", what a resume must refuse; with "warn", what it says."""
        now, changed, saved = self.to_dict(), [], _as_trained(saved)
        for section, values in now.items():
            for key, value in values.items():
                before = saved.get(section, {}).get(key, value)  # a key added since: its default was the run's
                if before != value and resume_rule(section, key) == rule:
                    changed.append(f"[{section}].{key} ({_toml_value(before)} -> {_toml_value(value)})")
        return changed

    def run_name(self, recipe_path: Path | None) -> str:
        return self.output.name or (recipe_path.stem if recipe_path else "run")


def resume_rule(section: str, key: str) -> str:
    """What `--resume` may do with `[section].key`: one of RESUME_RULES."""
    if section in FREE_SECTIONS:
        return "free"
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
    return fields[key].metadata.get("resume", "same") if key in fields else "same"


def _plain(value: Any, annotation: Any) -> Any:
    """Frozen values back to TOML's types: a ColumnMap to a table, other tuples to lists."""
    if annotation == ColumnMap:
        return dict(value)
    return list(value) if isinstance(value, tuple) else value


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # JSON's string escapes are TOML's, except that TOML has no surrogate pairs (keep text raw) and escapes DEL
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Recipe)}  # type: ignore[misc]


