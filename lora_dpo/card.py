"""The run folder as a hub model repo: the model card (README.md) and the upload.

The card is a function of the run folder alone (recipe.toml, metrics.json, eval/report.json, sample images and
the kohya file when present), so training writes it, `lora-dpo push` (`publish`) refreshes it with the repo id in
the code snippet, and an evaluation written later shows up the next time it is refreshed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_dpo import __version__, files, models
from lora_dpo.hub import is_hub_id
from lora_dpo.recipe import Recipe, load

CARD_FILE = "README.md"
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
KOHYA_SUFFIX = "_kohya.safetensors"  # `<run>_kohya.safetensors`: the file ComfyUI, A1111 and Forge apply
SAMPLE_PROMPTS_FILE = "prompts.json"  # samples/prompts.json: the sample grids' row prompts, top to bottom
WIDGET_IMAGES = 3  # the newest sample grids shown in the hub's gallery
MARK = "<!-- written by lora-dpo; `lora-dpo push` rewrites it: delete this line to keep your own edits -->"
# Licenses of the bases people train on: their families' `licenses`; other bases get `other` unless
# [output].license says.
BASE_LICENSES = {hub_id: name for family in models.FAMILIES for hub_id, name in family.licenses.items()}
METHODS = {"dpo": "**Diffusion-DPO** (Wallace et al. 2023)",
           "sft": "**supervised fine-tuning** on the preferred images (the paper's SFT baseline)"}
# Never uploaded: resumable checkpoints (optimizer state, large) and half-written temporaries.
# an online run's rounds go up as their data sets, grids and results: the images are in the parquet, and the
# latents (what the step trained on, to resume) are of no use to anyone loading the adapter
UPLOAD_IGNORE = ["checkpoint-*", ".*", "*.tmp*", "rounds/*/latents/*", "rounds/*/images/*", "rounds/*/heldout/*"]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _header(path: Path) -> dict[str, str]:
    """A safetensors file's metadata (its header only, not the tensors); {} when there is no file."""
    from safetensors import safe_open

    if not path.is_file():
        return {}
    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata() or {})


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _file_hashes(folder: Path) -> dict[str, str]:
    """File name -> sha256 of its bytes, for the folder's adapter files: the diffusers one, the kohya one if there."""
    names = (ADAPTER_FILE, kohya_file(folder))
    return {name: files.sha256(folder / name) for name in names if (folder / name).is_file()}


def _evaluated(report: dict[str, Any], hashes: dict[str, str]) -> list[str]:
    """Which file the evaluation scored, named by its hash (the report's own, or its generation settings' in a
    report written before it had one), never by where the report lies: a retrained adapter is not the one scored."""
    sha = report.get("adapter_sha256") or (report.get("generation") or {}).get("adapter_sha256")
    if not sha:
        return []
    name = next((f"`{name}`" for name, own in hashes.items() if own == sha), None)
    where = name or "a file no longer in this folder (replaced since: run `lora-dpo eval` again)"
    return [f"Evaluated: {where}, sha256 `{sha}`.", ""]


def _eval_section(report: dict[str, Any], hashes: dict[str, str]) -> list[str]:
    """The evaluation's summary: a win-rate table when it has that shape ({scorer: {strength: {rate, low, high,
    ...}}}), otherwise every number under its dotted path."""
    summary = report.get("summary") or {}
    if not summary:
        return []
    lines = ["## Evaluation", ""]
    if report.get("base") or report.get("prompts"):
        lines += [f"Against the base `{report.get('base', '?')}` on prompts `{report.get('prompts', '?')}` "
                  f"({report.get('n_prompts', '?')} prompts x {len(report.get('seeds', [])) or '?'} seeds).", ""]
    lines += _evaluated(report, hashes)
    shaped = all(isinstance(v, dict) and all(isinstance(r, dict) and "rate" in r for r in v.values())
                 for v in summary.values())
    if shaped:
        lines += ["| scorer | strength | win rate vs base (95 % CI) | wins / ties / losses |", "|---|---|---|---|"]
        for scorer, by_scale in summary.items():
            for scale, r in by_scale.items():
                flat = "low" in r and "high" in r and r["high"] - r["low"] < 1e-12  # no interval, not certainty
                interval = f" ({r['low']:.1%} - {r['high']:.1%})" if "low" in r and "high" in r and not flat else ""
                interval += f" ({r['interval_note']})" if r.get("interval_note") else ""
                lines.append(f"| {scorer} | {scale} | **{r['rate']:.1%}**{interval} | "
                             f"{r.get('wins', '?')} / {r.get('ties', '?')} / {r.get('losses', '?')} |")
    else:
        lines += ["| metric | value |", "|---|---|"]
        stack: list[tuple[str, Any]] = list(summary.items())
        while stack:
            key, value = stack.pop(0)
            if isinstance(value, dict):
                stack[:0] = [(f"{key}.{k}", v) for k, v in value.items()]
            elif isinstance(value, (int, float, str)):
                lines.append(f"| {key} | {_fmt(value)} |")
    return [*lines, ""]


