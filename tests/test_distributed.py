"""Data parallel training: two real processes (accelerate, gloo on the CPU) against one, under DDP and under
DeepSpeed ZeRO-2 (DeepSpeed's CPU accelerator)."""

import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lora_dpo.export import ADAPTER_FILE
from lora_dpo.recipe import RecipeError, TrainRecipe
from lora_dpo.step import StepOutput, _finite_norm
from lora_dpo.train import train
from lora_dpo.train.build import _deepspeed_settings

ROOT = Path(__file__).parent.parent


def _records(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as sock:  # another run on this machine may hold accelerate's default port
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss (step 0 has held-out metrics only; a resumed run logs the steps after its checkpoint)."""
    return {record["step"]: record["loss"] for record in _records(run_dir) if "loss" in record}


# Rank 1 comes late to the reset of the run's files: it leaves setup only once rank 0 has logged step 0 (which rank 0
# does before its first backward waits for rank 1), or after LATE_SECONDS when rank 0 waits for it at a barrier.
LATE_SECONDS = 6
_LATE_RANK_TRAIN = """import os, time
import lora_dpo.train.run
real_setup = lora_dpo.train.run.setup

def late_setup(recipe, run_dir, resume=None):
    run = real_setup(recipe, run_dir, resume)
    deadline = time.monotonic() + {seconds}
    while os.environ["RANK"] == "1" and time.monotonic() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.05)
    return run

