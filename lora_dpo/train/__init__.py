"""The training run, in three floors of its own: `build` checks the recipe's outputs and data, then builds the
parts in dependency order (a `Run`); `loop` only loops (`fit`); `run` is `train(recipe)`: build, fit, save.
`samples` makes the grids and the plot a run shows while it trains; `online` trains an `[online]` recipe round
after round (`fit_rounds`: generate, score, pair with `lora_dpo.online`, then `fit`). Import order: build, loop,
samples, online, run.

recipe -> data + base model -> policy and optimizer (`lora_dpo.step`) -> loop of `step.train_step` ->
checkpoints -> adapter file. Only the CLI imports this package.
"""

from lora_dpo.train.build import Run, setup
from lora_dpo.train.loop import fit, validate
from lora_dpo.train.run import train

__all__ = ["Run", "fit", "setup", "train", "validate"]