def _heldout(recipe: Recipe, metrics: dict[str, Any]) -> str:
    """How the held-out pairs were chosen: as the run recorded it in metrics.json (counts included), else as the
    recipe says (a run written before lora-dpo recorded it)."""
    if isinstance(metrics.get("heldout"), str):
        return metrics["heldout"]
    data = recipe.data
    if data.val_split:
        return f"from split `{data.val_split}`" + (f", at most {data.val_pairs} pairs" if data.val_pairs else "")
    return f"{data.val_pairs} pairs held out of the training source" if data.val_pairs else "none"


def _data_row(recipe: Recipe) -> str:
    """The card's data row: the source read, or an online run's own images and who judged them."""
    data, cfg = recipe.data, recipe.online
    if cfg.rounds:
        return (f"| data | its own images, {cfg.rounds} rounds: {cfg.samples_per_prompt} a prompt of `{cfg.prompts}`, "
                f"{data.resolution} px, scored by {', '.join(f'`{s}`' for s in cfg.scorers)}, paired `{cfg.pair_rule}` "
                "(each round's pairs: `rounds/round-NNN/pairs.parquet`) |")
    return f"| data | `{data.source}` (split `{data.split}`), {data.resolution} px, ties `{data.ties}` |"


def _rounds_section(rounds: list[dict[str, Any]]) -> list[str]:
    """An online run's rounds: pairs, and each scorer's held-out win rate over the base with its interval."""
    if not rounds:
        return []
    lines = ["## Rounds", "", "Held out: prompts no round trained on; win rate of the adapter's image over the base's "
             "(same prompt and seed; a tie is half) with its 95 % interval over prompts.", "",
             "| round | pairs | held-out win rate |", "|---|---|---|"]
    for r in rounds:
        rates = "; ".join(f"{name} {v['rate']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
                          for name, v in (r.get("heldout") or {}).items())
        lines.append(f"| {r['round']} | {r['pairs']} | {rates or 'not measured'} |")
    return [*lines, ""]


def _sample_image(folder: Path, report: dict[str, Any]) -> str | None:
    """The picture to show: the evaluation's first grid, else the last training sample grid."""
    grids = [f"eval/{g}" for g in report.get("grids", []) if (folder / "eval" / g).is_file()]
    grids = grids or [str(p.relative_to(folder)) for p in sorted((folder / "eval").glob("**/*.png"))]
    samples = sorted((folder / "samples").glob("step-*.png")) or sorted((folder / "samples").glob("*.png"))
    return grids[0] if grids else (str(samples[-1].relative_to(folder)) if samples else None)


def kohya_file(folder: Path) -> str:
    """The run's kohya-format file name, beside the diffusers one (`push` writes it before uploading)."""
    return Path(folder).resolve().name + KOHYA_SUFFIX


def widget(folder: Path, recipe: Recipe) -> list[dict[str, Any]]:
    """The hub gallery (`widget:` in the front matter, which the `template:sd-lora` page shows): the newest
    training sample grids (base | adapter), newest first, captioned with the prompts of their rows."""
    folder = Path(folder)
    grids = sorted((folder / "samples").glob("step-*.png"))[-WIDGET_IMAGES:][::-1]
    prompts = _read_json_list(folder / "samples" / SAMPLE_PROMPTS_FILE) or list(recipe.sample.prompts)
    text = " | ".join(dict.fromkeys(prompts)) or folder.resolve().name
    return [{"text": text, "output": {"url": grid.relative_to(folder).as_posix()}} for grid in grids]