lora_dpo.train.run.setup = late_setup
from lora_dpo.cli import main
main()
"""


def _ddp_train(toml: Path, *args: str, script: Path | None = None) -> subprocess.CompletedProcess:
    """`lora-dpo train toml *args` on two real processes (accelerate, DDP over gloo on the CPU), through `script`
    if given (a launcher that wraps the CLI)."""
    entry = [str(script)] if script else ["-m", "lora_dpo"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *entry, "train", str(toml), *args]
    # ACCELERATE_USE_CPU: without it `--multi_gpu` on a CPU runs two unsynchronised trainings (field notes)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "lora-dpo: launch: DDP, 2 processes, gloo" in result.stdout
    assert "identical on all 2 processes" in result.stdout  # every rank hashed its adapter; all agree
    return result


def _assert_same_training(run_dir: Path, reference_dir: Path) -> None:
    """The same adapter and losses to the tolerance of float rounding: a batch of 2 and two batches of 1 round
    differently in the convolutions."""
    adapter, reference = load_file(run_dir / ADAPTER_FILE), load_file(reference_dir / ADAPTER_FILE)
    assert adapter.keys() == reference.keys()
    trained = max(reference[k].abs().max().item() for k in reference if "lora_B" in k)
    assert trained > 3e-4  # lora_B starts at 0: the comparison below is of real updates
    for key, value in reference.items():
        torch.testing.assert_close(adapter[key], value, rtol=1e-3, atol=2e-5)
    losses, reference_losses = _losses(run_dir), _losses(reference_dir)
    assert losses == pytest.approx({step: reference_losses[step] for step in losses}, rel=1e-3)


@pytest.mark.distributed
def test_two_processes_train_as_one_and_a_checkpoint_goes_on_with_either(tiny_recipe, tmp_path: Path) -> None:
    """2 processes x 1 pair == 1 process x 2 pairs: the same pairs (accelerate deals the stream out in turn),
    the same noise per pair (seeded by its place in the stream), gradients averaged by DDP, and the same
    lora_A init (seeded). A checkpoint of either goes on with the other (2 -> 1 and 1 -> 2 processes, the same 2
    pairs per step): from the same pair with the same noise, ending as the other's uninterrupted run.
    adam_epsilon 1e-3 makes each update a smooth function of its gradient: with 1e-8, Adam's first step is
    lr * sign(g) and float noise in near-zero gradients flips whole steps.
    Rank 1 leaves setup late in the first launch (`_LATE_RANK_TRAIN`): the held-out metrics rank 0 logs at step 0
    must survive it."""
    settings = {"max_steps": 3, "log_every": 1, "checkpoint_every": 2, "adam_epsilon": 1e-3, "num_threads": 1,
                "val_every": 3}

    def recipe_(name: str, processes: int):
        return tiny_recipe(train={**settings, "batch_size": 2 // processes}, data={"val_pairs": 4},
                           output={"dir": str(tmp_path), "name": name})

    for name in ("two", "one-then-two"):
        (tmp_path / f"{name}.toml").write_text(recipe_(name, 2).to_toml())
    script = tmp_path / "late_rank_train.py"
    script.write_text(_LATE_RANK_TRAIN.format(seconds=LATE_SECONDS))
    result = _ddp_train(tmp_path / "two.toml", script=script)
    assert "3 steps x 2 pairs (batch 1 x accumulation 1 x 2 processes)" in result.stdout
    # only rank 0 resets metrics.jsonl, before a barrier: the late rank 1 deleted nothing rank 0 had written
    assert [r["step"] for r in _records(tmp_path / "two")] == [0, 1, 2, 3]
    assert "val_loss" in _records(tmp_path / "two")[0]
    train(recipe_("one", 1))
    _assert_same_training(tmp_path / "two", tmp_path / "one")

    # 2 -> 1: the two-process run's checkpoint at step 2, resumed in one process
    train(recipe_("two-then-one", 1), resume=str(tmp_path / "two" / "checkpoint-2"))
    _assert_same_training(tmp_path / "two-then-one", tmp_path / "one")
    # 1 -> 2: the one-process run's checkpoint at step 2, resumed on two processes
    _ddp_train(tmp_path / "one-then-two.toml", "--resume", str(tmp_path / "one" / "checkpoint-2"))
    _assert_same_training(tmp_path / "one-then-two", tmp_path / "two")


@pytest.mark.distributed
def test_a_stream_in_two_processes_resumes_where_each_part_stood(tiny_recipe, pickapic_shapes: Path,
                                                                  tmp_path: Path) -> None:
    """Two processes stream their own files of the split (the Pick-a-Pic layout: 4 files); a checkpoint gathers
    both processes' positions and counts. Resumed from it in two processes, the run ends with the uninterrupted
    run's adapter bit for bit and its closing data line; in one process, it is refused naming the process count."""
    from lora_dpo.train import setup

    def recipe_(name: str):
        return tiny_recipe(data={"source": f"hf:{pickapic_shapes}", "streaming": True, "val_pairs": 2,
                                 "shuffle_buffer": 4},
                           train={"max_steps": 4, "batch_size": 1, "checkpoint_every": 2, "log_every": 1,
                                  "num_threads": 1},
                           output={"dir": str(tmp_path), "name": name})

    for name in ("reference", "resumed"):
        (tmp_path / f"{name}.toml").write_text(recipe_(name).to_toml())
    reference = _ddp_train(tmp_path / "reference.toml")
    saved = tmp_path / "reference" / "checkpoint-2"
    stream = json.loads((saved / "state.json").read_text())["stream"]
    assert (stream["processes"], sorted(stream["parts"]), stream["batches"]) == (2, ["0", "1"], 2)
    resumed = _ddp_train(tmp_path / "resumed.toml", "--resume", str(saved))

    def closing(result: subprocess.CompletedProcess) -> list[str]:
        return [line for line in result.stdout.splitlines() if line.startswith("lora-dpo: data:")]

    assert closing(resumed) == closing(reference) and len(closing(reference)) == 1
    first, second = load_file(tmp_path / "reference" / ADAPTER_FILE), load_file(tmp_path / "resumed" / ADAPTER_FILE)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(RecipeError, match=r"took 2 pairs \(batch 1 x accumulation 1 x 2 processes\), this launch "
                                          r"takes 1 pair .*launch it as it was saved "
                                          r"\(2 pairs \(batch 1 x accumulation 1 x 2 processes\)\)"):
        setup(recipe_("one"), tmp_path / "one", resume=str(saved))




def poison_loss(micro_step: int, process: int | None = None) -> Callable[..., StepOutput]:
    """`dpo_step` with a NaN loss at training micro-step `micro_step`, on process `process` only (None: every
    process); imported by the launched processes too (`_POISONED_TRAIN`)."""
    import lora_dpo.step

    real, seen = lora_dpo.step.dpo_step, [0]

    def step(unet: Any, *args: Any, **kwargs: Any) -> StepOutput:
        out = real(unet, *args, **kwargs)
        if not unet.training:  # validation
            return out
        if seen[0] == micro_step and process in (None, int(os.environ.get("RANK", "0"))):
            nan = torch.tensor(math.nan)
            out = StepOutput(out.loss * nan, {**out.metrics, "loss": out.metrics["loss"] * nan})
        seen[0] += 1
        return out

    return step


