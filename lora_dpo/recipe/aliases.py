"""Other tools' names for what recipe keys do: the flags of diffusers' Diffusion-DPO examples
(`examples/research_projects/diffusion_dpo/train_diffusion_dpo_sdxl.py` and its SD 1.5 sibling) and of its SD3 /
FLUX LoRA examples (`examples/dreambooth/train_dreambooth_lora_sd3.py`, `..._flux.py`: the flow keys), and
sd-scripts' common keys (its `--config_file` TOML takes the same names). A recipe key written under such a name, in
any section or none, is answered with the key that does its job here ("`max_train_steps` is `[train].max_steps`
here") instead of a nearest-spelling guess (`max_bad_steps`). `lora-dpo recipe-doc --other-tools` prints the table.
"""

from __future__ import annotations

DIFFUSERS = "diffusers"  # the Diffusion-DPO example scripts' argparse flags
SD_SCRIPTS = "sd-scripts"  # kohya-ss/sd-scripts' train_network.py / library/train_util.py arguments
BOTH = (DIFFUSERS, SD_SCRIPTS)

# their name -> (what does it here: `[section].key`, `[section].key = value` or a command; the tools that use the
# name; a note, or ""). Every `[section].key` (and value) is checked against the schema by tests/test_recipe.py.
OTHER_TOOLS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "pretrained_model_name_or_path": ("[model].base", BOTH, ""),
    "revision": ("[model].revision", (DIFFUSERS,), ""),
    "variant": ("[model].variant", (DIFFUSERS,), ""),
    "pretrained_vae_model_name_or_path": ("[model].vae", (DIFFUSERS,), ""),
    "vae": ("[model].vae", (SD_SCRIPTS,), ""),
    "no_half_vae": ('[model].vae_dtype = "no"', (SD_SCRIPTS,), "the default: the VAE stays in fp32"),
    "zero_terminal_snr": ("[model].rescale_betas_zero_snr = true", (SD_SCRIPTS,), ""),
    "weighting_scheme": ("[model].timestep_sampling", (DIFFUSERS,),
                         "flow bases; the SD3 / FLUX LoRA examples' flag: logit_normal, mode, uniform (`none`)"),
    "logit_mean": ("[model].logit_mean", (DIFFUSERS,), "flow bases, the SD3 / FLUX LoRA examples' flag"),
    "logit_std": ("[model].logit_std", (DIFFUSERS,), "flow bases, the SD3 / FLUX LoRA examples' flag"),
    "mode_scale": ("[model].mode_scale", (DIFFUSERS,), "flow bases, the SD3 / FLUX LoRA examples' flag"),
    "guidance_scale": ("[model].guidance", BOTH, "FLUX.1 dev's guidance embedding while training (the FLUX training "
                       "scripts' flag); the samples' guidance is [sample].guidance_scale"),
    "discrete_flow_shift": ("[model].shift", (SD_SCRIPTS,), "flow bases: a static timestep shift"),
    "rank": ("[lora].rank", (DIFFUSERS,), ""),
    "network_dim": ("[lora].rank", (SD_SCRIPTS,), ""),
    "network_alpha": ("[lora].alpha", (SD_SCRIPTS,), ""),
    "network_dropout": ("[lora].dropout", (SD_SCRIPTS,), ""),
    "dataset_name": ("[data].source", (DIFFUSERS,), ""),
    "train_data_dir": ("[data].source", (SD_SCRIPTS,), "a folder of `w/` and `l/` images is sd-scripts' DPO layout"),
    "dataset_split_name": ("[data].split", (DIFFUSERS,), ""),
    "max_train_samples": ("[data].max_pairs", (DIFFUSERS,), ""),
    "resolution": ("[data].resolution", BOTH, ""),
    "random_crop": ('[data].crop = "random"', BOTH, ""),
    "no_hflip": ("[data].random_flip = false", (DIFFUSERS,), ""),
    "flip_aug": ("[data].random_flip = true", (SD_SCRIPTS,), ""),
    "caption_dropout_rate": ("[data].caption_dropout", (SD_SCRIPTS,), ""),
    "dataloader_num_workers": ("[data].num_workers", (DIFFUSERS,), ""),
    "max_data_loader_n_workers": ("[data].num_workers", (SD_SCRIPTS,), ""),
    "cache_latents": ("[data].cache", (SD_SCRIPTS,), "the folder `lora-dpo cache` writes"),
    "cache_latents_to_disk": ("[data].cache", (SD_SCRIPTS,), "the folder `lora-dpo cache` writes"),
    "validation_split": ("[data].val_pairs", (SD_SCRIPTS,), "a number of pairs, not a fraction"),
    "beta_dpo": ("[objective].beta", (DIFFUSERS,), "the same 0.5 x beta logit as the SDXL script"),
    "seed": ("[train].seed", BOTH, ""),
    "learning_rate": ("[train].learning_rate", BOTH, ""),
    "unet_lr": ("[train].learning_rate", (SD_SCRIPTS,), ""),
    "lr_scheduler": ("[train].lr_schedule", BOTH,
                     "constant, constant_with_warmup, linear, cosine, as get_scheduler means them"),
    "lr_warmup_steps": ("[train].warmup_steps", BOTH, ""),
    "max_train_steps": ("[train].max_steps", BOTH, ""),
    "num_train_epochs": ("[train].max_steps", (DIFFUSERS,), "optimizer steps, not epochs"),
    "max_train_epochs": ("[train].max_steps", (SD_SCRIPTS,), "optimizer steps, not epochs"),
    "train_batch_size": ("[train].batch_size", BOTH, ""),
    "gradient_accumulation_steps": ("[train].gradient_accumulation", BOTH, ""),
    "gradient_checkpointing": ("[train].gradient_checkpointing", BOTH, ""),
    "mixed_precision": ("[train].mixed_precision", BOTH, "the frozen base is stored in it too"),
    "full_bf16": ('[train].mixed_precision = "bf16"', (SD_SCRIPTS,), ""),
    "full_fp16": ('[train].mixed_precision = "fp16"', (SD_SCRIPTS,), ""),
    "use_8bit_adam": ('[train].optimizer = "adamw8bit"', BOTH, ""),
    "optimizer_type": ("[train].optimizer", (SD_SCRIPTS,), '`AdamW8bit` is "adamw8bit", `AdamW` "adamw"'),
    "adam_weight_decay": ("[train].weight_decay", (DIFFUSERS,), ""),
    "max_grad_norm": ("[train].max_grad_norm", BOTH, ""),
    "checkpointing_steps": ("[train].checkpoint_every", (DIFFUSERS,), ""),
    "save_every_n_steps": ("[train].checkpoint_every", (SD_SCRIPTS,), ""),
    "checkpoints_total_limit": ("[train].keep_checkpoints", (DIFFUSERS,), ""),
    "validate_every_n_steps": ("[train].val_every", (SD_SCRIPTS,), ""),
    "resume_from_checkpoint": ("lora-dpo train RECIPE --resume", (DIFFUSERS,), ""),
    "resume": ("lora-dpo train RECIPE --resume", (SD_SCRIPTS,), ""),
    "run_validation": ("[sample].every", (DIFFUSERS,), "steps between base | adapter sample grids"),
    "validation_steps": ("[sample].every", (DIFFUSERS,), ""),
    "sample_every_n_steps": ("[sample].every", (SD_SCRIPTS,), ""),
    "sample_prompts": ("[sample].prompts", (SD_SCRIPTS,), "a list of prompts, not a file"),
    "output_dir": ("[output].dir", BOTH, "the run goes to `<dir>/<name>/`"),
    "output_name": ("[output].name", (SD_SCRIPTS,), ""),
    "wandb_run_name": ("[output].name", (SD_SCRIPTS,), ""),
    "report_to": ("[output].report_to", (DIFFUSERS,), ""),
    "log_with": ("[output].report_to", (SD_SCRIPTS,), ""),
    "tracker_name": ("[output].project", (DIFFUSERS,), ""),
    "log_tracker_name": ("[output].project", (SD_SCRIPTS,), ""),
    "push_to_hub": ("lora-dpo push RUN REPO_ID", (DIFFUSERS,), ""),
    "hub_model_id": ("lora-dpo push RUN REPO_ID", (DIFFUSERS,), ""),
    "huggingface_repo_id": ("lora-dpo push RUN REPO_ID", (SD_SCRIPTS,), ""),
    "save_model_as": ("lora-dpo export RUN --format kohya", (SD_SCRIPTS,), "the run folder holds the diffusers file"),
}


def _plain(name: str) -> str:
    """The name as the table spells it: `--max-train-steps`, `Max_Train_Steps` -> `max_train_steps`."""
    return name.strip().lstrip("-").lower().replace("-", "_")


def other_tool_hint(name: str) -> str | None:
    """"`max_train_steps` is `[train].max_steps` here", or None for a name no other tool uses."""
    found = OTHER_TOOLS.get(_plain(name))
    if found is None:
        return None
    here, _, note = found
    return f"`{name}` is `{here}` here" + (f" ({note})" if note else "")


def rows() -> list[tuple[str, str, str, str]]:
    """(their name, tools, here, note) for the recipe reference, in table order."""
    return [(name, ", ".join(tools), here, note) for name, (here, tools, note) in OTHER_TOOLS.items()]
