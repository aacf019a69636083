"""FLUX.2 klein on its tiny random base built offline (a stock `Flux2KleinPipeline` folder): recognised apart from
FLUX.1; prompts, latents (the VAE's batch-norm normalisation), the transformer call and the latent output against
the stock pipeline; the shipped configs build the real 4B transformer; a fresh adapter's DPO step; the adapter file
loads in a fresh stock pipeline and changes its image; a kohya export is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flow_helpers import fresh_adapter_dpo_step

from lora_dpo import models
from lora_dpo.models.families.flux import FAMILY as FLUX
from lora_dpo.models.families.flux2 import FAMILY as FLUX2
from lora_dpo.models.families.flux2 import latent_ids, text_ids
from lora_dpo.models.families.sd3 import FAMILY as SD3

CPU = torch.device("cpu")
PROMPTS = ["a red circle on blue background", "a photo of a green square"]


def _load(base: Path) -> Any:
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline.from_pretrained(base)


def _generate(pipe: Any, output_type: str = "np", **kwargs: Any) -> Any:
    return pipe(prompt=PROMPTS[0], num_inference_steps=2, height=64, width=64, output_type=output_type,
                generator=torch.Generator().manual_seed(0), **kwargs).images


def _random_adapter_file(transformer: Any, folder: Path, std: float = 0.5) -> dict[str, torch.Tensor]:
    """A LoRA on the family's targets with random B (std `std`, seed 0), written by the stock writer into `folder`;
    returns its state (peft names)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=list(FLUX2.default_target_modules)))
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(std=std)
    state = get_peft_model_state_dict(transformer)
    FLUX2.lora_writer().save_lora_weights(folder, transformer_lora_layers=state)
    return state


def _tokens_to_latents(tokens: torch.Tensor) -> torch.Tensor:
    """The pipeline's packed (B, 16, 128) tokens of a 64 px image -> our (B, 32, 8, 8) latents."""
    from diffusers import Flux2KleinPipeline

    patched = tokens.reshape(tokens.shape[0], 4, 4, -1).permute(0, 3, 1, 2)  # (B, 128, 4, 4), ids row-major
    return Flux2KleinPipeline._unpatchify_latents(patched)


# --------------------------------------------------------------------------------------------------
# Recognising it


def test_the_tiny_base_is_a_stock_klein_pipeline_and_only_flux2s(tiny_flux2_base_dir: Path) -> None:
    index = json.loads((tiny_flux2_base_dir / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["vae"][1] == "AutoencoderKLFlux2"
    assert models.family_of_pipeline(index) is FLUX2
    config = json.loads((tiny_flux2_base_dir / "transformer" / "config.json").read_text())
    assert models.family_of_denoiser(config) is FLUX2 and not FLUX.owns_denoiser(config)
    for key, value in FLUX2.tiny_denoiser_config().items():  # the constant the planner reads is the built one
        assert config[key] == value or list(config[key]) == list(value), key
    images = _generate(_load(tiny_flux2_base_dir))
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


def test_class_less_configs_files_and_headers_are_told_from_flux1s() -> None:
    """Without `_class_name`, FLUX.1's keys are in FLUX.2's config too: FLUX.2 is asked first, by keys of its own;
    a BFL FLUX.2 file holds FLUX.1's `double_blocks.` beside its shared modulation."""
    for family in (FLUX2, FLUX, SD3):
        config = {k: v for k, v in family.shipped_config("transformer").items() if k != "_class_name"}
        assert models.family_of_denoiser(config) is family
    flux2_file = ["double_blocks.0.img_attn.qkv.weight", "single_stream_modulation.lin.weight"]
    assert models.family_of_checkpoint(flux2_file) is FLUX2
    assert models.family_of_checkpoint(["model.diffusion_model." + k for k in flux2_file]) is FLUX2
    assert models.family_of_checkpoint(["double_blocks.0.img_attn.qkv.weight"]) is FLUX
    assert models.family_of_metadata("flux-2-klein-4b/lora") is FLUX2
    assert models.family_of_metadata("flux-1-dev/lora") is FLUX and models.family_of_metadata("flux1") is FLUX
    assert models.family_of_metadata("someone/flux.2-klein-4b-ft") is FLUX2  # a hub id names it too


def test_a_flux2_single_file_is_named_and_refused_in_one_line(tmp_path: Path) -> None:
    """Recognised by its keys, not loaded yet (diffusers loads no FLUX.2 VAE from a single file): one line naming
    `[model].base` and what to pass instead, before anything loads."""
    from safetensors.torch import save_file

    from lora_dpo.models.single_file import single_file_family

    path = tmp_path / "flux-2-klein-4b.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1), "single_stream_modulation.lin.weight":
               torch.zeros(1)}, str(path))
    with pytest.raises(models.ModelError, match=r"^\[model\].base = .*: a FLUX.2 klein single file, which lora-dpo "
                                                r"recognises but does not load yet; pass its diffusers folder or hub "
                                                r"id \(black-forest-labs/FLUX.2-klein-4B\)$"):
        single_file_family(path)


