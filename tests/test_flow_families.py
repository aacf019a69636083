"""The flow-matching families (SD3, FLUX) on tiny random pipelines built offline: the builders save and load as stock
diffusers pipelines and generate; prompts, the denoiser call and the noising math match the stock pipelines and
diffusers' LoRA examples; LoRA files load in a fresh stock pipeline; sigma sampling and the DPO loss on velocity
errors against hand values."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flow_helpers import fresh_adapter_dpo_step

from lora_dpo.models.families import flow
from lora_dpo.models.families.flux import FAMILY as FLUX
from lora_dpo.models.families.flux import build_tiny_flux_pipeline, image_ids
from lora_dpo.models.families.sd3 import FAMILY as SD3
from lora_dpo.models.families.sd3 import build_tiny_sd3_pipeline
from lora_dpo.objectives import diffusion_dpo_loss

BUILDERS = {"sd3": (SD3, build_tiny_sd3_pipeline), "flux": (FLUX, build_tiny_flux_pipeline),
            "flux-schnell": (FLUX, lambda: build_tiny_flux_pipeline(guidance=False))}
CPU = torch.device("cpu")
PROMPTS = ["a red circle on blue background", "a photo of a green square"]


@pytest.fixture(scope="module")
def tiny_dirs(tiny_sd3_base_dir: Path, tiny_flux_base_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Path]:
    """Each tiny pipeline as an ordinary diffusers folder: the session's SD3 and FLUX dev bases (tests/conftest.py),
    and a schnell-like one (no guidance embedding) built here."""
    schnell = tmp_path_factory.mktemp("flux-schnell") / "base"
    BUILDERS["flux-schnell"][1]().save_pretrained(schnell)
    return {"sd3": tiny_sd3_base_dir, "flux": tiny_flux_base_dir, "flux-schnell": schnell}


def _load(name: str, tiny_dirs: dict[str, Path]) -> Any:
    import diffusers

    family = BUILDERS[name][0]
    return getattr(diffusers, family.pipeline_class).from_pretrained(tiny_dirs[name])


def _generate(pipe: Any, **kwargs: Any) -> np.ndarray:
    return pipe(PROMPTS[0], num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def _capture(pipe: Any, **kwargs: Any) -> dict[str, Any]:
    """The keyword arguments and output of the pipeline's first transformer call (one inference step)."""
    seen: dict[str, Any] = {}

    def hook(module: Any, args: Any, inputs: dict[str, Any], output: Any) -> None:
        if not seen:
            seen.update(inputs, output=output[0])

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        _generate(pipe, **kwargs)
    finally:
        handle.remove()
    return seen


# --------------------------------------------------------------------------------------------------
# The tiny pipelines


@pytest.mark.parametrize("name", BUILDERS)
def test_tiny_pipeline_saves_loads_and_generates(name: str, tiny_dirs: dict[str, Path]) -> None:
    family = BUILDERS[name][0]
    index = json.loads((tiny_dirs[name] / "model_index.json").read_text())
    assert family.owns_pipeline(index) and not (SD3 if family is FLUX else FLUX).owns_pipeline(index)
    config = json.loads((tiny_dirs[name] / "transformer" / "config.json").read_text())
    assert family.owns_denoiser(config) and not (SD3 if family is FLUX else FLUX).owns_denoiser(config)
    pipe = _load(name, tiny_dirs)
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor
    images = _generate(pipe)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("family", [SD3, FLUX], ids=["sd3", "flux"])
def test_tiny_denoiser_config_is_the_built_ones(family: flow.FlowFamily, tiny_dirs: dict[str, Path]) -> None:
    built = _load(family.name, tiny_dirs).transformer.config
    for key, value in family.tiny_denoiser_config().items():
        assert built[key] == value or list(built[key]) == list(value), key


@pytest.mark.parametrize("family", [SD3, FLUX], ids=["sd3", "flux"])
def test_shipped_configs_build_the_real_architecture(family: flow.FlowFamily) -> None:
    """The shipped transformer on `meta`: recognised, the known size, and the metadata sd-scripts writes for it."""
    config = family.shipped_config("transformer")
    assert family.owns_denoiser(config)
    with torch.device("meta"):
        denoiser = family.denoiser_from_config(config)
    params = sum(p.numel() for p in denoiser.parameters())
    assert params == pytest.approx(2.243e9 if family is SD3 else 11.901e9, rel=1e-3)
    assert family.modelspec_architecture_for(config) == family.modelspec_architecture
    text = family.shipped_config("text")
    assert text["embed_width"] == config["joint_attention_dim"]
    assert text["pooled_dim"] == config["pooled_projection_dim"]
    vae = family.shipped_config("vae")
    assert vae["latent_channels"] * (4 if family is FLUX else 1) == config["in_channels"]


