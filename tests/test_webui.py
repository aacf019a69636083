"""The webui header keys of a kohya export: sd-scripts' training keys read back from the run's recipe, the
A1111 hashes checked against a computation written here from sd-scripts' definition, and the model spec."""

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from lora_dpo import export, webui
from lora_dpo.export import ADAPTER_FILE
from lora_dpo.recipe import from_dict
from lora_dpo.train import train


def _tensor_data_sha256(path: Path) -> str:
    """sha256 of a safetensors file after its header: 8-byte little-endian length, then that many bytes."""
    raw = path.read_bytes()
    return hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()


def _legacy(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """The old webui hash of the file sd-scripts hashes: the tensors saved with the `ss_*` keys only."""
    blob = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    return hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def test_hashes_match_sd_scripts_definition_on_a_file_over_one_mebibyte(tmp_path: Path) -> None:
    """Over 1 MiB, so the legacy hash reads real tensor bytes (under it, it hashes an empty read)."""
    generator = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_x.lora_down.weight": torch.randn(8, 40_000, generator=generator),  # 1.28 MB
               "lora_unet_x.alpha": torch.tensor(8.0)}
    metadata = {"ss_network_dim": "8", "modelspec.title": "not hashed", "ss_output_name": "x"}
    model_hash, legacy = webui.safetensors_hashes(tensors, metadata)
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata={**metadata, "extra": "header grows, data does not change"})
    assert model_hash == _tensor_data_sha256(path)
    assert legacy == _legacy(tensors, metadata) and legacy != hashlib.sha256(b"").hexdigest()[:8]


@pytest.fixture(scope="module")
def conv_run(tiny_base_dir: Path, shapes_jsonl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 steps, LoRA on attention and on the resnets' 3x3 convolutions, every training key away from its default."""
    recipe = from_dict({
        "model": {"base": str(tiny_base_dir)},
        "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["to_q", "to_v", "conv1"]},
        "data": {"source": str(shapes_jsonl), "resolution": 64, "val_pairs": 0},
        "train": {"learning_rate": 3e-4, "max_steps": 2, "batch_size": 1, "gradient_accumulation": 2,
                  "mixed_precision": "no", "optimizer": "adamw", "lr_schedule": "constant_with_warmup",
                  "warmup_steps": 1,
                  "seed": 7, "checkpoint_every": 0},
        "output": {"dir": str(tmp_path_factory.mktemp("webui")), "name": "conv", "report_to": []}})
    return train(recipe).parent


def test_kohya_export_carries_sd_scripts_training_keys_hashes_and_modelspec(conv_run: Path, tmp_path: Path) -> None:
    before = time.time()
    with safe_open(str(conv_run / ADAPTER_FILE), "pt") as handle:
        diffusers_meta = handle.metadata()
    assert diffusers_meta["modelspec.implementation"] == "diffusers"  # diffusers module names, not SGM's

    path = export.export_adapter(conv_run, tmp_path / "conv.safetensors", "kohya", "fp16")
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    expected = {"ss_resolution": "(64, 64)", "ss_learning_rate": "0.0003", "ss_unet_lr": "0.0003",
                "ss_lr_scheduler": "constant_with_warmup", "ss_mixed_precision": "no", "ss_seed": "7",
                "ss_max_train_steps": "2", "ss_gradient_accumulation_steps": "2", "ss_network_dropout": "0.1",
                "ss_steps": "2", "ss_network_dim": "4", "ss_network_alpha": "8.0",
                "modelspec.prediction_type": "epsilon", "modelspec.resolution": "64x64",
                "modelspec.implementation": "https://github.com/Stability-AI/generative-models",  # SGM names
                "modelspec.sai_model_spec": "1.0.1", "ss_v2": "False", "ss_zero_terminal_snr": "False",
                "ss_sd_model_name": "base"}  # a local folder by its basename, as sd-scripts names it
    assert {k: meta.get(k) for k in expected} == expected
    assert "ss_new_sd_model_hash" not in meta and "ss_sd_model_hash" not in meta  # a folder has no file hash
    assert meta["ss_optimizer"].startswith("torch.optim.adamw.AdamW(weight_decay=0.01")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "8"}
    started, finished = float(meta["ss_training_started_at"]), float(meta["ss_training_finished_at"])
    assert before - 600 < started <= finished <= before + 1
    assert meta["sshs_model_hash"] == _tensor_data_sha256(path) == hashlib.sha256(
        path.read_bytes()[8 + int.from_bytes(path.read_bytes()[:8], "little"):]).hexdigest()
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    assert meta["sshs_legacy_hash"] == _legacy(tensors, meta)
    assert all(isinstance(v, str) for v in meta.values())


