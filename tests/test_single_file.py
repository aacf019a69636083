"""Single-file bases: the tiny base written as one checkpoint in Stability's original layout (what A1111 and
ComfyUI load; `models.original`, what `merge --format single-file` writes), then loaded back through diffusers'
`from_single_file` with the config folder beside it: the architecture is read from the keys, every part comes back
with the same weights, the planner and the adapter formats read its UNet config, and a run trains on it. ComfyUI's
marker keys set the schedule (`v_pred`, `ztsnr`); checkpoints of other kinds (EDM, refiner, inpainting) are refused
by name. The layout itself is checked on the real SDXL and SD 1.5 architectures against diffusers' own converters."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from lora_dpo import evaluate, models
from lora_dpo.plan.bases import architecture
from lora_dpo.recipe import ModelRecipe

MARKER = torch.tensor([])  # ComfyUI writes its marker keys as empty tensors

def write_single_file(base_dir: Path, out: Path, change: Callable[[dict[str, Tensor]], None] | None = None) -> Path:
    """A tiny base (SDXL or SD 1.5) as one original-layout safetensors file (`models.checkpoint_state`, what
    `merge --format single-file` writes), with its config folder (no weights) beside; `change` edits the tensors
    first (marker keys, another kind of checkpoint)."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import save_file

    state = models.checkpoint_state(DiffusionPipeline.from_pretrained(base_dir))
    if change:
        change(state)
    out.mkdir(parents=True)
    for item in base_dir.iterdir():  # configs and tokenizers, no weights
        if item.is_dir():
            shutil.copytree(item, out / item.name, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    shutil.copy(base_dir / "model_index.json", out)
    save_file(state, str(out / "tiny.safetensors"))
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
    assert models.single_file_family(path).name == "sd15"
    loaded = models.load_base(ModelRecipe(base=str(path)))
    assert loaded.family.name == "sd15" and len(loaded.text_encoders) == 1
    _assert_same_weights(loaded, models.load_base(ModelRecipe(base=str(tiny_sd15_base_dir))))
    adapter = train(tiny_recipe(model={"base": str(path)}, train={"max_steps": 2}))
    assert read_file(adapter)[1]["lora_dpo.base_model"] == str(path)


def test_single_file_loads_every_part_with_the_base_weights(single_file: Path, tiny_base_dir: Path) -> None:
    assert models.is_single_file(str(single_file)) and models.single_file_family(single_file).name == "sdxl"
    assert models.config_folder(single_file) == single_file.parent
    loaded = models.load_base(ModelRecipe(base=str(single_file)))
    assert loaded.family.name == "sdxl" and len(loaded.text_encoders) == 2 and len(loaded.tokenizers) == 2
    _assert_same_weights(loaded, models.load_base(ModelRecipe(base=str(tiny_base_dir))))
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_planner_and_adapter_formats_read_a_single_file_config(single_file: Path, tiny_base_dir: Path) -> None:
    config = json.loads((tiny_base_dir / "unet" / "config.json").read_text())
    assert models.base_denoiser_config(str(single_file))["block_out_channels"] == config["block_out_channels"]
    arch = architecture(ModelRecipe(base=str(single_file)))
    assert arch.name == str(single_file) and arch.family.name == "sdxl" and len(arch.encoder_params) == 2


def test_the_architecture_comes_from_the_keys(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd15 = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1)}
    save_file(sd15, str(tmp_path / "sd15.safetensors"))
    save_file({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(1)}, str(tmp_path / "xl.safetensors"))
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1)}, str(tmp_path / "lora.safetensors"))
    assert models.single_file_family(tmp_path / "sd15.safetensors").name == "sd15"
    assert models.single_file_family(tmp_path / "xl.safetensors").name == "sdxl"
    with pytest.raises(models.ModelError, match=r"keys \(1 key: lora_unet_x\.lora_down\.\*\): not a Stable Diffusion"):
        models.single_file_family(tmp_path / "lora.safetensors")
    # no config folder beside it: the shipped SD 1.5 configs, written as a diffusers config folder
    folder = models.config_folder(tmp_path / "sd15.safetensors")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert models.base_denoiser_config(str(tmp_path / "sd15.safetensors")) == models.shipped_config("sd15", "unet")
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


def _with(**extra: Tensor) -> Callable[[dict[str, Tensor]], None]:
    return lambda state: state.update(extra)


