"""Rectified-flow (flow-matching) training math shared by SD3, FLUX.1 and FLUX.2 klein: a base class the flow families
derive from, not a family itself.

Convention (Flow-DPO, Liu et al. 2025, arXiv 2501.13918; diffusers' FLUX LoRA example): with sigma in (0, 1],
    x_t = (1 - sigma) x_0 + sigma * noise,        target = noise - x_0   (the velocity),
and the DPO loss reads per-image mean squared errors of (prediction - target) exactly as for epsilon prediction
(`objectives.diffusion_dpo_loss`, 0.5 x beta convention). Shapes: latents, noise (B, C, h, w); sigmas and
timesteps (B,).

Sources (diffusers at commit 58eb52c0803ea9af3abec60841c2a093bdf1f951, https://github.com/huggingface/diffusers):
- examples/dreambooth/train_dreambooth_lora_sd3.py: sigma sampling L1784-1797 (`compute_density_for_timestep_sampling`,
  `indices = (u * num_train_timesteps).long()`, `timesteps = noise_scheduler_copy.timesteps[indices]`, sigmas looked
  up by `get_sigmas` L1711-1719), `noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise` L1797, the
  transformer call with `timestep=timesteps` L1800-1806, target L1818-1821, logit_mean 0.0 / logit_std 1.0 /
  mode_scale 1.29 / weighting_scheme "logit_normal" defaults L522-538.
- examples/dreambooth/train_dreambooth_lora_flux.py: the same sampling L1766-1779, `timestep=timesteps / 1000`
  L1800, `target = noise - model_input` L1820.
- src/diffusers/training_utils.py: `compute_density_for_timestep_sampling` L365-389 (logit-normal: sigmoid of a
  normal draw; "mode": Esser et al.'s mode density; else uniform); its loss weighting,
  `compute_loss_weighting_for_sd3` L392-407, is not applied (ones for these densities; Flow-DPO uses none).
- src/diffusers/schedulers/scheduling_flow_match_euler_discrete.py, `FlowMatchEulerDiscreteScheduler.__init__`
  (0.42.1 L127-135): the training grid `timesteps = linspace(1, N, N)[::-1]`, `sigmas = timesteps / N`, shifted by
  `shift * s / (1 + (shift - 1) * s)` only when `use_dynamic_shifting` is False (FLUX.1-dev's config sets it True,
  so at training time the FLUX example draws *unshifted* sigmas: the resolution-dependent shift is an inference-time
  `set_timesteps(mu=...)` thing), `self.timesteps = sigmas * N`.

Differences from the examples, on purpose: one draw per pair (the caller repeats sigma and noise for both images);
draws come from the caller's `torch.Generator` on its device, and the grid is computed on that device from the
drawn indices instead of looked up with `.nonzero().item()` (a host sync per image); the index is clamped to N - 1
(the "mode" density reaches u = 1, where the examples would index past the grid). SD3's example defaults to
`--precondition_outputs 1` (error on x_0 = x_t - sigma * v, i.e. sigma^2 x the velocity error); like its FLUX
example and Flow-DPO we train on the velocity error itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lora_dpo.models.families.family import Family

# the examples' --weighting_scheme ("none" is their name for uniform sampling: `compute_density_for_timestep_sampling`
# draws torch.rand for it)
WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "uniform")
SAMPLING_KEYS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale")
# the recipe's [model].timestep_sampling -> the examples' weighting_scheme (their "none" is uniform sampling)
SAMPLING_NAMES = {"logit_normal": "logit_normal", "uniform": "none", "mode": "mode"}


@dataclass
class FlowSchedule:
    """What `FlowFamily.training_scheduler` returns: the base's `FlowMatchEulerDiscreteScheduler` (its config sets
    the grid and the shift) and how training draws from it (the examples' --weighting_scheme, --logit_mean,
    --logit_std, --mode_scale). `config` is the scheduler's, so code that reads `num_train_timesteps` works as for
    a DDPM scheduler."""

    scheduler: Any
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    guidance: float | None = None  # FLUX dev's guidance-embedding input in training; None: the family's

    @property
    def config(self) -> Any:
        return self.scheduler.config


def shifted(sigmas: Tensor, shift: float) -> Tensor:
    """The scheduler's static shift s' = shift * s / (1 + (shift - 1) * s): shift > 1 moves every sigma up (more
    noise), the SD3 paper's resolution-dependent timestep shift (Esser et al. 2024, Sec. 5.3.2), as
    `FlowMatchEulerDiscreteScheduler` applies it (same float32 ops, so the same bits as its grid)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowFamily(Family):
    """The flow-matching half of a family: training scheduler, sigma sampling, noising, target. SD3 and FLUX add
    their parts, prompts and denoiser call. Timesteps are what the family's transformer takes (`timestep_scale`)."""

    flow_matching = True
    denoiser_folder = "transformer"
    default_weighting_scheme = "logit_normal"  # the family's LoRA example's --weighting_scheme default
    own_recipe_keys = ("timestep_sampling", "logit_mean", "logit_std", "mode_scale", "shift")  # sigma's density, shift
    denoiser_keys: tuple[str, ...] = ()  # config keys only its transformer has (a config without `_class_name`)
    tiny_transformer: Mapping[str, Any] = {}  # its tiny base's transformer config
    tiny_builder: str = ""  # the name of its module's tiny pipeline builder (`build_tiny_<name>_pipeline(seed)`)

    def owns_denoiser(self, config: Mapping[str, Any]) -> bool:
        """Its transformer class (`_class_name`), or, in a config without one, all of its `denoiser_keys`."""
        if "_class_name" in config:
            return config["_class_name"] == self.denoiser_class
        return bool(self.denoiser_keys) and set(self.denoiser_keys) <= set(config)

    def tiny_pipeline(self, seed: int = 0) -> Any:
        """Its tiny pipeline, from its own module's builder (T5 or Qwen3 encoders, its VAE)."""
        import sys

        return getattr(sys.modules[type(self).__module__], self.tiny_builder)(seed)

    def tiny_denoiser_config(self) -> dict[str, Any]:
        return dict(self.tiny_transformer)

    def owns_pipeline(self, model_index: Mapping[str, Any]) -> bool:
        """Its pipeline class (`model_index.json`), or its transformer class (a loaded pipeline's `config`)."""
        transformer = list(model_index.get("transformer") or [None])
        return model_index.get("_class_name") == self.pipeline_class or transformer[-1] == self.denoiser_class

    def trained_schedule(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """A rectified flow: the velocity is predicted, no DDPM schedule to rescale."""
        return {"prediction_type": "flow", "rescale_betas_zero_snr": False}

    def text_width(self, config: Mapping[str, Any]) -> int:
        """D of the prompt embeddings: the transformer's joint attention width (T5-XXL's 4096)."""
        return config["joint_attention_dim"]

    def pooled_width(self, config: Mapping[str, Any]) -> int:
        """P of the pooled CLIP embedding its time-text embedding reads."""
        return config["pooled_projection_dim"]

    def tiny_plan_parts(self) -> tuple[dict[str, Any], dict[str, Any], tuple[int, ...], int]:
        """From its tiny pipeline (built in a second: tiny parts, no warm-up): the VAE's and the scheduler's configs,
        the text encoders' parameter counts, and the prompt tokens of the shipped `text.json` (the tiny tokenizers
        pad to the real bases' lengths)."""
        pipe = self.tiny_pipeline(0)
        encoders = [getattr(pipe, name) for name in sorted(vars(pipe)) if name.startswith("text_encoder")]
        params = tuple(sum(p.numel() for p in encoder.parameters()) for encoder in encoders if encoder is not None)
        return (dict(pipe.vae.config), dict(pipe.scheduler.config), params,
                int(self.shipped_config("text")["max_length"]))

    # ---- noise, timesteps and the target -----------------------------------------------------------------
    def timestep_scale(self, schedule: FlowSchedule) -> float:
        """Transformer timestep per unit sigma: SD3 takes sigma * num_train_timesteps (the scheduler's own
        timesteps); FLUX overrides this with 1 (its pipeline and example pass timesteps / 1000)."""
        return float(schedule.config.num_train_timesteps)

    def training_scheduler(self, config: Mapping[str, Any], overrides: Mapping[str, Any]) -> FlowSchedule:
        """The base's flow scheduler and how to sample it. `overrides` (the recipe's keys): `weighting_scheme`,
        `logit_mean`, `logit_std`, `mode_scale` (sampling, the examples' names and defaults); `shift` (a static
        shift instead of the config's, dynamic shifting off); `guidance` (FLUX dev's guidance input)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        unknown = set(overrides) - {*SAMPLING_KEYS, "shift", "guidance"}
        if unknown:
            raise ValueError(f"{self.label}: unknown scheduler override(s) {sorted(unknown)}")
        values = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        if "shift" in overrides:
            values.update(shift=float(overrides["shift"]), use_dynamic_shifting=False)
        sampling = {"weighting_scheme": self.default_weighting_scheme,
                    **{k: overrides[k] for k in SAMPLING_KEYS if k in overrides}}
        scheme = sampling["weighting_scheme"]
        if scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"{self.label}: weighting_scheme {scheme!r}: choose one of {', '.join(WEIGHTING_SCHEMES)}")
        guidance = None if overrides.get("guidance") is None else float(overrides["guidance"])
        return FlowSchedule(FlowMatchEulerDiscreteScheduler.from_config(values), **sampling, guidance=guidance)

    def recipe_overrides(self, cfg: Any, config: Mapping[str, Any],
                         file_overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The recipe's flow keys ([model].timestep_sampling, logit_mean, logit_std, mode_scale, shift, guidance)
        that are set; unset ones leave the family's default (its LoRA example's) or the base's scheduler config.
        The DDPM keys (timesteps, rescale_betas_zero_snr) do not apply: the recipe's validation refuses them."""
        overrides: dict[str, Any] = {}
        if cfg.timestep_sampling is not None:
            overrides["weighting_scheme"] = SAMPLING_NAMES[cfg.timestep_sampling]
        for key in ("logit_mean", "logit_std", "mode_scale", "shift", "guidance"):
            if getattr(cfg, key) is not None:
                overrides[key] = getattr(cfg, key)
        return overrides

    def sample_sigmas(self, schedule: FlowSchedule, count: int, generator: torch.Generator) -> Tensor:
        """`count` sigmas (count,) float32 on the generator's device, as the examples draw them: u from the
        density, index = floor(u * N) into the scheduler's descending grid, sigma = that grid point (shifted by
        the config's static shift). Computed from the index, not looked up on the host: no sync."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        n = schedule.config.num_train_timesteps
        u = compute_density_for_timestep_sampling(
            weighting_scheme=schedule.weighting_scheme, batch_size=count, logit_mean=schedule.logit_mean,
            logit_std=schedule.logit_std, mode_scale=schedule.mode_scale, device=generator.device,
            generator=generator)
        index = (u * n).long().clamp_(0, n - 1)
        sigmas = (n - index).to(torch.float32) / n  # linspace(1, N, N)[::-1][index] / N, as the scheduler's grid
        if not schedule.config.use_dynamic_shifting:
            sigmas = shifted(sigmas, schedule.config.shift)
        return sigmas

    def sample_timesteps(self, scheduler: FlowSchedule, count: int, generator: torch.Generator,
                         allowed: tuple[int, ...] = ()) -> Tensor:
        """`count` timesteps (count,) as the transformer takes them (sigma x `timestep_scale`), one per pair."""
        if allowed:
            raise ValueError(f"{self.label}: [model].timesteps (a distilled base's few steps) is for DDPM bases only")
        return self.sample_sigmas(scheduler, count, generator) * self.timestep_scale(scheduler)

    def sigmas(self, schedule: FlowSchedule, timesteps: Tensor) -> Tensor:
        """sigma (B,) of the transformer's timesteps (B,)."""
        return timesteps.to(torch.float32) / self.timestep_scale(schedule)

    def add_noise(self, scheduler: FlowSchedule, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t = (1 - sigma) x_0 + sigma * noise (B, C, h, w), in the latents' dtype (the examples' L1797 / L1779)."""
        sigma = self.sigmas(scheduler, timesteps).to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
        return (1.0 - sigma) * latents + sigma * noise

    def target(self, scheduler: FlowSchedule, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The velocity noise - x_0 (B, C, h, w): d x_t / d sigma, what SD3 and FLUX predict."""
        return noise - latents


# --------------------------------------------------------------------------------------------------
# Tiny parts both flow bases share: an offline T5 tokenizer and encoder, a 16-channel VAE


def tiny_t5_tokenizer(max_length: int = 512) -> Any:
    """A T5 (Unigram, tokenizers-backed) tokenizer over the demo vocabulary, built in code: one piece per demo word
    (with T5's leading U+2581), the bare U+2581 and every letter, so any lower-case prompt encodes. Ids 0, 1, 2 are
    T5's <pad>, </s>, <unk>; no sentinel ids."""
    from transformers import T5TokenizerFast

    from lora_dpo import synthetic

    space = "\u2581"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (space, -3.0)]
    vocab += [(space + word, -1.0) for word in synthetic.WORDS]
    vocab += [(letter, -5.0) for letter in "abcdefghijklmnopqrstuvwxyz"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def tiny_t5_config(vocab_size: int, d_model: int = 64) -> dict[str, Any]:
    """A tiny T5 v1.1-style encoder (gated GELU, as T5-XXL): 2 layers, 4 heads of 16."""
    return dict(vocab_size=vocab_size, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
                is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


def tiny_flow_vae(scaling_factor: float, shift_factor: float) -> Any:
    """A 4-block AutoencoderKL with 16 latent channels and no quant convs, like SD3's and FLUX's VAEs (8x: 64 px ->
    8 x 8 latents), made near-deterministic as `models.tiny`'s: the log-variance half of the encoder's output
    pinned to its floor (there is no quant_conv to pin here)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=1, sample_size=64, force_upcast=False,
                        mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
                        scaling_factor=scaling_factor, shift_factor=shift_factor)
    with torch.no_grad():
        vae.encoder.conv_out.weight[16:].zero_()
        vae.encoder.conv_out.bias[16:].fill_(-30.0)
    return vae


def unwrapped_config(denoiser: Any) -> Any:
    """The denoiser's diffusers config through DDP / DeepSpeed (`.module`) and torch.compile (`._orig_mod`)."""
    while not hasattr(denoiser, "config") and (hasattr(denoiser, "module") or hasattr(denoiser, "_orig_mod")):
        denoiser = getattr(denoiser, "module", None) or denoiser._orig_mod
    return denoiser.config
