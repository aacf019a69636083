"""The files people load for the flow families (SD3, FLUX): read (diffusers `transformer.` keys, kohya files with
fused qkv split back), the ComfyUI / Forge file written (every key through ComfyUI's key map for the model to a
weight of the original layout, the fused delta equal to the separate ones, the scale right), its metadata, the
card, another family's adapter refused in one line (CLI), merge, inspect and eval generation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from flow_helpers import (
    back_to_diffusers,
    comfy_apply,
    comfy_key_map,
    comfy_transformer_map,
    original_state,
)
from safetensors import safe_open
from safetensors.torch import save_file

from lora_dpo import export, models
from lora_dpo.models.families.flux import FAMILY as FLUX
from lora_dpo.models.families.flux import build_tiny_flux_pipeline
from lora_dpo.models.families.sd3 import FAMILY as SD3
from lora_dpo.models.families.sd3 import build_tiny_sd3_pipeline

ROOT = Path(__file__).parent.parent
BUILD = {"sd3": (SD3, build_tiny_sd3_pipeline), "flux": (FLUX, build_tiny_flux_pipeline)}
# FLUX: the default targets (single blocks' q, k, v: 3 of linear1's 4 parts) plus proj_mlp (all 4) and proj_out,
# proj_mlp at another rank (a different scale: folded into its B in the fused file)
TARGETS = {"sd3": (list(SD3.default_target_modules), {}),
           "flux": ([*FLUX.default_target_modules, "proj_mlp", "single_transformer_blocks.0.proj_out"],
                    {"proj_mlp": 2})}


@pytest.fixture(scope="module")
def bases(tiny_sd3_base_dir: Path, tiny_flux_base_dir: Path) -> dict[str, Path]:
    """Each tiny flow base's diffusers folder (the base adapters name): the session's (tests/conftest.py)."""
    return {"sd3": tiny_sd3_base_dir, "flux": tiny_flux_base_dir}


def _lora(name: str, transformer: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """A peft LoRA (alpha 8, rank 4: scale 2) with random B on `transformer`; its peft state dict."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    targets, ranks = TARGETS[name]
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets,
                                       rank_pattern=ranks))
    with torch.no_grad():
        for key, param in transformer.named_parameters():
            if "lora_B" in key:
                param.normal_(std=0.3)
    return get_peft_model_state_dict(transformer)


@pytest.fixture(scope="module")
def adapters(bases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Per family: a LoRA on the tiny base saved by the stock pipeline class's `save_lora_weights`, with the
    header lora-dpo's training writes (the base and the model spec)."""
    import diffusers

    files = {}
    for name, (family, _) in BUILD.items():
        pipe = getattr(diffusers, family.pipeline_class).from_pretrained(bases[name])
        state = _lora(name, pipe.transformer)
        folder = tmp_path_factory.mktemp(f"{name}-adapter")
        config = pipe.transformer.peft_config["default"].to_dict()  # alpha != rank: diffusers keeps it here
        type(pipe).save_lora_weights(folder, transformer_lora_layers=state, transformer_lora_adapter_metadata=config)
        tensors, meta = export.read_file(folder / export.ADAPTER_FILE)
        arch = family.modelspec_architecture_for(dict(pipe.transformer.config))
        meta |= {"lora_dpo.base_model": str(bases[name]), "modelspec.architecture": f"{arch}/lora"}
        save_file(tensors, str(folder / export.ADAPTER_FILE), metadata=meta)
        files[name] = folder / export.ADAPTER_FILE
    return files


def _transformer(name: str, bases: dict[str, Path]) -> Any:
    import diffusers

    family = BUILD[name][0]
    return getattr(diffusers, family.denoiser_class).from_pretrained(bases[name], subfolder=family.denoiser_folder)


def _inputs(name: str, transformer: Any) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    config = transformer.config
    if name == "sd3":
        return dict(hidden_states=torch.randn(1, 16, 8, 8, generator=generator), timestep=torch.tensor([500.0]),
                    encoder_hidden_states=torch.randn(1, 6, 64, generator=generator),
                    pooled_projections=torch.randn(1, 64, generator=generator))
    return dict(hidden_states=torch.randn(1, 16, 64, generator=generator), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([3.5]) if config.guidance_embeds else None,
                encoder_hidden_states=torch.randn(1, 6, 64, generator=generator),
                pooled_projections=torch.randn(1, 32, generator=generator), txt_ids=torch.zeros(6, 3),
                img_ids=torch.zeros(16, 3))


def _out(name: str, transformer: Any) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**_inputs(name, transformer), return_dict=False)[0]


