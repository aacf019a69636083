"""Adapter files: read any LoRA (ours or made elsewhere), write the diffusers or the kohya/webui format, stamp
the metadata, check an adapter fits a base, load it, fuse it into a full model, describe it.

Inside, an adapter is an `Adapter`: peft-style weights under diffusers module names (`<module>.lora_A.weight`,
`<module>.lora_B.weight`), one alpha per module (the update is scaled by alpha / rank, kohya's convention, which
holds every peft setting we write), and the file's header metadata. Every format converts to and from it.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lora_dpo import __version__, adapterfiles, card, files, kohya, models, webui
from lora_dpo.adapterfiles import (  # noqa: F401 (read here by callers: export.read_file, ...)
    ADAPTER_FILE,
    LORA_SUFFIXES,
    AdapterError,
    detect_format,
    read_file,
    resolve_adapter_file,
)
from lora_dpo.recipe import ModelRecipe, Recipe

log = logging.getLogger(__name__)

Format = Literal["diffusers", "kohya"]
MERGE_FORMATS = ("diffusers", "single-file")  # a pipeline folder, or one original-layout checkpoint file
DIFFUSERS_CONFIG_KEY = "lora_adapter_metadata"  # where diffusers keeps the peft LoraConfig in the header


@dataclass
class Adapter:
    weights: dict[str, Tensor]  # "<module>.lora_A.weight" (r, in[, k, k]) and "<module>.lora_B.weight" (out, r[, 1, 1])
    alphas: dict[str, float]  # module -> alpha; scale = alpha / rank
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "<memory>"
    unmatched: list[str] = field(default_factory=list)  # kohya layers that the given UNet does not have

    @property
    def modules(self) -> list[str]:
        return list(self.alphas)

    @property
    def ranks(self) -> dict[str, int]:
        return {m: int(self.weights[f"{m}.lora_A.weight"].shape[0]) for m in self.alphas}

    @property
    def base(self) -> str:
        meta = self.metadata
        return (meta.get("lora_dpo.base_model") or meta.get("ss_sd_model_name") or meta.get("modelspec.architecture")
                or "unknown")


lora_state_dict = models.lora_state_dict  # the names the trainer, tests and this module read it under

# --------------------------------------------------------------------------------------------------
# Reading


def _pattern_value(patterns: dict[str, Any], module: str) -> Any:
    """peft's rank/alpha pattern lookup: a key matches a module name that ends with it (regex, dot-separated)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _diffusers_lora_config(metadata: dict[str, str], prefix: str = "unet") -> dict[str, Any]:
    """The denoiser's peft LoraConfig from diffusers' header key (prefixed `unet.` / `transformer.`); {} if absent."""
    raw = json.loads(metadata.get(DIFFUSERS_CONFIG_KEY) or "{}")
    return {k.removeprefix(prefix + "."): v for k, v in raw.items() if k.startswith(prefix + ".")}


