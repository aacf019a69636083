"""The README's demo, as a user runs it (`lora-dpo train recipes/tiny.toml`, then `lora-dpo eval` with the built-in
pixel judge): one run shared by the tests of this file, which `make test` gives to one pytest-xdist worker."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_dpo.export import ADAPTER_FILE


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The README's demo, run once as a user runs it (`lora-dpo train recipes/tiny.toml`, in a subprocess), but for
    50 of its 600 steps (held-out accuracy 0.95 at step 50; docs/demo.md), with a sample grid at step 25: it copies
    the shipped tiny base into this session's LORA_DPO_HOME. Returns the run folder and what the run printed."""
    out = tmp_path_factory.mktemp("demo")
    root = Path(__file__).parent.parent
    result = subprocess.run([sys.executable, "-m", "lora_dpo", "train", str(root / "recipes" / "tiny.toml"), "--set",
                             f"output.dir={out}", "--set", "train.max_steps=50", "--set", "sample.every=25"], cwd=root,
                            capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return out / "tiny", result.stderr + "\n" + result.stdout  # log lines and the bar, then the final lines


def test_tiny_demo_learns_the_held_out_preference(demo_run: tuple[Path, str]) -> None:
    """The README's demo, as a user runs it: the built-in tiny base, the generated shapes set, CPU only."""
    run_dir, printed = demo_run
    assert (run_dir / ADAPTER_FILE).is_file() and (run_dir / "recipe.toml").is_file()
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [h["val_reward_accuracy"] for h in history if "val_reward_accuracy" in h]
    assert val[-1] >= 0.65, val  # from 0.5 (every pair a tie) before training
    # log lines stand on lines of their own, never inside the progress bar (tqdm redraws it with carriage returns)
    lines = printed.replace("\r", "\n").splitlines()
    samples = [line for line in lines if "samples:" in line]
    assert len(samples) == 2 and all(line.startswith("lora-dpo: samples: ") for line in samples), samples
    assert any(line.startswith("lora-dpo: done in") and "held-out reward accuracy" in line for line in lines)


def test_eval_of_the_demo_adapter_with_the_built_in_shapes_scorer_reports_a_win_rate(demo_run: tuple[Path, str],
                                                                                     tmp_path: Path) -> None:
    """`lora-dpo eval adapters/tiny --scorer shapes` offline: the demo's generating base, its trained adapter and the
    pixel judge give a real win rate with its bootstrap interval (few prompts, seeds and steps: the mechanics and
    the report, not the number, which docs/demo.md records at full size)."""
    from typer.testing import CliRunner

    from lora_dpo.cli import app

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na yellow triangle\n")
    args = ["eval", str(demo_run[0]), "--prompts", str(prompts), "--scorer", "shapes", "--seed", "0,1", "--steps", "8",
            "--threads", "1", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)

    assert result.exit_code == 0, result.output[-2000:]
    assert "shapes, adapter x1: wins" in result.stdout and "3 prompts are too few to trust an interval" in result.stdout
    assert "shapes: the demo's pixel judge" in result.stdout  # what the scorer's scale means
    summary = json.loads((tmp_path / "out" / "report.json").read_text())["summary"]["shapes"]["1"]
    assert summary["n"] == 6 and summary["low"] <= summary["rate"] <= summary["high"]
    assert summary["mean_base"] != summary["mean_adapter"]  # the adapter changed what the base draws
