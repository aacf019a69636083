"""Generation with the stock diffusers pipeline: the settings that make images comparable (`Generation`), where
each image is saved, PNGs stamped so a later run can reuse them, finding the adapter and its base,
`load_pipeline` and `open_generation` (the pipeline and its settings), `pipeline_from_parts` (one around the model
being trained), `decode_latents`, seeded `generate`, `generate_or_reuse` (one
stamped image) and `generate_images` over every prompt, seed and adapter strength."""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from lora_dpo import adapterfiles, export, files, hub, models
from lora_dpo.evaluate.errors import EvalError
from lora_dpo.export import ADAPTER_FILE

ADAPTER_NAME = "adapter"  # the name the adapter is loaded under in the pipeline
PNG_KEY = "lora-dpo"  # PNG text chunk that makes a saved image reusable: prompt, seed, settings fingerprint


@dataclass(frozen=True)
class Generation:
    """Everything that must be equal for base and adapter images to be compared, and for a saved image to be
    reused by a later run."""

    base: str
    adapter_sha256: str
    scheduler: str
    steps: int
    guidance_scale: float
    resolution: int
    precision: str

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def variant_name(scale: float | None) -> str:
    """`base` for the adapter off, `adapter-<scale>` (e.g. `adapter-0.5`) for the adapter at a strength: the file
    names' and report.json's key, never shown as a label (`label`)."""
    return "base" if scale is None else f"adapter-{scale:g}"


def label(scale: float | None) -> str:
    """The one name reports, grids and the terminal give a column: `base`, or `adapter x0.5` (the adapter's
    weights times 0.5; `x1` as trained)."""
    return "base" if scale is None else f"adapter x{scale:g}"


def image_path(images_dir: Path, index: int, seed: int, variant: str) -> Path:
    return images_dir / f"{index:05d}_{seed}_{variant}.png"


def _save_png(image: Image.Image, path: Path, stamp: dict[str, Any]) -> None:
    """Written under a temporary name and renamed: an interrupted run never leaves a half image to reuse."""
    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(stamp, sort_keys=True))
    with files.atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)


def _reusable(path: Path, stamp: dict[str, Any]) -> bool:
    if not path.is_file():
        return False
    try:
        with Image.open(path) as image:
            return json.loads(image.text.get(PNG_KEY, "null")) == stamp
    except (OSError, ValueError):
        return False


def adapter_file(adapter: Path) -> Path:
    """A run folder (`adapters/<run>`) or the adapter's `.safetensors` file itself."""
    path = adapter / ADAPTER_FILE if adapter.is_dir() else adapter
    if not path.is_file() or path.suffix != ".safetensors":
        raise EvalError(f"{adapter}: no adapter here; pass a run folder holding {ADAPTER_FILE} or a "
                        ".safetensors LoRA file")
    return path


def base_from_recipe(adapter: Path) -> str:
    """The base an adapter was trained on, from the `recipe.toml` written beside it."""
    import tomllib

    path = adapter_file(adapter).parent / "recipe.toml"
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))["model"]["base"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        raise EvalError(f"{adapter}: no recipe.toml with [model].base beside the adapter; pass --base") from None


def load_pipeline(base: str, adapter: Path | None, device: torch.device, dtype: torch.dtype) -> Any:
    """The stock diffusers pipeline of `base` with the adapter loaded as `load_lora_weights` loads it (None: the
    base alone)."""
    from diffusers import DiffusionPipeline

    source = models.resolve_base(base)
    if adapter is not None:  # another family's adapter: refused before the base loads
        adapterfiles.refuse_for_base(adapter_file(adapter), source)
    online = not hub.is_hub_id(source) or hub.prepare()
    try:
        with warnings.catch_warnings():  # diffusers 0.42 renames torch_dtype; older releases know only that
            warnings.filterwarnings("ignore", ".*torch_dtype.*", FutureWarning)
            pipe = (models.single_file_pipeline(Path(source), dtype) if models.is_single_file(source) else
                    DiffusionPipeline.from_pretrained(source, torch_dtype=dtype))
    except (OSError, ValueError) as err:
        if not online:
            raise hub.unavailable(base, "the base pipeline") from None
        raise EvalError(f"--base {base!r}: cannot load the pipeline: {str(err).splitlines()[0]}") from None
    if not hasattr(pipe, "load_lora_weights"):
        raise EvalError(f"--base {base!r}: {type(pipe).__name__} does not take LoRA adapters; lora-dpo evaluates "
                        f"the text-to-image pipelines of {', '.join(f.label for f in models.FAMILIES)}")
    if adapter is not None:
        check_adapter_family(pipe, adapter, base)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if adapter is None:
        return pipe
    file = adapter_file(adapter)
    family = models.family_of_pipeline(pipe.config)
    if family is None or adapterfiles.uses_unet_names(family):
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=ADAPTER_NAME)
    else:  # either format (fused kohya layers split back), checked against the base, into the transformer
        export.load_adapter(getattr(pipe, family.denoiser_folder), file, base=base, adapter_name=ADAPTER_NAME)
    return pipe


def check_adapter_family(pipe: Any, adapter: Path, base: str) -> None:
    """One line when the adapter is for another family than the base pipeline's (before any weight is loaded)."""
    family = models.family_of_pipeline(pipe.config)
    if family is not None:
        file = adapter_file(adapter)
        tensors, metadata = export.read_file(file)
        adapterfiles.refuse_other_family(metadata, tensors, getattr(pipe, family.denoiser_folder).config, base,
                                         str(file))


