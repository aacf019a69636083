"""The command line's own surface: every command's `--help` renders and shows each option's help text as written
(no bracketed word such as `KIND[@SOURCE][:WEIGHT]` or `[data].cache` eaten as markup), `-h` wherever `--help`
works, and `--version`."""

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from lora_dpo import __version__
from lora_dpo.cli import app

ROOT = Path(__file__).parent.parent
COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
BRACKETED = re.compile(r"\S*\[[^\]]*\]\S*")  # a word holding a bracketed part, e.g. KIND[@SOURCE][:WEIGHT],


def test_every_command_is_checked() -> None:
    assert {"train", "label", "eval", "cache", "export", "inspect", "recipe-doc"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_keeps_every_bracketed_word_of_every_option(name: str) -> None:
    result = CliRunner().invoke(app, [name, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    shown = " ".join(result.output.split())  # wrapping moves words to new lines; it never splits one
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    texts = [param.help or "" for param in command.params if isinstance(param, (click.Option, click.Argument))
             and hasattr(param, "help")]
    words = [word for text in texts for word in BRACKETED.findall(" ".join(text.split()))]
    missing = [word for word in words if word not in shown]
    assert not missing, f"`lora-dpo {name} --help` lost {missing}"


def test_the_bracketed_words_users_reported_are_shown() -> None:
    label = " ".join(CliRunner().invoke(app, ["label", "--help"], terminal_width=100).output.split())
    cache = " ".join(CliRunner().invoke(app, ["cache", "--help"], terminal_width=100).output.split())
    assert "KIND[@SOURCE][:WEIGHT]" in label
    assert "its [model] and [data] say what to encode" in cache and "[data].cache" in cache


@pytest.mark.parametrize("name", [None, *COMMANDS])
def test_dash_h_is_help_for_the_app_and_every_command(name: str | None) -> None:
    args = [name] if name else []
    long = CliRunner().invoke(app, [*args, "--help"], terminal_width=100)
    short = CliRunner().invoke(app, [*args, "-h"], terminal_width=100)
    assert long.exit_code == 0 and short.exit_code == 0, short.output
    assert short.output == long.output and "-h, --help" in short.output


def test_dash_h_as_a_user_types_it() -> None:
    """Through the installed entry point's code (`python -m lora_dpo`, which runs `main`), after an option that
    takes a value too: `--resume -h` must still be help, not a checkpoint called `-h`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for args in (["-h"], ["train", "-h"], ["train", "recipe.toml", "--resume", "-h"]):
        result = subprocess.run([sys.executable, "-m", "lora_dpo", *args], capture_output=True, text=True, env=env,
                                cwd=ROOT, timeout=120)
        assert result.returncode == 0 and "Usage:" in result.stdout and "-h, --help" in result.stdout, result.stderr


def test_a_flag_of_another_tool_in_a_recipe_is_answered_with_its_recipe_key(tmp_path: Path) -> None:
    """As a user coming from diffusers' Diffusion-DPO script meets it: one line, exit code 2, the key to write."""
    path = tmp_path / "r.toml"
    path.write_text("[train]\nmax_train_steps = 10\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "lora_dpo", "train", str(path)], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and result.stderr == (
        f"lora-dpo: error: {path}: unknown key [train].max_train_steps; `max_train_steps` is `[train].max_steps` "
        "here\n")


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"lora-dpo {__version__}"
