"""Loading a base: a diffusers folder or hub id, a single-file checkpoint (`single_file`), or a built-in tiny
base; frozen, only the parts a run needs, each part as the base's family says. Also a base's denoiser config
without its weights, and a denoiser built from a config (random weights or none, on `meta`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lora_dpo import hub
from lora_dpo.models.families import (
    FAMILIES,
    FAMILY_RECIPE_KEYS,
    KNOWN_BASES,
    TINY_BASES,
    Family,
    denoiser_family,
    family_named,
    family_of_base_name,
    family_of_denoiser,
    family_of_pipeline,
    recipe_key_owners,
)
from lora_dpo.models.parts import BaseModel, ModelError
from lora_dpo.models.single_file import (
    config_folder,
    is_single_file,
    load_single_file_parts,
    scheduler_overrides,
    single_file_denoiser_config,
    single_file_family,
    tokenizer_source,
)
from lora_dpo.models.tiny import resolve_base
from lora_dpo.recipe import ModelRecipe, RecipeError


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


def base_schedule(cfg: ModelRecipe) -> dict[str, Any]:
    """The noise schedule the recipe's base trains on, from its configs and header alone (no weights), as its
    family records it (`Family.trained_schedule`): what the adapter's metadata says it was trained with."""
    single = Path(cfg.base) if is_single_file(cfg.base) else None
    source = str(config_folder(single)) if single else resolve_base(cfg.base)
    family = recipe_base_family(cfg) or base_family(source, read_pipeline_json(source, "model_index.json",
                                                                                cfg.revision), cfg.revision)
    config = read_pipeline_json(source, "scheduler/scheduler_config.json", cfg.revision)
    return family.trained_schedule(family.recipe_overrides(cfg, config, scheduler_overrides(single) if single else {}))


def base_family(source: str, index: dict[str, Any], revision: str | None = None) -> Family:
    """The family of a pipeline folder or hub id: from its `model_index.json`'s parts, else (a folder without its
    text encoders) from its denoiser's config."""
    family = family_of_pipeline(index)
    if family is None and "unet" in index:
        family = family_of_denoiser(read_pipeline_json(source, "unet/config.json", revision))
    if family is None:
        raise ModelError(f"{source}: no known base family has this pipeline ({index.get('_class_name')}); lora-dpo "
                         f"trains {' and '.join(f.label for f in FAMILIES)} text-to-image pipelines")
    return family


def _unset(value: object) -> str:
    """How `--set` writes a key's default back: none, [], false."""
    return {None: "none", (): "[]", False: "false"}.get(value, repr(value))  # type: ignore[call-overload]


