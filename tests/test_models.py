import json
from pathlib import Path

import pytest
import torch
import transformers

from lora_dpo import models
from lora_dpo.recipe import LoraRecipe, ModelRecipe


@pytest.fixture
def unet_inputs(tiny_base_dir: Path) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 77, 64, generator=generator),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 32, generator=generator),
                              "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)},
    }


def _randomise_lora(unet: torch.nn.Module) -> None:
    """Non-zero adapters, so no property below holds trivially (peft initialises lora_B to zero)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sd15": "StableDiffusionPipeline"}


def test_tiny_base_loads_in_stock_diffusers(tiny_arch_base: tuple[str, Path]) -> None:
    """Each tiny base is a normal diffusers folder of its architecture's own pipeline class, and generates."""
    import diffusers

    arch, base_dir = tiny_arch_base
    # the class that DiffusionPipeline.from_pretrained (the model card's snippet) picks
    assert json.loads((base_dir / "model_index.json").read_text())["_class_name"] == PIPELINES[arch]
    pipe = getattr(diffusers, PIPELINES[arch]).from_pretrained(base_dir)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    sdxl = arch == "sdxl"
    assert pipe.unet.config.addition_embed_type == ("text_time" if sdxl else None)
    assert (getattr(pipe, "text_encoder_2", None) is not None) == sdxl
    assert type(pipe.text_encoder) is transformers.CLIPTextModel
    # SD 1.5 cross-attends to one encoder's hidden states, SDXL to both concatenated
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size * (2 if sdxl else 1)
    base = models.load_base(ModelRecipe(base=str(base_dir)))
    assert base.family.name == arch and base.pipeline_class is type(pipe)
    assert len(base.text_encoders) == (2 if sdxl else 1)


