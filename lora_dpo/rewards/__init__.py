"""AI-feedback reward models: score images with a reward model, and relabel preference pairs with those scores
instead of people.

The modules, each importing only those above it:

* `errors`: `RewardError`, the one error this package raises (a `LoraDpoError`).
* `scorers`: the reward models (`ClipScorer` for PickScore, HPS v2 and CLIP score; `AestheticScorer` with its
  `AestheticMLP` head; `ShapesScorer`, the offline demo's pixel judge), their score conventions, and the
  `KIND[@SOURCE][:WEIGHT]` specs that build them (`parse_scorer_spec`, `build_scorer`, `build_scorers`).
* `labelling`: the rule that turns one or several scores into a label (`preference_probability`) and
  `label_pairs`, which relabels a pair set with scorers into resumable Pick-a-Pic-layout parquet.
* `relabel`: `relabel_source` (the `lora-dpo label` command): the rows of a `[data].source` that training would use
  (the data package's ties policy, filters and unusable-row rule, counted in `PairStats`) through `label_pairs`.
"""

from __future__ import annotations

from lora_dpo.rewards.errors import RewardError
from lora_dpo.rewards.labelling import (
    TIE_LABEL,
    LabelSummary,
    PairRow,
    label_pairs,
    labelled_ids,
    preference_probability,
)
from lora_dpo.rewards.relabel import TIES_CHOICES, RelabelSummary, relabel_source, usable_rows
from lora_dpo.rewards.scorers import (
    DEFAULT_SOURCES,
    SCORER_KINDS,
    UNITS,
    AestheticMLP,
    AestheticScorer,
    ClipScorer,
    Scorer,
    ShapesScorer,
    build_scorer,
    build_scorers,
    parse_scorer_spec,
    resolve_weights_file,
)

__all__ = [
    "DEFAULT_SOURCES",
    "SCORER_KINDS",
    "TIES_CHOICES",
    "TIE_LABEL",
    "UNITS",
    "AestheticMLP",
    "AestheticScorer",
    "ClipScorer",
    "LabelSummary",
    "PairRow",
    "RelabelSummary",
    "RewardError",
    "Scorer",
    "ShapesScorer",
    "build_scorer",
    "build_scorers",
    "label_pairs",
    "labelled_ids",
    "parse_scorer_spec",
    "preference_probability",
    "relabel_source",
    "resolve_weights_file",
    "usable_rows",
]
