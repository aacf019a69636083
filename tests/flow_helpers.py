"""Test helpers for the flow families: one DPO step with a fresh adapter (`fresh_adapter_dpo_step`), and for their
adapter files a re-implementation of the key maps ComfyUI builds for their models (ComfyUI itself cannot be
installed here).

ComfyUI (github.com/comfyanonymous/ComfyUI, read at 41444b5 and the index's later copies of the same files):
- comfy/lora.py `model_lora_keys_unet`: for every `diffusion_model.<k>.weight` of the model's state dict, the key
  `lora_unet_<k with . -> _>` (the generic kohya spelling; Forge's copy of this code maps SD3 through it alone); for
  `model_base.SD3` every key of `utils.mmdit_to_diffusers` as `transformer.<diffusers name>` (and
  `base_model.model.`, `lora_transformer_`, `lycoris_`); for `model_base.Flux` every key of `utils.flux_to_diffusers`
  as `transformer.<diffusers name>` (and `lycoris_`, `lora_transformer_`); a target is a key or (key, (dim, offset,
  size)): the rows of a fused weight.
- comfy/utils.py `mmdit_to_diffusers`: in joint block i, `attn.to_q/k/v` -> `joint_blocks.i.x_block.attn.qkv` at
  rows 0, H, 2H (H = `depth` x 64, the hidden size), `attn.add_q/k/v_proj` -> `context_block.attn.qkv` likewise,
  `attn.to_out.0` -> `x_block.attn.proj`, `attn.to_add_out` -> `context_block.attn.proj`, `ff.net.0.proj` /
  `ff.net.2` -> `x_block.mlp.fc1` / `fc2`, `ff_context.*` -> `context_block.mlp.*`, `norm1.linear` /
  `norm1_context.linear` -> `x_block` / `context_block.adaLN_modulation.1`.
- comfy/utils.py `flux_to_diffusers`: double block i: q/k/v -> `double_blocks.i.img_attn.qkv` (rows 0, H, 2H),
  add_q/k/v -> `txt_attn.qkv`, `attn.to_out.0` -> `img_attn.proj`, `attn.to_add_out` -> `txt_attn.proj`,
  `ff.net.0.proj` / `ff.net.2` -> `img_mlp.0` / `img_mlp.2`, `ff_context.*` -> `txt_mlp.*`, `norm1.linear` /
  `norm1_context.linear` -> `img_mod.lin` / `txt_mod.lin`; single block i: q/k/v -> `single_blocks.i.linear1` (rows
  0, H, 2H), `proj_mlp` -> `linear1` rows 3H..7H, `proj_out` -> `linear2`, `norm.linear` -> `modulation.lin`.
- comfy/weight_adapter/lora.py `LoRAAdapter`: `<key>.lora_up.weight` / `.lora_down.weight` (or `.lora_B.weight` /
  `.lora_A.weight`), alpha from `<key>.alpha` (comfy/lora.py `load_lora`, for every spelling), the delta
  `(alpha / down.shape[0] if alpha else 1.0) * up @ down`, added to the target (its rows, for a fused target).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_dpo.models.families import sd3

Target = tuple[str, tuple[int, int, int] | None]

SD3_BLOCK = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
             "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
             "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
             "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1"}
FLUX_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
               "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
               "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"}
FLUX_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}


def fresh_adapter_dpo_step(family: Any, pipe: Any, base_dir: Path, prompt: str) -> set[str]:
    """The family's pieces in the order the step runs them, on a pair with the same sigma and noise for both images,
    with a fresh adapter (lora_B = 0, the family's targets) on `pipe`'s transformer: the policy ties the reference
    (adapters off), so the loss is ln 2 exactly (asserted); returns the parameters the backward reached."""
    from peft import LoraConfig

    from lora_dpo.objectives import diffusion_dpo_loss

    cpu = torch.device("cpu")
    tokenizers, encoders = family.load_text_parts(str(base_dir))
    with torch.no_grad():
        embeds, pooled = family.encode_prompts(tokenizers, encoders, [prompt], cpu)
    transformer = pipe.transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(family.default_target_modules)))
    schedule = family.training_scheduler(pipe.scheduler.config, {})
    generator = torch.Generator().manual_seed(0)
    channels = family.latent_channels(transformer.config)
    latents = torch.randn(2, channels, 8, 8, generator=generator)  # winner, loser
    noise = torch.randn(1, channels, 8, 8, generator=generator).repeat(2, 1, 1, 1)
    timesteps = family.sample_timesteps(schedule, 1, generator).repeat(2)
    noisy = family.add_noise(schedule, latents, noise, timesteps)
    target = family.target(schedule, latents, noise, timesteps)
    pooled = None if pooled is None else pooled.repeat(2, 1)

    def errors() -> torch.Tensor:
        prediction = family.denoise(transformer, noisy, timesteps, embeds.repeat(2, 1, 1), pooled, None)
        return (prediction - target).pow(2).mean(dim=(1, 2, 3))

    transformer.disable_adapters()
    with torch.no_grad():
        ref_w, ref_l = errors()
    transformer.enable_adapters()
    model_w, model_l = errors()
    loss = diffusion_dpo_loss(model_w[None], model_l[None], ref_w[None], ref_l[None], beta=5000.0).mean()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    return {n for n, p in transformer.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def _qkv(prefix: str, fused: str, names: tuple[str, ...], hidden: int) -> dict[str, Target]:
    return {f"{prefix}.{name}.weight": (fused + ".weight", (0, i * hidden, hidden)) for i, name in enumerate(names)}


def comfy_transformer_map(family: Any, config: dict[str, Any]) -> dict[str, Target]:
    """`mmdit_to_diffusers` / `flux_to_diffusers` for the weights: diffusers `<module>.weight` -> the original
    key (under `diffusion_model.`) and its rows (None: the whole weight)."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    out: dict[str, Target] = {}
    if family is sd3.FAMILY:
        for i in range(config["num_layers"]):
            block, to = f"transformer_blocks.{i}", f"diffusion_model.joint_blocks.{i}"
            out |= _qkv(f"{block}.attn", f"{to}.x_block.attn.qkv", ("to_q", "to_k", "to_v"), hidden)
            out |= _qkv(f"{block}.attn", f"{to}.context_block.attn.qkv", ("add_q_proj", "add_k_proj", "add_v_proj"),
                        hidden)
            out |= {f"{block}.{k}.weight": (f"{to}.{v}.weight", None) for k, v in SD3_BLOCK.items()}
        return out
    for i in range(config["num_layers"]):
        block, to = f"transformer_blocks.{i}", f"diffusion_model.double_blocks.{i}"
        out |= _qkv(f"{block}.attn", f"{to}.img_attn.qkv", ("to_q", "to_k", "to_v"), hidden)
        out |= _qkv(f"{block}.attn", f"{to}.txt_attn.qkv", ("add_q_proj", "add_k_proj", "add_v_proj"), hidden)
        out |= {f"{block}.{k}.weight": (f"{to}.{v}.weight", None) for k, v in FLUX_DOUBLE.items()}
    for i in range(config["num_single_layers"]):
        block, to = f"single_transformer_blocks.{i}", f"diffusion_model.single_blocks.{i}"
        out |= _qkv(f"{block}.attn", f"{to}.linear1", ("to_q", "to_k", "to_v"), hidden)
        out[f"{block}.proj_mlp.weight"] = (f"{to}.linear1.weight", (0, 3 * hidden, 4 * hidden))
        out |= {f"{block}.{k}.weight": (f"{to}.{v}.weight", None) for k, v in FLUX_SINGLE.items()}
    return out


def original_state(family: Any, transformer: Any) -> dict[str, torch.Tensor]:
    """The transformer's mapped weights in the original layout (`diffusion_model.` keys), fused rows assembled."""
    params = dict(transformer.state_dict())
    state: dict[str, torch.Tensor] = {}
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for key, (target, rows) in comfy_transformer_map(family, dict(transformer.config)).items():
        if key not in params:  # SD3's last block has no context output layers (context_pre_only)
            continue
        if rows is None:
            state[target] = params[key].clone()
        else:
            pieces.setdefault(target, []).append((rows[1], params[key]))
    for target, parts in pieces.items():
        state[target] = torch.cat([w for _, w in sorted(parts, key=lambda p: p[0])])
    return state


def comfy_key_map(family: Any, original: dict[str, Any], config: dict[str, Any]) -> dict[str, Target]:
    """`model_lora_keys_unet` for the model: the generic `lora_unet_` names and the `transformer.` names."""
    key_map: dict[str, Target] = {}
    for key in original:
        if key.startswith("diffusion_model.") and key.endswith(".weight"):
            key_map["lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")] = (key, None)
    for key, target in comfy_transformer_map(family, config).items():
        key_map["transformer." + key.removesuffix(".weight")] = target
    return key_map


