"""Bad input before anything loads: a `[model]` key that only other base families read (a DDPM schedule's on a
flow-matching base, a flow schedule's on a UNet base, FLUX's guidance elsewhere) is refused in one line naming the
key, the base's family and how to unset it, through the real CLI (`train`, `plan`, exit code 2); the family comes
from the base's name, a local folder's `model_index.json` or a single file's header. A single file no family
owns names what it holds."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lora_dpo import models
from lora_dpo.cli import app
from lora_dpo.recipe import ModelRecipe, RecipeError

RECIPES = Path(__file__).parent.parent / "recipes"


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _one_line_refusal(code: int, output: str) -> str:
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lora-dpo: error: "), output
    return lines[0]


@pytest.mark.parametrize(("base", "setting", "family", "owners"), [
    ("tiny", "model.shift=3.0", "SDXL", "SD3.5, FLUX.2 klein and FLUX.1"),
    ("tiny-sd15", "model.timestep_sampling=\"logit_normal\"", "SD 1.5", "SD3.5, FLUX.2 klein and FLUX.1"),
    ("stabilityai/stable-diffusion-xl-base-1.0", "model.guidance=1.0", "SDXL", "FLUX.1"),
    ("tiny-sd3", "model.timesteps=[249, 499, 749, 999]", "SD3.5", "SDXL and SD 1.5"),
    ("tiny-flux", "model.rescale_betas_zero_snr=true", "FLUX.1", "SDXL and SD 1.5"),
    ("stabilityai/stable-diffusion-3.5-medium", "model.guidance=3.5", "SD3.5", "FLUX.1"),
])
def test_train_refuses_another_familys_model_key(base: str, setting: str, family: str, owners: str,
                                                 tmp_path: Path) -> None:
    key = setting.split("=")[0].removeprefix("model.")
    line = _one_line_refusal(*_cli("train", str(RECIPES / "tiny.toml"), "--set", f"model.base={base}",
                                   "--set", setting, "--set", f"output.dir={tmp_path}"))
    assert f"[model].{key} = " in line and f"the base {base!r} is {family}, which does not read it" in line
    assert f"a key of {owners} bases" in line and f"--set model.{key}=" in line
    assert not list(tmp_path.iterdir())  # refused before the run folder was made


def test_plan_refuses_them_too_and_names_every_one(tmp_path: Path) -> None:
    line = _one_line_refusal(*_cli("plan", str(RECIPES / "tiny.toml"), "--gpu", "24GB",
                                   "--set", "model.base=black-forest-labs/FLUX.1-dev",
                                   "--set", "model.timesteps=[999]", "--set", "model.rescale_betas_zero_snr=true"))
    assert "[model].timesteps = [999]" in line and "[model].rescale_betas_zero_snr = true" in line
    assert "--set model.timesteps=[]" in line and "--set model.rescale_betas_zero_snr=false" in line


def test_the_family_of_a_local_folder_comes_from_its_model_index(tiny_sd15_base_dir: Path, tmp_path: Path) -> None:
    line = _one_line_refusal(*_cli("train", str(RECIPES / "tiny.toml"), "--set", f"model.base={tiny_sd15_base_dir}",
                                   "--set", "model.logit_std=0.5", "--set", f"output.dir={tmp_path}"))
    assert "[model].logit_std = 0.5" in line and "is SD 1.5, which does not read it" in line


def test_a_flow_base_takes_its_own_keys_and_a_ddpm_base_its_own() -> None:
    models.check_recipe_keys(ModelRecipe(base="tiny-flux", timestep_sampling="logit_normal", logit_mean=0.0,
                                         logit_std=1.0, shift=3.0, guidance=1.0))
    models.check_recipe_keys(ModelRecipe(base="tiny-sd3", timestep_sampling="mode", mode_scale=1.29))
    models.check_recipe_keys(ModelRecipe(base="stabilityai/sdxl-turbo", timesteps=(249, 499, 749, 999),
                                         rescale_betas_zero_snr=True))
    models.check_recipe_keys(ModelRecipe(base="some-user/unknown-model", shift=3.0))  # known once its index is read
    with pytest.raises(RecipeError, match=r"\[model\]\.guidance = 1\.0: the base 'tiny-sd3' is SD3\.5"):
        models.check_recipe_keys(ModelRecipe(base="tiny-sd3", guidance=1.0))


def test_a_single_files_family_comes_from_its_header(tmp_path: Path) -> None:
    """An SD3.5 file (its MMDiT's joint blocks under the UNet prefix, as Stability ships sd3.5_medium) is SD3.5,
    not SD 1.5 (whose marker is the bare UNet prefix); a bare BFL FLUX file is FLUX.1."""
    sd3 = tmp_path / "sd3.5_medium.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(1)}, str(sd3))
    flux = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1)}, str(flux))
    assert models.single_file_family(sd3).name == "sd3" and models.single_file_family(flux).name == "flux"
    line = _one_line_refusal(*_cli("plan", str(RECIPES / "tiny.toml"), "--set", f"model.base={sd3}",
                                   "--set", "model.timesteps=[999]"))
    assert f"the base {str(sd3)!r} is SD3.5, which does not read it" in line


def test_a_single_file_no_family_owns_is_refused_naming_what_it_holds(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(1),
               "lora_unet_down_blocks_0.lora_up.weight": torch.zeros(1), "lora_te1_x.alpha": torch.zeros(1)},
              str(adapter))
    line = _one_line_refusal(*_cli("plan", str(RECIPES / "tiny.toml"), "--set", f"model.base={adapter}"))
    assert "no model.diffusion_model.* keys (3 keys: lora_te1_x.alpha.*, lora_unet_down_blocks_0.lora_down.*" in line
    odd = tmp_path / "odd.safetensors"
    save_file({"model.diffusion_model.something.weight": torch.zeros(1)}, str(odd))
    assert models.single_file_family(odd).name == "sd15"  # SD 1.x: what an original-layout UNet is by default
