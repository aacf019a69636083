import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_dpo import bench
from lora_dpo.recipe import RecipeError, from_dict

ROOT = Path(__file__).parent.parent


def _recipe(**train):
    return from_dict({"train": {"num_threads": 1, **train}})


def test_bench_times_the_training_step_for_every_compared_setting() -> None:
    """The tiny architecture, three settings beside the baseline; each row is a real measured run."""
    compare = bench.parse_compare(["checkpointing=true", "rank=4", "encode=live"])
    cases = bench.make_cases(_recipe(), [64], compare)
    assert [c.label for c in cases] == ["baseline", "train.gradient_checkpointing=true", "lora.rank=4", "encode=live"]
    report = bench.run_bench("tiny", cases, steps=2, warmup=1)
    results = {r["case"]: r for r in report["results"]}
    for r in results.values():
        assert r["status"] == "ok" and r["resolution"] == 64
        assert r["seconds_per_step"] > 0 and r["bare_seconds"] > 0 and math.isfinite(r["loss"])
        assert r["pairs_per_second"] == pytest.approx(1 / r["seconds_per_step"])
        assert 0 < r["overhead"] < 50 and r["overhead"] == pytest.approx(r["seconds_per_step"] / r["bare_seconds"])
        assert r["peak_allocated_gib"] is None  # no allocator statistics on the CPU
    # the case's recipe is what was built: half the rank, half the adapter parameters
    assert results["lora.rank=4"]["trainable_params"] * 2 == results["baseline"]["trainable_params"]
    assert report["machine"]["device"] == "cpu" and report["settings"]["precision"] == "bf16"  # the recipe's own
    table = bench.format_report(report)
    assert "overhead" in table and all(label in table for label in results)


def test_nf4_base_runs_the_same_step() -> None:
    """bitsandbytes quantises on the CPU too (0.50): the 4-bit base trains its adapter through the same step."""
    cases = bench.make_cases(_recipe(), [64], bench.parse_compare(["quantize=nf4"]))
    results = bench.run_bench("tiny", cases, steps=1, warmup=1)["results"]
    assert [r["status"] for r in results] == ["ok", "ok"]
    assert results[1]["trainable_params"] == results[0]["trainable_params"] and math.isfinite(results[1]["loss"])


@pytest.mark.parametrize(("spec", "message"), [
    ("speed=1", "neither a recipe key"),
    ("rank=0", "[lora].rank = 0 must be >= 1"),
    ("sdpa=fastest", "choose from auto, math"),
    ("train.mixed_precision=fp16,bf16", "one precision per run"),
    ("checkpointing", "expected KEY=V1,V2"),
    ("max_memory_gb=0", "positive number"),
])
def test_compare_specs_are_checked_before_any_model_is_built(spec: str, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        bench.make_cases(_recipe(), [64], bench.parse_compare([spec]))
    assert message in str(err.value)


def test_cli_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "lora_dpo", "bench", "--arch", "tiny", "--steps", "1", "--warmup", "0",
         "--max-memory-gb", "24", "--set", "train.num_threads=1", "--json", str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no effect on the CPU" in result.stderr  # a setting that does nothing here says so
    row = next(line for line in result.stdout.splitlines() if line.startswith("baseline"))
    report = json.loads(out.read_text())
    overhead = report["results"][0]["overhead"]
    assert f"{overhead:.3f}" in row and overhead > 0


def test_bench_measures_a_recipes_own_model(tiny_recipe) -> None:
    recipe = tiny_recipe(train={"num_threads": 1, "batch_size": 2})
    report = bench.run_bench("recipe", bench.make_cases(recipe, bench.default_resolutions("recipe", recipe), []),
                             steps=1, warmup=0)
    (result,) = report["results"]
    assert report["settings"]["model"] == recipe.model.base and result["resolution"] == recipe.data.resolution
    assert result["status"] == "ok" and result["pairs_per_second"] == pytest.approx(2 / result["seconds_per_step"])


def test_unknown_architecture_is_a_user_error() -> None:
    with pytest.raises(RecipeError, match="--arch 'sdxl3': choose from tiny, sdxl, sd15, recipe"):
        bench.run_bench("sdxl3", bench.make_cases(_recipe(), [64], []))


def test_data_only_mode_prints_pairs_per_second_of_each_path(tiny_base_dir: Path) -> None:
    """`lora-dpo bench --data-only`: parquet, JSONL images and the latent cache through the real loaders."""
    import re

    from typer.testing import CliRunner

    from lora_dpo.cli import app

    result = CliRunner().invoke(app, ["bench", "--data-only", "--pairs", "4", "--set", "data.resolution=64",
                                      "--set", f"model.base={tiny_base_dir}", "--set", "train.batch_size=2"])
    assert result.exit_code == 0, result.output
    rows = re.findall(r"^(\S.*?)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", result.output, re.M)
    assert len(rows) >= 3 and all(float(row[-1]) > 0 for row in rows), result.output
    assert {"parquet", "cache"} <= {word for row in rows for word in row[0].lower().split()}, rows