def test_metadata_names() -> None:
    assert SD3.base_model_version("flow") == "5-medium" and FLUX.base_model_version("flow") == "flux1"
    assert SD3.modelspec_architecture_for({"qk_norm": None}) == "stable-diffusion-3-medium"
    assert SD3.modelspec_architecture_for({"qk_norm": "rms_norm", "dual_attention_layers": []}) == \
        "stable-diffusion-3-5-large"
    assert FLUX.modelspec_architecture_for({"guidance_embeds": False}) == "flux-1-schnell"


def test_sd35_large_is_told_from_medium_by_its_transformer_config() -> None:
    """SD3.5 Large (38 layers of 38 heads, qk norm, no dual-attention layer, as diffusers'
    convert_sd3_to_diffusers.py derives it) is "5-large" in both `modelspec.architecture` and sd-scripts'
    `ss_base_model_version` (sd3_utils.py: qk norm without x_block attn2 layers), the shipped Medium "5-medium"."""
    medium = SD3.shipped_config("transformer")
    large = {**medium, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 38 * 64,
             "pos_embed_max_size": 192, "dual_attention_layers": []}
    for config, kind in ((medium, "5-medium"), (large, "5-large"), ({**large, "qk_norm": None}, "medium")):
        spec = SD3.webui_spec(config)
        assert (spec.architecture, spec.version("flow")) == (f"stable-diffusion-3-{kind}", kind)
    assert SD3.webui_spec().version("flow") == "5-medium"  # no config: the shipped base


# --------------------------------------------------------------------------------------------------
# Prompts and the denoiser call, against the stock pipelines


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_encode_prompts_equals_the_pipelines(name: str, tiny_dirs: dict[str, Path]) -> None:
    family, pipe = BUILDERS[name][0], _load(name, tiny_dirs)
    tokenizers, encoders = family.load_text_parts(str(tiny_dirs[name]))
    assert not any(p.requires_grad for e in encoders for p in e.parameters())
    for encoder in (pipe.text_encoder, pipe.text_encoder_2, getattr(pipe, "text_encoder_3", None)):
        if encoder is not None:  # frozen as in training: T5's attention takes another CPU kernel (4e-6 off) with
            encoder.requires_grad_(False)  # gradients on, so the two are compared in the same mode
    embeds, pooled = family.encode_prompts(tokenizers, encoders, PROMPTS, CPU)
    if family is SD3:
        expected, _, expected_pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
        assert embeds.shape == (2, 77 + SD3.max_sequence_length, 64) and pooled.shape == (2, 64)
    else:
        expected, expected_pooled, _ = pipe.encode_prompt(PROMPTS, None)
        assert embeds.shape == (2, FLUX.max_sequence_length, 64) and pooled.shape == (2, 32)
    assert torch.equal(embeds, expected) and torch.equal(pooled, expected_pooled)


