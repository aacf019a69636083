"""One round's data: which prompts it draws images for, generating them with the model being trained (kill-safe,
a prompt at a time), scoring, pairing, the round's data set on disk, and the pairs as the step's encoded batches.

A round's folder, `<run>/rounds/round-NNN/`:
- `latents/<prompt>.safetensors`: the N latents (N, C, h, w) the pipeline made for a prompt, written after its
  PNGs; a prompt whose file is there is never generated again (a resume goes on from the next one);
- `images/<prompt>_<seed>_policy.png`: the decoded images, what the scorers judge;
- `pairs.parquet`: the round's pairs as an ordinary data set in the Pick-a-Pic layout (`caption, jpg_0, jpg_1,
  label_0, label_1`, the prompt's index, both seeds, the round, every scorer's scores), which any recipe trains on;
- `round.json`, written last: the pairs as indices and the round's numbers. Its presence means the round's data
  is complete.

Training reads the latents the pipeline made (`RoundPairs`): the images are never encoded again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lora_dpo import data, files, models, rewards
from lora_dpo.errors import LoraDpoError
from lora_dpo.evaluate import EvalError, decode_latents, image_path, load_prompts
from lora_dpo.pairs import combine_scores, score_folder, select_pairs, write_pairs
from lora_dpo.recipe import OnlineRecipe, Recipe

log = logging.getLogger(__name__)

ROUNDS_DIR = "rounds"
DONE_FILE = "round.json"
VARIANT = "policy"  # the image files' variant name: drawn by the model being trained (adapters on)


class OnlineError(LoraDpoError, ValueError):
    """An online run that cannot go on as its recipe says: the message names the key and what to change."""


@dataclass(frozen=True)
class Prompts:
    """The prompts an online run trains on and those it holds out (never trained on), in their source's order."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]


def split_prompts(cfg: OnlineRecipe, seed: int) -> Prompts:
    """`[online].prompts` less the held-out ones: `heldout_prompts` when given (a prompt in both is held out),
    else `heldout` prompts drawn with `seed`. Repeated prompts are used once."""
    prompts = _read_prompts("prompts", cfg.prompts)
    if cfg.heldout_prompts:
        heldout = _read_prompts("heldout_prompts", cfg.heldout_prompts)
        kept = set(heldout)
        train = [p for p in prompts if p not in kept]
        if len(train) < len(prompts):
            log.info("[online]: %d prompt(s) of prompts are also held out, and are not trained on",
                     len(prompts) - len(train))
    else:
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
        held = set(order[:cfg.heldout])
        heldout = [p for i, p in enumerate(prompts) if i in held]
        train = [p for i, p in enumerate(prompts) if i not in held]
    if not train:
        raise OnlineError(f"[online].prompts = {cfg.prompts!r}: {len(prompts)} prompt(s), none left to train on "
                          f"after holding out {len(heldout)}; give more prompts or hold out fewer ([online].heldout)")
    return Prompts(tuple(train), tuple(heldout))


def _read_prompts(key: str, spec: str | None) -> list[str]:
    """`[online].<key>`'s prompts, each once; what `load_prompts` cannot read is one line naming the key."""
    try:
        return list(dict.fromkeys(load_prompts(spec or "")))
    except EvalError as err:
        raise OnlineError(f"[online].{key} = {spec!r}: {str(err).split(': ', 1)[-1]}") from None


def round_folder(run_dir: Path, round_index: int) -> Path:
    """Round `round_index`'s folder (0-based index, 1-based name: round 1 is the first)."""
    return run_dir / ROUNDS_DIR / f"round-{round_index + 1:03d}"


def round_prompt_indices(n_train: int, cfg: OnlineRecipe, seed: int, round_index: int) -> list[int]:
    """Which training prompts round `round_index` draws images for: all, or `prompts_per_round` of them, a new
    draw each round (in the prompts' order)."""
    if cfg.prompts_per_round is None or cfg.prompts_per_round >= n_train:
        return list(range(n_train))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + round_index)
    return sorted(torch.randperm(n_train, generator=generator)[:cfg.prompts_per_round].tolist())


