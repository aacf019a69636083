"""The built-in tiny bases, one per family (`Family.tiny_base`: `tiny` is SDXL's, `tiny-sd15` SD 1.5's, `tiny-sd3`
and `tiny-flux` the flow families'): pipelines small enough for a 2-core CPU, built from the family's tiny config
with random weights, warmed up on the demo images (the DDPM families'; the flow families' stay random), saved as
ordinary diffusers folders and cached."""

from __future__ import annotations

import hashlib
import logging
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from lora_dpo import files, synthetic
from lora_dpo.files import cache_home
from lora_dpo.models.families import TINY_BASES, Family, family_named, pipeline_family
from lora_dpo.models.parts import BaseModel, ModelError, embed_prompts, encode_images

log = logging.getLogger(__name__)

# Each family's tiny base lives in its cache folder under cache_home() (`Family.tiny_folder`): bump its version
# when that base's weights change, so that no stale cached copy is reused (v2: the VAE is trained to reconstruct
# and the UNet to denoise the demo images; v3: a VAE without mid-block attention, a UNet warmed up longer on the
# preferred images, with caption dropout; v4: the text encoders trained with the UNet, VAE 1200 and UNet 600 x 32
# steps; v5: `tiny` is the shipped copy of v4).
# The demo's base, built once (`build_tiny_base`, seed 0) on a 2-core x86 CPU and shipped with the package (9 MB):
# a build trains on the CPU it runs on, and CPUs round differently (a build on another machine drew other pictures,
# mean pixel difference 17/255), so every machine gets these bytes and the README's figures. `lora-dpo tiny-base`
# still builds one; a family without `tiny_shipped_sha256` (`tiny-sd15`) has its tiny base built on first use.
ASSETS = Path(__file__).parent.parent / "assets"  # a shipped tiny base: assets/<its tiny_folder>


def tiny_family(arch: str | Family) -> Family:
    """The family of a tiny base architecture: a family, or its name (one-line error for an unknown one)."""
    if isinstance(arch, Family):
        return arch
    try:
        return family_named(arch)
    except ModelError:
        raise ModelError(f"tiny base architecture {arch!r}: choose one of "
                         f"{', '.join(f.name for f in TINY_BASES.values())}") from None


def tiny_base_path(arch: str | Family = TINY_BASES["tiny"]) -> Path:
    """Where a built-in tiny base lives once built (it may not exist yet); the default: `tiny`'s."""
    return cache_home() / tiny_family(arch).tiny_folder


def base_location(name: str) -> str:
    """What `from_pretrained` needs for this base on this machine: a tiny base's cache folder, not `tiny`."""
    return str(tiny_base_path(TINY_BASES[name])) if name in TINY_BASES else name


def resolve_base(name: str) -> str:
    """A tiny base's name (`tiny`, `tiny-sd15`) -> the cached built-in tiny base (built on first use); anything
    else as is."""
    if name not in TINY_BASES:
        return name
    family = TINY_BASES[name]
    path = tiny_base_path(family)
    if (path / "model_index.json").is_file():
        return str(path)
    if family.tiny_shipped_sha256:
        install_shipped_base(family, path)
    else:
        log.info("building the %s base in %s (once, a few minutes of CPU)", name, path)
        build_tiny_base(path, arch=family)
    return str(path)


def folder_sha256(folder: Path) -> str:
    """sha256 over a folder's files: each one's path (relative, '/'-separated) and bytes, in sorted order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def shipped_base(family: Family) -> Path:
    """Where the family's shipped tiny base lies in the package (only a family with `tiny_shipped_sha256` has one)."""
    return ASSETS / family.tiny_folder


