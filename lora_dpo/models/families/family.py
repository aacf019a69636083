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

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lora_dpo.models.parts import ModelError
from lora_dpo.webui import IMPLEMENTATION_DIFFUSERS, BaseSpec

CONFIGS = Path(__file__).parent.parent.parent / "configs"  # shipped configs of the real bases, one folder a family


class TextPart(NamedTuple):
    """One text encoder of a pipeline: its tokenizer's and its own subfolder, and its transformers class."""

    tokenizer: str  # `tokenizer`, `tokenizer_2`, ...
    encoder: str  # `text_encoder`, `text_encoder_2`, ...
    encoder_class: str  # `CLIPTextModel`, `CLIPTextModelWithProjection`, `T5EncoderModel`, ...
    tokenizer_class: str = "CLIPTokenizer"


class Family(ABC):
    """One base family. Subclasses set the class attributes and implement the methods; one instance per module."""

    name: str  # short id: the `configs/<name>` folder, bench / tiny-base `--arch`, metadata (`sdxl`, `sd15`, ...)
    label: str  # what people call it, in messages and cards ("SDXL", "SD 1.5", "SD3.5", "FLUX.1")
    tiny_base: str  # the built-in `[model].base` name of its tiny base (`tiny`, `tiny-sd15`, `tiny-sd3`, ...)
    pipeline_class: str  # the diffusers text-to-image pipeline (`StableDiffusionXLPipeline`, ...)
    denoiser_class: str  # the denoiser's diffusers class (`UNet2DConditionModel`, `SD3Transformer2DModel`, ...)
    denoiser_folder: str = "unet"  # its subfolder in a pipeline folder (`unet` or `transformer`)
    vae_class: str = "AutoencoderKL"  # its VAE's diffusers class (FLUX.2: `AutoencoderKLFlux2`)
    hub_ids: tuple[str, ...] = ()  # hub ids whose configs are exactly the shipped ones (known without a download)
    default_resolution: int = 1024
    bench_resolutions: tuple[int, ...] = (1024,)  # what `lora-dpo bench --arch <name>` measures by default
    flow_matching: bool = False  # rectified flow (x_t = (1 - s) x_0 + s noise, velocity target) vs DDPM
    text_parts: tuple[TextPart, ...] = ()  # its text encoders, in the order `encode_prompts` takes them
    pipeline_extras: Mapping[str, Any] = {}  # other arguments its pipeline class takes (SD 1.5: no safety checker)
    # its pipeline class's own arguments a base's model_index.json sets (FLUX.2 klein: is_distilled, no CFG then)
    pipeline_config_keys: tuple[str, ...] = ()
    unwatermarked: Mapping[str, Any] = {}  # what turns its pipeline's invisible watermark off (training grids)
    tiny_folder: str = ""  # its tiny base's cache folder (bump its version when the tiny weights change)
    tiny_shipped_sha256: str = ""  # set: the tiny base ships in `assets/<tiny_folder>` with this `folder_sha256`
    # the `[model]` keys of the recipe that only some families read, and this family's among them: a key another
    # family owns, set away from its default, is refused before anything loads (`models.refuse_foreign_keys`)
    own_recipe_keys: tuple[str, ...] = ()

    # ---- recognising a base ------------------------------------------------------------------------------
    @abstractmethod
    def owns_pipeline(self, model_index: Mapping[str, Any]) -> bool:
        """This family's pipeline, from `model_index.json` (its `_class_name` and parts)."""

    @abstractmethod
    def owns_denoiser(self, config: Mapping[str, Any]) -> bool:
        """This family's denoiser, from its config alone (`unet/config.json` or `transformer/config.json`)."""

    single_file_loadable: bool = True  # its original-layout files load (False: recognised, refused in one line)
    checkpoint_markers: tuple[str, ...] = ()  # key prefixes of its original-layout single files (`owns_checkpoint`)
    original_text_prefixes: tuple[str, ...] = ()  # each text encoder's key prefix in its original-layout files
    metadata_markers: tuple[str, ...] = ()  # what its adapters' `modelspec.architecture` / `ss_base_model_version` hold

    def owns_checkpoint(self, keys: Collection[str]) -> bool:
        """A single-file checkpoint of this family, from its key names: some key starts with a marker. The
        registry asks the families in `FAMILIES` order: a family whose markers also match another's files goes
        after it."""
        return bool(self.checkpoint_markers) and any(k.startswith(self.checkpoint_markers) for k in keys)

    def owns_metadata(self, text: str) -> bool:
        """An adapter's header (`modelspec.architecture` and `ss_base_model_version`, joined) names this family."""
        return any(marker in text for marker in self.metadata_markers)

    # ---- building and loading its parts ------------------------------------------------------------------
    def shipped_config(self, part: str) -> dict[str, Any]:
        """A shipped config of the real base (`configs/<name>/<part>.json`): unet / transformer, vae, scheduler,
        text (what the denoiser is fed: widths, token counts), text_encoder*."""
        return json.loads((CONFIGS / self.name / f"{part}.json").read_text())

    def denoiser_from_config(self, config: Mapping[str, Any]) -> Any:
        """The denoiser with random weights (under the caller's default dtype and device: `meta` builds no
        storage): its diffusers class (`denoiser_class`) from the config."""
        import diffusers

        return getattr(diffusers, self.denoiser_class).from_config(dict(config))

    def load_tokenizers(self, source: str, revision: str | None = None) -> tuple[Any, ...]:
        """Its tokenizers (`text_parts`) from a pipeline folder or hub id."""
        import transformers

        return tuple(getattr(transformers, part.tokenizer_class).from_pretrained(source, subfolder=part.tokenizer,
                                                                                 revision=revision)
                     for part in self.text_parts)

    def load_text_parts(self, source: str, **kwargs: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """(tokenizers, text encoders) of a pipeline folder or hub id (`text_parts`), the encoders frozen (eval, no
        gradients); kwargs as the encoders' `from_pretrained`'s (the tokenizers read its revision)."""
        import transformers

        tokenizers = self.load_tokenizers(source, kwargs.get("revision"))
        encoders = tuple(getattr(transformers, part.encoder_class).from_pretrained(source, subfolder=part.encoder,
                                                                                   **kwargs).eval().requires_grad_(False)
                         for part in self.text_parts)
        return tokenizers, encoders

    @abstractmethod
    def tiny_denoiser_config(self) -> dict[str, Any]:
        """Its tiny base's denoiser config (a copy), as a constant: the planner reads it without building."""

    def tiny_plan_parts(self) -> tuple[dict[str, Any], dict[str, Any], tuple[int, ...], int] | None:
        """What the planner needs of its tiny base besides the denoiser: (VAE config, scheduler config, text
        encoders' parameter counts, prompt tokens the denoiser reads); None: the UNet families' shared tiny parts
        (`models.tiny`)."""
        return None

    def build_pipeline(self, denoiser: Any, vae: Any, scheduler: Any, tokenizers: tuple[Any, ...],
                       encoders: tuple[Any, ...], **extra: Any) -> Any:
        """Its diffusers pipeline around parts already in memory (`extra`: other arguments of the class)."""
        import diffusers

        text = {}
        for part, tokenizer, encoder in zip(self.text_parts, tokenizers, encoders, strict=True):
            text |= {part.tokenizer: tokenizer, part.encoder: encoder}
        return getattr(diffusers, self.pipeline_class)(**{self.denoiser_folder: denoiser}, vae=vae,
                                                       scheduler=scheduler, **text, **self.pipeline_extras, **extra)

    def tiny_pipeline(self, seed: int) -> Any | None:
        """Its tiny base's pipeline with random weights, when the family builds its own (the flow families: T5
        encoders, 16-channel VAEs); None: `models.tiny.build_tiny_pipeline` builds it from the shared CLIP and VAE
        parts and `tiny_denoiser_config`."""
        return None

    tiny_warm_up: bool = True  # its tiny base is warmed up on the demo images (a DDPM warm-up; flow bases: cold)

    def lora_writer(self) -> Any:
        """The diffusers class whose `save_lora_weights` writes this family's adapter files: its pipeline's."""
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def original_text_state(self, encoders: tuple[Any, ...]) -> dict[str, Tensor]:
        """Its text encoders' weights under the original single-file layout's names (`lora-dpo merge --format
        single-file`)."""
        raise ModelError(f"{self.label}: no original single-file layout is known here; merge with --format "
                         "diffusers instead")

    def original_denoiser_config(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """What an original-layout file's own weights (key -> shape, from its header) fix of its denoiser's config,
        over the shipped one (a variant of the family: SD3.5 Large's depth, FLUX schnell's missing guidance
        embedding); {}: the shipped config as it is (the UNet families: diffusers reads theirs from the file)."""
        return {}

    def original_denoiser_state(self, checkpoint: Mapping[str, Tensor],
                                config: Mapping[str, Any]) -> dict[str, Tensor] | None:
        """The denoiser's weights of an original-layout file in diffusers' names when the family converts them
        itself (diffusers' converter cannot read every width of it); None: diffusers' `from_single_file` converts."""
        return None

    # ---- prompts and the denoiser's call -----------------------------------------------------------------
    @abstractmethod
    def encode_prompts(self, tokenizers: tuple[Any, ...], encoders: tuple[Any, ...], prompts: list[str],
                       device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Prompt embeddings (B, S, D) and pooled (B, P) or None, as the family's pipeline makes them. Gradients
        flow if the caller enables them (the tiny bases' build trains the encoders)."""

    @abstractmethod
    def denoise(self, denoiser: Any, noisy: Tensor, timesteps: Tensor, embeds: Tensor, pooled: Tensor | None,
                geometry: Tensor | None, schedule: Any = None) -> Tensor:
        """One denoiser call on noisy latents (B, C, h, w) -> the prediction (B, C, h, w) (a family that packs
        latents into tokens unpacks its output here). `schedule`: the training scheduler, for what else the
        denoiser is fed in training (FLUX dev: the recipe's guidance); None: the family's defaults."""

    prompt_tokens: int = 77  # S of the prompt embeddings (B, S, D) its encoders make: what `random_batch` fakes

    # Its pipeline's classifier-free guidance: True when the pipeline runs the denoiser on a doubled batch (the
    # empty prompt's prediction beside the prompt's) whenever guidance_scale > 1; False for a guidance-distilled
    # pipeline (FLUX dev: the scale is an input of one pass). Each family module sets it: what generating costs
    # (`lora-dpo plan` on an `[online]` recipe) depends on it.
    cfg_doubles_batch: bool

    def denoiser_passes(self, guidance_scale: float) -> int:
        """Images the denoiser runs per generated image per inference step of its pipeline: 2 under classifier-free
        guidance (guidance_scale > 1 and `cfg_doubles_batch`), else 1."""
        return 2 if self.cfg_doubles_batch and guidance_scale > 1 else 1

    def pipeline_guidance_scale(self) -> float:
        """Its pipeline's own default guidance_scale: what an unset `[online].guidance_scale` draws with (the online
        trainer reads the same default off the pipeline it built)."""
        import inspect

        import diffusers

        call = getattr(diffusers, self.pipeline_class).__call__
        return float(inspect.signature(call).parameters["guidance_scale"].default)

    def unpack_latents(self, latents: Tensor, height: int, width: int) -> Tensor:
        """Its pipeline's `output_type="latent"` output -> VAE latents (B, C, h, w) of a height x width image (a
        family whose pipeline returns packed tokens unpacks them here)."""
        return latents

    def scale_latents(self, vae: Any, latents: Tensor) -> Tensor:
        """The VAE posterior's mean (B, C, h, w) -> the latents training noises (B, C, h, w): (x - shift_factor)
        x scaling_factor (a VAE without a shift: 0). FLUX.2: its batch-norm statistics instead."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def decodable_latents(self, vae: Any, latents: Tensor, height: int, width: int) -> Tensor:
        """Its pipeline's `output_type="latent"` output for a height x width image -> what `vae.decode` takes
        (B, C, h, w): unpacked (`unpack_latents`), then the inverse of `scale_latents`."""
        latents = self.unpack_latents(latents, height, width).to(vae.device, vae.dtype)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return latents / vae.config.scaling_factor + shift

    def trainable_latents(self, vae: Any, latents: Tensor, height: int, width: int) -> Tensor:
        """Its pipeline's `output_type="latent"` output -> the latents the step trains on (B, C, h, w), as
        `scale_latents` makes them from an image: an online round trains on what the pipeline drew, never decoded
        and encoded again. The pipelines that return the denoiser's own latents: unpacked, exactly."""
        return self.unpack_latents(latents, height, width)

    @abstractmethod
    def recipe_overrides(self, cfg: Any, config: Mapping[str, Any],
                         file_overrides: Mapping[str, Any]) -> dict[str, Any]:
        """What `training_scheduler` is given: from the base's scheduler config, a single file's marker keys
        (`file_overrides`) and the recipe's [model] (`cfg`, a `ModelRecipe`). DDPM: the prediction type and zero
        terminal SNR; flow: the sampling density, shift and guidance."""

    def trained_schedule(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """What an adapter records of the noise schedule it trained on (`webui.base_stamp`: the model spec's
        `prediction_type`, zero terminal SNR), from `recipe_overrides`' answer."""
        return {"prediction_type": overrides["prediction_type"],
                "rescale_betas_zero_snr": overrides["rescale_betas_zero_snr"]}

    uses_geometry: bool = False  # SDXL: the denoiser reads the geometry (B, 6); others: never stored or passed

    def latent_channels(self, config: Mapping[str, Any]) -> int:
        """C of the latents (B, C, h, w) its denoiser takes, from the denoiser's config."""
        return config["in_channels"]

    def text_width(self, config: Mapping[str, Any]) -> int:
        """D of the prompt embeddings (B, S, D) its denoiser reads."""
        return config["cross_attention_dim"]

    def pooled_width(self, config: Mapping[str, Any]) -> int | None:
        """P of the pooled embedding (B, P) its denoiser reads; None: it reads none."""
        return None

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
    kohya_implementation: str = IMPLEMENTATION_DIFFUSERS  # whose module names `kohya_module_name` spells (model spec)
    kohya_format: bool = True  # False: no kohya / ComfyUI layout is known for it (export refuses --format kohya)

    @abstractmethod
    def base_model_version(self, prediction_type: str) -> str:
        """sd-scripts' `ss_base_model_version` for a base of this family."""

    def webui_spec(self, config: Mapping[str, Any] | None = None) -> BaseSpec:
        """What the webui header keys say of this family (`webui` itself decides nothing about families), for one
        denoiser config when given (FLUX dev vs schnell)."""
        architecture = self.modelspec_architecture if config is None else self.modelspec_architecture_for(config)
        return BaseSpec(architecture, self.kohya_implementation, self.default_resolution, self.base_model_version)

    def modelspec_architecture_for(self, config: Mapping[str, Any]) -> str:
        """`modelspec.architecture` (without `/lora`) of a base with this denoiser config."""
        return self.modelspec_architecture

    def fused_slice(self, module: str, config: Mapping[str, Any]) -> tuple[int, int, int] | None:
        """Where this diffusers module's output rows sit in the fused weight its kohya name stands for: (dim,
        offset, size); None: the module is a weight of its own in the file people load (every UNet family)."""
        return None

    def kohya_namer(self, config: Mapping[str, Any]) -> Callable[[str], str]:
        """`kohya_module_name` for one denoiser config."""
        return lambda module: self.kohya_module_name(module, config)

    card_tags: tuple[str, ...] = ()  # hub tags of a model card (`stable-diffusion-xl`, ...)
    card_note: str = ""  # a paragraph under a card's snippet (SDXL: its fp16-safe VAE)
    licenses: Mapping[str, str] = {}  # hub id -> its hub license id, for the cards of adapters trained on it
    fp16_vae_advice: str = ""  # what to set when its VAE overflows in fp16 ("" : nothing known)

    def __repr__(self) -> str:
        return f"<family {self.name}>"


# --------------------------------------------------------------------------------------------------
# What SDXL and SD 1.5 share: a UNet2DConditionModel noised on a DDPM schedule, CLIP text encoders


class DdpmFamily(Family):
    """A UNet2DConditionModel trained on a DDPM schedule (Ho et al. 2020): x_t = sqrt(a_t) x_0 + sqrt(1 - a_t)
    noise, with t uniform over the scheduler's training timesteps, and the noise (epsilon) or v = sqrt(a_t) noise -
    sqrt(1 - a_t) x_0 (Salimans & Ho 2022) as the target, as the base's scheduler says."""

    denoiser_class = "UNet2DConditionModel"
    denoiser_folder = "unet"
    prediction_types = ("epsilon", "v_prediction")  # what the step knows how to train (`target`)
    own_recipe_keys = ("timesteps", "rescale_betas_zero_snr")  # a DDPM schedule's: a distilled base's steps, zero SNR
    default_target_modules = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections (the recipe's default)
    tiny_unet: Mapping[str, Any]  # its tiny base's UNet config

    def owns_pipeline(self, model_index: Mapping[str, Any]) -> bool:
        """A UNet pipeline with exactly this family's text encoders (a part saved as [null, null] is absent)."""
        present = {key for key, value in model_index.items()
                   if key.startswith("text_encoder") and value and value[0] is not None}
        return "unet" in model_index and present == {part.encoder for part in self.text_parts}

    def tiny_denoiser_config(self) -> dict[str, Any]:
        return dict(self.tiny_unet)

    def recipe_overrides(self, cfg: Any, config: Mapping[str, Any],
                         file_overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The prediction type (the config's, or a single file's `v_pred`) and zero terminal SNR when the config,
        the file or the recipe asks."""
        zero_snr = bool(config.get("rescale_betas_zero_snr") or file_overrides.get("rescale_betas_zero_snr")
                        or cfg.rescale_betas_zero_snr)
        return {"prediction_type": file_overrides.get("prediction_type", config.get("prediction_type", "epsilon")),
                "rescale_betas_zero_snr": zero_snr}

    def lora_writer(self) -> Any:
        """Every UNet pipeline's `save_lora_weights` is this mixin's (`unet.` keys, one LoraConfig)."""
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        return StableDiffusionLoraLoaderMixin

    def training_scheduler(self, config: Mapping[str, Any], overrides: Mapping[str, Any]) -> Any:
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(config, **overrides)
        if scheduler.config.prediction_type not in self.prediction_types:
            raise ModelError(f"its scheduler predicts {scheduler.config.prediction_type!r}; lora-dpo trains bases "
                             f"that predict {' or '.join(self.prediction_types)}")
        return scheduler

    def sample_timesteps(self, scheduler: Any, count: int, generator: torch.Generator,
                         allowed: tuple[int, ...] = ()) -> Tensor:
        """Uniform over 0..T-1, or over `allowed` drawn as an index into it: one draw per pair either way, so the
        seeding does not depend on `allowed`."""
        steps = len(allowed) or scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (count,), generator=generator, device=generator.device)
        if allowed:
            timesteps = torch.tensor(allowed, device=timesteps.device)[timesteps]
        return timesteps

    def add_noise(self, scheduler: Any, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return scheduler.add_noise(latents, noise, timesteps)

    def target(self, scheduler: Any, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """epsilon: the noise; v_prediction: v. `training_scheduler` refused every other prediction type."""
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return scheduler.get_velocity(latents, noise, timesteps)
        raise ModelError(f"prediction type {kind!r}: lora-dpo trains {', '.join(self.prediction_types)}")


def clip_outputs(tokenizers: tuple[Any, ...], encoders: tuple[Any, ...], prompts: list[str],
                 device: torch.device) -> list[Any]:
    """Each CLIP text encoder's output on the prompts, padded to its tokenizer's length, all hidden states kept."""
    outputs = []
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        outputs.append(encoder(ids, output_hidden_states=True))
    return outputs