def _use_scale(pipe: Any, scale: float | None) -> None:
    """Adapter off (`None`: exactly the base) or on at `scale`."""
    if scale is None:
        pipe.disable_lora()
    else:
        pipe.enable_lora()
        pipe.set_adapters([ADAPTER_NAME], adapter_weights=[scale])


def pipeline_from_parts(base: models.BaseModel, unet: Any, revision: str | None = None) -> Any:
    """A stock pipeline around parts already in memory (no second UNet): the base's VAE, encoders and
    tokenizers, the given UNet, and a fresh instance of the base's own inference scheduler (with what a single-file
    base's marker keys change in it)."""
    if base.vae is None or not base.text_encoders:
        raise EvalError("generating from the model being trained needs the base's VAE and text encoders in memory")
    import diffusers

    # the scheduler's JSON (any scheduler class reads any config; a flow base's training schedule is no class's)
    config = diffusers.DDPMScheduler.load_config(base.source, subfolder="scheduler", revision=revision)
    scheduler = models.inference_scheduler(config, base.scheduler_overrides)  # a v_pred file samples as v_pred
    # what the base's model_index.json sets of the class's own arguments (a step-distilled FLUX.2 klein: no CFG)
    keys = base.family.pipeline_config_keys
    index = models.read_pipeline_json(base.source, "model_index.json", revision) if keys else {}
    # the family's pipeline class, its watermark off (the grids compare base and adapter pixel for pixel)
    pipe = base.family.build_pipeline(unet, base.vae, scheduler, base.tokenizers, base.text_encoders,
                                      **base.family.unwatermarked, **{k: index[k] for k in keys if k in index})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decode_latents(pipe: Any, family: Any, latents: Tensor, resolution: int) -> list[Image.Image]:
    """The pipeline's `output_type="latent"` output -> PIL images, decoded by the VAE in its own precision: under
    mixed precision the latents come out in bf16/fp16 while the VAE may stay fp32 (the inverse of
    models.encode_images). What the VAE decodes is the family's to say (`decodable_latents`: FLUX's pipeline hands
    its latents back packed into tokens)."""
    vae = pipe.vae
    with torch.no_grad():
        decoded = vae.decode(family.decodable_latents(vae, latents, resolution, resolution)).sample.float()
    return pipe.image_processor.postprocess(decoded, output_type="pil")


def generate(pipe: Any, prompt: str, seed: int, steps: int, guidance_scale: float, resolution: int,
             output_type: str = "pil") -> Any:
    """One image (or its latents). The initial noise comes from a CPU generator seeded with `seed`: the same
    noise on any device, so base and adapter images of one seed start from the same point. The prompt by keyword:
    FLUX.2 klein's pipeline takes an image first."""
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance_scale, height=resolution,
               width=resolution, generator=generator, output_type=output_type)
    return out.images[0] if output_type == "pil" else out.images


def open_generation(base: str, adapter: Path | None, *, steps: int, guidance_scale: float | None,
                    resolution: int | None, precision: str) -> tuple[Any, Generation]:
    """The pipeline (on the GPU when there is one; fp32 on the CPU) and the settings its images are stamped with.
    `guidance_scale`/`resolution` None: the pipeline's own defaults."""
    import inspect

    cuda = torch.cuda.is_available()
    precision = precision if cuda and precision != "no" else "fp32"  # half precision on CPU is slow, poorly supported
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    pipe = load_pipeline(base, adapter, torch.device("cuda" if cuda else "cpu"), dtype)
    if guidance_scale is None:
        guidance_scale = inspect.signature(pipe.__call__).parameters["guidance_scale"].default
    sha = "" if adapter is None else files.sha256(adapter_file(adapter))  # the file's bytes, as training prints
    gen = Generation(base=base, adapter_sha256=sha, scheduler=type(pipe.scheduler).__name__, steps=steps,
                     guidance_scale=float(guidance_scale),
                     resolution=resolution or native_resolution(pipe),
                     precision=precision)
    return pipe, gen


def native_resolution(pipe: Any) -> int:
    """The pipeline's default image size in pixels: its denoiser's sample size (FLUX's pipeline keeps its own) times
    the VAE's factor."""
    family = models.family_of_pipeline(pipe.config)
    denoiser = getattr(pipe, family.denoiser_folder if family else "unet")
    size = getattr(pipe, "default_sample_size", None) or denoiser.config.sample_size
    return int(size * pipe.vae_scale_factor)


def generate_or_reuse(pipe: Any, prompt: str, seed: int, variant: str, gen: Generation, path: Path) -> bool:
    """Generate one image into `path`, unless the one there was made from the same prompt, seed, variant and
    settings; returns whether it generated. The caller has set the adapter strength `variant` names."""
    stamp = {"prompt": prompt, "seed": seed, "variant": variant, "settings": gen.fingerprint()}
    if _reusable(path, stamp):
        return False
    _save_png(generate(pipe, prompt, seed, gen.steps, gen.guidance_scale, gen.resolution), path, stamp)
    return True


def generate_images(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], scales: Sequence[float],
                    gen: Generation, images_dir: Path) -> int:
    """Every (prompt, seed) with the adapter off and at every scale, saved as PNGs in `images_dir`. An image
    already there, made from the same prompt, seed and settings, is reused. Returns how many were made."""
    from tqdm.auto import tqdm

    images_dir.mkdir(parents=True, exist_ok=True)
    made = 0
    for index, prompt in enumerate(tqdm(prompts, desc="eval", unit="prompt")):
        for scale in (None, *scales):
            _use_scale(pipe, scale)
            variant = variant_name(scale)
            for seed in seeds:
                path = image_path(images_dir, index, seed, variant)
                made += generate_or_reuse(pipe, prompt, seed, variant, gen, path)
    return made
