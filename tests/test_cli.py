"""The command line's own surface: every command's `--help` renders and shows each option's help text as written
(no bracketed word such as `KIND[@SOURCE][:WEIGHT]` or `[data].cache` eaten as markup), and `--version`."""

import re

import click
import pytest
import typer
from typer.testing import CliRunner

from lora_dpo import __version__
from lora_dpo.cli import app

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


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"lora-dpo {__version__}"
