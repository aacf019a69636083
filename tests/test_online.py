"""Online DPO (`[online]`): rounds of generating with the adapter being trained, scoring, pairing and training, on
the tiny base with the built-in shapes judge; kill-safe and exact; bad input refused before a step."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from lora_dpo import checkpoint, recipe
from lora_dpo.export import ADAPTER_FILE
from lora_dpo.online import OnlineError, round_folder
from lora_dpo.recipe import RecipeError

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a purple square",
           "an orange triangle", "a red square", "a blue circle"]
HELDOUT = ["a drawing of a red circle", "a simple blue square", "a photo of a green triangle"]


@pytest.fixture
def online_recipe(tiny_base_dir: Path, tmp_path: Path):
    """An online recipe on the tiny base: 2 rounds x 3 steps, 8 training prompts x 3 images of 4 inference steps,
    3 held-out prompts; the shapes judge."""
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "heldout.txt").write_text("\n".join(HELDOUT) + "\n")

    def make(name: str = "online", **sections: dict[str, Any]) -> recipe.Recipe:
        raw: dict[str, dict[str, Any]] = {
            "model": {"base": str(tiny_base_dir)},
            "data": {"resolution": 64},
            "objective": {"beta": 500.0},
            "online": {"rounds": 2, "steps_per_round": 3, "prompts": str(tmp_path / "prompts.txt"),
                       "heldout_prompts": str(tmp_path / "heldout.txt"), "samples_per_prompt": 3,
                       "scorers": ["shapes"], "steps": 4, "heldout_seeds": 1},
            "train": {"learning_rate": 1e-3, "max_steps": 6, "batch_size": 2, "mixed_precision": "no",
                      "optimizer": "adamw", "log_every": 1, "checkpoint_every": 0, "num_threads": 1},
            "sample": {"every": 0},
            "output": {"dir": str(tmp_path / "adapters"), "name": name},
        }
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return recipe.from_dict(raw)

    return make


def _stock_latents(base_dir: Path, prompt: str, seeds: list[int], steps: int) -> torch.Tensor:
    """What a stock diffusers pipeline of the base makes for `prompt` from `seeds` (no adapter)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    return pipe(prompt, num_images_per_prompt=len(seeds), generator=generators, height=64, width=64,
                num_inference_steps=steps, output_type="latent").images


def test_rounds_train_on_the_adapters_own_images_and_keep_each_round_as_a_data_set(online_recipe, tiny_base_dir):
    from lora_dpo import data
    from lora_dpo.train import train

    cfg = online_recipe()
    adapter = train(cfg)
    run_dir = adapter.parent
    first, second = (round_folder(run_dir, i) for i in (0, 1))
    record = json.loads((first / "round.json").read_text())
    # round 1 draws with the base itself (the LoRA starts at zero): the stock pipeline's latents for its seeds
    latents = load_file(first / "latents" / "00000.safetensors")["latents"]  # (N, C, h, w)
    assert latents.shape == (3, 4, 8, 8)
    stock = _stock_latents(tiny_base_dir, PROMPTS[0], record["seeds"], 4)
    torch.testing.assert_close(latents, stock, rtol=1e-4, atol=1e-4)
    # round 2 draws with the adapter after round 1's steps: not the base's images any more
    seeds_2 = json.loads((second / "round.json").read_text())["seeds"]
    assert seeds_2 != record["seeds"]
    base_2 = _stock_latents(tiny_base_dir, PROMPTS[0], seeds_2, 4)
    assert not torch.allclose(load_file(second / "latents" / "00000.safetensors")["latents"], base_2, atol=1e-4)

    # each round's pairs are an ordinary data set: Pick-a-Pic layout, the round and both seeds beside the scores
    table = pq.read_table(first / "pairs.parquet").to_pylist()
    assert len(table) == len(record["pairs"]) > 0
    assert {row["round"] for row in table} == {1}
    assert all(row["score_0_shapes"] > row["score_1_shapes"] and row["label_0"] == 1.0 for row in table)
    assert all(row["seed_0"] in record["seeds"] and row["caption"] in PROMPTS for row in table)
    pairs = list(data.read_records(recipe.DataRecipe(source=str(first / "pairs.parquet"))))
    assert len(pairs) == len(table) and all(pair.label_0 == 1.0 for pair in pairs)

    # every round measured on held-out prompts, in metrics.json and metrics.jsonl, with its grid
    summary = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    shapes = summary["rounds"][1]["heldout"]["shapes"]
    assert shapes["n"] == len(HELDOUT) and shapes["low"] <= shapes["rate"] <= shapes["high"]
    assert shapes["diff_low"] <= shapes["mean_diff"] <= shapes["diff_high"]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["round"]) for r in logged if "round" in r] == [(3, 1), (6, 2)]
    assert all((round_folder(run_dir, i) / "grid.png").is_file() for i in (0, 1))
    assert (run_dir / "training.png").is_file()
    card = (run_dir / "README.md").read_text()  # the card says what it learned from: its own images, judged
    assert "shapes scores of its own images, online" in card and "| 2 | " in card.split("## Rounds")[1]
    assert "pickapic" not in card
    # the held-out prompts were never trained on: no round drew images for them
    assert not set(HELDOUT) & {row["caption"] for i in (0, 1)
                               for row in pq.read_table(round_folder(run_dir, i) / "pairs.parquet").to_pylist()}


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}") and '"loss"' in line]


