import dataclasses
import json
import logging
import math
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_dpo import recipe
from lora_dpo.recipe import RecipeError

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path: Path) -> None:
    loaded = recipe.load(path)
    assert loaded.objective.beta > 0
    assert recipe.from_dict(tomllib.loads(loaded.to_toml())) == loaded  # resolved TOML round-trips


def test_paper_settings_in_the_sdxl_recipes() -> None:
    paper = recipe.load(Path(__file__).parent.parent / "recipes" / "sdxl_pickapic_paper.toml")
    assert paper.objective.beta == 5000.0
    assert paper.train.batch_size * paper.train.gradient_accumulation == 2048
    assert paper.data.resolution == 1024 and paper.data.ties == "drop"
    overnight = recipe.load(Path(__file__).parent.parent / "recipes" / "sdxl_pickapic.toml")
    assert overnight.train.batch_size * overnight.train.gradient_accumulation == 16  # diffusers' LoRA example, 8 x 2
    assert (overnight.train.max_steps, overnight.train.learning_rate, overnight.lora.rank) == (2000, 1e-5, 8)


def test_unknown_key_names_file_key_and_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text("[train]\nlearning_rte = 1e-4\n[lora]\nrank = 'eight'\n[objectiv]\nbeta = 1\n")
    with pytest.raises(RecipeError) as err:
        recipe.load(path)
    message = str(err.value)
    assert str(path) in message
    assert "[train].learning_rte" in message and "did you mean `learning_rate`" in message
    assert "[lora].rank = 'eight' must be a whole number" in message  # every problem at once
    assert "unknown section [objectiv]" in message and "`objective`" in message


