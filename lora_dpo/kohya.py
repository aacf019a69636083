"""The kohya / webui LoRA format that ComfyUI, AUTOMATIC1111 and Forge load, and its module names.

A kohya file names each adapted module `lora_unet_<path with _ for .>` and stores `.lora_down.weight`
(= peft's lora_A), `.lora_up.weight` (= lora_B) and a scalar `.alpha` (scale = alpha / rank). The path is the
module's name in the UNet the tool runs: sd-scripts trains SDXL on Stability's own (SGM / LDM) UNet, so SDXL
files use SGM names (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`), and trains SD 1.x on the diffusers
UNet, so SD 1.5 files use diffusers names (`down_blocks_0_attentions_0_..._attn1_to_q`). Which spelling a file is
written in is its base family's choice (`Family.kohya_module_name`): this module only spells.

The SGM names are derived from the UNet config (layers per block, number of levels, which blocks have
attention), not hard-coded to SDXL's three levels, so the tiny two-level test base maps the same way.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

PREFIX = "lora_unet_"
Slot = tuple[str, tuple[int, int, int] | None]  # a diffusers module and its rows in a fused weight (None: all)
# Inside a resnet block the SGM UNet names its layers by position in nn.Sequential containers.
RESNET_SGM = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
              "conv_shortcut": "skip_connection"}


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def sgm_prefixes(config: Any) -> dict[str, str]:
    """diffusers module prefix -> SGM module prefix for a UNet2DConditionModel config.

    Down level i with L layers occupies SGM input blocks i*(L+1)+1 .. i*(L+1)+L (resnet at .0, attention at .1),
    then its downsampler at input block (i+1)*(L+1); up level i occupies output blocks i*(L+1) .. i*(L+1)+L,
    its upsampler after the resnet (.1) or after the attention (.2). input_blocks.0 is conv_in.
    """
    layers = _get(config, "layers_per_block")
    if not isinstance(layers, int):
        raise ValueError(f"layers_per_block = {layers!r}: SGM names need the same number of layers in every block")
    step = layers + 1
    down, up = _get(config, "down_block_types"), _get(config, "up_block_types")
    pairs = {"conv_in": "input_blocks.0.0", "conv_out": "out.2",
             "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
             "mid_block.resnets.1": "middle_block.2"}
    for i in range(len(down)):
        for j in range(layers):
            pairs[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{i * step + j + 1}.0"
            pairs[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{i * step + j + 1}.1"
        if i < len(down) - 1:
            pairs[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * step}.0.op"
    for i, kind in enumerate(up):
        for j in range(step):
            pairs[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{i * step + j}.0"
            pairs[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{i * step + j}.1"
        if i < len(up) - 1:
            slot = 2 if "CrossAttn" in kind else 1
            pairs[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * step + layers}.{slot}.conv"
    return pairs


def to_sgm(module: str, prefixes: dict[str, str]) -> str:
    """A diffusers module name in SGM spelling: the longest known prefix is replaced; resnet layers renamed."""
    parts = module.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            rest = parts[cut:]
            if ".resnets." in f".{head}." and rest and rest[0] in RESNET_SGM:
                rest = [RESNET_SGM[rest[0]], *rest[1:]]
            return ".".join([prefixes[head], *rest])
    raise ValueError(f"UNet module {module!r} has no SGM name")


def adaptable_modules(unet: Any) -> list[str]:
    """Every module a LoRA can wrap (Linear, Conv2d), in the UNet's own order. Works on a meta-device UNet."""
    return [name for name, module in unet.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "lora_" not in name
            and not name.endswith("base_layer")]


def name_table(unet: Any) -> dict[str, str]:
    """kohya module name (without `.lora_down.weight`) -> diffusers module name, for every adaptable module.
    Both spellings are accepted when reading (files made elsewhere use either); the base's family picks the one
    its files are written with."""
    prefixes = sgm_prefixes(unet.config)
    table: dict[str, str] = {}
    for module in adaptable_modules(unet):
        table[PREFIX + module.replace(".", "_")] = module
        table[PREFIX + to_sgm(module, prefixes).replace(".", "_")] = module
    return table


def to_kohya(weights: dict[str, Tensor], alphas: dict[str, float], kohya_name: Callable[[str], str],
             dtype: torch.dtype) -> dict[str, Tensor]:
    """peft weights (`<module>.lora_A.weight`, `.lora_B.weight`) + per-module alpha -> a kohya state dict, each
    module named by `kohya_name` (the base family's `kohya_module_name`: `lora_unet_...`).
    Alpha is a one-element scalar tensor (ComfyUI rejects a vector) kept in fp32 so 0.1 stays 0.1 in fp16 files."""
    out: dict[str, Tensor] = {}
    for module, alpha in alphas.items():
        name = kohya_name(module)
        out[f"{name}.lora_down.weight"] = weights[f"{module}.lora_A.weight"].to(dtype).contiguous()
        out[f"{name}.lora_up.weight"] = weights[f"{module}.lora_B.weight"].to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def from_kohya(tensors: dict[str, Tensor], table: Mapping[str, str | list[Slot]]) -> tuple[
        dict[str, Tensor], dict[str, float], list[str]]:
    """A kohya state dict -> (peft weights, per-module alpha, kohya names the base does not have). `table`: kohya
    name -> its diffusers module, or the modules a fused weight stands for (`Slot`s: a module and its rows), split
    back by their rows and by the columns of `up` each uses (a sibling the file does not train is left out).
    Text-encoder entries (`lora_te*`) are not part of a denoiser adapter and are left out by the caller."""
    weights: dict[str, Tensor] = {}
    alphas: dict[str, float] = {}
    unknown: list[str] = []
    for key in sorted(tensors):
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        slots = table.get(name)
        if slots is None:
            unknown.append(name)
            continue
        down, up = tensors[key], tensors[f"{name}.lora_up.weight"]
        stored = tensors.get(f"{name}.alpha")
        alpha = float(stored.float().reshape(-1)[0]) if stored is not None else float(down.shape[0])
        if isinstance(slots, str):  # a module of its own: the file's tensors and alpha as they are
            weights[f"{slots}.lora_A.weight"], weights[f"{slots}.lora_B.weight"] = down, up
            alphas[slots] = alpha
            continue
        scale = alpha / down.shape[0]
        for module, rows in slots:
            part = up if rows is None else up.narrow(rows[0], rows[1], rows[2])
            used = part.float().abs().sum(dim=0) != 0
            if rows is not None and not used.any():
                continue  # a fused sibling the adapter does not train (FLUX's proj_mlp beside q, k, v)
            keep = used if rows is not None else torch.ones_like(used)
            weights[f"{module}.lora_A.weight"] = down[keep].contiguous()
            weights[f"{module}.lora_B.weight"] = part[:, keep].contiguous()
            alphas[module] = scale * int(keep.sum())
    return weights, alphas, unknown


def most_common(values: dict[str, float] | dict[str, int]) -> Any:
    return collections.Counter(values.values()).most_common(1)[0][0]