def _read_json_list(path: Path) -> list[str]:
    try:
        value = json.loads(path.read_text()) if path.is_file() else []
    except json.JSONDecodeError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def _files_section(folder: Path, ref: str, name: str, hashes: dict[str, str],
                   flow: bool = False, family: models.Family | None = None) -> list[str]:
    """Which file is for which tool: the diffusers file, and the kohya file when present (push writes it); then
    each file's own sha256. `flow`: a flow-matching base (SD3, FLUX), which A1111 does not run. A family with no
    kohya layout known (FLUX.2 klein): the diffusers file alone, and the card says so."""
    kohya_name = kohya_file(folder)
    tools = "ComfyUI, Forge" if flow else "ComfyUI, AUTOMATIC1111, Forge, SD.Next"
    if family is not None and not family.kohya_format:
        lines = ["| tool | file |", "|---|---|",
                 f"| diffusers (`load_lora_weights`, the snippet above) | `{ADAPTER_FILE}` |", "",
                 f"No kohya-format file: lora-dpo knows no kohya / ComfyUI LoRA layout for {family.label}; a tool "
                 f"that reads diffusers' `transformer.` LoRA keys takes `{ADAPTER_FILE}`.", ""]
        return lines + (["sha256 of the file's bytes (`sha256sum` prints the same):", "",
                         *(f"- `{file}`: `{sha}`" for file, sha in hashes.items()), ""] if hashes else [])
    if (folder / kohya_name).is_file():
        webui_row = f"| {tools} | `{kohya_name}` (kohya format): put it in the tool's LoRA folder |"
    else:
        webui_row = (f"| {tools} | the kohya format: `lora-dpo export {ref} --format kohya --out "
                     f"{name}{KOHYA_SUFFIX}`, then put the file in the tool's LoRA folder |")
    why = ("ComfyUI reads the diffusers file's layers but not its alpha (it applies them at alpha = rank): use the "
           "kohya file there, whose alpha it reads." if flow else
           "ComfyUI does not apply the diffusers file's attention layers: use the kohya file there.")
    lines = ["| tool | file |", "|---|---|",
             f"| diffusers (`load_lora_weights`, the snippet above) | `{ADAPTER_FILE}` |", webui_row, "", why, ""]
    if hashes:  # two files, two hashes: each named with its file (training prints the diffusers file's)
        lines += ["sha256 of each file's bytes (`sha256sum` prints the same):", "",
                  *(f"- `{file}`: `{sha}`" for file, sha in hashes.items()), ""]
    return lines


def _snippet(base: str, adapter_ref: str, family: models.Family | None) -> str:
    # a flow family's own pipeline class (SD3, FLUX: bf16, what they are released in); a UNet base's any
    flow = family is not None and family.flow_matching
    pipeline, half = (family.pipeline_class, "bfloat16") if flow else ("DiffusionPipeline", "float16")
    return "\n".join([
        "```python",
        "import torch",
        f"from diffusers import {pipeline}",
        "",
        'device = "cuda" if torch.cuda.is_available() else "cpu"',
        f"pipe = {pipeline}.from_pretrained({base!r}, torch_dtype=torch.{half} if device == \"cuda\" "
        "else torch.float32).to(device)",
        f"pipe.load_lora_weights({adapter_ref!r})",
        'image = pipe("a fox in the snow, watercolour").images[0]',
        'image.save("fox.png")',
        "```"]) + (f"\n\n{family.card_note}" if family and family.card_note else "")