def install_shipped_base(family: Family, path: Path) -> Path:
    """Copy the family's shipped tiny base into `path` (the cache), after checking its bytes are the recorded ones.
    Written to a temporary folder and renamed; a process that finished first keeps its copy."""
    import shutil

    shipped = shipped_base(family)
    if not (shipped / "model_index.json").is_file() or folder_sha256(shipped) != family.tiny_shipped_sha256:
        raise ModelError(f"{shipped}: the shipped tiny base is missing or damaged (its sha256 is not the recorded "
                         "one): reinstall lora-dpo, or build one with `lora-dpo tiny-base FOLDER` and point "
                         "[model].base at it")
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_folder(path, replace=False) as tmp:
        shutil.copytree(shipped, tmp, dirs_exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------------
# What every family's tiny base shares: 64 px images, the VAE, the scheduler, the tiny CLIP encoders and tokenizer;
# each family's tiny denoiser config is its own (`Family.tiny_denoiser_config`), a constant the planner reads
# without building (or warming) a base.


TINY_RESOLUTION = 64
# The VAE's full-resolution block is narrow (8 channels): it sets the cost of training the VAE at build time.
# One norm group: group norms over a few channels each normalise colour away, and the VAE then learns it slowly.
# No mid-block attention: a fully convolutional VAE trained at 32 px carries over to 64 px (measured: test error at
# 64 px 0.045 against 0.083 with the attention, after the same 1500 steps at 32 px), and each step is cheaper.
TINY_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1, norm_num_groups=1, sample_size=TINY_RESOLUTION, force_upcast=False,
    mid_block_add_attention=False)

TINY_SCHEDULER: dict[str, Any] = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      num_train_timesteps=1000, prediction_type="epsilon",
                                      timestep_spacing="leading", steps_offset=1)


def tiny_text_config(vocab_size: int | None = None) -> dict[str, Any]:
    """The tiny CLIP text encoders' config, shared by every family's tiny base (a CLIPTextModelWithProjection adds
    the pooled projection, SDXL's text_embeds)."""
    return dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                vocab_size=vocab_size or len(tiny_tokenizer()), max_position_embeddings=77, projection_dim=32,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_tokenizer() -> Any:
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


