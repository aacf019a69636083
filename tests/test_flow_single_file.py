"""Single-file SD3.5 and FLUX.1 bases: the tiny flow transformers written in the original layout (SAI's MMDiT
names under `model.diffusion_model.`, BFL's bare or under that prefix; `flow_helpers`, the inverse of diffusers'
converters), loaded through lora-dpo's own base loading: the transformer from the file (diffusers'
`from_single_file`; FLUX through the family's own conversion, which is checked against diffusers' at FLUX.1's
width), the VAE from the file when it has one, the other parts from the diffusers folder beside it, and the
transformer's output equal to the diffusers folder's. A transformer-only file without a folder: the shipped config
with what the weights fix (SD3.5 Large vs Medium), enough for a cached run; the rest, offline, a one-line error."""

from __future__ import annotations

import shutil
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from flow_helpers import flux_original_state, sd3_original_state

from lora_dpo import models
from lora_dpo.models.families import flux, sd3
from lora_dpo.plan.bases import architecture
from lora_dpo.recipe import ModelRecipe

FLAVOURS = {"sd3": ("sd3", ""), "flux": ("flux", ""), "flux-prefixed": ("flux", "model.diffusion_model.")}


def _transformer(base_dir: Path) -> Any:
    import diffusers

    family = models.family_named("sd3" if "sd3" in base_dir.parent.name else "flux")
    return getattr(diffusers, family.denoiser_class).from_pretrained(base_dir, subfolder="transformer")


SAI_TEXT = tuple(f"text_encoders.{name}.transformer." for name in ("clip_l", "clip_g", "t5xxl"))


