"""SD 1.5 (and 1.4; Rombach et al. 2022): a UNet2DConditionModel without micro-conditioning, one CLIP ViT-L text
encoder, DDPM noise with epsilon or v-prediction targets.

Shapes: prompt embeddings (B, 77, 768) are the encoder's last hidden state; no pooled embedding, no geometry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lora_dpo import kohya, webui
from lora_dpo.models.families.clip import clip_state
from lora_dpo.models.families.family import DdpmFamily, TextPart, clip_outputs

# The tiny base's UNet (64 px images, 8x8 latents): the tiny SDXL one's blocks without the addition embedding;
# cross-attention reads the one encoder's last hidden state, so its width is that encoder's hidden size (32).
TINY_UNET: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2), use_linear_projection=True, cross_attention_dim=32, norm_num_groups=16)


class Sd15(DdpmFamily):
    name = "sd15"
    label = "SD 1.5"
    tiny_base = "tiny-sd15"
    tiny_folder = "tiny-sd15-v4"
    tiny_unet = TINY_UNET
    pipeline_class = "StableDiffusionPipeline"
    cfg_doubles_batch = True  # do_classifier_free_guidance: guidance_scale > 1
    # a training base: no safety checker, as the diffusers folders lora-dpo writes
    pipeline_extras: Mapping[str, Any] = {"safety_checker": None, "feature_extractor": None,
                                          "requires_safety_checker": False}
    hub_ids = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5",
               "CompVis/stable-diffusion-v1-4")
    licenses: Mapping[str, str] = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
                                   "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m"}
    default_resolution = 512
    bench_resolutions = (512,)
    text_parts = (TextPart("tokenizer", "text_encoder", "CLIPTextModel"),)

    # every original-layout checkpoint keeps its UNet under model.diffusion_model.: SD 1.x is the one a file is
    # when no family listed before it in FAMILIES claims it
    checkpoint_markers = ("model.diffusion_model.",)
    original_text_prefixes = ("cond_stage_model.",)
    metadata_markers = ("stable-diffusion-v1", "sd_v1")
    modelspec_architecture = "stable-diffusion-v1"
    # sd-scripts trains SD 1.x on the diffusers UNet: its kohya files keep diffusers names
    kohya_implementation = webui.IMPLEMENTATION_DIFFUSERS
    card_tags = ("stable-diffusion",)

    def owns_denoiser(self, config: Mapping[str, Any]) -> bool:
        """A UNet2DConditionModel without micro-conditioning."""
        same_class = config.get("_class_name", self.denoiser_class) == self.denoiser_class
        return same_class and config.get("addition_embed_type") is None

    def encode_prompts(self, tokenizers: tuple[Any, ...], encoders: tuple[Any, ...], prompts: list[str],
                       device: torch.device) -> tuple[Tensor, Tensor | None]:
        """The encoder's last hidden state (B, 77, D); no pooled embedding."""
        (out,) = clip_outputs(tokenizers, encoders, prompts, device)
        return out.last_hidden_state, None

    def denoise(self, denoiser: Any, noisy: Tensor, timesteps: Tensor, embeds: Tensor, pooled: Tensor | None,
                geometry: Tensor | None, schedule: Any = None) -> Tensor:
        return denoiser(noisy, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=None).sample

    def kohya_module_name(self, module: str, config: Mapping[str, Any]) -> str:
        return kohya.PREFIX + module.replace(".", "_")

    def base_model_version(self, prediction_type: str) -> str:
        """`sd_v1`, or v-parameterized `sd_v1_v` (sd-scripts' `model_util.get_model_version_str_for_sd1_sd2`)."""
        return "sd_v1_v" if webui.MODELSPEC_PREDICTION.get(prediction_type, prediction_type) == "v" else "sd_v1"

    def original_text_state(self, encoders: tuple[Any, ...]) -> dict[str, Tensor]:
        """CLIP ViT-L under `cond_stage_model.transformer.`."""
        (encoder,) = encoders
        return clip_state(encoder.state_dict(), "cond_stage_model.transformer.")


FAMILY = Sd15()