def test_tiny_sd15_is_a_named_base_with_its_own_cache_folder(tiny_sd15_base_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`model.base = "tiny-sd15"` resolves to its own cached folder (`tiny` stays SDXL); an unknown architecture
    fails before a rebuild deletes anything."""
    import shutil

    monkeypatch.setenv("LORA_DPO_HOME", str(tmp_path))
    assert models.tiny_base_path("sd15") == tmp_path / "tiny-sd15-v4"
    assert models.tiny_base_path() == tmp_path / "tiny-base-v5"  # `tiny` keeps its own folder
    # stands in for the build on first use (VAE training and UNet warm-up, a few minutes)
    shutil.copytree(tiny_sd15_base_dir, tmp_path / "tiny-sd15-v4")
    assert models.resolve_base("tiny-sd15") == str(tmp_path / "tiny-sd15-v4")
    base = models.load_base(ModelRecipe(base="tiny-sd15"))
    assert base.family.name == "sd15" and len(base.text_encoders) == 1
    with pytest.raises(models.ModelError, match="'sd21': choose one of sdxl, sd3, flux2, flux, sd15"):
        models.build_tiny_base(tmp_path / "tiny-sd15-v4", arch="sd21", replace=True)
    assert (tmp_path / "tiny-sd15-v4" / "model_index.json").is_file()  # the failed rebuild deleted nothing


def test_the_demo_base_is_the_shipped_one_byte_for_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tiny` is the base shipped with the package, the same bytes on every machine (a build trains on the CPU it
    runs on, and CPUs round differently): its hash is pinned here, and the first use copies it (no build), checked.
    A damaged copy in the package is refused by name instead of being installed."""
    import shutil

    from lora_dpo.models import tiny

    family = models.family_named("sdxl")
    assert tiny.folder_sha256(tiny.shipped_base(family)) == family.tiny_shipped_sha256 == (
        "20d9122b4359fdbb894ba29bf936fe4d613a403a92256d7d18aface0a965ca9a")
    monkeypatch.setenv("LORA_DPO_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(tiny, "build_tiny_base", None)  # a build would fail here: the first use must copy
    path = Path(models.resolve_base("tiny"))
    assert path == tmp_path / "home" / "tiny-base-v5"
    assert tiny.folder_sha256(path) == family.tiny_shipped_sha256
    base = models.load_base(ModelRecipe(base="tiny"))
    assert base.family is family and base.unet.config.sample_size == 8

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny.shipped_base(family), damaged / family.tiny_folder)
    (damaged / family.tiny_folder / "unet" / "config.json").write_text("{}")
    monkeypatch.setattr(tiny, "ASSETS", damaged)
    with pytest.raises(models.ModelError, match="the shipped tiny base is missing or damaged"):
        tiny.install_shipped_base(family, tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(("name", "fixture"), [("tiny", "tiny_base_dir"), ("tiny-sd15", "tiny_sd15_base_dir")])
def test_a_tiny_base_denoiser_config_is_read_without_building_the_base(name: str, fixture: str, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   request: pytest.FixtureRequest) -> None:
    """What `export --format kohya` needs of a tiny base (its UNet's blocks) is a constant: on a machine where the
    base was never built it is not built (minutes) to read it, and it names the same kohya layers."""
    from lora_dpo import kohya

    built = json.loads((request.getfixturevalue(fixture) / "unet" / "config.json").read_text())
    monkeypatch.setenv("LORA_DPO_HOME", str(tmp_path))
    config = models.base_denoiser_config(name)
    assert not any(tmp_path.iterdir())  # nothing built
    assert kohya.sgm_prefixes(config) == kohya.sgm_prefixes(built)
    assert models.denoiser_family(config) is models.denoiser_family(built) is models.TINY_BASES[name]


def test_warm_up_trains_the_sd15_unet_without_micro_conditioning() -> None:
    """The warm-up (latent-scale calibration, then denoising steps, the empty prompt's embedding for dropped
    captions) runs on the one-encoder architecture and trains its text encoder too."""
    pipe = models.build_tiny_pipeline(seed=0, arch="sd15")
    before = {name: param.clone() for name, param in pipe.unet.named_parameters()}
    before_text = {name: param.clone() for name, param in pipe.text_encoder.named_parameters()}
    models.warm_up_tiny_base(pipe, steps=2, batch_size=4, caption_dropout=0.5)
    assert pipe.vae.config.scaling_factor != 0.18215  # calibrated to unit latent std
    assert any(not torch.equal(param, before[name]) for name, param in pipe.unet.named_parameters())
    # the text encoder is trained with the UNet (a random one barely tells the colour words apart)
    assert any(not torch.equal(param, before_text[name]) for name, param in pipe.text_encoder.named_parameters())
    for module in (pipe.unet, pipe.text_encoder):
        assert not any(param.requires_grad for param in module.parameters())  # frozen again, as saved


def test_reference_is_the_base_unet_exactly(tiny_base_dir: Path, unet_inputs: dict) -> None:
    base = models.load_base(ModelRecipe(base=str(tiny_base_dir)), with_encoders=False)
    pristine = models.load_base(ModelRecipe(base=str(tiny_base_dir)), with_encoders=False).unet
    models.add_lora(base.unet, LoraRecipe(rank=4, alpha=8.0))
    _randomise_lora(base.unet)
    with torch.no_grad():
        expected = pristine(**unet_inputs).sample
        policy = base.unet(**unet_inputs).sample
        with models.adapters_disabled(base.unet):
            reference = base.unet(**unet_inputs).sample
        after = base.unet(**unet_inputs).sample
    assert torch.equal(reference, expected)  # bit for bit: no second copy, no drift
    assert not torch.allclose(policy, expected)  # the adapters really act
    assert torch.equal(after, policy)  # and come back after the block


def test_adapters_come_back_after_an_exception(tiny_base_dir: Path) -> None:
    base = models.load_base(ModelRecipe(base=str(tiny_base_dir)), with_encoders=False)
    models.add_lora(base.unet, LoraRecipe())
    with pytest.raises(RuntimeError), models.adapters_disabled(base.unet):
        raise RuntimeError("boom")
    assert all(p.requires_grad for n, p in base.unet.named_parameters() if "lora_" in n)


def test_only_lora_weights_train_and_are_fp32(tiny_base_dir: Path) -> None:
    base = models.load_base(ModelRecipe(base=str(tiny_base_dir)), with_encoders=True, weight_dtype=torch.bfloat16)
    models.add_lora(base.unet, LoraRecipe(rank=4, target_modules=("to_q", "to_v")))
    trainable = dict((n, p) for n, p in base.unet.named_parameters() if p.requires_grad)
    assert trainable and all("lora_" in n and (".to_q." in n or ".to_v." in n) for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert not any(p.requires_grad for m in (base.vae, *base.text_encoders) for p in m.parameters())


def test_prompt_encoding_matches_the_stock_pipeline(tiny_arch_base: tuple[str, Path]) -> None:
    arch, base_dir = tiny_arch_base
    base = models.load_base(ModelRecipe(base=str(base_dir)))
    pipe = base.pipeline_class.from_pretrained(base_dir)
    prompts = ["a blue square", ""]
    embeds, pooled = models.encode_prompts(base, prompts, torch.device("cpu"))
    if arch == "sdxl":
        expected, _, expected_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        torch.testing.assert_close(pooled, expected_pooled)
    else:  # SD 1.5: the one encoder's last hidden state, and no pooled embedding at all
        expected, _ = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=False)
        assert pooled is None
    torch.testing.assert_close(embeds, expected)


def test_bad_bases_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(models.ModelError, match="no model_index.json"):
        models.load_base(ModelRecipe(base=str(tmp_path)))
    (tmp_path / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}')
    with pytest.raises(models.ModelError, match="has no scheduler"):
        models.load_base(ModelRecipe(base=str(tmp_path)))


def test_nf4_base_holds_4bit_linear_layers_and_trains_the_adapter_on_them() -> None:
    """QLoRA-style: every nn.Linear becomes bitsandbytes' NF4 Linear4bit (bitsandbytes 0.50 quantises on the
    CPU too), peft wraps the targets with its 4-bit LoRA layer, a fresh adapter changes nothing and gradients
    reach the adapter."""
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    unet = models.build_tiny_pipeline().unet.requires_grad_(False)
    args = (torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, 64), torch.randn(2, 32),
            torch.randn(2, 6))
    with torch.no_grad():
        full = models.family_named("sdxl").denoise(unet, *args)
    linears = sum(type(m) is torch.nn.Linear for m in unet.modules())
    assert models.quantize_nf4(unet, torch.float32, torch.device("cpu")) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in unet.modules())
    models.add_lora(unet, LoraRecipe(rank=4))
    assert isinstance(unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q, LoraLinear4bit)
    assert isinstance(unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.base_layer,
                      bnb.nn.Linear4bit)
    policy = models.family_named("sdxl").denoise(unet, *args)
    with torch.no_grad(), models.adapters_disabled(unet):
        reference = models.family_named("sdxl").denoise(unet, *args)
    torch.testing.assert_close(policy.detach(), reference, rtol=0, atol=0)  # lora_B = 0
    error = (reference - full).norm() / full.norm()
    assert 0 < error < 0.5  # 4-bit weights: close to the full-precision output, not equal to it
    policy.square().mean().backward()
    grads = [p.grad for name, p in unet.named_parameters() if ".lora_B." in name]
    assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_a_base_that_predicts_something_else_is_refused_when_it_loads(tiny_base_dir: Path, tmp_path: Path) -> None:
    """The step trains epsilon and v-prediction bases; a `sample`-predicting one would silently learn the noise."""
    import json
    import shutil

    from lora_dpo.models import ModelError, load_base
    from lora_dpo.recipe import ModelRecipe

    base = shutil.copytree(tiny_base_dir, tmp_path / "sample_base")
    config_file = base / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prediction_type": "sample"}))
    with pytest.raises(ModelError, match=r"predicts 'sample'; lora-dpo trains bases that predict epsilon or v_pred"):
        load_base(ModelRecipe(base=str(base)))


