"""Checkpoints: atomic, the newest K kept, bit-exact resume after SIGKILL, malformed files as our own errors,
and a full disk that leaves nothing half-written."""

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load, load_file

from lora_dpo import checkpoint, files
from lora_dpo.errors import FileFormatError, OutputError
from lora_dpo.export import ADAPTER_FILE
from lora_dpo.recipe import RecipeError
from lora_dpo.train import setup, train

FUZZ = settings(max_examples=30, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def _logged_steps(run_dir: Path) -> list[int]:
    """Steps in metrics.jsonl, skipping a line the writer has not finished."""
    path, steps = run_dir / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            steps.append(json.loads(line)["step"])
    return steps


def _small_checkpoint(run_dir: Path, step: int, keep: int = 2) -> Path:
    """A real checkpoint of a real optimizer (AdamW after one step) and scheduler, without a UNet."""
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    layer(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    lora = {"a.lora_A.weight": layer.weight.detach(), "a.lora_B.weight": layer.bias.detach()[:, None]}
    return checkpoint.save_checkpoint(run_dir, step, lora, optimizer, scheduler,
                                      {"pairs": step, "history": [], "fingerprint": "f"}, keep=keep)


def test_checkpoints_are_whole_and_only_the_newest_k_stay(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        _small_checkpoint(tmp_path, step, keep=3)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]  # no temps
    lora, optimizer, state = checkpoint.load_checkpoint(tmp_path / "checkpoint-8")
    assert state["step"] == 8 and state["scheduler"]["last_epoch"] == 1
    assert optimizer["state"][0]["exp_avg"].shape == (3, 4) and set(lora) == {"a.lora_A.weight", "a.lora_B.weight"}
    _small_checkpoint(tmp_path, 8, keep=3)  # saving a step again replaces it whole
    assert len(checkpoint.list_checkpoints(tmp_path)) == 3


def _steps(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], count: int) -> None:
    for index in range(count):
        for param in params:
            param.grad = torch.sin(param.detach() * (index + 1))  # deterministic, non-trivial gradients
        optimizer.step()


def test_8bit_adamw_state_survives_a_checkpoint_bit_for_bit(tmp_path: Path) -> None:
    """bitsandbytes nests each parameter's quantised state (state1/2 uint8, qmap, absmax) in a dict under
    `__bnb_optimizer_quant_state__`; parameters of 4096+ elements get 8-bit state, smaller ones 32-bit. Saved and
    loaded into a fresh optimizer, two more steps give the same weights as two more steps of the original."""
    import bitsandbytes as bnb

    def build() -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(80, 64)), torch.nn.Parameter(torch.randn(8))]
        return params, bnb.optim.AdamW8bit(params, lr=1e-2, betas=(0.9, 0.99))

    params, optimizer = build()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    _steps(optimizer, params, 3)
    lora = {"a.lora_A.weight": params[0].detach(), "a.lora_B.weight": params[1].detach()[:, None]}
    path = checkpoint.save_checkpoint(tmp_path, 3, lora, optimizer, scheduler,
                                      {"pairs": 3, "history": [], "fingerprint": "f"})
    assert any(t.dtype == torch.uint8 for t in load_file(path / checkpoint.OPTIMIZER).values())

    restored_params, restored = build()
    with torch.no_grad():
        for mine, saved in zip(restored_params, params, strict=True):
            mine.copy_(saved)
    _, optimizer_state, state = checkpoint.load_checkpoint(path)
    checkpoint.restore_optimizer(restored, torch.optim.lr_scheduler.LambdaLR(restored, lambda _: 1.0),
                                 optimizer_state, state, path)
    assert restored.param_groups[0]["betas"] == (0.9, 0.99)  # tuples stay tuples
    _steps(optimizer, params, 2)
    _steps(restored, restored_params, 2)
    assert all(torch.equal(a, b) for a, b in zip(params, restored_params, strict=True))


