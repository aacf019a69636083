"""Tests for lora_dpo.rewards on real tiny CLIP models built from configs (random weights, no downloads)."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.testing import assert_close
from transformers import (
    CLIPModel,
    CLIPProcessor,
    CLIPVisionModelWithProjection,
)

from lora_dpo.rewards import (
    AestheticMLP,
    AestheticScorer,
    ClipScorer,
    RewardError,
    Scorer,
    build_scorer,
    label_pairs,
    parse_scorer_spec,
    preference_probability,
    resolve_weights_file,
)

transformers.logging.set_verbosity_error()

PROJ = 16  # conftest's tiny CLIP embedding width (ViT-L/14's is 768)
CONTEXT = 16  # tiny text context (CLIP's is 77)
LAION_KEYS = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
PairRow = tuple[str, str, Image.Image, Image.Image]


@pytest.fixture(scope="module")
def aesthetic_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LAION's layer widths and key names, but a PROJ-wide input to match the tiny CLIP."""
    gen = torch.Generator().manual_seed(1)
    dims = (PROJ, 1024, 128, 64, 16, 1)
    state = {}
    for index, n_in, n_out in zip((0, 2, 4, 6, 7), dims[:-1], dims[1:], strict=True):
        state[f"layers.{index}.weight"] = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
        state[f"layers.{index}.bias"] = torch.randn(n_out, generator=gen) * 0.1
    path = tmp_path_factory.mktemp("aesthetic") / "mlp.safetensors"
    save_file(state, str(path))
    return path


def _image(seed: int, size: tuple[int, int] = (40, 36)) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _pairs(n: int, fail_at: int | None = None) -> Iterator[PairRow]:
    """Pair 5 shows the same image twice (a tie); captions are unique so a scorer can count pairs."""
    for i in range(n):
        if i == fail_at:
            raise RuntimeError("simulated crash")
        image_0 = _image(100 + i)
        yield f"pair-{i:03d}", f"a cat number {i}", image_0, image_0.copy() if i == 5 else _image(200 + i)