@pytest.fixture(scope="module")
def vpred_file(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL base as a v-prediction, zero-terminal-SNR checkpoint: ComfyUI's `v_pred` and `ztsnr` keys."""
    return write_single_file(tiny_base_dir, tmp_path_factory.mktemp("vpred") / "checkpoint",
                             _with(v_pred=MARKER, ztsnr=MARKER))


def test_a_v_pred_ztsnr_file_trains_samples_and_is_named_on_its_own_schedule(vpred_file: Path, tiny_recipe: Any,
                                                                             tmp_path: Path) -> None:
    """The markers set the training scheduler (v-prediction, zero terminal SNR) and every sampling one (training
    samples, eval and merge: trailing spacing); the adapter, its kohya file (named and hashed as sd-scripts names
    a local base) and its model card say so, and the merged checkpoint keeps the markers."""
    import hashlib

    from safetensors import safe_open

    from lora_dpo.export import export_adapter, merge_adapter, read_file
    from lora_dpo.train import train

    base = models.load_base(ModelRecipe(base=str(vpred_file)))
    assert base.noise_scheduler.config.prediction_type == "v_prediction"
    assert float(base.noise_scheduler.alphas_cumprod[-1]) < 1e-6  # the last timestep is pure noise
    for scheduler in (evaluate.pipeline_from_parts(base, base.unet).scheduler,
                      models.single_file_pipeline(vpred_file, torch.float32).scheduler):
        config = scheduler.config
        assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == \
            ("v_prediction", True, "trailing")

    adapter = train(tiny_recipe(model={"base": str(vpred_file)}, train={"max_steps": 2}))
    raw = vpred_file.read_bytes()
    meta = read_file(adapter)[1]
    assert (meta["modelspec.prediction_type"], meta["lora_dpo.zero_terminal_snr"]) == ("v", "true")
    assert "| noise schedule | `v` prediction, zero terminal SNR |" in (adapter.parent / "README.md").read_text()
    kohya = read_file(export_adapter(adapter, tmp_path / "kohya.safetensors", "kohya"))[1]
    expected = {"ss_sd_model_name": "tiny.safetensors", "ss_new_sd_model_hash": hashlib.sha256(raw).hexdigest(),
                "ss_sd_model_hash": hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8],
                "ss_zero_terminal_snr": "True", "modelspec.prediction_type": "v", "ss_v2": "False",
                "ss_base_model_version": "sdxl_base_v1-0"}
    assert {k: kohya.get(k) for k in expected} == expected

    merged = merge_adapter(adapter, str(vpred_file), 1.0, tmp_path / "merged.safetensors", fmt="single-file")
    with safe_open(str(merged), "pt") as handle:
        assert {"v_pred", "ztsnr"} <= set(handle.keys()) and handle.metadata()["modelspec.prediction_type"] == "v"
    assert models.scheduler_overrides(merged) == {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}


