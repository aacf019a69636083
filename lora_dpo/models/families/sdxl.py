"""SDXL (Podell et al. 2023): a UNet2DConditionModel with text_time micro-conditioning, two CLIP text encoders
(ViT-L and OpenCLIP bigG), DDPM noise with epsilon or v-prediction targets. SDXL-Turbo is the same family (its few
timesteps are `[model].timesteps`).

Shapes: prompt embeddings (B, 77, 768 + 1280) are both encoders' penultimate hidden states concatenated; pooled
(B, 1280) the second encoder's projected output; geometry (B, 6) the micro-conditioning (original size, crop
top-left, target size), embedded by the UNet with the pooled text into `add_embedding`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lora_dpo import kohya, webui
from lora_dpo.models.families.clip import clip_state, openclip_state
from lora_dpo.models.families.family import DdpmFamily, TextPart, clip_outputs

# The tiny base's UNet (64 px images, 8x8 latents): text_time micro-conditioning (pooled text embeds + 6 time ids
# of 8 each), cross-attention on both tiny encoders' hidden states concatenated (2 x 32).
TINY_UNET: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2), use_linear_projection=True, cross_attention_dim=64,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
    norm_num_groups=16)


class Sdxl(DdpmFamily):
    name = "sdxl"
    label = "SDXL"
    tiny_base = "tiny"
    tiny_folder = "tiny-base-v5"
    # the demo's base, built once on a 2-core x86 CPU and shipped (models/tiny.py says why)
    tiny_shipped_sha256 = "20d9122b4359fdbb894ba29bf936fe4d613a403a92256d7d18aface0a965ca9a"
    tiny_unet = TINY_UNET
    pipeline_class = "StableDiffusionXLPipeline"
    cfg_doubles_batch = True  # do_classifier_free_guidance: guidance_scale > 1 (no time_cond_proj_dim)
    unwatermarked: Mapping[str, Any] = {"add_watermarker": False}
    hub_ids = ("stabilityai/stable-diffusion-xl-base-1.0",
               "stabilityai/sdxl-turbo")  # distilled: the same UNet and VAE, only its sampling differs
    licenses: Mapping[str, str] = {"stabilityai/stable-diffusion-xl-base-1.0": "openrail++"}
    default_resolution = 1024
    bench_resolutions = (1024, 512)
    text_parts = (TextPart("tokenizer", "text_encoder", "CLIPTextModel"),
                  TextPart("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"))
    uses_geometry = True

    # its original single-file layout: the second (OpenCLIP) encoder at embedders.1, the pooled/size embedding in
    # the UNet (`label_emb`); the first encoder's and the second's keys, each loaded alone
    checkpoint_markers = ("conditioner.embedders.1.", "model.diffusion_model.label_emb.")
    original_text_prefixes = ("conditioner.embedders.0.", "conditioner.embedders.1.")
    metadata_markers = ("stable-diffusion-xl", "sdxl")
    modelspec_architecture = "stable-diffusion-xl-v1-base"
    # sd-scripts trains SDXL on Stability's own UNet: its kohya files use SGM names (A1111 misses some
    # diffusers-named SDXL modules)
    kohya_implementation = webui.IMPLEMENTATION_SGM
    card_tags = ("stable-diffusion-xl",)
    card_note = ("On SDXL in fp16, use the fp16-safe VAE (`madebyollin/sdxl-vae-fp16-fix`) if images come out "
                 "black.")
    fp16_vae_advice = ('SDXL\'s VAE overflows in fp16; set [model].vae_dtype = "no" (or [model].vae = '
                       '"madebyollin/sdxl-vae-fp16-fix"), and prefer [train].mixed_precision = "bf16"')

    def owns_denoiser(self, config: Mapping[str, Any]) -> bool:
        """SDXL's UNet takes micro-conditioning (pooled text embeddings and six size/crop ids); SD 1.5's does
        not."""
        return config.get("addition_embed_type") == "text_time"

    def pooled_width(self, config: Mapping[str, Any]) -> int:
        """The added embedding's input is the pooled embedding plus six time ids of `addition_time_embed_dim`
        each."""
        return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]

    def encode_prompts(self, tokenizers: tuple[Any, ...], encoders: tuple[Any, ...], prompts: list[str],
                       device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Both encoders' penultimate hidden states (B, 77, D1 + D2), and the second's projected pooled output."""
        first, second = clip_outputs(tokenizers, encoders, prompts, device)
        return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second.text_embeds

    def denoise(self, denoiser: Any, noisy: Tensor, timesteps: Tensor, embeds: Tensor, pooled: Tensor | None,
                geometry: Tensor | None, schedule: Any = None) -> Tensor:
        added = {"text_embeds": pooled, "time_ids": geometry}
        return denoiser(noisy, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added).sample

    def kohya_module_name(self, module: str, config: Mapping[str, Any]) -> str:
        return kohya.PREFIX + kohya.to_sgm(module, kohya.sgm_prefixes(config)).replace(".", "_")

    def base_model_version(self, prediction_type: str) -> str:
        """`sdxl_base_v1-0` for any SDXL, whatever it predicts (sd-scripts' `train_network.py`)."""
        return "sdxl_base_v1-0"

    def original_text_state(self, encoders: tuple[Any, ...]) -> dict[str, Tensor]:
        """CLIP ViT-L under `conditioner.embedders.0.transformer.`, OpenCLIP bigG under
        `conditioner.embedders.1.model.` in OpenCLIP's names."""
        first, second = encoders
        return (clip_state(first.state_dict(), "conditioner.embedders.0.transformer.")
                | openclip_state(second.state_dict(), "conditioner.embedders.1.model."))


FAMILY = Sdxl()
