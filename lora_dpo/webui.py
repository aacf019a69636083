"""The header keys webui tools read from a LoRA file: Stability's model spec (`modelspec.*`), the training keys
kohya's sd-scripts writes (`ss_*`, shown by AUTOMATIC1111, Forge and civitai), and the two hashes A1111 shows
(`sshs_model_hash`, `sshs_legacy_hash`), computed the way sd-scripts precomputes them.

The hashes, as sd-scripts defines them (`train_util.precalculate_safetensors_hashes`):
- the file is serialised with the `ss_*` keys only (other keys may change later without changing the hash);
- `sshs_model_hash`: sha256 of everything after the header (8-byte length + JSON): the tensor data alone, which
  no metadata changes, so it equals the same digest of the final file;
- `sshs_legacy_hash`: the old webui hash, the first 8 hex digits of sha256 of the 0x10000 bytes at offset
  0x100000 of that serialisation (an empty read for files under 1 MiB: `e3b0c442`).
`modelspec.hash_sha256` is `0x` + the model hash.

The base a LoRA was trained on is named as sd-scripts names it (`train_network.py`): a local file or folder by its
basename in `ss_sd_model_name` (a hub id as is), a local file with its two webui hashes, `ss_sd_model_hash` (the
legacy one, as above but of the base file itself) and `ss_new_sd_model_hash` (sha256 of the whole file).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from lora_dpo import __version__, kohya

LEGACY_OFFSET, LEGACY_SIZE = 0x100000, 0x10000
MODELSPEC_VERSION = "1.0.1"  # what sd-scripts' library/sai_model_spec.py writes
IMPLEMENTATION_SGM = "https://github.com/Stability-AI/generative-models"  # sd-scripts' name for SGM-named files
IMPLEMENTATION_DIFFUSERS = "diffusers"  # diffusers module names (our diffusers file; kohya SD 1.5 files)
# diffusers' scheduler prediction_type -> the model spec's (sd-scripts writes "v" for v-parameterization)
MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v"}
DESCRIPTION = f"LoRA aligned to human preferences with Diffusion-DPO (lora-dpo {__version__})"


@dataclass(frozen=True)
class BaseSpec:
    """What these header keys say of the base's family, as the family answers (`models.families`): this module
    decides nothing about families."""

    architecture: str  # `modelspec.architecture` of a full checkpoint (a LoRA's gets `/lora`)
    implementation: str  # whose module names the family's kohya files use: IMPLEMENTATION_SGM or _DIFFUSERS
    resolution: int  # its native resolution, when no recipe says
    version: Callable[[str], str]  # the base's prediction type -> sd-scripts' `ss_base_model_version`


def modelspec(architecture: str, title: str, resolution: int | None, implementation: str,
              prediction_type: str = "epsilon", lora: bool = True, description: str = DESCRIPTION) -> dict[str, str]:
    """The Stability model-spec keys that webui tools read to sort and label a model. `architecture` is the
    family's (`BaseSpec.architecture`); `implementation` names whose module names the file's keys use: SGM
    (`input_blocks_...`) or diffusers (`down_blocks_...`); `prediction_type` is the base scheduler's (`epsilon` or
    `v_prediction`); `lora=False`: a full checkpoint."""
    spec = {"modelspec.sai_model_spec": MODELSPEC_VERSION,
            "modelspec.architecture": architecture + ("/lora" if lora else ""),
            "modelspec.implementation": implementation,
            "modelspec.title": title,
            "modelspec.date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
            "modelspec.prediction_type": MODELSPEC_PREDICTION.get(prediction_type, prediction_type),
            "modelspec.description": description}
    if resolution:
        spec["modelspec.resolution"] = f"{resolution}x{resolution}"
    return spec


def file_hashes(path: Path) -> tuple[str, str]:
    """(legacy, sha256) of a whole file as sd-scripts computes a local base's (`train_util.model_hash`,
    `calculate_sha256`): 8 hex digits of sha256 of the 0x10000 bytes at 0x100000, and sha256 of every byte."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        handle.seek(LEGACY_OFFSET)
        legacy = hashlib.sha256(handle.read(LEGACY_SIZE)).hexdigest()[:8]
    return legacy, digest.hexdigest()


