"""The frozen base (SDXL or SD 1.5), its LoRA adapters, the adapters-off reference, and the built-in tiny bases.

- `parts`: what a base is made of (`BaseModel`), dtype tables, shipped architectures, the encoders' and UNet's calls
- `lora`: LoRA on the frozen UNet, the adapters-off reference, the 4-bit (NF4) base
- `compiling`: [train].compile: the UNet's repeated blocks compiled (regional torch.compile), the compiler check
- `tiny`: the tiny SDXL / SD 1.5 bases the demo and the tests train on, built offline and cached
- `single_file`: single-file (original-layout) checkpoints: their architecture from their keys, a local config
  folder, their parts through diffusers' `from_single_file`
- `original`: a pipeline written as one original-layout checkpoint (the inverse of `single_file`'s reading),
  for `lora-dpo merge --format single-file`
- `load`: loading a base (a diffusers folder, a hub id, or `tiny` / `tiny-sd15`), frozen, only the parts a run needs
"""

from lora_dpo.files import cache_home
from lora_dpo.models.compiling import check_compiler, compile_blocks, compiled_graphs, compiler_missing
from lora_dpo.models.load import base_schedule, base_unet_config, load_base, read_pipeline_json
from lora_dpo.models.lora import adapters_disabled, add_lora, lora_config, lora_parameters, quantize_nf4
from lora_dpo.models.original import checkpoint_state, write_checkpoint
from lora_dpo.models.parts import (
    ARCHITECTURES,
    DTYPES,
    KNOWN_BASES,
    PREDICTION_TYPES,
    STORAGE_DTYPES,
    BaseModel,
    ModelError,
    encode_images,
    encode_prompts,
    is_sdxl_unet,
    pooled_dim,
    shipped_config,
    unet_forward,
    unet_from_config,
)
from lora_dpo.models.single_file import (
    config_folder,
    inference_scheduler,
    is_single_file,
    scheduler_overrides,
    single_file_arch,
    single_file_pipeline,
)
from lora_dpo.models.tiny import (
    TINY_BASES,
    TINY_FOLDERS,
    TINY_RESOLUTION,
    TINY_SCHEDULER,
    TINY_SD15_UNET,
    TINY_UNET,
    TINY_VAE,
    TinyArch,
    base_location,
    build_tiny_base,
    build_tiny_pipeline,
    resolve_base,
    tiny_base_path,
    tiny_text_config,
    tiny_tokenizer,
    tiny_unet_config,
    warm_up_tiny_base,
)

__all__ = [
    "ARCHITECTURES", "DTYPES", "KNOWN_BASES", "PREDICTION_TYPES", "STORAGE_DTYPES", "TINY_BASES", "TINY_FOLDERS",
    "TINY_RESOLUTION", "TINY_SCHEDULER", "TINY_SD15_UNET", "TINY_UNET", "TINY_VAE", "BaseModel", "ModelError",
    "TinyArch", "adapters_disabled", "add_lora", "base_location", "base_schedule", "base_unet_config",
    "build_tiny_base", "build_tiny_pipeline", "cache_home", "check_compiler", "checkpoint_state", "compile_blocks",
    "compiled_graphs", "compiler_missing", "config_folder", "encode_images",
    "encode_prompts", "inference_scheduler", "is_sdxl_unet", "is_single_file", "load_base", "lora_config",
    "lora_parameters", "pooled_dim", "quantize_nf4", "read_pipeline_json", "resolve_base", "scheduler_overrides",
    "shipped_config", "single_file_arch", "single_file_pipeline", "tiny_base_path", "tiny_text_config",
    "tiny_tokenizer", "tiny_unet_config", "unet_forward", "unet_from_config", "warm_up_tiny_base", "write_checkpoint",
]