def test_turbo_settings_reach_the_noise_schedule(tiny_base_dir: Path) -> None:
    """[model].timesteps travel with the base to the noise sampler; rescale_betas_zero_snr makes the last
    timestep (almost) pure noise; a timestep outside the schedule and a negative one are refused by name."""
    from lora_dpo.recipe import RecipeError, from_dict

    turbo = models.load_base(ModelRecipe(base=str(tiny_base_dir), timesteps=(249, 499, 749, 999),
                                         rescale_betas_zero_snr=True), with_encoders=False, with_unet=False)
    assert turbo.train_timesteps == (249, 499, 749, 999)
    assert float(turbo.noise_scheduler.alphas_cumprod[-1]) < 1e-6  # zero terminal SNR (diffusers clamps to 2^-24)
    plain = models.load_base(ModelRecipe(base=str(tiny_base_dir)), with_encoders=False, with_unet=False)
    assert plain.train_timesteps == () and float(plain.noise_scheduler.alphas_cumprod[-1]) > 1e-4
    with pytest.raises(models.ModelError, match=r"\[model\].timesteps = \[1000\]"):
        models.load_base(ModelRecipe(base=str(tiny_base_dir), timesteps=(1000,)), with_encoders=False)
    with pytest.raises(RecipeError, match=r"\[model\].timesteps = \[-1\]: every value must be >= 0"):
        from_dict({"model": {"timesteps": [-1]}})


