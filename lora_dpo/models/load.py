"""Loading a base: a diffusers folder or hub id, a single-file checkpoint (`single_file`), or a built-in tiny
base; frozen, only the parts a run needs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lora_dpo import hub
from lora_dpo.models.parts import KNOWN_BASES, PREDICTION_TYPES, BaseModel, ModelError, shipped_config
from lora_dpo.models.single_file import (
    config_folder,
    is_single_file,
    load_single_file_parts,
    scheduler_overrides,
    tokenizer_source,
)
from lora_dpo.models.tiny import TINY_BASES, resolve_base, tiny_unet_config
from lora_dpo.recipe import ModelRecipe


def read_pipeline_json(source: str, filename: str, revision: str | None = None) -> dict[str, Any]:
    """A JSON file of a diffusers pipeline (`model_index.json`, `unet/config.json`) from a local folder or the
    hub, without downloading any weights."""
    if Path(source).exists():
        path = Path(source) / filename
        if not path.is_file():
            raise ModelError(f"{source}: not a diffusers pipeline folder (no {filename})")
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    online = not hub.is_hub_id(source) or hub.prepare()
    try:
        return json.loads(Path(hf_hub_download(source, filename, revision=revision)).read_text())
    except Exception as err:
        if not online:
            raise hub.unavailable(source, "the base pipeline") from None
        raise ModelError(f"{source}: cannot read {filename} from the hub ({type(err).__name__}); "
                         "check the id, your network, or pass a local diffusers folder") from None


def training_schedule(config: dict[str, Any], cfg: ModelRecipe, overrides: dict[str, Any]) -> dict[str, Any]:
    """The training scheduler's prediction type and zero-SNR setting: the base's scheduler config, then a
    single file's marker keys (`overrides`); zero terminal SNR when the config, the file or the recipe asks."""
    zero_snr = bool(config.get("rescale_betas_zero_snr") or overrides.get("rescale_betas_zero_snr")
                    or cfg.rescale_betas_zero_snr)
    return {"prediction_type": overrides.get("prediction_type", config.get("prediction_type", "epsilon")),
            "rescale_betas_zero_snr": zero_snr}


def base_schedule(cfg: ModelRecipe) -> dict[str, Any]:
    """`training_schedule` of the recipe's base from its configs and header alone (no weights): what the adapter's
    metadata says it was trained with."""
    single = Path(cfg.base) if is_single_file(cfg.base) else None
    source = str(config_folder(single)) if single else resolve_base(cfg.base)
    config = read_pipeline_json(source, "scheduler/scheduler_config.json", cfg.revision)
    return training_schedule(config, cfg, scheduler_overrides(single) if single else {})


