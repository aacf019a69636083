"""Sample grids and the training plot, made while training (moving here from lora_dpo.evaluate)."""

from lora_dpo.evaluate import TrainingSampler, default_sample_prompts, plot_training

__all__ = ["TrainingSampler", "default_sample_prompts", "plot_training"]
