"""Base families (`lora_dpo.models.families`): the registry tells every family's bases, files and configs apart, and
the step on a family's tiny base is, bit for bit, the math the step ran before the families existed (written out
here independently: `scheduler.add_noise`, the UNet called with or without SDXL's added_cond_kwargs, the epsilon or
v target, the DPO loss from `objectives`).

Measured when the move was made (a script over `step.dpo_step` on commit 3a41059 and after it, torch 2.x on a
2-core x86 CPU, fp32, 2 pairs of `random_batch`, lora_B drawn from seed 1, noise seed 0, beta 5000): loss
0x1.a675340000000p-1 (SDXL shipped tiny base, epsilon) and 0x1.06821e0000000p-3 (cold tiny SD 1.5, seed 0) before and
after, the same sha256 over all 192 LoRA gradients; the tests below check the same without pinning a torch build."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_dpo import models, step
from lora_dpo.objectives import OBJECTIVES
from lora_dpo.recipe import LoraRecipe, ModelRecipe, ObjectiveRecipe, schema

SDXL, SD15 = models.family_named("sdxl"), models.family_named("sd15")


@pytest.fixture(scope="module")
def shipped_tiny() -> str:
    """The shipped tiny SDXL base (`tiny`), installed into this session's cache."""
    return models.resolve_base("tiny")


def _base(source: str, prediction: str) -> models.BaseModel:
    base = models.load_base(ModelRecipe(base=source))
    if prediction != "epsilon":
        from diffusers import DDPMScheduler

        base.noise_scheduler = DDPMScheduler.from_config(base.noise_scheduler.config, prediction_type=prediction)
    return base


def _old_prompts(base: models.BaseModel, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompt encoding as `models.parts.embed_prompts` was: SDXL both encoders' penultimate hidden states and
    the second's text_embeds, SD 1.5 the last hidden state."""
    sdxl = len(base.text_encoders) == 2
    hidden, pooled = [], None
    for tokenizer, encoder in zip(base.tokenizers, base.text_encoders, strict=True):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2] if sdxl else out.last_hidden_state)
        if sdxl and encoder is base.text_encoders[-1]:
            pooled = out.text_embeds
    return torch.cat(hidden, dim=-1), pooled


