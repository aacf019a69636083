"""SD3 / SD3.5 (MMDiT, rectified flow): `StableDiffusion3Pipeline`, `SD3Transformer2DModel`, three text encoders
(CLIP-L and OpenCLIP bigG with projections, T5-XXL), a 16-channel VAE with shift and scaling factors.

Where the numbers come from:
- configs/sd3/transformer.json (SD3.5 Medium): SD3 Medium's transformer config as published in
  stabilityai/stable-diffusion-3-medium-diffusers (24 layers, 24 heads of 64, caption_projection_dim 1536,
  joint_attention_dim 4096, pooled_projection_dim 2048, patch 2, 16 channels) with SD3.5 Medium's changes as
  diffusers' scripts/convert_sd3_to_diffusers.py (L296-320) derives them: qk_norm "rms_norm", pos_embed_max_size 384
  ("sd3.5 2b use pos_embed_max_size=384"), dual_attention_layers 0..12 (the class's own comment,
  diffusers/models/transformers/transformer_sd3.py L133-135).
- configs/sd3/vae.json: SDXL's VAE config with latent_channels 16, no quant convs, scaling_factor 1.5305,
  shift_factor 0.0609 (convert_sd3_to_diffusers.py L329-339).
- configs/sd3/scheduler.json: FlowMatchEulerDiscreteScheduler, num_train_timesteps 1000, shift 3.0 (the hub
  folder's scheduler config; the SD3 paper's shift for 1024 px, Esser et al. 2024 Sec. 5.3.2).
- text encoders: CLIP-L and bigG are SDXL's (configs/sdxl), here both `CLIPTextModelWithProjection`; T5 v1.1 XXL
  (google/t5-v1_1-xxl: d_model 4096, d_ff 10240, 64 heads of 64, 24 layers, vocab 32128, gated GELU).
- encode_prompts: `StableDiffusion3Pipeline.encode_prompt` (diffusers 0.42.1 pipeline_stable_diffusion_3.py
  L233-287 T5, L289-342 CLIP, L450-464 the concatenation); T5 max_sequence_length 256 is that method's default
  (the DreamBooth example trains at 77, --max_sequence_length).
- denoise: the pipeline's transformer call (L1074-1081) and the example's (train_dreambooth_lora_sd3.py L1800-1806):
  `timestep` = sigma * 1000, the scheduler's own timesteps.
- LoRA targets: train_dreambooth_lora_sd3.py L1250-1260 (attention of both streams; SD3.5's attn2 not included).
- kohya names and metadata: sd-scripts (github.com/kohya-ss/sd-scripts @48d368f) networks/lora_sd3.py L231-236
  (`lora_unet` prefix "make ComfyUI compatible", SAI MMDiT module names with "." -> "_"),
  library/sai_model_spec.py L74, L202-203 (architecture "stable-diffusion-3-" + model type), library/sd3_utils.py
  L53-60 (model type "5-medium" / "5-large" / "medium"), sd3_train_network.py L144 (that model type is
  ss_base_model_version).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lora_dpo.models.families.family import TextPart, clip_outputs
from lora_dpo.models.families.flow import (
    FlowFamily,
    tiny_flow_vae,
    tiny_t5_config,
    tiny_t5_tokenizer,
)
from lora_dpo.webui import BaseSpec

# The tiny base's transformer: SD3.5-style (qk RMS norm, a dual-attention first block), 2 blocks of 2 heads x 16.
# joint_attention_dim: the T5's width (64), which CLIP-L + CLIP-G hidden states (32 + 32) are padded to;
# pooled_projection_dim: both CLIPs' projections (32 + 32); caption_projection_dim must equal heads x head dim.
TINY_SD3_TRANSFORMER: dict[str, Any] = dict(
    sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
    pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
TINY_SD3_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0)
TINY_SD3_VAE_FACTORS = (1.5305, 0.0609)  # SD3's scaling and shift factors (the tiny VAE is not calibrated)

# diffusers module name (in one joint block) -> the SAI MMDiT name sd-scripts and ComfyUI use
_BLOCK_NAMES = {
    "attn.to_q": "x_block.attn.qkv", "attn.to_k": "x_block.attn.qkv", "attn.to_v": "x_block.attn.qkv",
    "attn.add_q_proj": "context_block.attn.qkv", "attn.add_k_proj": "context_block.attn.qkv",
    "attn.add_v_proj": "context_block.attn.qkv", "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj", "attn2.to_q": "x_block.attn2.qkv", "attn2.to_k": "x_block.attn2.qkv",
    "attn2.to_v": "x_block.attn2.qkv", "attn2.to_out.0": "x_block.attn2.proj", "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2", "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2", "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
}
_QKV = {"to_q": 0, "to_k": 1, "to_v": 2, "add_q_proj": 0, "add_k_proj": 1, "add_v_proj": 2}


class SD3Family(FlowFamily):
    name = "sd3"
    label = "SD3.5"
    tiny_base = "tiny-sd3"
    tiny_folder = "tiny-sd3-v1"  # random weights, not warmed up (`tiny_warm_up`)
    tiny_warm_up = False
    pipeline_class = "StableDiffusion3Pipeline"
    cfg_doubles_batch = True  # do_classifier_free_guidance: guidance_scale > 1
    denoiser_class = "SD3Transformer2DModel"
    hub_ids = ("stabilityai/stable-diffusion-3.5-medium",)
    # its MMDiT's joint blocks in Stability's single files (sd3.5_medium.safetensors; ComfyUI's `SD3` model detection)
    checkpoint_markers = ("model.diffusion_model.joint_blocks.",)
    # CLIP-L, CLIP-G and T5-XXL in the files that carry them (SAI's *_incl_clips_t5xxl*; diffusers' single_file_utils
    # reads these prefixes); SAI's sd3.5_medium / _large files have none
    original_text_prefixes = ("text_encoders.clip_l.", "text_encoders.clip_g.", "text_encoders.t5xxl.")
    metadata_markers = ("stable-diffusion-3", "5-medium", "5-large")  # modelspec.architecture, ss_base_model_version
    text_parts = (TextPart("tokenizer", "text_encoder", "CLIPTextModelWithProjection"),
                  TextPart("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"),
                  TextPart("tokenizer_3", "text_encoder_3", "T5EncoderModel", "T5TokenizerFast"))
    default_resolution = 1024
    max_sequence_length = 256  # T5 tokens (StableDiffusion3Pipeline.encode_prompt's default)
    prompt_tokens = 77 + max_sequence_length  # CLIP's 77 then T5's (`encode_prompts`): 333
    default_target_modules = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                              "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
    modelspec_architecture = "stable-diffusion-3-5-medium"
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"
    kohya_implementation = modelspec_implementation  # BFL / SAI module names in the kohya file
    card_tags = ("sd3.5", "sd3.5-diffusers")
    denoiser_keys = ("caption_projection_dim", "pooled_projection_dim", "joint_attention_dim")
    tiny_transformer = TINY_SD3_TRANSFORMER
    tiny_builder = "build_tiny_sd3_pipeline"

    def original_denoiser_config(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """The MMDiT's size from its weights, as sd-scripts' sd3_utils.analyze_state_dict_state and diffusers'
        convert_sd3_to_diffusers.py read it: blocks = joint blocks, hidden = x_embedder rows (64 x depth), heads of
        the qk-norm width (64 without qk norm), pos_embed_max_size = sqrt(pos_embed tokens), dual-attention layers
        = blocks with `x_block.attn2`. SD3.5 Large (38 x 64, no attn2, 192) and Medium (24 x 64, attn2 in 0..12,
        384) load offline from the one shipped config."""
        sizes = {k.removeprefix("model.diffusion_model."): v for k, v in shapes.items()}
        blocks = {int(k.split(".")[1]) for k in sizes if k.startswith("joint_blocks.")}
        if not blocks or "x_embedder.proj.weight" not in sizes:
            return {}
        hidden, channels, patch = sizes["x_embedder.proj.weight"][:3]
        norm = sizes.get("joint_blocks.0.x_block.attn.ln_q.weight")
        head = norm[0] if norm else 64
        return {"num_layers": max(blocks) + 1, "attention_head_dim": head, "num_attention_heads": hidden // head,
                "caption_projection_dim": hidden, "in_channels": channels, "patch_size": patch,
                "out_channels": sizes["final_layer.linear.weight"][0] // (patch * patch),
                "joint_attention_dim": sizes["context_embedder.weight"][1],
                "pooled_projection_dim": sizes["y_embedder.mlp.0.weight"][1],
                "pos_embed_max_size": math.isqrt(sizes["pos_embed"][1]), "qk_norm": "rms_norm" if norm else None,
                "dual_attention_layers": tuple(sorted(i for i in blocks if f"joint_blocks.{i}.x_block.attn2.qkv.weight"
                                                      in sizes))}

    # ---- prompts and the denoiser ------------------------------------------------------------------------
    def encode_prompts(self, tokenizers: tuple[Any, ...], encoders: tuple[Any, ...], prompts: list[str],
                       device: torch.device) -> tuple[Tensor, Tensor]:
        """(B, 77 + T, D_t5) and pooled (B, P_l + P_g), as `StableDiffusion3Pipeline.encode_prompt`: each CLIP's
        penultimate hidden state (B, 77, D_l) and (B, 77, D_g) concatenated on width, zero-padded to T5's width
        D_t5, then the CLIP tokens and the T5 tokens (B, T, D_t5) concatenated on tokens; pooled = both CLIPs'
        projected pooled outputs concatenated."""
        outputs = clip_outputs(tokenizers[:2], encoders[:2], prompts, device)
        clip = torch.cat([out.hidden_states[-2].to(encoders[0].dtype) for out in outputs], dim=-1)
        pooled = [out[0] for out in outputs]  # text_embeds: the projected pooled outputs
        ids = tokenizers[2](prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids.to(device)
        t5 = encoders[2](ids)[0].to(encoders[2].dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    def denoise(self, denoiser: Any, noisy: Tensor, timesteps: Tensor, embeds: Tensor, pooled: Tensor | None,
                geometry: Tensor | None, schedule: Any = None) -> Tensor:
        """The velocity (B, 16, h, w) at timesteps sigma * 1000 (B,): the transformer patchifies itself."""
        return denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds,
                        pooled_projections=pooled, return_dict=False)[0]

    # ---- the files people load ---------------------------------------------------------------------------
    def _native(self, module: str) -> str:
        match = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", module.removeprefix("transformer."))
        if not match or match.group(2) not in _BLOCK_NAMES:
            raise ValueError(f"{self.label}: no kohya / ComfyUI name known for module {module!r}")
        return f"joint_blocks.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"

    def kohya_module_name(self, module: str, config: Mapping[str, Any]) -> str:
        """`lora_unet_joint_blocks_<i>_<SAI name>` as sd-scripts' lora_sd3 names it and ComfyUI maps it (its
        `lora_unet_` + the checkpoint's `diffusion_model.` key): to_q, to_k and to_v all land in the one fused
        `x_block_attn_qkv` (see `fused_slice`). The last block's `norm1_context.linear` has none here: its original
        weight stores (shift, scale), diffusers' (scale, shift) (ComfyUI's `swap_scale_shift`)."""
        last = config.get("num_layers", 0) - 1
        if module.removeprefix("transformer.") == f"transformer_blocks.{last}.norm1_context.linear":
            raise ValueError(f"{self.label}: no kohya / ComfyUI name for module {module!r} (its halves are swapped "
                             "in the original layout)")
        return "lora_unet_" + self._native(module).replace(".", "_")

    def fused_slice(self, module: str, config: Mapping[str, Any]) -> tuple[int, int, int] | None:
        """Where this diffusers module's output rows sit in the fused SAI weight: (dim, offset, size), as ComfyUI's
        `mmdit_to_diffusers` offsets (q at 0, k at H, v at 2H, H = heads x head dim); None if not fused. Exporting
        to kohya format stacks the three LoRAs: down = cat(A_q, A_k, A_v) (3r rows), up = block-diagonal."""
        last = module.rsplit(".", 1)[-1]
        if last not in _QKV:
            return None
        width = config["num_attention_heads"] * config["attention_head_dim"]
        return 0, _QKV[last] * width, width

    def model_type(self, config: Mapping[str, Any]) -> str:
        """sd-scripts' model type of an SD3 transformer config: "5-medium" (qk norm, dual attention), "5-large"
        (qk norm only), "medium" (SD3 Medium), as library/sd3_utils.py L53-60 reads the checkpoint."""
        if config.get("qk_norm"):
            return "5-medium" if config.get("dual_attention_layers") else "5-large"
        return "medium"

    def modelspec_architecture_for(self, config: Mapping[str, Any]) -> str:
        """`modelspec.architecture` (without `/lora`) for this transformer config (sai_model_spec L202-203)."""
        return "stable-diffusion-3-" + self.model_type(config)

    def base_model_version(self, prediction_type: str) -> str:
        """ss_base_model_version of the shipped base (SD3.5 Medium); `webui_spec(config)` answers for another SD3."""
        return "5-medium"

    def webui_spec(self, config: Mapping[str, Any] | None = None) -> BaseSpec:
        """For one transformer config, its own model type as sd-scripts' `ss_base_model_version` too (sd-scripts
        writes the model type it reads from the weights, sd3_train_network.py L144): SD3.5 Large (38 layers, qk
        norm, no dual-attention layer) says "5-large", not the shipped Medium's "5-medium"."""
        spec = super().webui_spec(config)
        if config is None:
            return spec
        model_type = self.model_type(config)
        return dataclasses.replace(spec, version=lambda prediction_type: model_type)


