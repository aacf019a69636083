"""What a source yields and what the ties policy keeps: `PairRecord` (a row as read, label_0 = P(image 0
preferred)), `Pair` (oriented: `w` preferred), the image references they hold instead of bytes (`ParquetCell`,
`HubCell`, a path or encoded bytes), `PairStats` (rows read, kept, dropped by choice, skipped as unusable) and
`DataError`.

At Pick-a-Pic scale (~850K pairs, ~335 GB) no list of pairs holds image bytes: a pair keeps references, and a
loader worker fetches the image when it needs it (`images.ImageReader`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lora_dpo.errors import LoraDpoError

HELD_OUT_PROMPT = "held-out prompt"  # a training pair whose prompt is held out: never trained on, never measured
POLICY_DROPS = ("ties", "identical images", "unlabelled", HELD_OUT_PROMPT)  # left out by choice, not broken


class DataError(LoraDpoError, ValueError):
    """Preference data that cannot be used; the message names the file and the row."""


@dataclass(frozen=True, slots=True)
class ParquetCell:
    """An image that stays in its parquet file until a worker needs it: `column` of `row` in row group `group`."""

    file: str
    group: int
    row: int
    column: str


@dataclass(eq=False)
class HubTable:
    """The image columns of a downloaded hub split (memory-mapped Arrow; pickles as a file reference, so loader
    workers reopen it instead of copying it), images left encoded."""

    name: str
    images: Any  # datasets.Dataset


@dataclass(frozen=True, slots=True)
class HubCell:
    table: HubTable
    row: int
    column: str


ImageRef = str | bytes | ParquetCell | HubCell  # a file path, encoded bytes (streamed rows), or a cell


@dataclass(frozen=True)
class PairRecord:
    prompt: str
    image_0: ImageRef
    image_1: ImageRef
    label_0: float  # probability that image_0 is preferred: 1, 0, or 0.5 for a tie
    where: str  # "file:line" or "file row N", for messages
    problem: str | None = None  # why the row is unusable, when reading it already shows (e.g. "missing image")
    has_label: bool = True  # Pick-a-Pic's has_label
    are_different: bool = True  # Pick-a-Pic's are_different


@dataclass(frozen=True, slots=True)
class Pair:
    """A pair after the ties policy: `w` is the preferred image, `label` the probability it is (>= 0.5)."""

    prompt: str
    image_w: ImageRef
    image_l: ImageRef
    label: float
    where: str


@dataclass
class PairStats:
    """What happened to the source's rows: counted by `prepare_pairs`, then by the loaders (items carry their
    share to the main process) and merged across processes for the end-of-run summary."""

    read: int = 0
    kept: int = 0  # usable pairs: trained on, or held out
    dropped: Counter = field(default_factory=Counter)  # left out by the policy (POLICY_DROPS)
    skipped: dict[str, str] = field(default_factory=dict)  # unusable rows: where -> why, each row once
    converted: dict[str, str] = field(default_factory=dict)  # images made RGB: "where (w|l)" -> their mode, once
    held: int = 0  # of `kept`, pairs of held-out prompts (a stream's): never trained on
    measured: int = 0  # of `held`, those in the held-out set, measured during training

    def skip(self, where: str, why: str, strict: bool) -> None:
        if strict:
            raise DataError(f"{where}: {why} ([data].strict = true stops at the first unusable row; set it to "
                            "false to skip such rows and count them)")
        self.skipped.setdefault(where, why)

    def drain(self) -> PairStats:
        """A copy of the counts so far, leaving this one empty (a stream hands its counts out with each item)."""
        copy = PairStats(self.read, self.kept, self.dropped.copy(), dict(self.skipped), dict(self.converted),
                         self.held, self.measured)
        self.read, self.kept, self.dropped, self.skipped, self.converted = 0, 0, Counter(), {}, {}
        self.held = self.measured = 0
        return copy

    def to_json(self) -> dict[str, Any]:
        """For a checkpoint's state.json: a resumed run's closing line then counts the rows read before it too."""
        return {"read": self.read, "kept": self.kept, "dropped": dict(self.dropped), "skipped": self.skipped,
                "converted": self.converted, "held": self.held, "measured": self.measured}

    @classmethod
    def from_json(cls, saved: dict[str, Any]) -> PairStats:
        return cls(int(saved["read"]), int(saved["kept"]), Counter(saved["dropped"]), dict(saved["skipped"]),
                   dict(saved["converted"]), int(saved.get("held", 0)), int(saved.get("measured", 0)))

    def merge(self, other: PairStats) -> None:
        self.read += other.read
        self.kept += other.kept
        self.held += other.held
        self.measured += other.measured
        self.dropped.update(other.dropped)
        for where, why in other.skipped.items():
            self.skipped.setdefault(where, why)
        for where, mode in other.converted.items():
            self.converted.setdefault(where, mode)

    def summary(self) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        text = f"{self.read} pairs read, {self.kept} kept; dropped: {drops}"
        if self.held:  # a stream's held-out prompts: their pairs are held out, not dropped
            unmeasured = f", {self.held - self.measured} not measured" if self.held > self.measured else ""
            text = (f"{self.read} pairs read: {self.kept - self.held} train, {self.held} held out ({self.measured} "
                    f"measured{unmeasured}); dropped: {drops}")
        if self.converted:
            modes = Counter(self.converted.values())
            text += (f"; converted {len(self.converted)} images to RGB ("
                     + ", ".join(f"{n} {mode}" for mode, n in sorted(modes.items(), key=lambda m: (-m[1], m[0])))
                     + ")")
        return text + "; " + self.skipped_summary() if self.skipped else text

    def skipped_summary(self) -> str:
        if not self.skipped:
            return "no unusable pairs"
        first: dict[str, str] = {}
        for where, why in self.skipped.items():
            first.setdefault(why, where)
        counts = Counter(self.skipped.values())
        return f"skipped {len(self.skipped)} unusable: " + ", ".join(
            f"{n} {why} (first: {first[why]})" for why, n in counts.most_common())


@dataclass
class HeldOut:
    """The held-out pairs and how they were chosen: by prompt from the training source (`split` None), or from
    another split of the same dataset (`[data].val_split`). Either way no training pair shares a prompt (and so
    an image) with them. Described in the data summary, metrics.json and the model card; listed in heldout.jsonl."""

    pairs: list[Pair]
    split: str | None = None

    def prompts(self) -> int:
        return len({pair.prompt for pair in self.pairs})

    def describe(self) -> str:
        if not self.pairs:
            return "no held-out pairs"
        how = f"from split {self.split!r}" if self.split else "held out by prompt from the training source"
        return f"{len(self.pairs)} pairs, {self.prompts()} prompts never trained on, {how}"

    def rows(self) -> list[dict[str, Any]]:
        """heldout.jsonl's lines: each pair's prompt, label and where it was read (file and row or line, or the
        dataset, split and row)."""
        return [{"prompt": pair.prompt, "where": pair.where, "label": pair.label} for pair in self.pairs]