def round_seeds(seed: int, round_index: int, n: int) -> list[int]:
    """The N image seeds of a round, the same for each of its prompts and new every round (held-out images use
    0 .. n - 1 every round instead: one round's images compare with the next one's)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + round_index + 1)
    return torch.randint(0, 2**31 - 1, (n,), generator=generator).tolist()


def generate(pipe: Any, family: Any, prompts: Sequence[str], seeds: Sequence[int], folder: Path, *, steps: int,
             guidance_scale: float, resolution: int, desc: str) -> list[Path]:
    """Every prompt's N images (image k from a CPU generator seeded `seeds[k]`, as `lora-dpo eval` makes one
    image of that seed), saved as PNGs, and their latents (N, C, h, w) float32 as the denoiser takes them, one
    safetensors file a prompt; returns those files' paths. A prompt whose file is on disk, made from the same
    prompt and seeds, is not generated again; a prompt is written whole (its PNGs, then its latents file) or not
    at all."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    for part in ("latents", "images"):
        (folder / part).mkdir(parents=True, exist_ok=True)
        files.remove_temporaries(folder / part)  # what a kill in the middle of a write left behind
    paths = []
    for index, prompt in enumerate(tqdm(prompts, desc=desc, unit="prompt")):
        path = folder / "latents" / f"{index:05d}.safetensors"
        paths.append(path)
        stamp = {"prompt": prompt, "seeds": json.dumps(list(seeds))}
        if _stamp(path) == stamp:
            continue
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            latents = pipe(prompt=prompt, num_images_per_prompt=len(seeds), generator=generators, height=resolution,
                           width=resolution, num_inference_steps=steps, guidance_scale=guidance_scale,
                           output_type="latent").images
            # one image at a time: the VAE's activations at 1024 px are GiBs an image (docs/planning.md)
            images = [image for k in range(len(seeds))
                      for image in decode_latents(pipe, family, latents[k:k + 1], resolution)]
        for seed, image in zip(seeds, images, strict=True):
            with files.atomic_file(image_path(folder / "images", index, seed, VARIANT)) as tmp:
                image.save(tmp, format="PNG")
        unpacked = family.trainable_latents(pipe.vae, latents, resolution, resolution)  # (N, C, h, w)
        unpacked = unpacked.float().cpu().contiguous()
        with files.atomic_file(path) as tmp:
            save_file({"latents": unpacked}, str(tmp), metadata=stamp)
    return paths


