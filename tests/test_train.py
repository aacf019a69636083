import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_dpo import models
from lora_dpo.export import ADAPTER_FILE, save_adapter
from lora_dpo.objectives import OBJECTIVES
from lora_dpo.recipe import RecipeError
from lora_dpo.step import dpo_step, encode_batch
from lora_dpo.train import fit, setup, train

ROOT = Path(__file__).parent.parent


def _first_batch(run):
    return encode_batch(run.base, next(iter(run.train_loader)), torch.device("cpu"))


def test_fresh_adapter_loss_is_ln2_and_pairs_share_noise(tiny_recipe, tmp_path: Path) -> None:
    run = setup(tiny_recipe(), tmp_path)
    batch = _first_batch(run)
    out = dpo_step(run.unet, run.base, batch, run.recipe.objective, torch.Generator().manual_seed(0))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)  # lora_B = 0: policy == reference
    assert out.metrics["reward_accuracy"].item() == 0.5  # every pair a tie
    batch.latents_l = batch.latents_w.clone()  # identical images: identical errors only if noise and t are shared
    batch.time_ids_l = batch.time_ids_w.clone()
    out = dpo_step(run.unet, run.base, batch, run.recipe.objective, torch.Generator().manual_seed(0))
    assert out.metrics["model_w"].item() == out.metrics["model_l"].item()


def test_trained_adapter_loads_in_stock_diffusers_and_matches_the_policy(tiny_recipe, tiny_arch_base: tuple[str, Path],
                                                                         tmp_path: Path) -> None:
    """On each architecture: train, sample grids with the architecture's own pipeline, save, and load the adapter
    with that pipeline's stock `load_lora_weights` to the very UNet that was trained."""
    import diffusers

    arch, base_dir = tiny_arch_base
    pipeline_class = {"sdxl": diffusers.StableDiffusionXLPipeline, "sd15": diffusers.StableDiffusionPipeline}[arch]
    # alpha != rank: the scale must survive the file
    recipe = tiny_recipe(model={"base": str(base_dir)}, lora={"rank": 4, "alpha": 16.0},
                         sample={"every": 4, "prompts": ["a red circle"], "steps": 1})
    run = setup(recipe, tmp_path)
    assert run.base.pipeline_class is pipeline_class and type(run.sampler.pipe) is pipeline_class
    summary = fit(run)
    assert summary["steps"] == 4 and math.isfinite(summary["loss"])
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 3  # held-out at step 0, then steps 2 and 4
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "samples" / "step-000004.png").is_file()
    path = save_adapter(tmp_path, run.unet, run.lora_config, recipe, summary)
    assert all(".lora_A." in k or ".lora_B." in k for k in load_file(path))
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 4

    pipe = pipeline_class.from_pretrained(recipe.model.base)
    pipe.load_lora_weights(str(tmp_path))
    batch = _first_batch(run)
    assert (batch.pooled is None and batch.time_ids_w is None) == (arch == "sd15")  # SD 1.5: no micro-conditioning
    t = torch.tensor([400, 400])
    args = (batch.latents_w, t, batch.prompt_embeds, batch.pooled, batch.time_ids_w)
    with torch.no_grad():
        policy = run.base.family.denoise(run.unet.eval(), *args)
        loaded = run.base.family.denoise(pipe.unet, *args)
        with models.adapters_disabled(run.unet):
            reference = run.base.family.denoise(run.unet, *args)
    torch.testing.assert_close(loaded, policy, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(policy, reference, atol=1e-6)  # training changed the model


@pytest.mark.parametrize("kind", list(OBJECTIVES))
def test_every_objective_trains_the_tiny_recipe(tiny_recipe, tmp_path: Path, kind: str) -> None:
    """One recipe key switches the objective; the loop, the files and the adapter format stay the same."""
    recipe = tiny_recipe(objective={"kind": kind}, train={"max_steps": 2, "log_every": 1, "val_every": 2})
    path = train(recipe)
    run_dir = tmp_path / "adapters" / "test"
    assert path == run_dir / ADAPTER_FILE
    assert {p.name for p in run_dir.iterdir()} >= {ADAPTER_FILE, "recipe.toml", "metrics.json", "metrics.jsonl"}
    assert f'kind = "{kind}"' in (run_dir / "recipe.toml").read_text()
    weights = load_file(path)
    lora_b = [v for k, v in weights.items() if ".lora_B." in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)  # lora_B starts at 0: training moved it
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 1, 2]  # the held-out metrics before training, then every step
    assert all(math.isfinite(h["loss"]) for h in history[1:])
    objective = OBJECTIVES[kind]
    assert ("val_reward_accuracy" in history[-1]) == objective.needs_reference
    assert ("val_error_accuracy" in history[-1]) == objective.needs_loser
    assert math.isfinite(json.loads((run_dir / "metrics.json").read_text())["val_loss"])