@pytest.mark.parametrize("name", BUILDERS)
def test_denoise_equals_the_pipelines_transformer_call(name: str, tiny_dirs: dict[str, Path]) -> None:
    """What the pipeline's first step feeds its transformer and gets back, through `denoise` on (B, C, h, w)
    latents: the same prediction. FLUX: packed tokens, image / text ids and dev's training guidance (1.0)."""
    from diffusers import FluxPipeline

    family, pipe = BUILDERS[name][0], _load(name, tiny_dirs)
    seen = _capture(pipe, guidance_scale=1.0)  # SD3: no CFG batch; FLUX dev: its training guidance
    if family is SD3:
        latents, output = seen["hidden_states"], seen["output"]
        assert seen["timestep"].max() > 1  # sigma * 1000
    else:
        latents = FluxPipeline._unpack_latents(seen["hidden_states"], 64, 64, pipe.vae_scale_factor)
        output = FluxPipeline._unpack_latents(seen["output"], 64, 64, pipe.vae_scale_factor)
        assert torch.equal(FluxPipeline._pack_latents(latents, 1, 16, 8, 8), seen["hidden_states"])
        assert torch.equal(image_ids(4, 4, CPU, torch.float32), seen["img_ids"])
        assert torch.equal(torch.zeros_like(seen["txt_ids"]), seen["txt_ids"])
        assert seen["timestep"].max() <= 1  # sigma
        guidance = FLUX.guidance(pipe.transformer, 1, CPU)
        if name == "flux":
            assert torch.equal(seen["guidance"], guidance) and guidance.item() == 1.0
        else:
            assert seen["guidance"] is None and guidance is None
    assert latents.shape == (1, 16, 8, 8)
    with torch.no_grad():
        prediction = family.denoise(pipe.transformer, latents, seen["timestep"], seen["encoder_hidden_states"],
                                    seen["pooled_projections"], None)
    assert prediction.shape == latents.shape
    torch.testing.assert_close(prediction, output, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Sigma sampling, noising, the target


def _schedule(family: flow.FlowFamily, **overrides: Any) -> flow.FlowSchedule:
    return family.training_scheduler(family.shipped_config("scheduler"), overrides)


def test_sigmas_are_the_examples_grid_points() -> None:
    """The examples' draw: u from compute_density_for_timestep_sampling, index floor(u N), the scheduler's sigmas
    and timesteps at that index (looked up there on the host; computed here on the generator's device)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    for family in (SD3, FLUX):
        schedule = _schedule(family)
        u = compute_density_for_timestep_sampling(family.default_weighting_scheme, 64, 0.0, 1.0,
                                                  generator=torch.Generator().manual_seed(3))
        index = (u * 1000).long()
        sigmas = family.sample_sigmas(schedule, 64, torch.Generator().manual_seed(3))
        assert torch.equal(sigmas, schedule.scheduler.sigmas[index])
        timesteps = family.sample_timesteps(schedule, 64, torch.Generator().manual_seed(3))
        expected = schedule.scheduler.timesteps[index] / (1 if family is SD3 else 1000)
        torch.testing.assert_close(timesteps, expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(family.sigmas(schedule, timesteps), sigmas, rtol=1e-6, atol=0)


def test_logit_normal_sigmas_and_the_shift() -> None:
    """FLUX-dev (dynamic shifting: the training grid unshifted), asked for logit-normal sigmas: centred on 0.5. SD3
    (shift 3, logit-normal by default): the same draws through s' = 3 s / (1 + 2 s), median 0.75. FLUX's default,
    as its example's: uniform."""
    n = 20_000
    flux = FLUX.sample_sigmas(_schedule(FLUX, weighting_scheme="logit_normal"), n, torch.Generator().manual_seed(0))
    sd3 = SD3.sample_sigmas(_schedule(SD3), n, torch.Generator().manual_seed(0))
    assert abs(flux.median().item() - 0.5) < 0.01 and abs(flux.mean().item() - 0.5) < 0.01
    assert flux.min() > 0 and flux.max() <= 1
    torch.testing.assert_close(sd3, flow.shifted(flux, 3.0))
    assert abs(sd3.median().item() - 0.75) < 0.01 and (sd3 >= flux).all()
    plain = SD3.sample_sigmas(_schedule(SD3, shift=1.0), n, torch.Generator().manual_seed(0))
    assert torch.equal(plain, flux)
    uniform = FLUX.sample_sigmas(_schedule(FLUX, weighting_scheme="uniform"), n, torch.Generator().manual_seed(0))
    assert torch.equal(FLUX.sample_sigmas(_schedule(FLUX), n, torch.Generator().manual_seed(0)), uniform)
    assert abs(uniform.mean().item() - 0.5) < 0.01 and abs(uniform.std().item() - (1 / 12) ** 0.5) < 0.01
    mode = FLUX.sample_sigmas(_schedule(FLUX, weighting_scheme="mode"), n, torch.Generator().manual_seed(0))
    assert mode.min() >= 1e-3 and mode.max() <= 1  # u reaches 1 there: the index is clamped to the grid


def test_sampling_is_seeded_one_draw_per_pair_and_checked() -> None:
    schedule = _schedule(SD3)
    first = SD3.sample_timesteps(schedule, 4, torch.Generator().manual_seed(7))
    assert first.shape == (4,)
    assert torch.equal(first, SD3.sample_timesteps(schedule, 4, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, SD3.sample_timesteps(schedule, 4, torch.Generator().manual_seed(8)))
    with pytest.raises(ValueError, match="DDPM"):
        SD3.sample_timesteps(schedule, 4, torch.Generator(), allowed=(999,))
    with pytest.raises(ValueError, match="unknown"):
        SD3.training_scheduler(SD3.shipped_config("scheduler"), {"shfit": 2})
    with pytest.raises(ValueError, match="weighting_scheme"):
        _schedule(SD3, weighting_scheme="normal")


def test_noising_and_target_for_a_pair() -> None:
    """One sigma and one noise per pair, repeated for both images as the step does: the two noisy latents differ
    only by (1 - sigma)(x_w - x_l); the velocity target turns x_t back into x_0."""
    generator = torch.Generator().manual_seed(0)
    for family in (SD3, FLUX):
        schedule = _schedule(family)
        x_w, x_l, noise = torch.randn(3, 2, 16, 4, 4, generator=generator)
        t = family.sample_timesteps(schedule, 2, generator)
        latents, noise2, t2 = torch.cat([x_w, x_l]), noise.repeat(2, 1, 1, 1), t.repeat(2)
        noisy = family.add_noise(schedule, latents, noise2, t2)
        sigma = family.sigmas(schedule, t).view(-1, 1, 1, 1)
        torch.testing.assert_close(noisy[:2] - noisy[2:], (1 - sigma) * (x_w - x_l))
        torch.testing.assert_close(noisy[:2], (1 - sigma) * x_w + sigma * noise)
        velocity = family.target(schedule, latents, noise2, t2)
        torch.testing.assert_close(noisy - family.sigmas(schedule, t2).view(-1, 1, 1, 1) * velocity, latents)


def test_dpo_loss_on_velocity_errors_by_hand() -> None:
    """x_0: w = 1, l = -1; noise 0.5: targets -0.5 and 1.5. Policy predicts -0.4 and 1.0 (errors 0.01, 0.25), the
    reference -0.7 and 1.3 (0.04, 0.04): logit -beta/2 ((0.01 - 0.04) - (0.25 - 0.04)) = 0.12 beta; beta 10:
    loss = log(1 + e^-1.2) = 0.263282467338."""
    schedule = _schedule(FLUX)
    latents, noise = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1), torch.full((2, 1, 1, 1), 0.5)
    target = FLUX.target(schedule, latents, noise, torch.full((2,), 0.5))

    def errors(prediction: list[float]) -> torch.Tensor:
        return (torch.tensor(prediction).view(2, 1, 1, 1) - target).pow(2).mean(dim=(1, 2, 3))

    model_w, model_l = errors([-0.4, 1.0])
    ref_w, ref_l = errors([-0.7, 1.3])
    torch.testing.assert_close(torch.stack([model_w, model_l, ref_w, ref_l]), torch.tensor([0.01, 0.25, 0.04, 0.04]))
    loss = diffusion_dpo_loss(model_w[None], model_l[None], ref_w[None], ref_l[None], beta=10.0)
    assert loss.item() == pytest.approx(0.263282467338, abs=1e-6)
    fresh = diffusion_dpo_loss(model_w[None], model_l[None], model_w[None], model_l[None], beta=10.0)
    assert fresh.item() == pytest.approx(math.log(2))


@pytest.mark.parametrize("name", BUILDERS)
def test_one_dpo_step_with_a_fresh_adapter(name: str, tiny_dirs: dict[str, Path]) -> None:
    """A fresh adapter (lora_B = 0) ties the policy with the reference (adapters off), loss ln 2 exactly, on a pair
    with the same sigma and noise for both images (`fresh_adapter_dpo_step`); gradients reach only the adapter."""
    trained = fresh_adapter_dpo_step(BUILDERS[name][0], _load(name, tiny_dirs), tiny_dirs[name], PROMPTS[0])
    assert trained and all("lora_" in n for n in trained)


# --------------------------------------------------------------------------------------------------
# LoRA: the default targets, the file a fresh stock pipeline loads, the names ComfyUI / sd-scripts use


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_lora_file_loads_in_a_fresh_stock_pipeline(name: str, tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    family, pipe = BUILDERS[name][0], _load(name, tiny_dirs)
    base_images = _generate(pipe)
    transformer = pipe.transformer
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=list(family.default_target_modules)))
    wrapped = {n.removesuffix(".base_layer") for n, _ in transformer.named_modules() if n.endswith(".base_layer")}
    for target in family.default_target_modules:  # every default target is somewhere in the tiny transformer
        assert any(n.endswith("." + target) for n in wrapped), target
    with torch.no_grad():
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    state = get_peft_model_state_dict(transformer)
    type(pipe).save_lora_weights(tmp_path, transformer_lora_layers=state)

    fresh = _load(name, tiny_dirs)
    fresh.load_lora_weights(tmp_path)
    loaded = get_peft_model_state_dict(fresh.transformer, adapter_name=next(iter(fresh.transformer.peft_config)))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert np.abs(_generate(fresh) - base_images).max() > 1e-3

    from safetensors import safe_open

    with safe_open(tmp_path / "pytorch_lora_weights.safetensors", "pt") as file:
        keys = list(file.keys())
    config = transformer.config
    for key in keys:  # `transformer.<diffusers name>.lora_A/B.weight`: the spelling ComfyUI maps for SD3 and FLUX
        module, _, suffix = key.partition(".lora_")
        assert module.startswith("transformer.") and suffix in ("A.weight", "B.weight"), key
        assert family.kohya_module_name(module, config).startswith("lora_unet_")


