"""What a base model is made of, and what every floor above uses of it: the `BaseModel` parts, the dtype tables,
the shipped architectures (configs of the real bases, to build them with random weights or on the meta device),
and the encoders' and UNet's calls as the pipelines make them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lora_dpo.errors import LoraDpoError

PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the step knows how to train (`step._target`)
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # recipe precision -> weight dtype
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # file precision


class ModelError(LoraDpoError, RuntimeError):
    """A base model that cannot be loaded or used; the message names it and says what to do."""


@dataclass
class BaseModel:
    """The parts of a Stable Diffusion pipeline that training needs. Encoders and VAE are None when the
    data comes from a latent cache, so they never occupy memory."""

    source: str
    unet: Any
    noise_scheduler: Any
    is_sdxl: bool
    vae: Any | None = None
    text_encoders: tuple[Any, ...] = ()
    tokenizers: tuple[Any, ...] = ()
    train_timesteps: tuple[int, ...] = ()  # [model].timesteps: the only timesteps training draws; (): all
    # what a single-file base's marker keys change in every scheduler built for it, sampling too (v_pred, ztsnr)
    scheduler_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def pipeline_class(self) -> type:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline if self.is_sdxl else StableDiffusionPipeline


def is_sdxl_unet(config: Mapping[str, Any]) -> bool:
    """SDXL's UNet takes micro-conditioning (pooled text embeddings and six size/crop ids); SD 1.5's does not."""
    return config.get("addition_embed_type") == "text_time"


def pooled_dim(config: Mapping[str, Any]) -> int:
    """Width of SDXL's pooled text embedding, from its UNet config: the added embedding's input is the pooled
    embedding plus six time ids of `addition_time_embed_dim` each."""
    return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]


# --------------------------------------------------------------------------------------------------
# Shipped architectures: configs of the real bases, to build them with random weights or on the meta device
# (benchmarks and memory plans need the architecture, not the 7 GB of weights)

CONFIGS = Path(__file__).parent.parent / "configs"
ARCHITECTURES = ("sdxl", "sd15")
# Hub ids whose UNet is exactly a shipped architecture: their config is known without a download.
KNOWN_BASES = {"stabilityai/stable-diffusion-xl-base-1.0": "sdxl", "stabilityai/sdxl-turbo": "sdxl",
               "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15", "runwayml/stable-diffusion-v1-5": "sd15"}


def shipped_config(arch: str, part: str) -> dict[str, Any]:
    """`part` is unet, vae, scheduler, or text (what the UNet is fed: hidden sizes, pooled dim)."""
    if arch not in ARCHITECTURES:
        raise ModelError(f"architecture {arch!r} is not shipped; known: {', '.join(ARCHITECTURES)}")
    return json.loads((CONFIGS / arch / f"{part}.json").read_text())


def unet_from_config(arch: str | dict[str, Any], dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> Any:
    """The real base's UNet architecture (a shipped name, or a UNet config) with random weights (or no storage
    at all, on `meta`), built straight in `dtype`: no float32 copy on the way (10 GB for SDXL, more than a 12 GB
    card's budget)."""
    from diffusers import UNet2DConditionModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(shipped_config(arch, "unet") if isinstance(arch, str) else arch)
    finally:
        torch.set_default_dtype(default)
    return unet.requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# Encoding prompts and images


@torch.no_grad()
def encode_prompts(base: BaseModel, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Prompt embeddings (B, 77, D) and, for SDXL, pooled embeddings (B, P), as the pipelines make them:
    SDXL concatenates both encoders' penultimate hidden states; SD 1.5 uses the last. No gradient: the
    encoders are frozen in training (`embed_prompts` is the same with gradients, for the tiny bases' build)."""
    return embed_prompts(base, prompts, device)


def embed_prompts(base: BaseModel, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """`encode_prompts` with gradients flowing into the text encoders: the tiny bases' build trains them."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(base.tokenizers, base.text_encoders, strict=True):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2] if base.is_sdxl else out.last_hidden_state)
        if base.is_sdxl and encoder is base.text_encoders[-1]:
            pooled = out.text_embeds  # the second encoder's projected pooled output
    return torch.cat(hidden, dim=-1), pooled


# Pixels per VAE call: one 1024 px image. The VAE's activations grow with the pixels of a call (SDXL: ~1.9 GiB
# for one 1024 px image, twice that for a pair), so an uncached step encodes its 2B images a megapixel at a time;
# small images still go in one call.
ENCODE_PIXELS = 1024 * 1024


@torch.no_grad()
def encode_images(vae: Any, pixels: Tensor) -> Tensor:
    """Pixels in [-1, 1] (B, 3, H, W) -> scaled latents (B, C, H/8, W/8), `ENCODE_PIXELS` at a time. The posterior
    mean, not a sample: SDXL's posterior is near-deterministic, and the mean makes cached and live latents
    identical."""
    pixels = pixels.to(vae.device, vae.dtype)
    per_call = max(1, ENCODE_PIXELS // (pixels.shape[-2] * pixels.shape[-1]))
    latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(per_call)])
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    # contiguous: CPU convolutions may hand back a channels-last layout, and the UNet's backward then rounds
    # differently than for the same latents read from a cache
    return ((latents - shift) * vae.config.scaling_factor).float().contiguous()


def unet_forward(base_unet: Any, noisy: Tensor, timesteps: Tensor, prompt_embeds: Tensor,
                 pooled: Tensor | None, time_ids: Tensor | None) -> Tensor:
    """One UNet call, with SDXL's micro-conditioning when the UNet takes it."""
    added = None
    if pooled is not None:
        added = {"text_embeds": pooled, "time_ids": time_ids}
    return base_unet(noisy, timesteps, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added).sample