def base_stamp(schedule: dict[str, Any], base_file: Path | None) -> dict[str, str]:
    """What an adapter records of its base while it trains: the noise schedule it was trained on
    (`modelspec.prediction_type`, `lora_dpo.zero_terminal_snr`) and, for a base file, its two hashes (sd-scripts
    computes them while it trains too; an export elsewhere still has them)."""
    kind = schedule["prediction_type"]
    stamp = {"modelspec.prediction_type": MODELSPEC_PREDICTION.get(kind, kind),
             "lora_dpo.zero_terminal_snr": json.dumps(bool(schedule["rescale_betas_zero_snr"]))}
    if base_file is not None:
        legacy, sha256 = file_hashes(base_file)
        stamp |= {"lora_dpo.base_sha256": sha256, "lora_dpo.base_legacy_sha256": legacy}
    return stamp


def base_keys(meta: dict[str, str], base: str) -> dict[str, str]:
    """`ss_sd_model_name` and, for a base file, its hashes: recorded at training (`lora_dpo.base_sha256`,
    `lora_dpo.base_legacy_sha256`), as sd-scripts records them while it trains."""
    local = "lora_dpo.base_sha256" in meta or Path(base).exists()
    keys = {"ss_sd_model_name": os.path.basename(base.rstrip("/\\")) if local else base}
    if "lora_dpo.base_sha256" in meta:
        keys |= {"ss_sd_model_hash": meta.get("lora_dpo.base_legacy_sha256", ""),
                 "ss_new_sd_model_hash": meta["lora_dpo.base_sha256"]}
    return keys


def _optimizer_name(train: dict[str, Any]) -> str:
    """sd-scripts' form: the optimizer class's module and name, then its arguments."""
    name = ("bitsandbytes.optim.adamw.AdamW8bit" if train["optimizer"] == "adamw8bit" else "torch.optim.adamw.AdamW")
    args = (f"weight_decay={train['weight_decay']},betas=({train['adam_beta1']}, {train['adam_beta2']}),"
            f"eps={train['adam_epsilon']}")
    return f"{name}({args})"


def lr_schedule_name(schedule: str, warmup_steps: int) -> str:
    """The diffusers schedule the run trained with: its `lr_schedule`, except that `constant` with a warmup (a run
    from before `constant_with_warmup` was a choice; today's trainer refuses it) trained as `constant_with_warmup`."""
    return "constant_with_warmup" if schedule == "constant" and warmup_steps else schedule


def training_keys(recipe: dict[str, Any], metrics: dict[str, Any], finished_at: float) -> dict[str, str]:
    """sd-scripts' training keys from a resolved recipe (`Recipe.to_dict()`, as the adapter file carries it) and
    the run's metrics; the start is the finish less the training loop's seconds."""
    train, data, lora = recipe["train"], recipe["data"], recipe["lora"]
    started_at = finished_at - float(metrics.get("seconds") or 0.0)
    keys: dict[str, Any] = {
        "ss_resolution": f"({data['resolution']}, {data['resolution']})",
        "ss_learning_rate": train["learning_rate"], "ss_unet_lr": train["learning_rate"],
        "ss_text_encoder_lr": 0.0, "ss_network_train_unet_only": True,
        "ss_lr_scheduler": lr_schedule_name(train["lr_schedule"], train["warmup_steps"]),
        "ss_lr_warmup_steps": train["warmup_steps"], "ss_optimizer": _optimizer_name(train),
        "ss_mixed_precision": train["mixed_precision"], "ss_seed": train["seed"],
        "ss_max_train_steps": train["max_steps"], "ss_gradient_accumulation_steps": train["gradient_accumulation"],
        "ss_max_grad_norm": train["max_grad_norm"], "ss_network_dropout": lora["dropout"],
        "ss_training_started_at": round(started_at, 3), "ss_training_finished_at": round(finished_at, 3),
        "ss_caption_dropout_rate": data["caption_dropout"], "ss_flip_aug": data["random_flip"],
    }
    return {key: str(value) for key, value in keys.items()}