def model_card(folder: Path, adapter_ref: str | None = None) -> str:
    """The README.md of a run folder, in hub conventions: YAML front matter, use, training, results, samples."""
    from huggingface_hub import ModelCardData

    folder = Path(folder)
    if not (folder / "recipe.toml").is_file():
        raise models.ModelError(f"{folder}: no recipe.toml: not a lora-dpo run folder, so no card can be written")
    recipe: Recipe = load(folder / "recipe.toml")
    metrics = _read_json(folder / "metrics.json")
    report = _read_json(folder / "eval" / "report.json")
    base = recipe.model.base
    header = _header(folder / ADAPTER_FILE)
    # the family the adapter's header names, else the one its base's name does (a tiny base, a known hub id)
    family = models.family_of_metadata(header.get("modelspec.architecture", "")) or models.family_of_base_name(base)
    gallery = widget(folder, recipe)
    data = ModelCardData(
        base_model=base if is_hub_id(base) else None,
        license=recipe.output.license or BASE_LICENSES.get(base, "other"),
        library_name="diffusers", pipeline_tag="text-to-image",
        tags=["lora", "diffusers", "text-to-image", "dpo", "diffusion-dpo", "lora-dpo",
              *(family.card_tags if family else ("stable-diffusion",)), "template:sd-lora"],
        datasets=[recipe.data.source] if is_hub_id(recipe.data.source) and not recipe.online.rounds else None,
        widget=gallery or None)
    name = folder.resolve().name
    ref = adapter_ref or str(folder.resolve())
    cfg, lora, obj = recipe.train, recipe.lora, recipe.objective
    # [lora].target_modules unset: the family's default, as the adapter's header recorded it
    targets = lora.target_modules or json.loads(header.get("lora_dpo.target_modules", "[]"))
    base_note = "" if is_hub_id(base) else " (a local base: put its hub id or folder in the snippet)"
    effective = cfg.batch_size * cfg.gradient_accumulation
    hashes = _file_hashes(folder)
    lines = [
        "---", data.to_yaml(), "---", MARK, "",
        f"# {name}", "",
        # the hub draws the front matter's `widget:` images where the body says `<Gallery />` (as the cards of
        # diffusers' training scripts do, right under the title); without it the page shows none of them
        *(["<Gallery />", ""] if gallery else []),
        f"A LoRA adapter for `{base}`{base_note}, aligned to "
        + (f"{', '.join(recipe.online.scorers)} scores of its own images, online (round after round)"
           if recipe.online.rounds else "human preferences")
        + f" with {METHODS.get(obj.kind, f'the `{obj.kind}` objective')} by lora-dpo {__version__}.",
        "", "## Use it", "", _snippet(models.base_location(base), ref, family), "",
        *_files_section(folder, ref, name, hashes, bool(family and family.flow_matching), family),
        "## Training", "",
        "| setting | value |", "|---|---|",
        f"| objective | `{obj.kind}`, beta {obj.beta:g} (loss `-log sigmoid(-beta/2 x ((e_w - r_w) - (e_l - r_l)))`, "
        "per-pixel mean errors) |",
        _data_row(recipe),
        f"| held-out set | {_heldout(recipe, metrics)} |",
        f"| steps | {metrics.get('steps', cfg.max_steps)} optimizer steps x {effective} pairs per device |",
        f"| learning rate | {cfg.learning_rate:g}, `{cfg.lr_schedule}` schedule, {cfg.warmup_steps} warmup steps |",
        f"| LoRA | rank {lora.rank}, alpha {lora.alpha:g}, on {', '.join(f'`{t}`' for t in targets)} |",
        f"| noise schedule | `{header.get('modelspec.prediction_type', 'epsilon')}` prediction"  # the base's
        f"{', zero terminal SNR' if header.get('lora_dpo.zero_terminal_snr') == 'true' else ''} |",
        f"| precision, seed | `{cfg.mixed_precision}`, {cfg.seed} |",
        f"| recipe fingerprint | `{recipe.fingerprint()}` (the full recipe is `recipe.toml`) |", ""]
    if metrics.get("data"):
        lines += [f"Data: {metrics['data']}.", ""]
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "steps"}
    if numbers:
        lines += ["## Training metrics", "",
                  f"At the last logged step (`val_` = held-out pairs: {_heldout(recipe, metrics)}; without `val_`: "
                  "the last training batches; reward accuracy: the share of pairs the adapter prefers as people did, "
                  "0.5 before training):", "",
                  "| metric | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in numbers.items()), ""]
    lines += _rounds_section(metrics.get("rounds") or [])
    lines += _eval_section(report, hashes)
    image = _sample_image(folder, report)
    if image:
        lines += ["## Samples", "", f"![samples]({image})", ""]
    return "\n".join(lines)


def write_model_card(folder: Path, adapter_ref: str | None = None) -> Path:
    path = Path(folder) / CARD_FILE
    path.write_text(model_card(Path(folder), adapter_ref), encoding="utf-8")
    return path


def hub_files(folder: Path) -> list[str]:
    """The files `push` uploads (huggingface_hub's own filter, so the list is what upload_folder sends)."""
    from huggingface_hub.utils import filter_repo_objects

    paths = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=UPLOAD_IGNORE))


def hub_problems(folder: Path) -> list[str]:
    """Why the folder is not ready to be a hub model repo (empty: ready). Offline: parses, never uploads."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    problems = []
    if not (folder / ADAPTER_FILE).is_file():
        problems.append(f"no {ADAPTER_FILE}")
    if not (folder / CARD_FILE).is_file():
        return [*problems, f"no {CARD_FILE} (model card)"]
    try:
        card = ModelCard.load(folder / CARD_FILE)
    except Exception as err:
        return [*problems, f"{CARD_FILE} does not parse as a model card ({err})"]
    data = card.data
    for key in ("license", "library_name", "tags"):
        if not getattr(data, key, None):
            problems.append(f"{CARD_FILE} front matter has no {key}")
    uploaded = set(hub_files(folder))
    gallery = getattr(data, "widget", None) or []
    for entry in gallery:  # a gallery image the upload leaves out shows broken
        url = (entry.get("output") or {}).get("url") if isinstance(entry, dict) else None
        if url not in uploaded:
            problems.append(f"{CARD_FILE} widget image {url} is not among the uploaded files")
    if gallery and "<Gallery />" not in card.text:  # a hand-edited card that lost it: the page shows no image
        problems.append(f"{CARD_FILE} lists widget images but its text has no <Gallery />: put it under the title")
    return problems
