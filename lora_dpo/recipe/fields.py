"""What every recipe section is made of: `field_` (a dataclass field whose help text travels with it) and
`RecipeError`. A module of its own so that sections defined outside `schema` (`online`) use them too."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from lora_dpo.errors import LoraDpoError


class RecipeError(LoraDpoError, ValueError):
    """A recipe that cannot be used; the message names the file and every offending key."""


def field_(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text travels with it (read by `describe` and the CLI). `resume`: what a
    `--resume` may do with it (`schema.RESUME_RULES`; "same" unless given)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults: recipes are frozen")
    return field(default=default, metadata={"help": help, **kwargs})