def network_args(weights: dict[str, Tensor], alphas: dict[str, float]) -> dict[str, str]:
    """`ss_network_args` when convolutions with a kernel wider than 1x1 are adapted (sd-scripts' `conv_dim`,
    `conv_alpha`: LoRA-C3Lier); {} otherwise. Values are strings, as sd-scripts' `--network_args` passes them."""
    conv = {m: int(w.shape[0]) for k, w in weights.items() if k.endswith(".lora_A.weight") and w.dim() == 4
            and w.shape[-1] * w.shape[-2] > 1 for m in [k.removesuffix(".lora_A.weight")]}
    if not conv:
        return {}
    dim = max(set(conv.values()), key=list(conv.values()).count)
    conv_alphas = [alphas[m] for m in conv]
    alpha = max(set(conv_alphas), key=conv_alphas.count)
    return {"ss_network_args": json.dumps({"conv_dim": str(dim), "conv_alpha": f"{alpha:g}"})}


def kohya_metadata(carried: dict[str, str], spec: BaseSpec, name: str, base: str, weights: dict[str, Tensor],
                   alphas: dict[str, float], tensors: dict[str, Tensor]) -> dict[str, str]:
    """A kohya file's header: model spec and sd-scripts' keys over what the adapter carried (`carried`: its
    `lora_dpo.*` and `modelspec.*` keys), the training keys from the recipe it carries (none for an adapter made
    elsewhere), then the hashes of `tensors`, the file's own. `spec`: what the base's family says."""
    recipe = json.loads(carried.get("lora_dpo.recipe") or "{}")
    resolution = recipe["data"]["resolution"] if recipe else spec.resolution
    meta = {**modelspec(spec.architecture, name, resolution, IMPLEMENTATION_DIFFUSERS), **carried}
    # the names of this file's keys, as the family writes them (SGM or diffusers), whatever the source file said;
    # and the spec version this header follows (an adapter written before may carry an older one)
    meta["modelspec.implementation"] = spec.implementation
    meta["modelspec.sai_model_spec"] = MODELSPEC_VERSION
    ranks = {k.removesuffix(".lora_A.weight"): int(v.shape[0]) for k, v in weights.items()
             if k.endswith(".lora_A.weight")}
    # sd-scripts' minimum keys (`train_util.SS_METADATA_MINIMUM_KEYS`) first: ss_v2 is False for SD 1.x and SDXL
    meta |= {"ss_v2": "False", "ss_base_model_version": spec.version(meta["modelspec.prediction_type"]),
             "ss_network_module": "networks.lora", "ss_network_dim": str(kohya.most_common(ranks)),
             "ss_network_alpha": repr(float(kohya.most_common(alphas))), "ss_output_name": name,
             "ss_training_comment": "Diffusion-DPO LoRA made with lora-dpo", **base_keys(meta, base)}
    if "lora_dpo.steps" in meta:
        meta["ss_steps"] = meta["lora_dpo.steps"]
    if "lora_dpo.zero_terminal_snr" in meta:  # the schedule trained on, the recipe's or the base file's
        meta["ss_zero_terminal_snr"] = str(meta["lora_dpo.zero_terminal_snr"] == "true")
    if recipe:
        finished = datetime.datetime.fromisoformat(meta["modelspec.date"]).replace(tzinfo=datetime.UTC).timestamp()
        meta |= training_keys(recipe, json.loads(carried.get("lora_dpo.metrics") or "{}"), finished)
    meta |= network_args(weights, alphas)
    return meta | hash_keys(tensors, meta)


def safetensors_hashes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of `tensors` saved with `metadata`'s `ss_*` keys (see the module)."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in tensors.items()},
                metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = 8 + int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[header:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[LEGACY_OFFSET:LEGACY_OFFSET + LEGACY_SIZE]).hexdigest()[:8]
    return model_hash, legacy_hash


def hash_keys(tensors: dict[str, Tensor], metadata: dict[str, str]) -> dict[str, str]:
    model_hash, legacy_hash = safetensors_hashes(tensors, metadata)
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash, "modelspec.hash_sha256": "0x" + model_hash}

