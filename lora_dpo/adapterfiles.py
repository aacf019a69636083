"""Adapter files of transformer (flow-matching) bases: their key prefix, which family an adapter is for, and the
kohya file with fused layers, read and written.

A diffusers/peft adapter names a UNet family's modules `unet.<module>` and a transformer family's
`transformer.<module>` (each family's `denoiser_folder`). The kohya file ComfyUI and Forge load names each module
`lora_unet_<its name in the original checkpoint>`, as the family spells it (`Family.kohya_module_name`); a
transformer family's original checkpoint fuses some diffusers modules into one weight (SD3's and FLUX's q, k and v
in one `qkv`, FLUX's single blocks' q, k, v and MLP in one `linear1`), and the family says where each module's rows
sit (`Family.fused_slice`: dim, offset, size). Written as one LoRA on the fused weight: down = the parts' A
stacked (sum of their ranks rows), up = block-diagonal (each part's B in its rows and its own columns, zeros
elsewhere, so the fused delta up @ down is each part's delta in its rows, exactly), `.alpha` = the common scale x
the fused rank (ComfyUI and Forge scale by alpha / down's rows); parts with different scales get theirs folded into
their B (alpha = the fused rank, scale 1). Read back, each part gets the rows of up that are its own and the columns
of them that are not zero (our files: its own A and B back; files fused by other trainers: the whole down).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lora_dpo import hub, kohya, models

Slot = kohya.Slot


ADAPTER_FILE = "pytorch_lora_weights.safetensors"
LORA_SUFFIXES = (".lora_A.weight", ".lora_down.weight")  # peft/diffusers and kohya down-projections


class AdapterError(models.ModelError):
    """An adapter file that cannot be read, written or applied; the message names it and says what to do."""


def resolve_adapter_file(source: str | Path) -> Path:
    """A folder (its pytorch_lora_weights.safetensors, or its only .safetensors), a file, or a hub model id."""
    path = Path(source)
    if path.is_dir():
        candidates = [path / ADAPTER_FILE] if (path / ADAPTER_FILE).is_file() else sorted(path.glob("*.safetensors"))
        if len(candidates) != 1:
            raise AdapterError(f"{source}: expected {ADAPTER_FILE} or exactly one .safetensors file in this folder, "
                               f"found {len(candidates)}; pass the file itself")
        return candidates[0]
    if path.is_file():
        if path.suffix != ".safetensors":
            raise AdapterError(f"{source}: only .safetensors adapters are read (pickled .bin/.pt files can run code)")
        return path
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        raise AdapterError(f"{source}: no such file or folder (and not a hub id like owner/name)")
    from huggingface_hub import hf_hub_download

    online = hub.prepare()
    try:
        return Path(hf_hub_download(str(source), ADAPTER_FILE))
    except Exception as err:
        if not online:
            raise hub.unavailable(str(source), "the adapter") from None
        raise AdapterError(f"{source}: not a local file or folder, and no {ADAPTER_FILE} could be fetched from the "
                           f"hub ({type(err).__name__}); check the path or the id and your network") from None


def read_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{path}: not a readable safetensors file ({err})") from None
    if not any(k.endswith(LORA_SUFFIXES) for k in tensors):
        raise AdapterError(f"{path}: holds no LoRA weights ({len(tensors)} tensors, none named *.lora_A.weight or "
                           "*.lora_down.weight): a full model or another kind of file, not an adapter")
    return tensors, metadata


def detect_format(tensors: dict[str, Tensor]) -> Literal["diffusers", "kohya"]:
    return "kohya" if any(k.startswith(("lora_unet_", "lora_te")) for k in tensors) else "diffusers"



def denoiser_prefix(tensors: Mapping[str, Any]) -> str:
    """The denoiser's key prefix of a diffusers/peft adapter: `transformer` when its keys say so, else `unet`."""
    return "transformer" if any(k.startswith("transformer.") for k in tensors) else "unet"


def adapter_family(metadata: Mapping[str, str]) -> models.Family | None:
    """The family an adapter's header names (model spec, sd-scripts' version, or the lora-dpo base), or None."""
    family = models.family_of_metadata(metadata.get("modelspec.architecture", "") + " "
                                       + metadata.get("ss_base_model_version", ""))
    return family or models.family_of_base_name(metadata.get("lora_dpo.base_model", ""))