def _from_diffusers(tensors: dict[str, Tensor], metadata: dict[str, str], source: str) -> Adapter:
    prefix = adapterfiles.denoiser_prefix(tensors)  # `unet.` or `transformer.`: the denoiser's keys
    unet = {k.removeprefix(prefix + "."): v for k, v in tensors.items() if k.startswith(prefix + ".")}
    others = len(tensors) - len(unet)
    if others:
        log.warning("%s: %d text-encoder tensors left out (lora-dpo adapters act on the denoiser only)", source,
                    others)
    odd = [k for k in unet if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if odd:
        raise AdapterError(f"{source}: {odd[0]} is not a plain LoRA weight (DoRA, LoRA bias and old attention-"
                           "processor files are not supported); convert it to peft's lora_A/lora_B layout first")
    config = _diffusers_lora_config(metadata, prefix)
    alphas: dict[str, float] = {}
    for key in unet:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removesuffix(".lora_A.weight")
        rank = unet[key].shape[0]
        if not config:  # no LoraConfig stored: diffusers loads such files with scale 1 (alpha = rank)
            alphas[module] = float(rank)
            continue
        alpha = _pattern_value(config.get("alpha_pattern"), module)
        alpha = config["lora_alpha"] if alpha is None else alpha
        # rsLoRA scales by alpha / sqrt(r): the same update is alpha * sqrt(r) in the alpha / r convention
        alphas[module] = float(alpha) * math.sqrt(rank) if config.get("use_rslora") else float(alpha)
    return Adapter(unet, alphas, metadata, source)


def read_adapter(source: str | Path, config: Any = None, base: str | None = None) -> Adapter:
    """Read an adapter in either format. A kohya file's layer names are resolved against a UNet config: `config`,
    else the base named by `base`, else the base recorded in the file's metadata."""
    path = resolve_adapter_file(source)
    tensors, metadata = read_file(path)
    kohya_file = detect_format(tensors) == "kohya"
    config = base_config(metadata, base, str(source)) if config is None and kohya_file else config
    if config is not None:  # another family's adapter: one line naming both, before any layer is compared
        adapterfiles.refuse_other_family(metadata, tensors, config, base or "the given base", str(source))
    if not kohya_file:
        return _from_diffusers(tensors, metadata, str(source))
    unet_tensors = {k: v for k, v in tensors.items() if k.startswith("lora_unet_")}
    if len(unet_tensors) < len(tensors):
        log.warning("%s: text-encoder layers left out (lora-dpo adapters act on the denoiser only)", source)
    family = models.denoiser_family(dict(config))
    if adapterfiles.uses_unet_names(family):
        weights, alphas, unmatched = kohya.from_kohya(unet_tensors, kohya.name_table(skeleton(config)))
    else:  # the family's own names, fused layers split back into their modules
        table = adapterfiles.name_table(family, dict(config), skeleton(config))
        weights, alphas, unmatched = kohya.from_kohya(unet_tensors, table)
    return Adapter(weights, alphas, metadata, str(source), unmatched)


def base_config(metadata: dict[str, str], base: str | None, source: str) -> dict[str, Any]:
    """The UNet config an adapter is meant for: `base` if given, else the base or the family in its metadata."""
    name = base or metadata.get("lora_dpo.base_model")
    if name:
        return models.base_denoiser_config(name)
    family = adapterfiles.adapter_family(metadata)
    if family is not None:
        return family.shipped_config(family.denoiser_folder)
    raise AdapterError(f"{source}: the file does not say which base it is for; pass --base (a diffusers folder or "
                       "hub id)")


def skeleton(config: Any) -> Any:
    """The UNet's module tree on the meta device: names and shapes, no memory (SDXL's builds in ~0.3 s)."""
    return models.unet_from_config(dict(config), device="meta")


# --------------------------------------------------------------------------------------------------
# Checking and loading


def _in_out(layer: torch.nn.Module) -> tuple[int, int]:
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def check_fits(adapter: Adapter, unet: Any, base: str) -> None:
    """Every adapted layer exists in `unet` with the adapter's input and output widths, or an error names both
    bases and the first layer that differs (in the adapter's own order)."""
    modules = dict(unet.named_modules())
    problems = [f"{name} (no such layer in this base)" for name in adapter.unmatched]
    for module in adapter.modules:
        layer = modules.get(module)
        layer = getattr(layer, "base_layer", layer)  # a UNet that already carries peft adapters
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            problems.append(f"{module} (no such layer in this base)")
            continue
        got = (adapter.weights[f"{module}.lora_A.weight"].shape[1], adapter.weights[f"{module}.lora_B.weight"].shape[0])
        expected = _in_out(layer)
        if got != expected:
            problems.append(f"{module} (adapter {got[0]} -> {got[1]}, base {expected[0]} -> {expected[1]})")
    if problems:
        more = f"; {len(problems) - 1} more of its {len(adapter.modules) + len(adapter.unmatched)} layers differ"
        raise AdapterError(f"{adapter.source}: made for base {adapter.base}, does not fit base {base}: first "
                           f"mismatched layer {problems[0]}{more if len(problems) > 1 else ''}; load it onto the "
                           "base it was trained for")


def lora_config_dict(adapter: Adapter) -> dict[str, Any]:
    """The peft LoraConfig that reproduces the adapter's ranks and scales (the most common rank and alpha,
    patterns for the rest), as diffusers stores it in the header."""
    from peft import LoraConfig

    ranks = adapter.ranks
    rank, alpha = kohya.most_common(ranks), kohya.most_common(adapter.alphas)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(adapter.modules),
                        rank_pattern={m: r for m, r in ranks.items() if r != rank},
                        alpha_pattern={m: a for m, a in adapter.alphas.items() if a != alpha})
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def load_adapter(unet: Any, source: str | Path, base: str | None = None, adapter_name: str = "default") -> Adapter:
    """Load an adapter (folder, file or hub id; diffusers or kohya format) into a diffusers UNet, after checking
    it fits. `base` names the UNet's base in errors (default: the folder it was loaded from)."""
    base = base or getattr(unet.config, "_name_or_path", None) or "the given UNet"
    adapter = read_adapter(source, config=unet.config, base=base)
    check_fits(adapter, unet, base)
    prefix = models.denoiser_family(dict(unet.config)).denoiser_folder  # `unet` or `transformer`
    payload = {f"{prefix}.{k}": v for k, v in adapter.weights.items()}
    metadata = {f"{prefix}.{k}": v for k, v in lora_config_dict(adapter).items()}
    unet.load_lora_adapter(payload, prefix=prefix, metadata=metadata, adapter_name=adapter_name)
    return adapter