def write_flow_file(base_dir: Path, out: Path, arch: str, prefix: str = "", beside: bool = True,
                    with_vae: bool = False, with_text: bool = False) -> Path:
    """The tiny base's transformer as one original-layout file (SD3: `with_vae` adds its VAE under
    `first_stage_model.`, as SAI's sd3.5_medium.safetensors); `beside`: the base's other parts (configs, text
    encoders, tokenizers, VAE) copied beside it as a diffusers folder without the transformer's weights (nor the
    VAE's when the file has it: it must come from the file)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    transformer = _transformer(base_dir)
    state = sd3_original_state(transformer) if arch == "sd3" else flux_original_state(transformer, prefix)
    if with_vae:
        vae = AutoencoderKL.from_pretrained(base_dir, subfolder="vae")
        state |= models.original.vae_state(vae.state_dict(), len(vae.config.block_out_channels),
                                           vae.config.layers_per_block)
    if with_text:  # SAI's all-in-one layout: each encoder's transformers state under its prefix
        from transformers import CLIPTextModelWithProjection, T5EncoderModel

        for part, cls, at in zip(("text_encoder", "text_encoder_2", "text_encoder_3"),
                                 (CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel), SAI_TEXT,
                                 strict=True):
            state |= {at + k: v.clone() for k, v in cls.from_pretrained(base_dir, subfolder=part).state_dict().items()}
    out.mkdir(parents=True)
    if beside:  # the parts the file holds leave no weights beside it: they must come from the file
        held = ("transformer", *(("vae",) if with_vae else ()), *(("text_encoder",) if with_text else ()))
        shutil.copytree(base_dir, out, dirs_exist_ok=True,
                        ignore=lambda folder, names: [n for n in names if n.endswith(".safetensors") and Path(
                            folder).name.startswith(held)])
    save_file(state, str(out / f"{arch}.safetensors"))
    return out / f"{arch}.safetensors"


def _output(family: Any, transformer: Any) -> torch.Tensor:
    """The transformer's velocity on fixed inputs (B=2, 16 x 8 x 8 latents), through the family's own call."""
    generator = torch.Generator().manual_seed(0)
    config = transformer.config
    noisy = torch.randn(2, 16, 8, 8, generator=generator)
    embeds = torch.randn(2, 5, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(2, config.pooled_projection_dim, generator=generator)
    with torch.no_grad():
        return family.denoise(transformer, noisy, torch.tensor([500.0, 250.0]) / (1000 if family is flux.FAMILY
                                                                                    else 1), embeds, pooled, None)


@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_a_flow_single_file_loads_as_the_folder_base_and_trains(flavour: str, request: pytest.FixtureRequest,
                                                                 tmp_path: Path, tiny_recipe: Any) -> None:
    from diffusers import DiffusionPipeline

    from lora_dpo.export import export_adapter, merge_adapter, read_file
    from lora_dpo.train import train

    arch, prefix = FLAVOURS[flavour]
    base_dir = request.getfixturevalue(f"tiny_{arch}_base_dir")
    path = write_flow_file(base_dir, tmp_path / "file", arch, prefix, with_vae=arch == "sd3")
    assert models.single_file_family(path).name == arch and models.config_folder(path) == path.parent
    loaded = models.load_base(ModelRecipe(base=str(path)))
    folder = models.load_base(ModelRecipe(base=str(base_dir)))
    assert loaded.family is folder.family and len(loaded.text_encoders) == len(folder.text_encoders)
    for ours, theirs in ((loaded.unet, folder.unet), (loaded.vae, folder.vae),
                         *zip(loaded.text_encoders, folder.text_encoders, strict=True)):
        expected, got = theirs.state_dict(), ours.state_dict()
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert torch.equal(_output(loaded.family, loaded.unet), _output(folder.family, folder.unet))
    assert models.base_denoiser_config(str(path))["num_layers"] == folder.unet.config.num_layers
    if flavour == "flux-prefixed":
        return  # the same weights as the bare file: one training run per family is enough
    adapter = train(tiny_recipe(model={"base": str(path)}, train={"max_steps": 2}))
    tensors, metadata = read_file(adapter)
    assert tensors and metadata["lora_dpo.base_model"] == str(path)
    kohya = read_file(export_adapter(adapter, tmp_path / "kohya.safetensors", "kohya"))  # names: the file's config
    assert kohya[1]["ss_base_model_version"] == {"sd3": "5-medium", "flux": "flux1"}[arch]
    assert any(k.startswith({"sd3": "lora_unet_joint_blocks_", "flux": "lora_unet_double_blocks_"}[arch])
               for k in kohya[0])
    merged = merge_adapter(adapter, str(path), 1.0, tmp_path / "merged")  # the stock pipeline from the file's parts
    assert type(DiffusionPipeline.from_pretrained(merged)).__name__ == loaded.family.pipeline_class


def test_a_transformer_only_sd3_file_loads_from_its_own_weights_and_refuses_the_rest_offline(
        tiny_sd3_base_dir: Path, tmp_path: Path) -> None:
    """No folder beside: the shipped (SD3.5 Medium) config with the sizes the weights fix (the tiny MMDiT's two
    blocks of 2 x 16, one dual-attention layer), the transformer equal to the folder's: what a cached run loads.
    Its text encoders would come from the hub, offline here: one line naming [model].base and what to do."""
    path = write_flow_file(tiny_sd3_base_dir, tmp_path / "alone", "sd3", beside=False)
    config = models.base_denoiser_config(str(path))
    assert {k: config[k] for k in sd3.TINY_SD3_TRANSFORMER if k != "sample_size"} == \
        {k: v for k, v in sd3.TINY_SD3_TRANSFORMER.items() if k != "sample_size"}
    assert architecture(ModelRecipe(base=str(path))).unet["num_layers"] == 2  # what `lora-dpo plan` sizes
    loaded = models.load_base(ModelRecipe(base=str(path)), with_encoders=False)
    assert torch.equal(_output(sd3.FAMILY, loaded.unet), _output(sd3.FAMILY, _transformer(tiny_sd3_base_dir)))
    with pytest.raises(models.ModelError, match=r"^\[model\]\.base = '.*sd3\.safetensors': the file holds no SD3\.5 "
                                                r"text encoders; .*stabilityai/stable-diffusion-3\.5-medium.*\[data\]"
                                                r"\.cache\)$"):
        models.load_base(ModelRecipe(base=str(path)))


def test_an_sd3_file_with_its_text_encoders_loads_every_part_from_the_file(tiny_sd3_base_dir: Path,
                                                                         tmp_path: Path) -> None:
    """SAI's all-in-one layout (MMDiT, VAE, CLIP-L, CLIP-G, T5 under `text_encoders.*`), only configs and tokenizers
    beside it: every part comes from the file with the folder base's weights, but CLIP-L's projection, which SAI's
    layout does not keep (diffusers loads it as the identity, as SD3 pools CLIP-L unprojected)."""
    path = write_flow_file(tiny_sd3_base_dir, tmp_path / "file", "sd3", with_vae=True, with_text=True)
    assert not list(path.parent.glob("text_encoder*/*.safetensors"))
    loaded = models.load_base(ModelRecipe(base=str(path)))
    folder = models.load_base(ModelRecipe(base=str(tiny_sd3_base_dir)))
    for index, (ours, theirs) in enumerate(((loaded.unet, folder.unet), (loaded.vae, folder.vae),
                                            *zip(loaded.text_encoders, folder.text_encoders, strict=True))):
        expected, got = theirs.state_dict(), ours.state_dict()
        identity = {"text_projection.weight"} if index == 2 else set()
        assert set(got) == set(expected)
        assert all(torch.equal(got[k], expected[k]) for k in set(expected) - identity), type(ours).__name__
        assert all(torch.equal(got[k], torch.eye(*got[k].shape)) for k in identity)


def test_a_cached_run_needs_only_the_transformer_of_the_file(tiny_sd3_base_dir: Path, tiny_recipe: Any,
                                                              tmp_path: Path) -> None:
    """The cache written with the base's other parts beside the file; then the file alone (no folder, hub
    offline) trains from it: only the transformer loads, from the shipped config and its own weights."""
    from lora_dpo import cache
    from lora_dpo.export import read_file
    from lora_dpo.train import train

    path = write_flow_file(tiny_sd3_base_dir, tmp_path / "file", "sd3")
    live = tiny_recipe(model={"base": str(path)}, train={"max_steps": 2})
    cache.build_cache(live, tmp_path / "cache", shard_size=8, dtype="fp32", batch_size=3)
    for item in path.parent.iterdir():
        if item != path:
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    cached = tiny_recipe(model={"base": str(path)}, data={"cache": str(tmp_path / "cache")}, train={"max_steps": 2})
    tensors, metadata = read_file(train(cached))
    assert tensors and metadata["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"


def test_a_flux_file_of_another_width_without_its_config_folder_is_one_line(tiny_flux_base_dir: Path,
                                                                             tmp_path: Path) -> None:
    """The shipped config is FLUX.1's width (the rope axes cannot be read from the weights): the tiny FLUX file
    alone says what to put beside it, in one line naming [model].base."""
    path = write_flow_file(tiny_flux_base_dir, tmp_path / "alone", "flux", beside=False)
    assert models.base_denoiser_config(str(path))["num_single_layers"] == 1
    with pytest.raises(models.ModelError) as err:
        models.load_base(ModelRecipe(base=str(path)), with_encoders=False)
    message = str(err.value)
    assert message.startswith(f"[model].base = {str(path)!r}: its transformer does not fit the shipped FLUX.1 "
                              "config (") and message.endswith("beside the file") and "\n" not in message


@pytest.mark.parametrize("variant", ["medium", "large"])
def test_real_sd35_files_get_their_own_architecture_from_the_shipped_config(variant: str) -> None:
    """SD3.5 Medium and Large at their real sizes, on `meta` (no storage): SAI's layout of each (`flow_helpers`),
    the shipped config completed from its shapes, and the transformer that config builds has exactly the keys and
    shapes diffusers' converter makes of the file."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    shipped = sd3.FAMILY.shipped_config("transformer")
    truth = shipped if variant == "medium" else {
        **shipped, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
        "pos_embed_max_size": 192, "dual_attention_layers": ()}  # convert_sd3_to_diffusers.py's SD3.5 Large
    with torch.device("meta"):
        state = SD3Transformer2DModel.from_config(truth).state_dict()
        fake = types.SimpleNamespace(state_dict=lambda: state, config=types.SimpleNamespace(**truth))
        original = sd3_original_state(fake)
        config = {**shipped, **sd3.FAMILY.original_denoiser_config({k: tuple(v.shape) for k, v in original.items()})}
        built = SD3Transformer2DModel.from_config(config).state_dict()
        converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert {k: tuple(v.shape) for k, v in built.items()} == {k: tuple(v.shape) for k, v in converted.items()} == \
        {k: tuple(v.shape) for k, v in state.items()}
    assert sd3.FAMILY.webui_spec(config).version("flow") == f"5-{variant}"