def test_shipped_configs_build_the_real_klein_4b() -> None:
    config = FLUX2.shipped_config("transformer")
    with torch.device("meta"):
        transformer = FLUX2.denoiser_from_config(config)
    assert type(transformer).__name__ == "Flux2Transformer2DModel"
    assert sum(p.numel() for p in transformer.parameters()) == pytest.approx(3.876e9, rel=1e-3)
    vae, text = FLUX2.shipped_config("vae"), FLUX2.shipped_config("text")
    assert vae["latent_channels"] * 4 == config["in_channels"] and FLUX2.latent_channels(config) == 32
    assert text["embed_width"] == config["joint_attention_dim"] == len(text["hidden_layers"]) * text["hidden_sizes"][0]
    assert list(text["hidden_layers"]) == list(FLUX2.hidden_layers) and FLUX2.pooled_width(config) is None
    assert not config["guidance_embeds"] and FLUX2.shipped_config("scheduler")["use_dynamic_shifting"]


# --------------------------------------------------------------------------------------------------
# Prompts, latents and the transformer call against the stock pipeline


def test_encode_prompts_equals_the_pipelines(tiny_flux2_base_dir: Path) -> None:
    pipe = _load(tiny_flux2_base_dir)
    tokenizers, encoders = FLUX2.load_text_parts(str(tiny_flux2_base_dir))
    assert not any(p.requires_grad for p in encoders[0].parameters())
    embeds, pooled = FLUX2.encode_prompts(tokenizers, encoders, PROMPTS, CPU)
    expected, text_ids = pipe.encode_prompt(PROMPTS, device=CPU)
    assert embeds.shape == (2, 512, 48) and pooled is None and text_ids.shape == (2, 512, 4)
    assert torch.equal(embeds, expected)


def test_latents_are_the_pipelines_normalised_vae_latents(tiny_flux2_base_dir: Path) -> None:
    """`encode_images` with the family = the pipeline's `_encode_vae_image` (the posterior's mode, patchified,
    batch-norm normalised), in the VAE's (B, 32, h, w) layout; the pipeline's latent output decodes to its image."""
    from diffusers import Flux2KleinPipeline

    pipe = _load(tiny_flux2_base_dir)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = models.encode_images(pipe.vae, pixels, FLUX2)
    with torch.no_grad():
        theirs = pipe._encode_vae_image(pixels, generator=None)  # (2, 128, 4, 4)
    assert ours.shape == (2, 32, 8, 8) and torch.equal(Flux2KleinPipeline._patchify_latents(ours), theirs)
    assert pipe.vae.bn.running_var.min() > 0.5  # the tiny VAE's statistics are not the identity's

    latents = _generate(pipe, output_type="latent")
    with torch.no_grad():
        decoded = pipe.vae.decode(FLUX2.decodable_latents(pipe.vae, latents, 64, 64)).sample
    image = pipe.image_processor.postprocess(decoded, output_type="np")
    np.testing.assert_allclose(image, _generate(pipe), rtol=0, atol=1e-6)


