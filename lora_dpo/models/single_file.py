"""Single-file bases: one `.safetensors` checkpoint in Stability's original layout (what AUTOMATIC1111 and
ComfyUI load and civitai hands out; sd-scripts and OneTrainer train on them), read through diffusers'
`from_single_file` with a local config folder, so no hub access is needed for the architecture.

The config folder is a diffusers pipeline layout without weights (`model_index.json`, `unet/config.json`, ...):
the folder the file sits in when it has a `model_index.json` (how a custom or tiny architecture is given), else
one written from the configs shipped with lora-dpo for the architecture the file's keys show (SDXL or SD 1.5).
The shipped configs carry no tokenizer vocabulary: with the shipped folder the tokenizers come from the
architecture's hub repo (cached after the first time); a UNet-only load (training from a latent cache) never
needs them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lora_dpo.files import cache_home
from lora_dpo.models.parts import ModelError, shipped_config

SUFFIX = ".safetensors"  # pickled .ckpt files can run code when loaded: not read
UNET_PREFIX = "model.diffusion_model."  # every original-layout checkpoint keeps its UNet here
# SDXL has a second (OpenCLIP bigG) text encoder at embedders.1 and a pooled/size embedding in its UNet.
SDXL_MARKERS = ("conditioner.embedders.1.", UNET_PREFIX + "label_emb.")
# Where the tokenizers of a shipped-config folder come from (the vocabulary is not shipped).
TOKENIZER_REPOS = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
                   "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd15": "StableDiffusionPipeline"}


def is_single_file(name: str) -> bool:
    """`[model].base` names one checkpoint file rather than a diffusers folder or hub id."""
    return name.endswith(SUFFIX) and Path(name).is_file()


def _keys(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as err:
        raise ModelError(f"[model].base = {str(path)!r}: not a readable safetensors file ({err})") from None


def single_file_arch(path: Path) -> str:
    """`sdxl` or `sd15`, from the checkpoint's key names alone (its header: no tensor is read)."""
    keys = _keys(path)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ModelError(f"[model].base = {str(path)!r}: no {UNET_PREFIX}* keys: not a Stable Diffusion checkpoint "
                         "in the original single-file layout (an adapter, a lone UNet or VAE?); pass a full "
                         "checkpoint or a diffusers folder")
    if any(k.startswith(SDXL_MARKERS) for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):  # OpenCLIP-H alone: SD 2.x
        raise ModelError(f"[model].base = {str(path)!r}: an SD 2.x checkpoint; lora-dpo trains SDXL and SD 1.5")
    return "sd15"


def shipped_config_folder(arch: str) -> Path:
    """A diffusers config folder (no weights, no tokenizers) written once from the shipped configs."""
    folder = cache_home() / "single-file-configs" / arch
    if (folder / "model_index.json").is_file():
        return folder
    unet, vae, scheduler = (shipped_config(arch, part) for part in ("unet", "vae", "scheduler"))
    encoders = {"text_encoder": shipped_config(arch, "text_encoder")}
    if arch == "sdxl":
        encoders["text_encoder_2"] = shipped_config(arch, "text_encoder_2")
    index: dict[str, Any] = {"_class_name": PIPELINES[arch], "unet": ["diffusers", "UNet2DConditionModel"],
                             "vae": ["diffusers", "AutoencoderKL"],
                             "scheduler": ["diffusers", scheduler["_class_name"]]}
    files = {"unet/config.json": unet, "vae/config.json": vae, "scheduler/scheduler_config.json": scheduler}
    for name, config in encoders.items():
        index[name] = ["transformers", config["architectures"][0]]
        index["tokenizer" + name.removeprefix("text_encoder")] = ["transformers", "CLIPTokenizer"]
        files[f"{name}/config.json"] = {"model_type": "clip_text_model", **config}
    for relative, content in {**files, "model_index.json": index}.items():  # the index last: it marks "done"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(json.dumps(content, indent=1))
    return folder