def test_the_flux_conversion_is_diffusers_at_the_flux1_width() -> None:
    """FLUX.1-dev's layout (19 double, 38 single blocks, 3072 wide, from the shipped config) converted by the
    family and by diffusers' `convert_flux_transformer_checkpoint_to_diffusers` (which only handles 3072): the same
    tensors. Weights are one column wide (every conversion splits and swaps rows only), so this costs megabytes."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    config = flux.FAMILY.shipped_config("transformer")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FluxTransformer2DModel.from_config(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    thin = {k: torch.randn(shape[0], *([1] if len(shape) > 1 else []), generator=generator)
            for k, shape in shapes.items()}
    fake = types.SimpleNamespace(state_dict=lambda: thin, config=types.SimpleNamespace(**config))
    original = flux_original_state(fake)
    ours = flux.FAMILY.original_denoiser_state(original, config)
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert set(ours) == set(theirs) == set(thin)
    assert all(torch.equal(ours[k], theirs[k]) and torch.equal(ours[k], thin[k]) for k in thin)
    assert flux.FAMILY.original_denoiser_config({k: tuple(v.shape) for k, v in original.items()}) == \
        {"num_layers": 19, "num_single_layers": 38, "guidance_embeds": True}
    schnell = {k: v for k, v in original.items() if not k.startswith("guidance_in.")}  # no guidance embedding
    assert flux.FAMILY.original_denoiser_config({k: tuple(v.shape) for k, v in schnell.items()})["guidance_embeds"] \
        is False
    assert set(flux.FAMILY.original_denoiser_state(schnell, config)) == \
        {k for k in thin if not k.startswith("time_text_embed.guidance_embedder.")}
