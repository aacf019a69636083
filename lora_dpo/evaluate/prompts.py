"""Prompt sets: `load_prompts` reads a prompt file (`.txt`, `.csv`, `.tsv`, `.jsonl`, `.json`), a local dataset
folder, a hub dataset, PartiPrompts (`parti`) or the HPS v2 benchmark (`hpsv2[:STYLE]`); `parse_numbers` reads the
other lists `eval` takes (strengths, seeds)."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path

from lora_dpo import hub
from lora_dpo.evaluate.errors import EvalError

PROMPT_COLUMNS = ("prompt", "caption", "text")  # looked for, in this order and case-insensitively
PARTI = ("nateraw/parti-prompts", "train")  # PartiPrompts (1632 prompts, column `Prompt`)
HPSV2_REPO = "zhwang/HPDv2"  # the HPS v2 benchmark: benchmark/<style>.json, 800 prompts each
HPSV2_STYLES = ("anime", "concept-art", "paintings", "photo")


def load_prompts(spec: str, limit: int | None = None) -> list[str]:
    """Prompts from a `.txt` (one a line), a `.csv`/`.tsv`/`.jsonl`/`.json` with a prompt column (a `.json`
    may also be a list of strings), `parti` (PartiPrompts), `hpsv2` or `hpsv2:<style>` (the HPS v2
    benchmark), a local dataset folder, or a hub dataset id `owner/name[:split]`. Each distinct prompt once, in the
    order first seen: a preference file (a run's `heldout.jsonl`) repeats its prompts, and a repeat would only
    count the same (prompt, seed) comparison twice."""
    key, path = spec.strip().lower(), Path(spec)
    if key in ("parti", "partiprompts"):
        prompts = _dataset_prompts(*PARTI)
    elif key.split(":")[0] in ("hpsv2", "hps"):
        prompts = _hpsv2_prompts(key)
    elif path.is_file():
        prompts = _file_prompts(path)
    elif path.is_dir():
        prompts = _dataset_prompts(str(path), "train")
    elif re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", spec.strip()):
        name, _, split = spec.strip().partition(":")
        prompts = _dataset_prompts(name, split or "train")
    else:
        raise EvalError(f"--prompts {spec!r}: no such file, and not `parti`, `hpsv2[:STYLE]` or a hub dataset id")
    prompts = list(dict.fromkeys(str(p).strip() for p in prompts if p is not None and str(p).strip()))
    if not prompts:
        raise EvalError(f"--prompts {spec!r}: no prompts found")
    return prompts[:limit] if limit else prompts


def parse_numbers(values: list[str] | None, default: list, cast: type, option: str) -> list:
    """Repeated and/or comma-separated numbers: `--scale 0.5 --scale 1` or `--scale 0.5,1`."""
    try:
        return [cast(v) for text in values for v in text.split(",") if v.strip()] if values else default
    except ValueError:
        raise EvalError(f"{option} {', '.join(values)}: expected numbers, e.g. {option} 0.5,1.0") from None


def _column(columns: Sequence[str], where: str) -> str:
    lower = {c.lower(): c for c in columns}
    for name in PROMPT_COLUMNS:
        if name in lower:
            return lower[name]
    raise EvalError(f"{where}: no prompt column (looked for {', '.join(PROMPT_COLUMNS)}); found {list(columns)}")


def _file_prompts(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".txt":
        return text.splitlines()
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        column = _column(reader.fieldnames or [], str(path))
        return [row[column] for row in reader]
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise EvalError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    elif suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise EvalError(f"{path}: not valid JSON ({err.msg})") from None
        if isinstance(rows, list) and all(isinstance(r, str) for r in rows):
            return rows  # the HPS v2 benchmark files are plain lists of prompts
    else:
        raise EvalError(f"{path}: expected a .txt, .csv, .tsv, .jsonl or .json prompt file")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise EvalError(f"{path}: expected a list of prompts or of objects with a prompt key")
    column = _column(sorted({k for r in rows for k in r}), str(path))
    return [r.get(column) for r in rows]


def _dataset_prompts(name: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise EvalError(f"--prompts {name!r}: hub and folder datasets need the `datasets` package "
                        "(pip install datasets)") from None
    online = not hub.is_hub_id(name) or hub.prepare()
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types; all mean "cannot use this name"
        if not online:
            raise hub.unavailable(name, "the prompt set") from None
        raise EvalError(f"--prompts {name!r}: cannot load split {split!r} ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); check the name, split and network") from None
    return list(dataset[_column(dataset.column_names, name)])


def _hpsv2_prompts(key: str) -> list[str]:
    """The benchmark ships as JSON lists of strings, which `datasets` cannot read as a table: fetch the files
    and read them like a local `.json` prompt file."""
    style = key.partition(":")[2]
    if style and style not in HPSV2_STYLES:
        raise EvalError(f"--prompts {key!r}: HPS v2 styles are {', '.join(HPSV2_STYLES)}")
    from huggingface_hub import hf_hub_download

    prompts: list[str] = []
    online = hub.prepare()
    for name in [style] if style else HPSV2_STYLES:
        try:
            path = hf_hub_download(HPSV2_REPO, f"benchmark/{name}.json", repo_type="dataset")
        except Exception as err:
            if not online:
                raise hub.unavailable(HPSV2_REPO, "the HPS v2 prompt set") from None
            raise EvalError(f"--prompts {key!r}: cannot download {HPSV2_REPO}/benchmark/{name}.json "
                            f"({type(err).__name__}); check your network, or pass a local copy") from None
        prompts += _file_prompts(Path(path))
    return prompts