def _stock(name: str, bases: dict[str, Path], adapter: Path | None = None) -> Any:
    """The stock pipeline's transformer, the adapter loaded as diffusers' `load_lora_weights` loads it."""
    import diffusers

    pipe = getattr(diffusers, BUILD[name][0].pipeline_class).from_pretrained(bases[name])
    if adapter is not None:
        pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name)
    return pipe.transformer


# --------------------------------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("name", BUILD)
def test_diffusers_file_reads_and_loads_as_diffusers_does(name: str, bases: dict[str, Path],
                                                          adapters: dict[str, Path]) -> None:
    adapter = export.read_adapter(adapters[name])
    assert adapter.modules and all(not m.startswith("transformer.") for m in adapter.modules)
    scales = {adapter.alphas[m] / adapter.ranks[m] for m in adapter.modules}
    assert scales == ({2.0, 4.0} if name == "flux" else {2.0})
    assert set(adapter.ranks.values()) == ({2, 4} if name == "flux" else {4})
    transformer = _transformer(name, bases)
    export.load_adapter(transformer, adapters[name], base=str(bases[name]))
    torch.testing.assert_close(_out(name, transformer), _out(name, _stock(name, bases, adapters[name])),
                               rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# The ComfyUI / Forge file


@pytest.fixture(scope="module")
def kohya_files(adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("kohya")
    return {name: export.export_adapter(adapters[name], out / f"{name}.safetensors", "kohya", "fp32")
            for name in BUILD}


@pytest.mark.parametrize("name", BUILD)
def test_kohya_file_through_comfyuis_key_map_equals_the_adapter(name: str, bases: dict[str, Path],
                                                                 adapters: dict[str, Path],
                                                                 kohya_files: dict[str, Path]) -> None:
    """Every key of the file maps through ComfyUI's key map for the model (`lora_unet_` + the original key) to a
    weight of the original layout, of the right shape; ComfyUI's LoRA math on those weights, split back into the
    diffusers modules, gives the transformer the stock diffusers pipeline gets from the diffusers file (1e-5)."""
    family = BUILD[name][0]
    transformer = _transformer(name, bases)
    original = original_state(family, transformer)
    key_map = comfy_key_map(family, original, dict(transformer.config))
    with safe_open(str(kohya_files[name]), "pt") as handle:
        lora = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    for key in lora:
        module = key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0]
        assert module.startswith("lora_unet_") and module in key_map, key
        target, rows = key_map[module]
        assert rows is None and target in original, key
        if key.endswith(".lora_up.weight"):
            down = lora[f"{module}.lora_down.weight"]
            assert (lora[key].shape[0], down.shape[1]) == tuple(original[target].shape), key
            assert lora[key].shape[1] == down.shape[0]
        if key.endswith(".alpha"):
            assert lora[key].shape == () and lora[key].dtype == torch.float32
    patched, not_loaded = comfy_apply(lora, key_map, original)
    assert not not_loaded
    transformer.load_state_dict(back_to_diffusers(family, transformer, patched))
    expected = _out(name, _stock(name, bases, adapters[name]))
    assert (expected - _out(name, _stock(name, bases))).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(_out(name, transformer), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", BUILD)
def test_fused_delta_equals_the_separate_deltas(name: str, bases: dict[str, Path], adapters: dict[str, Path],
                                                kohya_files: dict[str, Path]) -> None:
    """Per fused weight: up @ down x alpha / rank (ComfyUI's and Forge's delta), row block by row block, equals
    each module's own B @ A x alpha / r (1e-6); rows of a module the adapter leaves alone are zero."""
    family = BUILD[name][0]
    adapter = export.read_adapter(adapters[name])
    config = dict(_transformer(name, bases).config)
    with safe_open(str(kohya_files[name]), "pt") as handle:
        lora = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    fused = 0
    for module in adapter.modules:
        rows = family.fused_slice(module, config)
        kohya_name = family.kohya_module_name(module, config)
        up, down = lora[f"{kohya_name}.lora_up.weight"], lora[f"{kohya_name}.lora_down.weight"]
        delta = lora[f"{kohya_name}.alpha"].item() / down.shape[0] * up @ down
        own = adapter.alphas[module] / adapter.ranks[module] * (
            adapter.weights[f"{module}.lora_B.weight"] @ adapter.weights[f"{module}.lora_A.weight"])
        part = delta if rows is None else delta.narrow(*rows)
        torch.testing.assert_close(part, own, rtol=0, atol=1e-6)
        fused += rows is not None
    assert fused >= (6 if name == "sd3" else 10)
    if name == "flux":  # a single block's linear1 with q, k, v and proj_mlp: 4 parts, 7H rows, ranks 4+4+4+2
        up = lora["lora_unet_single_blocks_0_linear1.lora_up.weight"]
        assert up.shape == (7 * 32, 14)


@pytest.mark.parametrize("name", BUILD)
def test_kohya_file_reads_back_split_and_loads(name: str, bases: dict[str, Path], adapters: dict[str, Path],
                                               kohya_files: dict[str, Path]) -> None:
    """Our fused file read back: each module gets its own A, B and alpha again (the block-diagonal up split by
    rows and by its non-zero columns); loaded, the same output as the stock pipeline with the diffusers file."""
    adapter = export.read_adapter(adapters[name])
    back = export.read_adapter(kohya_files[name])
    assert set(back.modules) == set(adapter.modules) and not back.unmatched
    folded = 0
    for module in adapter.modules:  # the same A; B and alpha the same, or the scale folded into B (alpha = rank)
        assert back.ranks[module] == adapter.ranks[module]
        torch.testing.assert_close(back.weights[f"{module}.lora_A.weight"], adapter.weights[f"{module}.lora_A.weight"],
                                   rtol=0, atol=1e-6)
        scale = adapter.alphas[module] / adapter.ranks[module]
        if back.alphas[module] != pytest.approx(adapter.alphas[module]):
            assert back.alphas[module] == back.ranks[module]
            scale, folded = 1.0, folded + 1
        torch.testing.assert_close(back.weights[f"{module}.lora_B.weight"] * scale,
                                   adapter.weights[f"{module}.lora_B.weight"] * adapter.alphas[module]
                                   / adapter.ranks[module], rtol=0, atol=1e-6)
    assert folded == (4 if name == "flux" else 0)  # linear1's q, k, v (scale 2) beside proj_mlp (scale 4)
    transformer = _transformer(name, bases)
    export.load_adapter(transformer, kohya_files[name])
    torch.testing.assert_close(_out(name, transformer), _out(name, _stock(name, bases, adapters[name])),
                               rtol=0, atol=1e-5)



@pytest.mark.parametrize("name", BUILD)
def test_export_to_diffusers_writes_the_familys_file(name: str, bases: dict[str, Path], adapters: dict[str, Path],
                                                     kohya_files: dict[str, Path], tmp_path: Path) -> None:
    """`lora-dpo export --format diffusers` of the ComfyUI file: `transformer.` keys, as the family's pipeline
    writes them, and the stock pipeline loads it to the same output as the diffusers file it came from."""
    out = export.export_adapter(kohya_files[name], tmp_path / "back.safetensors", "diffusers", dtype="fp32")
    tensors, _ = export.read_file(out)
    assert tensors and all(key.startswith("transformer.") for key in tensors)
    torch.testing.assert_close(_out(name, _stock(name, bases, out)), _out(name, _stock(name, bases, adapters[name])),
                               rtol=0, atol=1e-5)

def test_a_fused_file_made_elsewhere_splits_into_full_rank_parts(bases: dict[str, Path], tmp_path: Path) -> None:
    """sd-scripts' way: one rank-r LoRA on the whole fused qkv (up not block-diagonal): each of q, k, v gets the
    whole down and its rows of up, alpha scaled to keep alpha / rank; the delta is the same."""
    config = models.base_denoiser_config(str(bases["flux"]))
    generator = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 32, generator=generator), torch.randn(96, 4, generator=generator)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)},
              str(tmp_path / "theirs.safetensors"), metadata={"ss_base_model_version": "flux1"})
    adapter = export.read_adapter(tmp_path / "theirs.safetensors", base=str(bases["flux"]))
    assert adapter.modules == [f"transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v")]
    for i, module in enumerate(adapter.modules):
        assert adapter.ranks[module] == 4 and adapter.alphas[module] == 2.0
        delta = adapter.weights[f"{module}.lora_B.weight"] @ adapter.weights[f"{module}.lora_A.weight"]
        torch.testing.assert_close(delta, (up @ down)[32 * i:32 * (i + 1)])
    assert config["num_single_layers"] == 1


