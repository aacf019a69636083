"""A diffusers UNet pipeline (SD 1.5, SDXL) written as one checkpoint in Stability's original (LDM / SGM) layout:
the file AUTOMATIC1111, Forge and ComfyUI's checkpoint loader open, and the inverse of the conversion diffusers'
`from_single_file` makes when it reads one (`single_file`).

The layout, part by part (the names diffusers' `scripts/convert_diffusers_to_original_sdxl.py` and
`convert_diffusers_to_original_stable_diffusion.py` write):
- UNet under `model.diffusion_model.`, in SGM module names (`kohya.sgm_prefixes`, derived from the UNet config,
  so any depth maps); a resnet's layers by position (`in_layers.0` norm, `in_layers.2` conv, `emb_layers.1`,
  `out_layers.0`, `out_layers.3`, `skip_connection`), `out.0` / `out.2` the final norm and convolution;
- VAE under `first_stage_model.`: `down.{i}.block.{j}`, `up.{levels-1-i}.block.{j}` (the decoder counts down),
  `mid.block_1/2`, `mid.attn_1` (q, k, v, proj_out as 1x1 convolutions), `norm_out`, `nin_shortcut`;
- the text encoders as the base's family lays them out (`Family.original_text_state`: SD 1.5's CLIP ViT-L under
  `cond_stage_model.transformer.`, SDXL's under `conditioner.embedders.0.transformer.` and its OpenCLIP bigG under
  `conditioner.embedders.1.model.`, `families.clip`);
- a v-prediction base gets ComfyUI's marker keys `v_pred` (and `ztsnr` with zero terminal SNR), empty tensors,
  as ComfyUI's own checkpoint save writes them, so the tools sample it as it was trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lora_dpo import files, kohya, webui
from lora_dpo.models.families import pipeline_family
from lora_dpo.models.parts import ModelError
from lora_dpo.models.single_file import UNET_PREFIX, V_PRED, VAE_PREFIX, ZTSNR

RESNET_LDM = {**kohya.RESNET_SGM, "norm1": "in_layers.0", "norm2": "out_layers.0"}  # kohya's table + the norms
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _longest_prefix(key: str, prefixes: dict[str, str]) -> tuple[str, list[str]]:
    """The longest dotted prefix of `key` that `prefixes` knows, and the parts after it."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            return head, parts[cut:]
    raise ModelError(f"{key}: no name for it in the original single-file layout (only SD 1.5 and SDXL pipelines are "
                     "written there); merge with --format diffusers instead")


def unet_state(state: dict[str, Tensor], config: Any) -> dict[str, Tensor]:
    """A diffusers UNet2DConditionModel's weights under the original layout's names (`model.diffusion_model.`)."""
    prefixes = {**kohya.sgm_prefixes(config), "conv_norm_out": "out.0"}
    out = {}
    for key, value in state.items():
        head, rest = _longest_prefix(key, prefixes)
        if ".resnets." in f".{head}." and rest[0] in RESNET_LDM:
            rest = [RESNET_LDM[rest[0]], *rest[1:]]
        out[UNET_PREFIX + ".".join([prefixes[head], *rest])] = value
    return out


def vae_state(state: dict[str, Tensor], levels: int, layers: int) -> dict[str, Tensor]:
    """An AutoencoderKL's weights under the original layout's names (`first_stage_model.`)."""
    prefixes = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for side in ("encoder", "decoder"):
        prefixes |= {f"{side}.conv_in": f"{side}.conv_in", f"{side}.conv_out": f"{side}.conv_out",
                     f"{side}.conv_norm_out": f"{side}.norm_out",
                     f"{side}.mid_block.resnets.0": f"{side}.mid.block_1",
                     f"{side}.mid_block.resnets.1": f"{side}.mid.block_2",
                     f"{side}.mid_block.attentions.0": f"{side}.mid.attn_1"}
    for i in range(levels):
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{levels - 1 - i}.upsample"
        prefixes |= {f"encoder.down_blocks.{i}.resnets.{j}": f"encoder.down.{i}.block.{j}" for j in range(layers)}
        prefixes |= {f"decoder.up_blocks.{i}.resnets.{j}": f"decoder.up.{levels - 1 - i}.block.{j}"
                     for j in range(layers + 1)}  # the decoder has one resnet more per level
    out = {}
    for key, value in state.items():
        head, rest = _longest_prefix(key, prefixes)
        leaf = ".".join(rest)
        if head.endswith("attentions.0"):
            layer, kind = leaf.rsplit(".", 1)
            leaf = f"{VAE_ATTENTION[layer]}.{kind}"
            value = value[:, :, None, None] if value.ndim == 2 else value  # linear here, 1x1 convolution there
        elif rest[0] == "conv_shortcut":
            leaf = ".".join(["nin_shortcut", *rest[1:]])
        out[VAE_PREFIX + f"{prefixes[head]}.{leaf}"] = value
    return out


def checkpoint_state(pipe: Any) -> dict[str, Tensor]:
    """Every weight of a UNet pipeline in the original layout, with the v-prediction marker keys."""
    family = pipeline_family(pipe)
    vae = pipe.vae.config
    state = unet_state(pipe.unet.state_dict(), pipe.unet.config)
    state |= vae_state(pipe.vae.state_dict(), len(vae.block_out_channels), vae.layers_per_block)
    state |= family.original_text_state(tuple(getattr(pipe, part.encoder) for part in family.text_parts))
    schedule = pipe.scheduler.config
    if schedule.get("prediction_type") == "v_prediction":
        state[V_PRED] = torch.tensor([])
        if schedule.get("rescale_betas_zero_snr"):
            state[ZTSNR] = torch.tensor([])
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def write_checkpoint(pipe: Any, out: Path, description: str) -> Path:
    """`pipe` as one original-layout `.safetensors` checkpoint at `out` (written to a temporary file and renamed),
    with the model spec a full checkpoint carries (sd-scripts' form: SGM implementation, no `/lora`; the base's
    native resolution, its UNet's sample size in pixels)."""
    from safetensors.torch import save_file

    family = pipeline_family(pipe)
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    resolution = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    metadata = webui.modelspec(family.modelspec_architecture, out.stem, resolution, webui.IMPLEMENTATION_SGM,
                               prediction, lora=False, description=description)
    state = checkpoint_state(pipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_file(out) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return out