def load_base(cfg: ModelRecipe, *, with_encoders: bool = True, weight_dtype: torch.dtype = torch.float32,
              vae_dtype: torch.dtype = torch.float32, with_unet: bool = True) -> BaseModel:
    """Load the base pipeline's parts, frozen. `with_encoders=False` skips the VAE and text encoders (training
    from a latent cache); `with_unet=False` skips the UNet (writing a latent cache)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    single = Path(cfg.base) if is_single_file(cfg.base) else None
    # a single file's configs (and the base's `source` from here on) are its local config folder
    source = str(config_folder(single)) if single else resolve_base(cfg.base)
    index = read_pipeline_json(source, "model_index.json", cfg.revision)
    missing = [part for part in ("unet", "scheduler") if part not in index]
    if with_encoders:
        missing += [part for part in ("vae", "text_encoder", "tokenizer") if part not in index]
    if missing:
        raise ModelError(f"{source}: the pipeline has no {', '.join(missing)}; lora-dpo needs an SD 1.5 or "
                         "SDXL text-to-image pipeline")
    is_sdxl = "text_encoder_2" in index and index.get("text_encoder_2") != [None, None]
    common = {"revision": cfg.revision}
    online = not (hub.is_hub_id(source) or (cfg.vae and hub.is_hub_id(cfg.vae))) or hub.prepare()
    try:
        overrides = scheduler_overrides(single) if single else {}  # the file's v_pred / ztsnr keys
        config = DDPMScheduler.load_config(source, subfolder="scheduler", **common)
        scheduler = DDPMScheduler.from_config(config, **training_schedule(config, cfg, overrides))
        if scheduler.config.prediction_type not in PREDICTION_TYPES:
            raise ModelError(f"{source}: its scheduler predicts {scheduler.config.prediction_type!r}; lora-dpo "
                             f"trains bases that predict {' or '.join(PREDICTION_TYPES)}")
        steps = scheduler.config.num_train_timesteps
        if any(t >= steps for t in cfg.timesteps):
            raise ModelError(f"[model].timesteps = {list(cfg.timesteps)}: this base's schedule has timesteps "
                             f"0..{steps - 1}; use values in that range (SDXL-Turbo: [249, 499, 749, 999])")
        if single:
            parts = load_single_file_parts(single, Path(source), is_sdxl, with_unet=with_unet,
                                           with_encoders=with_encoders, vae=cfg.vae is None,
                                           weight_dtype=weight_dtype, vae_dtype=vae_dtype)
            base = BaseModel(source=source, unet=parts["unet"], noise_scheduler=scheduler, is_sdxl=is_sdxl,
                             train_timesteps=tuple(cfg.timesteps), scheduler_overrides=overrides)
            base.vae, base.text_encoders = parts["vae"], parts["text_encoders"]
            if with_encoders:
                if cfg.vae is not None:
                    base.vae = AutoencoderKL.from_pretrained(cfg.vae, torch_dtype=vae_dtype, **common)
                where = tokenizer_source(single, Path(source))
                base.tokenizers = tuple(CLIPTokenizer.from_pretrained(where, subfolder=f"tokenizer{n}")
                                        for n in (("", "_2") if is_sdxl else ("",)))
        else:
            unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=cfg.variant,
                                                        torch_dtype=weight_dtype, **common) if with_unet else None
            base = BaseModel(source=source, unet=unet, noise_scheduler=scheduler, is_sdxl=is_sdxl,
                             train_timesteps=tuple(cfg.timesteps))
        if with_encoders and not single:
            vae_kwargs = {"subfolder": "vae", **common} if cfg.vae is None else {}
            base.vae = AutoencoderKL.from_pretrained(cfg.vae or source, torch_dtype=vae_dtype, **vae_kwargs)
            names = ("", "_2") if is_sdxl else ("",)
            encoders = (CLIPTextModel, CLIPTextModelWithProjection)
            base.tokenizers = tuple(CLIPTokenizer.from_pretrained(source, subfolder=f"tokenizer{n}", **common)
                                    for n in names)
            base.text_encoders = tuple(
                cls.from_pretrained(source, subfolder=f"text_encoder{n}", variant=cfg.variant,
                                    torch_dtype=weight_dtype, **common)
                for cls, n in zip(encoders, names, strict=False))
    except (OSError, ValueError) as err:
        if not online:
            raise hub.unavailable(cfg.vae if cfg.vae and hub.is_hub_id(cfg.vae) else source,
                                  "the base pipeline") from None
        raise ModelError(f"{source}: cannot load the base pipeline: {str(err).splitlines()[0]}") from None
    for module in (base.unet, base.vae, *base.text_encoders):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return base


def base_unet_config(name: str, revision: str | None = None) -> dict[str, Any]:
    """A base's UNet config without its weights (adapter formats need the architecture, not 5 GB): the shipped
    config for the well-known hub ids (offline), the built-in tiny bases' constant, `unet/config.json` of a local
    folder, or the hub's."""
    if name in KNOWN_BASES:
        return shipped_config(KNOWN_BASES[name], "unet")
    if name in TINY_BASES:  # a constant, as the planner reads it: never a build (minutes) just for the blocks
        return tiny_unet_config(TINY_BASES[name])
    if is_single_file(name):
        return read_pipeline_json(str(config_folder(Path(name))), "unet/config.json")
    return read_pipeline_json(resolve_base(name), "unet/config.json", revision)