@pytest.mark.parametrize(("markers", "expected"), [
    ((), {}),
    (("v_pred",), {"prediction_type": "v_prediction"}),
    (("v_pred", "ztsnr"), {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}),
    (("ztsnr",), {}),  # ComfyUI reads ztsnr only beside v_pred: a lone one samples as epsilon there
])
def test_marker_keys_read_as_comfyui_reads_them(markers: tuple[str, ...], expected: dict[str, Any], tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "markers.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               **{name: MARKER for name in markers}}, str(path))
    assert models.scheduler_overrides(path) == expected
    assert ("'ztsnr' key without 'v_pred'" in caplog.text) == (markers == ("ztsnr",))


def test_an_sd15_v_pred_file_trains_as_v_prediction(tiny_sd15_base_dir: Path, tmp_path: Path) -> None:
    """ComfyUI reads `v_pred` on SDXL files only; a file that says it predicts v is trained so whatever its
    architecture (epsilon training would teach it the wrong target)."""
    path = write_single_file(tiny_sd15_base_dir, tmp_path / "checkpoint", _with(v_pred=MARKER))
    base = models.load_base(ModelRecipe(base=str(path)), with_encoders=False)
    assert base.noise_scheduler.config.prediction_type == "v_prediction" and base.family.name == "sd15"
    assert float(base.noise_scheduler.alphas_cumprod[-1]) > 1e-4  # no ztsnr: the usual schedule
    assert models.base_schedule(ModelRecipe(base=str(path))) == {"prediction_type": "v_prediction",
                                                                 "rescale_betas_zero_snr": False}


def _refiner(state: dict[str, Tensor]) -> None:
    """SDXL's refiner: OpenCLIP bigG alone, as the first embedder."""
    for key in [k for k in state if k.startswith("conditioner.")]:
        value = state.pop(key)
        if key.startswith("conditioner.embedders.1."):
            state[key.replace("embedders.1.", "embedders.0.")] = value


def _inpainting(state: dict[str, Tensor]) -> None:
    """An inpainting UNet takes the masked image's latents and the mask too: 4 + 4 + 1 input channels."""
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = torch.cat([state[key], torch.zeros(state[key].shape[0], 5, *state[key].shape[2:])], dim=1)


@pytest.mark.parametrize(("change", "found"), [
    (_with(edm_mean=torch.zeros(1, 4, 1, 1), edm_std=torch.ones(1, 4, 1, 1)), "its edm_mean, edm_std keys"),
    (_with(**{"edm_vpred.sigma_max": torch.tensor(80.0)}), "its edm_vpred.sigma_max keys"),
    (_refiner, "an SDXL refiner (conditioner.embedders.0.model.*"),
    (_inpainting, "an inpainting checkpoint (its UNet takes 9 input channels"),
], ids=["playground-edm", "edm-vpred", "refiner", "inpainting"])
def test_checkpoints_of_other_kinds_are_refused_naming_what_was_found(change: Callable[[dict[str, Tensor]], None],
                                                                      found: str, tiny_base_dir: Path,
                                                                      tmp_path: Path) -> None:
    """Refused even with a config folder beside the file (which would otherwise load them as epsilon SDXL)."""
    path = write_single_file(tiny_base_dir, tmp_path / "checkpoint", change)
    for use in (lambda: models.load_base(ModelRecipe(base=str(path))), lambda: models.base_denoiser_config(str(path))):
        with pytest.raises(models.ModelError) as raised:
            use()
        message = str(raised.value)
        assert found in message and message.startswith(f"[model].base = {str(path)!r}") and "\n" not in message


@pytest.mark.parametrize("arch", ["sdxl", "sd15"])
def test_the_original_layout_of_the_real_architectures_reads_back_through_diffusers_converters(arch: str) -> None:
    """On the meta device (names and shapes, no weights): the real SDXL / SD 1.5 UNet, VAE (mid-block attention
    included, which the tiny VAE lacks) and text encoders, written in the original layout, come back through
    diffusers' own single-file converters to every key and shape they started from."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lora_dpo.models import original

    def same(back: dict[str, Tensor], state: dict[str, Tensor]) -> None:
        assert set(back) == set(state)
        assert [k for k in state if back[k].shape != state[k].shape] == []

    family = models.family_named(arch)
    unet = models.unet_from_config(family.shipped_config("unet"), device="meta")
    state = unet.state_dict()
    same(convert_ldm_unet_checkpoint(original.unet_state(state, unet.config), dict(unet.config)), state)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(models.shipped_config(arch, "vae"))
        encoders = [cls(CLIPTextConfig(**models.shipped_config(arch, name)))
                    for cls, name in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2"))
                    if arch == "sdxl" or name == "text_encoder"]
    ldm = original.vae_state(vae.state_dict(), len(vae.config.block_out_channels), vae.config.layers_per_block)
    assert any(".mid.attn_1.q.weight" in k for k in ldm)
    same(convert_ldm_vae_checkpoint(ldm, dict(vae.config)), vae.state_dict())

    def named(encoder: Any) -> dict[str, Tensor]:  # transformers 5 leaves `text_model.` out of the state dict
        return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v
                for k, v in encoder.state_dict().items()}

    state = family.original_text_state(tuple(encoders))  # the family's layout, as `original.checkpoint_state` writes it
    clip_prefix, *openclip = {"sdxl": ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."),
                              "sd15": ("cond_stage_model.transformer.",)}[arch]
    same(convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(clip_prefix)}),
         named(encoders[0]))
    if openclip:
        packed = {k: v for k, v in state.items() if k.startswith(openclip[0])}
        same(convert_open_clip_checkpoint(encoders[1], packed, prefix=openclip[0]), named(encoders[1]))