def test_an_attention_only_adapter_writes_no_network_args() -> None:
    weights = {"a.to_q.lora_A.weight": torch.zeros(4, 8), "b.proj_in.lora_A.weight": torch.zeros(4, 8, 1, 1)}
    assert webui.network_args(weights, {"a.to_q": 4.0, "b.proj_in": 4.0}) == {}


def test_a_base_file_is_hashed_as_sd_scripts_hashes_it_and_named_by_its_basename(tmp_path: Path) -> None:
    """`train_util.model_hash` (8 hex digits of sha256 of the 64 KiB at 1 MiB) and `calculate_sha256` (the whole
    file) on a file over 1 MiB; a hub id keeps its name, a local path is cut to its basename."""
    path = tmp_path / "models" / "base.safetensors"
    path.parent.mkdir()
    path.write_bytes(bytes(range(256)) * 5000)  # 1.22 MiB
    raw = path.read_bytes()
    legacy, full = webui.file_hashes(path)
    assert full == hashlib.sha256(raw).hexdigest() and legacy == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    recorded = {"lora_dpo.base_sha256": full, "lora_dpo.base_legacy_sha256": legacy}
    assert webui.base_keys(recorded, str(path)) == {"ss_sd_model_name": "base.safetensors",
                                                    "ss_new_sd_model_hash": full, "ss_sd_model_hash": legacy}
    assert webui.base_keys({}, "stabilityai/sdxl-turbo") == {"ss_sd_model_name": "stabilityai/sdxl-turbo"}
    assert webui.base_keys({}, str(tmp_path / "models") + "/") == {"ss_sd_model_name": "models"}


def test_v_prediction_is_named_as_sd_scripts_names_it() -> None:
    """`modelspec.prediction_type` "v" (sai_model_spec.PRED_TYPE_V) and `ss_base_model_version` `sd_v1_v`
    (model_util.get_model_version_str_for_sd1_sd2); SDXL is `sdxl_base_v1-0` either way."""
    from lora_dpo import models

    sd15, sdxl = models.family_named("sd15"), models.family_named("sdxl")
    v_spec = webui.modelspec(sdxl.modelspec_architecture, "t", 1024, webui.IMPLEMENTATION_SGM, "v_prediction")
    assert v_spec["modelspec.prediction_type"] == "v"
    assert v_spec["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    spec = webui.modelspec(sd15.modelspec_architecture, "t", 512, webui.IMPLEMENTATION_DIFFUSERS)
    assert spec["modelspec.prediction_type"] == "epsilon"
    assert spec["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert [family.webui_spec().version(kind) for family in (sd15, sdxl) for kind in ("epsilon", "v")] == \
        ["sd_v1", "sd_v1_v", "sdxl_base_v1-0", "sdxl_base_v1-0"]


def test_a_run_from_before_constant_with_warmup_is_named_as_it_trained() -> None:
    """Until `constant_with_warmup` was a choice, `constant` with a warmup warmed up: its recipe.toml says
    `constant`, the kohya key says what ran. Today's recipes name the schedule themselves."""
    assert webui.lr_schedule_name("constant", 500) == "constant_with_warmup"
    assert webui.lr_schedule_name("constant", 0) == "constant"
    assert webui.lr_schedule_name("cosine", 500) == "cosine"