def test_denoise_equals_the_pipelines_transformer_call(tiny_flux2_base_dir: Path) -> None:
    """The pipeline's first transformer call (guidance 1: no CFG batch), through `denoise` on (B, 32, h, w)
    latents: the same ids, sigma as the timestep, no guidance, the same prediction."""
    from diffusers import Flux2KleinPipeline

    pipe, seen = _load(tiny_flux2_base_dir), {}

    def hook(module: Any, args: Any, inputs: dict[str, Any], output: Any) -> None:
        if not seen:
            seen.update(inputs, output=output[0])

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    _generate(pipe, guidance_scale=1.0)
    handle.remove()
    assert seen["guidance"] is None and seen["timestep"].max() <= 1  # sigma: the transformer scales it by 1000
    latents = _tokens_to_latents(seen["hidden_states"])
    assert latents.shape == (1, 32, 8, 8)
    patched = Flux2KleinPipeline._patchify_latents(latents)
    assert torch.equal(Flux2KleinPipeline._pack_latents(patched), seen["hidden_states"])
    assert torch.equal(latent_ids(1, 4, 4, CPU), seen["img_ids"]) and torch.equal(text_ids(1, 512, CPU),
                                                                                 seen["txt_ids"])
    assert torch.equal(latent_ids(3, 2, 5, CPU), Flux2KleinPipeline._prepare_latent_ids(torch.zeros(3, 1, 2, 5)))
    with torch.no_grad():
        prediction = FLUX2.denoise(pipe.transformer, latents, seen["timestep"], seen["encoder_hidden_states"],
                                   None, None)
    torch.testing.assert_close(prediction, _tokens_to_latents(seen["output"]), rtol=0, atol=1e-6)


def test_training_sigmas_are_the_klein_examples(tiny_flux2_base_dir: Path) -> None:
    """Uniform (the example's --weighting_scheme "none"), unshifted under dynamic shifting, sigma as the timestep."""
    schedule = FLUX2.training_scheduler(FLUX2.shipped_config("scheduler"), {})
    assert schedule.weighting_scheme == "none" and FLUX2.timestep_scale(schedule) == 1.0
    timesteps = FLUX2.sample_timesteps(schedule, 4096, torch.Generator().manual_seed(0))
    assert timesteps.min() > 0 and timesteps.max() <= 1 and timesteps.mean().item() == pytest.approx(0.5, abs=0.02)


# --------------------------------------------------------------------------------------------------
# A DPO step, the adapter file, the formats


def test_one_dpo_step_with_a_fresh_adapter(tiny_flux2_base_dir: Path) -> None:
    """A fresh adapter (lora_B = 0) ties policy and reference: loss ln 2 (`fresh_adapter_dpo_step`); gradients
    reach only the adapter, its fused and single-block targets among them."""
    trained = fresh_adapter_dpo_step(FLUX2, _load(tiny_flux2_base_dir), tiny_flux2_base_dir, PROMPTS[0])
    assert trained and all("lora_" in n for n in trained)
    assert any("to_qkv_mlp_proj" in n for n in trained) and any("single_transformer_blocks.0.attn.to_out" in n
                                                                 for n in trained)


def test_lora_file_loads_in_a_fresh_stock_pipeline_and_kohya_is_refused(tiny_flux2_base_dir: Path,
                                                                       tmp_path: Path) -> None:
    from peft.utils import get_peft_model_state_dict

    from lora_dpo import export

    pipe = _load(tiny_flux2_base_dir)
    base_images = _generate(pipe)
    transformer = pipe.transformer
    state = _random_adapter_file(transformer, tmp_path)

    fresh = _load(tiny_flux2_base_dir)
    fresh.load_lora_weights(tmp_path)
    loaded = get_peft_model_state_dict(fresh.transformer, adapter_name=next(iter(fresh.transformer.peft_config)))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert np.abs(_generate(fresh) - base_images).max() > 1e-3

    with pytest.raises(ValueError, match="FLUX.2 klein: no kohya"):
        FLUX2.kohya_module_name("transformer_blocks.0.attn.to_q", transformer.config)
    adapter = export.read_adapter(tmp_path / "pytorch_lora_weights.safetensors", base=str(tiny_flux2_base_dir))
    with pytest.raises(export.AdapterError, match=r"^FLUX.2 klein: no kohya / ComfyUI LoRA format .* --format "
                                                  r"diffusers$"):
        export.write_kohya(adapter, tmp_path / "kohya.safetensors", transformer.config)
    assert not (tmp_path / "kohya.safetensors").exists()