def test_resume_from_a_checkpoint_ends_with_the_same_adapter(tiny_recipe, tmp_path: Path) -> None:
    full = tiny_recipe(train={"checkpoint_every": 2}, output={"dir": str(tmp_path), "name": "full"})
    train(full)
    resumed = tiny_recipe(train={"checkpoint_every": 2}, output={"dir": str(tmp_path), "name": "resumed"})
    train(resumed)  # writes checkpoint-2 too; now resume from the full run's checkpoint into a fresh folder
    first = load_file(tmp_path / "full" / ADAPTER_FILE)
    run = setup(resumed, tmp_path / "again", resume=str(tmp_path / "full" / "checkpoint-2"))
    assert run.start_step == 2
    fit(run)
    from peft.utils import get_peft_model_state_dict

    again = get_peft_model_state_dict(run.unet)
    for key, value in first.items():
        torch.testing.assert_close(again[key.removeprefix("unet.")], value, rtol=0, atol=0)



def test_a_checkpoint_that_lists_the_familys_default_targets_resumes_with_them_unset(tiny_recipe,
                                                                                      tmp_path: Path) -> None:
    """Checkpoints from before `[lora].target_modules` could be unset hold the list itself: resuming one with
    today's unset default (the family's list) changes nothing; another list is still a changed recipe."""
    cfg = tiny_recipe(train={"checkpoint_every": 2, "max_steps": 2}, output={"dir": str(tmp_path), "name": "old"})
    train(cfg)
    state_file = tmp_path / "old" / "checkpoint-2" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["recipe"]["lora"]["target_modules"] is None
    longer = tiny_recipe(train={"checkpoint_every": 2, "max_steps": 3}, output={"dir": str(tmp_path), "name": "old"})
    for listed, refused in ((["to_q", "to_k", "to_v", "to_out.0"], False), (["to_q", "to_k"], True)):
        state["recipe"]["lora"]["target_modules"] = listed
        state_file.write_text(json.dumps(state))
        if refused:
            with pytest.raises(RecipeError, match=r"\[lora\]\.target_modules"):
                setup(longer, tmp_path / "old", resume="latest")
        else:
            assert setup(longer, tmp_path / "old", resume="latest").start_step == 2

def test_a_compiled_run_resumes_bit_identical_to_the_uninterrupted_compiled_run(tiny_recipe, tmp_path: Path) -> None:
    """[train].compile = true: a real checkpoint at step 2 of 4, resumed in a fresh process's way (a new base, policy
    and compiled blocks, `setup(resume=...)`), ends with the adapter the uninterrupted compiled run ended with, bit
    for bit; validation runs compiled too. The compiled run itself trains (its loss is finite and not a fresh
    adapter's) and makes no graph after its first steps: the reference, the policy (twice: its first block's input
    needs no gradient) and validation's two, 5 in all; sample grids are drawn eagerly, in shapes of their own."""
    from lora_dpo.models import compiled_graphs

    recipe = tiny_recipe(train={"compile": True, "checkpoint_every": 2}, output={"dir": str(tmp_path), "name": "full"},
                         sample={"every": 2, "prompts": ["a red circle"], "steps": 1})
    before = compiled_graphs()
    train(recipe)
    summary = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert compiled_graphs() - before == 5, compiled_graphs() - before
    assert summary["steps"] == 4 and math.isfinite(summary["loss"]) and summary["loss"] != pytest.approx(math.log(2))
    run = setup(recipe, tmp_path / "again", resume=str(tmp_path / "full" / "checkpoint-2"))
    assert run.start_step == 2
    fit(run)
    from peft.utils import get_peft_model_state_dict

    again = get_peft_model_state_dict(run.unet)
    for key, value in load_file(tmp_path / "full" / ADAPTER_FILE).items():
        torch.testing.assert_close(again[key.removeprefix("unet.")], value, rtol=0, atol=0)
    assert (tmp_path / "full" / "samples" / "step-000004.png").is_file()  # drawn eagerly: no graph of their own


