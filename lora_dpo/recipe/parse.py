"""Reading a recipe: TOML plus `--set` overrides checked against the schema before any weight is loaded; every
problem is collected and reported at once, naming the file and the key as the user wrote it."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from lora_dpo.recipe.aliases import other_tool_hint
from lora_dpo.recipe.fields import RecipeError
from lora_dpo.recipe.online import online_problems
from lora_dpo.recipe.schema import SECTIONS, ColumnMap, ObjectiveRecipe, Recipe, resume_rule

log = logging.getLogger(__name__)
# what the recipe reference says of each resume rule (schema.RESUME_RULES); "same" keys say nothing: most are
RESUME_NOTES = {"same": "", "free": " May change on `--resume`.",
                "layout": " May change on `--resume` if the pairs per optimizer step (batch x accumulation x "
                          "processes) stay the same.",
                "warn": " May change on `--resume` (to recover from NaN or out-of-memory; said at start)."}


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f"; did you mean `{match[0]}`?" if match else f"; valid: {', '.join(options)}"


def _key_hint(key: str, section: str | None = None) -> str | None:
    """What an unknown `key` (in `section`, or in none) is here: another tool's name for a recipe key (before any
    spelling guess: `max_train_steps` is not `max_bad_steps`), or a key of another section."""
    hint = other_tool_hint(key)
    if hint:
        return hint
    homes = [name for name, cls in SECTIONS.items()
             if name != section and key in {f.name for f in dataclasses.fields(cls)}]
    return f"`{key}` belongs in " + " or ".join(f"[{home}] (`[{home}].{key}`)" for home in homes) if homes else None


def _is_text(value: Any) -> bool:
    """A string that can be written back as UTF-8 (not one with stray surrogates from undecodable arguments)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_value(key: str, value: Any, annotation: Any, meta: dict[str, Any]) -> tuple[Any, str | None]:
    """Coerce a TOML value to the field's type; return (value, problem or None)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None, None  # `none` unsets an optional key (TOML has no null): `--set model.variant=none`
        if type(None) in args and str in args and isinstance(value, str) and not value.strip():
            return value, (f"{key} = {value!r}: an empty name is never valid; to unset the key write none "
                           f"(`--set {key.replace('[', '').replace(']', '')}=none`), or leave it out of the recipe")
        options = [a for a in args if a is not type(None)]
        for option in options:  # the first type that takes the value
            checked, problem = _check_value(key, value, option, meta)
            if problem is None:
                return checked, None
        if len(options) == 1:
            return value, problem
        return value, f"{key} = {value!r} must be {' or '.join(_type_phrase(a) for a in options)}"
    if origin is Literal:
        if value not in args:
            return value, f"{key} = {value!r} is not one of {', '.join(repr(a) for a in args)}"
        return value, None
    if annotation == ColumnMap:
        items = value.items() if isinstance(value, dict) else value
        if not isinstance(value, (dict, tuple)) or not all(
                isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(v, str) for v in pair)
                for pair in (tuple(item) for item in items)):
            return value, f"{key} = {value!r} must be a table of names to column names, e.g. {{ caption = \"text\" }}"
        unknown = [name for name, _ in items if name not in meta["keys"]]
        if unknown:
            return value, f"{key}: unknown name(s) {', '.join(unknown)}; valid: {', '.join(meta['keys'])}"
        return tuple((name, column) for name, column in items), None
    if origin is tuple:
        item = args[0]  # tuple[str, ...] or tuple[int, ...]
        if isinstance(value, (str, int)):
            value = [value]
        if not isinstance(value, list) or not all(
                _is_text(v) if item is str else isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value, f"{key} = {value!r} must be a list of {'strings' if item is str else 'whole numbers'}"
        unknown = [v for v in value if "choices" in meta and v not in meta["choices"]]
        if unknown:
            return value, f"{key}: unknown name(s) {', '.join(map(repr, unknown))}; valid: {', '.join(meta['choices'])}"
        if item is int and "min" in meta and any(v < meta["min"] for v in value):
            return value, f"{key} = {value!r}: every value must be >= {meta['min']}"
        return tuple(value), None
    if annotation is bool:
        if not isinstance(value, bool):
            return value, f"{key} = {value!r} must be true or false"
        return value, None
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return value, f"{key} = {value!r} must be a whole number"
    elif annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"{key} = {value!r} must be a number"
        number = float(value) if abs(value) < 1e308 or isinstance(value, float) else math.inf  # no OverflowError
        if not math.isfinite(number):
            return value, f"{key} = {value!r} must be a finite number"
        value = number
    elif annotation is str:
        if not _is_text(value):
            return value, f"{key} = {value!r} must be a string (in quotes)"
        if not value.strip():  # every text key names something (a model, a file, a split): "" names nothing
            return value, f"{key} = {value!r}: an empty name is never valid"
        return value, None
    if "min" in meta and value < meta["min"]:
        return value, f"{key} = {value!r} must be >= {meta['min']}"
    if "max" in meta and value > meta["max"]:
        return value, f"{key} = {value!r} must be <= {meta['max']}"
    if "multiple" in meta and value % meta["multiple"]:
        return value, f"{key} = {value!r} must be a multiple of {meta['multiple']}"
    return value, None


def _type_phrase(annotation: Any) -> str:
    """How an error message names a type, e.g. for `bool | Literal["auto"]`: true or false or 'auto'."""
    if typing.get_origin(annotation) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
    return names.get(annotation, str(annotation))


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value); the value is read as TOML, else as a plain string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        hint = _key_hint(text.split("=", 1)[0]) if "=" in text else None
        raise RecipeError(f"--set {text!r}: expected section.key=value, e.g. train.learning_rate=2e-5"
                          + (f"; {hint}" if hint else ""))
    dotted, raw = (part.strip() for part in text.split("=", 1))
    section, key = dotted.split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def from_dict(raw: dict[str, Any], source: str = "<recipe>", overrides: tuple[str, ...] = ()) -> Recipe:
    """Build a Recipe from parsed TOML plus `--set` overrides, reporting every problem at once, each blamed on
    where it was written: the file or `--set`."""
    merged: dict[str, dict[str, Any]] = {}
    problems: dict[str, list[str]] = {source: [], "--set": []}
    for section, values in raw.items():
        if not isinstance(values, dict):  # a key outside any section (a flat config of another tool)
            hint = _key_hint(section)
            problems[source].append(f"`{section}` is outside any [section] table; {hint}" if hint else
                                    f"`{section}` must be a [section] table{_closest(section, list(SECTIONS))}")
            continue
        merged[section] = dict(values)
    overridden = set()
    for text in overrides:
        section, key, value = parse_override(text)
        merged.setdefault(section, {})[key] = value
        overridden.add((section, key))
    kwargs: dict[str, Any] = {}
    for section, values in merged.items():
        if section not in SECTIONS:  # e.g. sd-scripts' [training_arguments]: say where each key it knows goes
            origin = "--set" if any(s == section for s, _ in overridden) else source
            hints = [hint for key in values if (hint := _key_hint(key))]
            problems[origin].append(f"unknown section [{section}]{_closest(section, list(SECTIONS))}"
                                    + "".join(f"; {hint}" for hint in hints))
            continue
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        section_kwargs = {}
        for key, value in values.items():
            origin = "--set" if (section, key) in overridden else source
            if key not in fields:
                hint = _key_hint(key, section)
                problems[origin].append(f"unknown key [{section}].{key}"
                                        + (f"; {hint}" if hint else _closest(key, list(fields))))
                continue
            checked, problem = _check_value(f"[{section}].{key}", value, hints[key], dict(fields[key].metadata))
            if problem:
                problems[origin].append(problem)
            section_kwargs[key] = checked
        kwargs[section] = cls(**section_kwargs)
    if any(problems.values()):
        raise RecipeError("; ".join(f"{origin}: " + "; ".join(found) for origin, found in problems.items() if found))
    built = Recipe(**kwargs)
    crossed = online_problems(built)
    if crossed:
        raise RecipeError(f"{source}: " + "; ".join(crossed))
    _warn_unused_objective_keys(built.objective, merged.get("objective", {}), source)
    return built


def _warn_unused_objective_keys(cfg: ObjectiveRecipe, written: dict[str, Any], source: str) -> None:
    """A key the user set away from its default that the chosen objective ignores (e.g. `beta` with `mapo`) is
    a warning; a resolved recipe.toml, which writes every key at its default, stays quiet."""
    fields = {f.name: f for f in dataclasses.fields(ObjectiveRecipe)}
    for key in written:
        kinds = fields[key].metadata.get("kinds")
        if kinds and cfg.kind not in kinds and getattr(cfg, key) != fields[key].default:
            log.warning("%s: [objective].%s has no effect with kind = %r (it is read by %s only)", source, key,
                        cfg.kind, ", ".join(kinds))


def load(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise RecipeError(f"{path}: cannot read the recipe ({err.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: not valid TOML: {err}") from None
    return from_dict(raw, str(path), tuple(overrides))


def describe() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every recipe field: the README's recipe reference."""
    rows = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            type_name = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            type_name = "table" if hints[f.name] == ColumnMap else type_name
            type_name = type_name.replace(" | ", " or ")  # a bare | would split the README's Markdown table
            help_text = f.metadata["help"]
            if type(None) in typing.get_args(hints[f.name]):  # say once, where users look, how to unset one
                help_text += " `none` unsets it (`--set " + f"{section}.{f.name}=none`)."
            help_text += RESUME_NOTES[resume_rule(section, f.name)]
            rows.append((f"{section}.{f.name}", type_name, repr(f.default), help_text))
    return rows
