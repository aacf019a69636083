"""The recipe: one typed, frozen tree of settings loaded from TOML, the single source of truth.

- `fields`: what a section's keys are made of (`field_`, help text and resume rule) and `RecipeError`
- `online`: the `[online]` section (rounds of generate, score, pair, train) and its cross-key checks
- `schema`: the sections and keys (type, default, help), `Recipe` and its TOML form and fingerprint
- `aliases`: other tools' names for recipe keys (diffusers' Diffusion-DPO flags, sd-scripts' keys)
- `parse`: TOML and `--set` overrides checked against the schema, every problem reported at once; `describe()`
  for the generated reference
"""

from lora_dpo.recipe.fields import RecipeError
from lora_dpo.recipe.online import OnlineRecipe
from lora_dpo.recipe.parse import describe, from_dict, load, parse_override
from lora_dpo.recipe.schema import (
    ALL_TRACKERS,
    COLUMN_NAMES,
    SECTIONS,
    TRACKERS,
    ColumnMap,
    DataRecipe,
    LoraRecipe,
    ModelRecipe,
    ObjectiveKind,
    ObjectiveRecipe,
    OutputRecipe,
    Precision,
    Recipe,
    SampleRecipe,
    TrainRecipe,
    resume_rule,
    warmup_problem,
)

__all__ = ["ALL_TRACKERS", "COLUMN_NAMES", "SECTIONS", "TRACKERS", "ColumnMap", "DataRecipe",
           "LoraRecipe", "ModelRecipe", "ObjectiveKind", "ObjectiveRecipe", "OnlineRecipe", "OutputRecipe",
           "Precision", "Recipe",
           "RecipeError", "SampleRecipe", "TrainRecipe", "describe", "from_dict", "load", "parse_override",
           "resume_rule", "warmup_problem"]
