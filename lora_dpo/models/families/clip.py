"""CLIP text encoders in Stability's original single-file layout, the names two families' checkpoints use: CLIP
ViT-L keeps transformers' own names (under `text_model.`); OpenCLIP (SDXL's bigG) has its own, with q, k and v
packed into one `in_proj` and the text projection transposed."""

from __future__ import annotations

import torch
from torch import Tensor

OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                  "self_attn.out_proj": "attn.out_proj"}
OPENCLIP_FIXED = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
                  "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                  "text_model.final_layer_norm.weight": "ln_final.weight",
                  "text_model.final_layer_norm.bias": "ln_final.bias"}


def clip_state(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """CLIP ViT-L keeps transformers' own names in the original layout (under `text_model.`)."""
    return {prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in state.items()
            if "position_ids" not in k}


def openclip_state(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """A CLIPTextModelWithProjection in OpenCLIP's names: q, k, v packed into one in_proj, the projection
    transposed."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in OPENCLIP_FIXED:
            out[OPENCLIP_FIXED[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            parts = key.split(".")
            stem, (layer, kind) = ".".join(parts[:4]), ".".join(parts[4:]).rsplit(".", 1)
            block = f"transformer.resblocks.{parts[3]}."
            if layer == "self_attn.q_proj":  # k and v are packed with it
                out[block + f"attn.in_proj_{kind}"] = torch.cat([state[f"{stem}.self_attn.{p}_proj.{kind}"]
                                                                 for p in "qkv"])
            elif layer not in ("self_attn.k_proj", "self_attn.v_proj"):
                out[block + f"{OPENCLIP_LAYER[layer]}.{kind}"] = value
    return {prefix + k: v for k, v in out.items()}
