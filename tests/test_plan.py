"""The planner against real measurements: FLOPs and allocations of a real tiny step on CPU, the SDXL figures of
anchors.md, bitsandbytes' real optimizer state and NF4 storage; auto checkpointing both ways; the CLI."""

import dataclasses
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import replace
from typer.testing import CliRunner

from lora_dpo import models, plan
from lora_dpo.cli import app
from lora_dpo.recipe import LoraRecipe, ModelRecipe, ObjectiveRecipe

ROOT = Path(__file__).parent.parent
GiB = 2**30


def _tiny_key(checkpointing: bool, batch_size: int = 2, precision: str = "no") -> plan.StepKey:
    return plan.StepKey(64, batch_size, LoraRecipe(), ObjectiveRecipe(), precision, checkpointing)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_tiny_plan_matches_the_real_step_on_cpu(checkpointing: bool) -> None:
    """Same step function, two worlds: the fake-tensor trace vs the real tiny step on CPU, whose FLOPs torch's
    FlopCounterMode counts and whose memory the CPU allocator itself records (torch.profiler). The allocator also
    sees the kernels' private scratch buffers, so it may read a little higher (measured: +0.0 % without
    checkpointing, +0.8 % with it, where the step peaks in backward). Ops with a kernel of their own (silu_backward)
    are traced as that kernel, not as the temporaries of their decomposition."""
    arch = plan.architecture(ModelRecipe(base="tiny"))
    key = _tiny_key(checkpointing)
    planned = plan.measure_step(arch, key)
    real = plan.measure_real_step(arch, key, torch.device("cpu"))
    assert sum(planned.flops.values()) == real.flops > 1e8
    assert planned.peak - planned.resident > 0.1 * planned.resident  # activations matter: not a trivial check
    assert 0.99 <= real.peak / planned.peak <= 1.03, (real.peak, planned.peak)
    assert set(planned.flops) == {"policy forward", "reference forward", "backward"}


