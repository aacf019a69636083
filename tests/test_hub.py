"""Offline, anything that needs the hub says so in one line within seconds, with exit code 2: never a minute of
retries and a traceback. The suite runs offline (HF_HUB_OFFLINE=1, set in conftest), as a user without network."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_dpo", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("args", [
    ("train", "{recipe}"),
    ("plan", "{recipe}"),
    ("inspect", "someone/some-adapter"),
    ("export", "someone/some-adapter", "--format", "kohya", "--out", "x.safetensors"),
    ("label", "{data}", "--scorer", "clip", "--out", "labelled.parquet"),
    ("eval", "someone/some-adapter", "--prompts", "{data}", "--scorer", "pickscore"),
    ("merge", "someone/some-adapter", "--base", "someone/some-sdxl-finetune", "--out", "merged"),
    ("pairs", "{data}", "--base", "someone/some-sdxl-finetune", "--scorer", "shapes", "--out", "pairs.parquet"),
    ("push", "{run}", "someone/some-adapter"),
])
def test_a_hub_id_offline_is_one_line_and_exit_2(args: tuple[str, ...], tmp_path: Path, shapes_jsonl: Path) -> None:
    recipe = tmp_path / "hub.toml"
    recipe.write_text('[model]\nbase = "someone/some-sdxl-finetune"\n[data]\nsource = "synthetic:shapes"\n'
                      f'resolution = 64\n[output]\ndir = "{tmp_path}"\n')
    run = tmp_path / "run"  # what push checks before it asks the hub: a run folder with its adapter file
    run.mkdir()
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"")
    result = _cli(*(a.format(recipe=recipe, data=shapes_jsonl, run=run) for a in args), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    # the first hub id the command needs (the adapter, the base or a scorer's weights), named in one line
    assert re.match(r"lora-dpo: error: [\w.-]+/[\w.-]+: .+ (comes from|goes to) the Hugging Face hub, which is "
                    r"offline here", lines[0]), lines[0]


def test_offline_failure_takes_no_retries() -> None:
    """In process (no import cost): a hub adapter id offline fails at once, not after the client's retries."""
    from lora_dpo import export, hub

    started = time.monotonic()
    with pytest.raises(hub.HubUnavailableError, match="someone/some-adapter: the adapter comes from the Hugging"):
        export.resolve_adapter_file("someone/some-adapter")
    assert time.monotonic() - started < 2.0
