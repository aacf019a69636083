"""FLUX.1 (double- and single-stream MMDiT, rectified flow): `FluxPipeline`, `FluxTransformer2DModel` on 2 x 2
packed latents, CLIP-L (pooled only) and T5-XXL (tokens), a 16-channel VAE with shift and scaling factors. dev is
guidance-distilled (a guidance embedding), schnell is not.

Where the numbers come from:
- configs/flux/transformer.json (FLUX.1-dev): `FluxTransformer2DModel`'s class defaults, which are FLUX.1's
  (diffusers 0.42.1 transformer_flux.py L613-626: patch 1 on 64 packed channels, 19 double + 38 single blocks,
  24 heads of 128, joint_attention_dim 4096, pooled_projection_dim 768, rope axes 16/56/56), with
  guidance_embeds true for dev (diffusers' scripts/convert_flux_to_diffusers.py L288-289: `guidance_embeds=
  has_guidance`); BFL's reference "flux-dev" parameters agree (depth 19, depth_single_blocks 38, hidden_size 3072,
  num_heads 24, axes_dim [16, 56, 56], context_in_dim 4096, vec_in_dim 768, guidance_embed True; as quoted by
  github.com/hpcaitech/Open-Sora configs/diffusion/inference/plugins/t2i2v.py).
- configs/flux/vae.json: SD3's VAE config with scaling_factor 0.3611 and shift_factor 0.1159
  (convert_flux_to_diffusers.py L298-300).
- configs/flux/scheduler.json: FLUX.1-dev's published scheduler config (huggingface.co black-forest-labs/FLUX.1-dev
  scheduler/scheduler_config.json, as its hub duplicates show it): shift 3.0, use_dynamic_shifting true,
  base_shift 0.5, max_shift 1.15, base_image_seq_len 256, max_image_seq_len 4096. schnell: shift 1.0, no dynamic
  shifting.
- Training sigmas: train_dreambooth_lora_flux.py (diffusers @58eb52c) draws u with `--weighting_scheme` default
  "none" (L543-548: uniform sampling, uniform loss; so do its flux2 / klein / kontext siblings) and indexes the
  scheduler's training grid (L1766-1779). With dev's use_dynamic_shifting the grid is unshifted
  (`FlowMatchEulerDiscreteScheduler.__init__` applies `shift` only without dynamic shifting), so the example trains
  on sigma = the uniform draw itself, at every resolution; the mu(image_seq_len) shift
  (`pipeline_flux.calculate_shift`) happens only in the pipeline's `set_timesteps`. `training_scheduler` follows the
  example.
- denoise: train_dreambooth_lora_flux.py L1753-1812 and `FluxPipeline.__call__` (0.42.1 L846-851, L901-911):
  `_pack_latents`, `_prepare_latent_image_ids` (h/2 x w/2 ids), text ids zeros (S, 3), `timestep = sigma`
  (the pipeline passes t / 1000), guidance 1.0 when `guidance_embeds`: what every command of the example's
  README_flux.md sets (`--guidance_scale=1`, L105, L159, L230), as kohya's and ai-toolkit's FLUX LoRA trainers do
  (the script's own default, L497-501, is 3.5); `_unpack_latents`.
- encode_prompts: `FluxPipeline.encode_prompt` (pipeline_flux.py L217-265 T5, L267-310 CLIP pooler_output);
  max_sequence_length 512 (its default and maximum).
- LoRA targets: train_dreambooth_lora_flux.py L1255-1270 (attention of both streams, which also matches the single
  blocks' attn.to_q/k/v, and the double blocks' feed-forwards).
- kohya names and metadata: sd-scripts (@48d368f) networks/lora_flux.py L708-714 (`lora_unet` prefix "make ComfyUI
  compatible", BFL module names), library/flux_utils.py L23 (ss_base_model_version "flux1"),
  library/sai_model_spec.py L76-77, L204-213 ("flux-1-dev" / "flux-1-schnell"), L93 (implementation).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lora_dpo.models.families.family import TextPart
from lora_dpo.models.families.flow import (
    FlowFamily,
    FlowSchedule,
    tiny_flow_vae,
    tiny_t5_config,
    tiny_t5_tokenizer,
    unwrapped_config,
)

# The tiny transformer: 1 double and 1 single block, 2 heads of 16 (rope axes 4 + 6 + 6 = 16); 64 packed channels
# (16 latent channels x 2 x 2); joint_attention_dim: the tiny T5's width; pooled_projection_dim: the tiny CLIP-L's
# hidden size (FLUX pools CLIPTextModel's pooler_output, not a projection).
TINY_FLUX_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=(4, 6, 6))
TINY_FLUX_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)
TINY_FLUX_VAE_FACTORS = (0.3611, 0.1159)  # FLUX's scaling and shift factors

# diffusers name in a double block -> BFL name; in a single block -> BFL name
_DOUBLE = {
    "attn.to_q": "img_attn.qkv", "attn.to_k": "img_attn.qkv", "attn.to_v": "img_attn.qkv",
    "attn.add_q_proj": "txt_attn.qkv", "attn.add_k_proj": "txt_attn.qkv", "attn.add_v_proj": "txt_attn.qkv",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
}
_SINGLE = {"attn.to_q": "linear1", "attn.to_k": "linear1", "attn.to_v": "linear1", "proj_mlp": "linear1",
           "proj_out": "linear2", "norm.linear": "modulation.lin"}
_FUSED = {"to_q": 0, "to_k": 1, "to_v": 2, "add_q_proj": 0, "add_k_proj": 1, "add_v_proj": 2, "proj_mlp": 3}
# BFL names outside the blocks -> diffusers' (convert_flux_transformer_checkpoint_to_diffusers); the final layer's
# modulation stores (shift, scale), diffusers' (scale, shift)
_TOP = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out",
        "final_layer.adaLN_modulation.1": "norm_out.linear"}
# the qk RMS norms' `scale` in a double block and in a single block -> diffusers' norm modules (their `weight`)
_NORMS = {"img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
          "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k"}
_SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}


def image_ids(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The packed latents' position ids (rows * cols, 3): (0, row, col), as `FluxPipeline._prepare_latent_image_ids`
    (pipeline_flux.py L508-520) but made on `device` (the pipeline builds them on the host and copies)."""
    grid = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    grid[..., 1] += torch.arange(rows, device=device, dtype=dtype)[:, None]
    grid[..., 2] += torch.arange(cols, device=device, dtype=dtype)[None, :]
    return grid.reshape(rows * cols, 3)


