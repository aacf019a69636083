import ast
import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from lora_dpo import data
from lora_dpo.recipe import DataRecipe


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (80, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_jsonl_pairs_resolve_relative_paths(shapes_jsonl: Path) -> None:
    records = list(data.read_records(DataRecipe(source=str(shapes_jsonl))))
    assert len(records) == 24
    assert all(Path(r.image_0).is_file() and r.label_0 == 1.0 for r in records)


def test_pair_transform_crops_and_flips_both_images_alike() -> None:
    """Both images get the same crop and flip; time ids record the original size and the real crop."""
    gradient = Image.fromarray(torch.arange(120).repeat(80, 1).to(torch.uint8).unsqueeze(-1).expand(80, 120, 3).numpy())
    for seed in range(8):
        pixels, time_ids = data.transform_pair((gradient, gradient.copy()), 64, "random", True, random.Random(seed))
        assert pixels.shape == (2, 3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
        torch.testing.assert_close(pixels[0], pixels[1])
        torch.testing.assert_close(time_ids[0], time_ids[1])
        height, width, top, left, th, tw = time_ids[0].tolist()
        assert (height, width, th, tw) == (80, 120, 64, 64) and top == 0 and 0 <= left <= 96 - 64
    _, centre = data.transform_pair((gradient, gradient), 64, "center", False, random.Random(0))
    assert centre[0].tolist() == [80, 120, 0, 16, 64, 64]


def test_dataset_is_deterministic_per_key_and_split_is_stable(shapes_jsonl: Path) -> None:
    cfg = DataRecipe(source=str(shapes_jsonl), resolution=64, caption_dropout=0.5)
    pairs, _ = data.prepare_pairs(data.read_records(cfg), cfg)
    train, val = data.split_pairs(pairs, 4, seed=3)
    assert len(val) == 4 and not {p.prompt for p in train} & {p.prompt for p in val}
    assert data.split_pairs(pairs, 4, seed=3)[1] == val
    dataset = data.PreferenceDataset(train, cfg, seed=0)
    a, b = dataset[5], dataset[5]
    torch.testing.assert_close(a["pixels"], b["pixels"])
    assert a["prompt"] == b["prompt"]
    assert {dataset[k]["prompt"] == "" for k in range(40)} == {True, False}  # dropout happens, at ~50 %
    batch = data.collate([dataset[0], dataset[1]])
    assert batch.pixels_w.shape == (2, 3, 64, 64) and batch.time_ids_l.shape == (2, 6)


def test_stream_sampler_covers_each_epoch_once() -> None:
    draws = list(data.StreamSampler(n=5, draws=12, seed=0))
    assert len(draws) == 12
    assert sorted(d % 5 for d in draws[:5]) == [0, 1, 2, 3, 4]
    assert sorted(draws[5:10]) == [5, 6, 7, 8, 9]
    assert list(data.StreamSampler(n=5, draws=12, seed=0)) == draws


def test_synthetic_source_is_generated_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORA_DPO_HOME", str(tmp_path))
    path = data.synthetic_source("synthetic:shapes:6", 64)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 6 and lines[0]["prompt"].startswith("a ")
    with pytest.raises(data.DataError, match="synthetic:shapes"):
        data.synthetic_source("synthetic:cats", 64)


# --------------------------------------------------------------------------------------------------
# Sources with broken rows: what each yields


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _truncated_jpeg() -> bytes:
    jpeg = _encode(Image.new("RGB", (80, 60), (0, 200, 0)), "JPEG")
    return jpeg[: len(jpeg) // 2]


# (prompt, chosen, rejected, label): one row of each kind a real set has
ROWS = [
    ("a good pair", "img/good.png", "img/other.png", None),  # kept
    ("swapped", "img/good.png", "img/other.png", 0.0),  # kept, the rejected image wins
    ("a tie", "img/good.png", "img/other.png", 0.5),  # dropped: ties
    ("same image", "img/good.png", "img/good.png", None),  # dropped: identical images
    ("", "img/good.png", "img/other.png", None),  # skipped: empty caption
    ("gone", "img/absent.png", "img/other.png", None),  # skipped: missing image
    ("bad label", "img/good.png", "img/other.png", "high"),  # skipped: invalid label
    ("truncated", "img/truncated.jpg", "img/other.png", None),  # kept; decoding skips it
    ("garbage", "img/good.png", "img/garbage.png", None),  # kept; decoding skips it
    ("grey", "img/grey.png", "img/other.png", None),  # kept; decoding converts it to RGB (mode L)
    ("cmyk", "img/cmyk.jpg", "img/other.png", None),  # kept; decoding converts it
    ("rgba", "img/good.png", "img/rgba.png", None),  # kept; decoding converts it
]
DECODE_SKIPS = {"truncated": "undecodable image", "garbage": "undecodable image"}
CONVERTED = {"grey": ("w", "L"), "cmyk": ("w", "CMYK"), "rgba": ("l", "RGBA")}


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "set"
    (folder / "img").mkdir(parents=True)
    (folder / "img" / "good.png").write_bytes(_png((200, 30, 30)))
    (folder / "img" / "other.png").write_bytes(_png((30, 30, 200)))
    (folder / "img" / "truncated.jpg").write_bytes(_truncated_jpeg())
    (folder / "img" / "garbage.png").write_bytes(b"not an image at all")
    for name, mode, fmt in (("grey.png", "L", "PNG"), ("cmyk.jpg", "CMYK", "JPEG"), ("rgba.png", "RGBA", "PNG")):
        (folder / "img" / name).write_bytes(_encode(Image.new("RGB", (80, 60), (90, 90, 90)).convert(mode), fmt))
    return folder


def _write_jsonl(folder: Path) -> Path:
    lines = [json.dumps({"prompt": p, "chosen": c, "rejected": r, **({} if label is None else {"label": label})})
             for p, c, r, label in ROWS]
    lines += ["{oops", json.dumps({"prompt": "x", "chosen": "img/good.png"})]
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def _write_csv(folder: Path, header: tuple[str, ...] = ("prompt", "chosen", "rejected", "label")) -> Path:
    import csv

    with open(folder / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([p, c, r, "" if label is None else label] for p, c, r, label in ROWS)
    return folder / "pairs.csv"


def _decode_all(pairs: list[data.Pair], cfg: DataRecipe, workers: int) -> tuple[list[str], data.PairStats]:
    """Every pair once (keys 0..n-1) through a real DataLoader; the skipped rows come back inside the batches."""
    loader = torch.utils.data.DataLoader(data.PreferenceDataset(pairs, cfg, seed=0), batch_size=2,
                                         sampler=list(range(len(pairs))), collate_fn=data.collate,
                                         num_workers=workers)
    prompts, stats = [], data.PairStats()
    for batch in loader:
        prompts += batch.prompts
        stats.merge(batch.stats)
    return prompts, stats


def test_jsonl_with_broken_rows_yields_the_good_pairs_and_counts_the_rest(messy_folder: Path) -> None:
    path = _write_jsonl(messy_folder)
    cfg = DataRecipe(source=str(path), resolution=32)
    pairs, stats = data.prepare_pairs(data.read_records(cfg), cfg)
    assert [p.prompt for p in pairs] == ["a good pair", "swapped", *DECODE_SKIPS, *CONVERTED]
    assert pairs[1].image_w.endswith("other.png") and pairs[1].label == 1.0  # label 0: the other image wins
    assert (stats.read, stats.kept) == (len(ROWS) + 2, 7)
    assert stats.dropped == {"ties": 1, "identical images": 1}
    assert stats.skipped == {
        f"{path}:5": "empty caption", f"{path}:6": "missing image", f"{path}:7": "invalid label",
        f"{path}:13": "malformed row (not valid JSON)", f"{path}:14": "malformed row (no rejected)"}
    assert "skipped 5 unusable" in stats.summary() and f"(first: {path}:5)" in stats.summary()

    # decoding, in two worker processes: each unusable pair falls back to a good one and is reported once
    prompts, decoded = _decode_all(pairs, cfg, workers=2)
    assert len(prompts) == 7 and set(prompts) == {"a good pair", "swapped", *CONVERTED}
    where = {p.prompt: p.where for p in pairs}
    assert decoded.skipped == {where[prompt]: why for prompt, why in DECODE_SKIPS.items()}
    assert decoded.converted == {f"{where[prompt]} ({which})": mode for prompt, (which, mode) in CONVERTED.items()}
    assert "converted 3 images to RGB (1 CMYK, 1 L, 1 RGBA)" in decoded.summary()

    strict = DataRecipe(source=str(path), resolution=32, strict=True)
    with pytest.raises(data.DataError, match=r"pairs.jsonl:5: empty caption \(\[data\].strict"):
        data.prepare_pairs(data.read_records(strict), strict)
    with pytest.raises(data.DataError, match=r"pairs.jsonl:8: undecodable image"):
        data.PreferenceDataset(pairs, strict, seed=0)[2]


def test_csv_yields_what_the_jsonl_does_and_honours_labels_and_remapped_columns(messy_folder: Path) -> None:
    jsonl = _write_jsonl(messy_folder)
    from_jsonl, _ = data.prepare_pairs(data.read_records(DataRecipe(source=str(jsonl))), DataRecipe())
    path = _write_csv(messy_folder)
    cfg = DataRecipe(source=str(path))
    pairs, stats = data.prepare_pairs(data.read_records(cfg), cfg)
    assert [(p.prompt, p.image_w, p.image_l, p.label) for p in pairs] == \
        [(p.prompt, p.image_w, p.image_l, p.label) for p in from_jsonl]
    assert stats.dropped == {"ties": 1, "identical images": 1}
    assert sorted(stats.skipped.values()) == ["empty caption", "invalid label", "missing image"]
    assert f"{path}:6" in stats.skipped  # the header is line 1: ROWS[4] is line 6

    kept, _ = data.prepare_pairs(data.read_records(cfg), DataRecipe(ties="keep"))
    assert [p.label for p in kept if p.prompt == "a tie"] == [0.5]
    renamed = _write_csv(messy_folder, header=("text", "good", "bad", "p"))
    columns = (("prompt", "text"), ("chosen", "good"), ("rejected", "bad"), ("label", "p"))
    remapped, _ = data.prepare_pairs(data.read_records(DataRecipe(source=str(renamed), columns=columns)), cfg)
    assert [p.prompt for p in remapped] == [p.prompt for p in pairs]
    with pytest.raises(data.DataError, match=r"pairs.csv: missing column\(s\) prompt, chosen, rejected"):
        list(data.read_records(DataRecipe(source=str(renamed))))


def test_parquet_is_read_lazily_with_ties_flags_remapped_columns_and_broken_images(tmp_path: Path) -> None:
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    table = pa.table({
        "text": [f"p{i}" for i in range(8)],
        "a": [red, red, red, red, red, None, _truncated_jpeg(), red],
        "b": [blue, blue, blue, red, blue, blue, blue, blue],
        "pref": [1.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0],
        "are_different": [True, True, True, True, False, True, True, True],  # p3 claims different but is not
        "has_label": [True] * 7 + [False],
    })
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=3)
    columns = (("caption", "text"), ("jpg_0", "a"), ("jpg_1", "b"), ("label_0", "pref"))
    cfg = DataRecipe(source=str(tmp_path / "train.parquet"), resolution=32, columns=columns)
    records = list(data.read_records(cfg))
    assert all(isinstance(r.image_0, data.ParquetCell) for r in records)  # no image bytes held
    assert records[4].where == f"{tmp_path / 'train.parquet'} row 4" and records[4].image_0.group == 1

    pairs, stats = data.prepare_pairs(iter(records), cfg)
    assert [p.prompt for p in pairs] == ["p0", "p1", "p3", "p5", "p6"]
    assert stats.dropped == {"ties": 1, "identical images": 1, "unlabelled": 1}
    assert pairs[1].image_w.column == "b"  # label 0: jpg_1 wins
    prompts, decoded = _decode_all(pairs, cfg, workers=0)
    assert set(prompts) == {"p0", "p1"}
    assert sorted(decoded.skipped.values()) == ["identical images", "missing image", "undecodable image"]
    strict = DataRecipe(source=cfg.source, resolution=32, columns=columns, strict=True)
    assert data.PreferenceDataset(pairs, strict, seed=0)[2]["prompt"] != "p3"  # identical images: a drop, not an error

    pq.write_table(table.drop_columns(["pref"]), tmp_path / "nolabel.parquet")
    with pytest.raises(data.DataError, match=r"nolabel.parquet: missing column\(s\) label_0 \(or label_1\)"):
        list(data.read_records(DataRecipe(source=str(tmp_path / "nolabel.parquet"), columns=columns[:3])))


def test_the_sampler_reads_each_parquet_row_group_once_per_window(tmp_path: Path) -> None:
    """40 pairs in 10 row groups of 4; a loader worker's LRU holds 4 groups. Shuffling whole row groups, then the
    pairs within windows of 8, reads each group's two image columns once; a global shuffle reads far more."""
    images = [_png((i * 6, 255 - i * 6, 7), size=(8, 8)) for i in range(80)]
    pq.write_table(pa.table({"caption": [f"p{i}" for i in range(40)], "jpg_0": images[:40], "jpg_1": images[40:],
                             "label_0": [1.0] * 40}), tmp_path / "train.parquet", row_group_size=4)
    cfg = DataRecipe(source=str(tmp_path / "train.parquet"), resolution=8)
    pairs, _ = data.prepare_pairs(data.read_records(cfg), cfg)
    blocks = data.locality_blocks(pairs)
    assert blocks == list(range(0, 40, 4))

    def reads(sampler: data.StreamSampler) -> tuple[int, list[int]]:
        dataset = data.PreferenceDataset(pairs, cfg, seed=0, reader=data.ImageReader(capacity=8))
        order = list(sampler)
        for key in order:
            dataset[key]
        return dataset.reader.reads, order

    local, order = reads(data.StreamSampler(40, 40, seed=0, blocks=blocks, window=8))
    assert sorted(order) == list(range(40))
    assert all(len({i // 4 for i in order[w:w + 8]}) == 2 for w in range(0, 40, 8))  # two whole groups a window
    assert local == 20  # 10 groups x 2 image columns
    assert reads(data.StreamSampler(40, 40, seed=0))[0] > 2 * local


def test_hub_dataset_downloaded_reads_rows_by_reference(pickapic_hub: Path, tmp_path: Path) -> None:
    folder = pickapic_hub
    cfg = DataRecipe(source=f"hf:{folder}", resolution=32)
    records = list(data.read_records(cfg))
    assert [r.prompt for r in records] == [f"t{i}" for i in range(12)]
    assert isinstance(records[0].image_0, data.HubCell)
    validation = DataRecipe(source=f"hf:{folder}", split="validation")
    assert [r.prompt for r in data.read_records(validation)] == ["v0", "v1", "v2"]
    pairs, stats = data.prepare_pairs(iter(records), cfg)
    assert len(pairs) == 11 and stats.dropped == {"ties": 1}
    assert pairs[0].image_w.column == "jpg_1"  # t0 has label_0 = 0
    item = data.PreferenceDataset(pairs, cfg, seed=0)[0]
    assert item["pixels"].shape == (2, 3, 32, 32)
    with pytest.raises(data.DataError, match="cannot load it"):
        list(data.read_records(DataRecipe(source=f"hf:{tmp_path / 'absent'}")))
    with pytest.raises(data.DataError, match="synthetic:shapes"):
        data.synthetic_source("synthetic:shapes:many", 64)


# --------------------------------------------------------------------------------------------------
# Malformed data: whatever the bytes, the readers raise DataError (naming the file) or return clean records

FUZZ = settings(max_examples=40, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=6)
ROW = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "label", "extra"]),
                      JSON | st.sampled_from(["a.png", "b.png", "missing.png", "\x00", "x" * 300]), max_size=5)


def _read(path: Path) -> list[data.PairRecord]:
    try:
        records = list(data.read_records(DataRecipe(source=str(path))))
    except data.DataError as err:
        assert str(path) in str(err)
        return []
    # a bad row is a record marked with its problem (skipped and counted later), never a crash
    assert all(r.problem or (isinstance(r.prompt, str) and 0.0 <= r.label_0 <= 1.0) for r in records)
    return records


@FUZZ
@given(blob=st.binary(max_size=400))
def test_random_bytes_as_jsonl_or_parquet_raise_data_errors(tmp_path: Path, blob: bytes) -> None:
    for name in ("pairs.jsonl", "pairs.parquet"):
        (tmp_path / name).write_bytes(blob)
        _read(tmp_path / name)


@FUZZ
@given(rows=st.lists(ROW | JSON, min_size=1, max_size=4))
def test_random_json_rows_raise_data_errors_or_read_clean_records(tmp_path: Path, rows: list) -> None:
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(_png((1, 2, 3)))
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    _read(tmp_path / "pairs.jsonl")


@FUZZ
@given(cut=st.floats(0.0, 0.999))
def test_truncated_parquet_raises_a_data_error(tmp_path: Path, cut: float) -> None:
    pq.write_table(pa.table({"caption": ["p"], "jpg_0": [_png((1, 2, 3))], "jpg_1": [_png((3, 2, 1))],
                             "label_0": [1.0]}), tmp_path / "full.parquet")
    blob = (tmp_path / "full.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(blob[: int(cut * len(blob))])
    with pytest.raises(data.DataError, match="cut.parquet: not a readable parquet file"):
        list(data.read_records(DataRecipe(source=str(tmp_path / "cut.parquet"))))


@pytest.mark.parametrize(("column", "values", "problem"), [
    ("caption", [1], "caption is int64, expected string"),
    ("jpg_0", [1.5], "jpg_0 is double, expected binary"),
    ("label_0", ["yes"], "label_0 is string, expected number"),
])
def test_parquet_columns_of_the_wrong_type_are_named(tmp_path: Path, column: str, values: list, problem: str) -> None:
    columns = {"caption": ["p"], "jpg_0": [_png((1, 2, 3))], "jpg_1": [_png((3, 2, 1))], "label_0": [1.0]}
    null_type = {"caption": pa.string(), "jpg_0": pa.binary(), "jpg_1": pa.binary(), "label_0": pa.float64()}
    array = pa.array(values, type=null_type[column] if values == [None] else None)
    pq.write_table(pa.table({**columns, column: array}), tmp_path / "pairs.parquet")
    with pytest.raises(data.DataError, match=f"pairs.parquet: {problem}"):
        list(data.read_records(DataRecipe(source=str(tmp_path / "pairs.parquet"))))


@FUZZ
@given(image=st.sampled_from(["PNG", "JPEG", "GIF", "WEBP"]), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6))
@example(image="GIF", cut=1.0, flips=[(6, 255), (7, 255), (8, 255), (9, 255)])  # 65535 x 65535: a decompression bomb
def test_truncated_or_corrupted_images_raise_data_errors(image: str, cut: float, flips: list) -> None:
    buffer = io.BytesIO()
    Image.fromarray(torch.randint(0, 255, (24, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                    .numpy()).save(buffer, format=image)
    blob = bytearray(buffer.getvalue()[: max(1, int(cut * len(buffer.getvalue())))])
    for position, value in flips:
        blob[position % len(blob)] = value
    try:
        decoded = data.open_image(bytes(blob), "pairs.parquet row 7")
    except data.DataError as err:
        assert str(err) in ("pairs.parquet row 7: undecodable image", "pairs.parquet row 7: missing image")
    else:
        assert decoded.mode == "RGB"


# The data package's floors, lowest first: each module imports only those before it (no cycles), and of the rest of
# lora-dpo only the floors below data (never models, step, the trainer or the CLI)
DATA_MODULES = ("records", "rows", "hub", "readers", "pairs", "images", "dataset", "streaming", "build")
BELOW_DATA = {"lora_dpo.errors", "lora_dpo.files", "lora_dpo.recipe", "lora_dpo.synthetic"}


def _our_imports(path: Path) -> set[str]:
    """Every `lora_dpo...` module a file imports, at the top or inside a function (`from lora_dpo import x` as
    `lora_dpo.x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("lora_dpo")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_dpo"):
            found |= {f"lora_dpo.{a.name}" for a in node.names} if node.module == "lora_dpo" else {node.module}
    return found


def test_the_data_package_imports_one_way_and_never_models() -> None:
    package = Path(data.__file__).parent
    assert {p.stem for p in package.glob("*.py")} == {"__init__", *DATA_MODULES}  # a new module takes a floor here
    for floor, name in enumerate(DATA_MODULES):
        imports = _our_imports(package / f"{name}.py")
        inside = {m.removeprefix("lora_dpo.data.") for m in imports if m.startswith("lora_dpo.data.")}
        assert inside <= set(DATA_MODULES[:floor]), f"data.{name} imports {inside - set(DATA_MODULES[:floor])}"
        outside = {m for m in imports if not m.startswith("lora_dpo.data.")}
        assert outside <= BELOW_DATA, f"data.{name} imports {outside - BELOW_DATA}"
    exported = _our_imports(package / "__init__.py")
    assert exported <= {f"lora_dpo.data.{name}" for name in DATA_MODULES}
    assert all(hasattr(data, name) for name in data.__all__)


def test_cache_home_is_the_files_floor_and_models_still_offers_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_dpo import files, models

    assert models.cache_home is files.cache_home
    monkeypatch.setenv("LORA_DPO_HOME", str(tmp_path))
    assert files.cache_home() == tmp_path
    monkeypatch.delenv("LORA_DPO_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert files.cache_home() == tmp_path / "home" / ".cache" / "lora-dpo"


# --------------------------------------------------------------------------------------------------
# The held-out set: whole prompts, never trained on, for every source; another split; image modes


def _repeated_prompts_jsonl(folder: Path, prompts: int = 10, per_prompt: int = 4) -> Path:
    """A JSONL set where every prompt has `per_prompt` pairs (as Pick-a-Pic has ~14), each with its own images."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for p in range(prompts):
        for k in range(per_prompt):
            for side, colour in (("w", (20 * p, 10 * k, 200)), ("l", (200, 10 * k, 20 * p))):
                (folder / "img" / f"{p}-{k}-{side}.png").write_bytes(_png(colour, (40, 40)))
            lines.append(json.dumps({"prompt": f"prompt {p}", "chosen": f"img/{p}-{k}-w.png",
                                     "rejected": f"img/{p}-{k}-l.png"}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def test_held_out_pairs_share_no_prompt_with_training_pairs(tmp_path: Path) -> None:
    """10 prompts x 4 pairs, 6 held out: whole prompts are drawn from the seed (2 of them), exactly 6 pairs are
    measured, the 2 other pairs of the second prompt are in neither set (counted), and no prompt is in both."""
    cfg = DataRecipe(source=str(_repeated_prompts_jsonl(tmp_path)), resolution=32, val_pairs=6)
    train, heldout, stats = data.split_live(cfg, seed=0)
    held_prompts = {p.prompt for p in heldout.pairs}
    assert len(heldout.pairs) == 6 and len(held_prompts) == 2 and len(train) == 32
    assert not held_prompts & {p.prompt for p in train}
    assert stats.dropped == {data.HELD_OUT_PROMPT: 2} and stats.kept == 38 and "2 held-out prompt" in stats.summary()
    assert heldout.describe() == "6 pairs, 2 prompts never trained on, held out by prompt from the training source"
    assert [row["where"] for row in heldout.rows()] == [p.where for p in heldout.pairs]
    assert data.split_live(cfg, seed=0)[1].pairs == heldout.pairs  # the seed decides, nothing else
    others = {frozenset(p.prompt for p in data.split_live(cfg, seed=s)[1].pairs) for s in range(6)}
    assert others != {frozenset(held_prompts)}  # another seed, other prompts
    parts = data.build_datasets(cfg, seed=0, draws=8, batch_size=2)
    assert parts.heldout == heldout.describe() and parts.heldout_rows == heldout.rows()
    assert "32 train / 6 held out (6 pairs, 2 prompts never trained on" in parts.summary
    with pytest.raises(data.DataError, match="holds out every prompt"):
        data.split_pairs(data.prepare_pairs(data.read_records(cfg), cfg)[0], 39, seed=0)


def _hub_with_repeats(folder: Path, rows: int = 16, prompts: int = 4, validation: tuple[str, ...] = ()) -> Path:
    """A Pick-a-Pic-layout dataset folder whose captions repeat (`p{i % prompts}`), in two train files, and a
    validation split with `validation`'s captions."""
    def table(captions: list[str], offset: int) -> pa.Table:
        n = len(captions)
        return pa.table({"caption": captions,
                         "jpg_0": [_png((offset + i * 9, 50, 90), (40, 40)) for i in range(n)],
                         "jpg_1": [_png((90, 50, offset + i * 9), (40, 40)) for i in range(n)],
                         "label_0": [1.0] * n, "label_1": [0.0] * n})

    (folder / "data").mkdir(parents=True)
    captions = [f"p{i % prompts}" for i in range(rows)]
    pq.write_table(table(captions[: rows // 2], 0), folder / "data" / "train-00000-of-00002.parquet")
    pq.write_table(table(captions[rows // 2:], 100), folder / "data" / "train-00001-of-00002.parquet")
    if validation:
        pq.write_table(table(list(validation), 7), folder / "data" / "validation-00000-of-00001.parquet")
    return folder


def test_val_split_holds_out_another_split_and_training_skips_its_prompts(tmp_path: Path) -> None:
    """`[data].val_split` takes the held-out pairs from the dataset's other split (a local parquet folder, the hub
    layout downloaded, streamed); a training pair whose prompt is in it is dropped and counted; val_pairs caps
    it (0: all); a source without named splits, or without that split, is a DataError listing the splits."""
    folder = _hub_with_repeats(tmp_path / "set", validation=("p1", "v1", "v2", "v1"))
    local = DataRecipe(source=str(folder / "data"), resolution=32, val_split="validation")
    train, heldout, stats = data.split_live(local, seed=0)
    assert sorted(p.prompt for p in heldout.pairs) == ["p1", "v1", "v1", "v2"]
    assert "p1" not in {p.prompt for p in train} and len(train) == 12 and stats.dropped[data.HELD_OUT_PROMPT] == 4
    assert heldout.describe() == "4 pairs, 3 prompts never trained on, from split 'validation'"
    assert all("validation-00000-of-00001.parquet row" in row["where"] for row in heldout.rows())
    capped = data.split_live(DataRecipe(source=str(folder / "data"), val_split="validation", val_pairs=2), seed=0)
    assert len(capped[1].pairs) == 2
    for streaming in (False, True):
        hub = DataRecipe(source=f"hf:{folder}", resolution=32, val_split="validation", val_pairs=3,
                         streaming=streaming, shuffle_buffer=4)
        parts = data.build_datasets(hub, seed=0, draws=4, batch_size=2)
        assert len(parts.val) == 3 and "from split 'validation'" in parts.heldout
        assert all("[validation]" in row["where"] for row in parts.heldout_rows)
    with pytest.raises(data.DataError, match=r"\[data\].val_split = 'test'.*its splits: train, validation"):
        data.split_live(DataRecipe(source=str(folder / "data"), val_split="test"), seed=0)
    with pytest.raises(data.DataError, match=r"\[data\].split = 'valid'.*its splits: train, validation"):
        list(data.read_records(DataRecipe(source=str(folder / "data"), split="valid")))
    jsonl = _repeated_prompts_jsonl(tmp_path / "jsonl", prompts=2)
    with pytest.raises(data.DataError, match="has no named splits"):
        data.split_live(DataRecipe(source=str(jsonl), val_split="validation"), seed=0)


def _mode_image(mode: str) -> Image.Image:
    """A 4x4 image in `mode`: mid grey where the mode has no colour, transparent where it has alpha."""
    if mode == "I;16":
        return Image.fromarray(torch.full((4, 4), 32896, dtype=torch.int32).numpy().astype("uint16"))
    if mode == "P":
        image = Image.new("P", (4, 4), 1)
        image.putpalette([0, 0, 0, 128, 128, 128] + [0] * 762)
        return image
    if mode == "P transparent":
        image = _mode_image("P")
        image.info["transparency"] = 1
        return image
    colour = {"RGBA": (128, 128, 128, 0), "LA": (128, 0), "L": 128, "CMYK": (0, 0, 0, 127), "1": 1, "I": 128,
              "F": 128.0}[mode]
    return Image.new(mode, (4, 4), colour)


@pytest.mark.parametrize(("mode", "rgb"), [
    ("RGBA", (255, 255, 255)), ("LA", (255, 255, 255)), ("P transparent", (255, 255, 255)),  # alpha on white
    ("L", (128, 128, 128)), ("P", (128, 128, 128)), ("CMYK", (128, 128, 128)), ("1", (255, 255, 255)),
    ("I;16", (128, 128, 128)), ("I", (128, 128, 128)), ("F", (128, 128, 128))])
def test_convertible_image_modes_become_rgb(mode: str, rgb: tuple[int, int, int], tmp_path: Path) -> None:
    """Each mode converts to RGB (16-bit scaled, not clipped; alpha composited on white), also after a round trip
    through a real file, and a pair holding one is trained on and counted as converted, never skipped."""
    image = _mode_image(mode)
    converted = data.to_rgb(image)
    assert converted.mode == "RGB"
    assert all(abs(a - b) <= 1 for a, b in zip(converted.getpixel((0, 0)), rgb, strict=True))
    fmt = {"CMYK": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode.split()[0], "PNG")
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, format=fmt)
    (tmp_path / "other.png").write_bytes(_png((10, 20, 30)))
    pair = data.Pair("a prompt", str(path), str(tmp_path / "other.png"), 1.0, "pairs.jsonl:1")
    item = data.PreferenceDataset([pair], DataRecipe(resolution=4, random_flip=False), seed=0)[0]
    assert item["pixels"].shape == (2, 3, 4, 4) and not item["stats"].skipped
    assert list(item["stats"].converted) == ["pairs.jsonl:1 (w)"]
