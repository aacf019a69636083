"""The run's guards, each with a real fault: NaN from the real UNet, CUDA's out-of-memory error raised inside the
real UNet's forward (fault injection through a forward hook), and real SIGINT/SIGTERM sent to a real
`lora-dpo train` process."""

import contextlib
import json
import os
import re
import shlex
import signal
from pathlib import Path

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from lora_dpo import checkpoint, guards, recipe
from lora_dpo.errors import Interrupted
from lora_dpo.export import ADAPTER_FILE
from lora_dpo.train import fit, setup, train


def _inject(run, fault):
    """Call `fault(n, output)` on the n-th policy forward pass of the real UNet (the one with autograd on: not the
    reference, not validation); what it returns replaces the output."""
    calls = [0]

    def hook(module, args, output):
        if torch.is_grad_enabled():
            calls[0] += 1
            return fault(calls[0], output)
        return None

    return run.accelerator.unwrap_model(run.unet).register_forward_hook(hook)


def _nan_on(steps: set[int]):
    def fault(n: int, output):
        if n in steps:  # NaN that keeps the graph: the loss and every gradient become NaN
            return UNet2DConditionOutput(sample=output.sample * float("nan"))
        return None

    return fault


def _lora(run) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(run.accelerator.unwrap_model(run.unet)).items()}


def test_a_non_finite_step_is_skipped_and_changes_nothing(tiny_recipe, tmp_path: Path) -> None:
    run = setup(tiny_recipe(data={"val_pairs": 0}, train={"max_steps": 3, "log_every": 1}), tmp_path)
    seen = {}  # the adapter as each step's policy pass found it

    def fault(n: int, output):
        seen[n] = _lora(run)
        return _nan_on({2})(n, output)

    _inject(run, fault)
    summary = fit(run)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 3
    assert all(torch.equal(seen[3][k], seen[2][k]) for k in seen[2])  # step 2 was skipped: nothing changed
    assert not all(torch.equal(seen[2][k], seen[1][k]) for k in seen[1])  # step 1 was taken
    assert all(torch.isfinite(v).all() for v in _lora(run).values())
    assert {int(s["step"]) for s in run.optimizer.state.values()} == {2}  # AdamW stepped on steps 1 and 3 only
    assert run.lr_scheduler.last_epoch == 2  # the schedule counts applied updates; the step's pairs were consumed
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line.get("skipped_steps", 0) for line in lines] == [0, 1, 1]


