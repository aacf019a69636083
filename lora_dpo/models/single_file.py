"""Single-file bases: one `.safetensors` checkpoint in Stability's original layout (what AUTOMATIC1111 and
ComfyUI load and civitai hands out; sd-scripts and OneTrainer train on them), read through diffusers'
`from_single_file` with a local config folder, so no hub access is needed for the architecture.

The config folder is a diffusers pipeline layout without weights (`model_index.json`, `unet/config.json`, ...):
the folder the file sits in when it has a `model_index.json` (how a custom or tiny architecture is given), else
one written from the configs shipped with lora-dpo for the family the file's keys show (`Family.owns_checkpoint`).
The shipped configs carry no tokenizer vocabulary: with the shipped folder the tokenizers come from the
family's hub repo (its first hub id, cached after the first time); a UNet-only load (training from a latent cache)
never needs them.

SD3.5 and FLUX.1 files (SAI's MMDiT and VAE; BFL's transformer alone) mostly hold no text encoders: the
transformer comes from the file (its config, with the shipped folder, completed from the weights' shapes by the
family: SD3.5 Large vs Medium, FLUX schnell), the VAE from the file when it has one, the text encoders (unless the
file has every one of them) and a missing VAE from the folder beside the file when it holds them, else from the
family's hub repo (`parts_source`); a cached run loads the transformer alone.

The header also says what was trained into the file: ComfyUI's marker keys set the noise schedule (`v_pred`:
v-prediction, with `ztsnr`: zero terminal SNR) for training and sampling alike, and the kinds lora-dpo cannot
train (EDM such as Playground v2.5, the SDXL refiner, inpainting, SD 2.x) are refused by name instead of being
trained as epsilon SDXL.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch

from lora_dpo import hub
from lora_dpo.files import cache_home
from lora_dpo.models.families import FAMILIES, Family, family_of_checkpoint, family_of_pipeline
from lora_dpo.models.parts import ModelError

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"  # pickled .ckpt files can run code when loaded: not read
UNET_PREFIX = "model.diffusion_model."  # every original-layout checkpoint keeps its UNet here
CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"  # (320, 4, 3, 3); 9 input channels: an inpainting UNet
REFINER_MARKER = "conditioner.embedders.0.model."  # SDXL refiner: OpenCLIP-bigG alone, as the first embedder
EDM_KEYS = ("edm_mean", "edm_std", "edm_vpred.sigma_max", "edm_vpred.sigma_min")  # Playground v2.5, EDM v-pred
VAE_PREFIX = "first_stage_model."  # a full checkpoint's VAE
V_PRED, ZTSNR = "v_pred", "ztsnr"  # v-prediction and zero-terminal-SNR marker keys (empty tensors)


def is_single_file(name: str) -> bool:
    """`[model].base` names one checkpoint file rather than a diffusers folder or hub id."""
    return name.endswith(SUFFIX) and Path(name).is_file()


def _header(path: Path) -> tuple[list[str], list[int] | None]:
    """The checkpoint's key names and its UNet's input convolution shape, from the header (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            keys = list(handle.keys())
            conv_in = handle.get_slice(CONV_IN).get_shape() if CONV_IN in keys else None
    except (SafetensorError, OSError) as err:
        raise ModelError(f"[model].base = {str(path)!r}: not a readable safetensors file ({err})") from None
    return keys, conv_in


def _refusal(keys: list[str], conv_in: list[int] | None) -> str | None:
    """What kind of checkpoint this is when lora-dpo cannot train it (the kinds ComfyUI's `supported_models.py`
    and diffusers' `infer_diffusers_model_type` tell apart by the same keys), or None."""
    edm = [k for k in EDM_KEYS if k in keys]
    if edm:
        return (f"an EDM checkpoint (its {', '.join(edm)} keys: Playground v2.5 or an EDM fine-tune), sampled on a "
                "continuous EDM schedule, not a DDPM one")
    if any(k.startswith(REFINER_MARKER) for k in keys):
        return f"an SDXL refiner ({REFINER_MARKER}*: OpenCLIP alone, no CLIP ViT-L)"
    if conv_in is not None and len(conv_in) == 4 and conv_in[1] != 4:
        kind = "an inpainting checkpoint" if conv_in[1] == 9 else "not a text-to-image checkpoint"
        return f"{kind} (its UNet takes {conv_in[1]} input channels, {CONV_IN}; text-to-image takes 4)"
    if any(k.startswith("cond_stage_model.model.") for k in keys):  # OpenCLIP-H alone: SD 2.x
        return "an SD 2.x checkpoint (cond_stage_model.model.*: OpenCLIP-H)"
    return None


def single_file_family(path: Path) -> Family:
    """The checkpoint's family, from its header alone; a checkpoint of a kind lora-dpo cannot train is refused by
    name."""
    keys, conv_in = _header(path)
    refusal = _refusal(keys, conv_in)
    if refusal:
        raise ModelError(f"[model].base = {str(path)!r}: {refusal}; lora-dpo trains the base text-to-image "
                         f"checkpoints of {', '.join(f.label for f in FAMILIES)}: pass one of those")
    family = family_of_checkpoint(keys)  # a flow transformer's file may keep it without the UNet prefix
    if family is None and not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ModelError(f"[model].base = {str(path)!r}: no {UNET_PREFIX}* keys ({found(keys)}): not a Stable "
                         "Diffusion or FLUX checkpoint in the original single-file layout (an adapter, a lone UNet "
                         "or VAE?); pass a full checkpoint or a diffusers folder")
    if family is None:
        raise ModelError(f"[model].base = {str(path)!r}: no known base family ({', '.join(f.label for f in FAMILIES)}) "
                         f"has these keys ({found(keys)}); pass a diffusers folder instead")
    if not family.single_file_loadable:
        raise ModelError(f"[model].base = {str(path)!r}: a {family.label} single file, which lora-dpo recognises but "
                         f"does not load yet; pass its diffusers folder or hub id ({family.hub_ids[0]})")
    return family


def found(keys: list[str], shown: int = 4) -> str:
    """What a checkpoint holds, for a message: its key count and first key prefixes (two name parts, a UNet's
    three), e.g. `12 keys: lora_unet_down.*, ...`."""
    prefixes = list(dict.fromkeys(".".join(k.split(".")[:3 if k.startswith(UNET_PREFIX) else 2]) + ".*"
                                  for k in sorted(keys)))
    listed = ", ".join(prefixes[:shown]) + (f" and {len(prefixes) - shown} more" if len(prefixes) > shown else "")
    return f"{len(keys)} key{'s' if len(keys) > 1 else ''}: {listed}" if keys else "no keys at all"


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the header alone (what a family reads its variant from)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        keys = list(handle.keys())
        return {key: tuple(handle.get_slice(key).get_shape()) for key in keys}


def _beside(path: Path) -> bool:
    """A diffusers folder (`model_index.json`) lies beside the file: its configs are the base's own."""
    return (path.parent / "model_index.json").is_file()


def denoiser_overrides(path: Path, family: Family) -> dict[str, Any]:
    """What the file's weights fix of its denoiser config over the shipped one (`Family.original_denoiser_config`:
    SD3.5 Large vs Medium, FLUX schnell vs dev); {} with a config folder beside the file (its config is the base's)."""
    return {} if _beside(path) else family.original_denoiser_config(_shapes(path))


def single_file_denoiser_config(path: Path) -> dict[str, Any]:
    """The denoiser config of a single-file base: its config folder's, with `denoiser_overrides`."""
    family = single_file_family(path)
    config = json.loads((config_folder(path) / family.denoiser_folder / "config.json").read_text())
    return {**config, **denoiser_overrides(path, family)}


def scheduler_overrides(path: Path) -> dict[str, Any]:
    """What the checkpoint's marker keys say about its noise schedule, as diffusers scheduler settings: `v_pred`
    -> v-prediction and, beside it, `ztsnr` -> zero terminal SNR; {} for an epsilon checkpoint. These are the keys
    ComfyUI reads and writes (`supported_models.py` SDXL.model_type; its checkpoint save): `ztsnr` counts there
    only beside `v_pred`, so a lone one is ignored here too, with a warning."""
    keys = set(_header(path)[0])
    if V_PRED not in keys:
        if ZTSNR in keys:
            log.warning("%s: a %r key without %r: trained as epsilon on the usual schedule, as ComfyUI samples it",
                        path, ZTSNR, V_PRED)
        return {}
    return {"prediction_type": "v_prediction", **({"rescale_betas_zero_snr": True} if ZTSNR in keys else {})}


def inference_scheduler(config: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """The base's sampling scheduler (its class and config) with a checkpoint's `scheduler_overrides`. Zero
    terminal SNR samples from the last timestep ("trailing" spacing, Lin et al. 2024) with a scheduler that can
    rescale its betas (Euler when the configured one, e.g. PNDM, cannot)."""
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    settings = dict(overrides)
    if overrides.get("rescale_betas_zero_snr"):
        settings["timestep_spacing"] = "trailing"
        if "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters:
            cls = diffusers.EulerDiscreteScheduler
    return cls.from_config(config, **settings)


def shipped_config_folder(family: Family) -> Path:
    """A diffusers config folder (no weights, no tokenizers) written once from the family's shipped configs."""
    folder = cache_home() / "single-file-configs" / family.name
    if (folder / "model_index.json").is_file():
        return folder
    denoiser, vae, scheduler = (family.shipped_config(part) for part in (family.denoiser_folder, "vae", "scheduler"))
    index: dict[str, Any] = {"_class_name": family.pipeline_class,
                             family.denoiser_folder: ["diffusers", family.denoiser_class],
                             "vae": ["diffusers", "AutoencoderKL"],
                             "scheduler": ["diffusers", scheduler["_class_name"]]}
    files = {f"{family.denoiser_folder}/config.json": denoiser, "vae/config.json": vae,
             "scheduler/scheduler_config.json": scheduler}
    for part in family.text_parts:
        config = family.shipped_config(part.encoder)
        index[part.encoder] = ["transformers", config["architectures"][0]]
        index[part.tokenizer] = ["transformers", part.tokenizer_class]
        kind = "t5" if part.encoder_class.startswith("T5") else "clip_text_model"  # transformers' config class
        files[f"{part.encoder}/config.json"] = {"model_type": kind, **config}
    for relative, content in {**files, "model_index.json": index}.items():  # the index last: it marks "done"
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(json.dumps(content, indent=1))
    return folder


def config_folder(path: Path) -> Path:
    """The diffusers config folder for a single-file base: its own folder when that holds a `model_index.json`
    (a custom architecture), else the shipped one for the family its keys show."""
    family = single_file_family(path)  # refuses the kinds lora-dpo cannot train, whatever configs lie beside it
    if (path.parent / "model_index.json").is_file():
        return path.parent
    return shipped_config_folder(family)


def tokenizer_source(path: Path, folder: Path) -> str:
    """Where the tokenizers load from: the config folder when it has them, else the family's hub repo
    (with the shipped configs there is no vocabulary on disk)."""
    if (folder / "tokenizer").is_dir():
        return str(folder)
    family = single_file_family(path)
    return _hub_source(path, family, f"its {family.label} tokenizers (no vocabulary is shipped)")


def parts_source(path: Path, folder: Path, family: Family) -> str:
    """Where the parts a file's family does not read from the file (a flow base's text encoders; its VAE when the
    file has none) load from: the diffusers folder beside it when that holds the encoders' weights, else the
    family's hub repo (its first hub id: cached after the first time). Offline and not cached: a one-line error
    naming `[model].base` and what to do."""
    def has_weights(part: Any) -> bool:
        return any(next((folder / part.encoder).glob(f"*{ext}"), None) is not None for ext in (SUFFIX, ".bin"))

    if all(has_weights(part) for part in family.text_parts):
        return str(folder)
    return _hub_source(path, family, f"the file holds no {family.label} text encoders; they")


def _hub_source(path: Path, family: Family, what: str) -> str:
    """The family's hub repo (its first hub id), for `what` a single file lacks; offline with nothing cached, a
    one-line error naming `[model].base` and what to do instead."""
    source = family.hub_ids[0]
    if not hub.prepare():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(source, "model_index.json"), str):
            raise ModelError(f"[model].base = {str(path)!r}: {what} come from {source}, which is not cached here and "
                             "the hub is offline: connect once (cached after), put a diffusers folder of the base "
                             "(model_index.json, text encoders, tokenizers) beside the file, or train from a latent "
                             "cache ([data].cache)")
    return source


def _denoiser(path: Path, folder: Path, family: Family, dtype: torch.dtype) -> Any:
    """The denoiser from the file: diffusers' `from_single_file` on the file's tensors (or, for a family that
    converts its original layout itself, on the converted ones), configured by `folder` and `denoiser_overrides`."""
    import diffusers
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    denoiser = getattr(diffusers, family.denoiser_class)
    overrides = denoiser_overrides(path, family)
    checkpoint = load_single_file_checkpoint(str(path))
    config = {**denoiser.load_config(str(folder), subfolder=family.denoiser_folder), **overrides}
    try:
        converted = family.original_denoiser_state(checkpoint, config)
        return denoiser.from_single_file(checkpoint if converted is None else converted, config=str(folder),
                                         subfolder=family.denoiser_folder, torch_dtype=dtype, local_files_only=True,
                                         **overrides)
    except (KeyError, ValueError, RuntimeError) as err:
        if isinstance(err, ModelError):
            raise
        config_file = f"{family.denoiser_folder}/config.json"
        where, fix = ((f"the config folder beside it ({folder})", f"correct its {config_file} or move the file out")
                      if _beside(path) else
                      (f"the shipped {family.label} config", f"put the base's diffusers config folder "
                                                            f"(model_index.json, {config_file}, ...) beside the file"))
        raise ModelError(f"[model].base = {str(path)!r}: its {family.denoiser_folder} does not fit {where} "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); {fix}") from None


def load_single_file_parts(path: Path, folder: Path, family: Family, *, with_unet: bool, with_encoders: bool,
                           vae: bool, weight_dtype: torch.dtype, vae_dtype: torch.dtype) -> dict[str, Any]:
    """The UNet (or transformer), VAE and text encoders of a single-file base, each configured by `folder`:
    {"unet", "vae", "text_encoders"} (absent parts are None or ()). diffusers converts the original layout; a
    file without its family's text encoders (under every `original_text_prefixes`: SAI's sd3.5 files, FLUX.1's
    always) takes them, and a VAE it lacks (`first_stage_model.*`: BFL's FLUX files), from `parts_source`."""
    from diffusers import AutoencoderKL

    common = {"config": str(folder), "local_files_only": True}
    parts: dict[str, Any] = {"unet": None, "vae": None, "text_encoders": ()}
    keys = _header(path)[0]
    in_file = bool(family.original_text_prefixes) and all(any(k.startswith(prefix) for k in keys)
                                                         for prefix in family.original_text_prefixes)
    # where the other parts come from is settled (offline and not cached: refused) before the denoiser's GBs load
    source = None if in_file or not with_encoders else parts_source(path, folder, family)
    if with_unet:
        parts["unet"] = _denoiser(path, folder, family, weight_dtype)
    if not with_encoders:
        return parts
    if vae and (source is None or any(k.startswith(VAE_PREFIX) for k in keys)):
        parts["vae"] = AutoencoderKL.from_single_file(str(path), subfolder="vae", torch_dtype=vae_dtype, **common)
    if source is None:
        parts["text_encoders"] = _file_text_encoders(path, folder, family, weight_dtype)
        return parts
    try:
        if vae and parts["vae"] is None:
            parts["vae"] = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=vae_dtype)
        parts["text_encoders"] = family.load_text_parts(source, torch_dtype=weight_dtype)[1]
    except OSError as err:  # a gated repo (FLUX.1-dev) without a login, a folder without some part
        raise ModelError(f"[model].base = {str(path)!r}: the parts the file lacks (text encoders, VAE) come from "
                         f"{source} and could not be loaded ({str(err).splitlines()[0]}); log in to the hub (`hf "
                         "auth login`) or put a diffusers folder of the base beside the file") from None
    return parts