def _stamp(path: Path) -> dict[str, str] | None:
    """What a latents file was made from (its header's prompt and seeds), or None when there is none."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as handle:
        return handle.metadata()


def read_latents(paths: Sequence[Path], pairs: Sequence[Sequence[int]]) -> dict[tuple[int, int], Tensor]:
    """The latents (C, h, w) of the images the pairs use, keyed (prompt, image): the rest of a round stays on
    disk, so host memory holds two images a pair, not the whole round."""
    from safetensors import safe_open

    used = sorted({(p, k) for p, w, lose in pairs for k in (w, lose)})
    out: dict[tuple[int, int], Tensor] = {}
    for prompt in sorted({p for p, _ in used}):
        with safe_open(str(paths[prompt]), "pt") as handle:
            latents = handle.get_tensor("latents")  # (N, C, h, w)
        out |= {(p, k): latents[k].clone() for p, k in used if p == prompt}
    return out


@contextmanager
def loaded_scorers(specs: Sequence[str]) -> Iterator[list[tuple[Any, float]]]:
    """`[online].scorers` built for one scoring phase (on the GPU when there is one), then freed: between phases
    the card holds what training needs, not a reward model too. A scorer that cannot load names the key."""
    try:
        scorers = rewards.build_scorers(specs, device="cuda" if torch.cuda.is_available() else "cpu")
    except LoraDpoError as err:
        raise OnlineError(f"[online].scorers: {err}") from None
    names = [scorer.name for scorer, _ in scorers]
    if len(set(names)) != len(names):
        raise OnlineError(f"[online].scorers: give each kind once (got {', '.join(names)})")
    try:
        yield scorers
    finally:
        del scorers
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def score(prompts: Sequence[str], seeds: Sequence[int], folder: Path,
          scorers: Sequence[tuple[Any, float]]) -> tuple[Tensor, Tensor]:
    """Every image of the round scored: (scores [K, P, N] per scorer, combined [P, N] by the scorers' weights)."""
    scores = score_folder(prompts, seeds, VARIANT, folder / "images", scorers)
    return scores, combine_scores(scores, [weight for _, weight in scorers])


def make_round(cfg: OnlineRecipe, round_index: int, folder: Path, prompts: Sequence[str], prompt_ids: Sequence[int],
               seeds: Sequence[int], scorers: Sequence[tuple[Any, float]]) -> dict[str, Any]:
    """Score a round's generated images, pair them by `[online].pair_rule` and write `pairs.parquet` and, last,
    `round.json`; returns what round.json holds. Too few pairs stop the run here, before a step trains on them."""
    scores, combined = score(prompts, seeds, folder, scorers)
    kept = select_pairs(combined, cfg.pair_rule, cfg.margin)
    if len(kept) < cfg.min_pairs:
        if cfg.pair_rule == "best_worst":
            rule, fix = "best_worst: every prompt's images scored alike", "raise [online].samples_per_prompt"
        else:
            rule, fix = f"no two images more than margin = {cfg.margin:g} apart", "lower [online].margin"
        raise OnlineError(f"round {round_index + 1}: {len(kept)} pair(s) from {len(prompts)} prompts ({rule}), "
                          f"fewer than [online].min_pairs = {cfg.min_pairs}; {fix} or change the scorers, then "
                          "--resume latest (the images made so far are kept)")
    names = [scorer.name for scorer, _ in scorers]
    write_pairs(folder / "pairs.parquet", prompts, seeds, VARIANT, folder / "images", names, scores, kept,
                round_index=round_index + 1)
    margin = [float(combined[p, w] - combined[p, lose]) for p, w, lose in kept]
    record = {"round": round_index + 1, "prompts": len(prompts), "prompt_texts": list(prompts),
              "prompt_ids": list(prompt_ids),
              "seeds": list(seeds), "pairs": [list(pair) for pair in kept],
              "paired_prompts": len({p for p, _, _ in kept}), "mean_margin": sum(margin) / len(margin),
              "mean_score": {name: float(scores[k].mean()) for k, name in enumerate(names)}}
    files.write_text(folder / DONE_FILE, json.dumps(record, indent=1))
    return record


def read_round(folder: Path, prompts: Sequence[str] | None = None) -> dict[str, Any] | None:
    """A finished round's record (`round.json`), or None when its data is not complete. `prompts`: the round's
    prompts as the recipe gives them now; a round made from others (the prompt file was edited before a resume)
    is refused: its images and pairs would train under the wrong prompts."""
    path = folder / DONE_FILE
    record = files.read_json(path, "online round") if path.is_file() else None
    if record is not None and prompts is not None and record.get("prompt_texts") != list(prompts):
        raise OnlineError(f"{path}: round {record['round']} was made from other prompts than [online].prompts "
                          "gives now (the file changed since): set it back to resume, or start over (--overwrite)")
    return record


class RoundPairs(torch.utils.data.Dataset):
    """A round's pairs keyed by draw number, as `cache.CachedPairs` hands them to `collate_encoded`: pair
    `key % len`, the chosen image's latents as `latents_w` (label 1), the prompt's embeddings (or the empty
    prompt's, by `[data].caption_dropout`, drawn per key as a live run draws it).

    latents: (prompt, image) -> (C, h, w) float32, the images the pairs use (`read_latents`); embeds
    (P + 1, S, D) and pooled (P + 1, Pd) or None: the round's prompts, then the empty prompt; geometry (6,) or
    None: every generated image's (original and target size the resolution, no crop)."""

    def __init__(self, latents: dict[tuple[int, int], Tensor], pairs: Sequence[Sequence[int]], embeds: Tensor,
                 pooled: Tensor | None,
                 geometry: Tensor | None, seed: int, caption_dropout: float) -> None:
        self.latents, self.pairs, self.embeds, self.pooled = latents, [tuple(p) for p in pairs], embeds, pooled
        self.geometry, self.seed, self.caption_dropout = geometry, seed, caption_dropout

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: int) -> dict[str, Tensor]:
        prompt, chosen, rejected = self.pairs[key % len(self.pairs)]
        text = len(self.embeds) - 1 if data.caption_dropped(self.seed, key, self.caption_dropout) else prompt
        item = {"latents_w": self.latents[prompt, chosen], "latents_l": self.latents[prompt, rejected],
                "prompt_embeds": self.embeds[text], "labels": torch.tensor(1.0)}
        if self.pooled is not None:
            item["pooled"] = self.pooled[text]
        if self.geometry is not None:
            item["time_ids_w"] = item["time_ids_l"] = self.geometry
        return item


@torch.no_grad()
def encode_round_prompts(base: models.BaseModel, prompts: Sequence[str], device: torch.device,
                         chunk: int = 16) -> tuple[Tensor, Tensor | None]:
    """The prompts' embeddings, then the empty prompt's: (P + 1, S, D) and pooled (P + 1, Pd) or None, on the
    CPU, as a live run's encoders make them."""
    texts = [*prompts, ""]
    parts = [models.encode_prompts(base, texts[i:i + chunk], device) for i in range(0, len(texts), chunk)]
    embeds = torch.cat([e for e, _ in parts]).cpu()
    pooled = None if parts[0][1] is None else torch.cat([p for _, p in parts]).cpu()
    return embeds, pooled


def round_dataset(base: models.BaseModel, recipe: Recipe, record: dict[str, Any], paths: Sequence[Path],
                  prompts: Sequence[str], device: torch.device) -> RoundPairs:
    """The round's pairs as the step's items (`RoundPairs`), from its latents files (`paths`, one a prompt)."""
    latents = read_latents(paths, record["pairs"])
    embeds, pooled = encode_round_prompts(base, prompts, device)
    resolution = recipe.data.resolution
    geometry = (torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
                if base.family.uses_geometry else None)
    seed = recipe.train.seed * 1_000_003 + record["round"]  # caption dropout: its own draws each round
    return RoundPairs(latents, record["pairs"], embeds, pooled, geometry, seed, recipe.data.caption_dropout)
