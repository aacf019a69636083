"""The frozen base, its LoRA adapters, the adapters-off reference, and the built-in tiny bases. What differs between
base families (SDXL, SD 1.5, ...) is each family's own module in `families`; the rest of this package, and every
floor above, asks the base's family.

Modules, in import order:
- `parts`: what a base is made of (`BaseModel`, its `family`), dtype tables, prompts and images encoded
- `families/`: one module per base family (`Family`: its parts, prompts, denoiser call, noise and target, file
  names), and the registry (`FAMILIES`, `family_named`, `family_of_pipeline`, `family_of_denoiser`, ...)
- `single_file`: single-file (original-layout) checkpoints: their family from their keys, a local config
  folder, their parts through diffusers' `from_single_file`
- `original`: a pipeline written as one original-layout checkpoint (the inverse of `single_file`'s reading),
  for `lora-dpo merge --format single-file`
- `tiny`: the tiny bases (one per family) the demo and the tests train on, built offline and cached
- `lora`: LoRA on the frozen UNet, the adapters-off reference, the 4-bit (NF4) base
- `compiling`: [train].compile: the UNet's repeated blocks compiled (regional torch.compile), the compiler check
- `load`: loading a base (a diffusers folder, a hub id, or a tiny base's name), frozen, only the parts a run
  needs; a base's denoiser config without weights; a denoiser built from a config
"""

from lora_dpo.files import cache_home
from lora_dpo.models.compiling import check_compiler, compile_blocks, compiled_graphs, compiler_missing
from lora_dpo.models.families import (
    DEFAULT_FAMILY,
    FAMILIES,
    KNOWN_BASES,
    TINY_BASES,
    Family,
    denoiser_family,
    family_named,
    family_of_base_name,
    family_of_checkpoint,
    family_of_denoiser,
    family_of_metadata,
    family_of_pipeline,
    pipeline_family,
)
from lora_dpo.models.load import (
    base_denoiser_config,
    base_family,
    base_schedule,
    check_recipe_keys,
    load_base,
    read_pipeline_json,
    recipe_base_family,
    refuse_foreign_keys,
    shipped_config,
    unet_from_config,
)
from lora_dpo.models.lora import (
    adapters_disabled,
    add_lora,
    eval_mode,
    lora_config,
    lora_parameters,
    lora_state_dict,
    quantize_nf4,
    target_modules,
)
from lora_dpo.models.original import checkpoint_state, write_checkpoint
from lora_dpo.models.parts import (
    DTYPES,
    STORAGE_DTYPES,
    BaseModel,
    ModelError,
    encode_images,
    encode_prompts,
)
from lora_dpo.models.single_file import (
    config_folder,
    inference_scheduler,
    is_single_file,
    scheduler_overrides,
    single_file_family,
    single_file_pipeline,
)
from lora_dpo.models.tiny import (
    TINY_RESOLUTION,
    TINY_SCHEDULER,
    TINY_VAE,
    base_location,
    build_tiny_base,
    build_tiny_pipeline,
    resolve_base,
    tiny_base_path,
    tiny_text_config,
    tiny_tokenizer,
    warm_up_tiny_base,
)

__all__ = [
    "DEFAULT_FAMILY", "DTYPES", "FAMILIES", "KNOWN_BASES", "STORAGE_DTYPES", "TINY_BASES", "TINY_RESOLUTION",
    "TINY_SCHEDULER", "TINY_VAE", "BaseModel", "Family", "ModelError", "adapters_disabled", "add_lora",
    "base_denoiser_config", "base_family", "base_location", "base_schedule", "build_tiny_base", "build_tiny_pipeline",
    "cache_home", "check_compiler", "check_recipe_keys", "checkpoint_state", "compile_blocks", "compiled_graphs",
    "compiler_missing", "config_folder", "denoiser_family", "encode_images", "encode_prompts", "eval_mode",
    "family_named", "family_of_base_name", "family_of_checkpoint", "family_of_denoiser", "family_of_metadata",
    "family_of_pipeline", "inference_scheduler", "is_single_file", "load_base", "lora_config", "lora_parameters",
    "lora_state_dict", "pipeline_family", "quantize_nf4", "read_pipeline_json", "recipe_base_family",
    "refuse_foreign_keys", "resolve_base", "scheduler_overrides", "shipped_config", "single_file_family",
    "single_file_pipeline", "target_modules", "tiny_base_path", "tiny_text_config", "tiny_tokenizer",
    "unet_from_config", "warm_up_tiny_base", "write_checkpoint"
]
