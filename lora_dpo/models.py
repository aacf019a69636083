"""The frozen base (SDXL or SD 1.5), its LoRA adapters, the adapters-off reference, and the tiny base.

One UNet lives in memory. The policy is the UNet with its LoRA adapters on; the reference model of DPO
is the same UNet with them off (`adapters_disabled`), so the reference costs no memory at all.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lora_dpo import synthetic
from lora_dpo.errors import LoraDpoError
from lora_dpo.files import cache_home
from lora_dpo.recipe import LoraRecipe, ModelRecipe

log = logging.getLogger(__name__)


PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the step knows how to train (`step._target`)
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # recipe precision -> weight dtype
STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # file precision


class ModelError(LoraDpoError, RuntimeError):
    """A base model that cannot be loaded or used; the message names it and says what to do."""


@dataclass
class BaseModel:
    """The parts of a Stable Diffusion pipeline that training needs. Encoders and VAE are None when the
    data comes from a latent cache, so they never occupy memory."""

    source: str
    unet: Any
    noise_scheduler: Any
    is_sdxl: bool
    vae: Any | None = None
    text_encoders: tuple[Any, ...] = ()
    tokenizers: tuple[Any, ...] = ()

    @property
    def pipeline_class(self) -> type:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        return StableDiffusionXLPipeline if self.is_sdxl else StableDiffusionPipeline


# --------------------------------------------------------------------------------------------------
# Loading


TinyArch = Literal["sdxl", "sd15"]
# `[model].base` names of the built-in tiny bases -> their architecture; `tiny` stays the SDXL one
TINY_BASES: dict[str, TinyArch] = {"tiny": "sdxl", "tiny-sd15": "sd15"}
# Their cache folders under cache_home(): bump a version when that base's weights change, so that no stale
# cached copy is reused
TINY_FOLDERS: dict[TinyArch, str] = {"sdxl": "tiny-base-v1", "sd15": "tiny-sd15-v1"}


def _check_tiny_arch(arch: str) -> None:
    if arch not in TINY_FOLDERS:
        raise ModelError(f"tiny base architecture {arch!r}: choose one of {', '.join(TINY_FOLDERS)}")


def tiny_base_path(arch: TinyArch = "sdxl") -> Path:
    """Where a built-in tiny base lives once built (it may not exist yet)."""
    _check_tiny_arch(arch)
    return cache_home() / TINY_FOLDERS[arch]


def resolve_base(name: str) -> str:
    """`tiny` / `tiny-sd15` -> the cached built-in tiny base (built on first use); anything else as is."""
    if name not in TINY_BASES:
        return name
    arch = TINY_BASES[name]
    path = tiny_base_path(arch)
    if not (path / "model_index.json").is_file():
        log.info("building the %s base in %s (once, about a minute)", name, path)
        build_tiny_base(path, arch=arch)
    return str(path)


def read_pipeline_json(source: str, filename: str, revision: str | None = None) -> dict[str, Any]:
    """A JSON file of a diffusers pipeline (`model_index.json`, `unet/config.json`) from a local folder or the
    hub, without downloading any weights."""
    if Path(source).exists():
        path = Path(source) / filename
        if not path.is_file():
            raise ModelError(f"{source}: not a diffusers pipeline folder (no {filename})")
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(source, filename, revision=revision)).read_text())
    except Exception as err:
        raise ModelError(f"{source}: cannot read {filename} from the hub ({type(err).__name__}); "
                         "check the id, your network, or pass a local diffusers folder") from None


def load_base(cfg: ModelRecipe, *, with_encoders: bool = True, weight_dtype: torch.dtype = torch.float32,
              vae_dtype: torch.dtype = torch.float32, with_unet: bool = True) -> BaseModel:
    """Load the base pipeline's parts, frozen. `with_encoders=False` skips the VAE and text encoders (training
    from a latent cache); `with_unet=False` skips the UNet (writing a latent cache)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    source = resolve_base(cfg.base)
    index = read_pipeline_json(source, "model_index.json", cfg.revision)
    missing = [part for part in ("unet", "scheduler") if part not in index]
    if with_encoders:
        missing += [part for part in ("vae", "text_encoder", "tokenizer") if part not in index]
    if missing:
        raise ModelError(f"{source}: the pipeline has no {', '.join(missing)}; lora-dpo needs an SD 1.5 or "
                         "SDXL text-to-image pipeline")
    is_sdxl = "text_encoder_2" in index and index.get("text_encoder_2") != [None, None]
    common = {"revision": cfg.revision}
    try:
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **common)
        if scheduler.config.prediction_type not in PREDICTION_TYPES:
            raise ModelError(f"{source}: its scheduler predicts {scheduler.config.prediction_type!r}; lora-dpo "
                             f"trains bases that predict {' or '.join(PREDICTION_TYPES)}")
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=cfg.variant,
                                                    torch_dtype=weight_dtype, **common) if with_unet else None
        base = BaseModel(source=source, unet=unet, noise_scheduler=scheduler, is_sdxl=is_sdxl)
        if with_encoders:
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
        raise ModelError(f"{source}: cannot load the base pipeline: {str(err).splitlines()[0]}") from None
    for module in (base.unet, base.vae, *base.text_encoders):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return base