def refuse_other_family(metadata: Mapping[str, str], tensors: Mapping[str, Any], config: Mapping[str, Any],
                        base: str, source: str) -> None:
    """One line when the adapter is for another family than the base's denoiser `config` (its header says so, or
    its keys name the other kind of denoiser: `unet.` / `transformer.`)."""
    base_family = models.family_of_denoiser(config)
    if base_family is None:
        return
    family = adapter_family(metadata)
    if family is not None and family is not base_family:
        made_for = metadata.get("lora_dpo.base_model") or metadata.get("ss_sd_model_name") or family.label
        raise AdapterError(f"{source}: a {family.label} adapter (made for {made_for}) cannot load onto {base}, a "
                           f"{base_family.label} base; pass a {family.label} base")
    prefixes = {k.split(".", 1)[0] for k in tensors if k.startswith(("unet.", "transformer."))}
    if family is None and prefixes and base_family.denoiser_folder not in prefixes:
        raise AdapterError(f"{source}: an adapter for a {'/'.join(sorted(prefixes))} denoiser cannot load onto "
                           f"{base}, a {base_family.label} base (a {base_family.denoiser_folder}); pass the base it "
                           "was made for")


def refuse_for_base(path: Path, base: str) -> None:
    """`refuse_other_family` from the base's config alone, before its weights load; a base whose config cannot be
    read here (a hub id offline) is left to the checks after loading."""
    try:
        config = models.base_denoiser_config(base)
    except (models.ModelError, OSError, ValueError):
        return
    tensors, metadata = read_file(path)
    refuse_other_family(metadata, tensors, config, base, str(path))


def uses_unet_names(family: models.Family) -> bool:
    """A UNet family's kohya names (both spellings read, SGM or diffusers; `kohya.name_table`) vs a transformer
    family's, each the family's own, fused layers included (`name_table` here)."""
    return family.denoiser_folder == "unet"


def name_table(family: models.Family, config: Mapping[str, Any], tree: Any) -> dict[str, list[Slot]]:
    """kohya name -> the diffusers modules it stands for, each with its rows in the fused weight (None: a weight
    of its own), for every adaptable module of `tree` (the denoiser, on `meta`) the family has a name for."""
    table: dict[str, list[Slot]] = {}
    for module in kohya.adaptable_modules(tree):
        try:
            name = family.kohya_module_name(module, config)
        except ValueError:  # embedders, norms: no LoRA target the tools map
            continue
        table.setdefault(name, []).append((module, family.fused_slice(module, config)))
    return table


def _fused_rows(slots: list[Slot]) -> int:
    return max(offset + size for _, rows in slots if rows is not None for _, offset, size in [rows])


def to_kohya(weights: dict[str, Tensor], alphas: dict[str, float], table: dict[str, list[Slot]],
             dtype: torch.dtype) -> dict[str, Tensor]:
    """peft weights + per-module alpha -> a kohya state dict with fused layers (see the module docstring)."""
    by_module = {module: (name, rows, slots) for name, slots in table.items() for module, rows in slots}
    missing = [m for m in alphas if m not in by_module]
    if missing:
        raise AdapterError(f"{missing[0]}: no kohya / ComfyUI name for this layer in the base's family; export "
                           "with --format diffusers instead")
    groups: dict[str, list[str]] = {}
    for module in alphas:
        groups.setdefault(by_module[module][0], []).append(module)
    out: dict[str, Tensor] = {}
    for name, modules in groups.items():
        slots = by_module[modules[0]][2]
        a = [weights[f"{m}.lora_A.weight"].float() for m in modules]
        b = [weights[f"{m}.lora_B.weight"].float() for m in modules]
        scales = [alphas[m] / w.shape[0] for m, w in zip(modules, a, strict=True)]
        if by_module[modules[0]][1] is None:  # a weight of its own: as for a UNet
            down, up, alpha = a[0], b[0], alphas[modules[0]]
        else:
            rank = sum(w.shape[0] for w in a)
            same = all(abs(s - scales[0]) <= 1e-12 * abs(scales[0]) for s in scales)
            down = torch.cat(a)
            up = torch.zeros(_fused_rows(slots), rank, dtype=torch.float32)
            column = 0
            for module, part, scale in zip(modules, b, scales, strict=True):
                _, offset, size = by_module[module][1]
                up[offset:offset + size, column:column + part.shape[1]] = part if same else part * scale
                column += part.shape[1]
            alpha = scales[0] * rank if same else float(rank)
        out[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out
