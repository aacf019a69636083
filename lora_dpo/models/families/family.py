"""What a base family is: everything that differs between SDXL, SD 1.5, SD3 and FLUX, behind one interface.

A family is one module in this package (`sdxl.py`, `sd15.py`, ...) holding one `Family` instance. Nothing outside
this package names a family (`tests/test_architecture.py` checks it): the step, the planner, the cache, export and
the CLI ask the base's family. Tensor shapes: B pairs (or images), C latent channels, h x w latent size, S text
tokens, D text width, P pooled width.

The batch the step sees is the same for every family (`step.EncodedBatch`): latents (B, C, h, w), prompt
embeddings (B, S, D), pooled (B, P) or None, per-image geometry (B, 6) or None (SDXL's micro-conditioning: original
size, crop top-left, target size, as the data transform computed it), labels. What a denoiser makes of them, how
noise is added and what is predicted is the family's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

CONFIGS = Path(__file__).parent.parent.parent / "configs"  # shipped configs of the real bases, one folder a family


class Family(ABC):
    """One base family. Subclasses set the class attributes and implement the methods; one instance per module."""

    name: str  # short id: the `configs/<name>` folder, bench / tiny-base `--arch`, metadata (`sdxl`, `sd15`, ...)
    label: str  # what people call it, in messages and cards ("SDXL", "SD 1.5", "SD3.5", "FLUX.1")
    tiny_base: str  # the built-in `[model].base` name of its tiny base (`tiny`, `tiny-sd15`, `tiny-sd3`, ...)
    pipeline_class: str  # the diffusers text-to-image pipeline (`StableDiffusionXLPipeline`, ...)
    denoiser_class: str  # the denoiser's diffusers class (`UNet2DConditionModel`, `SD3Transformer2DModel`, ...)
    denoiser_folder: str = "unet"  # its subfolder in a pipeline folder (`unet` or `transformer`)
    hub_ids: tuple[str, ...] = ()  # hub ids whose configs are exactly the shipped ones (known without a download)
    default_resolution: int = 1024
    flow_matching: bool = False  # rectified flow (x_t = (1 - s) x_0 + s noise, velocity target) vs DDPM

    # ---- recognising a base ------------------------------------------------------------------------------
    @abstractmethod
    def owns_pipeline(self, model_index: Mapping[str, Any]) -> bool:
        """This family's pipeline, from `model_index.json` (its `_class_name` and parts)."""

    @abstractmethod
    def owns_denoiser(self, config: Mapping[str, Any]) -> bool:
        """This family's denoiser, from its config alone (`unet/config.json` or `transformer/config.json`)."""

    # ---- building and loading its parts ------------------------------------------------------------------
    def shipped_config(self, part: str) -> dict[str, Any]:
        """A shipped config of the real base (`configs/<name>/<part>.json`): unet / transformer, vae, scheduler,
        text (what the denoiser is fed: widths, token counts), text_encoder*."""
        import json

        return json.loads((CONFIGS / self.name / f"{part}.json").read_text())

    @abstractmethod
    def denoiser_from_config(self, config: Mapping[str, Any]) -> Any:
        """The denoiser with random weights (under the caller's default dtype and device: `meta` builds no
        storage)."""

    @abstractmethod
    def load_text_parts(self, source: str, **kwargs: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """(tokenizers, text encoders) of a pipeline folder or hub id, frozen; kwargs as `from_pretrained`'s."""

    @abstractmethod
    def tiny_denoiser_config(self) -> dict[str, Any]:
        """Its tiny base's denoiser config (a copy), as a constant: the planner reads it without building."""

    # ---- prompts and the denoiser's call -----------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, tokenizers: tuple[Any, ...], encoders: tuple[Any, ...], prompts: list[str],
                       device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Prompt embeddings (B, S, D) and pooled (B, P) or None, as the family's pipeline makes them. Gradients
        flow if the caller enables them (the tiny bases' build trains the encoders)."""

    @abstractmethod
    def denoise(self, denoiser: Any, noisy: Tensor, timesteps: Tensor, embeds: Tensor, pooled: Tensor | None,
                geometry: Tensor | None) -> Tensor:
        """One denoiser call on noisy latents (B, C, h, w) -> the prediction (B, C, h, w) (a family that packs
        latents into tokens unpacks its output here)."""

    uses_geometry: bool = False  # SDXL: the denoiser reads the geometry (B, 6); others: never stored or passed

    # ---- noise, timesteps and the target -----------------------------------------------------------------
    @abstractmethod
    def training_scheduler(self, config: Mapping[str, Any], overrides: Mapping[str, Any]) -> Any:
        """The scheduler training noises with, from the base's scheduler config and what the recipe or a single
        file's marker keys set (`overrides`)."""

    @abstractmethod
    def sample_timesteps(self, scheduler: Any, count: int, generator: torch.Generator,
                         allowed: tuple[int, ...] = ()) -> Tensor:
        """`count` training timesteps (count,), drawn from `generator` on its device (no host sync). `allowed`:
        the only timesteps to draw (a distilled base's few; DDPM families only)."""

    @abstractmethod
    def add_noise(self, scheduler: Any, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The noisy latents x_t (B, C, h, w)."""

    @abstractmethod
    def target(self, scheduler: Any, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """What the denoiser is trained to predict (B, C, h, w): noise, v, or the velocity noise - x_0."""

    # ---- LoRA and the files people load ------------------------------------------------------------------
    default_target_modules: tuple[str, ...] = ()  # [lora].target_modules when the recipe leaves it unset

    @abstractmethod
    def kohya_module_name(self, module: str, config: Mapping[str, Any]) -> str:
        """The module's name in the file A1111 / Forge / ComfyUI load (kohya `lora_unet_...`, without
        `.lora_down.weight`): SDXL in SGM spelling, SD 1.x in diffusers spelling, ..."""

    modelspec_architecture: str  # Stability model spec (`stable-diffusion-xl-v1-base`); `/lora` appended for LoRAs

    @abstractmethod
    def base_model_version(self, prediction_type: str) -> str:
        """sd-scripts' `ss_base_model_version` for a base of this family."""

    card_tags: tuple[str, ...] = ()  # hub tags of a model card (`stable-diffusion-xl`, ...)
    fp16_vae_advice: str = ""  # what to set when its VAE overflows in fp16 ("" : nothing known)

    def __repr__(self) -> str:
        return f"<family {self.name}>"