def refuse_foreign_keys(cfg: ModelRecipe, family: Family) -> None:
    """One line naming every `[model]` key set away from its default that `family` does not read (another family's
    own key: a DDPM schedule's on a flow-matching base, a flow schedule's on a UNet base), the families that read
    it, and how to unset it."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelRecipe)}
    found = [key for key in FAMILY_RECIPE_KEYS
             if key not in family.own_recipe_keys and getattr(cfg, key) != defaults[key]]
    if found:
        raise RecipeError("; ".join(
            f"[model].{key} = {_value(getattr(cfg, key))}: the base {cfg.base!r} is {family.label}, which does not "
            f"read it (a key of {_listed([f.label for f in recipe_key_owners(key)])} bases); remove it from the "
            f"recipe (--set model.{key}={_unset(defaults[key])})" for key in found))


def _listed(names: list[str]) -> str:
    """"A", "A and B", "A, B and C"."""
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def _value(value: object) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def recipe_base_family(cfg: ModelRecipe) -> Family | None:
    """The family of `[model].base` from what is on this machine, no download: a tiny base's or a known hub id's
    name, a single file's header, a local folder's `model_index.json`; None for another hub id (`load_base` then
    knows it once it has read that id's `model_index.json`, still before any weight)."""
    family = family_of_base_name(cfg.base)
    if family is None and is_single_file(cfg.base):
        family = single_file_family(Path(cfg.base))
    elif family is None and (Path(cfg.base) / "model_index.json").is_file():
        family = base_family(cfg.base, read_pipeline_json(cfg.base, "model_index.json"))
    return family


def check_recipe_keys(cfg: ModelRecipe) -> None:
    """`refuse_foreign_keys` for the base's family where it is known without a download (`recipe_base_family`):
    what `train`, `cache` and `plan` run before anything loads."""
    family = recipe_base_family(cfg)
    if family is not None:
        refuse_foreign_keys(cfg, family)


def load_base(cfg: ModelRecipe, *, with_encoders: bool = True, weight_dtype: torch.dtype = torch.float32,
              vae_dtype: torch.dtype = torch.float32, with_unet: bool = True) -> BaseModel:
    """Load the base pipeline's parts, frozen. `with_encoders=False` skips the VAE and text encoders (training
    from a latent cache); `with_unet=False` skips the UNet (writing a latent cache)."""
    import diffusers
    from diffusers import AutoencoderKL

    single = Path(cfg.base) if is_single_file(cfg.base) else None
    # a single file's configs (and the base's `source` from here on) are its local config folder
    source = str(config_folder(single)) if single else resolve_base(cfg.base)
    index = read_pipeline_json(source, "model_index.json", cfg.revision)
    family = family_of_pipeline(index)
    missing = [part for part in (family.denoiser_folder if family else "unet", "scheduler") if part not in index]
    if with_encoders:
        missing += [part for part in ("vae", "text_encoder", "tokenizer") if part not in index]
    if missing:
        raise ModelError(f"{source}: the pipeline has no {', '.join(missing)}; lora-dpo needs a text-to-image "
                         f"pipeline of {', '.join(f.label for f in FAMILIES)}")
    family = family or base_family(source, index, cfg.revision)
    refuse_foreign_keys(cfg, family)  # a hub id's family is known from here on, still before any weight
    common = {"revision": cfg.revision}
    online = not (hub.is_hub_id(source) or (cfg.vae and hub.is_hub_id(cfg.vae))) or hub.prepare()
    try:
        overrides = scheduler_overrides(single) if single else {}  # the file's v_pred / ztsnr keys
        # the scheduler's JSON (any scheduler class reads any config); the family builds the training scheduler
        config = diffusers.DDPMScheduler.load_config(source, subfolder="scheduler", **common)
        try:  # DDPM: prediction type and zero SNR; flow: the recipe's sampling, shift and guidance
            scheduler = family.training_scheduler(config, family.recipe_overrides(cfg, config, overrides))
        except (ModelError, ValueError) as err:
            raise ModelError(f"{source}: {err}") from None
        steps = scheduler.config.num_train_timesteps
        if any(t >= steps for t in cfg.timesteps):
            raise ModelError(f"[model].timesteps = {list(cfg.timesteps)}: this base's schedule has timesteps "
                             f"0..{steps - 1}; use values in that range (SDXL-Turbo: [249, 499, 749, 999])")
        if single:
            parts = load_single_file_parts(single, Path(source), family, with_unet=with_unet,
                                           with_encoders=with_encoders, vae=cfg.vae is None,
                                           weight_dtype=weight_dtype, vae_dtype=vae_dtype)
            base = BaseModel(source=source, unet=parts["unet"], noise_scheduler=scheduler, family=family,
                             train_timesteps=tuple(cfg.timesteps), scheduler_overrides=overrides)
            base.vae, base.text_encoders = parts["vae"], parts["text_encoders"]
            if with_encoders:
                if cfg.vae is not None:
                    base.vae = AutoencoderKL.from_pretrained(cfg.vae, torch_dtype=vae_dtype, **common)
                base.tokenizers = family.load_tokenizers(tokenizer_source(single, Path(source)))
        else:
            denoiser = getattr(diffusers, family.denoiser_class)
            unet = denoiser.from_pretrained(source, subfolder=family.denoiser_folder, variant=cfg.variant,
                                            torch_dtype=weight_dtype, **common) if with_unet else None
            base = BaseModel(source=source, unet=unet, noise_scheduler=scheduler, family=family,
                             train_timesteps=tuple(cfg.timesteps))
        if with_encoders and not single:
            vae_kwargs = {"subfolder": "vae", **common} if cfg.vae is None else {}
            vae_class = getattr(diffusers, family.vae_class)  # FLUX.2: its own VAE class
            base.vae = vae_class.from_pretrained(cfg.vae or source, torch_dtype=vae_dtype, **vae_kwargs)
            base.tokenizers, base.text_encoders = family.load_text_parts(source, variant=cfg.variant,
                                                                         torch_dtype=weight_dtype, **common)
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


def shipped_config(name: str, part: str) -> dict[str, Any]:
    """A shipped config of the family called `name` (`Family.shipped_config`)."""
    return family_named(name).shipped_config(part)


def unet_from_config(config: Mapping[str, Any], dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> Any:
    """A denoiser of its family's architecture from its config, with random weights (or no storage at all, on
    `meta`), built straight in `dtype`: no float32 copy on the way (10 GB for SDXL, more than a 12 GB card's
    budget)."""
    family = denoiser_family(config)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = family.denoiser_from_config(config)
    finally:
        torch.set_default_dtype(default)
    return unet.requires_grad_(False)


def base_denoiser_config(name: str, revision: str | None = None) -> dict[str, Any]:
    """A base's denoiser config without its weights (adapter formats need the architecture, not 5 GB): the shipped
    config for the well-known hub ids (offline), the built-in tiny bases' constant, else `unet/config.json` or
    (a transformer base: its `model_index.json` says) `transformer/config.json` of a local folder, a single file's
    config folder, or the hub's."""
    if name in KNOWN_BASES:
        return KNOWN_BASES[name].shipped_config(KNOWN_BASES[name].denoiser_folder)
    if name in TINY_BASES:  # a constant, as the planner reads it: never a build (minutes) just for the blocks
        return TINY_BASES[name].tiny_denoiser_config()
    if is_single_file(name):  # its config folder's, with what the file's weights fix (SD3.5 Large, FLUX schnell)
        return single_file_denoiser_config(Path(name))
    source, folder = (str(config_folder(Path(name))) if is_single_file(name) else resolve_base(name)), "unet"
    index_here = not Path(source).exists() or (Path(source) / "model_index.json").is_file()
    if not (Path(source) / folder).is_dir() and index_here:  # a transformer base, or a hub id: its model_index says
        family = family_of_pipeline(read_pipeline_json(source, "model_index.json", revision))
        folder = family.denoiser_folder if family else folder
    return read_pipeline_json(source, f"{folder}/config.json", revision)


