"""Adapter formats end to end on the tiny bases (SDXL and SD 1.5): a trained adapter, written in the diffusers
format and exported to kohya, gives the same UNet through stock diffusers `load_lora_weights`; our loader, merge
and inspect agree."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from lora_dpo import export, models
from lora_dpo.cli import app
from lora_dpo.export import ADAPTER_FILE, Adapter, AdapterError
from lora_dpo.hub import HubUnavailableError
from lora_dpo.recipe import from_dict
from lora_dpo.train import train

INPUTS_SEED = 0


def _inputs(cross_attention_dim: int = 64, pooled_dim: int | None = 32) -> dict:
    generator = torch.Generator().manual_seed(INPUTS_SEED)
    inputs = {"sample": torch.randn(2, 4, 8, 8, generator=generator), "timestep": torch.tensor([10, 500]),
              "encoder_hidden_states": torch.randn(2, 77, cross_attention_dim, generator=generator)}
    if pooled_dim:
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled_dim, generator=generator),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return inputs


@torch.no_grad()
def _out(unet, inputs: dict) -> torch.Tensor:
    return unet(**inputs).sample


@dataclass(frozen=True)
class Arch:
    """What differs between the tiny SDXL and SD 1.5 bases for adapter files."""

    pipeline: str  # the stock diffusers pipeline class
    base_fixture: str
    run_fixture: str
    inputs: dict  # _inputs() arguments: the UNet's text width, and SDXL's pooled width
    kohya_names: str  # the module naming in kohya files (sd-scripts': SGM for SDXL, diffusers for SD 1.x)
    other_names: str
    ss_version: str
    modelspec: str


ARCHS = {
    "sdxl": Arch("StableDiffusionXLPipeline", "tiny_base_dir", "trained_run", {}, "_input_blocks_", "_down_blocks_",
                 "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    "sd15": Arch("StableDiffusionPipeline", "tiny_sd15_base_dir", "trained_sd15_run",
                 {"cross_attention_dim": 32, "pooled_dim": None}, "_down_blocks_", "_input_blocks_", "sd_v1",
                 "stable-diffusion-v1/lora"),
}


def _stock_pipe(base_dir: Path, adapter: Path | None = None, arch: str = "sdxl", **kwargs):
    """A fresh stock pipeline, the adapter loaded the way users do: `pipe.load_lora_weights(file or folder)`."""
    import diffusers

    pipe = getattr(diffusers, ARCHS[arch].pipeline).from_pretrained(base_dir)
    if adapter is not None:
        pipe.load_lora_weights(str(adapter), **kwargs)
    return pipe


def _train(base_dir: Path, shapes_jsonl: Path, out: Path) -> Path:
    """A real 3-step DPO run, rank 4 with alpha 16 (alpha != rank: the scale must survive every format)."""
    recipe = from_dict({
        "model": {"base": str(base_dir)}, "lora": {"rank": 4, "alpha": 16.0},
        "data": {"source": str(shapes_jsonl), "resolution": 64, "val_pairs": 0},
        "objective": {"beta": 2000.0},
        "train": {"learning_rate": 1e-3, "max_steps": 3, "batch_size": 2, "mixed_precision": "no",
                  "optimizer": "adamw", "log_every": 1, "checkpoint_every": 0},
        "output": {"dir": str(out), "name": "run"}})
    return train(recipe).parent


@pytest.fixture(scope="module")
def trained_run(tiny_base_dir: Path, shapes_jsonl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tiny_base_dir, shapes_jsonl, tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def trained_sd15_run(tiny_sd15_base_dir: Path, shapes_jsonl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tiny_sd15_base_dir, shapes_jsonl, tmp_path_factory.mktemp("runs_sd15"))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_trained_adapter_is_stamped_and_keeps_diffusers_own_metadata(arch: str, request: pytest.FixtureRequest) -> None:
    run = request.getfixturevalue(ARCHS[arch].run_fixture)
    with safe_open(str(run / ADAPTER_FILE), "pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == 16.0  # diffusers' key kept
    assert meta["lora_dpo.rank"] == "4" and meta["lora_dpo.alpha"] == "16.0" and meta["lora_dpo.steps"] == "3"
    assert meta["lora_dpo.objective"] == "dpo" and float(meta["lora_dpo.beta"]) == 2000.0
    recipe = json.loads(meta["lora_dpo.recipe"])
    assert recipe["data"]["source"] == meta["lora_dpo.dataset"] and len(meta["lora_dpo.fingerprint"]) == 16
    assert meta["modelspec.architecture"] == ARCHS[arch].modelspec  # from the trained UNet's own architecture
    assert meta["modelspec.implementation"] == "diffusers"  # the file's keys are diffusers module names
    assert all(isinstance(v, str) for v in meta.values())


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_kohya_export_loads_in_stock_diffusers_like_the_diffusers_file(arch: str, request: pytest.FixtureRequest,
                                                                       tmp_path: Path, dtype: str) -> None:
    """SDXL with SGM names through StableDiffusionXLPipeline, SD 1.5 with diffusers names through
    StableDiffusionPipeline (whose loader gets no UNet config to remap names with)."""
    expected = ARCHS[arch]
    trained_run = request.getfixturevalue(expected.run_fixture)
    base_dir = request.getfixturevalue(expected.base_fixture)
    path = export.export_adapter(trained_run, tmp_path / "run.safetensors", "kohya", dtype)
    with safe_open(str(path), "pt") as handle:
        keys, meta = list(handle.keys()), handle.metadata()
        alpha = handle.get_tensor(next(k for k in keys if k.endswith(".alpha")))
        down = handle.get_tensor(next(k for k in keys if k.endswith(".lora_down.weight")))
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in keys)
    assert any(expected.kohya_names in k for k in keys) and not any(expected.other_names in k for k in keys)
    assert alpha.shape == () and alpha.item() == 16.0 and down.dtype == models.STORAGE_DTYPES[dtype]
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "16.0"
    assert meta["ss_base_model_version"] == expected.ss_version and meta["ss_network_module"] == "networks.lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["lora_dpo.steps"] == "3"
    assert meta["modelspec.architecture"] == expected.modelspec
    assert meta["modelspec.implementation"] == ("https://github.com/Stability-AI/generative-models" if arch == "sdxl"
                                                else "diffusers")  # whose module names the keys use

    inputs = _inputs(**expected.inputs)
    reference = _out(_stock_pipe(base_dir, trained_run, arch).unet, inputs)
    from_kohya = _out(_stock_pipe(base_dir, path, arch).unet, inputs)
    base = _out(_stock_pipe(base_dir, arch=arch).unet, inputs)
    assert not torch.allclose(reference, base, atol=1e-4)  # the adapter changes the output
    tolerance = {"fp32": 1e-6, "fp16": 1e-4}[dtype]  # measured: 0 and 1.7e-6; the adapter itself moves it 1.5e-2
    torch.testing.assert_close(from_kohya, reference, rtol=0, atol=tolerance)


def _random_adapter(unet, rank: int, alpha: float, targets: list[str], seed: int = 1) -> Adapter:
    """A peft adapter with non-zero random weights on `targets` (peft initialises lora_B to zero)."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    weights = export.lora_state_dict(unet)
    alphas = {k.removesuffix(".lora_A.weight"): float(alpha) for k in weights if k.endswith(".lora_A.weight")}
    return Adapter(weights, alphas, source="random")


