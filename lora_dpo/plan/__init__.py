"""`lora-dpo plan` (being split into a package: this commit only moves the module, unchanged, to
`lora_dpo/plan/estimates.py`, so that its history follows)."""

from lora_dpo.plan.estimates import *  # noqa: F403
from lora_dpo.plan.estimates import _changes, _cuda_autocast_norms  # noqa: F401