def config_folder(path: Path) -> Path:
    """The diffusers config folder for a single-file base: its own folder when that holds a `model_index.json`
    (a custom architecture), else the shipped one for the architecture its keys show."""
    if (path.parent / "model_index.json").is_file():
        return path.parent
    return shipped_config_folder(single_file_arch(path))


def tokenizer_source(path: Path, folder: Path) -> str:
    """Where the tokenizers load from: the config folder when it has them, else the architecture's hub repo
    (with the shipped configs there is no vocabulary on disk)."""
    if (folder / "tokenizer").is_dir():
        return str(folder)
    return TOKENIZER_REPOS[single_file_arch(path)]


def load_single_file_parts(path: Path, folder: Path, is_sdxl: bool, *, with_unet: bool, with_encoders: bool,
                           vae: bool, weight_dtype: torch.dtype, vae_dtype: torch.dtype) -> dict[str, Any]:
    """The UNet, VAE and text encoders from the checkpoint (diffusers converts the original layout), each
    configured by `folder`: {"unet", "vae", "text_encoders"} (absent parts are None or ())."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    common = {"config": str(folder), "local_files_only": True}
    parts: dict[str, Any] = {"unet": None, "vae": None, "text_encoders": ()}
    if with_unet:
        parts["unet"] = UNet2DConditionModel.from_single_file(str(path), subfolder="unet", torch_dtype=weight_dtype,
                                                              **common)
    if not with_encoders:
        return parts
    if vae:
        parts["vae"] = AutoencoderKL.from_single_file(str(path), subfolder="vae", torch_dtype=vae_dtype, **common)
    checkpoint = load_single_file_checkpoint(str(path))  # read once for both text encoders
    names = ("", "_2") if is_sdxl else ("",)
    # Each encoder sees only its own keys: diffusers picks the source by key names and width, and when both
    # encoders have the same width (a small custom base) it would fill the second one from embedders.0.
    others = ("conditioner.embedders.1.", "conditioner.embedders.0.")
    parts["text_encoders"] = tuple(
        create_diffusers_clip_model_from_ldm(cls, {k: v for k, v in checkpoint.items() if not k.startswith(skip)},
                                             subfolder=f"text_encoder{n}", torch_dtype=weight_dtype, **common)
        for cls, n, skip in zip((CLIPTextModel, CLIPTextModelWithProjection), names, others, strict=False))
    return parts


def single_file_pipeline(path: Path, dtype: torch.dtype) -> Any:
    """The stock diffusers pipeline (SDXL or SD 1.5) of a single-file base, built from the parts above (so each
    text encoder gets its own weights) and the config folder's own inference scheduler: what `eval` and `merge`
    load."""
    import diffusers
    from transformers import CLIPTokenizer

    folder = config_folder(path)
    index = json.loads((folder / "model_index.json").read_text())
    sdxl = "text_encoder_2" in index and index["text_encoder_2"] != [None, None]
    parts = load_single_file_parts(path, folder, sdxl, with_unet=True, with_encoders=True, vae=True,
                                   weight_dtype=dtype, vae_dtype=dtype)
    names = ("", "_2") if sdxl else ("",)
    where = tokenizer_source(path, folder)
    components: dict[str, Any] = {f"tokenizer{n}": CLIPTokenizer.from_pretrained(where, subfolder=f"tokenizer{n}")
                                  for n in names}
    components |= {f"text_encoder{n}": encoder for n, encoder in zip(names, parts["text_encoders"], strict=True)}
    scheduler = getattr(diffusers, index["scheduler"][1]).from_pretrained(str(folder), subfolder="scheduler")
    if not sdxl:  # a training base: no safety checker, as the diffusers folders lora-dpo writes
        components |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    pipeline_class = getattr(diffusers, index["_class_name"])
    return pipeline_class(unet=parts["unet"], vae=parts["vae"], scheduler=scheduler, **components)
