"""The evaluation's error. It is a `LoraDpoError`, so the CLI reports it like every other problem a user can
cause, and still a `ValueError`, as it always was, for callers that catch that."""

from __future__ import annotations

from lora_dpo.errors import LoraDpoError


class EvalError(LoraDpoError, ValueError):
    """An evaluation that cannot run: the message names the input and says what to do."""