EVERY_KIND = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
              "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out", "linear_1", "linear_2"]


def test_every_layer_kind_round_trips_through_kohya_sdxl_names(tiny_base_dir: Path, tmp_path: Path) -> None:
    """Attention, feed-forward, resnet convs and shortcuts, time and add embeddings, down/upsamplers, conv in/out:
    the SGM names computed from the tiny (two-level) config land on the same layers in diffusers' loader."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_base_dir, subfolder="unet")
    adapter = _random_adapter(unet, rank=4, alpha=2.0, targets=EVERY_KIND)
    expected = _out(unet, _inputs())
    path = export.write_kohya(adapter, tmp_path / "all.safetensors", unet.config, torch.float32)
    loaded = _out(_stock_pipe(tiny_base_dir, path).unet, _inputs())
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-5)
    assert any("label_emb_0_0" in k for k in safe_open(str(path), "pt").keys())  # noqa: SIM118


def test_sd15_architecture_kohya_file_loads_in_stock_sd_pipeline(tiny_base_dir: Path, tmp_path: Path) -> None:
    """An SD 1.5-shaped tiny UNet (no text_time, one text encoder) in a stock StableDiffusionPipeline: the
    diffusers-named kohya file loads through `load_lora_weights`, which gets no UNet config for SD 1.x."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    parts = StableDiffusionXLPipeline.from_pretrained(tiny_base_dir)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=16, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4)
    make = lambda u: StableDiffusionPipeline(  # noqa: E731
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=u, scheduler=parts.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pristine = UNet2DConditionModel.from_config(unet.config)
    pristine.load_state_dict(unet.state_dict())
    adapter = _random_adapter(unet, rank=2, alpha=3.0, targets=EVERY_KIND[:-2])
    inputs = _inputs(cross_attention_dim=32, pooled_dim=None)
    expected = _out(unet, inputs)
    path = export.write_kohya(adapter, tmp_path / "sd15.safetensors", unet.config, torch.float32)
    with safe_open(str(path), "pt") as handle:
        assert any(k.startswith("lora_unet_down_blocks_0_attentions_0_") for k in handle.keys())  # noqa: SIM118
        assert handle.metadata()["ss_base_model_version"] == "sd_v1"
    pipe = make(pristine)
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(_out(pipe.unet, inputs), expected, rtol=0, atol=1e-5)


def test_load_adapter_reads_folder_file_and_kohya_like_stock_diffusers(trained_run: Path, tiny_base_dir: Path,
                                                                       tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    kohya_file = export.export_adapter(trained_run, tmp_path / "k.safetensors", "kohya", "fp32")
    inputs = _inputs()
    expected = _out(_stock_pipe(tiny_base_dir, trained_run).unet, inputs)
    for source in (trained_run, trained_run / ADAPTER_FILE, kohya_file):
        unet = UNet2DConditionModel.from_pretrained(tiny_base_dir, subfolder="unet")
        adapter = export.load_adapter(unet, source)
        assert set(adapter.ranks.values()) == {4} and set(adapter.alphas.values()) == {16.0}
        torch.testing.assert_close(_out(unet, inputs), expected, rtol=0, atol=1e-5)
    with pytest.raises(AdapterError, match="no such file or folder"):
        export.resolve_adapter_file(tmp_path / "missing.safetensors")
    with pytest.raises(HubUnavailableError, match="owner/none: the adapter comes from the Hugging Face hub"):  # offline
        export.resolve_adapter_file("owner/none")


def test_adapter_for_another_base_names_both_bases_and_the_first_layer(trained_run: Path,
                                                                         tiny_base_dir: Path) -> None:
    from diffusers import UNet2DConditionModel

    config = json.loads((tiny_base_dir / "unet" / "config.json").read_text())
    other = UNet2DConditionModel.from_config({**config, "cross_attention_dim": 48})  # text width differs
    with pytest.raises(AdapterError) as err:
        export.load_adapter(other, trained_run, base="other-tiny-base")
    message = str(err.value)
    assert str(tiny_base_dir) in message and "other-tiny-base" in message
    assert "first mismatched layer down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k" in message
    assert "adapter 64 -> 64, base 48 -> 64" in message
    assert not hasattr(other, "peft_config")  # nothing half-loaded

    narrow = skeleton_with(config, block_out_channels=(32, 48))
    with pytest.raises(AdapterError, match="does not fit base narrow"):
        export.check_fits(export.read_adapter(trained_run), narrow, "narrow")


def skeleton_with(config: dict, **changes) -> torch.nn.Module:
    return export.skeleton({**config, **changes})


def test_merge_equals_the_adapter_applied_at_that_scale(trained_run: Path, tiny_base_dir: Path,
                                                        tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    merged_dir = export.merge_adapter(trained_run, str(tiny_base_dir), 0.6, tmp_path / "merged")
    merged = StableDiffusionXLPipeline.from_pretrained(merged_dir)
    assert not hasattr(merged.unet, "peft_config")  # plain weights, no LoRA layers
    pipe = _stock_pipe(tiny_base_dir, trained_run, adapter_name="a")
    pipe.set_adapters(["a"], [0.6])
    inputs = _inputs()
    applied, fused = _out(pipe.unet, inputs), _out(merged.unet, inputs)
    full = _out(_stock_pipe(tiny_base_dir, trained_run).unet, inputs)
    torch.testing.assert_close(fused, applied, rtol=0, atol=1e-5)  # measured 6e-7
    assert not torch.allclose(fused, full, atol=1e-4)  # the scale was applied, not 1.0


@pytest.mark.parametrize("arch", list(ARCHS))
def test_merge_writes_a_single_file_that_diffusers_reads_back_fused(arch: str, request: pytest.FixtureRequest,
                                                                    tmp_path: Path) -> None:
    """`lora-dpo merge --format single-file`: one checkpoint in the original layout (A1111, Forge, ComfyUI), whose
    UNet, read back by diffusers' `from_single_file` with the base's local configs, gives base + adapter at that
    scale, and whose VAE and text encoders are the base's."""
    from diffusers import UNet2DConditionModel

    from lora_dpo.models.single_file import load_single_file_parts

    expected = ARCHS[arch]
    run, base_dir = request.getfixturevalue(expected.run_fixture), request.getfixturevalue(expected.base_fixture)
    out = tmp_path / "merged.safetensors"
    result = CliRunner().invoke(app, ["merge", str(run), "--base", str(base_dir), "--scale", "0.6", "--format",
                                      "single-file", "--out", str(out)])
    assert result.exit_code == 0 and "checkpoint folder" in result.output, result.output
    with safe_open(str(out), "pt") as handle:
        keys, meta = list(handle.keys()), handle.metadata()
    text = ("conditioner.embedders.",) if arch == "sdxl" else ("cond_stage_model.transformer.text_model.",)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", *text)) for k in keys)
    assert "v_pred" not in keys and meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.architecture"] == expected.modelspec.removesuffix("/lora")  # a checkpoint, not a LoRA
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.resolution"] == "64x64"

    unet = UNet2DConditionModel.from_single_file(str(out), config=str(base_dir), subfolder="unet",
                                                 local_files_only=True)
    pipe = _stock_pipe(base_dir, run, arch, adapter_name="a")
    pipe.set_adapters(["a"], [0.6])
    inputs = _inputs(**expected.inputs)
    fused, applied = _out(unet, inputs), _out(pipe.unet, inputs)
    torch.testing.assert_close(fused, applied, rtol=0, atol=1e-5)
    assert not torch.allclose(fused, _out(_stock_pipe(base_dir, arch=arch).unet, inputs), atol=1e-4)  # fused in
    parts = load_single_file_parts(out, base_dir, models.family_named(arch), with_unet=False, with_encoders=True,
                                   vae=True, weight_dtype=torch.float32, vae_dtype=torch.float32)
    stock = _stock_pipe(base_dir, arch=arch)
    encoders = (stock.text_encoder, stock.text_encoder_2) if arch == "sdxl" else (stock.text_encoder,)
    for ours, theirs in ((parts["vae"], stock.vae), *zip(parts["text_encoders"], encoders, strict=True)):
        expected_state, got = theirs.state_dict(), ours.state_dict()
        assert set(got) == set(expected_state) and all(torch.equal(got[k], expected_state[k]) for k in got)


def test_inspect_describes_ours_and_foreign_files(trained_run: Path, tmp_path: Path) -> None:
    ours = export.inspect_adapter(trained_run)
    assert ours["format"] == "diffusers" and ours["rank"] == 4 and ours["alpha"] == 16.0
    assert ours["targets"] == ["to_q", "to_k", "to_v", "to_out.0"] and ours["steps"] == "3"
    assert ours["objective"] == "dpo" and ours["layers"] == 96 and ours["parameters"] > 0
    exported = export.export_adapter(trained_run, tmp_path / "k.safetensors", "kohya", "fp16")
    theirs = export.inspect_adapter(exported)
    assert theirs["format"] == "kohya" and theirs["dtype"] == ["float16"]
    assert {k: theirs[k] for k in ("rank", "alpha", "layers", "parameters", "base_model")} == \
        {k: ours[k] for k in ("rank", "alpha", "layers", "parameters", "base_model")}

    # A file as another trainer writes it: kohya keys, an SDXL-width cross-attention, no metadata at all.
    from safetensors.torch import save_file

    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"
    save_file({f"{name}.lora_down.weight": torch.zeros(8, 2048), f"{name}.lora_up.weight": torch.zeros(640, 8),
               f"{name}.alpha": torch.tensor(4.0)}, str(tmp_path / "foreign.safetensors"))
    foreign = export.inspect_adapter(tmp_path / "foreign.safetensors")
    assert foreign["base_model"] == "unknown" and foreign["architecture"] == "SDXL"
    assert foreign["rank"] == 8 and foreign["alpha"] == 4.0 and foreign["targets"] == ["to_k"]


def test_cli_export_inspect_merge_and_their_errors(trained_run: Path, tiny_base_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "run_kohya.safetensors"
    result = runner.invoke(app, ["export", str(trained_run), "--format", "kohya", "--dtype", "bf16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["dtype"] == ["bfloat16"]
    result = runner.invoke(app, ["export", str(out), "--format", "diffusers", "--dtype", "fp32",
                                 "--out", str(tmp_path / "back" / ADAPTER_FILE)])
    assert result.exit_code == 0, result.output
    assert export.inspect_adapter(tmp_path / "back")["alpha"] == 16.0  # kohya -> diffusers keeps the scale
    result = runner.invoke(app, ["merge", str(trained_run), "--base", str(tiny_base_dir), "--scale", "0.5",
                                 "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0 and (tmp_path / "merged" / "model_index.json").is_file()
    bad = runner.invoke(app, ["merge", str(trained_run), "--base", str(tiny_base_dir), "--out",
                              str(tmp_path / "merged.safetensors")])  # a file name, the folder format
    assert bad.exit_code == 2 and "--format single-file" in bad.output and len(bad.output.strip().splitlines()) == 1
    bad = runner.invoke(app, ["export", str(tmp_path / "none"), "--out", str(tmp_path / "x.safetensors")])
    assert bad.exit_code == 2 and "no such file or folder" in bad.output
    (tmp_path / "weights.bin").write_bytes(b"not a pickle we would open")
    bad = runner.invoke(app, ["inspect", str(tmp_path / "weights.bin")])
    assert bad.exit_code == 2 and "only .safetensors" in bad.output


def test_kohya_layer_unknown_to_the_base_is_reported_not_dropped(trained_run: Path, tiny_base_dir: Path,
                                                                 tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tensors, meta = export.read_file(export.export_adapter(trained_run, tmp_path / "k.safetensors", "kohya", "fp32"))
    tensors["lora_unet_input_blocks_9_1_proj_in.lora_down.weight"] = torch.zeros(4, 64)
    tensors["lora_unet_input_blocks_9_1_proj_in.lora_up.weight"] = torch.zeros(64, 4)
    save_file(tensors, str(tmp_path / "extra.safetensors"), metadata=meta)
    adapter = export.read_adapter(tmp_path / "extra.safetensors")
    assert adapter.unmatched == ["lora_unet_input_blocks_9_1_proj_in"]
    config = json.loads((tiny_base_dir / "unet" / "config.json").read_text())
    with pytest.raises(AdapterError, match=r"first mismatched layer lora_unet_input_blocks_9_1_proj_in \(no such"):
        export.check_fits(adapter, export.skeleton(config), "tiny")


@pytest.mark.parametrize("command", ["inspect", "export", "merge"])
def test_a_file_that_holds_no_lora_is_named_as_such(tmp_path: Path, command: str, tiny_base_dir: Path) -> None:
    from safetensors.torch import save_file

    model = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4, 3, 3), "conv_in.bias": torch.zeros(4)}, model)
    args = {"inspect": [str(model)], "export": [str(model), "--format", "kohya", "--out", str(tmp_path / "k")],
            "merge": [str(model), "--base", str(tiny_base_dir), "--out", str(tmp_path / "m")]}[command]
    result = CliRunner().invoke(app, [command, *args])
    assert result.exit_code == 2, result.output
    assert f"{model}: holds no LoRA weights (2 tensors" in result.output
