"""The architecture of the recipe's base, from configs only: the UNet, VAE and scheduler configs and the text
encoders' sizes, for the tiny bases (constants), the known hub ids (configs shipped with lora-dpo, each family's
`hub_ids`), or a local folder / hub id whose JSON configs are read (KBs, no weights).

Imports nothing of the planner.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_dpo import hub, models
from lora_dpo.recipe import ModelRecipe


@dataclass(frozen=True)
class Architecture:
    """What the plan needs of a base: UNet, VAE and scheduler configs, and the text encoders' sizes."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    encoder_params: tuple[int, ...]
    max_length: int = 77

    @property
    def family(self) -> models.Family:
        """The base family its denoiser config says."""
        return models.denoiser_family(self.unet)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae["block_out_channels"]) - 1)


def architecture(model: ModelRecipe) -> Architecture:
    """The base's architecture, once its family has refused the `[model]` keys it does not read (known from the
    name, header or folder first: before any config is read)."""
    models.check_recipe_keys(model)
    arch = _architecture(model)
    models.refuse_foreign_keys(model, arch.family)
    return arch


def _architecture(model: ModelRecipe) -> Architecture:
    """A tiny base (constants), a known hub id (shipped configs), a single-file checkpoint (its config folder), or a
    local folder / hub id whose configs are read (KBs only)."""
    if model.base in models.TINY_BASES:
        import transformers

        family = models.TINY_BASES[model.base]
        parts = family.tiny_plan_parts()
        if parts is not None:  # a family with tiny parts of its own (a 16-channel VAE, a T5, a flow scheduler)
            vae, scheduler, params, tokens = parts
            return Architecture(model.base, family.tiny_denoiser_config(), vae, scheduler, params, tokens)
        config = transformers.CLIPTextConfig(**models.tiny_text_config())
        params = tuple(_count_params(lambda part=part: getattr(transformers, part.encoder_class)(config))
                       for part in family.text_parts)
        return Architecture(model.base, family.tiny_denoiser_config(), dict(models.TINY_VAE),
                            dict(models.TINY_SCHEDULER), params)
    if model.base in models.KNOWN_BASES:
        family = models.KNOWN_BASES[model.base]
        text = family.shipped_config("text")
        return Architecture(family.name, family.shipped_config(family.denoiser_folder), family.shipped_config("vae"),
                            family.shipped_config("scheduler"), tuple(text["encoder_params"]), text["max_length"])
    if models.is_single_file(model.base):  # its configs: the local config folder (shipped or beside the file)
        folder = str(models.config_folder(Path(model.base)))
        return dataclasses.replace(_read_architecture(dataclasses.replace(model, base=folder)), name=model.base,
                                   unet=models.base_denoiser_config(model.base))
    return _read_architecture(model)


def _count_params(build: Callable[[], torch.nn.Module]) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def _read_architecture(model: ModelRecipe) -> Architecture:
    def read(source: str, part: str, needed: bool = True) -> dict[str, Any] | None:
        online = True
        try:
            if Path(source).exists():
                return json.loads((Path(source) / part).read_text())
            from huggingface_hub import hf_hub_download

            online = hub.prepare()  # offline: the local cache may still hold it
            return json.loads(Path(hf_hub_download(source, part, revision=model.revision)).read_text())
        except Exception as err:
            if not needed:
                return None
            if not online:
                raise hub.unavailable(source, f"the base's {part}") from None
            known = ", ".join([*models.TINY_BASES, *models.KNOWN_BASES])
            raise models.ModelError(
                f"[model].base = {source!r}: cannot read {part} ({type(err).__name__}); the plan needs a local "
                f"diffusers folder, a reachable hub id, or one it knows: {known}") from None

    import transformers

    index = read(model.base, "model_index.json", needed=False) or {}
    unet = models.base_denoiser_config(model.base, model.revision)  # `unet` or (its index says) `transformer`
    vae = read(model.vae, "config.json") if model.vae else read(model.base, "vae/config.json")
    family = models.family_of_pipeline(index) or models.family_of_denoiser(unet)
    # the text encoders its index lists (a part saved as [null, null] is absent), else its family's
    folders = sorted(k for k, v in index.items() if k.startswith("text_encoder") and v and v[0] is not None)
    folders = folders or ([part.encoder for part in family.text_parts] if family else [])
    encoders = [read(model.base, f"{name}/config.json", needed=False) for name in folders]
    params = tuple(
        _count_params(lambda c=c: getattr(transformers, c["architectures"][0])(transformers.AutoConfig.for_model(**c)))
        for c in encoders if c)
    tokens = family.shipped_config("text")["max_length"] if family else 77  # what its pipeline pads prompts to
    return Architecture(model.base, unet, vae, read(model.base, "scheduler/scheduler_config.json"), params, tokens)
