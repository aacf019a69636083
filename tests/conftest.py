"""Shared tiny fixtures: tiny SDXL-, SD 1.5-, SD3-, FLUX.1- and FLUX.2-architecture bases with random weights and a
generated preference set. Everything is built offline; nothing touches a hub."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# One torch thread in this process and in every subprocess it starts (CLI runs, `accelerate launch`, data-loader
# workers): two pytest-xdist workers each running torch's default two threads on a 2-core machine oversubscribe it,
# and every op then waits on the others (many times slower). The GPU recipes leave `train.num_threads` to torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch

torch.set_num_threads(1)
for noisy in ("bitsandbytes", "kernels"):  # as the CLI's _quiet_imports: CPU-only installs log missing kernels
    logging.getLogger(noisy).setLevel(logging.ERROR)


# The files that take minutes, in the order `make test`'s two pytest-xdist workers should start them: the demo
# (600 steps of the shipped tiny base, cut to 50) on one worker, the subprocess-heavy ones on the other.
SLOW_FILES = ("test_demo.py", "test_shipped_recipes.py", "test_distributed.py", "test_train_flow.py", "test_online.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow files first, in `SLOW_FILES` order. `make test` deals files to two pytest-xdist workers in this
    order (`--dist loadfile --no-loadscope-reorder`; by default xdist starts with the files that hold the most
    tests), so the long ones overlap instead of trailing."""
    rank = {name: index for index, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Built-in assets (the `tiny` base, `synthetic:shapes`) go to a per-session folder, not ~/.cache."""
    os.environ.setdefault("LORA_DPO_HOME", str(tmp_path_factory.mktemp("lora_dpo_home")))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets"))  # `datasets` reads it on import
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cold (not warmed-up) tiny base: enough for every test of mechanics, built in seconds."""
    from lora_dpo.models import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("tiny") / "base", warmup_steps=0)


@pytest.fixture(scope="session")
def tiny_sd15_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cold tiny SD 1.5-architecture base (`StableDiffusionPipeline`: one text encoder, no micro-conditioning)."""
    from lora_dpo.models import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("tiny_sd15") / "base", warmup_steps=0, arch="sd15")


@pytest.fixture(scope="session")
def tiny_sd3_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD3-architecture base (`StableDiffusion3Pipeline`: CLIP x2 + T5, a 16-channel VAE), random weights."""
    from lora_dpo.models import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("tiny_sd3") / "base", warmup_steps=0, arch="sd3")


@pytest.fixture(scope="session")
def tiny_flux_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny FLUX.1-dev-architecture base (`FluxPipeline`: CLIP + T5, guidance embedding), random weights."""
    from lora_dpo.models import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("tiny_flux") / "base", warmup_steps=0, arch="flux")


@pytest.fixture(scope="session")
def tiny_flux2_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny FLUX.2 klein-architecture base (`Flux2KleinPipeline`: a Qwen3, `AutoencoderKLFlux2`), random weights."""
    from lora_dpo.models import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("tiny_flux2") / "base", warmup_steps=0, arch="flux2")


@pytest.fixture(params=["sd3", "flux", "flux2"])
def tiny_flow_base(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(family name, tiny flow base folder), once per flow family; each base built once per session."""
    return request.param, request.getfixturevalue(f"tiny_{request.param}_base_dir")


@pytest.fixture(params=["sdxl", "sd15"])
def tiny_arch_base(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """(architecture, cold tiny base folder), once per architecture; a base is built only if a test asks for it."""
    fixture = {"sdxl": "tiny_base_dir", "sd15": "tiny_sd15_base_dir"}[request.param]
    return request.param, request.getfixturevalue(fixture)


@pytest.fixture(scope="session")
def shapes_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lora_dpo.synthetic import write_shapes_dataset

    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_pairs=24, size=80)


@pytest.fixture
def tiny_recipe(tiny_base_dir: Path, shapes_jsonl: Path, tmp_path: Path):
    """A recipe on the tiny base and the small shapes set, writing into this test's tmp_path."""
    from lora_dpo import recipe

    def make(**sections: dict) -> recipe.Recipe:
        raw = {
            "model": {"base": str(tiny_base_dir)},
            "data": {"source": str(shapes_jsonl), "resolution": 64, "val_pairs": 4},
            "objective": {"beta": 2000.0},
            "train": {"learning_rate": 1e-3, "max_steps": 4, "batch_size": 2, "mixed_precision": "no",
                      "optimizer": "adamw", "log_every": 2, "val_every": 2, "checkpoint_every": 0},
            "output": {"dir": str(tmp_path / "adapters"), "name": "test"},
        }
        for section, values in sections.items():
            raw.setdefault(section, {}).update(values)
        return recipe.from_dict(raw)

    return make


TINY_CLIP_WIDTH = 16  # tiny CLIP embedding width (ViT-L/14's is 768)
TINY_CLIP_CONTEXT = 16  # tiny text context (CLIP's is 77)


def _clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*letters, *(c + "</w>" for c in letters), "ca", "cat</w>"]:
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[("c", "a"), ("ca", "t</w>")])


@pytest.fixture(scope="session")
def tiny_clip() -> tuple[Any, Any]:
    """A tiny CLIP model and processor with random weights, built offline: the reward models' stand-in."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPVisionConfig

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TINY_CLIP_CONTEXT,
                          projection_dim=TINY_CLIP_WIDTH, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=8, projection_dim=TINY_CLIP_WIDTH)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=TINY_CLIP_WIDTH)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model.eval(), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_clip_dir(tiny_clip: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP saved as a transformers folder: what `--scorer pickscore@DIR` reads."""
    model, processor = tiny_clip
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def replace(recipe, section: str, **values):
    """A copy of a frozen recipe with some keys of one section changed."""
    return dataclasses.replace(recipe, **{section: dataclasses.replace(getattr(recipe, section), **values)})


