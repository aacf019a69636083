import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_a_compiled_nf4_base_with_checkpointing_makes_its_graphs_in_the_first_step() -> None:
    """[train].compile with what the GPU recipes set on top (8-bit AdamW, bf16) and the 4-bit NF4 base (bitsandbytes'
    Linear4bit inside the compiled blocks) with gradient checkpointing (the blocks run inside torch.utils.checkpoint):
    it trains, in three graphs made by the first step (the reference's, the policy's, its first block's) and none
    after."""
    recipe = _recipe(compile=True, gradient_checkpointing=True, optimizer="adamw8bit")
    cases = bench.make_cases(_with_nf4(recipe), [64], [])
    (result,) = bench.run_bench("tiny", cases, steps=2, warmup=1)["results"]
    assert result["status"] == "ok" and math.isfinite(result["loss"]) and result["optimizer"] == "AdamW8bit"
    assert (result["graphs"], result["recompiles"]) == (3, 0)
    assert result["first_step_seconds"] > result["seconds_per_step"]  # the compile is paid in the first step


def _with_nf4(recipe):
    raw = recipe.to_dict()
    raw["model"]["quantize"] = "nf4"
    return from_dict(raw)


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


@pytest.mark.parametrize("arch", ["sd3", "flux", "flux2"])
def test_live_encoding_of_a_t5_or_qwen_family_is_one_line_before_anything_builds(arch: str) -> None:
    """The benchmark builds random CLIP encoders only: a family with T5 or Qwen is refused at once, before its
    (billions of parameters) transformer is built."""
    result = subprocess.run([sys.executable, "-m", "lora_dpo", "bench", "--arch", arch, "--compare",
                             "encode=cache,live"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert re.fullmatch(r"lora-dpo: error: --compare encode=live on .*: its text encoders are not CLIP .*\n",
                        result.stderr)


def test_bench_measures_a_recipes_own_model(tiny_recipe) -> None:
    recipe = tiny_recipe(train={"num_threads": 1, "batch_size": 2})
    report = bench.run_bench("recipe", bench.make_cases(recipe, bench.default_resolutions("recipe", recipe), []),
                             steps=1, warmup=0)
    (result,) = report["results"]
    assert report["settings"]["model"] == recipe.model.base and result["resolution"] == recipe.data.resolution
    assert result["status"] == "ok" and result["pairs_per_second"] == pytest.approx(2 / result["seconds_per_step"])


def test_unknown_architecture_is_a_user_error() -> None:
    with pytest.raises(RecipeError, match="--arch 'sdxl3': choose from tiny, sdxl, sd3, flux2, flux, sd15, recipe"):
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


def test_data_only_shapes_of_a_hub_id_come_from_its_family_or_refuse(tiny_sd3_base_dir: Path) -> None:
    """`text_shapes` (what `bench --data-only` fills its latent cache with): a local flow base's own widths; a hub
    id that is not cached here (the tests run offline) takes the shapes of the family its name says, and one that
    names none is a one-line error naming [model].base instead of SDXL's shapes."""
    from typer.testing import CliRunner

    from lora_dpo.cache import text_shapes
    from lora_dpo.cli import app
    from lora_dpo.models import ModelError
    from lora_dpo.recipe import ModelRecipe

    assert text_shapes(ModelRecipe(base=str(tiny_sd3_base_dir))) == (333, 64, 64)
    assert text_shapes(ModelRecipe(base="someone/my-flux1-finetune")) == (512, 4096, 768)
    assert text_shapes(ModelRecipe(base="black-forest-labs/FLUX.1-schnell")) == (512, 4096, 768)
    assert text_shapes(ModelRecipe(base="someone/stable-diffusion-3-5-large-tuned")) == (333, 4096, 2048)
    with pytest.raises(ModelError, match=r"^\[model\]\.base = 'someone/finetune': its family .* not known here.*"
                                         r"pass a local diffusers folder or a known hub id"):
        text_shapes(ModelRecipe(base="someone/finetune"))
    result = CliRunner().invoke(app, ["bench", "--data-only", "--pairs", "4", "--set", "model.base=someone/finetune"])
    assert result.exit_code != 0 and "[model].base = 'someone/finetune'" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output


STATUS = re.compile(r"^(ok|pass|out of memory|fail: .+|error: \w+.*)$")


def test_gpu_suite_runs_its_plumbing_on_the_cpu(tmp_path: Path) -> None:
    """`lora-dpo bench --suite gpu` without CUDA: the same items on the tiny base, in its own process. Every item
    is in the JSON with a status (an item that fails here, e.g. fp16 on the CPU, says why and the others run), the
    steps ask for bf16 and 8-bit AdamW through the recipe, the plan's prediction stands beside each step, and the
    measured peaks read n/a (CPU) in the Markdown table."""
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, "-m", "lora_dpo", "bench", "--suite", "gpu", "--out", str(out), "--steps", "1",
         "--warmup", "0", "--set", "train.num_threads=1"],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    items = {item["item"].split(" ")[0]: item for item in report["items"]}
    assert list(items) == ["a1", "a2", "c", "d", "e", "f", "g"] and report["suite"] == "gpu"
    assert all(STATUS.match(item["status"]) for item in items.values()), [i["status"] for i in items.values()]
    assert report["settings"]["arch"] == "tiny" and report["settings"]["resolution"] == 64
    for name, checkpointing in (("a1", False), ("a2", True)):
        step = items[name]
        assert step["status"] == "ok" and step["precision"] == "bf16" and step["checkpointing"] is checkpointing
        assert step["optimizer"] and step["seconds_per_step"] > 0 and 0 < step["overhead"] < 50
        assert step["planned_allocated_gib"] > 0 and step["peak_allocated_gib"] is None  # the CPU has no stats
    assert items["a2"]["planned_allocated_gib"] < items["a1"]["planned_allocated_gib"]  # checkpointing saves memory
    assert all(items[name]["optimizer"] == "AdamW8bit" for name in ("a1", "a2", "c", "e", "f", "g"))  # never swapped
    assert items["c"]["status"] == "pass" and items["e"]["status"] == "ok" and items["f"]["status"] == "pass"
    assert "deterministic off: bit-identical; deterministic on: bit-identical" in items["f"]["notes"]
    assert '[train].mixed_precision = "fp16"' in items["d"]["status"]  # refused by name on the CPU, not faked
    # g: [train].compile off and on, timed in one process; no graph after the first step
    compiled = items["g"]
    assert compiled["status"] == "ok" and compiled["recompiles"] == 0 and compiled["seconds_per_step"] > 0
    assert "3 graphs" in compiled["notes"] and "eager " in compiled["notes"] and "compile " in compiled["notes"]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| item | status |") and len(rows) == 8, result.stdout
    assert "n/a (CPU)" in rows[1]
    assert all(item["status"] in row for item, row in zip(report["items"], rows[1:], strict=True))
    assert f"wrote {out}" in result.stdout


def test_gpu_suite_resume_check_is_bit_exact() -> None:
    """Item c, in process: two steps, a checkpoint through lora_dpo.checkpoint, a fresh optimizer restored from it;
    one more step from both leaves the same adapter, bit for bit."""
    from lora_dpo import gpu_check

    sdxl = gpu_check.suite_recipe(_recipe(), "sdxl", 1024)  # what a GPU runs: the plan reads SDXL's shipped configs
    assert (sdxl.model.base, sdxl.data.resolution) == ("stabilityai/stable-diffusion-xl-base-1.0", 1024)
    recipe = gpu_check.suite_recipe(_recipe(), "tiny", 64)
    assert (recipe.train.optimizer, recipe.train.mixed_precision) == ("adamw8bit", "bf16")
    suite = gpu_check.Suite("tiny", recipe, 64, steps=1, warmup=0)
    check = gpu_check._run(suite, "c", gpu_check.check_resume, torch.device("cpu"))
    assert (check.status, check.bit_identical) == ("pass", True), check
    assert math.isfinite(check.loss) and check.precision == "bf16"


def test_gpu_suite_options_are_checked() -> None:
    from typer.testing import CliRunner

    from lora_dpo.cli import app

    runner = CliRunner()
    for args, message in ((["--suite", "cpu"], "the one suite is `gpu`"),
                          (["--suite", "gpu", "--compare", "rank=4"], "--compare goes with the plain bench"),
                          (["--suite", "gpu", "--arch", "recipe"], "choose from sdxl, sd3, flux2, flux, sd15, tiny"),
                          (["--suite", "gpu", "--json", "x.json"], "--out")):
        result = runner.invoke(app, ["bench", *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)


def test_gpu_suite_table_on_cuda_shows_measured_beside_planned() -> None:
    """The table as a GPU run prints it (no GPU here: a report as run_suite returns one on CUDA)."""
    import dataclasses

    from lora_dpo import gpu_check

    step = gpu_check.Check("a1 x", "ok", "AdamW8bit", "bf16", False, 0.25, 0.2, 1.25, 21.0, 23.0, 19.6, 21.56,
                           21.0 / 19.6, 23.0 / 21.56, loss=0.69, seconds=20.0)
    fp16 = gpu_check.Check("d x", "ok", "AdamW8bit", "fp16", True, 0.3, 0.25, 1.2, 8.0, 9.0, loss=0.7,
                           loss_scale=32768.0, seconds=15.0)
    report = {"settings": {"model": "sdxl (random weights)", "resolution": 1024, "pairs_per_micro_batch": 1,
                           "lora_rank": 8, "warmup": 2, "steps": 5},
              "machine": {"device": "cuda", "name": "NVIDIA H100", "memory_gib": 80.0, "torch_threads": 16},
              "items": [dataclasses.asdict(step), dataclasses.asdict(fp16)], "seconds": 200.0}
    table = gpu_check.format_suite(report)
    row = next(line for line in table.splitlines() if line.startswith("| a1"))
    assert "| 21 | 19.6 | 1.071 | 23 | 21.6 | 1.067 |" in row and "n/a" not in table
    assert "loss scale 32768" in table and "2 of 2 items ok" in table


def test_threads_default_to_one_on_the_cpu_and_follow_the_option() -> None:
    """The README's CPU table is reproducible with the command beside it: one thread unless told otherwise."""
    from lora_dpo.cli.training import _bench_threads

    assert _bench_threads(_recipe(num_threads=None), None).train.num_threads == 1
    assert _bench_threads(_recipe(num_threads=None), 2).train.num_threads == 2
    assert _bench_threads(_recipe(num_threads=3), None).train.num_threads == 3