def test_the_fp16_loss_scale_is_part_of_the_checkpoint(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(layer.parameters())
    for _ in range(4):  # grows once: 2048, growth tracker at 1
        scaler.scale(layer(torch.ones(2, 4)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    path = checkpoint.save_checkpoint(tmp_path, 4, {"a.lora_A.weight": layer.weight.detach()}, optimizer, scheduler,
                                      {"pairs": 4, "history": [], "fingerprint": "f"}, scaler=scaler)
    _, optimizer_state, state = checkpoint.load_checkpoint(path)
    fresh = torch.amp.GradScaler("cpu")
    checkpoint.restore_optimizer(optimizer, scheduler, optimizer_state, state, path, fresh)
    assert fresh.get_scale() == scaler.get_scale() == 2048.0 and fresh.state_dict() == scaler.state_dict()
    with pytest.raises(FileFormatError, match="with fp16 loss scaling"):
        checkpoint.restore_optimizer(optimizer, scheduler, optimizer_state, state, path)  # a bf16 run resuming it


@FUZZ
@given(which=st.sampled_from([checkpoint.ADAPTER, checkpoint.OPTIMIZER, checkpoint.STATE]),
       cut=st.floats(0.0, 0.999), noise=st.one_of(st.none(), st.binary(max_size=300)))
def test_truncated_or_random_checkpoint_files_raise_our_own_error(tmp_path: Path, which: str, cut: float,
                                                                  noise: bytes | None) -> None:
    """Any prefix of a real checkpoint file, or random bytes in its place: a FileFormatError naming that file."""
    if noise is not None and which != checkpoint.STATE:
        try:
            load(noise)
            assume(False)  # by chance a valid (empty) safetensors file: not malformed
        except SafetensorError:
            pass
    path = _small_checkpoint(tmp_path, 1)
    original = (path / which).read_bytes()
    (path / which).write_bytes(noise if noise is not None else original[: int(cut * len(original))])
    try:
        with pytest.raises(FileFormatError, match=str(path)):
            checkpoint.load_checkpoint(path)
    finally:
        (path / which).write_bytes(original)


@FUZZ
@given(state=st.dictionaries(st.sampled_from([*sorted(checkpoint.STATE_FIELDS), "x"]),
                             st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                                          lambda inner: st.lists(inner, max_size=3)
                                          | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)))
def test_random_checkpoint_state_json_raises_our_own_error(tmp_path: Path, state: dict) -> None:
    path = _small_checkpoint(tmp_path, 1)
    (path / checkpoint.STATE).write_text(json.dumps(state))
    with pytest.raises(FileFormatError, match="state.json"):
        checkpoint.load_checkpoint(path)


def test_tensors_that_do_not_fit_the_model_are_named() -> None:
    expected = {"a.lora_A.weight": torch.zeros(8, 64), "b.lora_B.weight": torch.zeros(64, 8)}
    where = Path("run/checkpoint-4/adapter.safetensors")
    with pytest.raises(FileFormatError, match=r"adapter.safetensors.*another shape \(e.g. a.lora_A.weight: \(4, 64\)"):
        files.check_tensors({**expected, "a.lora_A.weight": torch.zeros(4, 64)}, expected, where, "adapter")
    with pytest.raises(FileFormatError, match="1 tensor.s. missing .e.g. b.lora_B.weight"):
        files.check_tensors({"a.lora_A.weight": torch.zeros(8, 64)}, expected, where, "adapter")
    with pytest.raises(FileFormatError, match="not floating point .e.g. a.lora_A.weight: torch.int64"):
        files.check_tensors({**expected, "a.lora_A.weight": torch.zeros(8, 64, dtype=torch.long)}, expected, where,
                            "adapter")
    with pytest.raises(FileFormatError, match="NaN or Inf"):
        files.check_tensors({**expected, "b.lora_B.weight": torch.full((64, 8), float("nan"))}, expected, where,
                            "adapter")


def test_resuming_a_checkpoint_of_another_rank_names_the_file(tiny_recipe, tmp_path: Path) -> None:
    small = setup(tiny_recipe(lora={"rank": 4}, data={"val_pairs": 0}), tmp_path / "small")
    from peft.utils import get_peft_model_state_dict

    saved = checkpoint.save_checkpoint(tmp_path / "small", 2, get_peft_model_state_dict(small.unet), small.optimizer,
                                       small.lr_scheduler, {"pairs": 2, "history": [], "fingerprint": "f"})
    with pytest.raises(FileFormatError, match=r"checkpoint-2/adapter.safetensors.*another shape.*\[lora\]"):
        setup(tiny_recipe(data={"val_pairs": 0}), tmp_path / "big", resume=str(saved))


def test_an_unfinished_run_needs_resume_or_overwrite(tiny_recipe, tmp_path: Path) -> None:
    recipe = tiny_recipe(train={"max_steps": 2, "checkpoint_every": 1}, data={"val_pairs": 0})
    adapter = train(recipe)
    assert [p.name for p in checkpoint.list_checkpoints(adapter.parent)] == ["checkpoint-1", "checkpoint-2"]
    adapter.unlink()  # as if the run had been killed after its first checkpoint
    shutil.rmtree(adapter.parent / "checkpoint-2")
    with pytest.raises(RecipeError, match=r"unfinished run \(latest: checkpoint-1\).*--resume latest"):
        train(recipe)
    partial = adapter.parent / ".checkpoint-2.tmp"  # a checkpoint the kill interrupted mid-write
    partial.mkdir()
    (partial / checkpoint.ADAPTER).write_bytes(b"\x00" * 10)
    assert train(recipe, resume="latest").is_file() and not partial.exists()  # resumed from checkpoint-1
    again = train(tiny_recipe(train={"max_steps": 2, "checkpoint_every": 1}, data={"val_pairs": 0},
                              output={"overwrite": True}))  # starts over: the old checkpoints go first
    assert again.is_file() and [p.name for p in checkpoint.list_checkpoints(again.parent)] == ["checkpoint-1",
                                                                                              "checkpoint-2"]


def test_resume_alone_means_the_latest_checkpoint() -> None:
    from lora_dpo.cli import bare_resume

    assert bare_resume(["train", "r.toml", "--resume"]) == ["train", "r.toml", "--resume", "latest"]
    assert bare_resume(["train", "r.toml", "--resume", "--set", "a.b=1"])[3] == "latest"
    assert bare_resume(["train", "r.toml", "--resume", "run/checkpoint-4"]) == ["train", "r.toml", "--resume",
                                                                                 "run/checkpoint-4"]


def test_an_unwritable_output_folder_is_named(tiny_recipe, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    recipe = tiny_recipe(output={"dir": str(tmp_path / "a-file" / "adapters")})
    with pytest.raises(OutputError, match=r"cannot write .*a-file/adapters/test: Not a directory"):
        train(recipe)


@pytest.mark.parametrize("what", ["checkpoint", "adapter"])
def test_a_full_disk_leaves_no_partial_checkpoint_or_adapter(tiny_recipe, tmp_path: Path, what: str,
                                                             request: pytest.FixtureRequest) -> None:
    """A real refusal from the kernel: the file-size limit (RLIMIT_FSIZE) makes writes past 16 KiB fail with
    EFBIG, as a full disk fails them with ENOSPC. Small files (metrics) still fit; adapters (~90 KiB) do not."""
    if request.config.getoption("capture") == "no":
        pytest.skip("with -s, pytest's own output could hit the file-size limit")
    recipe = tiny_recipe(train={"max_steps": 2, "checkpoint_every": 1 if what == "checkpoint" else 0},
                         data={"val_pairs": 0})
    run_dir = Path(recipe.output.dir) / "test"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error, not the signal that kills
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, hard))
    try:
        with pytest.raises(OutputError) as err:
            train(recipe)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    target = run_dir / ("checkpoint-1" if what == "checkpoint" else ADAPTER_FILE)
    assert f"cannot write {target}: File too large" in str(err.value)
    left = {p.name for p in run_dir.iterdir()}  # nothing partial, no temporaries; metrics once step 2 was logged
    assert left == ({"metrics.jsonl", "tensorboard"} if what == "adapter" else {"tensorboard"})


def test_killed_mid_run_then_resumed_ends_with_the_same_adapter_bit_for_bit(tiny_recipe, tmp_path: Path,
                                                                            launch) -> None:
    """SIGKILL a real `lora-dpo train` between checkpoints, `--resume latest`, and compare with a run that was
    never interrupted: every tensor equal. LoRA dropout and caption dropout are on, so the global RNG (dropout)
    and the data draws must both be keyed by step for this to hold."""
    def recipe(name: str):
        return tiny_recipe(lora={"dropout": 0.1}, data={"val_pairs": 0, "caption_dropout": 0.3},
                           train={"max_steps": 16, "checkpoint_every": 3, "log_every": 1, "num_threads": 1},
                           output={"dir": str(tmp_path), "name": name})

    path = tmp_path / "killed.toml"
    path.write_text(recipe("killed").to_toml())
    run_dir = tmp_path / "killed"
    proc = launch("train", str(path))
    proc.wait_until(lambda: checkpoint.list_checkpoints(run_dir) and max(_logged_steps(run_dir), default=0) >= 5)
    os.kill(proc.proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and not (run_dir / ADAPTER_FILE).exists()

    resumed = train(recipe("killed"), resume="latest")
    reference = train(recipe("reference"))
    first, second = load_file(reference), load_file(resumed)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first), "resumed adapter differs from the uninterrupted one"
    assert _logged_steps(run_dir) == list(range(1, 17))  # the lines after the checkpoint were logged once
    written = {p.suffix for p in run_dir.rglob("*") if p.is_file() and "tensorboard" not in p.parts}  # (protobuf)
    assert written <= {".safetensors", ".json", ".jsonl", ".toml", ".png", ".md"}  # no pickles: .bin, .pt, .pkl


def test_no_pickle_is_ever_loaded() -> None:
    """Weights are read from safetensors only; a torch.load anywhere must say weights_only=True."""
    for source in (Path(__file__).parent.parent / "lora_dpo").rglob("*.py"):
        text = source.read_text()
        assert "import pickle" not in text and "from pickle" not in text, source
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{source}: {call}"


def test_resume_of_a_finished_run_trains_longer_only_when_asked(tiny_recipe, tmp_path: Path) -> None:
    """A finished run resumed as it was is refused in one line (exit 2 from the CLI); with [train].max_steps raised
    it goes on from the checkpoint of its last step and ends as a run of the longer length would, bit for bit. A
    changed run length or logging interval is allowed; a changed key that shapes the run is refused by name."""
    def recipe_(name: str = "test", max_steps: int = 2, **train: object):
        return tiny_recipe(data={"val_pairs": 0}, train={"max_steps": max_steps, "checkpoint_every": 2, **train},
                           output={"dir": str(tmp_path), "name": name})

    adapter = train(recipe_())
    toml = tmp_path / "finished.toml"
    toml.write_text(recipe_().to_toml())
    cli = subprocess.run([sys.executable, "-m", "lora_dpo", "train", str(toml), "--resume"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert cli.returncode == 2 and cli.stdout == "", cli.stderr[-2000:]
    assert cli.stderr.count("\n") == 1 and "Traceback" not in cli.stderr
    assert (f"{adapter.parent} is a finished run (2 steps, [train].max_steps = 2): nothing to resume. To train "
            "longer, raise [train].max_steps (e.g. --set train.max_steps=4)") in cli.stderr
    before = adapter.read_bytes()
    with pytest.raises(RecipeError, match=r"changed \[lora\].rank \(8 -> 4\), \[train\].adam_beta2 \(0.999 -> "
                                          r"0.99\) since this checkpoint was saved"):
        train(tiny_recipe(lora={"rank": 4}, data={"val_pairs": 0}, output={"dir": str(tmp_path), "name": "test"},
                          train={"max_steps": 4, "checkpoint_every": 2, "adam_beta2": 0.99}), resume="latest")
    assert adapter.read_bytes() == before  # refused before anything was written

    longer = load_file(train(recipe_(max_steps=4, log_every=1), resume="latest"))
    reference = load_file(train(recipe_("reference", max_steps=4)))
    assert longer.keys() == reference.keys()
    assert all(torch.equal(longer[k], reference[k]) for k in reference)
    steps = [json.loads(line)["step"] for line in (adapter.parent / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3, 4]  # logged every 2 steps, then every step after the resume


def test_a_resume_on_another_layout_goes_on_from_the_same_pair_or_is_refused(tiny_recipe, tmp_path: Path) -> None:
    """batch 2 x accumulation 1 -> batch 1 x accumulation 2: the same 2 pairs per optimizer step, so the resume goes
    on from the same pair with the same noise and ends as the uninterrupted run, to float rounding (a batch of 2 and
    two of 1 round differently). Accumulation 2 at batch 2 would take 4 pairs a step: refused, saying what to set.
    (2 -> 1 and 1 -> 2 processes: tests/test_distributed.py.)"""
    def recipe_(name: str, batch: int, accumulation: int):
        return tiny_recipe(data={"val_pairs": 0}, output={"dir": str(tmp_path), "name": name},
                           train={"max_steps": 4, "checkpoint_every": 2, "batch_size": batch, "log_every": 1,
                                  "gradient_accumulation": accumulation, "adam_epsilon": 1e-3})

    reference = load_file(train(recipe_("reference", 2, 1)))
    saved = tmp_path / "reference" / "checkpoint-2"
    with pytest.raises(RecipeError, match=r"its optimizer steps took 2 pairs \(batch 2 x accumulation 1 x 1 process\), "
                                          r"this launch takes 4 pairs \(batch 2 x accumulation 2 x 1 process\): set "
                                          r"\[train\].gradient_accumulation = 1 to keep 2 pairs per step"):
        train(recipe_("more", 2, 2), resume=str(saved))
    resumed = load_file(train(recipe_("accumulated", 1, 2), resume=str(saved)))
    assert max(reference[k].abs().max().item() for k in reference if "lora_B" in k) > 3e-4  # real updates
    for key, value in reference.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-3, atol=2e-5)
    losses = {}
    for name in ("reference", "accumulated"):
        for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            losses.setdefault(record["step"], []).append(record["loss"])
    assert sorted(losses) == [1, 2, 3, 4] and all(len(losses[step]) == 2 for step in (3, 4))
    for step in (3, 4):  # the same pairs and noise after the resume: the same losses
        assert losses[step][1] == pytest.approx(losses[step][0], rel=1e-3)  # beta 2000 magnifies rounding
