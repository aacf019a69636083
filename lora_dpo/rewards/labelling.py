"""Labelling: relabel preference pairs with scorers instead of people.

Diffusion-DPO (Wallace et al., 2023) also trains on Pick-a-Pic pairs whose winner is picked by a reward
model: the pair is swapped when the scorer prefers image 1. This module holds the rule that turns one or
several scores into a label (`preference_probability`) and `label_pairs`, a resumable writer of
Pick-a-Pic-layout parquet.
"""

from __future__ import annotations

import io
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from lora_dpo import files
from lora_dpo.rewards.errors import RewardError
from lora_dpo.rewards.scorers import Scorer

TIE_LABEL = 0.5  # label_0 of a pair whose combined score difference is exactly zero (hard mode)
PNG_COMPRESS_LEVEL = 1  # lossless either way; level 1 is several times faster than PIL's default 6
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_PART_RE = re.compile(r"^part-(\d+)\.parquet$")
PairRow = tuple[str, str, Image.Image, Image.Image]  # (pair_id, prompt, image_0, image_1)


def preference_probability(scores_0: torch.Tensor, scores_1: torch.Tensor,
                           weights: Sequence[float] | torch.Tensor, *, temperature: float = 1.0,
                           hard: bool = True, standardize: bool | None = None) -> torch.Tensor:
    """Probability that image 0 is preferred, from K scorers' scores of shape [K, N] (or [N] when K = 1).

    ``z = sum_k w_k * (s0_k - s1_k) / scale_k``. Hard mode (the paper's: swap when the scorer prefers
    image 1) gives 1.0 / 0.0, and ``TIE_LABEL`` for an exact tie; soft mode gives ``sigmoid(z / T)``.
    ``scale_k`` is 1 for a single scorer: hard labels do not depend on it, and for the logit-scaled CLIP
    scorers ``sigmoid(s0 - s1)`` is then the model's own Bradley-Terry probability. With several scorers
    (``standardize`` defaults to K > 1) ``scale_k`` is the root-mean-square of scorer k's differences over
    the given pairs, so PickScore (~20), aesthetic (~5) and CLIP (~30) mix by weight, not by unit. RMS, not
    std: differences need no centring, and RMS does not collapse when every difference is the same.
    Returns float64 [N].
    """
    s0, s1 = torch.as_tensor(scores_0, dtype=torch.float64), torch.as_tensor(scores_1, dtype=torch.float64)
    s0, s1 = (s0[None], s1[None]) if s0.dim() == 1 else (s0, s1)
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1, 1)
    if s0.shape != s1.shape or s0.dim() != 2 or len(w) != len(s0):
        raise RewardError(f"need two [K, N] score tensors and K weights; got {tuple(s0.shape)}, "
                         f"{tuple(s1.shape)} and {len(w)} weights")
    if not hard and not temperature > 0:
        raise RewardError(f"temperature must be > 0 for soft labels, got {temperature}")
    diff = s0 - s1  # [K, N]
    if (len(s0) > 1) if standardize is None else standardize:
        rms = diff.pow(2).mean(dim=1, keepdim=True).sqrt().nan_to_num(0.0)  # nan for N = 0
        diff = diff / torch.where(rms > 0, rms, 1.0)  # a scorer with no spread has nothing to rescale
    z = (w * diff).sum(dim=0)  # [N]
    if hard:
        return torch.where(z > 0, 1.0, torch.where(z < 0, 0.0, TIE_LABEL)).double()
    return torch.sigmoid(z / temperature)


@dataclass(frozen=True)
class LabelSummary:
    """Totals over the whole output file (resumed parts included); ``n_new`` = pairs scored by this call."""

    n_pairs: int
    n_swapped: int  # label_0 < 0.5: the scorers prefer image 1
    n_ties: int  # label_0 == 0.5
    mean_scores: dict[str, float]  # per scorer, over both images of every pair
    n_new: int = 0