FAMILY = SD3Family()


def build_tiny_sd3_pipeline(seed: int = 0) -> Any:
    """A tiny `StableDiffusion3Pipeline` with random weights, offline: the tiny transformer, a 16-channel VAE
    (64 px -> 8 x 8 latents -> 4 x 4 patches), tiny CLIP-L / CLIP-G (`CLIPTextModelWithProjection`, the demo
    tokenizer) and a tiny T5 (its tokenizer built in code), the flow scheduler with SD3's shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from lora_dpo.models.tiny import tiny_text_config, tiny_tokenizer

    torch.manual_seed(seed)
    clip_tokenizer, t5_tokenizer = tiny_tokenizer(), tiny_t5_tokenizer(SD3Family.max_sequence_length)
    clip = CLIPTextConfig(**tiny_text_config(len(clip_tokenizer)))
    transformer = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER)
    vae = tiny_flow_vae(*TINY_SD3_VAE_FACTORS)
    t5 = T5EncoderModel(T5Config(**tiny_t5_config(len(t5_tokenizer), TINY_SD3_TRANSFORMER["joint_attention_dim"])))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**TINY_SD3_SCHEDULER), vae=vae,
        text_encoder=CLIPTextModelWithProjection(clip), tokenizer=clip_tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(clip), tokenizer_2=tiny_tokenizer(),
        text_encoder_3=t5, tokenizer_3=t5_tokenizer)