SD3_SIZES = {"num_attention_heads": 24, "attention_head_dim": 64}
FLUX_SIZES = {"num_attention_heads": 24, "attention_head_dim": 128}
KOHYA_NAMES = [  # (family, diffusers module, sd-scripts / ComfyUI name, fused rows (dim, offset, size) or None)
    (SD3, "transformer_blocks.3.attn.to_k", "lora_unet_joint_blocks_3_x_block_attn_qkv", (0, 1536, 1536)),
    (SD3, "transformer.transformer_blocks.3.attn.add_v_proj", "lora_unet_joint_blocks_3_context_block_attn_qkv",
     (0, 3072, 1536)),
    (SD3, "transformer_blocks.0.attn.to_out.0", "lora_unet_joint_blocks_0_x_block_attn_proj", None),
    (SD3, "transformer_blocks.0.ff_context.net.2", "lora_unet_joint_blocks_0_context_block_mlp_fc2", None),
    (FLUX, "transformer_blocks.18.attn.to_q", "lora_unet_double_blocks_18_img_attn_qkv", (0, 0, 3072)),
    (FLUX, "transformer_blocks.0.attn.add_q_proj", "lora_unet_double_blocks_0_txt_attn_qkv", (0, 0, 3072)),
    (FLUX, "transformer_blocks.0.attn.to_add_out", "lora_unet_double_blocks_0_txt_attn_proj", None),
    (FLUX, "transformer_blocks.0.ff.net.0.proj", "lora_unet_double_blocks_0_img_mlp_0", None),
    (FLUX, "single_transformer_blocks.37.attn.to_k", "lora_unet_single_blocks_37_linear1", (0, 3072, 3072)),
    (FLUX, "single_transformer_blocks.0.proj_mlp", "lora_unet_single_blocks_0_linear1", (0, 9216, 12288)),
    (FLUX, "single_transformer_blocks.0.proj_out", "lora_unet_single_blocks_0_linear2", None),
]


@pytest.mark.parametrize(("family", "module", "kohya", "rows"), KOHYA_NAMES)
def test_kohya_names_and_fused_rows(family: flow.FlowFamily, module: str, kohya: str,
                                   rows: tuple[int, int, int] | None) -> None:
    sizes = SD3_SIZES if family is SD3 else FLUX_SIZES
    assert family.kohya_module_name(module, sizes) == kohya
    assert family.fused_slice(module, sizes) == rows


@pytest.mark.parametrize(("family", "module"), [(SD3, "pos_embed.proj"), (FLUX, "x_embedder"),
                                                (FLUX, "transformer_blocks.0.attn.norm_q")])
def test_modules_without_a_kohya_name_are_refused(family: flow.FlowFamily, module: str) -> None:
    with pytest.raises(ValueError, match="no kohya"):
        family.kohya_module_name(module, {})