def is_sdxl_unet(config: Mapping[str, Any]) -> bool:
    """SDXL's UNet takes micro-conditioning (pooled text embeddings and six size/crop ids); SD 1.5's does not."""
    return config.get("addition_embed_type") == "text_time"


def pooled_dim(config: Mapping[str, Any]) -> int:
    """Width of SDXL's pooled text embedding, from its UNet config: the added embedding's input is the pooled
    embedding plus six time ids of `addition_time_embed_dim` each."""
    return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]


def base_unet_config(name: str, revision: str | None = None) -> dict[str, Any]:
    """A base's UNet config without its weights (adapter formats need the architecture, not 5 GB): the shipped
    config for the well-known hub ids (offline), `unet/config.json` of a local folder, or the hub's."""
    if name in KNOWN_BASES:
        return shipped_config(KNOWN_BASES[name], "unet")
    return read_pipeline_json(resolve_base(name), "unet/config.json", revision)


# --------------------------------------------------------------------------------------------------
# Shipped architectures: configs of the real bases, to build them with random weights or on the meta device
# (benchmarks and memory plans need the architecture, not the 7 GB of weights)

CONFIGS = Path(__file__).parent / "configs"
ARCHITECTURES = ("sdxl", "sd15")
# Hub ids whose UNet is exactly a shipped architecture: their config is known without a download.
KNOWN_BASES = {"stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
               "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15", "runwayml/stable-diffusion-v1-5": "sd15"}


def shipped_config(arch: str, part: str) -> dict[str, Any]:
    """`part` is unet, vae, scheduler, or text (what the UNet is fed: hidden sizes, pooled dim)."""
    if arch not in ARCHITECTURES:
        raise ModelError(f"architecture {arch!r} is not shipped; known: {', '.join(ARCHITECTURES)}")
    return json.loads((CONFIGS / arch / f"{part}.json").read_text())