# --------------------------------------------------------------------------------------------------
# Metadata and writing


def _base_stamp(cfg: ModelRecipe) -> dict[str, str]:
    """`webui.base_stamp` of the recipe's base; a base that can no longer be read leaves it out (the finished
    adapter is written all the same)."""
    try:
        single = Path(cfg.base) if models.is_single_file(cfg.base) else None
        return webui.base_stamp(models.base_schedule(cfg), single)
    except (models.ModelError, OSError) as err:
        log.warning("the base's schedule and hashes are left out of the adapter's metadata (%s)", err)
        return {}


def _trained_on(recipe: Recipe) -> str:
    """What the adapter trained on: the data source, or an online run's prompts and scorers."""
    cfg = recipe.online
    return f"online:{cfg.prompts} ({', '.join(cfg.scorers)})" if cfg.rounds else recipe.data.source


def training_metadata(recipe: Recipe, metrics: dict[str, Any], title: str, family: models.Family,
                      config: Any) -> dict[str, str]:
    """What a trained adapter says about itself (safetensors metadata values are strings); `config`: the denoiser's
    (its model spec: FLUX dev or schnell)."""
    stamp = {"lora_dpo.version": __version__, "lora_dpo.base_model": recipe.model.base,
             "lora_dpo.base_location": models.base_location(recipe.model.base),
             "lora_dpo.rank": str(recipe.lora.rank), "lora_dpo.alpha": repr(recipe.lora.alpha),
             "lora_dpo.target_modules": json.dumps(list(models.target_modules(recipe.lora, family))),
             "lora_dpo.objective": recipe.objective.kind, "lora_dpo.beta": repr(recipe.objective.beta),
             "lora_dpo.steps": str(metrics.get("steps", "")), "lora_dpo.dataset": _trained_on(recipe),
             "lora_dpo.fingerprint": recipe.fingerprint(), "lora_dpo.recipe": json.dumps(recipe.to_dict()),
             "lora_dpo.metrics": json.dumps(metrics)}
    spec = webui.modelspec(family.modelspec_architecture_for(config), title, recipe.data.resolution,
                           webui.IMPLEMENTATION_DIFFUSERS)
    return {**stamp, **spec, **_base_stamp(recipe.model)}


def _carried_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Our keys and the model spec, less its hash: a hash names its own file, so a converted file gets its own
    (kohya) or none (diffusers), never its source's."""
    return {k: v for k, v in metadata.items() if k.startswith(("lora_dpo.", "modelspec.")) and "hash" not in k}


def _webui_metadata(adapter: Adapter, config: Any, name: str, tensors: dict[str, Tensor]) -> dict[str, str]:
    """sd-scripts' keys (A1111/Forge show and sort by them) plus model-spec, over what the adapter carried."""
    spec = models.denoiser_family(dict(config)).webui_spec(dict(config))  # what the base's family says of itself
    return webui.kohya_metadata(_carried_metadata(adapter.metadata), spec, name, adapter.base, adapter.weights,
                                adapter.alphas, tensors)


