"""What every command shares: the typer app, `--set`, quiet imports, the one-line failure, `--resume` alone."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import typer

from lora_dpo.errors import LoraDpoError  # every problem a user can cause or meet: one line, exit code 2

if TYPE_CHECKING:
    pass

# rich_markup_mode=None: help text is shown as written; rich markup would eat every `[word]` (`KIND[@SOURCE]`,
# `[data].cache`) as a style tag. `-h` beside `--help`: click's contexts hand `help_option_names` down, so every
# command takes both.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Align text-to-image diffusion models to human preferences with LoRA + Diffusion-DPO.")

SetOption = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: section.key=value; "
                                                         "section.key=none unsets an optional one.")]


def _quiet_imports() -> None:
    """The stack logs noise on CPU-only installs (bitsandbytes' missing kernels, transformers' torchvision)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # On import, bitsandbytes asks `kernels` (a transformers dependency since 5.25) for a hub CPU kernel; offline,
    # `kernels` warns that it skips its trust check, and bitsandbytes falls back to its own kernel either way
    logging.getLogger("kernels").setLevel(logging.ERROR)
    import torch

    if not torch.cuda.is_available():  # DeepSpeed, when installed, warns on import that it picked the CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import transformers

    transformers.logging.set_verbosity_error()
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _version(value: bool) -> None:
    if value:
        from lora_dpo import __version__

        typer.echo(f"lora-dpo {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                   help="Print the version and exit.")] = False) -> None:
    """Align text-to-image diffusion models to human preferences with LoRA + Diffusion-DPO."""


def _fail(message: str) -> None:
    typer.echo(f"lora-dpo: error: {message}", err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Inside it, a `LoraDpoError` becomes the one-line failure (`_fail`, exit code 2), never a traceback."""
    try:
        yield
    except LoraDpoError as err:
        _fail(str(err))


def bare_resume(args: list[str]) -> list[str]:
    """`--resume` with no value means `--resume latest` (typer's options cannot make their value optional)."""
    out = []
    for index, arg in enumerate(args):
        out.append(arg)
        if arg == "--resume" and (index + 1 == len(args) or args[index + 1].startswith("-")):
            out.append("latest")
    return out


def run() -> None:
    sys.argv[1:] = bare_resume(sys.argv[1:])
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)