def _png(image: Image.Image) -> bytes:
    """Lossless: the caller only has decoded images, and re-encoding them as JPEG would change pixels."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _schema(names: Sequence[str], with_labels: bool) -> pa.Schema:
    labels = [("label_0", pa.float64()), ("label_1", pa.float64())] if with_labels else []
    scores = [(f"score_{i}_{n}", pa.float64()) for n in names for i in (0, 1)]
    return pa.schema([("pair_id", pa.string()), ("caption", pa.string()), ("jpg_0", pa.binary()),
                      ("jpg_1", pa.binary()), *labels, *scores])


def _list_parts(parts_dir: Path) -> list[Path]:
    found = [(int(m[1]), p) for p in parts_dir.iterdir() if (m := _PART_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def _write_part(parts_dir: Path, index: int, tables: list[pa.Table]) -> int:
    """Write scored batches as one part, atomically (`files.atomic_file`); returns the rows written."""
    if not tables:
        return 0
    final = parts_dir / f"part-{index:05d}.parquet"
    with files.atomic_file(final) as tmp:
        pq.write_table(pa.concat_tables(tables), tmp)
    return sum(t.num_rows for t in tables)


def _score_batch(batch: list[PairRow], scorers: Sequence[tuple[Scorer, float]],
                 schema: pa.Schema) -> pa.Table:
    ids, prompts, images_0, images_1 = (list(col) for col in zip(*batch, strict=True))
    n = len(batch)
    columns: dict[str, list[Any]] = {"pair_id": ids, "caption": [str(p) for p in prompts],
                                     "jpg_0": [_png(im) for im in images_0],
                                     "jpg_1": [_png(im) for im in images_1]}
    for scorer, _ in scorers:  # one call per scorer, with both images of every pair
        scores = scorer.score(prompts + prompts, images_0 + images_1).detach().double().cpu().reshape(-1)
        if len(scores) != 2 * n:
            raise RewardError(f"scorer {scorer.name!r} returned {len(scores)} scores for {2 * n} images")
        columns[f"score_0_{scorer.name}"] = scores[:n].tolist()
        columns[f"score_1_{scorer.name}"] = scores[n:].tolist()
    return pa.Table.from_pydict(columns, schema=schema)


def labelled_ids(out_path: Path) -> set[str]:
    """The pair_ids already scored into ``<out>.parts`` by an earlier call: a caller that decodes images
    can skip them before paying for the decode (`label_pairs` itself skips them either way)."""
    parts_dir = Path(out_path).with_name(Path(out_path).name + ".parts")
    if not parts_dir.is_dir():
        return set()
    return {str(i) for part in _list_parts(parts_dir)
            for i in pq.read_table(part, columns=["pair_id"])["pair_id"].to_pylist()}


def label_pairs(pairs: Iterable[PairRow], scorers: list[tuple[Scorer, float]], out_path: Path, *,
                batch_size: int = 16, hard: bool = True, resume: bool = True, total: int | None = None,
                temperature: float = 1.0, part_size: int = 256, keep_parts: bool = True) -> LabelSummary:
    """Score (pair_id, prompt, image_0, image_1) pairs and write a Pick-a-Pic-layout parquet file.

    Columns: ``pair_id, caption, jpg_0, jpg_1`` (PNG bytes), ``label_0``, ``label_1 = 1 - label_0`` and
    ``score_{0,1}_<scorer name>``. Scores go first to ``<out>.parts/part-NNNNN.parquet`` (about
    ``part_size`` rows each, written atomically, also when the input or a scorer raises), so a rerun with
    ``resume=True`` skips pair_ids already there; a pair_id repeated in the input is skipped too. Labels
    are computed only at the end, over the whole dataset, so multi-scorer standardisation (see
    :func:`preference_probability`) does not depend on batching or on where a run was interrupted. The
    final file is written under a temp name and moved into place; parts are kept unless
    ``keep_parts=False`` (with them a later call can append pairs without rescoring).
    """
    names = [scorer.name for scorer, _ in scorers]
    if not scorers or len(set(names)) != len(names) or not all(_NAME_RE.match(n) for n in names):
        raise RewardError(f"need >= 1 scorer with distinct names matching {_NAME_RE.pattern}, got {names}")
    if batch_size < 1 or part_size < 1:
        raise RewardError(f"batch_size and part_size must be >= 1, got {batch_size} and {part_size}")
    out_path = Path(out_path)
    parts_dir = out_path.with_name(out_path.name + ".parts")
    if not resume and parts_dir.exists():
        shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    schema, parts, done = _schema(names, with_labels=False), _list_parts(parts_dir), set[str]()
    for part in parts:
        if pq.read_schema(part).names != schema.names:
            raise RewardError(f"{part} was written with other scorers ({pq.read_schema(part).names}); "
                             "pass resume=False or use another out_path")
        done.update(pq.read_table(part, columns=["pair_id"])["pair_id"].to_pylist())
    index = int(_PART_RE.match(parts[-1].name)[1]) + 1 if parts else 0
    batch: list[PairRow] = []
    scored: list[pa.Table] = []  # scored batches not yet in a part
    n_new = 0
    try:
        with tqdm(total=total, desc=f"labelling {out_path.name}", unit="pair", disable=None) as bar:
            for pair_id, prompt, image_0, image_1 in pairs:
                bar.update()
                if str(pair_id) in done:
                    continue
                done.add(str(pair_id))
                batch.append((str(pair_id), prompt, image_0, image_1))
                if len(batch) == batch_size:
                    scored.append(_score_batch(batch, scorers, schema))
                    batch = []
                    if sum(t.num_rows for t in scored) >= part_size:
                        n_new += _write_part(parts_dir, index, scored)
                        index, scored = index + 1, []
            if batch:
                scored.append(_score_batch(batch, scorers, schema))
    finally:
        n_new += _write_part(parts_dir, index, scored)  # keep every scored row, also when interrupted
    summary = _finalize(parts_dir, out_path, scorers, hard=hard, temperature=temperature)
    if not keep_parts:
        shutil.rmtree(parts_dir)
    return replace(summary, n_new=n_new)


def _finalize(parts_dir: Path, out_path: Path, scorers: Sequence[tuple[Scorer, float]], *, hard: bool,
              temperature: float) -> LabelSummary:
    """Label over all parts, then stream them one by one into the final file (memory: one part)."""
    names, parts = [scorer.name for scorer, _ in scorers], _list_parts(parts_dir)
    score_columns = _schema(names, with_labels=False).names[4:]
    tables = [pq.read_table(p, columns=score_columns) for p in parts]
    scores = {c: torch.tensor([v for t in tables for v in t[c].to_pylist()], dtype=torch.float64)
              for c in score_columns}  # each [N], over all parts
    s0 = torch.stack([scores[f"score_0_{n}"] for n in names])  # [K, N]
    s1 = torch.stack([scores[f"score_1_{n}"] for n in names])
    label_0 = preference_probability(s0, s1, [w for _, w in scorers], hard=hard, temperature=temperature)
    schema, offset = _schema(names, with_labels=True), 0
    with files.atomic_file(out_path) as tmp, pq.ParquetWriter(tmp, schema) as out:
        for part in parts:
            table = pq.read_table(part)
            labels = label_0[offset:offset + table.num_rows].numpy()
            offset += table.num_rows
            table = table.append_column("label_0", pa.array(labels))
            table = table.append_column("label_1", pa.array(1.0 - labels))
            out.write_table(table.select(schema.names))
    means = {n: torch.cat([s0[k], s1[k]]).mean().item() for k, n in enumerate(names)}  # nan if empty
    return LabelSummary(n_pairs=len(label_0), n_swapped=int((label_0 < 0.5).sum()),
                        n_ties=int((label_0 == TIE_LABEL).sum()), mean_scores=means)
