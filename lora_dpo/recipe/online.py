"""The `[online]` section: online (iterated, on-policy) Diffusion-DPO. Each round generates images with the adapter
being trained (the base itself in round 1), scores them, pairs them and trains `steps_per_round` optimizer steps on
those pairs; the reference stays the frozen base with the adapters off. `rounds = 0` (the default) is offline training
on `[data].source`.

The round's images are drawn at `[data].resolution`, in the training precision, and trained on as the latents the
pipeline made (never decoded and encoded again): `[data]`'s source, split, crop and flip keys are not read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from lora_dpo.recipe.fields import field_

if TYPE_CHECKING:
    from lora_dpo.recipe.schema import Recipe

PairRule = Literal["best_worst", "margin"]


@dataclass(frozen=True)
class OnlineRecipe:
    rounds: int = field_(
        0, "Rounds of online DPO: generate with the adapter being trained (the base in round 1), score, pair, train "
           "`steps_per_round` steps on the pairs. 0: offline, training on `[data].source`.", min=0, resume="free")
    steps_per_round: int = field_(
        100, "Optimizer steps each round trains on its own pairs; `[train].max_steps` must be `rounds` x this.",
        min=1)
    prompts: str | None = field_(
        None, "What each round draws images for: a text file (one prompt a line) or anything `lora-dpo eval "
              "--prompts` takes (`.csv`, `.jsonl`, `parti`, `hpsv2`, a hub dataset's captions).")
    heldout_prompts: str | None = field_(
        None, "Prompts never trained on, for each round's held-out score and win rate over the base (same form as "
              "`prompts`); unset: `heldout` prompts of `prompts` are held out (a draw by `[train].seed`).")
    heldout: int = field_(16, "Prompts of `prompts` held out when `heldout_prompts` is unset.", min=0)
    prompts_per_round: int | None = field_(
        None, "Training prompts a round draws images for (a new draw each round); unset: every training prompt.",
        min=1)
    samples_per_prompt: int = field_(4, "Images generated per prompt in a round; the pair rule pairs them.", min=2)
    scorers: tuple[str, ...] = field_(
        ("pickscore",), "Who judges the images: `KIND[@SOURCE][:WEIGHT]` as `lora-dpo label --scorer` takes them "
                        "(`pickscore`, `hps`, `clip`, `aesthetic@FILE`, `shapes`, `brightness`); several are mixed by "
                        "weight, each scaled by its own spread first.")
    pair_rule: PairRule = field_(
        "best_worst", "`best_worst`: one pair a prompt, its best image over its worst; `margin`: every two images of "
                      "a prompt whose scores differ by more than `margin`. Ties never make a pair.", resume="warn")
    margin: float = field_(0.0, "The score difference a pair must exceed with `pair_rule = \"margin\"` (in the "
                                "scorer's units; mixed scorers: in units of their spread).", min=0.0, resume="warn")
    min_pairs: int = field_(
        1, "Fewest pairs a round may train on; a round with fewer (its images all tied) stops the run, resumable.",
        min=1, resume="warn")
    steps: int = field_(30, "Inference steps per generated image (the base pipeline's own scheduler).", min=1)
    guidance_scale: float | None = field_(
        None, "Classifier-free guidance of the generated images; unset: the base pipeline's default.", min=0.0)
    heldout_seeds: int = field_(
        2, "Images per held-out prompt each round, adapter and base from the same seeds (0, 1, ...) every round.",
        min=1, resume="free")


def online_problems(recipe: Recipe) -> list[str]:
    """What an online recipe gets wrong across keys, before anything loads: each names the key and what to set."""
    cfg = recipe.online
    if not cfg.rounds:
        return []
    problems = []
    total = cfg.rounds * cfg.steps_per_round
    if recipe.train.max_steps != total:
        problems.append(f"[online].rounds {cfg.rounds} x steps_per_round {cfg.steps_per_round} = {total} training "
                        f"steps, but [train].max_steps = {recipe.train.max_steps}: set train.max_steps = {total}")
    if not cfg.prompts:
        problems.append("[online].prompts: an online run needs prompts to generate images for; give a text file "
                        "(one prompt a line) or a data set's captions")
    if not cfg.scorers:
        problems.append("[online].scorers: an online run needs a scorer to judge its images, e.g. [\"pickscore\"]")
    if cfg.heldout_prompts is None and cfg.heldout == 0:
        problems.append("[online].heldout = 0 and no heldout_prompts: each round is measured on prompts never "
                        "trained on; hold some out (heldout = 16) or give heldout_prompts")
    if recipe.data.cache:
        problems.append("[data].cache: an online run trains on the latents its rounds generate; unset the cache")
    return problems