class FluxFamily(FlowFamily):
    name = "flux"
    label = "FLUX.1"
    tiny_base = "tiny-flux"
    tiny_folder = "tiny-flux-v1"  # random weights, not warmed up (`tiny_warm_up`)
    tiny_warm_up = False
    pipeline_class = "FluxPipeline"
    cfg_doubles_batch = False  # dev is guidance-distilled: the scale is the guidance embedding's input, one pass
    denoiser_class = "FluxTransformer2DModel"
    hub_ids = ("black-forest-labs/FLUX.1-dev",)
    # its double blocks: BFL's flux1-dev.safetensors keeps them bare, ComfyUI's checkpoints under the UNet prefix
    checkpoint_markers = ("double_blocks.", "model.diffusion_model.double_blocks.")
    metadata_markers = ("flux-1", "flux1", "flux.1")  # modelspec.architecture, ss_base_model_version; hub ids
    text_parts = (TextPart("tokenizer", "text_encoder", "CLIPTextModel"),
                  TextPart("tokenizer_2", "text_encoder_2", "T5EncoderModel", "T5TokenizerFast"))
    default_resolution = 1024
    max_sequence_length = 512  # T5 tokens (FluxPipeline.encode_prompt's default and maximum)
    prompt_tokens = max_sequence_length  # T5's alone (`encode_prompts`)
    guidance_scale = 1.0  # dev's guidance embedding at training time: README_flux.md's --guidance_scale=1
    default_weighting_scheme = "none"  # uniform sigmas: the FLUX LoRA example's --weighting_scheme default
    own_recipe_keys = (*FlowFamily.own_recipe_keys, "guidance")  # and dev's guidance embedding's input
    default_target_modules = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                              "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                              "ff_context.net.0.proj", "ff_context.net.2")
    modelspec_architecture = "flux-1-dev"
    modelspec_implementation = "https://github.com/black-forest-labs/flux"
    kohya_implementation = modelspec_implementation  # BFL / SAI module names in the kohya file
    card_tags = ("flux", "flux-diffusers")
    denoiser_keys = ("num_single_layers", "axes_dims_rope")
    tiny_transformer = TINY_FLUX_TRANSFORMER
    tiny_builder = "build_tiny_flux_pipeline"

    # ---- parts -------------------------------------------------------------------------------------------
    def latent_channels(self, config: Mapping[str, Any]) -> int:
        """The VAE's 16: the transformer's in_channels (64) are 2 x 2 packed latents."""
        return config["in_channels"] // 4

    def unpack_latents(self, latents: Tensor, height: int, width: int) -> Tensor:
        """The pipeline's packed latent output (B, h/2 * w/2, 4C) -> (B, C, h, w) of a height x width image."""
        from diffusers import FluxPipeline

        return FluxPipeline._unpack_latents(latents, height, width, 8)

    def original_denoiser_config(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """The block counts and the guidance embedding from the file's keys (a schnell file has no `guidance_in`,
        a pruned one fewer blocks); the widths stay FLUX.1's (the rope axes cannot be read from the weights)."""
        names = [k.removeprefix("model.diffusion_model.") for k in shapes]
        double = {int(k.split(".")[1]) for k in names if k.startswith("double_blocks.")}
        single = {int(k.split(".")[1]) for k in names if k.startswith("single_blocks.")}
        if not double or not single:
            return {}
        return {"num_layers": max(double) + 1, "num_single_layers": max(single) + 1,
                "guidance_embeds": any(k.startswith("guidance_in.") for k in names)}

    def original_denoiser_state(self, checkpoint: Mapping[str, Tensor],
                                config: Mapping[str, Any]) -> dict[str, Tensor]:
        """BFL's transformer weights (bare or under `model.diffusion_model.`) in diffusers' names, for any width:
        diffusers' own converter assumes FLUX.1's 3072 (its single-block split). The fused weights split as
        `fused_slice` places each module's rows (q, k, v at 0, H, 2H; a single block's MLP input at 3H, 4H rows),
        the final modulation's halves swapped; keys of other parts (a VAE, text encoders) are left out."""
        out: dict[str, Tensor] = {}
        for key, tensor in checkpoint.items():
            module, leaf = key.removeprefix("model.diffusion_model.").rsplit(".", 1)
            leaf = "weight" if leaf == "scale" else leaf
            match = re.fullmatch(r"(double_blocks|single_blocks)\.(\d+)\.(.+)", module)
            if match is None:
                if module in _TOP:
                    value = torch.cat(tensor.chunk(2)[::-1]) if module == "final_layer.adaLN_modulation.1" else tensor
                    out[f"{_TOP[module]}.{leaf}"] = value
                continue
            double = match.group(1) == "double_blocks"
            prefix = f"{'transformer_blocks' if double else 'single_transformer_blocks'}.{match.group(2)}."
            norms, names = (_NORMS, _DOUBLE) if double else (_SINGLE_NORMS, _SINGLE)
            if match.group(3) in norms:
                out[f"{prefix}{norms[match.group(3)]}.{leaf}"] = tensor
            for name in (name for name, native in names.items() if native == match.group(3)):
                rows = self.fused_slice(prefix + name, config)
                out[f"{prefix}{name}.{leaf}"] = tensor if rows is None else tensor.narrow(*rows)
        return out

    # ---- prompts and the denoiser ------------------------------------------------------------------------
    def encode_prompts(self, tokenizers: tuple[Any, ...], encoders: tuple[Any, ...], prompts: list[str],
                       device: torch.device) -> tuple[Tensor, Tensor]:
        """T5's last hidden state (B, 512, D_t5) and CLIP-L's pooler output (B, D_l), as `FluxPipeline.encode_prompt`
        (the text ids it also returns are zeros, rebuilt in `denoise`)."""
        clip_tokenizer, t5_tokenizer = tokenizers
        clip, t5 = encoders
        ids = clip_tokenizer(prompts, padding="max_length", max_length=clip_tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        pooled = clip(ids, output_hidden_states=False).pooler_output.to(clip.dtype)
        ids = t5_tokenizer(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                           return_tensors="pt").input_ids.to(device)
        return t5(ids, output_hidden_states=False)[0].to(t5.dtype), pooled

    def timestep_scale(self, schedule: FlowSchedule) -> float:
        """FLUX's transformer takes sigma (t / 1000) and scales it by 1000 itself."""
        return 1.0

    def guidance(self, denoiser: Any, count: int, device: torch.device, value: float | None = None) -> Tensor | None:
        """The guidance embedding's input (count,) float32 for a guidance-distilled base (dev), None otherwise:
        `value` ([model].guidance), else the family's `guidance_scale`."""
        if not unwrapped_config(denoiser).guidance_embeds:
            return None
        scale = self.guidance_scale if value is None else value
        return torch.full((count,), scale, device=device, dtype=torch.float32)

    def denoise(self, denoiser: Any, noisy: Tensor, timesteps: Tensor, embeds: Tensor, pooled: Tensor | None,
                geometry: Tensor | None, schedule: Any = None) -> Tensor:
        """The velocity (B, C, h, w): latents packed into (B, h/2 * w/2, 4C) tokens with their (h/2 * w/2, 3)
        position ids, text ids zeros (S, 3), timesteps = sigma (B,), dev's guidance; the output unpacked."""
        from diffusers import FluxPipeline

        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        img_ids = image_ids(height // 2, width // 2, noisy.device, embeds.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=embeds.dtype)
        guidance = self.guidance(denoiser, batch, noisy.device, getattr(schedule, "guidance", None))
        out = denoiser(hidden_states=packed, timestep=timesteps, guidance=guidance,
                       pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids,
                       return_dict=False)[0]
        # _unpack_latents takes pixel sizes and the VAE's factor; any factor f with (h f, w f) gives (h, w) back
        return FluxPipeline._unpack_latents(out, height * 8, width * 8, 8)

    # ---- the files people load ---------------------------------------------------------------------------
    def _native(self, module: str) -> str:
        module = module.removeprefix("transformer.")
        match = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
        names = {"transformer_blocks": ("double_blocks", _DOUBLE),
                 "single_transformer_blocks": ("single_blocks", _SINGLE)}.get(match.group(1) if match else "")
        if not names or match.group(3) not in names[1]:
            raise ValueError(f"{self.label}: no kohya / ComfyUI name known for module {module!r}")
        return f"{names[0]}.{match.group(2)}.{names[1][match.group(3)]}"

    def kohya_module_name(self, module: str, config: Mapping[str, Any]) -> str:
        """`lora_unet_<BFL name>` as sd-scripts' lora_flux names it and ComfyUI maps it: a double block's to_q /
        to_k / to_v land in `double_blocks_<i>_img_attn_qkv`, a single block's q, k, v and proj_mlp in its fused
        `single_blocks_<i>_linear1` (see `fused_slice`)."""
        return "lora_unet_" + self._native(module).replace(".", "_")

    def fused_slice(self, module: str, config: Mapping[str, Any]) -> tuple[int, int, int] | None:
        """(dim, offset, size) of this module's rows in its fused BFL weight, as ComfyUI's `flux_to_diffusers`
        offsets: q, k, v at 0, H, 2H and a single block's proj_mlp at 3H (size 4H), H = heads x head dim; None if
        the module is not fused."""
        last = module.rsplit(".", 1)[-1]
        if last not in _FUSED or (last == "proj_mlp" and "single_transformer_blocks" not in module):
            return None
        width = config["num_attention_heads"] * config["attention_head_dim"]
        return 0, _FUSED[last] * width, 4 * width if last == "proj_mlp" else width

    def modelspec_architecture_for(self, config: Mapping[str, Any]) -> str:
        """"flux-1-dev" for a guidance-distilled transformer, "flux-1-schnell" without the guidance embedding."""
        return "flux-1-dev" if config.get("guidance_embeds") else "flux-1-schnell"

    def base_model_version(self, prediction_type: str) -> str:
        return "flux1"


FAMILY = FluxFamily()


def build_tiny_flux_pipeline(seed: int = 0, guidance: bool = True) -> Any:
    """A tiny `FluxPipeline` with random weights, offline: the tiny transformer (`guidance`: dev-like, with the
    guidance embedding; False: schnell-like), a 16-channel VAE (64 px -> 8 x 8 latents -> 16 packed tokens), a tiny
    CLIP-L (`CLIPTextModel`, the demo tokenizer) and T5 (its tokenizer built in code), dev's scheduler config
    (schnell-like: shift 1, no dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from lora_dpo.models.tiny import tiny_text_config, tiny_tokenizer

    torch.manual_seed(seed)
    clip_tokenizer, t5_tokenizer = tiny_tokenizer(), tiny_t5_tokenizer(FluxFamily.max_sequence_length)
    transformer = FluxTransformer2DModel(**{**TINY_FLUX_TRANSFORMER, "guidance_embeds": guidance})
    vae = tiny_flow_vae(*TINY_FLUX_VAE_FACTORS)
    clip = CLIPTextModel(CLIPTextConfig(**tiny_text_config(len(clip_tokenizer))))
    t5 = T5EncoderModel(T5Config(**tiny_t5_config(len(t5_tokenizer), TINY_FLUX_TRANSFORMER["joint_attention_dim"])))
    schedule = TINY_FLUX_SCHEDULER if guidance else {**TINY_FLUX_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**schedule), vae=vae, text_encoder=clip,
                        tokenizer=clip_tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer,
                        transformer=transformer)