def _write_atomic(tensors: dict[str, Tensor], metadata: dict[str, str], out: Path) -> Path:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    with files.atomic_file(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out


def write_diffusers(adapter: Adapter, out: Path, family: models.Family, dtype: torch.dtype = torch.float32,
                    extra_metadata: dict[str, str] | None = None) -> Path:
    """diffusers' own writer, the family's `lora_writer` (so `load_lora_weights` reads it as its own, alpha
    included: `unet.` or `transformer.` keys), then our metadata."""
    scratch = files.temporary(out.with_name(out.name + ".diffusers"))  # diffusers writes a folder
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        family.lora_writer().save_lora_weights(
            scratch, **{f"{family.denoiser_folder}_lora_layers": {k: v.to(dtype).contiguous()
                                                                  for k, v in adapter.weights.items()},
                        f"{family.denoiser_folder}_lora_adapter_metadata": lora_config_dict(adapter)},
            weight_name=out.name, safe_serialization=True)
        tensors, metadata = read_file(scratch / out.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _write_atomic(tensors, {**metadata, **_carried_metadata(adapter.metadata), **(extra_metadata or {})}, out)


def write_kohya(adapter: Adapter, out: Path, config: Any, dtype: torch.dtype = torch.float16) -> Path:
    family = models.denoiser_family(dict(config))
    if not family.kohya_format:
        raise AdapterError(f"{family.label}: no kohya / ComfyUI LoRA format is known for this family; export with "
                           "--format diffusers")
    if adapterfiles.uses_unet_names(family):  # SGM or diffusers names: its choice
        tensors = kohya.to_kohya(adapter.weights, adapter.alphas, family.kohya_namer(dict(config)), dtype)
    else:  # the original checkpoint's names, fused layers as one LoRA each
        table = adapterfiles.name_table(family, dict(config), skeleton(config))
        tensors = adapterfiles.to_kohya(adapter.weights, adapter.alphas, table, dtype)
    return _write_atomic(tensors, _webui_metadata(adapter, config, out.stem, tensors), out)


def export_adapter(source: str | Path, out: Path, fmt: Format, dtype: str = "fp16", base: str | None = None) -> Path:
    """Convert an adapter (either format) to `fmt` at `dtype`; kohya names come from the base's UNet config,
    which must fit the adapter (checked on a meta-device UNet: no weights loaded)."""
    if dtype not in models.STORAGE_DTYPES:
        raise AdapterError(f"--dtype {dtype}: choose one of {', '.join(models.STORAGE_DTYPES)}")
    tensors, metadata = read_file(resolve_adapter_file(source))
    config = base_config(metadata, base, str(source)) if fmt == "kohya" else None
    adapter = read_adapter(source, config=config, base=base)  # another family's base: refused here
    if fmt == "diffusers":  # the family's writer: what its header names, else the kind of denoiser its keys name
        prefix = adapterfiles.denoiser_prefix(tensors)
        family = adapterfiles.adapter_family(metadata) or next(
            f for f in models.FAMILIES if f.denoiser_folder == prefix)
        return write_diffusers(adapter, out, family, models.STORAGE_DTYPES[dtype])
    if fmt != "kohya":
        raise AdapterError(f"--format {fmt}: choose diffusers or kohya")
    check_fits(adapter, skeleton(config), base or adapter.base)
    return write_kohya(adapter, out, config, models.STORAGE_DTYPES[dtype])


def save_adapter(run_dir: Path, unet: torch.nn.Module, lora_config: Any, recipe: Recipe,
                 metrics: dict[str, Any], weights: dict[str, Tensor] | None = None) -> Path:
    """Write the adapter (diffusers format, stamped), the resolved recipe, the metrics (with the adapter file's
    sha256) and the model card into `run_dir`, each file atomically. `weights`: the LoRA weights to write, named as
    `lora_state_dict` names them (default: the UNet's own)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = lora_state_dict(unet) if weights is None else weights
    scale = lora_config.lora_alpha / lora_config.r  # peft's uniform scale; kohya alpha = scale x module rank
    alphas = {k.removesuffix(".lora_A.weight"): scale * v.shape[0] for k, v in weights.items()
              if k.endswith(".lora_A.weight")}
    stamp = training_metadata(recipe, metrics, run_dir.name, family := models.denoiser_family(unet.config),
                              unet.config)
    # all three written before any is published (a full disk leaves none); renamed in reverse order on exit, the
    # adapter last: an adapter on disk always has its recipe and metrics beside it
    with (files.atomic_file(run_dir / ADAPTER_FILE) as adapter_tmp, files.atomic_file(run_dir / "recipe.toml") as
          recipe_tmp, files.atomic_file(run_dir / "metrics.json") as metrics_tmp):
        write_diffusers(Adapter(weights, alphas, source=str(run_dir)), adapter_tmp, family, torch.float32, stamp)
        recipe_tmp.write_text(recipe.to_toml(), encoding="utf-8")
        # the file's own hash lives beside it, not in its header (which it would change); renaming keeps the bytes
        own = {"adapter_file": ADAPTER_FILE, "adapter_sha256": files.sha256(adapter_tmp)}
        metrics_tmp.write_text(json.dumps({**metrics, **own}, indent=1), encoding="utf-8")
    try:  # the adapter is safe on disk by now: a card problem must not fail a finished training
        card.write_model_card(run_dir)
    except Exception as err:
        log.warning("model card not written (%s: %s); `lora-dpo push` writes it", type(err).__name__, err)
    return run_dir / ADAPTER_FILE


# --------------------------------------------------------------------------------------------------
# Merging and inspecting


def merge_adapter(source: str | Path, base: str, scale: float, out_dir: Path, dtype: str = "fp32",
                  fmt: str = "diffusers") -> Path:
    """The base with the adapter fused in at `scale` (stock `load_lora_weights`, `fuse_lora`, `unload_lora_weights`:
    fused weights stay), written to a temporary path and renamed: a diffusers pipeline folder (`save_pretrained`),
    or one original-layout checkpoint file for A1111, Forge and ComfyUI (`single-file`, `models.original`)."""
    from diffusers import DiffusionPipeline

    if fmt not in MERGE_FORMATS or (fmt == "single-file") != (out_dir.suffix == ".safetensors"):
        raise AdapterError(f"--format {fmt} --out {out_dir}: write a checkpoint with --format single-file and an --out "
                           "ending in .safetensors, a pipeline folder with --format diffusers and any other --out")
    path = resolve_adapter_file(source)
    adapterfiles.refuse_for_base(path, base)  # another family's adapter: refused before the base loads
    try:
        torch_dtype = models.STORAGE_DTYPES[dtype]
        pipe = (models.single_file_pipeline(Path(base), torch_dtype) if models.is_single_file(base)
                else DiffusionPipeline.from_pretrained(models.resolve_base(base), torch_dtype=torch_dtype))
    except (OSError, ValueError) as err:
        raise AdapterError(f"{base}: cannot load the base pipeline: {str(err).splitlines()[0]}") from None
    family = models.pipeline_family(pipe)
    denoiser = getattr(pipe, family.denoiser_folder)
    if fmt == "single-file" and not adapterfiles.uses_unet_names(family):
        raise AdapterError(f"--format single-file: no original {family.label} checkpoint layout is written yet; "
                           "merge with --format diffusers (a pipeline folder)")
    adapter = read_adapter(path, config=denoiser.config, base=base)
    check_fits(adapter, denoiser, base)
    if adapterfiles.uses_unet_names(family):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="merged")
    else:  # either format, fused kohya layers split back: loaded as peft layers into the transformer
        load_adapter(denoiser, path, base=base, adapter_name="merged")
    pipe.fuse_lora(lora_scale=scale, adapter_names=["merged"])
    pipe.unload_lora_weights()
    if fmt == "single-file":
        note = f"{base} with the LoRA {source} fused in at scale {scale:g} (lora-dpo {__version__})"
        return models.write_checkpoint(pipe, out_dir, note)
    with files.atomic_folder(out_dir) as tmp:
        pipe.save_pretrained(tmp)
    return out_dir


# Layer kinds, longest first, to name an adapter's targets from kohya (underscored) or diffusers names.
LEAVES = ("ff_net_0_proj", "ff_net_2", "to_out_0", "to_q", "to_k", "to_v", "proj_in", "proj_out", "time_emb_proj",
          "emb_layers_1", "conv_shortcut", "skip_connection", "in_layers_2", "out_layers_3", "conv1", "conv2",
          "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "op", "conv", "linear_1", "linear_2")
OTHER_WIDTHS = {1024: "SD 2.x"}  # cross-attention widths of UNets no family here trains (named, not trained)


def _architecture(width: int) -> str:
    """What the text width that cross-attention keys read (attn2.to_k's input) tells: a UNet family's label."""
    labels = OTHER_WIDTHS | {f.text_width(f.shipped_config("unet")): f.label for f in models.FAMILIES
                             if f.denoiser_folder == "unet"}
    return labels.get(width, f"cross-attention width {width}")


def _leaf(name: str) -> str:
    flat = name.replace(".", "_")
    return next((leaf for leaf in LEAVES if flat.endswith("_" + leaf) or flat == leaf), flat.rsplit("_", 1)[-1])


def inspect_adapter(source: str | Path) -> dict[str, Any]:
    """What an adapter file says about itself, from its tensors and header alone (no base needed): works on
    diffusers/peft and kohya files, ours or made elsewhere."""
    path = resolve_adapter_file(source)
    tensors, meta = read_file(path)
    fmt = detect_format(tensors)
    down = ".lora_down.weight" if fmt == "kohya" else ".lora_A.weight"
    layers = {k.removesuffix(down): v for k, v in tensors.items() if k.endswith(down)}
    ranks = sorted({int(v.shape[0]) for v in layers.values()})
    if fmt == "kohya":
        alphas = sorted({round(float(tensors[f"{n}.alpha"].float().reshape(-1)[0]), 6) if f"{n}.alpha" in tensors
                         else int(v.shape[0]) for n, v in layers.items()})
    else:
        config = _diffusers_lora_config(meta, adapterfiles.denoiser_prefix(tensors))
        alphas = sorted({config["lora_alpha"], *config.get("alpha_pattern", {}).values()} if config else ranks)
    width = {int(v.shape[1]) for n, v in layers.items() if n.replace(".", "_").endswith("attn2_to_k")}
    arch = next((_architecture(w) for w in width), None)
    targets = json.loads(meta["lora_dpo.target_modules"]) if "lora_dpo.target_modules" in meta else sorted(
        {_leaf(n) for n in layers})
    family = adapterfiles.adapter_family(meta)
    info: dict[str, Any] = {
        "file": str(path), "format": fmt, "family": family.label if family else arch or "unknown",
        "base_model": meta.get("lora_dpo.base_model") or meta.get("ss_sd_model_name") or "unknown",
        "base_location": meta.get("lora_dpo.base_location") or meta.get("lora_dpo.base_model") or "unknown",
        "architecture": meta.get("modelspec.architecture") or meta.get("ss_base_model_version") or arch or "unknown",
        "rank": ranks[0] if len(ranks) == 1 else ranks, "alpha": alphas[0] if len(alphas) == 1 else alphas,
        "targets": targets, "layers": len(layers),
        "text_encoder_layers": sum(1 for n in layers if "lora_te" in n or n.startswith("text_encoder")),
        "parameters": sum(v.numel() for k, v in tensors.items() if not k.endswith(".alpha")),
        "size_mb": round(path.stat().st_size / 2**20, 2), "sha256": files.sha256(path),
        "dtype": sorted({str(v.dtype).removeprefix("torch.") for k, v in tensors.items() if not k.endswith(".alpha")}),
    }
    recorded = {"objective": "lora_dpo.objective", "beta": "lora_dpo.beta", "steps": "lora_dpo.steps",
                "dataset": "lora_dpo.dataset", "fingerprint": "lora_dpo.fingerprint", "lora_dpo": "lora_dpo.version"}
    info |= {name: meta[key] for name, key in recorded.items() if key in meta}
    if "steps" not in info and "ss_steps" in meta:
        info["steps"] = meta["ss_steps"]
    return info
