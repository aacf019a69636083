"""The folder layout of sd-scripts' DPO work and many user sets: `w/` (preferred) and `l/` (rejected) images of the
same file names, the prompt in a `.txt` beside the `w` image (or the `l` one); mismatched names counted and
skipped, or the error under `[data].strict`; and a 2-step training run from such a folder."""

import json
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

from lora_dpo import data
from lora_dpo.recipe import DataRecipe
from lora_dpo.train import train


def _write_folders(root: Path, shapes_jsonl: Path, n: int = 6) -> Path:
    """The shapes set's first `n` pairs as w/ and l/ (PNG and JPEG mixed), captions beside w, one beside l."""
    rows = [json.loads(line) for line in shapes_jsonl.read_text().splitlines()[:n]]
    for folder in ("w", "l"):
        (root / folder).mkdir(parents=True)
    for index, row in enumerate(rows):
        stem = f"{index:04d}"
        suffix = ".jpg" if index % 2 else ".png"
        for folder, key in (("w", "chosen"), ("l", "rejected")):
            with Image.open(shapes_jsonl.parent / row[key]) as image:
                image.convert("RGB").save(root / folder / f"{stem}{suffix}")
        caption_folder = "l" if index == 1 else "w"  # a caption next to the l image is read too
        (root / caption_folder / f"{stem}.txt").write_text(row["prompt"] + "\n", encoding="utf-8")
    return root


def test_pair_folders_read_as_pairs_with_the_w_image_preferred(shapes_jsonl: Path, tmp_path: Path) -> None:
    root = _write_folders(tmp_path / "set", shapes_jsonl)
    records = list(data.read_records(DataRecipe(source=str(root))))
    assert len(records) == 6 and all(r.problem is None and r.label_0 == 1.0 for r in records)
    assert [Path(r.image_0).parent.name for r in records] == ["w"] * 6
    assert [Path(r.image_0).name for r in records] == [Path(r.image_1).name for r in records]
    assert records[1].prompt == (root / "l" / "0001.txt").read_text().strip()
    pairs, stats = data.prepare_pairs(iter(records), DataRecipe())
    assert len(pairs) == 6 and stats.kept == 6


def test_mismatched_names_are_counted_and_skipped_and_strict_stops(shapes_jsonl: Path, tmp_path: Path) -> None:
    root = _write_folders(tmp_path / "set", shapes_jsonl)
    (root / "l" / "0002.png").rename(root / "l" / "0002-renamed.png")  # w/0002.png loses its partner,
    (root / "w" / "0003.txt").unlink()  # w/0003.jpg its caption
    cfg = DataRecipe(source=str(root))
    pairs, stats = data.prepare_pairs(data.read_records(cfg), cfg)
    assert len(pairs) == 4 and stats.read == 7  # 0002 and 0002-renamed: two rows, each without its partner
    assert sorted(stats.skipped.values()) == ["no caption (0003.txt in w/ or l/, UTF-8)",
                                              "no image of the same name in l/", "no image of the same name in w/"]
    assert str(root / "w" / "0002.png") in stats.skipped
    strict = DataRecipe(source=str(root), strict=True)
    with pytest.raises(data.DataError, match=r"w/0002.png: no image of the same name in l/ \(\[data\].strict"):
        data.prepare_pairs(data.read_records(strict), strict)


def test_a_folder_without_w_and_l_is_still_read_as_parquet(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    with pytest.raises(data.DataError, match="no .parquet files in this folder"):
        list(data.read_records(DataRecipe(source=str(tmp_path))))


def test_training_two_steps_from_pair_folders(tiny_recipe, shapes_jsonl: Path, tmp_path: Path) -> None:
    root = _write_folders(tmp_path / "set", shapes_jsonl, n=8)
    shutil.copy(root / "w" / "0000.png", root / "w" / "orphan.png")  # skipped, counted, the run goes on
    path = train(tiny_recipe(data={"source": str(root), "val_pairs": 2}, train={"max_steps": 2}))
    summary = json.loads((path.parent / "metrics.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["loss"])
    assert "9 pairs read, 7 kept; dropped: 1 held-out prompt" in summary["data"]
