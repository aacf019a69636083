"""AI-feedback reward models: score images with a reward model, and relabel preference pairs with those scores
instead of people.

The modules:

* `scorers`: the reward models (`ClipScorer` for PickScore, HPS v2 and CLIP score; `AestheticScorer` with its
  `AestheticMLP` head; `ShapesScorer`, the offline demo's pixel judge), their score conventions, and the
  `KIND[@SOURCE][:WEIGHT]` specs that build them (`parse_scorer_spec`, `build_scorer`, `build_scorers`).
* `labelling`: the rule that turns one or several scores into a label (`preference_probability`) and
  `label_pairs`, which relabels a pair set with scorers into resumable Pick-a-Pic-layout parquet.
"""

from __future__ import annotations

from lora_dpo.rewards.labelling import TIE_LABEL, LabelSummary, PairRow, label_pairs, preference_probability
from lora_dpo.rewards.scorers import (
    DEFAULT_SOURCES,
    SCORER_KINDS,
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
    "TIE_LABEL",
    "AestheticMLP",
    "AestheticScorer",
    "ClipScorer",
    "LabelSummary",
    "PairRow",
    "Scorer",
    "ShapesScorer",
    "build_scorer",
    "build_scorers",
    "label_pairs",
    "parse_scorer_spec",
    "preference_probability",
    "resolve_weights_file",
]
