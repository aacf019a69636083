"""Relabelling a preference source (`lora-dpo label`): the rows the trainer would use, scored instead of people.

The data package decides which rows are scored, with the very functions training uses: `data.orient` applies the
ties policy and the `has_label` / `are_different` filters and skips rows whose metadata shows them unusable (a
missing file, an empty caption, a bad label); `data.decode_pair` finds what only decoding shows (a truncated or
undecodable image, a non-RGB one). `PairStats` counts what happened to every row. A bad row is skipped and counted,
never the end of the command unless `strict`: before, one missing image stopped `label` on the same row at every
resume.

Human ties are dropped by default, as training drops them (`[data].ties = "drop"`); `ties="relabel"` keeps them
for the scorers to decide, which is what AI feedback adds over a tie. Pairs are written oriented as training
orients them: `jpg_0` is the image people preferred (for a tie, the source's image 0), so a pair the scorers
swap (`label_0 < 0.5`) is one where they disagree with the people.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lora_dpo.data import POLICY_DROPS, DataError, ImageReader, PairRecord, PairStats, decode_pair, orient, read_records
from lora_dpo.recipe import DataRecipe
from lora_dpo.rewards.errors import RewardError
from lora_dpo.rewards.labelling import TIE_LABEL, LabelSummary, PairRow, label_pairs, labelled_ids
from lora_dpo.rewards.scorers import Scorer

TiesChoice = Literal["drop", "relabel"]
TIES_CHOICES: tuple[str, ...] = ("drop", "relabel")


@dataclass(frozen=True)
class RelabelSummary:
    """The written file (`labels`, resumed rows included) and this pass over the source (`stats`)."""

    labels: LabelSummary
    stats: PairStats  # rows read, kept, dropped by the policy (ties, identical images, unlabelled), skipped
    ties: TiesChoice
    ties_relabelled: int  # human ties kept and scored (all of them, on a resume too)

    def lines(self, out: Path) -> list[str]:
        """What `lora-dpo label` prints."""
        labels, means = self.labels, {name: round(v, 4) for name, v in self.labels.mean_scores.items()}
        reused = f" ({labels.n_pairs - labels.n_new} from an earlier run)" if labels.n_new < labels.n_pairs else ""
        ties = (f"{self.stats.dropped['ties']} dropped before scoring (--ties relabel scores them)"
                if self.ties == "drop" else f"{self.ties_relabelled} relabelled by the scorers")
        return [f"labelled {labels.n_pairs} pairs into {out}{reused}: {labels.n_swapped} swapped (the scorers prefer "
                f"jpg_1, and jpg_0 is the image people preferred), {labels.n_ties} scored as ties; mean scores "
                f"{means}",
                f"source: {self.stats.summary()}",
                f"human ties: {ties}"]


def _stop(where: str, why: str) -> None:
    raise DataError(f"{where}: {why} (--strict stops at the first unusable row; without it such rows are skipped "
                    "and counted)")


def usable_rows(records: Iterable[PairRecord], cfg: DataRecipe, stats: PairStats, *, strict: bool = False,
                done: set[str] | frozenset[str] = frozenset(), ties: list[int] | None = None) -> Iterator[PairRow]:
    """(pair_id, prompt, image_w, image_l) for every row training would use, decoded; pair_id = the row's `where`.

    `cfg.strict` is ignored: `strict` stops with an error naming the row and the CLI option. Rows in `done` are
    counted but not decoded (a resume pays nothing for them). `ties`, a one-element list, counts the human ties
    kept (scored now or in `done`).
    """
    reader, ties = ImageReader(), ties if ties is not None else [0]
    for record in records:
        pair = orient(record, cfg, stats)  # the ties policy and filters, exactly as for training
        if pair is None:
            if strict and record.where in stats.skipped:
                _stop(record.where, stats.skipped[record.where])
            continue
        tie = pair.label == TIE_LABEL  # oriented labels are >= 0.5: 0.5 only for a tie
        if pair.where in done:
            ties[0] += tie
            continue
        images = decode_pair(pair.image_w, pair.image_l, reader)
        if isinstance(images, str):
            stats.kept -= 1  # kept by the policy, unusable once decoded: each row counted once
            if images in POLICY_DROPS:  # identical images, seen only in the bytes
                stats.dropped[images] += 1
                continue
            stats.skip(pair.where, images, False)
            if strict:
                _stop(pair.where, images)
            continue
        ties[0] += tie
        yield pair.where, pair.prompt, images[0], images[1]


def relabel_source(source: str, scorers: list[tuple[Scorer, float]], out: Path, *, ties: str = "drop",
                   strict: bool = False, hard: bool = True, batch_size: int = 16, resume: bool = True,
                   temperature: float = 1.0) -> RelabelSummary:
    """Label the usable pairs of `source` (any `[data].source`) with `scorers` into `out` (see `label_pairs`)."""
    if ties not in TIES_CHOICES:
        raise RewardError(f"--ties {ties!r}: choose drop (as training does) or relabel (let the scorers decide)")
    cfg = DataRecipe(source=source, ties="keep" if ties == "relabel" else "drop")
    stats, tie_count = PairStats(), [0]
    done = labelled_ids(out) if resume else set()
    rows = usable_rows(read_records(cfg), cfg, stats, strict=strict, done=done, ties=tie_count)
    labels = label_pairs(rows, scorers, out, batch_size=batch_size, hard=hard, resume=resume,
                         temperature=temperature)
    if labels.n_pairs == 0:
        raise DataError(f"{source}: no usable pairs to label ({stats.summary()})")
    return RelabelSummary(labels, stats, "relabel" if ties == "relabel" else "drop", tie_count[0])
