"""Online (iterated, on-policy) Diffusion-DPO's data, round by round: the `[online]` recipe's prompts, images drawn
by the model being trained, scored and paired, and each round measured on held-out prompts. The loop over rounds,
which trains on them, is `train.online`.

Modules, in import order:
* `rounds`: the prompts (training and held out), a round's seeds, generating its images kill-safe (a prompt at a
  time, latents kept), scoring and pairing them (`pairs.select_pairs`), its data set on disk, and `RoundPairs`,
  the pairs as the step's encoded items (the generated latents: never decoded and encoded again).
* `heldout`: a round measured on held-out prompts: adapter vs base from the same seeds, win rate and score
  difference with intervals per scorer, a base | adapter grid.
"""

from __future__ import annotations

from lora_dpo.online.heldout import measure_round, metrics_record, read_heldout
from lora_dpo.online.rounds import (
    ROUNDS_DIR,
    OnlineError,
    Prompts,
    RoundPairs,
    generate,
    loaded_scorers,
    make_round,
    read_round,
    round_dataset,
    round_folder,
    round_prompt_indices,
    round_seeds,
    split_prompts,
)

__all__ = ["ROUNDS_DIR", "OnlineError", "Prompts", "RoundPairs", "generate", "loaded_scorers", "make_round",
           "measure_round", "metrics_record", "read_heldout", "read_round", "round_dataset", "round_folder",
           "round_prompt_indices", "round_seeds", "split_prompts"]