def comfy_apply(lora: dict[str, torch.Tensor], key_map: dict[str, Target], original: dict[str, torch.Tensor],
                strength: float = 1.0) -> tuple[dict[str, torch.Tensor], set[str]]:
    """ComfyUI's `load_lora` + `LoRAAdapter.calculate_weight` on the original weights: the patched copy, and the
    file's keys it did not load (ComfyUI logs them as "lora key not loaded")."""
    patched = {k: v.clone() for k, v in original.items()}
    loaded: set[str] = set()
    for name, (target, rows) in key_map.items():
        for up_key, down_key in ((f"{name}.lora_up.weight", f"{name}.lora_down.weight"),
                                 (f"{name}.lora_B.weight", f"{name}.lora_A.weight")):
            if up_key not in lora:
                continue
            up, down = lora[up_key].float(), lora[down_key].float()
            alpha = lora.get(f"{name}.alpha")
            scale = alpha.item() / down.shape[0] if alpha is not None else 1.0
            weight = patched[target] if rows is None else patched[target].narrow(rows[0], rows[1], rows[2])
            weight += strength * scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            loaded |= {up_key, down_key} | ({f"{name}.alpha"} if alpha is not None else set())
            break
    return patched, set(lora) - loaded


def back_to_diffusers(family: Any, transformer: Any, original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The diffusers state dict with the mapped weights taken from `original` (the inverse of `original_state`)."""
    state = {k: v.clone() for k, v in transformer.state_dict().items()}
    for key, (target, rows) in comfy_transformer_map(family, dict(transformer.config)).items():
        if key not in state:
            continue
        state[key] = original[target] if rows is None else original[target].narrow(rows[0], rows[1], rows[2])
    return state


# --------------------------------------------------------------------------------------------------
# Whole transformers in the original single-file layout: the inverse of diffusers' (0.42.1) loaders/
# single_file_utils.py `convert_sd3_transformer_checkpoint_to_diffusers` and
# `convert_flux_transformer_checkpoint_to_diffusers`, written from them key by key for any width (what SAI's
# sd3.5_*.safetensors and BFL's flux1-*.safetensors hold).


def _swap(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers' (scale, shift) <-> the original (shift, scale): the converters' `swap_scale_shift`."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _both(out: dict[str, torch.Tensor], state: dict[str, torch.Tensor], to: str, source: str) -> None:
    out[f"{to}.weight"], out[f"{to}.bias"] = state[f"{source}.weight"], state[f"{source}.bias"]


def _cat(out: dict[str, torch.Tensor], state: dict[str, torch.Tensor], to: str, sources: list[str]) -> None:
    for leaf in ("weight", "bias"):
        out[f"{to}.{leaf}"] = torch.cat([state[f"{s}.{leaf}"] for s in sources])


def sd3_original_state(transformer: Any) -> dict[str, torch.Tensor]:
    """An `SD3Transformer2DModel`'s weights as SAI's MMDiT names them, under `model.diffusion_model.`."""
    state = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    layers, out = transformer.config.num_layers, {}
    out["pos_embed"] = state["pos_embed.pos_embed"]
    _both(out, state, "x_embedder.proj", "pos_embed.proj")
    _both(out, state, "t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    _both(out, state, "t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    _both(out, state, "context_embedder", "context_embedder")
    _both(out, state, "y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    _both(out, state, "y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    for i in range(layers):
        d, o, last = f"transformer_blocks.{i}", f"joint_blocks.{i}", i == layers - 1
        _cat(out, state, f"{o}.x_block.attn.qkv", [f"{d}.attn.to_{x}" for x in "qkv"])
        _cat(out, state, f"{o}.context_block.attn.qkv", [f"{d}.attn.add_{x}_proj" for x in "qkv"])
        for ours, theirs in (("norm_q", "x_block.attn.ln_q"), ("norm_k", "x_block.attn.ln_k"),
                             ("norm_added_q", "context_block.attn.ln_q"), ("norm_added_k", "context_block.attn.ln_k")):
            if f"{d}.attn.{ours}.weight" in state:
                out[f"{o}.{theirs}.weight"] = state[f"{d}.attn.{ours}.weight"]
        _both(out, state, f"{o}.x_block.attn.proj", f"{d}.attn.to_out.0")
        if f"{d}.attn2.to_q.weight" in state:
            _cat(out, state, f"{o}.x_block.attn2.qkv", [f"{d}.attn2.to_{x}" for x in "qkv"])
            out[f"{o}.x_block.attn2.ln_q.weight"] = state[f"{d}.attn2.norm_q.weight"]
            out[f"{o}.x_block.attn2.ln_k.weight"] = state[f"{d}.attn2.norm_k.weight"]
            _both(out, state, f"{o}.x_block.attn2.proj", f"{d}.attn2.to_out.0")
        _both(out, state, f"{o}.x_block.adaLN_modulation.1", f"{d}.norm1.linear")
        _both(out, state, f"{o}.x_block.mlp.fc1", f"{d}.ff.net.0.proj")
        _both(out, state, f"{o}.x_block.mlp.fc2", f"{d}.ff.net.2")
        if last:
            for leaf in ("weight", "bias"):
                out[f"{o}.context_block.adaLN_modulation.1.{leaf}"] = _swap(state[f"{d}.norm1_context.linear.{leaf}"])
            continue
        _both(out, state, f"{o}.context_block.attn.proj", f"{d}.attn.to_add_out")
        _both(out, state, f"{o}.context_block.adaLN_modulation.1", f"{d}.norm1_context.linear")
        _both(out, state, f"{o}.context_block.mlp.fc1", f"{d}.ff_context.net.0.proj")
        _both(out, state, f"{o}.context_block.mlp.fc2", f"{d}.ff_context.net.2")
    _both(out, state, "final_layer.linear", "proj_out")
    for leaf in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap(state[f"norm_out.linear.{leaf}"])
    return {"model.diffusion_model." + k: v.contiguous() for k, v in out.items()}


def flux_original_state(transformer: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """A `FluxTransformer2DModel`'s weights as BFL names them (bare, as flux1-dev.safetensors, or under
    `prefix`, as ComfyUI's checkpoints)."""
    state = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for theirs, ours in (("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
                         ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
                         ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
                         ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
                         ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
                         ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
                         ("txt_in", "context_embedder"), ("img_in", "x_embedder"), ("final_layer.linear", "proj_out")):
        if f"{ours}.weight" in state:
            _both(out, state, theirs, ours)
    for i in range(transformer.config.num_layers):
        d, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
        _both(out, state, f"{o}.img_mod.lin", f"{d}.norm1.linear")
        _both(out, state, f"{o}.txt_mod.lin", f"{d}.norm1_context.linear")
        _cat(out, state, f"{o}.img_attn.qkv", [f"{d}.attn.to_{x}" for x in "qkv"])
        _cat(out, state, f"{o}.txt_attn.qkv", [f"{d}.attn.add_{x}_proj" for x in "qkv"])
        for ours, theirs in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                             ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
            out[f"{o}.{theirs}.scale"] = state[f"{d}.attn.{ours}.weight"]
        _both(out, state, f"{o}.img_mlp.0", f"{d}.ff.net.0.proj")
        _both(out, state, f"{o}.img_mlp.2", f"{d}.ff.net.2")
        _both(out, state, f"{o}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        _both(out, state, f"{o}.txt_mlp.2", f"{d}.ff_context.net.2")
        _both(out, state, f"{o}.img_attn.proj", f"{d}.attn.to_out.0")
        _both(out, state, f"{o}.txt_attn.proj", f"{d}.attn.to_add_out")
    for i in range(transformer.config.num_single_layers):
        d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        _both(out, state, f"{o}.modulation.lin", f"{d}.norm.linear")
        _cat(out, state, f"{o}.linear1", [f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"])
        out[f"{o}.norm.query_norm.scale"] = state[f"{d}.attn.norm_q.weight"]
        out[f"{o}.norm.key_norm.scale"] = state[f"{d}.attn.norm_k.weight"]
        _both(out, state, f"{o}.linear2", f"{d}.proj_out")
    for leaf in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap(state[f"norm_out.linear.{leaf}"])
    return {prefix + k: v.contiguous() for k, v in out.items()}