def test_overrides_are_typed_and_checked() -> None:
    loaded = recipe.from_dict({}, overrides=("train.learning_rate=2e-5", "lora.target_modules=['to_q']",
                                             "model.base=some/id", "train.num_threads=none"))
    assert loaded.train.learning_rate == 2e-5
    assert loaded.lora.target_modules == ("to_q",)
    assert loaded.model.base == "some/id"
    with pytest.raises(RecipeError, match="must be one of|is not one of"):
        recipe.from_dict({}, overrides=("objective.kind=ppo",))
    with pytest.raises(RecipeError, match=">= 1"):
        recipe.from_dict({}, overrides=("train.max_steps=0",))
    with pytest.raises(RecipeError, match="section.key=value"):
        recipe.parse_override("learning_rate")


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such recipe file"):
        recipe.load(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(RecipeError, match="not valid TOML"):
        recipe.load(bad)


def test_fingerprint_changes_with_any_setting() -> None:
    a = recipe.from_dict({})
    assert a.fingerprint() == recipe.from_dict({}).fingerprint()
    assert a.fingerprint() != recipe.from_dict({"objective": {"beta": 1.0}}).fingerprint()


def test_describe_documents_every_field() -> None:
    rows = recipe.describe()
    keys = {row[0] for row in rows}
    assert {"train.learning_rate", "objective.beta", "data.ties", "lora.rank"} <= keys
    assert all(row[3] for row in rows)


def test_the_recipe_reference_is_generated_from_the_dataclasses() -> None:
    readme = (Path(__file__).parent.parent / "docs" / "recipe.md").read_text()
    table = readme.split("<!-- recipe-table:start -->\n")[1].split("\n<!-- recipe-table:end -->")[0]
    rows = [line for line in table.splitlines()[2:]]
    assert rows == [f"| `{k}` | {t} | `{d}` | {h} |" for k, t, d, h in recipe.describe()], \
        "docs/recipe.md's table is stale: regenerate it with `lora-dpo recipe-doc`"


def test_a_key_the_objective_ignores_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lora_dpo.recipe"):
        recipe.from_dict({"objective": {"kind": "mapo", "beta": 2000.0, "mapo_beta": 0.2}}, "r.toml")
        assert caplog.messages == ["r.toml: [objective].beta has no effect with kind = 'mapo' (it is read by dpo, "
                                   "ipo, hinge only)"]
        caplog.clear()
        recipe.from_dict({"objective": {"kind": "dpo", "mapo_snr": 1.0}})
        assert "[objective].mapo_snr has no effect with kind = 'dpo'" in caplog.text
        caplog.clear()
        resolved = recipe.from_dict({"objective": {"kind": "sft"}}).to_toml()  # every key, at its default
        recipe.from_dict(tomllib.loads(resolved))
        assert caplog.messages == []


def test_column_names_are_a_checked_table_that_round_trips() -> None:
    loaded = recipe.from_dict({"data": {"columns": {"caption": "text", "jpg_0": "image_a"}}})
    assert loaded.data.columns == (("caption", "text"), ("jpg_0", "image_a"))
    assert 'columns = { "caption" = "text", "jpg_0" = "image_a" }' in loaded.to_toml()
    assert recipe.from_dict(tomllib.loads(loaded.to_toml())) == loaded
    assert recipe.from_dict({}, overrides=('data.columns={prompt="q"}',)).data.columns == (("prompt", "q"),)
    with pytest.raises(RecipeError, match=r"\[data\].columns: unknown name\(s\) capton; valid: caption"):
        recipe.from_dict({"data": {"columns": {"capton": "text"}}})
    with pytest.raises(RecipeError, match="must be a table of names to column names"):
        recipe.from_dict({"data": {"columns": ["caption=text"]}})


def test_non_finite_numbers_and_out_of_range_seeds_are_refused() -> None:
    with pytest.raises(RecipeError) as err:
        recipe.from_dict({"train": {"learning_rate": math.nan, "seed": -1}, "objective": {"beta": math.inf}})
    message = str(err.value)
    assert "[train].learning_rate = nan must be a finite number" in message
    assert "[objective].beta = inf must be a finite number" in message and "[train].seed = -1 must be >= 0" in message


# --------------------------------------------------------------------------------------------------
# Random recipes: the loader returns a valid Recipe or raises RecipeError, never anything else

FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
SCALARS = (st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
           | st.sampled_from(["no", "bf16", "fp16", "dpo", "random", "none", "to_q", "adamw"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=2), max_leaves=5)
SECTION = st.one_of([st.tuples(st.just(name), st.dictionaries(
    st.sampled_from([f.name for f in dataclasses.fields(cls)]) | st.text(max_size=8), VALUES, max_size=4))
    for name, cls in recipe.SECTIONS.items()])
JUNK = st.tuples(st.text(max_size=8), st.dictionaries(st.text(max_size=8), VALUES, max_size=2) | SCALARS)
TABLES = st.lists(SECTION | JUNK, max_size=4).map(dict)


def _toml(value) -> str:
    """A value as TOML (inline tables and arrays); enough for the fuzz, not a general writer."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # nan, inf, -inf and 1e+20 are TOML too
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {_toml(v)}" for k, v in value.items()) + "}"


def _load(path: Path, text: str | bytes) -> None:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        loaded = recipe.load(path)
    except RecipeError as err:
        assert str(path) in str(err)
        return
    assert recipe.from_dict(tomllib.loads(loaded.to_toml())) == loaded  # what loads is valid and round-trips


@FUZZ
@given(tables=TABLES)
def test_random_toml_recipes_load_or_raise_recipe_errors(tmp_path: Path, tables: dict) -> None:
    lines = []
    for section, values in tables.items():
        if isinstance(values, dict):
            lines.append(f"[{json.dumps(section, ensure_ascii=False)}]")
            lines += [f"{json.dumps(key, ensure_ascii=False)} = {_toml(value)}" for key, value in values.items()]
        else:
            lines.insert(0, f"{json.dumps(section, ensure_ascii=False)} = {_toml(values)}")
    _load(tmp_path / "r.toml", "\n".join(lines))


@FUZZ
@given(blob=st.binary(max_size=200) | st.text(max_size=200))
def test_random_bytes_and_text_as_a_recipe_raise_recipe_errors(tmp_path: Path, blob: bytes | str) -> None:
    _load(tmp_path / "r.toml", blob)


@pytest.mark.parametrize("key", [row[0] for row in recipe.describe()])
@settings(max_examples=25, deadline=None, database=None)
@given(value=SCALARS | st.sampled_from([math.nan, math.inf, -1, 0, 2**64, 10**400, ["to_q"]]))
def test_any_value_for_any_key_is_valid_or_a_recipe_error(key: str, value) -> None:
    section, name = key.split(".")
    try:
        loaded = recipe.from_dict({section: {name: value}})
    except RecipeError as err:
        assert f"[{section}].{name}" in str(err)
        return
    assert recipe.from_dict(tomllib.loads(loaded.to_toml())) == loaded  # valid: it round-trips


def test_a_bad_set_value_is_blamed_on_set_not_on_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.toml"
    path.write_text("[train]\nlearning_rate = 'fast'\n")
    with pytest.raises(RecipeError) as err:
        recipe.load(path, ["train.max_steps=many"])
    assert str(err.value) == (f"{path}: [train].learning_rate = 'fast' must be a number; "
                              "--set: [train].max_steps = 'many' must be a whole number")


def test_values_the_model_and_data_cannot_take_are_refused_before_anything_loads(tiny_recipe) -> None:
    """A resolution the VAE cannot halve three times, and a batch larger than the data."""
    with pytest.raises(RecipeError, match=r"\[data\].resolution = 63 must be a multiple of 8"):
        recipe.from_dict({"data": {"resolution": 63}})
    from lora_dpo.data import DataError, build_datasets

    cfg = tiny_recipe().data
    with pytest.raises(DataError, match=r"\[train\].batch_size = 100000 is larger than the 20 training pairs"):
        build_datasets(cfg, 0, 10, 100000)


def test_an_optional_key_is_unset_with_none_and_an_empty_name_is_an_error(tmp_path: Path) -> None:
    """`--set model.variant=none` unsets a key a recipe file set; `""` (from `--set model.variant=` or written in the
    file) names nothing, so it is a RecipeError naming the key, for every text key, optional or not."""
    path = tmp_path / "r.toml"
    path.write_text('[model]\nvariant = "fp16"\nvae = "madebyollin/sdxl-vae-fp16-fix"\n')
    assert recipe.load(path).model.variant == "fp16"
    unset = recipe.load(path, ["model.variant=none", "model.vae=None"])
    assert unset.model.variant is None and unset.model.vae is None
    for override in ("model.variant=", 'model.variant=""', "model.variant=  "):
        with pytest.raises(RecipeError, match=r"\[model\].variant = '\s*': an empty name is never valid; to unset"):
            recipe.load(path, [override])
    path.write_text('[model]\nvariant = ""\n')
    with pytest.raises(RecipeError, match=r"\[model\].variant = ''"):
        recipe.load(path)
    text_keys = [(section, f.name) for section, cls in recipe.SECTIONS.items() for f in dataclasses.fields(cls)
                 if f.type in ("str", "str | None")]
    assert len(text_keys) >= 11 and ("data", "val_split") in text_keys
    for section, key in text_keys:
        with pytest.raises(RecipeError, match=rf"\[{section}\]\.{key} = '': an empty name is never valid"):
            recipe.from_dict({section: {key: ""}})
    assert "`none` unsets it (`--set model.variant=none`)" in dict((k, h) for k, _, _, h in recipe.describe())[
        "model.variant"]


def test_constant_means_diffusers_constant_and_an_old_warmed_up_constant_resumes_under_its_new_name() -> None:
    """`constant` with a warmup is refused by the trainer (diffusers' `constant` has none; test_train runs it);
    a checkpoint from before `constant_with_warmup` existed (`constant` + warmup, which warmed up) resumes with
    `constant_with_warmup` as no change, and with plain `constant` as a change."""
    old = recipe.from_dict({"train": {"lr_schedule": "constant", "warmup_steps": 500}})
    assert recipe.warmup_problem(old.train).startswith('[train].warmup_steps = 500 with lr_schedule = "constant"')
    renamed = recipe.from_dict({"train": {"lr_schedule": "constant_with_warmup", "warmup_steps": 500}})
    assert recipe.warmup_problem(renamed.train) is None and recipe.warmup_problem(recipe.from_dict({}).train) is None
    assert renamed.resume_changes(old.to_dict()) == []
    assert recipe.from_dict({"train": {"warmup_steps": 0}}).resume_changes(old.to_dict()) == [
        '[train].lr_schedule ("constant_with_warmup" -> "constant")', "[train].warmup_steps (500 -> 0)"]


def test_a_resume_may_change_what_the_nan_and_memory_advice_says_to_fix() -> None:
    """The guards say: fix the learning rate, beta, clipping, precisions, the VAE, NF4 or the cache, or turn
    gradient checkpointing on, then --resume. Those changes are said at start ("warn") or free, never refused; the
    adapter, the optimizer, the data and the objective's kind are refused."""
    saved = recipe.from_dict({}).to_dict()
    fixed = recipe.from_dict({"train": {"learning_rate": 1e-6, "gradient_checkpointing": True},
                              "objective": {"beta": 2500.0}, "model": {"quantize": "nf4"}})
    assert fixed.resume_changes(saved) == []
    assert fixed.resume_changes(saved, "warn") == ['[model].quantize ("none" -> "nf4")',
                                                   "[objective].beta (5000.0 -> 2500.0)",
                                                   "[train].learning_rate (1e-05 -> 1e-06)"]
    refused = recipe.from_dict({"lora": {"rank": 4}, "train": {"optimizer": "adamw"}, "objective": {"kind": "ipo"}})
    assert refused.resume_changes(saved) == ["[lora].rank (8 -> 4)", '[objective].kind ("dpo" -> "ipo")',
                                             '[train].optimizer ("adamw8bit" -> "adamw")']


def _generated(marker: str) -> list[str]:
    page = (Path(__file__).parent.parent / "docs" / "recipe.md").read_text()
    return page.split(f"<!-- {marker}:start -->\n")[1].split(f"\n<!-- {marker}:end -->")[0].splitlines()[2:]


def test_other_tools_names_point_at_real_keys_and_values_and_the_docs_table_is_generated() -> None:
    from lora_dpo.recipe import aliases

    for name, (here, _, _) in aliases.OTHER_TOOLS.items():
        if here.startswith("lora-dpo "):
            continue  # a command, not a key
        dotted, _, value = here.partition(" = ")
        section, key = dotted.strip("[").split("].")
        assert key in {f.name for f in dataclasses.fields(recipe.SECTIONS[section])}, name
        if value:  # the value it names is one the recipe takes, and is what the parsed recipe holds
            given = tomllib.loads(f"v = {value}")["v"]
            parsed = getattr(getattr(recipe.from_dict({section: {key: given}}), section), key)
            assert parsed == (tuple(given) if isinstance(given, list) else given), name
    assert _generated("other-tools") == [f"| `{n}` | {t} | `{h}` | {note} |" for n, t, h, note in aliases.rows()], \
        "docs/recipe.md's other-tools table is stale: regenerate it with `lora-dpo recipe-doc --other-tools`"


def test_another_tools_name_is_answered_with_its_recipe_key_in_any_section_or_none(tmp_path: Path) -> None:
    """What a diffusers or sd-scripts user writes: the recipe key that does the job, not a spelling guess
    (`max_train_steps` was once "did you mean `max_bad_steps`?"); a plain typo still gets the guess."""
    path = tmp_path / "r.toml"
    path.write_text('pretrained_model_name_or_path = "x"\n[train]\nmax_train_steps = 10\nlearning_rte = 1\n'
                    "[lora]\nnetwork_dim = 4\n[model]\nuse_8bit_adam = true\nseed = 1\n"
                    "[training_arguments]\nlr_warmup_steps = 5\nmystery = 1\n")
    with pytest.raises(RecipeError) as err:
        recipe.load(path)
    assert str(err.value) == (
        f"{path}: `pretrained_model_name_or_path` is outside any [section] table; `pretrained_model_name_or_path` "
        "is `[model].base` here; "
        "unknown key [train].max_train_steps; `max_train_steps` is `[train].max_steps` here; "
        "unknown key [train].learning_rte; did you mean `learning_rate`?; "
        "unknown key [lora].network_dim; `network_dim` is `[lora].rank` here; "
        'unknown key [model].use_8bit_adam; `use_8bit_adam` is `[train].optimizer = "adamw8bit"` here; '
        "unknown key [model].seed; `seed` is `[train].seed` here; "
        "unknown section [training_arguments]; valid: model, lora, data, objective, train, online, sample, output; "
        "`lr_warmup_steps` is `[train].warmup_steps` here")
    with pytest.raises(RecipeError, match=r"^--set 'max_train_steps=10': expected section.key=value, e.g. train."
                                          r"learning_rate=2e-5; `max_train_steps` is `\[train\].max_steps` here$"):
        recipe.from_dict({}, overrides=("max_train_steps=10",))
    with pytest.raises(RecipeError, match=r"^--set: unknown key \[train\].name; `name` belongs in \[output\] "
                                          r"\(`\[output\].name`\)$"):
        recipe.from_dict({}, overrides=("train.name=x",))