@pytest.mark.parametrize("name", BUILD)
def test_kohya_file_metadata_names_the_family(name: str, kohya_files: dict[str, Path]) -> None:
    """The model spec and sd-scripts' keys as sd-scripts writes them for the family (see the families' docstrings)."""
    with safe_open(str(kohya_files[name]), "pt") as handle:
        meta = handle.metadata()
    expected = {"sd3": ("stable-diffusion-3-5-medium/lora", "5-medium", "https://github.com/Stability-AI/"
                        "generative-models"),
                "flux": ("flux-1-dev/lora", "flux1", "https://github.com/black-forest-labs/flux")}[name]
    assert (meta["modelspec.architecture"], meta["ss_base_model_version"], meta["modelspec.implementation"]) == \
        expected
    assert meta["sshs_model_hash"] and meta["ss_network_module"] == "networks.lora"
    info = export.inspect_adapter(kohya_files[name])
    assert info["family"] == BUILD[name][0].label and info["architecture"] == expected[0]


def test_kohya_metadata_of_a_schnell_base(tmp_path: Path) -> None:
    """A FLUX base without the guidance embedding is schnell: `flux-1-schnell`."""
    pipe = build_tiny_flux_pipeline(guidance=False)
    pipe.save_pretrained(tmp_path / "schnell")
    state = _lora("flux", pipe.transformer)
    weights = {k: v for k, v in state.items()}
    alphas = {k.removesuffix(".lora_A.weight"): 8.0 * v.shape[0] / 4 for k, v in state.items() if "lora_A" in k}
    adapter = export.Adapter(weights, alphas, {"lora_dpo.base_model": str(tmp_path / "schnell")})
    out = export.write_kohya(adapter, tmp_path / "s.safetensors", dict(pipe.transformer.config))
    with safe_open(str(out), "pt") as handle:
        assert handle.metadata()["modelspec.architecture"] == "flux-1-schnell/lora"