def test_killed_in_generation_and_in_training_resumes_to_the_same_adapter(online_recipe, tmp_path, launch):
    """SIGKILL a real `lora-dpo train` while round 2 generates, resume it and SIGKILL it again mid-training of round
    2, resume to the end: the adapter equals an uninterrupted run's, tensor for tensor, and no image made before a
    kill is made again."""
    from lora_dpo.train import train

    def make(name: str) -> recipe.Recipe:
        return online_recipe(name, lora={"dropout": 0.1}, train={"checkpoint_every": 1})

    path = tmp_path / "killed.toml"
    path.write_text(make("killed").to_toml())
    run_dir = tmp_path / "adapters" / "killed"
    latents = round_folder(run_dir, 1) / "latents"

    proc = launch("train", str(path))
    proc.wait_until(lambda: latents.is_dir() and len(list(latents.glob("*.safetensors"))) >= 2)
    os.killpg(proc.proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and not (round_folder(run_dir, 1) / "round.json").exists()
    made = {p.name: p.stat().st_mtime_ns for p in latents.glob("*.safetensors")}

    proc = launch("train", str(path), "--resume", "latest")
    proc.wait_until(lambda: max(_logged_steps(run_dir), default=0) >= 4)  # a checkpoint every step: one at 4
    os.killpg(proc.proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and not (run_dir / ADAPTER_FILE).exists()
    assert {p.name: p.stat().st_mtime_ns for p in latents.glob("*.safetensors") if p.name in made} == made

    resumed = load_file(train(make("killed"), resume="latest"))
    reference = load_file(train(make("reference")))
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference), "the resumed adapter differs"


def test_bad_online_recipes_are_one_line_before_anything_loads(online_recipe, tmp_path) -> None:
    with pytest.raises(RecipeError, match=r"\[online\].rounds 2 x steps_per_round 3 = 6 .* set train.max_steps = 6"):
        online_recipe(train={"max_steps": 10})
    with pytest.raises(RecipeError, match=r"\[online\].prompts: an online run needs prompts"):
        online_recipe(online={"prompts": "none"})
    with pytest.raises(RecipeError, match=r"\[online\].heldout = 0 and no heldout_prompts"):
        online_recipe(online={"heldout_prompts": "none", "heldout": 0})


def test_a_scorer_that_cannot_load_and_a_round_of_ties_stop_before_a_training_step(online_recipe) -> None:
    from lora_dpo.errors import LoraDpoError
    from lora_dpo.train import train

    cfg = online_recipe("no-prompts", online={"prompts": "/nowhere/prompts.txt"})
    with pytest.raises(OnlineError, match=r"^\[online\].prompts = '/nowhere/prompts.txt': no such file"):
        train(cfg)
    cfg = online_recipe("offline-scorer", online={"scorers": ["pickscore@/nowhere/pickscore"]})
    with pytest.raises(LoraDpoError, match=r"^\[online\].scorers: scorer 'pickscore' from '/nowhere/pickscore'"):
        train(cfg)
    assert not (Path(cfg.output.dir) / "offline-scorer").exists()  # refused before the base loaded

    cfg = online_recipe("ties", online={"pair_rule": "margin", "margin": 100.0})
    with pytest.raises(OnlineError, match=r"round 1: 0 pair\(s\) .* \[online\].min_pairs = 1; lower \[online\].margin"):
        train(cfg)
    run_dir = Path(cfg.output.dir) / "ties"
    assert [checkpoint.read_state(c)["step"] for c in checkpoint.list_checkpoints(run_dir)] == [0]  # resumable
    assert len(list((round_folder(run_dir, 0) / "latents").glob("*.safetensors"))) == len(PROMPTS)


@pytest.mark.parametrize("arch", ["sd15", "sd3", "flux", "flux2"])
def test_every_family_trains_online_on_the_latents_its_stock_pipeline_makes(arch: str, online_recipe,
                                                                            request: pytest.FixtureRequest) -> None:
    """One round on each other family's tiny base: round 1's latents are what the family's stock diffusers pipeline
    makes from those seeds (the step trains on them as they are), and the adapter trains."""
    import diffusers

    from lora_dpo import models
    from lora_dpo.train import train

    base_dir = request.getfixturevalue(f"tiny_{arch}_base_dir")
    cfg = online_recipe(arch, model={"base": str(base_dir)}, train={"max_steps": 2},
                        online={"rounds": 1, "steps_per_round": 2, "samples_per_prompt": 2, "steps": 2})
    run_dir = train(cfg).parent
    record = json.loads((round_folder(run_dir, 0) / "round.json").read_text())
    family = models.family_of_pipeline(json.loads((base_dir / "model_index.json").read_text()))
    pipe = getattr(diffusers, family.pipeline_class).from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in record["seeds"]]
    stock = pipe(prompt=PROMPTS[0], num_images_per_prompt=2, generator=generators, height=64, width=64,
                 num_inference_steps=2, output_type="latent").images
    saved = load_file(round_folder(run_dir, 0) / "latents" / "00000.safetensors")["latents"]
    expected = family.trainable_latents(pipe.vae, stock, 64, 64).float()  # what the step trains on
    torch.testing.assert_close(saved, expected, rtol=1e-4, atol=1e-4)
    assert json.loads((run_dir / "metrics.json").read_text())["rounds"][0]["heldout"]["shapes"]["n"] == len(HELDOUT)


