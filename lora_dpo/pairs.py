"""`lora-dpo pairs`: a preference set from prompts alone (on-policy AI feedback).

For every prompt, N images are generated with the base (or the base + an adapter: the next round of iterated,
on-policy DPO), every image is scored with the same scorers as `lora-dpo label`, and the best image is paired
against the worst. The pair set is written in the Pick-a-Pic layout (`caption, jpg_0, jpg_1, label_0, label_1`,
`jpg_0` the chosen image, `label_0 = 1`), which `[data].source` reads as it is.

Why best vs worst, and not every pair with the scorer's probability as a soft label: the extremes are the pair
the scorer is surest of, so its noise flips fewest of them, and near-ties (little signal, mostly scorer noise)
never enter. It follows the paper's AI-feedback experiment, which keeps hard labels (a pair is swapped toward the
scorer's choice; no probabilities), and on-policy pipelines such as SPO, which train on the best and the worst of
a pool of candidates per prompt. All C(N, 2) pairs would reuse each image N - 1 times, so they are neither
independent nor much more informative, and one pair per prompt keeps every prompt equally weighted.

Resumable: images are stamped PNGs (`evaluate.generate_or_reuse`) under `<out>.images/`; a rerun with the same
prompts and settings reuses them and only scores and writes again (scoring costs a fraction of generating).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm.auto import tqdm

from lora_dpo import files
from lora_dpo.errors import LoraDpoError
from lora_dpo.evaluate import (
    GridRow,
    generate_or_reuse,
    image_path,
    load_prompts,
    make_grid,
    open_generation,
    variant_name,
)
from lora_dpo.rewards import Scorer, build_scorers

log = logging.getLogger(__name__)

SCORE_CHUNK = 32  # images held in memory at once while scoring
WRITE_CHUNK = 64  # pairs per parquet row group: a few dozen MB of PNG bytes at 1024 px
GRID_PROMPTS = 32  # prompts shown in grids: enough to judge the scorer by eye, not thousands of files
ROWS_PER_GRID = 8


PRECISIONS = ("no", "fp16", "bf16")


class PairsError(LoraDpoError, ValueError):
    """A preference set that cannot be made as asked: the message names the option."""


@dataclass(frozen=True)
class PairsSummary:
    prompts: int
    pairs: int
    ties: int  # prompts whose images all scored the same: no preference, no pair
    generated: int
    reused: int
    margins: dict[str, float]  # per scorer: mean score of the chosen image minus the rejected one's
    grids: tuple[Path, ...]

    def lines(self, out: Path) -> list[str]:
        """What `lora-dpo pairs` prints."""
        margins = ", ".join(f"{name} {m:+.4g}" for name, m in self.margins.items())
        return [f"wrote {self.pairs} pairs (best vs worst of each prompt) into {out}; {self.ties} prompt(s) left "
                f"out, all their images scored the same",
                f"images: {self.generated} generated, {self.reused} reused from an earlier run; mean margin chosen - "
                f"rejected: {margins or 'none'}",
                f"grids of what was chosen over what: {len(self.grids)} in {grids_dir(out)}"]


def images_dir(out: Path) -> Path:
    return out.with_name(out.name + ".images")


def grids_dir(out: Path) -> Path:
    return out.with_name(out.name + ".grids")


def combine_scores(scores: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """One score per image from K scorers: scores [K, P, N] (scorer, prompt, image) -> [P, N].

    One scorer: its own score (times its weight). Several: each is divided by the root-mean-square of its
    within-prompt deviations (image score minus the prompt's mean) before weighting, so PickScore (~20),
    aesthetic (~5) and CLIP (~30) mix by weight, not by unit; `label` standardises pair differences the same way.
    Only differences within a prompt matter: the selection never compares images of two prompts.
    """
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1, 1, 1)  # [K, 1, 1]
    scores = scores.double()
    if len(scores) > 1:
        deviation = scores - scores.mean(dim=2, keepdim=True)  # [K, P, N]
        rms = deviation.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
        scores = scores / torch.where(rms > 0, rms, 1.0)  # a scorer with no spread has nothing to rescale
    return (w * scores).sum(dim=0)


def _generate(prompts: Sequence[str], seeds: Sequence[int], base: str, adapter: Path | None, folder: Path, *,
              steps: int, guidance_scale: float | None, resolution: int | None, precision: str) -> int:
    """Every prompt's images, as stamped PNGs in `folder`; returns how many were made (the rest were reused)."""
    pipe, gen = open_generation(base, adapter, steps=steps, guidance_scale=guidance_scale, resolution=resolution,
                                precision=precision)
    variant = variant_name(None if adapter is None else 1.0)  # load_lora_weights leaves the adapter on at 1.0
    folder.mkdir(parents=True, exist_ok=True)
    made = 0
    with tqdm(total=len(prompts) * len(seeds), desc="generating", unit="image") as bar:
        for index, prompt in enumerate(prompts):
            for seed in seeds:
                made += generate_or_reuse(pipe, prompt, seed, variant, gen, image_path(folder, index, seed, variant))
                bar.update()
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the scorers come next
    return made


def score_folder(prompts: Sequence[str], seeds: Sequence[int], variant: str, folder: Path,
                 scorers: Sequence[tuple[Scorer, float]]) -> torch.Tensor:
    """scores [K, P, N]: every scorer on every image, read a chunk at a time."""
    keys = [(index, seed) for index in range(len(prompts)) for seed in seeds]
    out = torch.empty(len(scorers), len(keys), dtype=torch.float64)
    with tqdm(total=len(keys), desc="scoring", unit="image") as bar:
        for start in range(0, len(keys), SCORE_CHUNK):
            chunk = keys[start:start + SCORE_CHUNK]
            images = [Image.open(image_path(folder, i, s, variant)).convert("RGB") for i, s in chunk]
            for k, (scorer, _) in enumerate(scorers):
                out[k, start:start + len(chunk)] = scorer.score([prompts[i] for i, _ in chunk], images).double()
            bar.update(len(chunk))
    return out.reshape(len(scorers), len(prompts), len(seeds))


def _schema(names: Sequence[str], round_index: int | None) -> pa.Schema:
    scores = [(f"score_{i}_{n}", pa.float64()) for n in names for i in (0, 1)]
    rounds = [("round", pa.int64())] if round_index is not None else []
    return pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                      ("label_0", pa.float64()), ("label_1", pa.float64()), ("prompt_index", pa.int64()),
                      ("seed_0", pa.int64()), ("seed_1", pa.int64()), *rounds, *scores])


