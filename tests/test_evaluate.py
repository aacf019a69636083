"""Evaluation on the tiny base: win-rate arithmetic, prompt sets, seeded generation, the eval report and grids,
resuming (the training-time samples and plot are in test_train_samples.py). Real diffusers pipelines, real peft
adapters, a tiny CLIP scorer with random weights (its numbers mean nothing; the mechanics are what is tested)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_dpo import evaluate, recipe
from lora_dpo.evaluate import EvalError, load_prompts, win_rate
from lora_dpo.export import ADAPTER_FILE
from lora_dpo.train import train

ROOT = Path(__file__).parent.parent
PROMPTS = ["a red circle", "a blue square", "a green triangle"]


# --------------------------------------------------------------------------------------------------
# Win rate


def test_win_rate_on_known_scores() -> None:
    """adapter [3, 2, 1, 5] vs base [1, 2, 3, 0]: outcomes win, tie, loss, win = 1 + 0.5 + 0 + 1 = 2.5 of 4
    = 0.625; differences +2, 0, -2, +5: mean 5 / 4 = 1.25."""
    result = win_rate([3.0, 2.0, 1.0, 5.0], [1.0, 2.0, 3.0, 0.0])
    assert result.rate == 0.625 and result.mean_diff == 1.25
    assert (result.wins, result.ties, result.losses, result.n) == (2, 1, 1, 4)
    assert result.low <= result.rate <= result.high and result.diff_low <= 1.25 <= result.diff_high
    always = win_rate([2.0] * 5, [1.0] * 5)  # every resample is all wins
    assert (always.rate, always.low, always.high) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="equal-length"):
        win_rate([1.0, 2.0], [1.0])


def test_bootstrap_interval_matches_the_normal_approximation_and_widens_for_clustered_seeds() -> None:
    """600 wins in 1000 independent comparisons: the 95 % interval is about 0.6 +- 1.96 sqrt(0.24 / 1000) =
    0.6 +- 0.030. The same outcomes as 100 prompts x 10 seeds that always agree hold the evidence of 100
    comparisons: 0.6 +- 1.96 sqrt(0.24 / 100) = 0.6 +- 0.096, and resampling prompts must say so."""
    outcomes = np.repeat(np.r_[np.ones(60), np.zeros(40)], 10)  # 100 prompts, 10 identical seeds each
    adapter, base = outcomes, np.full(1000, 0.5)
    independent = win_rate(adapter, base, draws=4000)
    assert independent.rate == 0.6
    assert independent.low == pytest.approx(0.6 - 0.0304, abs=0.006)
    assert independent.high == pytest.approx(0.6 + 0.0304, abs=0.006)
    clustered = win_rate(adapter, base, groups=np.repeat(np.arange(100), 10), draws=4000)
    assert clustered.rate == 0.6
    assert clustered.high - clustered.low == pytest.approx(2 * 0.096, abs=0.02)
    assert win_rate(adapter, base, draws=500, seed=3) == win_rate(adapter, base, draws=500, seed=3)  # seeded


# --------------------------------------------------------------------------------------------------
# Prompt sets


def test_prompt_files_in_every_format(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue square \n")
    (tmp_path / "p.csv").write_text('Prompt,Category\n"a red circle, big",Basic\na blue square,Basic\n')
    (tmp_path / "p.tsv").write_text("id\tcaption\n1\ta red circle\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle"}\n{"prompt": "a blue square"}\n')
    (tmp_path / "hps.json").write_text(json.dumps(["a red circle", "a blue square"]))  # the HPS v2 layout
    assert load_prompts(str(tmp_path / "p.txt")) == ["a red circle", "a blue square"]
    assert load_prompts(str(tmp_path / "p.csv")) == ["a red circle, big", "a blue square"]
    assert load_prompts(str(tmp_path / "p.tsv")) == ["a red circle"]
    assert load_prompts(str(tmp_path / "p.jsonl"), limit=1) == ["a red circle"]
    assert load_prompts(str(tmp_path / "hps.json")) == ["a red circle", "a blue square"]
    # a run's heldout.jsonl repeats its prompts: each is evaluated once, in the order first seen
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps({"prompt": p, "label": 1.0}) + "\n"
                                                    for p in ["a blue circle", "a red square", "a blue circle"]))
    assert load_prompts(str(tmp_path / "heldout.jsonl")) == ["a blue circle", "a red square"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(EvalError, match=r"bad.jsonl:2: not valid JSON"):
        load_prompts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "nocol.csv").write_text("words\nhello\n")
    with pytest.raises(EvalError, match=r"nocol.csv: no prompt column .* found \['words'\]"):
        load_prompts(str(tmp_path / "nocol.csv"))
    with pytest.raises(EvalError, match="no such file"):
        load_prompts(str(tmp_path / "absent.txt"))
    with pytest.raises(EvalError, match="HPS v2 styles are"):
        load_prompts("hpsv2:cartoons")


def test_a_dataset_folder_goes_through_datasets_like_a_hub_set(tmp_path: Path, monkeypatch) -> None:
    """PartiPrompts' layout (a `Prompt` column) in a local folder, read by `datasets.load_dataset` as the hub
    set is; only the download differs."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # not the user's cache
    folder = tmp_path / "parti"
    folder.mkdir()
    (folder / "PartiPrompts.tsv").write_text("Prompt\tCategory\tChallenge\tNote\na red circle, big\tBasic\tBasic\t\n"
                                             "a blue square\tBasic\tBasic\t\n")  # the hub file's layout
    assert load_prompts(str(folder)) == ["a red circle, big", "a blue square"]


