"""What an `[online]` recipe's rounds cost besides training: the images each round draws with the model being
trained, the held-out images that measure it (and the base's, once for the run), decoded and scored.

Per round: (training prompts it draws for x `samples_per_prompt`) + (held-out prompts x `heldout_seeds`) images;
the base's held-out images once more for the whole run. Each image costs `[online].steps` denoiser forwards at
`[data].resolution` in inference (no graph, no reference pass, no backward; the batch doubled under
classifier-free guidance where the base's family says its pipeline doubles it), one VAE decode and its scorers;
each prompt's call of the pipeline encodes its prompt (and the empty one, with guidance). The denoiser's forward and
the VAE's decode are traced on fake tensors as the training step is (`trace.measure_denoise`,
`trace.measure_decode`); text encoders and scorers are 2 x parameters x tokens.

Prompt counts are read only from local files (`online.split_prompts`, as the trainer splits them): the plan never
downloads a prompt set to count it, and prices an unread one per `ASSUMED_PROMPTS` prompts instead, saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_dpo.plan.bases import Architecture
from lora_dpo.plan.trace import InferenceMeasure, StepKey, measure_decode, measure_denoise
from lora_dpo.recipe import OnlineRecipe, Recipe

ASSUMED_PROMPTS = 1000  # what a prompt set the plan does not read is priced per

# The scorers' towers as (parameters, tokens), counted from transformers' CLIP classes on the meta device: the
# default backbone of each kind (`rewards.DEFAULT_SOURCES`; `hps` and `clip` are ViT-H/14 checkpoints, `aesthetic`
# LAION's head on OpenAI's ViT-L/14 vision tower). 257 image tokens: 224 px in 14 px patches plus the class token;
# 77 text tokens: captions padded to CLIP's context. `shapes` and `brightness` are pixel arithmetic. A scorer given
# another `@SOURCE` is priced as its kind's default backbone.
_VIT_H14 = ((632_076_800, 257), (354_032_640, 77))
SCORER_TOWERS: dict[str, tuple[tuple[int, int], ...]] = {
    "pickscore": _VIT_H14, "hps": _VIT_H14, "clip": _VIT_H14, "aesthetic": ((303_966_208, 257),),
    "shapes": (), "brightness": (),
}
SCORER_BYTES = 4  # the online trainer builds its scorers in fp32 on the training device for each scoring phase


@dataclass(frozen=True)
class PromptCounts:
    """How many prompts the rounds draw for: all training prompts (`train_read`: counted, else assumed), those one
    round draws for, the held-out ones; `note` says where the numbers come from."""

    train: int
    per_round: int
    heldout: int
    note: str
    train_read: bool = True


def _local(spec: str | None) -> bool:
    return spec is not None and Path(spec).exists()


def count_prompts(cfg: OnlineRecipe, seed: int) -> PromptCounts:
    """The run's prompt counts: split as the trainer splits them when every prompt set is a local file or folder;
    otherwise what can be read is read and an unread set is priced per `ASSUMED_PROMPTS` prompts (never
    downloaded: the plan runs before anything is)."""
    from lora_dpo.evaluate import load_prompts

    if _local(cfg.prompts) and (cfg.heldout_prompts is None or _local(cfg.heldout_prompts)):
        from lora_dpo.online import split_prompts

        split = split_prompts(cfg, seed)
        train = len(split.train)
        per_round = train if cfg.prompts_per_round is None else min(cfg.prompts_per_round, train)
        return PromptCounts(train, per_round, len(split.heldout), "counted from the prompt files, split as the "
                            "trainer splits them")
    notes = []
    if _local(cfg.prompts):
        train = len(load_prompts(str(cfg.prompts)))
        per_round = train if cfg.prompts_per_round is None else min(cfg.prompts_per_round, train)
        notes.append(f"{train:,} training prompts counted in {cfg.prompts}")
    elif cfg.prompts_per_round is not None:  # a round draws this many, whatever the unread set holds beyond them
        train = per_round = cfg.prompts_per_round
        notes.append(f"[online].prompts = {cfg.prompts!r} not read: a round draws prompts_per_round = {per_round:,}")
    else:
        train = per_round = ASSUMED_PROMPTS
        notes.append(f"[online].prompts = {cfg.prompts!r} not read: priced per {ASSUMED_PROMPTS:,} training prompts")
    if cfg.heldout_prompts is None:
        heldout = cfg.heldout
        notes.append(f"[online].heldout = {heldout} of them held out")
    elif _local(cfg.heldout_prompts):
        heldout = len(load_prompts(cfg.heldout_prompts))
        notes.append(f"{heldout:,} held-out prompts counted in {cfg.heldout_prompts}")
    else:
        heldout = ASSUMED_PROMPTS
        notes.append(f"[online].heldout_prompts = {cfg.heldout_prompts!r} not read: priced per {ASSUMED_PROMPTS:,} "
                     "held-out prompts")
    return PromptCounts(train, per_round, heldout, "; ".join(notes) + " (the plan downloads no prompt set)",
                        _local(cfg.prompts))


def scorer_cost(specs: tuple[str, ...]) -> tuple[float, int]:
    """(FLOPs per image, bytes of weights) of the scorers: 2 x parameters x tokens per tower, fp32 weights."""
    from lora_dpo.rewards import parse_scorer_spec

    towers = [tower for spec in specs for tower in SCORER_TOWERS[parse_scorer_spec(spec)[0]]]
    return (sum(2.0 * params * tokens for params, tokens in towers),
            SCORER_BYTES * sum(params for params, _ in towers))


@dataclass(frozen=True)
class Generation:
    """An online run's generation, priced: its image and prompt counts and what each costs."""

    counts: PromptCounts
    rounds: int
    samples: int  # images per training prompt per round
    seeds: int  # images per held-out prompt per round (and the base's, once)
    steps: int  # inference steps per image
    guidance_scale: float
    guidance_from: str
    passes: int  # denoiser images per generated image per step: 2 under classifier-free guidance
    batch: int  # images per pipeline call traced: the larger of `samples` and `seeds`
    denoise: InferenceMeasure  # one inference step on `batch` x `passes` latents
    decode: InferenceMeasure  # the VAE decoding one latent: the online trainer decodes an image at a time
    text_flops: float  # the text encoders on one prompt (x passes: the empty prompt too, under guidance)
    score_flops: float  # the scorers on one image
    scorer_bytes: int  # their weights, on the training device while a round scores (freed before it trains)

    @property
    def images_per_round(self) -> tuple[int, int]:
        """(the round's own images, its held-out ones)."""
        return self.counts.per_round * self.samples, self.counts.heldout * self.seeds

    @property
    def base_images(self) -> int:
        """The base's held-out images, made once for the run."""
        return self.counts.heldout * self.seeds

    @property
    def images(self) -> int:
        return self.rounds * sum(self.images_per_round) + self.base_images

    @property
    def calls(self) -> int:
        """Pipeline calls (one a prompt: its images in one batch), each encoding its prompt."""
        return self.rounds * (self.counts.per_round + self.counts.heldout) + self.counts.heldout

    @property
    def denoise_flops(self) -> float:
        """The denoiser's FLOPs for one image: every step, guidance's doubled batch included."""
        return self.steps * self.denoise.flops / self.batch

    @property
    def decode_flops(self) -> float:
        return self.decode.flops

    @property
    def image_flops(self) -> float:
        return self.denoise_flops + self.decode_flops + self.score_flops

    @property
    def flops(self) -> dict[str, float]:
        """The whole run's generation, per part."""
        return {"denoiser": self.images * self.denoise_flops, "VAE decode": self.images * self.decode_flops,
                "text encoders": self.calls * self.text_flops, "scorers": self.images * self.score_flops}

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())

    @property
    def transient(self) -> int:
        """Bytes above the resident weights and optimizer state while a round generates and scores: the
        denoiser's pass, the VAE's decode of one image or the scorers' weights, whichever is larger (they never
        overlap)."""
        return max(self.denoise.transient, self.decode.transient, self.scorer_bytes)


def estimate_generation(recipe: Recipe, arch: Architecture, key: StepKey) -> Generation:
    """An `[online]` recipe's generation, on the step's key (its LoRA and precision; at `[data].resolution`)."""
    cfg, family = recipe.online, arch.family
    counts = count_prompts(cfg, recipe.train.seed)
    if cfg.guidance_scale is None:
        guidance, guidance_from = family.pipeline_guidance_scale(), "the pipeline's default"
    else:
        guidance, guidance_from = cfg.guidance_scale, "[online].guidance_scale"
    passes = family.denoiser_passes(guidance)
    batch = max(cfg.samples_per_prompt, cfg.heldout_seeds)
    denoise = measure_denoise(arch, key, passes * batch)
    decode = measure_decode(arch, key.resolution, 1, recipe.model.vae_dtype)
    score_flops, scorer_bytes = scorer_cost(cfg.scorers)
    text = passes * 2.0 * sum(arch.encoder_params) * arch.max_length
    return Generation(counts, cfg.rounds, cfg.samples_per_prompt, cfg.heldout_seeds, cfg.steps, guidance,
                      guidance_from, passes, batch, denoise, decode, text, score_flops, scorer_bytes)
