"""FLUX.2 klein (double- and single-stream MMDiT, rectified flow): `Flux2KleinPipeline`, `Flux2Transformer2DModel`
on 2 x 2 patchified latent tokens, one Qwen3 text encoder (three hidden layers stacked), `AutoencoderKLFlux2` (32
latent channels, normalised by the VAE's batch-norm running statistics instead of a scaling factor). No guidance
embedding (klein's `guidance_embeds` is False); the distilled klein-4B and the undistilled klein-base-4B share it all.

Latents here are (B, 32, h, w) at h = H/8, normalised as the pipeline does it (patchified, minus the batch-norm
mean, over its std) and put back in the VAE's layout; `denoise` patchifies them to (B, 128, h/2, w/2) and packs
those into tokens. Patchify is a permutation: noise, the velocity and the per-image MSE are the same numbers in
either layout, and every other part of lora-dpo keeps its (B, C, H/8, W/8) latents.

Where the numbers come from (diffusers at 58eb52c0803ea9af3abec60841c2a093bdf1f951 unless said; 0.42.1 installed):
- configs/flux2/transformer.json: scripts/convert_flux2_to_diffusers.py L408-429 ("klein-4b": 5 double and 20
  single blocks, 24 heads of 128, joint_attention_dim 7680, rope axes 32 x 4, theta 2000, guidance_embeds False).
- configs/flux2/vae.json: `AutoencoderKLFlux2`'s class defaults, what the conversion script builds (L488).
- configs/flux2/scheduler.json: FLUX.1-dev's scheduler, which the conversion script saves with FLUX.2 (L518-519).
- encode_prompts: `Flux2KleinPipeline._get_qwen3_prompt_embeds` / `encode_prompt` (0.42.1 pipeline_flux2_klein.py
  L208-263, L429-461): the chat template with the prompt as a user message (no thinking), padded to 512 tokens,
  hidden states 9, 18 and 27 stacked on width -> (B, 512, 3 D). The LoRA example's --text_encoder_out_layers
  default is (10, 20, 30) (train_dreambooth_lora_flux2_klein.py L359-364): we follow the pipeline, which is what
  the adapter meets at inference.
- denoise: the pipeline's transformer call (L850-862: `timestep / 1000`, guidance None, text ids (B, S, 4) of
  (0, 0, 0, l), latent ids (B, h/2 * w/2, 4) of (0, i, j, 0)) and the example's (L1828-1873).
- latents: the example L1214-1217, L1828-1829 and `_encode_vae_image` (pipeline L464-477, the posterior's mode):
  patchify, (x - running_mean) / sqrt(running_var + batch_norm_eps); the pipeline's latent output (L906-918) is
  already back in the VAE's space (unnormalised, unpatchified), what `vae.decode` takes.
- Training sigmas: the example's --weighting_scheme default "none" (uniform, L591-596) indexing the scheduler's
  grid (L1838-1851), unshifted under use_dynamic_shifting; `FlowFamily.sample_sigmas`.
- LoRA targets: the example's default list (L1294-1303): to_k, to_q, to_v, to_out.0 (double blocks' attention),
  to_qkv_mlp_proj and each single block's attn.to_out (indices 0..23: klein-9B's 24, klein-4B's 20 of them).
- kohya names: none. sd-scripts (kohya-ss/sd-scripts networks/, as stored here) has lora_flux.py and lora_sd3.py
  but no FLUX.2 network, and the ComfyUI source readable here (comfy/utils.py @00728eb) predates FLUX.2; the
  adapter file is diffusers' `transformer.` file (`Flux2KleinPipeline.load_lora_weights` reads it), and a kohya
  export is refused in one line (`kohya_format`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lora_dpo.models.families.family import TextPart
from lora_dpo.models.families.flow import FlowFamily

# The tiny transformer: 1 double and 1 single block, 2 heads of 16 (rope axes 4 x 4); 128 patchified channels
# (32 latent channels x 2 x 2, the real VAE's); joint_attention_dim: 3 x the tiny Qwen3's width (16).
TINY_FLUX2_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=128, out_channels=None, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32, mlp_ratio=3.0,
    axes_dims_rope=(4, 4, 4, 4), rope_theta=2000, guidance_embeds=False)
# FLUX.1-dev's scheduler config, as the conversion script pairs it with FLUX.2 (dynamic shifting: the pipeline's mu)
TINY_FLUX2_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                            base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096)
# A tiny Qwen3 deep enough for the pipeline's hidden layers 9, 18 and 27 (hidden_states[27]: 27 layers)
TINY_QWEN3: dict[str, Any] = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=27, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
                                  tie_word_embeddings=True, use_cache=False)
# What Qwen3's chat template renders for one user message with add_generation_prompt and enable_thinking=False
# (the empty think block); the tiny tokenizer carries this much of it.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}")


class Flux2Family(FlowFamily):
    name = "flux2"
    label = "FLUX.2 klein"
    tiny_base = "tiny-flux2"
    tiny_folder = "tiny-flux2-v1"  # random weights, not warmed up (`tiny_warm_up`)
    tiny_warm_up = False
    pipeline_class = "Flux2KleinPipeline"
    # do_classifier_free_guidance: guidance_scale > 1 and not is_distilled (a step-distilled klein runs one pass;
    # the plan, which reads no model_index.json, prices two)
    cfg_doubles_batch = True
    # BFL's files are recognised (`checkpoint_markers`) but not loaded: diffusers 0.42.1 loads no AutoencoderKLFlux2
    # from a single file, and its original layout's model_index (is_distilled) is not in the file
    single_file_loadable = False
    denoiser_class = "Flux2Transformer2DModel"
    vae_class = "AutoencoderKLFlux2"
    pipeline_config_keys = ("is_distilled",)  # klein-4B: step-distilled, sampled without CFG; klein-base-4B: not
    hub_ids = ("black-forest-labs/FLUX.2-klein-4B", "black-forest-labs/FLUX.2-klein-base-4B")
    # BFL's FLUX.2 files: the shared modulation FLUX.1 has not (its double blocks would match FLUX.1's markers too),
    # the key diffusers tells FLUX.2 files by (0.42.1 loaders/single_file_utils.py L152, CHECKPOINT_KEY_NAMES)
    checkpoint_markers = ("single_stream_modulation.lin.", "model.diffusion_model.single_stream_modulation.lin.")
    # modelspec.architecture, ss_base_model_version, and hub ids (`FLUX.2-klein-...`)
    metadata_markers = ("flux-2", "flux2", "flux.2")
    text_parts = (TextPart("tokenizer", "text_encoder", "Qwen3ForCausalLM", "Qwen2TokenizerFast"),)
    default_resolution = 1024
    max_sequence_length = 512  # Qwen3 tokens (Flux2KleinPipeline.encode_prompt's default)
    prompt_tokens = max_sequence_length
    hidden_layers = (9, 18, 27)  # Flux2KleinPipeline.encode_prompt's text_encoder_out_layers default
    default_weighting_scheme = "none"  # uniform sigmas: the klein LoRA example's --weighting_scheme default
    default_target_modules = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                              *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(24)))
    modelspec_architecture = "flux-2-klein-4b"  # no model-spec name is published for FLUX.2: ours, in its style
    kohya_format = False  # no kohya / ComfyUI LoRA layout is known for FLUX.2 (module docstring)
    card_tags = ("flux2", "flux2-klein", "flux2-diffusers")
    denoiser_keys = ("num_single_layers", "timestep_guidance_channels", "rope_theta")  # FLUX.1's has no last two
    tiny_transformer = TINY_FLUX2_TRANSFORMER
    tiny_builder = "build_tiny_flux2_pipeline"

    # ---- parts -------------------------------------------------------------------------------------------
    def latent_channels(self, config: Mapping[str, Any]) -> int:
        """The VAE's 32: the transformer's in_channels (128) are 2 x 2 patchified latents."""
        return config["in_channels"] // 4

    def pooled_width(self, config: Mapping[str, Any]) -> None:
        """No pooled embedding: the transformer reads the Qwen3 tokens alone."""
        return None

    def scale_latents(self, vae: Any, latents: Tensor) -> Tensor:
        """The VAE posterior's mode (B, 32, h, w) -> normalised latents (B, 32, h, w): patchified, minus the VAE's
        batch-norm running mean, over sqrt(running var + eps) (the example's L1828-1829), unpatchified again."""
        from diffusers import Flux2KleinPipeline

        mean, std = _bn_stats(vae, latents)
        patched = (Flux2KleinPipeline._patchify_latents(latents) - mean) / std
        return Flux2KleinPipeline._unpatchify_latents(patched)

    def decodable_latents(self, vae: Any, latents: Tensor, height: int, width: int) -> Tensor:
        """The pipeline's `output_type="latent"` output is already what `vae.decode` takes (B, 32, h, w): it
        un-normalises and unpatchifies before returning (pipeline_flux2_klein.py L906-918)."""
        return latents

    def trainable_latents(self, vae: Any, latents: Tensor, height: int, width: int) -> Tensor:
        """The pipeline returns latents un-normalised for the VAE (`decodable_latents`): normalised again with the
        VAE's batch-norm statistics, as training's latents are (`scale_latents`)."""
        return self.scale_latents(vae, latents.to(vae.device, vae.dtype)).float()

    # ---- prompts and the denoiser ------------------------------------------------------------------------
    def encode_prompts(self, tokenizers: tuple[Any, ...], encoders: tuple[Any, ...], prompts: list[str],
                       device: torch.device) -> tuple[Tensor, None]:
        """(B, 512, 3 D) and no pooled, as `Flux2KleinPipeline.encode_prompt`: each prompt as a user message through
        the chat template (no thinking), padded to 512 tokens with its attention mask, Qwen3's hidden states 9, 18
        and 27 (B, 3, 512, D) laid side by side per token (the text ids it also returns are rebuilt in
        `denoise`)."""
        (tokenizer,), (encoder,) = tokenizers, encoders
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False)
                 for prompt in prompts]
        inputs = [tokenizer(text, return_tensors="pt", padding="max_length", truncation=True,
                            max_length=self.max_sequence_length) for text in texts]
        ids = torch.cat([i["input_ids"] for i in inputs]).to(device)
        mask = torch.cat([i["attention_mask"] for i in inputs]).to(device)
        hidden = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
        stacked = torch.stack([hidden[k] for k in self.hidden_layers], dim=1).to(encoder.dtype)
        batch, layers, tokens, width = stacked.shape
        return stacked.permute(0, 2, 1, 3).reshape(batch, tokens, layers * width), None

    def timestep_scale(self, schedule: Any) -> float:
        """Klein's transformer takes sigma (the pipeline's t / 1000) and scales it by 1000 itself."""
        return 1.0

    def denoise(self, denoiser: Any, noisy: Tensor, timesteps: Tensor, embeds: Tensor, pooled: Tensor | None,
                geometry: Tensor | None, schedule: Any = None) -> Tensor:
        """The velocity (B, 32, h, w): latents patchified to (B, 128, h/2, w/2), packed into (B, h/2 * w/2, 128)
        tokens with their (B, h/2 * w/2, 4) ids, text ids (B, S, 4), timesteps = sigma (B,), no guidance; the
        output unpacked and unpatchified."""
        from diffusers import Flux2KleinPipeline as Pipe

        patched = Pipe._patchify_latents(noisy)
        batch, _, rows, cols = patched.shape
        img_ids = latent_ids(batch, rows, cols, noisy.device)
        txt_ids = text_ids(batch, embeds.shape[1], noisy.device)
        out = denoiser(hidden_states=Pipe._pack_latents(patched), timestep=timesteps, guidance=None,
                       encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        out = out.reshape(batch, rows, cols, -1).permute(0, 3, 1, 2)  # the ids' row-major order, as _pack_latents
        return Pipe._unpatchify_latents(out)

    # ---- the files people load ---------------------------------------------------------------------------
    def kohya_module_name(self, module: str, config: Mapping[str, Any]) -> str:
        raise ValueError(f"{self.label}: no kohya / ComfyUI LoRA format is known for this family; export with "
                         "--format diffusers")

    def base_model_version(self, prediction_type: str) -> str:
        return "flux2-klein"


FAMILY = Flux2Family()


def latent_ids(batch: int, rows: int, cols: int, device: torch.device) -> Tensor:
    """(batch, rows * cols, 4) int64 position ids (t, row, col, l) = (0, i, j, 0), row-major: the pipeline's
    `_prepare_latent_ids`, built on `device` (the pipeline builds them on the host: a copy and a sync per step)."""
    grid = torch.zeros(rows, cols, 4, dtype=torch.long, device=device)
    grid[..., 1] = torch.arange(rows, device=device)[:, None]
    grid[..., 2] = torch.arange(cols, device=device)[None, :]
    return grid.reshape(1, rows * cols, 4).expand(batch, -1, -1)


def text_ids(batch: int, tokens: int, device: torch.device) -> Tensor:
    """(batch, tokens, 4) int64 ids (0, 0, 0, l): the pipeline's `_prepare_text_ids`, built on `device`."""
    ids = torch.zeros(tokens, 4, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(tokens, device=device)
    return ids.expand(batch, -1, -1)


def _bn_stats(vae: Any, like: Tensor) -> tuple[Tensor, Tensor]:
    """The VAE's batch-norm running mean and sqrt(var + eps), (1, 4C, 1, 1), on `like`'s device and dtype."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def tiny_qwen_tokenizer(max_length: int = Flux2Family.max_sequence_length) -> Any:
    """A byte-level BPE Qwen2 tokenizer built in code: one token per byte (no merges), `<|endoftext|>` (pad) and
    the chat template's special tokens, so any prompt encodes offline."""
    from transformers import Qwen2TokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|endoftext|>": 0} | {char: i + 1 for i, char in enumerate(sorted(set(bytes_to_unicode().values())))}
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=[], chat_template=TINY_CHAT_TEMPLATE,
                                   model_max_length=max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    return tokenizer


def tiny_flux2_vae() -> Any:
    """A 4-block `AutoencoderKLFlux2` with 32 latent channels and no quant convs (8x: 64 px -> 8 x 8 latents),
    near-deterministic (the log-variance half of the encoder's output pinned to its floor), its batch-norm running
    statistics set away from (0, 1) so the normalisation is exercised."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, latent_channels=32, block_out_channels=(8, 16, 32, 32),
                             layers_per_block=1, norm_num_groups=1, sample_size=64, use_quant_conv=False,
                             use_post_quant_conv=False, mid_block_add_attention=False)
    with torch.no_grad():
        vae.encoder.conv_out.weight[32:].zero_()
        vae.encoder.conv_out.bias[32:].fill_(-30.0)
        vae.bn.running_mean.copy_(0.1 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    return vae


def build_tiny_flux2_pipeline(seed: int = 0) -> Any:
    """A tiny `Flux2KleinPipeline` with random weights, offline: the tiny transformer, a 32-channel VAE (64 px ->
    8 x 8 latents -> 16 tokens of 128), a tiny Qwen3 (`Qwen3ForCausalLM`, its tokenizer built in code), the flow
    scheduler with dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    transformer = Flux2Transformer2DModel(**TINY_FLUX2_TRANSFORMER)
    vae = tiny_flux2_vae()
    qwen = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), pad_token_id=0, **TINY_QWEN3))
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**TINY_FLUX2_SCHEDULER), vae=vae,
                              text_encoder=qwen, tokenizer=tokenizer, transformer=transformer)