@pytest.mark.parametrize("name", BUILD)
def test_inspect_names_family_and_base(name: str, bases: dict[str, Path], adapters: dict[str, Path]) -> None:
    info = export.inspect_adapter(adapters[name])
    assert info["family"] == BUILD[name][0].label and info["base_model"] == str(bases[name])
    assert info["format"] == "diffusers" and info["alpha"] == 8


# --------------------------------------------------------------------------------------------------
# The card


def test_card_and_push_folder_name_the_family(bases: dict[str, Path], adapters: dict[str, Path],
                                               tmp_path: Path) -> None:
    from lora_dpo import card, publish

    for name, (family, _) in BUILD.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / export.ADAPTER_FILE).write_bytes(adapters[name].read_bytes())
        (folder / "recipe.toml").write_text(f'[model]\nbase = "{bases[name]}"\n\n[data]\nsource = "demo"\n')
        text = card.model_card(folder)
        assert f"from diffusers import {family.pipeline_class}" in text
        assert f"pipe = {family.pipeline_class}.from_pretrained(" in text and "pipe.load_lora_weights(" in text
        assert all(f"- {tag}" in text for tag in family.card_tags)
        assert "| ComfyUI, Forge |" in text and "AUTOMATIC1111" not in text
        kohya_file = publish.prepare(folder, f"you/{name}-dpo")  # what `push` uploads: the kohya file beside
        assert kohya_file.name == card.kohya_file(folder) and export.read_adapter(kohya_file).modules
        assert f"`{kohya_file.name}` (kohya format)" in (folder / card.CARD_FILE).read_text()


# --------------------------------------------------------------------------------------------------
# Merge and eval


@pytest.mark.parametrize("name", BUILD)
def test_merge_writes_a_pipeline_equal_to_base_plus_adapter(name: str, bases: dict[str, Path],
                                                            adapters: dict[str, Path],
                                                            kohya_files: dict[str, Path], tmp_path: Path) -> None:
    import diffusers

    expected = _out(name, _stock(name, bases, adapters[name]))
    for source in (adapters[name], kohya_files[name]):
        out = export.merge_adapter(source, str(bases[name]), 1.0, tmp_path / source.stem)
        merged = getattr(diffusers, BUILD[name][0].pipeline_class).from_pretrained(out)
        assert not any("lora" in k for k in merged.transformer.state_dict())
        torch.testing.assert_close(_out(name, merged.transformer), expected, rtol=0, atol=1e-5)
    with pytest.raises(export.AdapterError, match="--format single-file: no original .* layout .*--format diffusers"):
        export.merge_adapter(adapters[name], str(bases[name]), 1.0, tmp_path / "x.safetensors", fmt="single-file")


