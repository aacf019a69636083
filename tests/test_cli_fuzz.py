"""Random recipe values and random files through the commands: each either works or fails with exit code 2 and one
line naming the problem, never a traceback. In process (typer's runner) to stay short; the subprocess tests in
test_train.py and test_hub.py check the same contract end to end."""

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

from lora_dpo.cli import app

FUZZ = settings(max_examples=12, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
VALUES = st.one_of(st.integers(-10**9, 10**9), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                   st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3))
KEYS = ["lora.rank", "lora.alpha", "lora.target_modules", "data.resolution", "data.val_pairs", "data.ties",
        "objective.kind", "objective.beta", "train.batch_size", "train.learning_rate", "train.optimizer",
        "train.mixed_precision", "train.gradient_accumulation", "train.max_steps", "model.quantize"]


def _one_line_or_ok(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code:
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("lora-dpo: error: "), result.output


def _toml(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
    return json.dumps(value).replace("true", "true") if not isinstance(value, bool) else str(value).lower()


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(KEYS), VALUES, min_size=1, max_size=3))
def test_random_recipe_values_through_plan_and_train(changes: dict, tiny_recipe, tmp_path: Path) -> None:
    """Any value: planned, or refused by name. Train runs the same recipe only where the plan accepted it, for one
    step at the tiny size, so a valid random value cannot make a long run."""
    path = tmp_path / "r.toml"
    path.write_text(tiny_recipe().to_toml())
    sets = [f"--set={key}={_toml(value)}" for key, value in changes.items()]
    planned = CliRunner().invoke(app, ["plan", str(path), *sets])
    _one_line_or_ok(planned)
    small = all(not isinstance(v, int) or isinstance(v, bool) or abs(v) <= 64 for v in changes.values())
    if planned.exit_code == 0 and small:
        trained = CliRunner().invoke(app, ["train", str(path), *sets, "--set=train.max_steps=1",
                                           "--set=data.resolution=64", "--set=output.overwrite=true"])
        _one_line_or_ok(trained)


@FUZZ
@given(blob=st.binary(max_size=300), kind=st.sampled_from(["bytes", "no-lora", "header-only"]))
def test_random_files_through_inspect_export_and_eval(blob: bytes, kind: str, tmp_path: Path) -> None:
    path = tmp_path / "adapter.safetensors"
    if kind == "no-lora":
        save_file({"x": torch.zeros(2)}, path)
    elif kind == "header-only":
        header = json.dumps({"a.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
        path.write_bytes(len(header).to_bytes(8, "little") + header + blob[:8])
    else:
        path.write_bytes(blob)
    for args in (["inspect", str(path)], ["export", str(path), "--format", "kohya", "--out", str(tmp_path / "k")],
                 ["eval", str(path), "--prompts", str(tmp_path / "none.txt")]):
        _one_line_or_ok(CliRunner().invoke(app, args))


@pytest.mark.parametrize("text", ["[train\nmax_steps = 1", "[train]\nmax_steps = 'x'", "\x00\xff", "[[data]]\n"])
def test_broken_recipe_files_are_one_line(text: str, tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    for command in ("train", "plan"):
        result = CliRunner().invoke(app, [command, str(path)])
        _one_line_or_ok(result)
        assert result.exit_code == 2 and str(path) in result.output
