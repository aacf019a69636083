"""Base families: one module each (`family` is the interface every one implements). Nothing outside this package
names a family; code asks a base's family (`family_of_pipeline`, `family_of_denoiser`, `family_named`).

Modules, in import order: `family` (the `Family` interface and `DdpmFamily`, what the UNet families share),
`clip` (CLIP encoders in the original single-file layout), `flow` (the rectified-flow math SD3, FLUX.1 and FLUX.2
klein share), `sdxl`, `sd15`, `sd3`, `flux`, `flux2`; this registry last.

A new family: one module here with one `Family` instance, its configs in `configs/<name>/`, its entry in
`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from lora_dpo.models.families import flux, flux2, sd3, sd15, sdxl
from lora_dpo.models.families.family import CONFIGS, DdpmFamily, Family, TextPart
from lora_dpo.models.parts import ModelError

# Every family, in the order they are asked: a family whose single files, pipelines or configs another one's would
# also match comes after that one (FLUX.2 before FLUX.1: its single files hold `double_blocks.` too, and its configs
# FLUX.1's class-less keys; SD 1.x, whose files every original-layout checkpoint resembles and whose `owns_denoiser`
# takes any config without `_class_name` and micro-conditioning, the tiny transformers' too, last).
FAMILIES: tuple[Family, ...] = (sdxl.FAMILY, sd3.FAMILY, flux2.FAMILY, flux.FAMILY, sd15.FAMILY)
DEFAULT_FAMILY = sdxl.FAMILY  # what `bench` and the GPU check run when nothing names a base
TINY_BASES: dict[str, Family] = {family.tiny_base: family for family in FAMILIES}  # `[model].base` -> its family
KNOWN_BASES: dict[str, Family] = {hub_id: family for family in FAMILIES for hub_id in family.hub_ids}


def family_named(name: str) -> Family:
    """The family called `name` (`Family.name`), or a one-line error listing the known ones."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ModelError(f"architecture {name!r} is not known; known: {', '.join(f.name for f in FAMILIES)}")


def family_of_pipeline(model_index: Mapping[str, Any]) -> Family | None:
    """The family of a pipeline (its `model_index.json`, or a loaded pipeline's `config`), None if none owns it."""
    return next((family for family in FAMILIES if family.owns_pipeline(model_index)), None)


def pipeline_family(pipe: Any) -> Family:
    """The family of a loaded diffusers pipeline (from its components), or a one-line error."""
    family = family_of_pipeline(pipe.config)
    if family is None:
        raise ModelError(f"{type(pipe).__name__}: no known base family has this pipeline (known: "
                         f"{', '.join(f.label for f in FAMILIES)})")
    return family


def family_of_denoiser(config: Mapping[str, Any]) -> Family | None:
    """The family of a denoiser from its config alone, None if none owns it."""
    return next((family for family in FAMILIES if family.owns_denoiser(config)), None)


def denoiser_family(config: Mapping[str, Any]) -> Family:
    """`family_of_denoiser`, or a one-line error."""
    family = family_of_denoiser(config)
    if family is None:
        raise ModelError(f"a {config.get('_class_name', 'denoiser')} config that no known base family has (known: "
                         f"{', '.join(f.label for f in FAMILIES)}); pass a base of one of them")
    return family


def family_of_checkpoint(keys: Collection[str]) -> Family | None:
    """The family of an original-layout single-file checkpoint from its key names, None if none owns it."""
    return next((family for family in FAMILIES if family.owns_checkpoint(keys)), None)


def family_of_metadata(text: str) -> Family | None:
    """The family an adapter's header names (`modelspec.architecture` and `ss_base_model_version`), or None."""
    return next((family for family in FAMILIES if family.owns_metadata(text)), None)


def recipe_key_owners(key: str) -> tuple[Family, ...]:
    """The families that read the `[model]` key `key` among the keys only some read (`Family.own_recipe_keys`)."""
    return tuple(family for family in FAMILIES if key in family.own_recipe_keys)


# every `[model]` key that only some families read, in the order the families list them
FAMILY_RECIPE_KEYS: tuple[str, ...] = tuple(dict.fromkeys(k for family in FAMILIES for k in family.own_recipe_keys))


def family_of_base_name(name: str) -> Family | None:
    """The family of a built-in tiny base or a known hub id, from the name alone (no config read), or None."""
    return TINY_BASES.get(name) or KNOWN_BASES.get(name)


__all__ = ["CONFIGS", "DEFAULT_FAMILY", "FAMILIES", "FAMILY_RECIPE_KEYS", "KNOWN_BASES", "TINY_BASES", "DdpmFamily",
           "Family", "TextPart", "denoiser_family", "family_named", "family_of_base_name", "family_of_checkpoint",
           "family_of_denoiser", "family_of_metadata", "family_of_pipeline", "pipeline_family", "recipe_key_owners"]