@pytest.mark.parametrize("name", BUILD)
def test_eval_generation_with_the_familys_pipeline(name: str, bases: dict[str, Path],
                                                   kohya_files: dict[str, Path]) -> None:
    """`evaluate.open_generation` on a flow base: the family's pipeline, its own default guidance (FLUX dev's 3.5,
    SD3's 7), the adapter (our kohya file) on and off."""
    import numpy as np

    from lora_dpo import evaluate
    from lora_dpo.evaluate.generation import _use_scale

    pipe, gen = evaluate.open_generation(str(bases[name]), kohya_files[name], steps=2, guidance_scale=None,
                                         resolution=64, precision="no")
    assert type(pipe).__name__ == BUILD[name][0].pipeline_class
    assert gen.guidance_scale == (3.5 if name == "flux" else 7.0)
    images = []
    for scale in (None, 1.0):
        _use_scale(pipe, scale)
        images.append(np.asarray(evaluate.generate(pipe, "a red circle", 0, 2, gen.guidance_scale, 64), dtype=float))
    assert images[0].shape == (64, 64, 3) and np.abs(images[0] - images[1]).max() > 0


# --------------------------------------------------------------------------------------------------
# Another family's adapter: one line, exit 2, in eval, merge and export


@pytest.fixture(scope="module")
def sdxl_adapter(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer SDXL adapter for the tiny SDXL base (diffusers format, lora-dpo's header)."""
    config = json.loads((tiny_base_dir / "unet" / "config.json").read_text())
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    width = dict(export.skeleton(config).named_modules())[module].in_features
    adapter = export.Adapter({f"{module}.lora_A.weight": torch.randn(4, width),
                              f"{module}.lora_B.weight": torch.randn(width, 4)}, {module: 4.0},
                             {"lora_dpo.base_model": str(tiny_base_dir),
                              "modelspec.architecture": models.family_named("sdxl").modelspec_architecture + "/lora"})
    return export.write_diffusers(adapter, tmp_path_factory.mktemp("sdxl-adapter") / export.ADAPTER_FILE,
                                  models.family_named("sdxl"))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_dpo", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_another_familys_adapter_is_refused_in_one_line(adapters: dict[str, Path], bases: dict[str, Path],
                                                        sdxl_adapter: Path, tiny_base_dir: Path,
                                                        tmp_path: Path) -> None:
    cases = [  # (adapter, its family, base, the base's family, command)
        (adapters["flux"], "FLUX.1", tiny_base_dir, "SDXL", "eval"),
        (adapters["flux"], "FLUX.1", tiny_base_dir, "SDXL", "merge"),
        (adapters["flux"], "FLUX.1", tiny_base_dir, "SDXL", "export"),
        (sdxl_adapter, "SDXL", bases["flux"], "FLUX.1", "merge"),
        (sdxl_adapter, "SDXL", bases["flux"], "FLUX.1", "eval"),
        (adapters["sd3"], "SD3.5", bases["flux"], "FLUX.1", "export"),
        (adapters["sd3"], "SD3.5", bases["flux"], "FLUX.1", "eval"),
    ]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    for adapter, family, base, base_family, command in cases:
        args = {"eval": ["eval", str(adapter), "--prompts", str(prompts), "--base", str(base), "--out",
                         str(tmp_path / "e")],
                "merge": ["merge", str(adapter), "--base", str(base), "--out", str(tmp_path / "m")],
                "export": ["export", str(adapter), "--base", str(base), "--out", str(tmp_path / "k.safetensors")],
                }[command]
        result = _cli(*args)
        lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert len(lines) == 1, (command, lines)
        assert f"a {family} adapter" in lines[0] and f"a {base_family} base" in lines[0], (command, lines[0])
        assert str(adapter) in lines[0] and str(base) in lines[0]
    assert not (tmp_path / "m").exists() and not (tmp_path / "k.safetensors").exists()


def test_comfy_transformer_map_agrees_with_the_families(bases: dict[str, Path]) -> None:
    """The key names our kohya files use (the families' `kohya_module_name` and `fused_slice`) are the original
    keys and rows ComfyUI's `mmdit_to_diffusers` / `flux_to_diffusers` give for every LoRA-able block layer."""
    for name, (family, _) in BUILD.items():
        config = models.base_denoiser_config(str(bases[name]))
        for key, (target, rows) in comfy_transformer_map(family, config).items():
            module = key.removesuffix(".weight")
            if module == f"transformer_blocks.{config['num_layers'] - 1}.norm1_context.linear" and family is SD3:
                with pytest.raises(ValueError, match="swapped"):  # ComfyUI maps it with swap_scale_shift
                    family.kohya_module_name(module, config)
                continue
            assert family.kohya_module_name(module, config) == "lora_unet_" + target[len("diffusion_model."):
                                                                                    -len(".weight")].replace(".", "_")
            assert family.fused_slice(module, config) == rows, key
