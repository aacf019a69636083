"""Single-file bases: the tiny base written as one checkpoint in Stability's original layout (what A1111 and
ComfyUI load), then loaded back through diffusers' `from_single_file` with the config folder beside it: the
architecture is read from the keys, every part comes back with the same weights, the planner and the adapter
formats read its UNet config, and a run trains on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from lora_dpo import kohya, models
from lora_dpo.plan.bases import architecture
from lora_dpo.recipe import ModelRecipe

# the original layout's names for the diffusers parts that kohya's UNet table (LoRA targets only) leaves out
RESNET_NAMES = {**kohya.RESNET_SGM, "norm1": "in_layers.0", "norm2": "out_layers.0"}


def _unet_to_original(state: dict[str, Tensor], config: dict[str, Any]) -> dict[str, Tensor]:
    prefixes = {**kohya.sgm_prefixes(config), "conv_norm_out": "out.0"}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        cut = next(c for c in range(len(parts), 0, -1) if ".".join(parts[:c]) in prefixes)
        head, rest = ".".join(parts[:cut]), parts[cut:]
        if ".resnets." in f".{head}." and rest[0] in RESNET_NAMES:
            rest = [RESNET_NAMES[rest[0]], *rest[1:]]
        out["model.diffusion_model." + ".".join([prefixes[head], *rest])] = value
    return out


def _vae_to_original(state: dict[str, Tensor], levels: int) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        for i in range(levels):  # decoder levels count down in the original layout
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{levels - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{levels - 1 - i}.upsample.")
        new = new.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for ours, theirs in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                                 ("to_out.0.", "proj_out.")):
                new = new.replace(ours, theirs)
            if value.ndim == 2:  # linear here, 1x1 convolution there
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def _openclip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The second SDXL encoder in OpenCLIP's names: q, k, v packed into one in_proj, the projection transposed."""
    out: dict[str, Tensor] = {}
    fixed = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif ".self_attn.q_proj." in key:
            kind = key.rsplit(".", 1)[1]
            stem = key.split(".self_attn.")[0]
            packed = torch.cat([state[f"{stem}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
            out[_resblock(stem) + f".attn.in_proj_{kind}"] = packed
        elif ".self_attn.k_proj." in key or ".self_attn.v_proj." in key or "position_ids" in key:
            continue
        elif key.startswith("text_model.encoder.layers."):
            stem, rest = key.split(".", 4)[:4], key.split(".", 4)[4]
            rest = (rest.replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc")
                    .replace("mlp.fc2", "mlp.c_proj").replace("self_attn.", "attn."))
            out[_resblock(".".join(stem)) + "." + rest] = value
    return {"conditioner.embedders.1.model." + k: v for k, v in out.items()}


def _resblock(stem: str) -> str:
    return "transformer.resblocks." + stem.split(".")[3]


def write_single_file(base_dir: Path, out: Path) -> Path:
    """A tiny base (SDXL or SD 1.5) as one original-layout safetensors file, with its config folder (no weights)
    beside. SD 1.5 keeps its one CLIP encoder under `cond_stage_model.transformer.`; SDXL has two embedders, the
    second in OpenCLIP's names."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    pipe = DiffusionPipeline.from_pretrained(base_dir)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    state = _unet_to_original(pipe.unet.state_dict(), dict(pipe.unet.config))
    state |= _vae_to_original(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels))
    first = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
    state |= {first + ("" if k.startswith("text_model.") else "text_model.") + k: v
              for k, v in pipe.text_encoder.state_dict().items() if "position_ids" not in k}
    if sdxl:
        state |= _openclip(pipe.text_encoder_2.state_dict())
    out.mkdir(parents=True)
    for item in base_dir.iterdir():  # configs and tokenizers, no weights
        if item.is_dir():
            shutil.copytree(item, out / item.name, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    shutil.copy(base_dir / "model_index.json", out)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "tiny.safetensors"))
    return out / "tiny.safetensors"


def _assert_same_weights(loaded: Any, folder: Any) -> None:
    """Every part of a base read from a single file (UNet, VAE, each text encoder) holds the folder base's weights."""
    for ours, theirs in ((loaded.unet, folder.unet), (loaded.vae, folder.vae),
                         *zip(loaded.text_encoders, folder.text_encoders, strict=True)):
        expected = theirs.state_dict()
        got = ours.state_dict()
        assert set(got) == set(expected), type(ours).__name__
        assert all(torch.equal(got[k], expected[k]) for k in expected), type(ours).__name__


@pytest.fixture(scope="module")
def single_file(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_single_file(tiny_base_dir, tmp_path_factory.mktemp("single") / "checkpoint")


def test_an_sd15_single_file_loads_every_part_and_trains(tiny_sd15_base_dir: Path, tiny_recipe: Any,
                                                         tmp_path: Path) -> None:
    """SD 1.5 in the original layout (one encoder under `cond_stage_model`): read as SD 1.5 from its keys, every
    part back with the base's weights, and a run trains on it."""
    from lora_dpo.export import read_file
    from lora_dpo.train import train

    path = write_single_file(tiny_sd15_base_dir, tmp_path / "checkpoint")
    assert models.single_file_arch(path) == "sd15"
    loaded = models.load_base(ModelRecipe(base=str(path)))
    assert not loaded.is_sdxl and len(loaded.text_encoders) == 1
    _assert_same_weights(loaded, models.load_base(ModelRecipe(base=str(tiny_sd15_base_dir))))
    adapter = train(tiny_recipe(model={"base": str(path)}, train={"max_steps": 2}))
    assert read_file(adapter)[1]["lora_dpo.base_model"] == str(path)


def test_single_file_loads_every_part_with_the_base_weights(single_file: Path, tiny_base_dir: Path) -> None:
    assert models.is_single_file(str(single_file)) and models.single_file_arch(single_file) == "sdxl"
    assert models.config_folder(single_file) == single_file.parent
    loaded = models.load_base(ModelRecipe(base=str(single_file)))
    assert loaded.is_sdxl and len(loaded.text_encoders) == 2 and len(loaded.tokenizers) == 2
    _assert_same_weights(loaded, models.load_base(ModelRecipe(base=str(tiny_base_dir))))
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_planner_and_adapter_formats_read_a_single_file_config(single_file: Path, tiny_base_dir: Path) -> None:
    config = json.loads((tiny_base_dir / "unet" / "config.json").read_text())
    assert models.base_unet_config(str(single_file))["block_out_channels"] == config["block_out_channels"]
    arch = architecture(ModelRecipe(base=str(single_file)))
    assert arch.name == str(single_file) and arch.is_sdxl and len(arch.encoder_params) == 2


def test_the_architecture_comes_from_the_keys(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd15 = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1)}
    save_file(sd15, str(tmp_path / "sd15.safetensors"))
    save_file({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(1)}, str(tmp_path / "xl.safetensors"))
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1)}, str(tmp_path / "lora.safetensors"))
    assert models.single_file_arch(tmp_path / "sd15.safetensors") == "sd15"
    assert models.single_file_arch(tmp_path / "xl.safetensors") == "sdxl"
    with pytest.raises(models.ModelError, match="not a Stable Diffusion checkpoint"):
        models.single_file_arch(tmp_path / "lora.safetensors")
    # no config folder beside it: the shipped SD 1.5 configs, written as a diffusers config folder
    folder = models.config_folder(tmp_path / "sd15.safetensors")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert models.base_unet_config(str(tmp_path / "sd15.safetensors")) == models.shipped_config("sd15", "unet")
    assert architecture(ModelRecipe(base=str(tmp_path / "xl.safetensors"))).unet["cross_attention_dim"] == 2048


def test_a_run_trains_on_a_single_file_base_and_its_adapter_exports_and_merges(
        single_file: Path, tiny_recipe: Any, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from lora_dpo.export import export_adapter, merge_adapter, read_file
    from lora_dpo.train import train

    path = train(tiny_recipe(model={"base": str(single_file)}, train={"max_steps": 2}))
    tensors, metadata = read_file(path)
    assert metadata["lora_dpo.base_model"] == str(single_file) and tensors
    kohya_file = export_adapter(path, tmp_path / "kohya.safetensors", "kohya")  # names from the file's config
    assert any(k.startswith("lora_unet_input_blocks_") for k in read_file(kohya_file)[0])
    merged = merge_adapter(path, str(single_file), 1.0, tmp_path / "merged")
    assert isinstance(StableDiffusionXLPipeline.from_pretrained(merged), StableDiffusionXLPipeline)