def select_pairs(combined: torch.Tensor, rule: str = "best_worst", margin: float = 0.0) -> list[tuple[int, int, int]]:
    """The pairs to train on from one score per image, combined [P, N] (prompt, image): (prompt, chosen image,
    rejected image), prompt by prompt. `best_worst`: each prompt's best image over its worst (the first of equals,
    in image order); `margin`: every two images of a prompt whose scores differ by more than `margin`, the better
    one chosen. Equal scores never make a pair: no preference."""
    order = combined.argsort(dim=1, descending=True, stable=True)  # [P, N], best first
    if rule == "best_worst":
        return [(p, int(order[p, 0]), int(order[p, -1])) for p in range(len(combined))
                if combined[p, order[p, 0]] > combined[p, order[p, -1]]]
    if rule != "margin":
        raise PairsError(f"pair rule {rule!r}: expected best_worst or margin")
    n = combined.shape[1]
    return [(p, int(order[p, i]), int(order[p, j])) for p in range(len(combined)) for i in range(n)
            for j in range(i + 1, n) if combined[p, order[p, i]] - combined[p, order[p, j]] > margin]


def write_pairs(out: Path, prompts: Sequence[str], seeds: Sequence[int], variant: str, folder: Path,
                names: Sequence[str], scores: torch.Tensor, kept: list[tuple[int, int, int]],
                round_index: int | None = None) -> None:
    """The pairs (prompt index, chosen, rejected image index) as Pick-a-Pic parquet, a row group at a time.
    The PNG files go in as they are: lossless, and their stamp chunk is harmless to a decoder. `round_index`: an
    online run's round, written in a `round` column."""
    schema = _schema(names, round_index)
    with files.atomic_file(out) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, len(kept), WRITE_CHUNK):
            rows: dict[str, list] = {name: [] for name in schema.names}
            for p, w, lose in kept[start:start + WRITE_CHUNK]:
                rows["caption"].append(prompts[p])
                rows["jpg_0"].append(image_path(folder, p, seeds[w], variant).read_bytes())
                rows["jpg_1"].append(image_path(folder, p, seeds[lose], variant).read_bytes())
                rows["label_0"].append(1.0)  # jpg_0 is the chosen image
                rows["label_1"].append(0.0)
                rows["prompt_index"].append(p)
                rows["seed_0"].append(seeds[w])
                rows["seed_1"].append(seeds[lose])
                if round_index is not None:
                    rows["round"].append(round_index)
                for k, name in enumerate(names):
                    rows[f"score_0_{name}"].append(scores[k, p, w].item())
                    rows[f"score_1_{name}"].append(scores[k, p, lose].item())
            writer.write_table(pa.Table.from_pydict(rows, schema=schema))