class CountingScorer(Scorer):
    """Wraps a real scorer and counts how often each caption is scored (twice per pair: both images)."""

    def __init__(self, inner: Scorer) -> None:
        self.inner, self.name, self.seen = inner, inner.name, Counter[str]()

    def score(self, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
        self.seen.update(prompts)
        return self.inner.score(prompts, images)


def _assert_same_labels(table: pa.Table, other: pa.Table) -> None:
    """Byte-identical except score floats, which may differ in the last bits with another batch split."""
    assert table.column_names == other.column_names
    for name in table.column_names:
        if name.startswith("score_"):
            assert_close(torch.tensor(table[name].to_pylist()), torch.tensor(other[name].to_pylist()))
        else:
            assert table[name].to_pylist() == other[name].to_pylist(), name


# ---------------------------------------------------------------- CLIP-family scorers


def test_pickscore_equals_clip_logits_diagonal(tiny_clip: tuple[CLIPModel, CLIPProcessor]) -> None:
    model, processor = tiny_clip
    prompts, images = ["a cat", "a red dog", "cat on a mat"], [_image(i) for i in range(3)]
    inputs = processor(text=prompts, images=images, padding="max_length", max_length=CONTEXT,
                       return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits_per_text.diag()
    scores = ClipScorer("pickscore", model=model, processor=processor).score(prompts, images)
    assert scores.shape == (3,) and not scores.requires_grad
    assert_close(scores, expected)


def test_clip_and_hps_are_100_cosine(tiny_clip: tuple[CLIPModel, CLIPProcessor]) -> None:
    model, processor = tiny_clip
    prompts, images = ["a cat", "a dog"], [_image(7), _image(8)]
    pick, clip, hps = (ClipScorer(k, model=model, processor=processor).score(prompts, images)
                       for k in ("pickscore", "clip", "hps"))
    assert_close(hps, clip)
    assert_close(pick, clip * model.logit_scale.exp().item() / 100)  # logit_scale.exp() ~ 14.3 here, not 100
    assert clip.abs().max() <= 100


def test_scores_are_deterministic_and_batch_invariant(tiny_clip: tuple[CLIPModel, CLIPProcessor]) -> None:
    model, processor = tiny_clip
    prompts = ["a cat", "a cat", "a dog", "a cat sat on a very long mat beyond context", "a bird", "a bird"]
    images = [_image(0), _image(0), _image(1), _image(2).convert("RGBA"), _image(3), _image(3)]
    batched = ClipScorer("pickscore", model=model, processor=processor, batch_size=32)
    one_by_one = ClipScorer("pickscore", model=model, processor=processor, batch_size=1)
    scores = batched.score(prompts, images)
    assert_close(scores, one_by_one.score(prompts, images), atol=1e-5, rtol=0)
    assert scores[0] == scores[1] and scores[4] == scores[5]  # same (prompt, image) -> same score
    assert scores[0] != scores[2]
    assert_close(batched.score(prompts, images), scores)
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        ClipScorer("clip", model=model, processor=processor).score(["a", "b"], [_image(0)])


def test_build_scorer_loads_transformers_checkpoints_offline(
        tiny_clip: tuple[CLIPModel, CLIPProcessor], tmp_path: Path) -> None:
    model, processor = tiny_clip
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    prompts, images = ["a cat", "a dog"], [_image(3), _image(4)]
    for kind in ("pickscore", "hps", "clip"):
        loaded = build_scorer(kind, str(tmp_path / "clip"))
        assert isinstance(loaded, Scorer) and loaded.name == kind
        expected = ClipScorer(kind, model=model, processor=processor).score(prompts, images)
        assert_close(loaded.score(prompts, images), expected)


def test_build_scorer_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'hps' needs a source"):
        build_scorer("hps")
    (tmp_path / "HPS_v2_compressed.pt").write_bytes(b"not a real checkpoint")
    with pytest.raises(ValueError, match="open_clip checkpoint"):
        build_scorer("hps", str(tmp_path / "HPS_v2_compressed.pt"))
    with pytest.raises(ValueError, match="open_clip checkpoint"):  # a folder holding only the .pt
        build_scorer("hps", str(tmp_path))
    with pytest.raises(ValueError, match="needs its MLP weights"):
        build_scorer("aesthetic")
    with pytest.raises(ValueError, match="valid kinds: pickscore, hps, clip, aesthetic, shapes"):
        build_scorer("imagereward")
    with pytest.raises(ValueError, match="built in and takes no source"):
        build_scorer("shapes", "some/model")


def test_the_shapes_scorer_prefers_the_demo_sets_chosen_images_from_pixels_alone() -> None:
    """`--scorer shapes`: no weights, no download. It ranks the synthetic chosen image (a clean shape in the
    prompt's colour) above its rejected one (wrong colour, dim, blurred, noisy), and a shape in the prompt's
    colour above the same shape in another colour."""
    import random

    from lora_dpo.synthetic import BACKGROUNDS, COLOURS, draw_shape, make_pair

    scorer = build_scorer(*parse_scorer_spec("shapes")[:2])
    assert scorer.name == "shapes"
    prompts, chosen, rejected = zip(*(make_pair(index, 64, seed=7) for index in range(40)), strict=True)
    better = scorer.score(list(prompts), list(chosen)) > scorer.score(list(prompts), list(rejected))
    assert better.float().mean() >= 0.9
    blue = draw_shape("circle", COLOURS["blue"], BACKGROUNDS[0], 96, random.Random(0))
    on_prompt, off_prompt = scorer.score(["a blue circle", "a red circle"], [blue, blue]).tolist()
    assert on_prompt > off_prompt
    assert scorer.score(["a blue circle"], [blue]).item() == pytest.approx(on_prompt, abs=1e-4)  # batch-free


# ---------------------------------------------------------------- aesthetic predictor


def test_aesthetic_mlp_has_the_laion_layout() -> None:
    state = AestheticMLP().state_dict()
    assert set(state) == LAION_KEYS
    shapes = [tuple(state[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)]
    assert shapes == [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]


def test_aesthetic_score_matches_manual_computation(
        tiny_clip: tuple[CLIPModel, CLIPProcessor], aesthetic_file: Path) -> None:
    model, processor = tiny_clip
    images = [_image(i) for i in range(3)]
    state = load_file(str(aesthetic_file))
    with torch.no_grad():
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        x = model.get_image_features(pixel_values=pixels).pooler_output
        x = x / x.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # linear layers only: the predictor has no activations
            x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    scorer = AestheticScorer(aesthetic_file, model=model, processor=processor)
    assert_close(scorer.score(["a cat", "a dog", "x"], images), x.squeeze(-1))
    assert_close(scorer.score(["", "", ""], images), x.squeeze(-1))  # the prompt is ignored


def test_aesthetic_vision_model_with_projection_matches_full_clip(
        tiny_clip: tuple[CLIPModel, CLIPProcessor], aesthetic_file: Path) -> None:
    model, processor = tiny_clip
    vision = CLIPVisionModelWithProjection(model.config.vision_config)
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    vision.visual_projection.load_state_dict(model.visual_projection.state_dict())
    images = [_image(5), _image(6)]
    full = AestheticScorer(aesthetic_file, model=model, processor=processor)
    alone = AestheticScorer(aesthetic_file, model=vision, processor=processor.image_processor)
    assert_close(alone.score(["", ""], images), full.score(["", ""], images))


def test_aesthetic_rejects_wrong_widths_and_pickles(tiny_clip: tuple[CLIPModel, CLIPProcessor],
                                                    tmp_path: Path) -> None:
    model, processor = tiny_clip
    narrow = AestheticMLP((8, 4, 4, 4, 4, 1))
    save_file(narrow.state_dict(), str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ValueError, match="expects 8-d embeddings"):
        AestheticScorer(tmp_path / "narrow.safetensors", model=model, processor=processor)
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an improved-aesthetic-predictor"):
        AestheticMLP.from_safetensors(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="only safetensors"):
        resolve_weights_file("sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(RewardError, match="no such local file"):
        resolve_weights_file(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize(("spec", "expected"), [
    ("pickscore", ("pickscore", None, 1.0)),
    ("aesthetic:0.3", ("aesthetic", None, 0.3)),
    ("clip:0.5", ("clip", None, 0.5)),
    ("hps:1", ("hps", None, 1.0)),
    ("pickscore@/local/dir:0.7", ("pickscore", "/local/dir", 0.7)),
    ("hps=/models/hps-v2-hf", ("hps", "/models/hps-v2-hf", 1.0)),
    (" PickScore@owner/repo ", ("pickscore", "owner/repo", 1.0)),
    ("aesthetic@C:\\models\\mlp.safetensors", ("aesthetic", "C:\\models\\mlp.safetensors", 1.0)),
    ("aesthetic@C:\\models\\mlp.safetensors:2", ("aesthetic", "C:\\models\\mlp.safetensors", 2.0)),
])
def test_parse_scorer_spec(spec: str, expected: tuple[str, str | None, float]) -> None:
    assert parse_scorer_spec(spec) == expected


@pytest.mark.parametrize(("spec", "problem"), [
    ("imagereward", "unknown scorer kind 'imagereward'"),
    ("", "unknown scorer kind ''"),
    ("clip:abc", "bad weight 'abc'"),
    ("clip:0", "positive finite"),
    ("clip:-1", "positive finite"),
    ("clip:nan", "positive finite"),
    ("pickscore@:0.5", "empty source"),
])
def test_parse_scorer_spec_rejects(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as err:
        parse_scorer_spec(spec)
    assert repr(spec) in str(err.value) and "pickscore, hps, clip, aesthetic" in str(err.value)


# ---------------------------------------------------------------- combining scores


def test_preference_probability_single_scorer() -> None:
    """d = s0 - s1 = [2, -1, 0]: hard -> [1, 0, 0.5]; soft at T = 2 -> sigmoid([1, -0.5, 0])."""
    s0, s1 = torch.tensor([23.0, 21.0, 22.0]), torch.tensor([21.0, 22.0, 22.0])
    assert preference_probability(s0, s1, [1.0]).tolist() == [1.0, 0.0, 0.5]
    soft = preference_probability(s0, s1, [1.0], hard=False, temperature=2.0)
    expected = [1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(0.5)), 0.5]
    assert_close(soft, torch.tensor(expected, dtype=torch.float64))


def test_preference_probability_standardises_several_scorers() -> None:
    """PickScore-like d_a = [2, -2, -2, 2, 0] (rms sqrt(16/5)) and aesthetic-like d_b = [.3, .1, -.1, -.3, 0]
    (rms sqrt(0.2/5) = 0.2). With weights [1, 3]: z = [2/r + 4.5, -2/r + 1.5, -2/r - 1.5, 2/r - 4.5, 0],
    2/r = 1.118 -> hard labels [1, 1, 0, 0, 0.5]. Unstandardised, the aesthetic scale would be drowned:
    z = [2.9, -1.7, -2.3, 1.1, 0] -> [1, 0, 0, 1, 0.5]."""
    d = torch.tensor([[2.0, -2.0, -2.0, 2.0, 0.0], [0.3, 0.1, -0.1, -0.3, 0.0]], dtype=torch.float64)
    base = torch.tensor([[21.0] * 5, [5.0] * 5], dtype=torch.float64)  # only differences matter
    assert preference_probability(base + d, base, [1.0, 3.0]).tolist() == [1.0, 1.0, 0.0, 0.0, 0.5]
    raw = preference_probability(base + d, base, [1.0, 3.0], standardize=False)
    assert raw.tolist() == [1.0, 0.0, 0.0, 1.0, 0.5]
    rms = torch.tensor([[math.sqrt(16 / 5)], [0.2]], dtype=torch.float64)
    z = (torch.tensor([[1.0], [3.0]], dtype=torch.float64) * d / rms).sum(0)
    soft = preference_probability(base + d, base, [1.0, 3.0], hard=False, temperature=0.5)
    assert_close(soft, torch.sigmoid(z / 0.5))
    assert soft[4] == 0.5
    with pytest.raises(ValueError, match="3 weights"):
        preference_probability(base, base, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"\[K, N\]"):
        preference_probability(base, base[:, :3], [1.0, 1.0])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        preference_probability(base, base, [1.0, 1.0], hard=False, temperature=0.0)


# ---------------------------------------------------------------- labelling pairs


def test_label_pairs_writes_pick_a_pic_layout(tiny_clip: tuple[CLIPModel, CLIPProcessor],
                                              tmp_path: Path) -> None:
    model, processor = tiny_clip
    scorer = ClipScorer("pickscore", model=model, processor=processor)
    out = tmp_path / "labels.parquet"
    summary = label_pairs(_pairs(12), [(scorer, 1.0)], out, batch_size=4, part_size=4, total=12)
    table = pq.read_table(out)
    assert table.column_names == ["pair_id", "caption", "jpg_0", "jpg_1", "label_0", "label_1",
                                  "score_0_pickscore", "score_1_pickscore"]
    rows = table.to_pylist()
    assert [r["pair_id"] for r in rows] == [f"pair-{i:03d}" for i in range(12)]
    for row in rows:
        s0, s1 = row["score_0_pickscore"], row["score_1_pickscore"]
        assert row["label_0"] == (1.0 if s0 > s1 else 0.0 if s0 < s1 else 0.5)
        assert row["label_1"] == 1.0 - row["label_0"]
    assert rows[5]["label_0"] == 0.5  # identical images
    assert Image.open(io.BytesIO(rows[3]["jpg_1"])).tobytes() == _image(203).tobytes()  # lossless PNG
    captions = [r["caption"] for r in rows]
    images_0 = [Image.open(io.BytesIO(r["jpg_0"])) for r in rows]
    assert_close(torch.tensor(table["score_0_pickscore"].to_pylist(), dtype=torch.float32),
                 scorer.score(captions, images_0), atol=1e-5, rtol=0)
    labels = table["label_0"].to_pylist()
    assert summary.n_pairs == 12 and summary.n_new == 12 and summary.n_ties == 1
    assert summary.n_swapped == labels.count(0.0) and 0 < summary.n_swapped < 11
    all_scores = table["score_0_pickscore"].to_pylist() + table["score_1_pickscore"].to_pylist()
    assert summary.mean_scores["pickscore"] == pytest.approx(sum(all_scores) / 24)
    assert len(list((tmp_path / "labels.parquet.parts").glob("part-*.parquet"))) == 3


def test_label_pairs_resumes_after_a_crash_without_rescoring(
        tiny_clip: tuple[CLIPModel, CLIPProcessor], tmp_path: Path) -> None:
    model, processor = tiny_clip
    counting = CountingScorer(ClipScorer("pickscore", model=model, processor=processor))
    out = tmp_path / "resumed.parquet"
    with pytest.raises(RuntimeError, match="simulated crash"):
        label_pairs(_pairs(12, fail_at=7), [(counting, 1.0)], out, batch_size=3, part_size=100)
    assert not out.exists()
    # 7 pairs read: two full batches scored and saved on the way out, the 7th still pending (not scored).
    parts = list((tmp_path / "resumed.parquet.parts").glob("part-*.parquet"))
    assert sum(pq.read_metadata(p).num_rows for p in parts) == 6 and len(counting.seen) == 6
    summary = label_pairs(_pairs(12), [(counting, 1.0)], out, batch_size=3, part_size=100)
    assert summary.n_new == 6 and summary.n_pairs == 12
    assert counting.seen == Counter({f"a cat number {i}": 2 for i in range(12)})  # every pair scored once
    fresh = tmp_path / "fresh.parquet"
    plain = ClipScorer("pickscore", model=model, processor=processor)
    label_pairs(_pairs(12), [(plain, 1.0)], fresh, batch_size=5)
    _assert_same_labels(pq.read_table(out), pq.read_table(fresh))


def test_label_pairs_rebuilds_a_deleted_file_from_parts(
        tiny_clip: tuple[CLIPModel, CLIPProcessor], tmp_path: Path) -> None:
    model, processor = tiny_clip
    counting = CountingScorer(ClipScorer("clip", model=model, processor=processor))
    out = tmp_path / "labels.parquet"
    label_pairs(_pairs(12), [(counting, 1.0)], out, batch_size=4, part_size=8)
    before = pq.read_table(out)
    out.unlink()
    counting.seen.clear()
    again = label_pairs(_pairs(12), [(counting, 1.0)], out, batch_size=4)
    assert not counting.seen and again.n_new == 0 and again.n_pairs == 12
    assert pq.read_table(out).equals(before)
    restart = label_pairs(_pairs(12), [(counting, 1.0)], out, resume=False, keep_parts=False)
    assert restart.n_new == 12 and not (tmp_path / "labels.parquet.parts").exists()
    _assert_same_labels(pq.read_table(out), before)


def test_label_pairs_mixes_several_scorers(tiny_clip: tuple[CLIPModel, CLIPProcessor], aesthetic_file: Path,
                                           tmp_path: Path) -> None:
    model, processor = tiny_clip
    pick = ClipScorer("pickscore", model=model, processor=processor)
    aesthetic = AestheticScorer(aesthetic_file, model=model, processor=processor)
    scorers: list[tuple[Scorer, float]] = [(pick, 0.7), (aesthetic, 0.3)]
    out = tmp_path / "mixed.parquet"
    summary = label_pairs(_pairs(12), scorers, out, batch_size=5, hard=False)
    table = pq.read_table(out)
    assert table.column_names[6:] == ["score_0_pickscore", "score_1_pickscore", "score_0_aesthetic",
                                      "score_1_aesthetic"]
    s0 = torch.tensor([table["score_0_pickscore"].to_pylist(), table["score_0_aesthetic"].to_pylist()])
    s1 = torch.tensor([table["score_1_pickscore"].to_pylist(), table["score_1_aesthetic"].to_pylist()])
    expected = preference_probability(s0, s1, [0.7, 0.3], hard=False)  # standardised over all 12 pairs
    assert table["label_0"].to_pylist() == expected.tolist()
    assert_close(torch.tensor(table["label_1"].to_pylist(), dtype=torch.float64), 1 - expected)
    assert summary.n_ties == 1 and set(summary.mean_scores) == {"pickscore", "aesthetic"}
    with pytest.raises(ValueError, match="other scorers"):  # resuming with another scorer set
        label_pairs(_pairs(12), scorers[:1], out)
    with pytest.raises(ValueError, match="distinct names"):
        label_pairs(_pairs(12), [scorers[0], scorers[0]], tmp_path / "dup.parquet")
    with pytest.raises(ValueError, match="batch_size and part_size must be >= 1"):
        label_pairs(_pairs(12), scorers, tmp_path / "zero.parquet", batch_size=0)


def test_label_cli_relabels_a_pair_set_and_training_reads_the_result(
        tiny_clip_dir: Path, shapes_jsonl: Path, tiny_recipe, tmp_path: Path) -> None:
    """`lora-dpo label` as a user runs it, with a tiny CLIP saved as a PickScore-style folder; then a recipe
    trains from the labelled parquet."""
    from lora_dpo.train import train

    out = tmp_path / "labelled.parquet"
    result = subprocess.run(
        [sys.executable, "-m", "lora_dpo", "label", str(shapes_jsonl), "--scorer", f"pickscore@{tiny_clip_dir}",
         "--out", str(out)], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    table = pq.read_table(out).to_pydict()
    assert len(table["label_0"]) == 24 and "labelled 24 pairs" in result.stdout
    for label, s0, s1 in zip(table["label_0"], table["score_0_pickscore"], table["score_1_pickscore"], strict=True):
        assert label == (1.0 if s0 > s1 else 0.0 if s0 < s1 else 0.5)
    run = train(tiny_recipe(data={"source": str(out), "ties": "keep"}, train={"max_steps": 2}))
    assert run.is_file()


@pytest.fixture
def messy_source(tmp_path: Path) -> Path:
    """Seven rows as people leave them: 1 and 4 fine (4 prefers `rejected`), 2 a human tie, 3 a missing image,
    5 an empty caption, 6 an undecodable image, 7 fine."""
    folder = tmp_path / "messy"
    folder.mkdir()
    for i in range(8):
        _image(300 + i).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png at all")
    rows = [{"prompt": "a cat one", "chosen": "0.png", "rejected": "1.png"},
            {"prompt": "a cat two", "chosen": "2.png", "rejected": "3.png", "label": 0.5},
            {"prompt": "a cat three", "chosen": "absent.png", "rejected": "3.png"},
            {"prompt": "a cat four", "chosen": "4.png", "rejected": "5.png", "label": 0.0},
            {"prompt": "", "chosen": "6.png", "rejected": "7.png"},
            {"prompt": "a cat six", "chosen": "broken.png", "rejected": "7.png"},
            {"prompt": "a cat seven", "chosen": "7.png", "rejected": "0.png"}]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_label_applies_the_ties_policy_and_skips_unusable_rows(tiny_clip_dir: Path, messy_source: Path,
                                                               tmp_path: Path) -> None:
    """In process (typer's runner). Default: the human tie is dropped before scoring and counted; the missing,
    empty-caption and undecodable rows are skipped and counted, and none stops the command. `--ties relabel`
    scores the tie; `--strict` stops at the first unusable row, named, as one line with exit code 2."""
    from typer.testing import CliRunner

    from lora_dpo.cli import app

    def label(out: Path, *extra: str) -> object:
        return CliRunner().invoke(app, ["label", str(messy_source), "--scorer", f"pickscore@{tiny_clip_dir}",
                                        "--out", str(out), *extra])

    dropped = label(tmp_path / "dropped.parquet")
    assert dropped.exit_code == 0, dropped.output[-2000:]
    table = pq.read_table(tmp_path / "dropped.parquet").to_pydict()
    assert table["caption"] == ["a cat one", "a cat four", "a cat seven"]
    assert Image.open(io.BytesIO(table["jpg_0"][1])).tobytes() == _image(305).tobytes()  # people's choice first
    assert "human ties: 1 dropped before scoring" in dropped.stdout
    assert f"7 pairs read, 3 kept; dropped: 1 ties; skipped 3 unusable: 1 missing image (first: {messy_source}:3)" \
        in dropped.stdout and "1 empty caption" in dropped.stdout and "1 undecodable image" in dropped.stdout

    again = label(tmp_path / "dropped.parquet")  # a resume does not stop on the bad rows, nor rescore the rest
    assert again.exit_code == 0 and "(3 from an earlier run)" in again.stdout

    relabelled = label(tmp_path / "relabelled.parquet", "--ties", "relabel")
    assert relabelled.exit_code == 0, relabelled.output[-2000:]
    table = pq.read_table(tmp_path / "relabelled.parquet").to_pydict()
    assert table["caption"] == ["a cat one", "a cat two", "a cat four", "a cat seven"]
    assert table["label_0"][1] in (0.0, 1.0)  # the scorer decided the tie
    assert "human ties: 1 relabelled by the scorers" in relabelled.stdout and "4 kept" in relabelled.stdout

    for extra, message in ((["--strict"], f"lora-dpo: error: {messy_source}:3: missing image (--strict stops"),
                           (["--ties", "keep"], "--ties 'keep': choose drop"),
                           (["--scorer", "imagereward"], "unknown scorer kind 'imagereward'"),
                           (["--batch-size", "0"], "batch_size and part_size must be >= 1")):
        failed = label(tmp_path / "failed.parquet", *extra)
        assert failed.exit_code == 2 and message in failed.stderr, failed.output[-2000:]
        assert "Traceback" not in failed.stderr
        assert failed.stderr.strip().splitlines()[-1].startswith("lora-dpo: error: ")  # above it: progress bars


# ---------------------------------------------------------------- the package


def test_the_package_exports_what_it_lists_and_each_module_is_short() -> None:
    """`lora_dpo.rewards` re-exports its two modules' public names; neither module is over 450 lines."""
    from lora_dpo import rewards
    from lora_dpo.rewards import labelling, scorers

    assert all(hasattr(rewards, name) for name in rewards.__all__)
    assert rewards.label_pairs is labelling.label_pairs and rewards.build_scorers is scorers.build_scorers
    for module in Path(rewards.__file__).parent.glob("*.py"):
        assert len(module.read_text().splitlines()) <= 450, module