_POISONED_TRAIN = """import sys
sys.path.insert(0, {tests!r})
import lora_dpo.step
from test_distributed import poison_loss
lora_dpo.step.dpo_step = poison_loss({micro_step}, process={process})
from lora_dpo.cli import main
main()
"""


def _torch_extensions(request: pytest.FixtureRequest) -> str:
    """Where DeepSpeed's CPU accelerator JIT-compiles its shared-memory collectives (~25 s, once): the pytest
    cache outlives the session (and CI's fresh clone builds it once per run)."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return os.environ["TORCH_EXTENSIONS_DIR"]
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return str(cache.mkdir("torch_extensions"))
    return str(Path(os.environ["LORA_DPO_HOME"]) / "torch_extensions")


@pytest.mark.distributed
@pytest.mark.parametrize(("precision", "optimizer"), [("no", "adamw"), ("bf16", "adamw8bit")])
def test_deepspeed_zero2_two_processes_train_as_one_process_and_skip_a_nan_step(
        tiny_recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest,
        precision: str, optimizer: str) -> None:
    """The shipped deepspeed_zero2.yaml, 2 processes x 1 pair x accumulation 2, on DeepSpeed's CPU accelerator
    (gloo), against one process x 2 pairs, in-process. The loss is NaN at micro-step 2 (the first half of
    optimizer step 2) on process 1 only: DeepSpeed skips the update itself on both processes, lora-dpo counts
    it and holds the LR schedule back, exactly as one process skips it.
    fp32: the same adapter to the DDP test's tolerance (DeepSpeed reduces and accumulates in its own buffers, so
    not bit for bit). bf16 + 8-bit AdamW (the GPU recipes' settings): DeepSpeed holds the LoRA weights in bf16
    behind an fp32 master copy, where one process autocasts fp32 LoRA weights, so the adapters agree to bf16's
    precision only; the adapter file holds that fp32 master copy, not the bf16 one."""
    if os.environ.get("CI"):
        import deepspeed  # noqa: F401  (CI installs the dev extra, which has it: a skip there would hide a gap)
    else:
        pytest.importorskip("deepspeed", reason="pip install -e '.[dev]' (or '.[deepspeed]')")
    settings = {"max_steps": 4, "log_every": 1, "checkpoint_every": 0, "adam_epsilon": 1e-3, "num_threads": 1,
                "gradient_accumulation": 2, "lr_schedule": "linear", "mixed_precision": precision,
                "optimizer": optimizer}
    two = tiny_recipe(train={**settings, "batch_size": 1}, data={"val_pairs": 0},
                      output={"dir": str(tmp_path), "name": "two"})
    (tmp_path / "two.toml").write_text(two.to_toml())
    script = tmp_path / "poisoned_train.py"
    script.write_text(_POISONED_TRAIN.format(tests=str(Path(__file__).parent), micro_step=2, process=1))
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(ROOT / "recipes" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "2",
               "--main_process_port", str(_free_port()), str(script), "train", str(tmp_path / "two.toml")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
           "TORCH_EXTENSIONS_DIR": _torch_extensions(request)}
    env.pop("ACCELERATE_USE_CPU", None)  # it would turn DeepSpeed into DDP (field notes)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "lora-dpo: launch: DeepSpeed ZeRO-2, 2 processes, gloo" in result.stdout  # not DDP, not one process
    assert "4 steps x 4 pairs (batch 1 x accumulation 2 x 2 processes)" in result.stdout
    assert "identical on all 2 processes" in result.stdout  # every rank hashed its adapter; all agree
    assert "step 2: loss or gradients are NaN/Inf; step skipped" in result.stderr

    monkeypatch.setattr("lora_dpo.step.dpo_step", poison_loss(2))
    train(tiny_recipe(train={**settings, "batch_size": 2}, data={"val_pairs": 0},
                      output={"dir": str(tmp_path), "name": "one"}))
    multi, single = _records(tmp_path / "two"), _records(tmp_path / "one")
    assert [r["lr"] for r in multi] == [r["lr"] for r in single]  # the skipped step left the schedule alone
    assert [r.get("skipped_steps", 0) for r in multi] == [0, 1, 1, 1] == [r.get("skipped_steps", 0) for r in single]
    assert math.isnan(multi[1]["loss"]) and math.isnan(single[1]["loss"])
    multi_adapter = load_file(tmp_path / "two" / ADAPTER_FILE)
    single_adapter = load_file(tmp_path / "one" / ADAPTER_FILE)
    assert multi_adapter.keys() == single_adapter.keys()
    lora_b = [k for k in single_adapter if "lora_B" in k]
    assert max(single_adapter[k].abs().max().item() for k in lora_b) > 3e-4  # lora_B starts at 0: real updates
    kept = [0, 2, 3]
    if precision == "no":
        assert [multi[i]["loss"] for i in kept] == pytest.approx([single[i]["loss"] for i in kept], rel=1e-3)
        for key, value in single_adapter.items():
            torch.testing.assert_close(multi_adapter[key], value, rtol=1e-3, atol=2e-5)
        return
    # bf16: the denoising errors (the UNet's forward, policy and reference) agree to bf16's precision (2.7e-4
    # measured); the loss does not, beta 2000 multiplies their tiny differences. The adapter after 3 updates:
    # bf16 alone moves this tiny one 64 % (relative L2 of lora_B) from the fp32 run's, DeepSpeed's bf16 25 % from
    # one process's bf16 (measured): 0.5 catches an update that is lost or wrong, not bf16's rounding.
    for name in ("model_w", "model_l", "ref_w", "ref_l"):
        assert [r[name] for r in multi] == pytest.approx([r[name] for r in single], rel=2e-3), name
    difference = sum((multi_adapter[k].float() - single_adapter[k].float()).pow(2).sum() for k in lora_b)
    size = sum(single_adapter[k].float().pow(2).sum() for k in lora_b)
    assert (difference / size).sqrt() < 0.5
    # saved from DeepSpeed's fp32 master weights: a save of the module's bf16 copy held bf16 numbers only (every
    # value); measured 98,297 of 98,304 values are not. (Its distance to one process's is 0.249 either way: bf16
    # rounds a value by 2^-8 of it at most, lost in the 25 % that bf16 training itself moves this tiny adapter.)
    values = torch.cat([value.flatten() for value in multi_adapter.values()])
    assert values.dtype == torch.float32 and (values != values.bfloat16().float()).float().mean() > 0.9


def _fake_deepspeed(config: dict[str, Any], accumulation: int = 2) -> Any:
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)),
                           gradient_accumulation_steps=accumulation)


def test_deepspeed_settings_come_from_the_recipe_and_a_different_one_is_refused() -> None:
    """accelerate fills DeepSpeed's "auto" gradient_clipping with 1.0 whatever the recipe says, and prefers
    DeepSpeed's accumulation to the recipe's: lora-dpo fills them from the recipe and refuses a mismatch."""
    cfg = TrainRecipe(max_grad_norm=0.5, gradient_accumulation=2, batch_size=3)
    config: dict[str, Any] = {"gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto"}
    _deepspeed_settings(_fake_deepspeed(config), cfg)
    assert config == {"gradient_clipping": 0.5, "gradient_accumulation_steps": 2, "train_micro_batch_size_per_gpu": 3}
    _deepspeed_settings(_fake_deepspeed(dict(config)), cfg)  # equal values pass
    with pytest.raises(RecipeError, match=r"gradient_clipping = 1.0 but \[train\].max_grad_norm = 0.5"):
        _deepspeed_settings(_fake_deepspeed({**config, "gradient_clipping": 1.0}), cfg)
    with pytest.raises(RecipeError, match=r"accelerate's gradient_accumulation_steps = 4"):
        _deepspeed_settings(_fake_deepspeed({}, accumulation=4), cfg)  # --gradient_accumulation_steps 4


def test_finite_norm_reads_deepspeeds_float_or_none() -> None:
    """Under DeepSpeed accelerate's clip_grad_norm_ returns the engine's norm as a float (inf for a step it
    skipped) or None before its first step; elsewhere a tensor."""
    device = torch.device("cpu")
    assert _finite_norm(0.5, device) and _finite_norm(None, device) and _finite_norm(torch.tensor(2.0), device)
    assert not _finite_norm(math.inf, device) and not _finite_norm(math.nan, device)
    assert not _finite_norm(torch.tensor(math.inf), device)
