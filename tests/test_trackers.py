"""`[output].report_to`: names checked in the recipe (every name accelerate accepts, `all` too), a missing package
named with its `pip install`, and a real tiny run read back from what the trackers wrote: tensorboard (hparams, a
scalar, the sample grid and the plot) and mlflow on a local file store (params, a metric, the images as artifacts,
the experiment named by `[output].project`)."""

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import yaml

from lora_dpo import trackers
from lora_dpo.recipe import RecipeError
from lora_dpo.train import train


def test_tracker_names_are_checked_in_the_recipe(tiny_recipe) -> None:
    with pytest.raises(RecipeError, match=r"\[output\].report_to: unknown name\(s\) 'tensorbored'; valid: "
                                          r"tensorboard, wandb"):
        tiny_recipe(output={"report_to": ["tensorbored"]})
    assert tiny_recipe(output={"report_to": "wandb"}).output.report_to == ("wandb",)
    assert tiny_recipe(output={"report_to": []}).output.report_to == ()
    assert tiny_recipe().output.report_to == ("tensorboard",)
    assert tiny_recipe(output={"report_to": ["swanlab", "all"]}).output.report_to == ("swanlab", "all")


def test_the_recipe_takes_every_tracker_name_accelerate_takes() -> None:
    """accelerate's own list (`LoggerType`, what `log_with` accepts): a tracker accelerate adds fails this test
    until the recipe knows it, with an image logger or a reason not to."""
    from accelerate.utils import LoggerType

    from lora_dpo.recipe import ALL_TRACKERS, TRACKERS, OutputRecipe

    assert {*TRACKERS, ALL_TRACKERS} == {str(t) for t in LoggerType}
    report_to = next(f for f in dataclasses.fields(OutputRecipe) if f.name == "report_to")
    assert set(report_to.metadata["choices"]) == {str(t) for t in LoggerType}
    assert set(trackers.IMAGE_LOGGERS) == set(TRACKERS)


def test_all_is_every_installed_tracker_beside_those_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`all` is resolved here (accelerate's own `all` would add a second tensorboard outside `<run>/tensorboard`):
    with only tensorboard and swanlab importable, `all` is those two, tensorboard still in the run folder."""
    from accelerate.tracking import TensorBoardTracker

    real = importlib.util.find_spec
    here = {"tensorboard", "swanlab"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: real("json") if name in here else None if name in trackers.TRACKERS or
                        name == "tensorboardX" else real(name, *a))
    assert trackers.resolve(("all",)) == ("tensorboard", "swanlab")
    assert trackers.resolve(("swanlab", "all")) == ("swanlab", "tensorboard")
    assert trackers.resolve(("tensorboard",)) == ("tensorboard",) and trackers.resolve(()) == ()
    trackers.check_installed(("all",))  # nothing to install: `all` is what is there
    monkeypatch.delenv("CLEARML_TASK", raising=False)
    log_with, init_kwargs = trackers.accelerate_trackers(trackers.resolve(("all",)), tmp_path / "run")
    assert isinstance(log_with[0], TensorBoardTracker) and log_with[1:] == ["swanlab"]
    assert Path(log_with[0].logging_dir_param, log_with[0].run_name) == tmp_path / "run" / "tensorboard"
    assert init_kwargs == {"swanlab": {"experiment_name": "run"}}


def test_a_tracker_that_is_not_installed_is_a_recipe_error_with_its_pip_install(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    trackers.check_installed(("tensorboard",))
    with pytest.raises(RecipeError, match=r"\[output\].report_to = \['tensorboard', 'wandb'\]: wandb is not "
                                          r"installed \(pip install wandb\)"):
        trackers.check_installed(("tensorboard", "wandb"))


def test_run_config_is_flat_scalars(tiny_recipe) -> None:
    config = trackers.run_config(tiny_recipe(lora={"target_modules": ["to_q", "to_v"]}))
    assert config["train.learning_rate"] == 1e-3 and config["objective.kind"] == "dpo"
    assert config["lora.target_modules"] == '["to_q", "to_v"]' and config["model.revision"] == "None"
    assert config["output.report_to"] == '["tensorboard"]'
    assert all(isinstance(v, (str, int, float, bool)) for v in config.values())


def _tensorboard_events(folder: Path) -> tuple[dict, set[str]]:
    """(scalar tag -> values, image tags) from the event files under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, images = {}, set()
    for events in folder.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent), size_guidance={"images": 0, "scalars": 0})
        accumulator.Reload()
        tags = accumulator.Tags()
        scalars |= {tag: [e.value for e in accumulator.Scalars(tag)] for tag in tags["scalars"]}
        images |= set(tags["images"])
    return scalars, images


def test_tensorboard_and_mlflow_receive_config_metrics_and_images(tiny_recipe, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # mlflow is in the dev extra (a skip here would hide a gap in CI); a file store: offline, read back from disk
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow >= 3.7 asks for a database otherwise
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)  # it would win over [output].project
    report_to = ["tensorboard", "mlflow"]
    sample = {"every": 4, "prompts": ["a red circle"], "steps": 1}
    train(tiny_recipe(output={"report_to": report_to, "name": "tracked", "project": "dpo-sweep"}, sample=sample))
    run_dir = tmp_path / "adapters" / "tracked"

    hparams = yaml.safe_load(next((run_dir / "tensorboard").rglob("hparams.yml")).read_text())
    assert hparams["train.learning_rate"] == 1e-3 and hparams["output.name"] == "tracked"
    scalars, images = _tensorboard_events(run_dir / "tensorboard")
    assert len(scalars["loss"]) == 2 and "val_reward_accuracy" in scalars  # log_every 2 over 4 steps
    assert images == {"samples", "training_curves"}

    [run] = [p for p in (tmp_path / "mlruns").glob("*/*") if (p / "params").is_dir()]
    assert yaml.safe_load((run.parent / "meta.yaml").read_text())["name"] == "dpo-sweep"  # the mlflow experiment
    assert hparams["output.project"] == "dpo-sweep"
    assert (run / "params" / "train.learning_rate").read_text() == "0.001"
    assert (run / "params" / "data.resolution").read_text() == "64"
    assert len((run / "metrics" / "loss").read_text().splitlines()) == 2
    assert (run / "artifacts" / "samples" / "step-000004.png").is_file()
    assert (run / "artifacts" / "training_curves" / "training.png").is_file()
    assert (run / "tags" / "mlflow.runName").read_text() == "tracked"