def unet_from_config(arch: str | dict[str, Any], dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> Any:
    """The real base's UNet architecture (a shipped name, or a UNet config) with random weights (or no storage
    at all, on `meta`), built straight in `dtype`: no float32 copy on the way (10 GB for SDXL, more than a 12 GB
    card's budget)."""
    from diffusers import UNet2DConditionModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(shipped_config(arch, "unet") if isinstance(arch, str) else arch)
    finally:
        torch.set_default_dtype(default)
    return unet.requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# QLoRA-style 4-bit base


def quantize_nf4(unet: Any, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Swap every `nn.Linear` of the frozen UNet for a bitsandbytes NF4 `Linear4bit` (QLoRA, Dettmers et al.
    2023) and move it to `device`, where bitsandbytes quantises it; matmuls run in `compute_dtype`. Call it
    before `add_lora`: peft puts its adapters on `Linear4bit` layers. Convolutions and norms stay as they are.
    Layer by layer, so the full-precision copy of one layer at a time is all the extra memory. Returns the
    number of layers swapped."""
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ModelError(f"[model].quantize = 'nf4' needs bitsandbytes ({err}); pip install bitsandbytes") from None
    swapped = 0
    for module in list(unet.modules()):
        for name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            layer.register_forward_hook(_output_in_autocast_dtype)
            # bitsandbytes repacks the weight in place for a faster CPU kernel at the first forward in eval mode
            # without grad (validation, samples), and that packing rejects widths that are not multiples of 32: keep
            # the one layout that training uses
            layer.support_avx512bf16_for_cpu = False
            setattr(module, name, layer.to(device))
            swapped += 1
    unet.is_loaded_in_4bit = True  # as diffusers' own 4-bit loader marks it: peft then uses its 4-bit LoRA layer
    return swapped


def _output_in_autocast_dtype(module: torch.nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    """Under autocast nn.Linear returns the autocast dtype; bitsandbytes' Linear4bit returns its input's. CUDA
    autocast hides the difference (it runs norms in fp32 whatever they are fed); CPU autocast does not, and a
    GroupNorm with bf16 weights refuses the fp32 activations. Matching nn.Linear makes the 4-bit base run the
    same on both."""
    device = output.device.type
    return output.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else output


# --------------------------------------------------------------------------------------------------
# LoRA and the reference


def lora_config(cfg: LoraRecipe) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), init_lora_weights=True)


def add_lora(unet: Any, cfg: LoraRecipe) -> Any:
    """Attach trainable LoRA adapters (fp32, whatever the base's dtype) to the frozen UNet."""
    config = lora_config(cfg)
    try:
        unet.add_adapter(config)
    except ValueError as err:
        raise ModelError(f"[lora].target_modules {list(cfg.target_modules)}: {err}") from None
    for param in unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return config


def lora_parameters(unet: Any) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


@contextmanager
def adapters_disabled(unet: Any) -> Iterator[None]:
    """The DPO reference: the same UNet with its adapters off, restored however the block exits.
    (peft's disable_adapters()/enable_adapters() are plain calls, not a context manager.)"""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


# --------------------------------------------------------------------------------------------------
# Encoding prompts and images


@torch.no_grad()
def encode_prompts(base: BaseModel, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Prompt embeddings (B, 77, D) and, for SDXL, pooled embeddings (B, P), as the pipelines make them:
    SDXL concatenates both encoders' penultimate hidden states; SD 1.5 uses the last."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(base.tokenizers, base.text_encoders, strict=True):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2] if base.is_sdxl else out.last_hidden_state)
        if base.is_sdxl and encoder is base.text_encoders[-1]:
            pooled = out.text_embeds  # the second encoder's projected pooled output
    return torch.cat(hidden, dim=-1), pooled


@torch.no_grad()
def encode_images(vae: Any, pixels: Tensor) -> Tensor:
    """Pixels in [-1, 1] (B, 3, H, W) -> scaled latents (B, C, H/8, W/8). The posterior mean, not a sample:
    SDXL's posterior is near-deterministic, and the mean makes cached and live latents identical."""
    pixels = pixels.to(vae.device, vae.dtype)
    latents = vae.encode(pixels).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    # contiguous: CPU convolutions may hand back a channels-last layout, and the UNet's backward then rounds
    # differently than for the same latents read from a cache
    return ((latents - shift) * vae.config.scaling_factor).float().contiguous()


def unet_forward(base_unet: Any, noisy: Tensor, timesteps: Tensor, prompt_embeds: Tensor,
                 pooled: Tensor | None, time_ids: Tensor | None) -> Tensor:
    """One UNet call, with SDXL's micro-conditioning when the UNet takes it."""
    added = None
    if pooled is not None:
        added = {"text_embeds": pooled, "time_ids": time_ids}
    return base_unet(noisy, timesteps, encoder_hidden_states=prompt_embeds, added_cond_kwargs=added).sample


# --------------------------------------------------------------------------------------------------
# The tiny bases: SDXL- and SD 1.5-architecture pipelines small enough for a 2-core CPU


TINY_RESOLUTION = 64
# The tiny bases' architectures, as constants: `lora-dpo plan` reads them without building (or warming) a base.
# SDXL: text_time micro-conditioning (pooled text embeds + 6 time ids), cross-attention on both encoders' hidden
# states concatenated (2 x 32).
TINY_UNET: dict[str, Any] = dict(
    sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2), use_linear_projection=True, cross_attention_dim=64,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
    norm_num_groups=16)
# SD 1.5: the same blocks without the addition embedding; cross-attention reads the one encoder's last hidden
# state, so its width is that encoder's hidden size (32).
TINY_SD15_UNET: dict[str, Any] = {
    **{k: v for k, v in TINY_UNET.items()
       if k not in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")},
    "cross_attention_dim": 32}
TINY_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1, norm_num_groups=8, sample_size=TINY_RESOLUTION, force_upcast=False)

TINY_SCHEDULER: dict[str, Any] = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      num_train_timesteps=1000, prediction_type="epsilon",
                                      timestep_spacing="leading", steps_offset=1)


def tiny_text_config(vocab_size: int | None = None) -> dict[str, Any]:
    """The tiny CLIP text encoders' config, shared by both architectures (SDXL's second encoder adds the pooled
    projection that is the UNet's text_embeds)."""
    return dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                vocab_size=vocab_size or len(_tiny_tokenizer()), max_position_embeddings=77, projection_dim=32,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_unet_config(arch: TinyArch = "sdxl") -> dict[str, Any]:
    """The tiny UNet's config for `arch` (a copy: callers may change it)."""
    _check_tiny_arch(arch)
    return dict(TINY_UNET if arch == "sdxl" else TINY_SD15_UNET)


def _tiny_tokenizer() -> Any:
    """A CLIP BPE tokenizer over the demo vocabulary: every letter, plus merges that spell each word."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for token in [*letters, *(c + "</w>" for c in letters)]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in synthetic.WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"] if len(word) > 1 else [word + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_pipeline(seed: int = 0, arch: TinyArch = "sdxl") -> Any:
    """A tiny pipeline with random weights: a 4-block VAE (64 px -> 8x8 latents, made near-deterministic like
    the real ones), an offline tokenizer and tiny CLIP text encoder(s), and the architecture's UNet.
    `sdxl`: a StableDiffusionXLPipeline, two encoders, text_time conditioning. `sd15`: a StableDiffusionPipeline,
    one encoder (CLIPTextModel), no micro-conditioning, no safety checker."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_config = tiny_unet_config(arch)  # fails on an unknown arch before any weight is drawn
    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    text_config = CLIPTextConfig(**tiny_text_config(len(tokenizer)))
    # Weights are drawn in this order (UNet, VAE, encoders): another order would change every seed's SDXL base
    unet = UNet2DConditionModel(**unet_config)
    vae = AutoencoderKL(**TINY_VAE)
    with torch.no_grad():  # pin the log-variance half of the posterior to its floor: a near-deterministic VAE
        vae.quant_conv.weight[4:].zero_()
        vae.quant_conv.bias[4:].fill_(-30.0)
    parts = dict(vae=vae, text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer, unet=unet,
                 scheduler=EulerDiscreteScheduler(**TINY_SCHEDULER))
    if arch == "sd15":
        return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return StableDiffusionXLPipeline(**parts, text_encoder_2=CLIPTextModelWithProjection(text_config),
                                     tokenizer_2=_tiny_tokenizer())


def _demo_batch(n: int, seed: int) -> tuple[list[str], Tensor]:
    """Demo prompts and both images of each pair as pixels in [-1, 1] at the tiny resolution."""
    prompts, images = [], []
    for index in range(n):
        prompt, chosen, rejected = synthetic.make_pair(index, TINY_RESOLUTION, seed)
        prompts += [prompt, prompt]
        images += [chosen, rejected]
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    return prompts, pixels.float() / 127.5 - 1.0


def _rows(tensor: Tensor | None, index: Tensor) -> Tensor | None:
    return None if tensor is None else tensor[index]


def warm_up_tiny_base(pipe: Any, steps: int, seed: int = 0, batch_size: int = 16, lr: float = 1e-3) -> None:
    """Calibrate the VAE's scaling factor to unit latent std, then pre-train the whole UNet for `steps` plain
    denoising steps on demo images (both sides of each pair). A cold random UNet learns no preference; a
    warmed one does, as a real pretrained base would (measured: held-out accuracy ~0.5 cold, ~0.9 warm)."""
    from diffusers import DDPMScheduler

    sdxl = getattr(pipe, "text_encoder_2", None) is not None  # as load_base tells the architectures apart
    names = ("", "_2") if sdxl else ("",)
    base = BaseModel(source="tiny", unet=pipe.unet, noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
                     is_sdxl=sdxl, vae=pipe.vae, text_encoders=tuple(getattr(pipe, f"text_encoder{n}") for n in names),
                     tokenizers=tuple(getattr(pipe, f"tokenizer{n}") for n in names))
    prompts, pixels = _demo_batch(256, seed=seed + 10_000)  # demo-style images, not the training pairs
    pipe.vae.register_to_config(scaling_factor=1.0)
    with torch.no_grad():
        latents = encode_images(pipe.vae, pixels)
        pipe.vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        latents = latents * pipe.vae.config.scaling_factor
        embeds, pooled = encode_prompts(base, prompts, torch.device("cpu"))
    size = TINY_RESOLUTION
    time_ids = None  # SD 1.5 has no micro-conditioning: pooled is None too, and unet_forward passes neither
    if sdxl:
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).expand(len(prompts), 6)
    unet = pipe.unet
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.tensor(rng.sample(range(len(prompts)), batch_size))
        noise = torch.randn(latents[index].shape, generator=generator)
        t = torch.randint(0, base.noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = base.noise_scheduler.add_noise(latents[index], noise, t)
        pred = unet_forward(unet, noisy, t, embeds[index], _rows(pooled, index), _rows(time_ids, index))
        loss = torch.nn.functional.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    unet.eval()
    unet.requires_grad_(False)


def build_tiny_base(out_dir: Path, warmup_steps: int = 300, seed: int = 0, replace: bool = False,
                    arch: TinyArch = "sdxl") -> Path:
    """Write a tiny base as a normal diffusers folder that `StableDiffusionXLPipeline.from_pretrained` (`sdxl`)
    or `StableDiffusionPipeline.from_pretrained` (`sd15`) loads. Written to a temporary folder and renamed, so
    an interrupted build leaves nothing half-made, and processes that build it at once (`accelerate launch`)
    keep the first finished copy instead of deleting a folder another one may be reading; `replace=True`
    rebuilds an existing one."""
    import shutil

    out_dir = Path(out_dir)
    pipe = build_tiny_pipeline(seed, arch)  # first: an unknown arch must fail before `replace` deletes anything
    if replace and out_dir.exists():
        shutil.rmtree(out_dir)
    if warmup_steps:
        warm_up_tiny_base(pipe, warmup_steps, seed)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    pipe.save_pretrained(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process finished first (rename onto a non-empty folder fails): keep its copy
        shutil.rmtree(tmp)
    return out_dir