def test_a_base_whose_scheduler_config_sets_zero_snr_keeps_it(tiny_base_dir: Path, tmp_path: Path) -> None:
    """A v-prediction, zero-terminal-SNR diffusers base says so in its scheduler config; the recipe's default
    (`rescale_betas_zero_snr = false`) does not switch it off, and the adapter's metadata reads the same."""
    import json
    import shutil

    base = shutil.copytree(tiny_base_dir, tmp_path / "ztsnr_base")
    config_file = base / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}))
    loaded = models.load_base(ModelRecipe(base=str(base)), with_encoders=False, with_unet=False)
    assert loaded.noise_scheduler.config.prediction_type == "v_prediction"
    assert float(loaded.noise_scheduler.alphas_cumprod[-1]) < 1e-6
    assert models.base_schedule(ModelRecipe(base=str(base))) == {"prediction_type": "v_prediction",
                                                                 "rescale_betas_zero_snr": True}


def test_images_are_encoded_a_megapixel_at_a_time(tiny_base_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An uncached step encodes its 2B images in calls of at most `ENCODE_PIXELS`: the same latents as one call,
    and a VAE peak that does not grow with the batch (the plan traces the same function)."""
    from diffusers import AutoencoderKL

    from lora_dpo import plan

    vae = AutoencoderKL.from_pretrained(tiny_base_dir, subfolder="vae")
    pixels = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    together = models.encode_images(vae, pixels)
    arch = plan.architecture(ModelRecipe(base="tiny"))
    monkeypatch.setattr(plan.trace, "_ENCODES", {})  # the planner's cache, fresh for this test and after it
    transient = [plan.measure_encode(arch, 64, pairs, "no").transient for pairs in (1, 2)]
    assert transient[1] > transient[0]  # one call: the VAE's activations grow with the batch
    monkeypatch.setattr(models.parts, "ENCODE_PIXELS", 64 * 64)  # one 64 px image per call
    monkeypatch.setattr(plan.trace, "_ENCODES", {})
    torch.testing.assert_close(models.encode_images(vae, pixels), together, rtol=1e-5, atol=1e-5)
    one, two = (plan.measure_encode(arch, 64, pairs, "no").transient for pairs in (1, 2))
    # what still grows with the batch: a pair's pixels and its latents (one per call, then joined)
    pair_bytes = 2 * 3 * 64 * 64 * 4 + 2 * (2 * 4 * 8 * 8 * 4)
    assert two - one == pair_bytes < transient[1] - transient[0]
