"""What a base model is made of, and what every floor above uses of it: the `BaseModel` parts, the dtype tables,
the prompts' and images' encoding. What differs between base families is the family's (`families`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lora_dpo.errors import LoraDpoError

if TYPE_CHECKING:
    from lora_dpo.models.families import Family

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # recipe precision -> weight dtype
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # file precision


class ModelError(LoraDpoError, RuntimeError):
    """A base model that cannot be loaded or used; the message names it and says what to do."""


@dataclass
class BaseModel:
    """The parts of a text-to-image pipeline that training needs, and its family (what its parts are and how they
    are called). Encoders and VAE are None when the data comes from a latent cache, so they never occupy
    memory."""

    source: str
    unet: Any
    noise_scheduler: Any
    family: Family
    vae: Any | None = None
    text_encoders: tuple[Any, ...] = ()
    tokenizers: tuple[Any, ...] = ()
    train_timesteps: tuple[int, ...] = ()  # [model].timesteps: the only timesteps training draws; (): all
    # what a single-file base's marker keys change in every scheduler built for it, sampling too (v_pred, ztsnr)
    scheduler_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.family.pipeline_class)


# --------------------------------------------------------------------------------------------------
# Encoding prompts and images


@torch.no_grad()
def encode_prompts(base: BaseModel, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Prompt embeddings (B, S, D) and pooled embeddings (B, P) or None, as the base family's pipeline makes them.
    No gradient: the encoders are frozen in training (`embed_prompts` is the same with gradients, for the tiny
    bases' build)."""
    return embed_prompts(base, prompts, device)


def embed_prompts(base: BaseModel, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """`encode_prompts` with gradients flowing into the text encoders: the tiny bases' build trains them."""
    return base.family.encode_prompts(base.tokenizers, base.text_encoders, prompts, device)


# Pixels per VAE call: one 1024 px image. The VAE's activations grow with the pixels of a call (SDXL: ~1.9 GiB
# for one 1024 px image, twice that for a pair), so an uncached step encodes its 2B images a megapixel at a time;
# small images still go in one call.
ENCODE_PIXELS = 1024 * 1024


@torch.no_grad()
def encode_images(vae: Any, pixels: Tensor, family: Any = None) -> Tensor:
    """Pixels in [-1, 1] (B, 3, H, W) -> scaled latents (B, C, H/8, W/8), `ENCODE_PIXELS` at a time. The posterior
    mean, not a sample: SDXL's posterior is near-deterministic, and the mean makes cached and live latents
    identical. Scaled as the base's family says (`Family.scale_latents`; None: shift and scaling factor)."""
    pixels = pixels.to(vae.device, vae.dtype)
    per_call = max(1, ENCODE_PIXELS // (pixels.shape[-2] * pixels.shape[-1]))
    latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pixels.split(per_call)])
    if family is not None:
        scaled = family.scale_latents(vae, latents)
    else:
        scaled = (latents - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor
    # contiguous: CPU convolutions may hand back a channels-last layout, and the UNet's backward then rounds
    # differently than for the same latents read from a cache
    return scaled.float().contiguous()