def _old_errors(unet: torch.nn.Module, scheduler, batch: step.EncodedBatch, noise: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
    """Per-image errors (2B,) as `step._errors` computed them before the families."""
    latents = torch.cat([batch.latents_w, batch.latents_l])
    noise, timesteps = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise,
                                                                                                 timesteps)
    embeds = batch.prompt_embeds.repeat(2, 1, 1)
    added = None
    if batch.pooled is not None:
        added = {"text_embeds": batch.pooled.repeat(2, 1), "time_ids": torch.cat([batch.time_ids_w, batch.time_ids_l])}
    prediction = unet(noisy, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    return (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


def _old_loss(unet: torch.nn.Module, base: models.BaseModel, batch: step.EncodedBatch,
              cfg: ObjectiveRecipe) -> torch.Tensor:
    """The DPO loss as the step computed it before the families: one generator, the noise then the timesteps."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(batch.latents_w.shape, generator=generator)
    timesteps = torch.randint(0, base.noise_scheduler.config.num_train_timesteps, (batch.latents_w.shape[0],),
                              generator=generator)
    with models.adapters_disabled(unet), torch.inference_mode():
        ref = _old_errors(unet, base.noise_scheduler, batch, noise, timesteps)
    ref_w, ref_l = ref.clone().chunk(2)
    model_w, model_l = _old_errors(unet, base.noise_scheduler, batch, noise, timesteps).chunk(2)
    return OBJECTIVES["dpo"].loss(model_w, model_l, ref_w, ref_l, cfg.beta, batch.labels, cfg.label_smoothing).mean()


def _loss_and_grads(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss.backward()
    grads = [p.grad.clone() for p in params]
    for param in params:
        param.grad = None
    return loss.detach(), grads


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["sdxl", "sd15"])
def test_the_step_on_a_family_is_the_old_math_bit_for_bit(name: str, prediction: str, request: pytest.FixtureRequest
                                                          ) -> None:
    """fp32, a non-zero adapter (lora_B random: the policy differs from the reference and every LoRA tensor gets a
    gradient): `step.dpo_step` (the family's noise, target and denoiser call) against the old math, the loss's bits
    and every gradient equal; the family's prompt encoding against the old one, equal too."""
    source = request.getfixturevalue("shipped_tiny" if name == "sdxl" else "tiny_sd15_base_dir")
    base = _base(str(source), prediction)
    assert base.family.name == name
    prompts = ["a red circle", "a blue square", ""]
    with torch.no_grad():
        new, old = models.encode_prompts(base, prompts, torch.device("cpu")), _old_prompts(base, prompts)
    assert torch.equal(new[0], old[0]) and (new[1] is None) == (old[1] is None) == (name == "sd15")
    assert new[1] is None or torch.equal(new[1], old[1])

    step.build_policy(base.unet, LoraRecipe(), seed=0, precision="no")
    generator = torch.Generator().manual_seed(1)
    for param_name, param in base.unet.named_parameters():
        if "lora_B" in param_name:
            param.data = 0.05 * torch.randn(param.shape, generator=generator)
    params = models.lora_parameters(base.unet)
    batch = step.random_batch(dict(base.unet.config), 2, 64, "cpu", torch.float32, torch.Generator().manual_seed(2))
    assert (batch.pooled is None and batch.time_ids_w is None) == (name == "sd15")
    cfg = ObjectiveRecipe(beta=5000.0)
    new_loss, new_grads = _loss_and_grads(
        step.dpo_step(base.unet, base, batch, cfg, torch.Generator().manual_seed(0)).loss, params)
    old_loss, old_grads = _loss_and_grads(_old_loss(base.unet, base, batch, cfg), params)
    assert new_loss.item() != pytest.approx(0.6931, abs=1e-3)  # not a fresh adapter's ln 2
    assert torch.equal(new_loss, old_loss), (new_loss.item().hex(), old_loss.item().hex())
    assert sum(g.abs().sum().item() for g in new_grads) > 0
    assert all(torch.equal(a, b) for a, b in zip(new_grads, old_grads, strict=True))


# --------------------------------------------------------------------------------------------------
# The registry


def test_every_family_owns_its_own_configs_bases_and_names() -> None:
    """Each family recognises its shipped and tiny denoiser configs, its tiny base's and hub ids' names, and the
    model-spec architecture and sd-scripts version it writes; no name belongs to two families."""
    for family in models.FAMILIES:
        assert models.family_named(family.name) is family
        for config in (family.shipped_config(family.denoiser_folder), family.tiny_denoiser_config()):
            assert models.family_of_denoiser(config) is family
        assert models.family_of_base_name(family.tiny_base) is family
        assert all(models.family_of_base_name(hub_id) is family for hub_id in family.hub_ids)
        for text in (family.modelspec_architecture + "/lora", family.base_model_version("epsilon")):
            assert models.family_of_metadata(text) is family
        text = family.shipped_config("text")
        assert len(text["hidden_sizes"]) == len(family.text_parts) == len(text["encoder_params"])
        # CLIP widths concatenated (SDXL), or T5's that the CLIPs are padded to (SD3, FLUX: `embed_width`)
        width = text.get("embed_width", sum(text["hidden_sizes"]))
        assert family.text_width(family.shipped_config(family.denoiser_folder)) == width
        assert family.prompt_tokens == text["max_length"]
        assert family.pooled_width(family.shipped_config(family.denoiser_folder)) == text["pooled_dim"]
    hub_ids = [hub_id for family in models.FAMILIES for hub_id in family.hub_ids]
    assert len(hub_ids) == len(set(hub_ids)) == len(models.KNOWN_BASES)
    unet_families = [family for family in models.FAMILIES if isinstance(family, models.families.DdpmFamily)]
    # [lora].target_modules unset (None) is the family's; the UNet families' is what the key defaulted to before
    assert schema.LoraRecipe().target_modules is None
    assert all(family.default_target_modules == ("to_q", "to_k", "to_v", "to_out.0") for family in unet_families)
    default_base = schema.ModelRecipe().base  # the recipe's default base is a known one
    assert models.family_of_base_name(default_base) is models.DEFAULT_FAMILY
    known = "sdxl, sd3, flux2, flux, sd15"
    with pytest.raises(models.ModelError, match=f"architecture 'sd21' is not known; known: {known}"):
        models.family_named("sd21")


def test_pipelines_and_single_files_are_told_apart_by_their_parts(tiny_arch_base: tuple[str, Path]) -> None:
    """A pipeline by its text encoders (a part saved as [null, null] is absent), a single file by its keys (SDXL's
    second encoder or its UNet's label_emb; every other original-layout UNet is SD 1.x)."""
    import json

    arch, folder = tiny_arch_base
    index = json.loads((folder / "model_index.json").read_text())
    assert models.family_of_pipeline(index).name == arch
    assert models.family_of_pipeline({**index, "text_encoder_2": [None, None]}).name == "sd15"
    assert models.family_of_pipeline({"_class_name": "X", "text_encoder": ["transformers", "T5"]}) is None
    assert models.family_of_checkpoint(["model.diffusion_model.label_emb.0.0.weight"]) is SDXL
    assert models.family_of_checkpoint(["model.diffusion_model.input_blocks.0.0.weight",
                                        "cond_stage_model.transformer.text_model.x"]) is SD15
    assert models.family_of_checkpoint(["lora_unet_x.lora_down.weight"]) is None