def test_under_the_loss_scaler_a_step_with_an_inf_loss_is_skipped_and_counted(tiny_recipe, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 with accelerate's GradScaler and autocast, as accelerate sets them up on a GPU (on the CPU it makes
    neither): step 2's reference overflows on one loser image, so its loss is inf while its gradients are finite
    (the scaler alone would apply it). The run skips it as any bad step: the adapter unchanged, one skipped step
    counted, the LR schedule held back, the scale lowered once."""
    from lora_dpo import step

    make_accelerator = step.make_accelerator

    def fp16_with_scaler(precision: str, **kwargs):
        accelerator = make_accelerator("fp16", **kwargs)
        accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0**10)
        return accelerator

    monkeypatch.setattr(step, "make_accelerator", fp16_with_scaler)
    run = setup(tiny_recipe(data={"val_pairs": 0}, train={"max_steps": 3, "log_every": 1}), tmp_path)
    seen = {}  # the adapter as each step's reference pass (its first) found it

    def reference_overflows(module, args, output) -> None:
        if torch.is_inference_mode_enabled():
            seen[len(seen) + 1] = _lora(run)
            if len(seen) == 2:
                output.sample[-1] = float("inf")  # the last loser image's prediction

    run.accelerator.unwrap_model(run.unet).register_forward_hook(reference_overflows)
    summary = fit(run)
    assert summary["skipped_steps"] == 1 and summary["steps"] == 3
    assert all(torch.equal(seen[3][k], seen[2][k]) for k in seen[2])  # step 2 was skipped: nothing changed
    assert not all(torch.equal(seen[2][k], seen[1][k]) for k in seen[1])  # step 1 was taken
    assert {int(s["step"]) for s in run.optimizer.state.values()} == {2}  # AdamW stepped on steps 1 and 3 only
    assert run.lr_scheduler.last_epoch == 2
    assert run.accelerator.scaler.get_scale() == 2.0**9

def test_non_finite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tiny_recipe, tmp_path: Path) -> None:
    recipe_ = tiny_recipe(data={"val_pairs": 0}, train={"max_steps": 8, "checkpoint_every": 1, "max_bad_steps": 3})
    run = setup(recipe_, tmp_path)
    _inject(run, _nan_on(set(range(3, 100))))
    with pytest.raises(guards.TrainingError) as err:
        fit(run)
    message = str(err.value)
    assert "NaN/Inf for 3 optimizer steps in a row (up to step 5" in message
    assert f"the last good checkpoint is {tmp_path / 'checkpoint-2'}" in message
    for cause in ('[model].vae_dtype = "no"', "[train].learning_rate = 0.001", "[objective].beta = 2000"):
        assert cause in message
    assert checkpoint.list_checkpoints(tmp_path) == [tmp_path / "checkpoint-1", tmp_path / "checkpoint-2"]
    saved = load_file(tmp_path / "checkpoint-2" / checkpoint.ADAPTER)
    assert all(torch.equal(saved[k], v) for k, v in _lora(run).items())  # the bad steps changed nothing


def test_a_stop_amid_bad_steps_resumes_with_the_streak_it_had(tiny_recipe, tmp_path: Path,
                                                              fit_until_stopped) -> None:
    """A stop asked for during a run of NaN steps writes a checkpoint mid-streak; the resumed run goes on counting
    that streak, so [train].max_bad_steps in a row still stop it (not max_bad_steps more)."""
    recipe_ = tiny_recipe(data={"val_pairs": 0}, train={"max_steps": 8, "checkpoint_every": 0, "max_bad_steps": 3})
    run = setup(recipe_, tmp_path)

    def fault(n: int, output):
        if n == 3:  # the loop reads the stop flag as the next step begins: it stops after step 4, checkpointed
            os.kill(os.getpid(), signal.SIGTERM)
        return _nan_on({3, 4})(n, output)

    _inject(run, fault)
    assert fit_until_stopped(run).step == 4
    state = checkpoint.read_state(tmp_path / "checkpoint-4")
    assert (state["skipped_steps"], state["bad_steps_in_a_row"]) == (2, 2)

    resumed = setup(recipe_, tmp_path, resume="latest")
    _inject(resumed, _nan_on({1}))  # the first step after the resume (step 5) is bad too: the third in a row
    with pytest.raises(guards.TrainingError, match=r"NaN/Inf for 3 optimizer steps in a row \(up to step 5"):
        fit(resumed)


def test_out_of_memory_names_the_settings_that_would_fit(tiny_recipe, tmp_path: Path) -> None:
    run = setup(tiny_recipe(data={"val_pairs": 0}), tmp_path)
    before = signal.getsignal(signal.SIGINT)

    def fault(n: int, output):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                     "of 7.63 GiB of which 1.2 GiB is free. Including non-PyTorch memory, ...")

    _inject(run, fault)
    with pytest.raises(guards.TrainingError) as err:
        fit(run)
    message = str(err.value)
    assert message.startswith("out of GPU memory: CUDA out of memory. Tried to allocate 2.00 GiB.")
    for advice in ("[train].gradient_checkpointing = true", "[train].batch_size = 1 with "
                   "[train].gradient_accumulation = 2", '[train].optimizer = "adamw8bit"', "[lora].rank = 4"):
        assert advice in message
    assert signal.getsignal(signal.SIGINT) is before  # fit put the handlers back


def test_advice_names_only_real_recipe_keys() -> None:
    keys = {row[0] for row in recipe.describe()}
    worst = recipe.from_dict({"train": {"mixed_precision": "fp16", "optimizer": "adamw", "batch_size": 4,
                                        "max_grad_norm": 0.0}, "lora": {"rank": 16}, "data": {"num_workers": 8},
                              "model": {"vae_dtype": "fp16"}})
    text = " ".join(guards.nonfinite_causes(worst) + guards.memory_advice(worst))
    named = {f"{section}.{key}" for section, key in re.findall(r"\[(\w+)\]\.(\w+)", text)}
    assert len(named) >= 8 and named <= keys, named - keys


def _last_step(run_dir: Path) -> int:
    steps = [0]
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            steps.append(json.loads(line)["step"])
    return max(steps)


def test_sigint_and_sigterm_stop_after_a_checkpoint_and_the_run_resumes_exactly(tiny_recipe, tmp_path: Path,
                                                                                 launch) -> None:
    """Ctrl-C (SIGINT to the process group of a real `lora-dpo train`, data worker included): it finishes its
    optimizer step, checkpoints, exits 130 and prints the command that resumes. Resumed, the run gets a real
    SIGTERM (sent to itself from inside the UNet's forward): it stops the same way (exit code 143) and puts the
    previous handlers back. The finished adapter equals an uninterrupted run's, bit for bit."""
    def recipe_(name: str):
        return tiny_recipe(data={"val_pairs": 0, "num_workers": 1},
                           train={"max_steps": 12, "batch_size": 1, "gradient_accumulation": 2, "log_every": 1,
                                  "checkpoint_every": 0, "num_threads": 1},
                           output={"dir": str(tmp_path), "name": name})

    path = tmp_path / "interrupted.toml"
    path.write_text(recipe_("interrupted").to_toml())
    run_dir = tmp_path / "interrupted"
    first = launch("train", str(path))
    first.wait_until(lambda: _last_step(run_dir) >= 2)
    os.killpg(first.proc.pid, signal.SIGINT)
    assert first.wait() == 130, first.output()[-3000:]
    found = re.search(r"interrupted by SIGINT at step (\d+); checkpoint saved in (\S+); resume with: (.+)",
                      first.output())
    assert found, first.output()[-3000:]
    step = int(found[1])
    assert Path(found[2]) == run_dir / f"checkpoint-{step}" and not (run_dir / ADAPTER_FILE).exists()
    assert shlex.split(found[3]) == ["lora-dpo", "train", str(path), "--resume", "latest"]

    unhandled = []  # where SIGTERM would land if fit did not handle it (instead of ending pytest)
    before = signal.signal(signal.SIGTERM, lambda signum, frame: unhandled.append(signum))
    try:
        run = setup(recipe_("interrupted"), run_dir, resume="latest")
        _inject(run, lambda n, output: os.kill(os.getpid(), signal.SIGTERM) if n == 3 else None)
        with pytest.raises(Interrupted) as stopped:
            fit(run)
        assert signal.getsignal(signal.SIGTERM) is not before and not unhandled  # fit's handler, then ours again
    finally:
        signal.signal(signal.SIGTERM, before)
    later = step + 2  # the signal came in the second step's first micro-batch: that step was finished
    assert (stopped.value.step, stopped.value.exit_code) == (later, 143)
    assert stopped.value.checkpoint == run_dir / f"checkpoint-{later}" and stopped.value.checkpoint.is_dir()

    finished = load_file(train(recipe_("interrupted"), resume="latest"))
    reference = load_file(train(recipe_("reference")))
    assert finished.keys() == reference.keys()
    assert all(torch.equal(finished[k], reference[k]) for k in reference)
