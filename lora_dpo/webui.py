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
"""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Any

from torch import Tensor

from lora_dpo import __version__

LEGACY_OFFSET, LEGACY_SIZE = 0x100000, 0x10000
IMPLEMENTATION_SGM = "https://github.com/Stability-AI/generative-models"  # sd-scripts' name for SGM-named files
IMPLEMENTATION_DIFFUSERS = "diffusers"  # diffusers module names (our diffusers file; kohya SD 1.5 files)
PREDICTION_TYPE = "epsilon"  # SD 1.5 and SDXL bases predict the noise; v-prediction bases are not trained here


def modelspec(sdxl: bool, title: str, resolution: int | None, implementation: str) -> dict[str, str]:
    """The Stability model-spec keys that webui tools read to sort and label a LoRA. `implementation` names
    whose module names the file's keys use: SGM (`input_blocks_...`) or diffusers (`down_blocks_...`)."""
    spec = {"modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base/lora" if sdxl else "stable-diffusion-v1/lora",
            "modelspec.implementation": implementation,
            "modelspec.title": title,
            "modelspec.date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S"),
            "modelspec.prediction_type": PREDICTION_TYPE,
            "modelspec.description": f"LoRA aligned to human preferences with Diffusion-DPO (lora-dpo {__version__})"}
    if resolution:
        spec["modelspec.resolution"] = f"{resolution}x{resolution}"
    return spec


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