@pytest.fixture
def pickapic_hub(tmp_path: Path) -> Path:
    """A dataset repository laid out as the hub holds Pick-a-Pic (data/<split>-NNNNN-of-NNNNN.parquet), which
    `datasets.load_dataset` reads with the same call as a hub id: 12 train rows in two files (t5 a tie, t7 a
    truncated image, odd rows prefer jpg_1) and 3 validation rows."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    def png(colour: tuple[int, int, int]) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    folder = tmp_path / "pickapic_mini"
    (folder / "data").mkdir(parents=True)
    colours = [(i * 20, 100, 255 - i * 20) for i in range(12)]
    jpg_0 = [png(c) for c in colours]
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 40), (0, 200, 0)).save(jpeg, format="JPEG")
    jpg_0[7] = jpeg.getvalue()[: len(jpeg.getvalue()) // 2]
    table = pa.table({"caption": [f"t{i}" for i in range(12)], "jpg_0": jpg_0,
                      "jpg_1": [png((c[2], c[1], c[0])) for c in colours],
                      "label_0": [0.5 if i == 5 else float(i % 2) for i in range(12)], "label_1": [0.0] * 12,
                      "has_label": [True] * 12, "are_different": [True] * 12})
    pq.write_table(table.slice(0, 6), folder / "data" / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(6, 6), folder / "data" / "train-00001-of-00002.parquet")
    validation = table.slice(0, 3).set_column(0, "caption", pa.array(["v0", "v1", "v2"]))
    pq.write_table(validation, folder / "data" / "validation-00000-of-00001.parquet")
    return folder


PICKAPIC_SHAPES_ROWS = 48


@pytest.fixture(scope="session")
def pickapic_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's shapes pairs laid out as the hub holds Pick-a-Pic v2 (data/<split>-NNNNN-of-NNNNN.parquet, JPEG
    bytes, label_0/label_1): what the shipped Pick-a-Pic recipes read in place of the 335 GB set. 48 train rows in
    four files (every 8th a tie, odd rows prefer jpg_1) and 8 validation rows."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lora_dpo.synthetic import make_pair

    def jpeg(image: Any) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    def table(rows: range, seed: int) -> Any:
        columns: dict[str, list] = {name: [] for name in ("caption", "jpg_0", "jpg_1", "label_0", "label_1",
                                                          "has_label", "are_different")}
        for index in rows:
            prompt, chosen, rejected = make_pair(index, 72, seed)
            first, second = (rejected, chosen) if index % 2 else (chosen, rejected)
            label_0 = 0.5 if index % 8 == 5 else float(index % 2 == 0)
            for name, value in (("caption", prompt), ("jpg_0", jpeg(first)), ("jpg_1", jpeg(second)),
                                ("label_0", label_0), ("label_1", 1.0 - label_0), ("has_label", True),
                                ("are_different", True)):
                columns[name].append(value)
        return pa.table(columns)

    folder = tmp_path_factory.mktemp("pickapic_shapes")
    (folder / "data").mkdir()
    files = 4
    per_file = PICKAPIC_SHAPES_ROWS // files
    for part in range(files):
        pq.write_table(table(range(part * per_file, (part + 1) * per_file), seed=0),
                       folder / "data" / f"train-{part:05d}-of-{files:05d}.parquet")
    pq.write_table(table(range(8), seed=1), folder / "data" / "validation-00000-of-00001.parquet")
    return folder


class Launched:
    """`python -m lora_dpo ARGS` running as a real subprocess in its own process group (as a terminal starts a
    command: `os.killpg` then acts like Ctrl-C); its output goes to a file (no pipe to fill)."""

    def __init__(self, args: tuple[str, ...], log: Path) -> None:
        self.log = log
        with open(log, "w") as handle:
            self.proc = subprocess.Popen([sys.executable, "-m", "lora_dpo", *args], cwd=Path(__file__).parent.parent,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=handle,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def wait_until(self, condition: Callable[[], bool], timeout: float = 300.0) -> None:
        """Poll `condition` every 20 ms while the process runs; fail if it ends or times out first."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"exited with {self.proc.returncode} too early:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out:\n{self.output()[-3000:]}"
            time.sleep(0.02)

    def wait(self, timeout: float = 300.0) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def launch(tmp_path: Path):
    """Start lora-dpo CLI subprocesses; any still running at teardown are killed."""
    started: list[Launched] = []

    def start(*args: str) -> Launched:
        started.append(Launched(args, tmp_path / f"output-{len(started)}.txt"))
        return started[-1]

    yield start
    for launched in started:
        if launched.proc.poll() is None:
            os.killpg(launched.proc.pid, signal.SIGKILL)  # the process and its data workers
            launched.proc.wait()



@pytest.fixture
def fit_until_stopped():
    """`fit(run)` that a SIGTERM the test sends from inside the run stops: returns the `Interrupted` it raised.
    SIGTERM goes to a no-op handler around it, so a signal landing outside fit's own handler never ends pytest."""
    from lora_dpo.errors import Interrupted
    from lora_dpo.train import fit

    def run_until_stopped(run: Any) -> Interrupted:
        before = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        try:
            with pytest.raises(Interrupted) as stopped:
                fit(run)
        finally:
            signal.signal(signal.SIGTERM, before)
        return stopped.value

    return run_until_stopped