def _file_text_encoders(path: Path, folder: Path, family: Family, dtype: torch.dtype) -> tuple[Any, ...]:
    """The text encoders the file holds (CLIP through diffusers' CLIP converter, T5 through its T5 one), each
    configured by `folder`."""
    import transformers
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm,
        create_diffusers_t5_model_from_checkpoint,
        load_single_file_checkpoint,
    )

    prefixes = family.original_text_prefixes
    checkpoint = load_single_file_checkpoint(str(path))  # read once for every text encoder
    # Each encoder sees only its own keys (none of the other encoders' prefixes): diffusers picks the source by key
    # names and width, and when two encoders have the same width (a small custom base) it would fill the second one
    # from the first one's keys.
    return tuple(
        (create_diffusers_t5_model_from_checkpoint if part.encoder_class.startswith("T5")
         else create_diffusers_clip_model_from_ldm)(
            getattr(transformers, part.encoder_class),
            {k: v for k, v in checkpoint.items() if not k.startswith(tuple(p for p in prefixes if p != own))},
            subfolder=part.encoder, torch_dtype=dtype, config=str(folder), local_files_only=True)
        for part, own in zip(family.text_parts, prefixes, strict=True))


def single_file_pipeline(path: Path, dtype: torch.dtype) -> Any:
    """The stock diffusers pipeline of a single-file base, built by its family from the parts above (so each
    text encoder gets its own weights) and the config folder's own inference scheduler: what `eval` and `merge`
    load."""
    import diffusers

    folder = config_folder(path)
    index = json.loads((folder / "model_index.json").read_text())
    family = family_of_pipeline(index)
    if family is None:
        raise ModelError(f"{folder / 'model_index.json'}: no known base family has this pipeline; pass a diffusers "
                         "folder instead")
    parts = load_single_file_parts(path, folder, family, with_unet=True, with_encoders=True, vae=True,
                                   weight_dtype=dtype, vae_dtype=dtype)
    tokenizers = family.load_tokenizers(tokenizer_source(path, folder))
    config = getattr(diffusers, index["scheduler"][1]).load_config(str(folder), subfolder="scheduler")
    scheduler = inference_scheduler(config, scheduler_overrides(path))
    return family.build_pipeline(parts["unet"], parts["vae"], scheduler, tokenizers, parts["text_encoders"])
