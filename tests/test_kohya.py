"""The kohya/webui names: checked against sd-scripts' published names and against diffusers' own converter
for every adaptable layer of the real SDXL and SD 1.5 UNets and the tiny bases (built on the meta device)."""

import json
from pathlib import Path

import pytest
import torch

from lora_dpo import kohya, models
from lora_dpo.export import skeleton


def _config(arch: str, tiny_base_dir: Path) -> dict:
    if arch == "tiny":
        return json.loads((tiny_base_dir / "unet" / "config.json").read_text())
    if arch == "tiny-sd15":
        return models.TINY_BASES["tiny-sd15"].tiny_denoiser_config()
    return models.shipped_config(arch, "unet")


def test_sdxl_names_are_sd_scripts_sgm_names() -> None:
    """Expected names as sd-scripts writes them for SDXL (its UNet is Stability's SGM one); see the SGM layout in
    sd-scripts' library/sdxl_model_util.py."""
    config = models.shipped_config("sdxl", "unet")
    expected = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2": "input_blocks_8_1_transformer_blocks_9_ff_net_2",
        "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
        "down_blocks.1.resnets.0.conv_shortcut": "input_blocks_4_0_skip_connection",
        "mid_block.attentions.0.proj_in": "middle_block_1_proj_in",
        "mid_block.resnets.1.conv2": "middle_block_2_out_layers_3",
        "up_blocks.0.upsamplers.0.conv": "output_blocks_2_2_conv",
        "up_blocks.2.resnets.2.time_emb_proj": "output_blocks_8_0_emb_layers_1",
        "add_embedding.linear_1": "label_emb_0_0",
        "time_embedding.linear_2": "time_embed_2",
        "conv_in": "input_blocks_0_0",
    }
    name = models.family_named("sdxl").kohya_namer(config)
    assert {m: name(m) for m in expected} == {m: "lora_unet_" + n for m, n in expected.items()}


def test_sd15_names_are_diffusers_names() -> None:
    """sd-scripts trains SD 1.x on the diffusers UNet, so its SD 1.5 files (and ours) keep diffusers names."""
    config = models.shipped_config("sd15", "unet")
    name = models.family_named("sd15").kohya_module_name("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                                                         config)
    assert name == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    # had it been written with SGM names, SD 1.5's up_blocks.0 (no attention) puts its upsampler at slot 1
    assert kohya.to_sgm("up_blocks.0.upsamplers.0.conv", kohya.sgm_prefixes(config)) == "output_blocks.2.1.conv"


@pytest.mark.parametrize("arch", ["sdxl", "sd15", "tiny", "tiny-sd15"])
def test_every_layer_name_survives_diffusers_own_converter(arch: str, tiny_base_dir: Path) -> None:
    """Write a kohya dict naming every Linear/Conv2d of the UNet, convert it back with diffusers' loader code
    (the SGM remap is given the UNet config, as StableDiffusionXLPipeline.load_lora_weights does), and get every
    module back; our own reader inverts it too, alpha included."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    config = _config(arch, tiny_base_dir)
    unet = skeleton(config)
    modules = kohya.adaptable_modules(unet)
    assert len(modules) > 100
    weights = {f"{m}.lora_{ab}.weight": torch.zeros(1, 1) for m in modules for ab in "AB"}
    alphas = {m: float(i % 7 + 1) for i, m in enumerate(modules)}
    family = models.denoiser_family(config)
    state = kohya.to_kohya(weights, alphas, family.kohya_namer(config), torch.float16)
    assert all(state[k].shape == () for k in state if k.endswith(".alpha"))  # ComfyUI rejects a vector alpha
    if family.name == "sdxl":
        converted, network_alphas = StableDiffusionXLPipeline.lora_state_dict(dict(state), unet_config=unet.config)
    else:
        converted, network_alphas = StableDiffusionPipeline.lora_state_dict(dict(state))
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert {k.split(".lora_")[0] for k in peft} == set(modules)
    assert len(network_alphas) == len(modules)

    back, back_alphas, unknown = kohya.from_kohya(state, kohya.name_table(unet))
    assert not unknown and back_alphas == alphas and set(back) == set(weights)