def test_cuda_autocast_norms_stay_inside_the_plan() -> None:
    """The fp32 GroupNorm/LayerNorm of CUDA autocast is emulated only while planning, and costs memory there."""
    norm = torch.nn.GroupNorm(2, 8).bfloat16()
    x = torch.randn(1, 8, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with plan.trace._cuda_autocast_norms():
            assert norm(x).dtype == torch.float32
        assert norm(x).dtype == torch.bfloat16
    arch = plan.architecture(ModelRecipe(base="tiny"))
    cuda, cpu = (plan.measure_step(arch, dataclasses.replace(_tiny_key(False, precision="bf16"), cuda_autocast=c))
                 for c in (True, False))
    assert cuda.peak > cpu.peak
    assert cuda.flops == cpu.flops


@pytest.mark.slow
def test_sdxl_plan_reproduces_the_anchors() -> None:
    """anchors.md, SDXL 1024 px, one pair, rank 8 on attention, bf16: 42.6 TFLOP per step (52.8 with
    checkpointing); 15.5 GiB (6.0) peak, measured with bf16 adapters and CPU autocast. The trainer's own setup
    (fp32 adapters, CUDA autocast's fp32 norms) needs more; the README explains by how much."""
    arch = plan.architecture(ModelRecipe())
    assert arch.name == "sdxl"
    anchors = {False: (42.6e12, 15.5 * GiB), True: (52.8e12, 6.0 * GiB)}
    for checkpointing, (flops, peak) in anchors.items():
        key = plan.StepKey(1024, 1, LoraRecipe(), ObjectiveRecipe(), "bf16", checkpointing, lora_fp32=False,
                           cuda_autocast=False)
        measure = plan.measure_step(arch, key)
        assert sum(measure.flops.values()) == pytest.approx(flops, rel=0.05)
        assert measure.peak == pytest.approx(peak, rel=0.05)
        assert measure.base_params == pytest.approx(2.567e9, rel=0.001)


def test_parameter_terms_match_bitsandbytes() -> None:
    """The two terms computed, not traced: 8-bit AdamW state and NF4 weights, against bitsandbytes itself."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import quantize_4bit

    params = [torch.nn.Parameter(torch.randn(n)) for n in (100, 4096, 5000, 70000)]
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-3)
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer.step()
    state = sum(v.nbytes for p in params for k, v in optimizer.state[p].items()
                if isinstance(v, torch.Tensor) and not k.startswith("qmap"))  # the code tables are shared
    assert plan.optimizer_bytes(tuple(p.numel() for p in params), "adamw8bit") == state
    assert plan.optimizer_bytes((100, 5000), "adamw") == 8 * 5100
    weight = torch.randn(640, 640, dtype=torch.bfloat16)
    packed, quant = quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    stored = packed.nbytes + quant.absmax.nbytes + quant.state2.absmax.nbytes
    assert weight.numel() * plan.NF4_BYTES == pytest.approx(stored, rel=0.001)


def test_auto_checkpointing_follows_free_memory(tiny_recipe) -> None:
    recipe = tiny_recipe()
    assert recipe.train.gradient_checkpointing == "auto"
    off = plan.estimate(plan.architecture(recipe.model), plan.Setting.from_recipe(recipe, checkpointing=False))
    need = off.peak * (1 + plan.FRAGMENTATION)
    on, why = plan.resolve_checkpointing(recipe, int(need) - 1)
    assert on and "does not fit" in why
    on, why = plan.resolve_checkpointing(recipe, int(need) + 1)
    assert not on and "fits" in why
    assert plan.resolve_checkpointing(recipe, None)[0] is False  # CPU
    forced = replace(recipe, "train", gradient_checkpointing=True)
    assert plan.resolve_checkpointing(forced, 10**15) == (True, "set in the recipe")


def test_local_folder_plans_like_the_builtin_tiny(tiny_arch_base: tuple[str, Path]) -> None:
    """A diffusers folder's configs are read: a tiny base written to disk plans exactly like its built-in name
    (`tiny`, `tiny-sd15`), whose architecture comes from constants."""
    arch, base_dir = tiny_arch_base
    name = {"sdxl": "tiny", "sd15": "tiny-sd15"}[arch]
    folder, builtin = (plan.architecture(ModelRecipe(base=b)) for b in (str(base_dir), name))
    assert folder.encoder_params == builtin.encoder_params and folder.family is builtin.family
    assert folder.family.name == arch
    key = _tiny_key(False)
    a, b = plan.measure_step(folder, key), plan.measure_step(builtin, key)
    assert (a.flops, a.peak) == (b.flops, b.peak)
    with pytest.raises(models.ModelError, match="unet/config.json"):
        plan.architecture(ModelRecipe(base=str(base_dir / "unet")))


def test_what_to_change_lowers_the_need_step_by_step(tiny_recipe) -> None:
    recipe = tiny_recipe(train={"optimizer": "adamw", "gradient_checkpointing": False})
    made = plan.make_plan(recipe)
    ladder = made.ladder(0.1)  # nothing fits 0.1 GiB (the CUDA context alone is 0.75): every change is listed
    assert [change.what.split(" (")[0] for change in ladder] == [
        "gradient checkpointing on", "cache latents and prompt embeddings", "8-bit AdamW", "4-bit NF4 base"]
    needs = [made.choice(0.1).required] + [change.estimate.required for change in ladder]
    # tiny's adapters are all under 4096 elements: bitsandbytes keeps their state in 32 bits, so 8-bit saves nothing
    assert all(later <= earlier for earlier, later in itertools.pairwise(needs)) and needs[-1] < needs[0], needs
    assert needs[1] < needs[0] and needs[2] < needs[1] and needs[4] < needs[3]
    # rank and resolution come last but one and last; each change keeps the ones before it
    big = plan.Setting.from_recipe(replace(replace(recipe, "lora", rank=64), "data", resolution=1024), False)
    changes = list(plan.estimates._changes(big, recompute=0.24))
    assert [what.split(" ")[0] for what, *_ in changes] == [
        "gradient", "cache", "LoRA", "8-bit", "4-bit", "resolution", "resolution", "resolution", "resolution"]
    last = big
    for *_, apply in changes:
        last = apply(last)
    assert (last.key.resolution, last.key.lora.rank, last.key.checkpointing, last.cached) == (256, 8, True, True)


def test_the_fewest_changes_that_fit_are_one_set_line(tiny_recipe) -> None:
    """`fix`: the ladder's changes less each one the rest fit without; every one left is needed."""
    made = plan.make_plan(tiny_recipe(train={"optimizer": "adamw", "gradient_checkpointing": False},
                                      lora={"rank": 64, "alpha": 64.0}))
    nf4 = plan.estimate(made.arch, dataclasses.replace(made.off.setting, base_4bit=True)).required
    memory = (nf4 + made.off.required) / 2 / GiB  # NF4 alone fits it, the recipe as it stands does not
    fix = made.fix(memory)
    assert fix and fix[-1].estimate.required <= memory * GiB
    ladder = [change.recipe for change in made.ladder(memory)]
    assert [change.recipe for change in fix] == [text for text in ladder if text in {c.recipe for c in fix}]
    start = made.choice(memory).setting
    steps = {text: apply for _, _, text, apply in plan.estimates._changes(start, made.recompute)}
    for left_out in fix:  # minimal: without any one of them it no longer fits
        setting = start
        for change in fix:
            setting = setting if change is left_out else steps[change.recipe](setting)
        assert plan.estimate(made.arch, setting).required > memory * GiB, left_out.what
    assert made.fix(0.1) is None  # under the CUDA context alone: nothing is enough


def test_an_nf4_recipe_is_planned_with_its_4bit_base(tiny_recipe) -> None:
    plain, nf4 = (plan.make_plan(tiny_recipe(model={"quantize": q})) for q in ("none", "nf4"))
    assert nf4.off.setting.base_4bit and not plain.off.setting.base_4bit
    assert nf4.off.peak == plain.off.peak - nf4.off.quantized_saving and nf4.off.quantized_saving > 0


def test_the_floor_table_sets_each_peak_beside_the_bare_steps() -> None:
    """`plan --floor --resolutions`: checkpointing off / on x NF4 off / on per resolution, the floor traced as
    docs/performance.md traced SDXL's (bf16 adapters, CPU autocast's norms), its ratio and the GPUs."""
    result = CliRunner().invoke(app, ["plan", str(ROOT / "recipes" / "tiny.toml"), "--gpu", "8GB", "--floor",
                                      "--resolutions", "64", "--set", "train.mixed_precision=bf16"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| 64 |")]
    assert [row.split(" | ")[1:3] for row in rows] == [["off", "no"], ["off", "yes"], ["on", "no"], ["on", "yes"]]
    for row in rows:
        peak, floor, ratio = (float(cell.rstrip("x")) for cell in row.split(" | ")[3:6])
        assert floor <= peak and ratio == pytest.approx(peak / floor, abs=0.011) and row.endswith("ms |")
    result = CliRunner().invoke(app, ["plan", str(ROOT / "recipes" / "tiny.toml"), "--floor"])
    assert result.exit_code == 2 and "--floor needs --resolutions" in result.output


def test_gpu_names() -> None:
    assert plan.find_gpu("RTX 4090") == plan.find_gpu("rtx4090") == plan.find_gpu("4090")
    assert plan.find_gpu("24gb").memory_gib == 24
    ten = plan.find_gpu("10GB")
    assert ten.memory_gib == 10 and ten.tflops == plan.find_gpu("8GB").tflops  # the nearest class's rate
    with pytest.raises(plan.PlanError, match=r"'rtx5090'.*h100"):
        plan.find_gpu("rtx5090")


def test_bad_input_is_one_line_naming_it() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["plan", str(ROOT / "recipes" / "tiny.toml"), "--gpu", "gtx9000"])
    assert result.exit_code == 2 and "gtx9000" in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["plan", str(ROOT / "recipes" / "tiny.toml"), "--set", "lora.rnak=4"])
    assert result.exit_code == 2 and "[lora].rnak" in result.output and "did you mean `rank`" in result.output


def test_cli_plan_on_the_tiny_recipe() -> None:
    """The command as a user runs it, in its own process: no tiny base is built, no GPU is needed."""
    result = subprocess.run([sys.executable, "-m", "lora_dpo", "plan", "recipes/tiny.toml", "--gpu", "8GB",
                             "--gpu", "h100", "--measure"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("the run: 600 steps x 8 pairs = 4,800 pairs; "), out[:200]  # the run's length first
    for text in ("memory (MiB)", "compute (GFLOP per step)", "reference forward", "8GB", "h100", "a card needs"):
        assert text in out, text
    measured = re.search(r"measured on cpu .*measured / planned (\d\.\d+)", out)
    assert measured and 0.99 <= float(measured[1]) <= 1.05, out[-400:]


PLAN_MODULES = ("gpus", "bases", "probe", "trace", "generation", "estimates", "report", "measure")  # import order


def test_the_plan_package_imports_one_way_and_defines_each_name_once() -> None:
    """Each module of `lora_dpo.plan` imports only modules listed before it (no cycles); no top-level name is
    defined in two of them (one cache of traced UNets and steps, in `trace`); the package re-exports each public
    name from the one module that defines it."""
    import ast
    import importlib

    folder = ROOT / "lora_dpo" / "plan"
    assert {path.stem for path in folder.glob("*.py")} == {*PLAN_MODULES, "__init__"}
    defined: dict[str, str] = {}
    for index, name in enumerate(PLAN_MODULES):
        tree = ast.parse((folder / f"{name}.py").read_text())
        imported = {node.module.removeprefix("lora_dpo.plan.") for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lora_dpo.plan.")}
        assert imported <= set(PLAN_MODULES[:index]), (name, imported)
        assert not any(isinstance(node, ast.ImportFrom) and node.module == "lora_dpo"
                       and any(alias.name == "plan" for alias in node.names) for node in ast.walk(tree)), name
        for node in tree.body:
            targets = ([node.target] if isinstance(node, ast.AnnAssign) else node.targets
                       if isinstance(node, ast.Assign) else [node])
            for target in targets:
                key = getattr(target, "id", None) or getattr(target, "name", None)
                if key:
                    assert key not in defined, (key, defined.get(key), name)
                    defined[key] = name
    assert "_STEPS" in defined and defined["_STEPS"] == defined["_UNETS"] == "trace"
    for name in plan.__all__:
        module = importlib.import_module(f"lora_dpo.plan.{defined[name]}")
        assert getattr(plan, name) is getattr(module, name), name


def test_the_compiled_tiny_step_stays_within_the_plan(tiny_recipe) -> None:
    """[train].compile: fake tensors cannot run compiled kernels, so the plan traces the eager step and says so. The
    compiled step, measured for real on the CPU (its allocator's record), does the same FLOPs and peaks no higher
    than planned (measured: 0.93-1.00x the eager step's peak, batch 1 and 8, fp32 and bf16, checkpointing off and
    on; here 0.97x), so the plan stays an upper bound."""
    arch = plan.architecture(ModelRecipe(base="tiny"))
    key = _tiny_key(False)
    planned = plan.measure_step(arch, key)
    real = plan.measure_real_step(arch, key, torch.device("cpu"), compile=True)
    assert sum(planned.flops.values()) == real.flops
    assert 0.85 <= real.peak / planned.peak <= 1.01, (real.peak, planned.peak)
    text = plan.render(plan.make_plan(tiny_recipe(train={"compile": True})), [plan.find_gpu("rtx4090")])
    assert "[train].compile = true: traced eager" in text


# --------------------------------------------------------------------------------------------------
# An [online] recipe: its rounds' generation priced beside the training


def _online(base: str = "tiny", **online: object) -> plan.Plan:
    """The tiny online recipe (recipes/tiny_online.toml's rounds, prompts and scorer) with `online` changed, planned;
    `[train].max_steps` follows rounds x steps_per_round as the recipe requires."""
    from lora_dpo.recipe import from_dict

    section = {"rounds": 4, "steps_per_round": 150, "prompts": str(ROOT / "recipes" / "tiny_online_prompts.txt"),
               "heldout_prompts": str(ROOT / "recipes" / "tiny_heldout_prompts.txt"), "samples_per_prompt": 4,
               "scorers": ["shapes"], "steps": 20, "heldout_seeds": 2, **online}
    raw = {"model": {"base": base}, "data": {"resolution": 64}, "objective": {"beta": 500.0},
           "train": {"max_steps": max(section["rounds"], 1) * section["steps_per_round"], "batch_size": 8,
                     "mixed_precision": "no", "optimizer": "adamw"},
           "online": section}
    return plan.make_plan(from_dict(raw))


def _seconds(cell: str) -> float:
    """A time the plan prints (`1.2`, hours; `3.4 min`; `0.56 s`), in seconds."""
    value, _, unit = cell.strip().partition(" ")
    return float(value.replace(",", "")) * {"": 3600, "min": 60, "s": 1}[unit]


def _generation_cells(text: str, gpu: str) -> tuple[float, float, float]:
    """The GPU row's training, generation and total time at 50 % of the card's peak, in seconds."""
    row = next(line for line in text.splitlines() if line.startswith(f"  {gpu} "))
    cells = re.findall(r"(\d[\d.,e-]*(?: min| s)?) / (\d[\d.,e-]*(?: min| s)?)", row)[-3:]
    train, gen, total = (_seconds(half) for _, half in cells)
    return train, gen, total


def test_an_online_recipe_prices_its_generation_beside_the_training() -> None:
    """Per round: 18 training prompts x samples + 18 held-out x seeds images, the base's held-out images once; each
    image `steps` denoiser forwards on 2 latents (the tiny base's pipeline guides with 5 > 1), a VAE decode, the
    scorers. Doubling samples doubles the round's own images; doubling steps or rounds doubles what scales with
    them; the training estimate does not move with any [online] key."""
    made = _online()
    gen = made.generation
    assert gen is not None and (gen.counts.train, gen.counts.per_round, gen.counts.heldout) == (18, 18, 18)
    assert gen.passes == 2 and gen.guidance_from == "the pipeline's default"
    assert gen.images_per_round == (18 * 4, 18 * 2) and gen.base_images == 36
    assert gen.images == 4 * (72 + 36) + 36
    assert gen.total_flops == pytest.approx(gen.images * gen.image_flops + gen.calls * gen.text_flops)
    # the denoiser's inference pass: half the step's reference forward (2 images) per latent, x 2 for guidance
    per_latent = made.off.flops["reference forward"] / (2 * made.recipe.train.batch_size)
    assert gen.denoise_flops == pytest.approx(20 * 2 * per_latent, rel=0.1)

    doubled = _online(samples_per_prompt=8).generation
    assert doubled.images_per_round == (2 * 72, 36)
    assert doubled.image_flops == pytest.approx(gen.image_flops, rel=1e-9)  # traced at batch 8 instead of 4
    own = [g.rounds * g.images_per_round[0] * g.image_flops for g in (gen, doubled)]
    assert own[1] == pytest.approx(2 * own[0], rel=1e-9)
    assert 1.6 < doubled.total_flops / gen.total_flops < 2  # held-out images stay: about double
    longer = _online(steps=40).generation
    assert longer.denoise_flops == pytest.approx(2 * gen.denoise_flops)
    assert longer.total_flops == pytest.approx(gen.total_flops + gen.images * gen.denoise_flops)
    more = _online(rounds=8).generation
    base_part = gen.base_images * gen.image_flops + gen.counts.heldout * gen.text_flops
    assert more.total_flops - base_part == pytest.approx(2 * (gen.total_flops - base_part))
    unguided = _online(guidance_scale=1.0).generation
    assert unguided.passes == 1 and unguided.denoise_flops == pytest.approx(gen.denoise_flops / 2, rel=1e-9)

    offline = _online(rounds=0)
    assert offline.generation is None
    for variant in (made, _online(samples_per_prompt=8, steps=40, heldout_seeds=4)):
        for a, b in ((variant.off, offline.off), (variant.on, offline.on)):
            assert (a.peak, a.total_flops, a.required) == (b.peak, b.total_flops, b.required)

    rtx = plan.find_gpu("rtx4090")
    texts = {name: plan.render(p, [rtx]) for name, p in (("base", made), ("samples", _online(samples_per_prompt=8)),
                                                          ("offline", offline))}
    assert "online: 4 rounds" in texts["base"] and "generation h" in texts["base"]
    assert "generation" not in texts["offline"].splitlines()[0] and "generation h" not in texts["offline"]
    train, generating, total = _generation_cells(texts["base"], "rtx4090")
    hours = plan.generation_hours(gen, rtx, 0.5) * 3600
    assert generating == pytest.approx(hours, rel=0.05) and total == pytest.approx(train + generating, rel=0.05)
    train2, generating2, _ = _generation_cells(texts["samples"], "rtx4090")
    assert train2 == train and generating2 / generating == pytest.approx(doubled.total_flops / gen.total_flops,
                                                                         rel=0.05)
    assert "generating peaks below the step: the run fits wherever the step fits" in texts["base"]
    assert made.generating_peak(made.off) < made.off.peak


def test_generation_asks_the_family_and_counts_only_local_prompts() -> None:
    """FLUX dev's pipeline guides through an input of one pass; a prompt set on the hub is not downloaded to count
    it: priced per 1,000 prompts, and said so. PickScore's CLIP ViT-H/14 is on the card while a round scores; the
    VAE decoding is the family's class (FLUX.2's batch-norm VAE)."""
    for family in models.FAMILIES:  # each family module says whether its pipeline doubles the batch
        assert isinstance(family.cfg_doubles_batch, bool) and family.denoiser_passes(1.0) == 1
        assert family.denoiser_passes(family.pipeline_guidance_scale()) == (2 if family.cfg_doubles_batch else 1)
    flux = _online(base="tiny-flux").generation
    assert flux.passes == 1 and flux.guidance_scale == 3.5
    klein = _online(base="tiny-flux2").generation
    assert klein.decode.flops > 0 and klein.passes == 2
    hub = _online(prompts="parti", heldout_prompts=None).generation
    assert (hub.counts.train, hub.counts.per_round, hub.counts.heldout) == (1000, 1000, 16)
    assert "per 1,000 training prompts" in hub.counts.note and "'parti'" in hub.counts.note
    assert not hub.counts.train_read
    drawn = _online(prompts="parti", heldout_prompts=None, prompts_per_round=50).generation
    assert drawn.counts.per_round == 50 and "per 1,000" not in drawn.counts.note
    scored = _online(scorers=["pickscore"])
    assert scored.generation.scorer_bytes == 4 * (632_076_800 + 354_032_640)
    assert scored.generation.score_flops == pytest.approx(2 * (632_076_800 * 257 + 354_032_640 * 77))
    assert scored.online_required(scored.off) > scored.off.required


def test_generation_passes_match_the_real_ones_on_cpu() -> None:
    """The traced inference passes against real ones (random weights from the tiny configs): the denoiser with the
    trainer's LoRA on 8 latents and the VAE decoding 4, FLOPs as torch's FlopCounterMode counts them (exactly),
    memory above the weights as the CPU allocator records it (torch.profiler). The real decode holds one tensor
    more than the trace at its peak: the size of the last up block's 16-channel input at full resolution (measured
    at 64, 128 and 256 px, 4 and 16 images: always that one tensor, 1.33x the trace), oneDNN's copy of a conv's
    input in its blocked layout, a CPU kernel's scratch the trace does not see (as the step test says of its
    scratch buffers); whether CUDA's kernels hold one is not measured here (no GPU)."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from lora_dpo import step

    arch = plan.architecture(ModelRecipe(base="tiny"))
    key = _tiny_key(False)
    unet = models.unet_from_config(arch.unet, torch.float32, "cpu")
    step.build_policy(unet, key.lora, seed=0, precision="no")
    unet.eval()
    batch = plan.trace.step_batch(arch, dataclasses.replace(key, batch_size=8), "cpu", torch.Generator().manual_seed(0))
    timesteps = torch.full((8,), 500)
    vae = AutoencoderKL.from_config(arch.vae).eval()
    latents = torch.randn(4, arch.vae["latent_channels"], 8, 8)

    def denoise() -> None:
        with torch.inference_mode():
            arch.family.denoise(unet, batch.latents_w, timesteps, batch.prompt_embeds, batch.pooled, batch.time_ids_w)

    def decode() -> None:
        with torch.no_grad():
            vae.decode(latents)

    inputs = sum(t.nbytes for t in (batch.latents_w, batch.prompt_embeds, batch.pooled, batch.time_ids_w))
    cases = ((denoise, plan.measure_denoise(arch, key, 8), inputs),
             (decode, plan.measure_decode(arch, 64, 4, "no"), latents.nbytes))
    for run, planned, given in cases:
        run()  # warm-up: the kernels' first-call buffers
        counter = FlopCounterMode(display=False, custom_mapping=plan.cpu_attention_flops())
        with counter:
            run()
        assert counter.get_total_flops() == planned.flops > 0
        real = given + plan.measure._allocated_on_cpu(run)  # the trace counts the inputs above the weights
        scratch = 4 * 16 * 64 * 64 * 4 if run is decode else 0  # oneDNN's blocked copy of the conv input
        assert 0.97 <= (real - scratch) / planned.transient <= 1.05, (run.__name__, real, planned.transient)