def test_the_shipped_online_recipe_runs_as_a_user_runs_it(tmp_path: Path) -> None:
    """`lora-dpo train recipes/tiny_online.toml` from the repository's root, its own settings, shortened to 2 rounds
    of 2 steps and 4 inference steps."""
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    sets = ["online.rounds=2", "online.steps_per_round=2", "train.max_steps=4", "online.steps=4",
            f"output.dir={tmp_path}"]
    result = subprocess.run([sys.executable, "-m", "lora_dpo", "train", "recipes/tiny_online.toml",
                             *(arg for s in sets for arg in ("--set", s))], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lora-dpo: round 2 on 18 held-out prompts, adapter vs base: shapes win rate" in result.stdout
    summary = json.loads((tmp_path / "tiny_online" / "metrics.json").read_text())
    assert [r["pairs"] > 18 for r in summary["rounds"]] == [True, True]  # the margin rule: several pairs a prompt


def test_pair_rules_never_pair_ties_and_choose_the_higher_score() -> None:
    from lora_dpo.pairs import select_pairs

    combined = torch.tensor([[0.1, 0.9, 0.5, 0.9],   # best: the first 0.9 (image 1), worst image 0
                             [0.3, 0.3, 0.3, 0.3],   # all tied: no pair
                             [0.2, 0.6, 0.4, 0.1]])
    assert select_pairs(combined) == [(0, 1, 0), (2, 1, 3)]
    assert select_pairs(combined, "margin", 0.35) == [(0, 1, 2), (0, 1, 0), (0, 3, 2), (0, 3, 0), (0, 2, 0),
                                                     (2, 1, 0), (2, 1, 3)]
    assert select_pairs(combined, "margin", 0.0) == [(0, 1, 2), (0, 1, 0), (0, 3, 2), (0, 3, 0), (0, 2, 0),
                                                    (2, 1, 2), (2, 1, 0), (2, 1, 3), (2, 2, 0), (2, 2, 3), (2, 0, 3)]


def test_held_out_prompts_are_never_trained_on_and_a_round_draws_its_own_subset(tmp_path: Path) -> None:
    from lora_dpo.online import round_prompt_indices, split_prompts
    from lora_dpo.recipe import OnlineRecipe

    (tmp_path / "p.txt").write_text("\n".join(PROMPTS + PROMPTS[:2]) + "\n")  # repeats are used once
    drawn = split_prompts(OnlineRecipe(prompts=str(tmp_path / "p.txt"), heldout=3), seed=0)
    assert len(drawn.heldout) == 3 and len(drawn.train) == 5 and not set(drawn.heldout) & set(drawn.train)
    assert split_prompts(OnlineRecipe(prompts=str(tmp_path / "p.txt"), heldout=3), seed=0) == drawn  # seeded
    (tmp_path / "h.txt").write_text("a red circle\na new prompt\n")
    given = split_prompts(OnlineRecipe(prompts=str(tmp_path / "p.txt"), heldout_prompts=str(tmp_path / "h.txt")), 0)
    assert given.heldout == ("a red circle", "a new prompt") and "a red circle" not in given.train
    cfg = OnlineRecipe(prompts_per_round=3)
    rounds = [round_prompt_indices(8, cfg, 0, r) for r in range(3)]
    assert all(len(ids) == 3 and ids == sorted(ids) for ids in rounds) and len({tuple(i) for i in rounds}) > 1
    assert round_prompt_indices(8, OnlineRecipe(), 0, 0) == list(range(8))


def test_the_brightness_scorer_is_the_mean_brightness_whatever_the_prompt() -> None:
    from PIL import Image

    from lora_dpo.rewards import build_scorers

    [(scorer, weight)] = build_scorers(["brightness:2"])
    images = [Image.new("RGB", (8, 8), (0, 0, 0)), Image.new("RGB", (8, 8), (255, 255, 255)),
              Image.new("L", (8, 8), 51)]
    assert weight == 2.0 and scorer.score(["a", "b", "c"], images).tolist() == pytest.approx([0.0, 1.0, 0.2])


def test_a_round_made_from_other_prompts_is_refused_on_resume(online_recipe, tmp_path: Path) -> None:
    """Resuming inside round 2 after the prompt file was edited: round 2's pairs were made from the old prompts
    and would train under the new ones; refused, naming the key."""
    from lora_dpo.train import train

    cfg = online_recipe("edited", train={"checkpoint_every": 1})
    run_dir = train(cfg).parent
    (run_dir / ADAPTER_FILE).unlink()  # as if killed after step 5's checkpoint
    (tmp_path / "prompts.txt").write_text("\n".join(reversed(PROMPTS)) + "\n")
    with pytest.raises(OnlineError, match=r"round 2 was made from other prompts than \[online\].prompts gives now"):
        train(cfg, resume=str(run_dir / "checkpoint-5"))