def test_compile_without_a_compiler_stops_before_loading_naming_the_key(tiny_recipe, tmp_path: Path) -> None:
    """Inductor builds the CPU's kernels with the C++ compiler it finds through CXX (else g++): pointed at nothing,
    `lora-dpo train` stops in one line that names [train].compile, before any weight loads, and never trains
    eagerly instead."""
    recipe = tiny_recipe(train={"compile": True})
    path = tmp_path / "compile.toml"
    path.write_text(recipe.to_toml())
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler")}
    result = subprocess.run([sys.executable, "-m", "lora_dpo", "train", str(path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "[train].compile = true" in line]
    assert len(errors) == 1 and "C++ compiler" in errors[0] and "no-such-compiler" in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "adapters").exists() or not list((tmp_path / "adapters").rglob("*.safetensors"))


def test_finished_runs_are_not_overwritten(tiny_recipe, tmp_path: Path) -> None:
    recipe = tiny_recipe(train={"max_steps": 1}, data={"val_pairs": 0})
    train(recipe)
    with pytest.raises(RecipeError, match="already holds a finished adapter"):
        train(recipe)
    train(tiny_recipe(train={"max_steps": 1}, data={"val_pairs": 0}, output={"overwrite": True}))


def _cli(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "lora_dpo", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_user_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    missing = _cli("train", str(tmp_path / "none.toml"))
    assert missing.returncode == 2 and "no such recipe file" in missing.stderr
    assert "Traceback" not in missing.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\nsource = "absent.jsonl"\n[model]\nbase = "tiny"\n')
    result = _cli("train", str(bad), "--set", "output.dir=" + str(tmp_path))
    assert result.returncode == 2 and "absent.jsonl" in result.stderr and "Traceback" not in result.stderr


def test_a_streamed_hub_set_trains_resumes_where_it_stood_and_reports_what_it_skipped(
        tiny_recipe, pickapic_hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture, fit_until_stopped) -> None:
    """Streaming in two loader workers: the held-out set by prompt, ties dropped as rows arrive, a truncated image
    skipped in a worker and reported once the run is over (as a user sees it, and in metrics.json). A real
    SIGTERM in step 2 stops it after step 3 (three batches: the next is due from the second worker) with a
    checkpoint of each part's position; resumed, the stream starts there (no replay of the loader) and the run
    ends with the uninterrupted run's adapter, bit for bit, and its closing data line: every row counted once. A
    resume with another number of loader workers is refused, naming the key."""
    import signal

    from accelerate.data_loader import SkipDataLoader

    from lora_dpo import data

    def recipe_(name: str, workers: int = 2):
        return tiny_recipe(data={"source": f"hf:{pickapic_hub}", "streaming": True, "val_pairs": 2,
                                 "shuffle_buffer": 4, "num_workers": workers},
                           train={"max_steps": 5, "batch_size": 3, "checkpoint_every": 0, "num_threads": 1},
                           output={"dir": str(tmp_path), "name": name})

    def closing_line() -> str:
        report = [line for line in capsys.readouterr().out.splitlines() if line.startswith("lora-dpo: data:")]
        assert len(report) == 1, report
        return report[0]

    reference = train(recipe_("reference"))
    report = closing_line()
    assert "1 ties" in report and "1 undecodable image (first:" in report and "(2 measured" in report, report
    summary = json.loads((reference.parent / "metrics.json").read_text())
    assert summary["steps"] == 5 and summary["skipped"] == {"undecodable image": 1}
    assert summary["data"].startswith("streaming") and "2 pairs held out and measured" in summary["data"]

    run_dir = tmp_path / "stopped"
    run = setup(recipe_("stopped"), run_dir)
    calls = [0]

    def sigterm_in_step_two(module, args, output) -> None:  # seen as step 3 starts, so step 3 is the last
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    run.accelerator.unwrap_model(run.unet).register_forward_hook(sigterm_in_step_two)
    stopped = fit_until_stopped(run)
    assert stopped.step == 3
    saved = json.loads((stopped.checkpoint / "state.json").read_text())["stream"]
    assert (saved["processes"], saved["workers"], saved["batches"], sorted(saved["parts"])) == (1, 2, 3, ["0", "1"])
    capsys.readouterr()

    with pytest.raises(data.DataError, match=r"resume it with \[data\].num_workers = 2"):
        setup(recipe_("stopped", workers=1), run_dir, resume="latest")
    resumed_run = setup(recipe_("stopped"), run_dir, resume="latest")
    assert resumed_run.start_step == 3 and not isinstance(resumed_run.train_loader, SkipDataLoader)
    # stopped again one step after the resume (a SIGTERM while step 4's batch is encoded): one part has given a
    # batch since, the other keeps the position the first checkpoint gave it
    sent = [False]

    def sigterm_once(module, args, output) -> None:
        if not sent[0]:
            sent[0] = True
            os.kill(os.getpid(), signal.SIGTERM)

    resumed_run.base.vae.encoder.register_forward_hook(sigterm_once)  # `vae.encode` calls it
    stopped = fit_until_stopped(resumed_run)
    assert stopped.step == 4
    again = json.loads((stopped.checkpoint / "state.json").read_text())["stream"]
    assert sorted(again["parts"]) == ["0", "1"] and again["batches"] == 4
    assert [again["parts"][p] == saved["parts"][p] for p in ("0", "1")].count(True) == 1  # one part moved
    del resumed_run
    capsys.readouterr()
    resumed = load_file(train(recipe_("stopped"), resume="latest"))
    assert closing_line() == report
    uninterrupted = load_file(reference)
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted), "the resumed adapter differs"


def test_a_pairs_noise_does_not_depend_on_the_batch_it_lands_in() -> None:
    """Per-pair generators (what training uses): pair b's noise and timestep come from generator b alone, so
    the same pair gets the same draw in a batch of 2 on one process or a batch of 1 on the second process."""
    from diffusers import DDPMScheduler

    from lora_dpo.step import sample_noise

    base = models.BaseModel(source="test", unet=None, noise_scheduler=DDPMScheduler(),
                              family=models.family_named("sdxl"))
    latents = torch.zeros(2, 4, 8, 8)
    pair = [torch.Generator().manual_seed(seed) for seed in (10, 11)]
    noise, t = sample_noise(base, latents, pair)
    alone, t_alone = sample_noise(base, latents[1:], [torch.Generator().manual_seed(11)])
    torch.testing.assert_close(noise[1:], alone, rtol=0, atol=0)
    assert t[1:].tolist() == t_alone.tolist() and noise.shape == latents.shape
    assert not torch.equal(noise[0], noise[1])


def test_schedules_mean_what_diffusers_means_and_validation_keeps_its_own_interval(tiny_recipe,
                                                                                    tmp_path: Path) -> None:
    """`constant_with_warmup` warms up from 0 (the paper's 25 % warmup); `constant` is constant from step 0, and a
    warmup with it (which diffusers' `constant` would ignore) is refused naming the key before anything is written.
    Validation runs every `val_every` steps even when that is not a logging step."""
    with pytest.raises(RecipeError, match=r'^\[train\].warmup_steps = 2 with lr_schedule = "constant": diffusers\' '
                                          r'constant schedule has no warmup; write lr_schedule = '
                                          r'"constant_with_warmup"'):
        setup(tiny_recipe(train={"warmup_steps": 2, "lr_schedule": "constant"}), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    constant = setup(tiny_recipe(train={"lr_schedule": "constant"}), tmp_path / "constant")
    assert constant.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-3)  # no warmup
    recipe = tiny_recipe(train={"max_steps": 4, "warmup_steps": 2, "lr_schedule": "constant_with_warmup",
                                "log_every": 4, "val_every": 1})
    run = setup(recipe, tmp_path)
    assert run.lr_scheduler.get_last_lr()[0] == 0.0  # step 0 of a linear warmup
    fit(run)
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if "val_reward_accuracy" in h] == [0, 1, 2, 3, 4]
    assert [h["step"] for h in history if "loss" in h] == [4]
    assert history[-1]["lr"] == pytest.approx(1e-3)