def _grids(out: Path, prompts: Sequence[str], seeds: Sequence[int], variant: str, folder: Path, names: Sequence[str],
           scores: torch.Tensor, order: torch.Tensor, kept: list[tuple[int, int, int]]) -> list[Path]:
    """Grids of the first prompts' images, best to worst: the chosen image first, the rejected one last."""
    target = grids_dir(out)
    target.mkdir(parents=True, exist_ok=True)
    for old in target.glob("grid-*.png"):  # a rerun on fewer prompts must not leave stale grids behind
        old.unlink()
    n = len(seeds)
    titles = ["chosen", *(f"#{rank + 1}" for rank in range(1, n - 1)), "rejected"]
    shown, paths = kept[:GRID_PROMPTS], []
    for number, start in enumerate(range(0, len(shown), ROWS_PER_GRID)):
        rows = []
        for p, _, _ in shown[start:start + ROWS_PER_GRID]:
            ranked = order[p].tolist()
            notes = ["\n".join(f"{name} {scores[k, p, j].item():.3f}" for k, name in enumerate(names)) for j in ranked]
            images = [Image.open(image_path(folder, p, seeds[j], variant)) for j in ranked]
            rows.append(GridRow(images, f"#{p}: {prompts[p]}", notes))
        path = target / f"grid-{number:03d}.png"
        make_grid(rows, titles).save(path, optimize=True)
        paths.append(path)
    return paths


def generate_pairs(prompts: Sequence[str], base: str, scorers: Sequence[tuple[Scorer, float]], out: Path, *,
                   adapter: Path | None = None, images_per_prompt: int = 4, seed: int = 0, steps: int = 30,
                   guidance_scale: float | None = None, resolution: int | None = None,
                   precision: str = "bf16") -> PairsSummary:
    """Generate `images_per_prompt` images per prompt (seeds `seed`, `seed + 1`, ...), score them, and write the
    best vs the worst of each prompt into `out`; images in `<out>.images/`, grids in `<out>.grids/`."""
    if images_per_prompt < 2:
        raise PairsError(f"--images-per-prompt {images_per_prompt}: a pair needs at least 2 images per prompt")
    if not scorers:
        raise PairsError("--scorer: give at least one scorer; the pairs follow its scores")
    names = [scorer.name for scorer, _ in scorers]
    if len(set(names)) != len(names):
        raise PairsError(f"--scorer: give each kind once (got {', '.join(names)})")
    unique = list(dict.fromkeys(prompts))  # a repeated prompt would give the same images twice: one pair
    if len(unique) < len(prompts):
        log.info("%d repeated prompt(s) left out", len(prompts) - len(unique))
    seeds = list(range(seed, seed + images_per_prompt))
    out, folder = Path(out), images_dir(Path(out))
    variant = variant_name(None if adapter is None else 1.0)
    made = _generate(unique, seeds, base, adapter, folder, steps=steps, guidance_scale=guidance_scale,
                     resolution=resolution, precision=precision)
    scores = score_folder(unique, seeds, variant, folder, scorers)  # [K, P, N]
    combined = combine_scores(scores, [w for _, w in scorers])  # [P, N]
    order = combined.argsort(dim=1, descending=True, stable=True)  # [P, N], best first (the grids' order)
    kept = select_pairs(combined)
    write_pairs(out, unique, seeds, variant, folder, names, scores, kept)
    grids = _grids(out, unique, seeds, variant, folder, names, scores, order, kept)
    index = torch.tensor([p for p, _, _ in kept], dtype=torch.long)
    chosen, rejected = (torch.tensor([c[i] for c in kept], dtype=torch.long) for i in (1, 2))
    margins = {name: (scores[k, index, chosen] - scores[k, index, rejected]).mean().item()
               for k, name in enumerate(names)} if kept else {}
    return PairsSummary(prompts=len(unique), pairs=len(kept), ties=len(unique) - len(kept), generated=made,
                        reused=len(unique) * len(seeds) - made, margins=margins, grids=tuple(grids))


def run(prompts: str, base: str, scorer_specs: Sequence[str], out: Path, *, adapter: Path | None = None,
        images_per_prompt: int = 4, seed: int = 0, steps: int = 30, guidance_scale: float | None = None,
        resolution: int | None = None, precision: str = "bf16") -> PairsSummary:
    """`lora-dpo pairs`: read the prompts (`evaluate.load_prompts`), build the scorers, then `generate_pairs`.
    Everything a user can get wrong is checked before the first image is generated."""
    if precision not in PRECISIONS:
        raise PairsError(f"--precision {precision!r}: expected no, fp16 or bf16")
    if images_per_prompt < 2:
        raise PairsError(f"--images-per-prompt {images_per_prompt}: a pair needs at least 2 images per prompt")
    prompt_list = load_prompts(prompts)
    scorers = build_scorers(scorer_specs, device="cuda" if torch.cuda.is_available() else "cpu")
    return generate_pairs(prompt_list, base, scorers, out, adapter=adapter, images_per_prompt=images_per_prompt,
                          seed=seed, steps=steps, guidance_scale=guidance_scale, resolution=resolution,
                          precision=precision)
