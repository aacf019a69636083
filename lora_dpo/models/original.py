"""A diffusers SD 1.5 / SDXL pipeline written as one checkpoint in Stability's original (LDM / SGM) layout: the file
AUTOMATIC1111, Forge and ComfyUI's checkpoint loader open, and the inverse of the conversion diffusers'
`from_single_file` makes when it reads one (`single_file`).

The layout, part by part (the names diffusers' `scripts/convert_diffusers_to_original_sdxl.py` and
`convert_diffusers_to_original_stable_diffusion.py` write):
- UNet under `model.diffusion_model.`, in SGM module names (`kohya.sgm_prefixes`, derived from the UNet config,
  so any depth maps); a resnet's layers by position (`in_layers.0` norm, `in_layers.2` conv, `emb_layers.1`,
  `out_layers.0`, `out_layers.3`, `skip_connection`), `out.0` / `out.2` the final norm and convolution;
- VAE under `first_stage_model.`: `down.{i}.block.{j}`, `up.{levels-1-i}.block.{j}` (the decoder counts down),
  `mid.block_1/2`, `mid.attn_1` (q, k, v, proj_out as 1x1 convolutions), `norm_out`, `nin_shortcut`;
- CLIP ViT-L in transformers' names under `cond_stage_model.transformer.` (SD 1.5) or
  `conditioner.embedders.0.transformer.` (SDXL); SDXL's OpenCLIP bigG under `conditioner.embedders.1.model.` in
  OpenCLIP's names (q, k, v packed into `in_proj_*`, `text_projection` transposed);
- a v-prediction base gets ComfyUI's marker keys `v_pred` (and `ztsnr` with zero terminal SNR), empty tensors,
  as ComfyUI's own checkpoint save writes them, so the tools sample it as it was trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lora_dpo import files, kohya, webui
from lora_dpo.models.parts import ModelError
from lora_dpo.models.single_file import UNET_PREFIX, V_PRED, ZTSNR

VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = {"sd15": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPENCLIP_PREFIX = "conditioner.embedders.1.model."
RESNET_LDM = {**kohya.RESNET_SGM, "norm1": "in_layers.0", "norm2": "out_layers.0"}  # kohya's table + the norms
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn.out_proj": "attn.out_proj"}
OPENCLIP_FIXED = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
                  "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                  "text_model.final_layer_norm.weight": "ln_final.weight",
                  "text_model.final_layer_norm.bias": "ln_final.bias"}


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


def clip_state(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """CLIP ViT-L keeps transformers' own names in the original layout (under `text_model.`)."""
    return {prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in state.items()
            if "position_ids" not in k}


def openclip_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """SDXL's second encoder in OpenCLIP's names: q, k, v packed into one in_proj, the projection transposed."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in OPENCLIP_FIXED:
            out[OPENCLIP_FIXED[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            parts = key.split(".")
            stem, (layer, kind) = ".".join(parts[:4]), ".".join(parts[4:]).rsplit(".", 1)
            block = f"transformer.resblocks.{parts[3]}."
            if layer == "self_attn.q_proj":  # k and v are packed with it
                out[block + f"attn.in_proj_{kind}"] = torch.cat([state[f"{stem}.self_attn.{p}_proj.{kind}"]
                                                                 for p in "qkv"])
            elif layer not in ("self_attn.k_proj", "self_attn.v_proj"):
                out[block + f"{OPENCLIP_LAYER[layer]}.{kind}"] = value
    return {OPENCLIP_PREFIX + k: v for k, v in out.items()}


def checkpoint_state(pipe: Any) -> dict[str, Tensor]:
    """Every weight of an SD 1.5 / SDXL pipeline in the original layout, with the v-prediction marker keys."""
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    vae = pipe.vae.config
    state = unet_state(pipe.unet.state_dict(), pipe.unet.config)
    state |= vae_state(pipe.vae.state_dict(), len(vae.block_out_channels), vae.layers_per_block)
    state |= clip_state(pipe.text_encoder.state_dict(), CLIP_PREFIX["sdxl" if sdxl else "sd15"])
    if sdxl:
        state |= openclip_state(pipe.text_encoder_2.state_dict())
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

    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    resolution = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    metadata = webui.modelspec(sdxl, out.stem, resolution, webui.IMPLEMENTATION_SGM, prediction, lora=False,
                               description=description)
    state = checkpoint_state(pipe)
    out.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_file(out) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return out