# --------------------------------------------------------------------------------------------------
# A trained tiny adapter and a tiny CLIP scorer


@pytest.fixture(scope="module")
def trained_adapter(tiny_base_dir: Path, shapes_jsonl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval_adapter")
    train(recipe.from_dict({
        "model": {"base": str(tiny_base_dir)},
        "data": {"source": str(shapes_jsonl), "resolution": 64, "val_pairs": 0},
        "objective": {"beta": 2000.0},
        "train": {"learning_rate": 1e-2, "max_steps": 4, "batch_size": 2, "mixed_precision": "no",
                  "optimizer": "adamw", "log_every": 2, "checkpoint_every": 0},
        "output": {"dir": str(out), "name": "tiny"}}))
    return out / "tiny"


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_same_seed_gives_the_same_base_images_and_the_adapter_off_is_the_base(trained_adapter: Path,
                                                                               tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    pipe = evaluate.load_pipeline(evaluate.base_from_recipe(trained_adapter), trained_adapter, torch.device("cpu"),
                                  torch.float32)
    evaluate.generation._use_scale(pipe, None)
    first = np.asarray(evaluate.generate(pipe, PROMPTS[0], 7, 2, 5.0, 64))
    again = np.asarray(evaluate.generate(pipe, PROMPTS[0], 7, 2, 5.0, 64))
    other_seed = np.asarray(evaluate.generate(pipe, PROMPTS[0], 8, 2, 5.0, 64))
    evaluate.generation._use_scale(pipe, 1.0)
    adapted = np.asarray(evaluate.generate(pipe, PROMPTS[0], 7, 2, 5.0, 64))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other_seed) and not np.array_equal(first, adapted)
    plain = DiffusionPipeline.from_pretrained(evaluate.base_from_recipe(trained_adapter))  # never saw the adapter
    plain.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(np.asarray(evaluate.generate(plain, PROMPTS[0], 7, 2, 5.0, 64)), first)


def test_eval_writes_report_and_grids_and_resumes(trained_adapter: Path, tiny_clip_dir: Path, tmp_path: Path) -> None:
    from lora_dpo.rewards import build_scorer

    scorer = build_scorer("pickscore", str(tiny_clip_dir))
    out = tmp_path / "eval"
    kwargs = dict(scales=(0.5, 1.0), seeds=(0, 1), steps=2, rows_per_grid=4)
    report = evaluate.evaluate_adapter(trained_adapter, PROMPTS, "three.txt", [scorer], out, **kwargs)
    assert report["images_generated"] == 3 * 2 * 3 and report["images_reused"] == 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["summary"].keys() == {"pickscore"} and saved["summary"]["pickscore"].keys() == {"0.5", "1"}
    assert saved["generation"]["scheduler"] == "EulerDiscreteScheduler" and saved["generation"]["resolution"] == 64
    assert [row["prompt"] for row in saved["per_prompt"]] == PROMPTS
    for scale, variant in (("0.5", "adapter-0.5"), ("1", "adapter-1")):  # the summary agrees with the rows
        summary = saved["summary"]["pickscore"][scale]
        base = np.array([row["scores"]["pickscore"]["base"] for row in saved["per_prompt"]])  # (prompts, seeds)
        adapted = np.array([row["scores"]["pickscore"][variant] for row in saved["per_prompt"]])
        assert summary["n"] == 6 and summary["wins"] + summary["ties"] + summary["losses"] == 6
        assert summary["rate"] == pytest.approx(((adapted > base) + 0.5 * (adapted == base)).mean())
        assert summary["mean_diff"] == pytest.approx((adapted - base).mean())
        assert summary["low"] <= summary["rate"] <= summary["high"]
    rescored = scorer.score([PROMPTS[1]], [Image.open(out / "images" / "00001_1_adapter-0.5.png")])
    assert saved["per_prompt"][1]["scores"]["pickscore"]["adapter-0.5"][1] == pytest.approx(rescored.item(), abs=1e-5)
    markdown = (out / "report.md").read_text()
    assert "| pickscore | adapter x0.5 |" in markdown and "](grids/grid-000.png)" in markdown and "a green triangle" \
        in markdown
    assert "| # | prompt | scorer | base | adapter x0.5 | adapter x1 |" in markdown  # one label per strength
    _assert_reads_as_too_few_prompts(report, markdown, 3)

    assert saved["grids"] == ["grids/grid-000.png", "grids/grid-001.png"]  # 6 rows, 4 per grid
    with Image.open(out / "grids" / "grid-000.png") as grid:
        assert grid.width == 2 * 6 + 3 * 128 + 2 * 4  # padding, three columns (64 px images: 128 px cells), gaps
        cell = np.asarray(grid.convert("RGB"))[30:30 + 128, 6:6 + 128]  # row 0 (prompt 0, seed 0), base column
    expected = np.asarray(Image.fromarray(_pixels(out / "images" / "00000_0_base.png")).resize((128, 128), 0))
    np.testing.assert_array_equal(cell, expected)

    times = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    again = evaluate.evaluate_adapter(trained_adapter, PROMPTS, "three.txt", [scorer], out, **kwargs)
    assert again["images_generated"] == 0 and again["images_reused"] == 18
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == times
    assert again["summary"] == report["summary"]
    more = evaluate.evaluate_adapter(trained_adapter, [*PROMPTS, "a red square"], "four.txt", [], out,
                                     **{**kwargs, "scales": (1.0,)})
    assert more["images_generated"] == 2 * 2 and more["summary"] == {}  # only the new prompt's images
    fewer_steps = evaluate.evaluate_adapter(trained_adapter, PROMPTS[:1], "one.txt", [], out,
                                            **{**kwargs, "steps": 3, "scales": (1.0,)})
    assert fewer_steps["images_generated"] == 4  # other settings: nothing is reused


ZERO_WIDTH = re.compile(r"([+-]?\d[\d.e+-]*%?) - \1(?![\d.])")  # "75.0% - 75.0%", "+0.1 - +0.1"


def _assert_reads_as_too_few_prompts(report: dict, markdown: str, n_prompts: int) -> None:
    """Below 20 prompts, the report and the terminal say the intervals are over N prompts and too few to trust;
    a zero-width interval is never printed; what the scorer's scale means is said once."""
    lines = evaluate.summary_lines(report)
    assert lines[0].startswith("pickscore: PickScore: the model's logit scale x the cosine of image and prompt")
    assert f"**Only {n_prompts} prompt{'s' if n_prompts > 1 else ''}: too few to trust the intervals below.**" in \
        markdown
    assert "- **pickscore**: PickScore: the model's logit scale" in markdown
    for line in lines[1:]:
        assert line.startswith("pickscore, adapter x") and "too few" in line, line
    for r in report["summary"]["pickscore"].values():
        assert "too few" in r["interval_note"]
    assert not ZERO_WIDTH.search(markdown) and not any(ZERO_WIDTH.search(line) for line in lines)


def test_a_one_prompt_eval_never_prints_a_zero_width_interval(trained_adapter: Path, tiny_clip_dir: Path,
                                                              tmp_path: Path) -> None:
    """One prompt: every bootstrap draw is that prompt, so the interval has zero width whatever the scores. The
    report says there is none and why, instead of "62.5% - 62.5%"."""
    from lora_dpo.rewards import build_scorer

    out = tmp_path / "eval"
    report = evaluate.evaluate_adapter(trained_adapter, PROMPTS[:1], "one.txt", [build_scorer("pickscore", str(
        tiny_clip_dir))], out, scales=(1.0,), seeds=(0, 1, 2, 3), steps=2)
    r = report["summary"]["pickscore"]["1"]
    assert r["low"] == r["high"]  # the raw bootstrap, kept in report.json as data
    assert r["interval_note"] == ("no interval: resampling the 1 prompt never moves the rate; 1 prompt is too few "
                                  "for an interval (evaluate 20 or more)")
    markdown = (out / "report.md").read_text()
    assert f"| pickscore | adapter x1 | **{r['rate']:.1%}** (no interval) | {r['mean_diff']:+.4g} (no interval) |" \
        in markdown
    [line] = evaluate.summary_lines(report)[1:]
    assert "95 % CI" not in line and "no interval: resampling the 1 prompt never moves the rate" in line
    _assert_reads_as_too_few_prompts(report, markdown, 1)


def test_cli_eval_prints_win_rates_and_rejects_bad_input(trained_adapter: Path, tiny_clip_dir: Path,
                                                         tmp_path: Path) -> None:
    """In process (typer's runner): the command's parsing, delegation and error handling, without paying a
    subprocess's imports."""
    from typer.testing import CliRunner

    from lora_dpo.cli import app

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    args = ["eval", str(trained_adapter), "--prompts", str(prompts), "--scorer", f"pickscore@{tiny_clip_dir}",
            "--scale", "0.5,1", "--steps", "2", "--threads", "1", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output[-2000:]
    assert "pickscore, adapter x0.5: wins" in result.stdout and "2 prompts are too few to trust an interval" in \
        result.stdout and "pickscore: PickScore:" in result.stdout
    assert (tmp_path / "out" / "report.md").is_file() and (tmp_path / "out" / "grids" / "grid-000.png").is_file()
    for bad, message in (([*args[:3], str(tmp_path / "absent.txt")], "absent.txt': no such file"),
                         ([*args, "--scorer", "pickscore@/no/such/dir"], "--scorer 'pickscore@/no/such/dir'"),
                         ([*args, "--scale", "half"], "--scale 0.5,1, half: expected numbers")):
        failed = CliRunner().invoke(app, bad)
        assert failed.exit_code == 2 and message in failed.stderr, failed.output
        assert "Traceback" not in failed.stderr


def test_user_errors_name_the_input(trained_adapter: Path, tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="no adapter here"):
        evaluate.adapter_file(tmp_path)
    (tmp_path / ADAPTER_FILE).write_bytes((trained_adapter / ADAPTER_FILE).read_bytes())
    with pytest.raises(EvalError, match="no recipe.toml .* pass --base"):
        evaluate.base_from_recipe(tmp_path)
    with pytest.raises(EvalError, match="--base .*absent"):
        evaluate.load_pipeline(str(tmp_path / "absent"), tmp_path, torch.device("cpu"), torch.float32)


def test_eval_errors_belong_to_the_project_family_and_stay_value_errors(tmp_path: Path) -> None:
    """The CLI catches `LoraDpoError`; callers that caught the old `ValueError` still catch it."""
    from lora_dpo.errors import LoraDpoError

    assert issubclass(EvalError, LoraDpoError) and issubclass(EvalError, ValueError)
    with pytest.raises(LoraDpoError, match="no such file"):
        load_prompts(str(tmp_path / "absent.txt"))


# --------------------------------------------------------------------------------------------------
# The package


def test_the_package_exports_what_it_lists_and_each_module_is_short() -> None:
    """Every name in `__all__` resolves, and each module holds one idea: none over 450 lines."""
    assert all(hasattr(evaluate, name) for name in evaluate.__all__)
    assert {"EvalError", "load_prompts", "win_rate", "make_grid", "generate", "evaluate_adapter"} <= {
        *evaluate.__all__}
    for module in Path(evaluate.__file__).parent.glob("*.py"):
        assert len(module.read_text().splitlines()) <= 450, module


def test_evaluation_does_not_import_training() -> None:
    """Arrows point down: `train.samples` uses the evaluate package, never the other way round."""
    import ast

    for module in Path(evaluate.__file__).parent.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        assert not {name for name in imported if name.startswith("lora_dpo.train")}, module