def build_tiny_pipeline(seed: int = 0, arch: str | Family = TINY_BASES["tiny"]) -> Any:
    """A tiny pipeline of the family `arch` (a family or its name; default: `tiny`'s) with random weights: a 4-block
    VAE (64 px -> 8x8 latents, made near-deterministic like the real ones), an offline tokenizer and a tiny CLIP
    text encoder for each of the family's, the family's tiny denoiser; built by the family's pipeline class."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from transformers import CLIPTextConfig

    family = tiny_family(arch)  # fails on an unknown arch before any weight is drawn
    own = family.tiny_pipeline(seed)  # a flow family's: T5 encoders and a 16-channel VAE, its own builder
    if own is not None:
        return own
    denoiser_config = family.tiny_denoiser_config()
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    text_config = CLIPTextConfig(**tiny_text_config(len(tokenizer)))
    # Weights are drawn in this order (denoiser, VAE, encoders): another order would change every seed's base
    denoiser = getattr(diffusers, family.denoiser_class)(**denoiser_config)
    vae = AutoencoderKL(**TINY_VAE)
    with torch.no_grad():  # pin the log-variance half of the posterior to its floor: a near-deterministic VAE
        vae.quant_conv.weight[4:].zero_()
        vae.quant_conv.bias[4:].fill_(-30.0)
    encoders = tuple(getattr(transformers, part.encoder_class)(text_config) for part in family.text_parts)
    tokenizers = (tokenizer, *(tiny_tokenizer() for _ in family.text_parts[1:]))
    return family.build_pipeline(denoiser, vae, EulerDiscreteScheduler(**TINY_SCHEDULER), tokenizers, encoders)


def _demo_batch(n: int, seed: int) -> tuple[list[str], Tensor]:
    """Demo prompts and both images of each pair (chosen at even rows, rejected at odd ones) as pixels in
    [-1, 1] at the tiny resolution."""
    prompts, images = [], []
    for index in range(n):
        prompt, chosen, rejected = synthetic.make_pair(index, TINY_RESOLUTION, seed)
        prompts += [prompt, prompt]
        images += [chosen, rejected]
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    return prompts, pixels.float() / 127.5 - 1.0


# The generating build's schedule (measured on a 2-core CPU, one thread: see docs/demo.md). The VAE sees both
# sides of the demo pairs (DPO encodes both); its error at 64 px falls from 0.077 (600 steps) to 0.045 (1500).
VAE_STEPS, VAE_LR, VAE_BATCH = 1200, 2e-3, 8
# The UNet and the text encoders: batch 32 costs only ~2x batch 8 on a CPU (small ops, fixed overhead), so few
# large steps at a high, cosine-decayed rate; measured with the encoders trained: 600 x 32 draws the prompt's shape
# (in its colour for red, blue, yellow), 400 x 32 rougher forms on yellowish backgrounds; frozen encoders, blobs.
WARMUP_STEPS, WARMUP_LR, WARMUP_BATCH = 600, 4e-3, 32
# 10 % of captions are dropped to the pipelines' unconditional input, so that classifier-free guidance works.
WARMUP_CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0  # min-SNR loss weighting: the low-noise steps, easy and many, stop dominating a short warm-up


def train_tiny_vae(vae: Any, pixels: Tensor, steps: int, seed: int = 0, batch_size: int = VAE_BATCH,
                   lr: float = VAE_LR) -> float:
    """Train the VAE to reconstruct `pixels` ([-1, 1]) from its posterior mean for `steps` steps, at half their
    resolution (a quarter of the cost; the convolutions carry over to full size); return the last batch's mean
    squared error. The pinned log-variance half of the posterior stays pinned (it gets no
    gradient through the mean, and Adam has no weight decay), so the VAE stays near-deterministic."""
    pixels = torch.nn.functional.avg_pool2d(pixels, 2)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(steps, 1))
    vae.train()
    loss = torch.zeros(())
    for _ in tqdm(range(steps), desc="tiny base: VAE", unit="step", disable=None):  # the build takes minutes
        batch = pixels[torch.randint(0, len(pixels), (batch_size,), generator=generator)]
        loss = torch.nn.functional.mse_loss(vae.decode(vae.encode(batch).latent_dist.mean).sample, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval()
    vae.requires_grad_(False)
    return float(loss.detach())


def _warmup_factor(step: int, steps: int) -> float:
    """The warm-up's learning-rate factor: a linear ramp over the first 5 % of steps, then a cosine decay to 0."""
    ramp = max(1, steps // 20)
    if step < ramp:
        return (step + 1) / ramp
    return 0.5 * (1.0 + math.cos(math.pi * (step - ramp) / max(1, steps - ramp)))


def warm_up_tiny_base(pipe: Any, steps: int, seed: int = 0, batch_size: int = WARMUP_BATCH, lr: float = WARMUP_LR,
                      vae_steps: int = 0, caption_dropout: float = WARMUP_CAPTION_DROPOUT) -> None:
    """Train the VAE to reconstruct demo images for `vae_steps` steps (0: keep it random), calibrate its scaling
    factor to unit latent std, then pre-train the whole UNet and the text encoders together for `steps`
    denoising steps on the demo's preferred images. A cold random UNet learns no preference; a warmed one
    does, as a real pretrained base would (measured: held-out accuracy ~0.5 cold, 1.00 warm); with a trained VAE
    it also generates. Only the preferred side is learnt: on both sides, each prompt's images are half of them
    dim and wrongly coloured, and the short warm-up then draws dim blobs whose colour ignores the prompt (measured
    with the text encoders trained too; docs/demo.md)."""
    from diffusers import DDPMScheduler

    family = pipeline_family(pipe)
    encoders = tuple(getattr(pipe, part.encoder) for part in family.text_parts)
    base = BaseModel(source="tiny", unet=pipe.unet, noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
                     family=family, vae=pipe.vae, text_encoders=encoders,
                     tokenizers=tuple(getattr(pipe, part.tokenizer) for part in family.text_parts))
    prompts, pixels = _demo_batch(256, seed=seed + 10_000)  # demo-style images, not the training pairs
    if vae_steps:
        error = train_tiny_vae(pipe.vae, pixels, vae_steps, seed)
        log.info("tiny VAE: %d steps, reconstruction error %.4f", vae_steps, error)
    prompts, pixels = prompts[::2], pixels[::2]  # the chosen images
    pipe.vae.register_to_config(scaling_factor=1.0)
    with torch.no_grad():
        latents = encode_images(pipe.vae, pixels)
        pipe.vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
        latents = latents * pipe.vae.config.scaling_factor
    # The text encoders are trained with the UNet: random tiny CLIP encoders barely tell "red" from "blue".
    # The demo has few distinct prompts, so each step embeds them all once (with gradients) and picks rows. A
    # dropped caption is what the pipelines feed the unconditional half of guidance: zeros where the pipeline says
    # force_zeros_for_empty_prompt (SDXL), else the empty prompt's embedding, learnt with the rest (the last row).
    zeros = bool(pipe.config.get("force_zeros_for_empty_prompt", False))
    distinct = sorted(set(prompts)) + ([] if zeros else [""])
    rows = torch.tensor([distinct.index(p) for p in prompts])
    size = TINY_RESOLUTION
    time_ids = None  # a family without geometry (SD 1.5) has no pooled embedding either: its denoise reads neither
    if family.uses_geometry:
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).expand(batch_size, 6)
    unet = pipe.unet
    trained = [unet, *encoders]
    for module in trained:
        module.train()
        module.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for module in trained for p in module.parameters()], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup_factor(step, steps))
    alphas = base.noise_scheduler.alphas_cumprod
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="tiny base: UNet and text encoders", unit="step", disable=None):
        index = rng.sample(range(len(prompts)), batch_size)
        every_embeds, every_pooled = embed_prompts(base, distinct, torch.device("cpu"))
        embeds = every_embeds[rows[index]]
        pooled = None if every_pooled is None else every_pooled[rows[index]]
        keep = (torch.rand(batch_size, generator=generator) >= caption_dropout).float()[:, None, None]
        empty = torch.zeros(()) if zeros else every_embeds[-1]
        embeds = embeds * keep + empty * (1.0 - keep)
        pooled = None if pooled is None else pooled * keep[:, 0]
        noise = torch.randn(latents[index].shape, generator=generator)
        t = torch.randint(0, base.noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        noisy = base.noise_scheduler.add_noise(latents[index], noise, t)
        pred = family.denoise(unet, noisy, t, embeds, pooled, time_ids)
        snr = alphas[t] / (1.0 - alphas[t])
        weight = snr.clamp(max=MIN_SNR_GAMMA) / snr
        loss = ((pred - noise) ** 2).mean(dim=(1, 2, 3)).mul(weight).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    for module in trained:
        module.eval()
        module.requires_grad_(False)


def build_tiny_base(out_dir: Path, warmup_steps: int = WARMUP_STEPS, seed: int = 0, replace: bool = False,
                    arch: str | Family = TINY_BASES["tiny"], vae_steps: int | None = None) -> Path:
    """Write the tiny base of the family `arch` (a family or its name; default: `tiny`'s) as a normal diffusers
    folder that its pipeline class's `from_pretrained` loads. Written to a temporary folder and renamed, so
    an interrupted build leaves nothing half-made, and processes that build it at once (`accelerate launch`)
    keep the first finished copy instead of deleting a folder another one may be reading; `replace=True`
    rebuilds an existing one. `vae_steps` None: `VAE_STEPS` when the base is warmed up at all, else 0 (a cold
    base, `warmup_steps=0`, is random throughout and built in seconds)."""
    import shutil

    out_dir = Path(out_dir)
    pipe = build_tiny_pipeline(seed, arch)  # first: an unknown arch must fail before `replace` deletes anything
    if replace and out_dir.exists():
        shutil.rmtree(out_dir)
    family = tiny_family(arch)
    if warmup_steps and not family.tiny_warm_up:  # the warm-up trains a DDPM UNet: a flow base stays random
        log.info("%s: its tiny base is not warmed up (random weights)", family.label)
        warmup_steps = 0
    if warmup_steps:
        warm_up_tiny_base(pipe, warmup_steps, seed, vae_steps=VAE_STEPS if vae_steps is None else vae_steps)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_folder(out_dir, replace=False) as tmp:  # another process finished first: keep its copy
        pipe.save_pretrained(tmp)
    return out_dir
