"""`lora-dpo pairs` on the tiny base with a tiny CLIP as the scorer: the pairs follow the scores, training reads the
file as it is, and a rerun reuses every image. Real components throughout (64 px, 2 inference steps)."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from lora_dpo import pairs
from lora_dpo.rewards import ClipScorer

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
SETTINGS = dict(images_per_prompt=3, steps=2, resolution=64, precision="no")


@pytest.fixture(scope="module")
def written(tiny_base_dir: Path, tiny_clip: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One generated set (3 prompts x 3 images), shared by the tests that read it."""
    model, processor = tiny_clip
    scorer = ClipScorer("pickscore", model=model, processor=processor)
    out = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    summary = pairs.generate_pairs(PROMPTS, str(tiny_base_dir), [(scorer, 1.0)], out, **SETTINGS)
    return out, summary, scorer


def test_the_pairs_follow_the_scores(written: tuple) -> None:
    out, summary, scorer = written
    rows = pq.read_table(out).to_pylist()
    assert summary.generated == 9 and summary.reused == 0 and summary.pairs + summary.ties == 3
    assert len(rows) == summary.pairs >= 1
    for row in rows:
        assert row["label_0"] == 1.0 and row["label_1"] == 0.0  # jpg_0 is the chosen image
        assert row["score_0_pickscore"] >= row["score_1_pickscore"]
        images = [Image.open(io.BytesIO(row[c])).convert("RGB") for c in ("jpg_0", "jpg_1")]
        assert images[0].size == (64, 64)
        rescored = scorer.score([row["caption"]] * 2, images)
        assert_close(rescored.double(), torch.tensor([row["score_0_pickscore"], row["score_1_pickscore"]],
                                                     dtype=torch.float64), atol=1e-4, rtol=0)
        others = [Image.open(pairs.images_dir(out) / f"{row['prompt_index']:05d}_{s}_base.png").convert("RGB")
                  for s in range(3)]  # the chosen image is the best of the prompt's three, the rejected the worst
        all_scores = scorer.score([row["caption"]] * 3, others)
        assert rescored[0] == pytest.approx(all_scores.max().item(), abs=1e-4)
        assert rescored[1] == pytest.approx(all_scores.min().item(), abs=1e-4)
    assert summary.margins["pickscore"] > 0
    assert [p.name for p in summary.grids] == ["grid-000.png"] and summary.grids[0].is_file()


def test_a_recipe_trains_from_the_written_file_and_the_adapter_makes_the_next_round(
        written: tuple, tiny_recipe, tiny_base_dir: Path, tmp_path: Path) -> None:
    from lora_dpo.train import train

    out, _, scorer = written
    run = train(tiny_recipe(data={"source": str(out), "val_pairs": 0}, train={"max_steps": 2, "batch_size": 1}))
    assert run.is_file()
    round2 = tmp_path / "round2.parquet"
    summary = pairs.generate_pairs(PROMPTS[:1], str(tiny_base_dir), [(scorer, 1.0)], round2, adapter=run.parent,
                                   **{**SETTINGS, "images_per_prompt": 2})
    assert summary.generated == 2 and sorted(p.name for p in pairs.images_dir(round2).iterdir()) == [
        "00000_0_adapter-1.png", "00000_1_adapter-1.png"]


def test_a_rerun_reuses_every_image(written: tuple, tiny_base_dir: Path) -> None:
    out, first, scorer = written
    times = {p.name: p.stat().st_mtime_ns for p in pairs.images_dir(out).iterdir()}
    again = pairs.generate_pairs(PROMPTS, str(tiny_base_dir), [(scorer, 1.0)], out, **SETTINGS)
    assert again.generated == 0 and again.reused == 9
    assert {p.name: p.stat().st_mtime_ns for p in pairs.images_dir(out).iterdir()} == times
    assert again.pairs == first.pairs and again.margins == first.margins


def test_combine_scores_standardises_several_scorers() -> None:
    """Scorer a: [[1, 3], [0, 0]], deviations from each prompt's mean [[-1, 1], [0, 0]], rms sqrt(2/4);
    scorer b: [[10, 10], [4, 0]], deviations [[0, 0], [2, -2]], rms sqrt(8/4). Weights [1, 2]:
    combined = a / 0.7071 + 2 * b / 1.4142 = [[1.414 + 14.14, 4.243 + 14.14], [5.657, 0]]."""
    scores = torch.tensor([[[1.0, 3.0], [0.0, 0.0]], [[10.0, 10.0], [4.0, 0.0]]])
    combined = pairs.combine_scores(scores, [1.0, 2.0])
    expected = scores[0] / 0.5**0.5 + 2 * scores[1] / 2**0.5
    assert_close(combined, expected.double())
    assert combined.argmax(dim=1).tolist() == [1, 0]
    assert_close(pairs.combine_scores(scores[:1], [3.0]), 3 * scores[0].double())  # one scorer: its own unit


def test_cli_pairs_and_its_errors(tiny_base_dir: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    """In process (typer's runner): the command parses, delegates, prints, and turns user errors into one line."""
    from typer.testing import CliRunner

    from lora_dpo.cli import app

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    out = tmp_path / "pairs.parquet"
    args = ["pairs", str(prompts), "--base", str(tiny_base_dir), "--scorer", f"pickscore@{tiny_clip_dir}",
            "--images-per-prompt", "2", "--steps", "2", "--resolution", "64", "--precision", "no", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output[-2000:]
    assert "(best vs worst of each prompt)" in result.stdout and "4 generated, 0 reused" in result.stdout
    assert pq.read_metadata(out).num_rows + int(result.stdout.split("; ")[1].split()[0]) == 2
    for bad, message in (([*args[:1], str(tmp_path / "absent.txt"), *args[2:]], "absent.txt': no such file"),
                         ([*args, "--scorer", "imagereward"], "unknown scorer kind 'imagereward'"),
                         ([*args, "--precision", "fp8"], "--precision 'fp8'")):
        failed = CliRunner().invoke(app, bad)
        assert failed.exit_code == 2 and message in failed.stderr, failed.output
        assert "Traceback" not in failed.stderr
        assert failed.stderr.strip().splitlines()[-1].startswith("lora-dpo: error: ")  # above it: progress bars
