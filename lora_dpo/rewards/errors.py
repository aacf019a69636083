"""The rewards package's error. It is a `LoraDpoError`, so `lora-dpo label`, `pairs` and `eval` report it as one
line with exit code 2, and still a `ValueError`, as the scorers' errors always were, for callers that catch that."""

from __future__ import annotations

from lora_dpo.errors import LoraDpoError


class RewardError(LoraDpoError, ValueError):
    """A scorer that cannot be built or used, or labels that cannot be written: the message names the input."""