def test_card_push_folder_export_merge_and_inspect(tiny_flux2_base_dir: Path, tmp_path: Path) -> None:
    """A run folder of a klein adapter (the stock writer's file, lora-dpo's header): inspect names the family,
    `export --format diffusers` keeps `transformer.` keys, the card and the push folder carry the diffusers file
    alone (no kohya layout: said on the card), merge equals base + adapter and refuses a single file."""
    from safetensors.torch import save_file

    from lora_dpo import card, export, publish

    pipe = _load(tiny_flux2_base_dir)
    folder = tmp_path / "run"
    _random_adapter_file(pipe.transformer, folder, std=0.3)
    tensors, meta = export.read_file(folder / export.ADAPTER_FILE)
    meta |= {"lora_dpo.base_model": str(tiny_flux2_base_dir), "modelspec.architecture": "flux-2-klein-4b/lora"}
    save_file(tensors, str(folder / export.ADAPTER_FILE), metadata=meta)
    (folder / "recipe.toml").write_text(f'[model]\nbase = "{tiny_flux2_base_dir}"\n\n[data]\nsource = "demo"\n')

    info = export.inspect_adapter(folder / export.ADAPTER_FILE)
    assert info["family"] == "FLUX.2 klein" and info["base_model"] == str(tiny_flux2_base_dir)
    back = export.export_adapter(folder / export.ADAPTER_FILE, tmp_path / "back.safetensors", "diffusers", "fp32")
    assert all(k.startswith("transformer.") for k in export.read_file(back)[0])

    text = card.model_card(folder)
    assert "from diffusers import Flux2KleinPipeline" in text and all(f"- {t}" in text for t in FLUX2.card_tags)
    assert "No kohya-format file" in text and "_kohya.safetensors" not in text
    assert publish.prepare(folder, "you/klein-dpo") is None and not list(folder.glob("*_kohya*"))
    assert card.hub_problems(folder) == []

    expected = _generate(pipe)
    merged = _load(export.merge_adapter(folder / export.ADAPTER_FILE, str(tiny_flux2_base_dir), 1.0,
                                        tmp_path / "merged"))
    assert not any("lora" in k for k in merged.transformer.state_dict())
    np.testing.assert_allclose(_generate(merged), expected, rtol=0, atol=1e-4)
    with pytest.raises(export.AdapterError, match="--format single-file: no original FLUX.2 klein"):
        export.merge_adapter(folder / export.ADAPTER_FILE, str(tiny_flux2_base_dir), 1.0, tmp_path / "x.safetensors",
                             fmt="single-file")


def test_eval_generation_with_the_klein_pipeline(tiny_flux2_base_dir: Path, tmp_path: Path) -> None:
    """`evaluate.open_generation` on the klein base: its pipeline, its own default guidance (4.0), the adapter on
    and off (the prompt goes by keyword: the klein pipeline takes an image first)."""

    from lora_dpo import evaluate
    from lora_dpo.evaluate.generation import _use_scale

    _random_adapter_file(_load(tiny_flux2_base_dir).transformer, tmp_path)
    pipe, gen = evaluate.open_generation(str(tiny_flux2_base_dir), tmp_path / "pytorch_lora_weights.safetensors",
                                         steps=2, guidance_scale=None, resolution=64, precision="no")
    assert type(pipe).__name__ == "Flux2KleinPipeline" and gen.guidance_scale == 4.0
    images = []
    for scale in (None, 1.0):
        _use_scale(pipe, scale)
        images.append(np.asarray(evaluate.generate(pipe, "a red circle", 0, 2, gen.guidance_scale, 64), dtype=float))
    assert images[0].shape == (64, 64, 3) and np.abs(images[0] - images[1]).max() > 0


def test_training_grids_keep_a_distilled_bases_flag(tiny_flux2_base_dir: Path, tmp_path: Path) -> None:
    """A step-distilled klein (`is_distilled` in its model_index.json) samples its training grids without CFG, as
    its stock pipeline does; the undistilled tiny base with it."""
    import shutil

    from lora_dpo import recipe
    from lora_dpo.train.samples import pipeline_from_parts

    distilled = tmp_path / "distilled"
    shutil.copytree(tiny_flux2_base_dir, distilled)
    index = json.loads((distilled / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps(index | {"is_distilled": True}))
    for folder, flag in ((tiny_flux2_base_dir, False), (distilled, True)):
        base = models.load_base(recipe.ModelRecipe(base=str(folder)))
        pipe = pipeline_from_parts(base, base.unet)
        pipe._guidance_scale = 4.0
        assert pipe.config.is_distilled is flag and pipe.do_classifier_free_guidance is not flag