def test_the_cpu_runs_the_recipes_own_optimizer_and_precision(tiny_recipe, tmp_path: Path) -> None:
    """One program: 8-bit AdamW, bf16 autocast over a bf16 base and gradient checkpointing run on the CPU as
    written, never swapped for torch AdamW and fp32."""
    import bitsandbytes as bnb

    run = setup(tiny_recipe(train={"optimizer": "adamw8bit", "mixed_precision": "bf16",
                                   "gradient_checkpointing": True}), tmp_path)
    assert isinstance(run.optimizer.optimizer, bnb.optim.AdamW8bit)
    assert run.accelerator.mixed_precision == "bf16" and run.accelerator.native_amp
    unet = run.accelerator.unwrap_model(run.unet)
    assert unet.dtype == torch.bfloat16 and unet.is_gradient_checkpointing
    assert all(p.dtype == torch.float32 for p in models.lora_parameters(unet))  # the adapter trains in fp32
    assert math.isfinite(fit(run)["loss"])


def test_fp16_on_the_cpu_is_refused_by_name_unless_the_recipe_opts_in(tiny_recipe, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """accelerate runs no fp16 autocast or loss scaling on a CPU: it would silently train in fp32."""
    with pytest.raises(RecipeError, match=r'\[train\].mixed_precision = "fp16".*device_fallback'):
        setup(tiny_recipe(train={"mixed_precision": "fp16"}), tmp_path / "refused")
    run = setup(tiny_recipe(train={"mixed_precision": "fp16", "device_fallback": True}), tmp_path / "opted")
    assert run.accelerator.mixed_precision == "bf16"
    assert 'running "bf16" instead ([train].device_fallback = true)' in caplog.text


def test_the_run_names_its_base_as_a_loadable_folder(tiny_recipe, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    """A run on `tiny` says where the tiny base is, in the final lines and in the adapter (for `inspect`)."""
    from lora_dpo.export import inspect_adapter

    recipe = tiny_recipe(train={"max_steps": 1}, data={"val_pairs": 2})
    path = train(recipe)
    out = capsys.readouterr().out
    assert f"load_lora_weights({str(path.parent)!r})" in out and recipe.model.base in out
    assert "held-out reward accuracy" in out
    assert inspect_adapter(path)["base_location"] == recipe.model.base  # a folder: already loadable as written
    assert models.base_location("tiny") == str(models.tiny_base_path("sdxl"))


def test_a_run_that_never_starts_leaves_no_folder(tiny_recipe, tmp_path: Path) -> None:
    from lora_dpo.errors import LoraDpoError

    recipe = tiny_recipe(data={"source": str(tmp_path / "absent.jsonl")})
    with pytest.raises(LoraDpoError, match="absent.jsonl"):
        train(recipe)
    assert not (tmp_path / "adapters" / "test").exists()


def test_the_held_out_set_is_recorded_in_the_run_folder_metrics_card_and_summary(
        tiny_recipe, capsys: pytest.CaptureFixture) -> None:
    """The shapes set repeats its prompts: the run holds out whole prompts, lists the held-out pairs in
    heldout.jsonl (prompt, where, label), says how they were chosen in metrics.json and the model card, and its
    closing line calls the accuracy held-out."""
    from lora_dpo import data

    recipe = tiny_recipe(train={"max_steps": 2})
    path = train(recipe)
    rows = [json.loads(line) for line in (path.parent / "heldout.jsonl").read_text().splitlines()]
    _, heldout, _ = data.split_live(recipe.data, recipe.train.seed)
    assert rows == heldout.rows() and len(rows) == 4 and all(row["where"].endswith(".jsonl:" + row["where"].split(
        ":")[-1]) for row in rows)
    metrics = json.loads((path.parent / "metrics.json").read_text())
    assert metrics["heldout"] == heldout.describe() and "prompts never trained on" in metrics["heldout"]
    assert f"| held-out set | {heldout.describe()} |" in (path.parent / "README.md").read_text()
    closing = [line for line in capsys.readouterr().out.splitlines() if line.startswith("lora-dpo: done")]
    assert len(closing) == 1 and "; held-out reward accuracy " in closing[0], closing


def test_deterministic_kernels_train_on_the_cpu_and_off_is_torchs_default(tiny_recipe, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """[train].deterministic = true with the recipes' own settings (bf16 autocast, 8-bit AdamW, gradient
    checkpointing, validation): torch raises at any op that has no deterministic kernel, and none does here. A cuBLAS
    workspace setting that is not deterministic is refused by name, and so is setting it too late; the next run with
    it off is back to torch's defaults."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # put back as it was after the test
    settings = {"optimizer": "adamw8bit", "mixed_precision": "bf16", "gradient_checkpointing": True}
    try:
        run = setup(tiny_recipe(train={**settings, "deterministic": True}), tmp_path / "on")
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert math.isfinite(fit(run)["loss"])
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
        with pytest.raises(RecipeError, match=r"\[train\].deterministic = true: CUBLAS_WORKSPACE_CONFIG=:0:0"):
            setup(tiny_recipe(train={"deterministic": True}), tmp_path / "refused")
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # as in a process that used CUDA already
        with pytest.raises(RecipeError, match=r"\[train\].deterministic = true: this process used CUDA before"):
            setup(tiny_recipe(train={"deterministic": True}), tmp_path / "too late")
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    finally:
        setup(tiny_recipe(), tmp_path / "off")
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
