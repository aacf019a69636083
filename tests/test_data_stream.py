"""A streamed hub split, read by the real `datasets` streaming of real parquet files written here and by real
DataLoader workers: the held-out set by prompt hash (whatever the prompts' frequency), the window shuffle, and the
positional resume (exact, counting every row once, never reading the files a part had finished)."""

import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from lora_dpo import data
from lora_dpo.data.streaming import FULL, HELD_OUT_SHARE, prompt_code
from lora_dpo.recipe import DataRecipe


def _png(colour: tuple[int, int, int], size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _table(captions: list[str], first: int, undecodable: tuple[int, ...] = (), size: int = 12) -> pa.Table:
    """Pick-a-Pic rows numbered from `first`: row i's images are its own colours, every 9th row a tie, odd rows
    prefer jpg_1, the `undecodable` rows' first image cut in half."""
    rows = range(first, first + len(captions))
    jpg_0 = [_png((i * 37 % 256, i * 11 % 256, 90), size) for i in rows]
    jpg_0 = [b[: len(b) // 2] if i in undecodable else b for i, b in zip(rows, jpg_0, strict=True)]
    labels = [0.5 if i % 9 == 4 else float(i % 2 == 0) for i in rows]
    return pa.table({"caption": captions, "jpg_0": jpg_0,
                     "jpg_1": [_png((200, i * 11 % 256, i * 37 % 256), size) for i in rows],
                     "label_0": labels, "label_1": [1.0 - label for label in labels]})


def _folder(folder: Path, captions: list[str], files: int, group: int = 4, undecodable: tuple[int, ...] = (),
            known_size: bool = False, size: int = 12) -> Path:
    """A dataset folder laid out as the hub holds Pick-a-Pic (data/train-NNNNN-of-NNNNN.parquet, row groups of
    `group` rows), read by `datasets.load_dataset` as a hub id would be. `known_size`: a README whose
    dataset_info gives the split's size, as a hub dataset's card does."""
    (folder / "data").mkdir(parents=True)
    per = math.ceil(len(captions) / files)
    for f in range(files):
        table = _table(captions[f * per:(f + 1) * per], f * per, undecodable, size)
        pq.write_table(table, folder / "data" / f"train-{f:05d}-of-{files:05d}.parquet", row_group_size=group)
    if known_size:
        (folder / "README.md").write_text(
            "---\ndataset_info:\n  splits:\n  - name: train\n    num_bytes: 1\n"
            f"    num_examples: {len(captions)}\nconfigs:\n- config_name: default\n  data_files:\n"
            "  - split: train\n    path: data/train-*\n---\n")
    return folder


def _batches(cfg: DataRecipe, draws: int, resume: dict[str, Any] | None = None,
             seed: int = 0) -> list[data.PreferenceBatch]:
    parts = data.build_datasets(cfg, seed=seed, draws=draws, batch_size=2, stream=resume)
    loader = torch.utils.data.DataLoader(parts.train, batch_size=2, collate_fn=data.collate,
                                         num_workers=parts.num_workers)
    return list(loader)


def _saved(batches: list[data.PreferenceBatch], workers: int) -> dict[str, Any]:
    """What the trainer saves after consuming `batches`: each part's latest position, through JSON."""
    positions: dict[int, Any] = {}
    for batch in batches:
        positions.update(batch.stream_positions)
    return json.loads(json.dumps({"parts": positions, "processes": 1, "workers": workers, "batches": len(batches)}))


def _counted(batches: list[data.PreferenceBatch]) -> data.PairStats:
    stats = data.PairStats()
    for batch in batches:
        stats.merge(batch.stats)
    return stats


def _assert_same(resumed: list[data.PreferenceBatch], uninterrupted: list[data.PreferenceBatch]) -> None:
    assert len(resumed) == len(uninterrupted)
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert a.prompts == b.prompts and a.stream_positions == b.stream_positions
        for name in ("pixels_w", "pixels_l", "time_ids_w", "time_ids_l", "labels"):  # crops and flips: the keys
            assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_resumes_exactly_from_the_positions_its_batches_carry(tmp_path: Path, workers: int) -> None:
    """4 files of 12 rows in row groups of 4, 3 undecodable images, ties, 3 held-out pairs; 120 draws are three
    passes. Resumed from the positions after batch k (inside a window of the first pass, and in the third), the
    rest is the uninterrupted run's: prompts, pixels (crop and flip: the draw keys), labels, positions. A resume
    after an odd batch starts the DataLoader at the worker that was due. Every row is counted once over both
    runs."""
    captions = [f"p{i % 10}" for i in range(48)]
    folder = _folder(tmp_path / "set", captions, files=4, undecodable=(5, 18, 30))
    cfg = DataRecipe(source=f"hf:{folder}", resolution=8, streaming=True, val_pairs=3, shuffle_buffer=5,
                     num_workers=workers, caption_dropout=0.3)
    uninterrupted = _batches(cfg, draws=120)
    assert len(uninterrupted) == 60 and max(at["epoch"] for at in _saved(uninterrupted, workers)["parts"].values()) >= 2
    whole = _counted(uninterrupted)
    held = {p.prompt for p in data.build_datasets(cfg, seed=0, draws=8, batch_size=2).val.pairs}
    ties = sum(i % 9 == 4 for i in range(48))
    assert whole.read == 45 and whole.dropped == {"ties": ties}  # every row once (3 measured: the head counted them)
    assert len(whole.skipped) == sum(captions[i] not in held for i in (5, 18, 30))
    for k in (9, 51):
        saved = _saved(uninterrupted[:k], workers)
        if k == 9:  # inside a window of the first pass: its rows are read again on resuming, not counted again
            assert any(at["epoch"] == 0 and at["offset"] > 0 for at in saved["parts"].values())
        resumed = _batches(cfg, draws=120, resume=saved)
        _assert_same(resumed, uninterrupted[k:])
        counted = _counted(uninterrupted[:k])
        counted.merge(_counted(resumed))
        assert counted == whole  # rows read again on resuming (the window it stood in) are not counted again


def test_a_resumed_stream_never_reads_the_files_its_parts_had_finished(tmp_path: Path) -> None:
    """Resumed late in a pass, a part starts in its current file's row group: the files it had finished are not
    read again. They are rewritten here with other pairs, and the rest of the pass is still the uninterrupted
    run's (a replay of the stream, or a part that restarted its pass, would yield the new pairs)."""
    folder = _folder(tmp_path / "set", [f"p{i % 10}" for i in range(48)], files=4, undecodable=(5,))
    cfg = DataRecipe(source=f"hf:{folder}", resolution=8, streaming=True, shuffle_buffer=5)
    uninterrupted = _batches(cfg, draws=36)  # 41 usable pairs a pass: the run ends in its first pass
    saved = _saved(uninterrupted[:12], workers=0)
    at = saved["parts"]["0"]
    order = data.build_datasets(cfg, seed=0, draws=36, batch_size=2).train.file_order(0, 0, 4)
    finished = order[: at["file"]]
    assert at["epoch"] == 0 and len(finished) >= 2
    for f in finished:  # same schema, other prompts and images
        path = folder / "data" / f"train-{f:05d}-of-00004.parquet"
        pq.write_table(_table([f"rewritten {i}" for i in range(12)], 100 + f * 12), path, row_group_size=4)
    _assert_same(_batches(cfg, draws=36, resume=saved), uninterrupted[12:])
    assert not any("rewritten" in p for b in _batches(cfg, draws=36, resume=saved) for p in b.prompts)


def test_a_resume_with_other_parts_is_refused_naming_what_changed(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "set", [f"p{i}" for i in range(16)], files=4)
    cfg = DataRecipe(source=f"hf:{folder}", resolution=8, streaming=True, num_workers=2)
    saved = {"parts": {}, "processes": 1, "workers": 2, "batches": 3}
    with pytest.raises(data.DataError, match=r"in 1 processes and this launch has 2.*--num_processes 1"):
        data.build_datasets(cfg, seed=0, draws=8, batch_size=2, num_processes=2, stream=saved)
    with pytest.raises(data.DataError, match=r"2 loader workers per process and this run has 1 .*"
                                             r"\[data\].num_workers = 2"):
        data.build_datasets(DataRecipe(source=cfg.source, streaming=True, num_workers=1), seed=0, draws=8,
                            batch_size=2, stream=saved)
    assert data.build_datasets(cfg, seed=0, draws=8, batch_size=2, stream=saved).train.consumed == 3


def _held_prompts(captions: list[str], seed: int, limit: int) -> set[str]:
    return {c for c in captions if prompt_code(c, seed) < limit}


def test_a_stream_holds_out_prompts_by_hash_whatever_their_frequency(tmp_path: Path) -> None:
    """600 rows, the first 40 of one popular prompt (the old holdout, the first usable pairs, held out exactly
    that prompt), the split's size unknown: a prompt is held out when its hash with the seed falls in the lowest
    1 %, all its pairs are (measured: the first val_pairs; the others held out, not measured), none is dropped,
    training never sees one, and another seed holds out other prompts. The counts say so, plainly."""
    captions = ["popular"] * 40 + [f"prompt {i}" for i in range(560)]
    folder = _folder(tmp_path / "set", captions, files=2, group=50, size=4)
    cfg = DataRecipe(source=f"hf:{folder}", resolution=8, streaming=True, val_pairs=3, shuffle_buffer=50)
    limit = round(FULL * HELD_OUT_SHARE)
    chosen = []
    for seed in (0, 1):
        parts = data.build_datasets(cfg, seed=seed, draws=560, batch_size=2)
        held = _held_prompts(captions, seed, limit)
        assert parts.train.holdout.limit == limit and {p.prompt for p in parts.val.pairs} <= held
        assert len(parts.val.pairs) == 3 and "lowest 1 % (the split's size is unknown)" in parts.summary
        assert parts.summary.startswith(f"streaming hf:{folder} [train]: 3 pairs held out and measured (3 pairs, ")
        assert "rows, read to find them: " in parts.summary and " train, " in parts.summary  # the head's counts
        chosen.append(held)
    assert chosen[0] != chosen[1] and all(0 < len(held) < 20 for held in chosen)
    assert "popular" not in chosen[0] | chosen[1]  # its 40 pairs at the head do not make it held out

    parts = data.build_datasets(cfg, seed=0, draws=600, batch_size=2)  # a pass and more: rows counted once
    batches = list(torch.utils.data.DataLoader(parts.train, batch_size=2, collate_fn=data.collate))
    assert not {p for b in batches for p in b.prompts} & chosen[0]
    stats = _counted(batches)
    stats.merge(parts.stats)
    usable = [i for i in range(600) if i % 9 != 4]
    held_pairs = sum(captions[i] in chosen[0] for i in usable)
    assert stats.summary() == (f"600 pairs read: {len(usable) - held_pairs} train, {held_pairs} held out (3 measured, "
                               f"{held_pairs - 3} not measured); dropped: {600 - len(usable)} ties")


def test_a_known_split_size_sets_the_share_and_a_small_split_raises_it_to_hold_val_pairs(tmp_path: Path) -> None:
    """Where `datasets` knows the split's size N (its card), the share is val_pairs / min(N, 100 x val_pairs);
    should the split end before val_pairs held-out pairs, the share rises over the prompts read in hash order
    until they hold val_pairs. Either way the held-out prompts are exactly those below the limit."""
    captions = [f"q{i % 50}" for i in range(150)]  # 50 prompts x 3 pairs
    folder = _folder(tmp_path / "set", captions, files=3, group=10, size=4, known_size=True)
    cfg = DataRecipe(source=f"hf:{folder}", resolution=8, streaming=True, val_pairs=4, shuffle_buffer=8)
    usable = {i for i in range(150) if i % 9 != 4}
    raised = []
    for seed in range(6):
        parts = data.build_datasets(cfg, seed=seed, draws=8, batch_size=2)
        limit = parts.train.holdout.limit
        held = _held_prompts(captions, seed, limit)
        assert {p.prompt for p in parts.val.pairs} <= held and len(parts.val.pairs) == 4
        if "raised until they hold 4 pairs" in parts.summary:
            raised.append(seed)
            below = sorted({prompt_code(captions[i], seed) for i in usable if prompt_code(captions[i], seed) < limit})
            assert below[-1] == limit - 1  # the limit is just above the last prompt taken
            assert sum(prompt_code(captions[i], seed) < below[-1] for i in usable) < 4
        else:
            assert limit == math.ceil(FULL * 4 / 150)
            assert "the split's 150 rows, as `datasets` knows them" in parts.summary
    assert 0 < len(raised) < 6  # both ways were taken


def test_every_prompt_held_out_is_an_error(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "set", ["a", "b", "a", "b"], files=1)
    with pytest.raises(data.DataError, match=r"val_pairs = 4 holds out every prompt.*2 prompts.*val_split"):
        data.build_datasets(DataRecipe(source=f"hf:{folder}", streaming=True, val_pairs=4), seed=0, draws=4,
                            batch_size=2)


def test_the_pickapic_layout_streams_in_workers_shuffled_and_reproducibly(pickapic_hub: Path) -> None:
    """The hub layout (two files, a tie, a truncated image): every draw is yielded, more draws than pairs are a
    second pass, windows are shuffled the same way every time, each worker streams its own file."""
    cfg = DataRecipe(source=f"hf:{pickapic_hub}", resolution=32, streaming=True, val_pairs=2, shuffle_buffer=4)
    parts = data.build_datasets(cfg, seed=0, draws=16, batch_size=2)
    held = {p.prompt for p in parts.val.pairs}
    assert parts.sampler is None and len(held) == 2 and parts.heldout_rows[0]["where"].startswith(
        f"hf:{pickapic_hub}[train] row ")
    usable = {f"t{i}" for i in range(12)} - {"t5", "t7"} - held  # a tie, an undecodable image, held out

    def draw(workers: int) -> tuple[list[str], data.PairStats]:
        batches = _batches(dataclasses.replace(cfg, num_workers=workers), draws=16)
        return [p for b in batches for p in b.prompts], _counted(batches)

    prompts, stats = draw(workers=0)
    assert len(prompts) == 16 and set(prompts) == usable
    assert prompts != sorted(prompts) and draw(workers=0)[0] == prompts
    assert stats.dropped["ties"] == 1 and "undecodable image" in stats.skipped.values()
    in_workers, _ = draw(workers=2)
    assert len(in_workers) == 16 and set(in_workers) == usable


def test_a_streamed_val_split_is_measured_and_training_holds_out_its_prompts(tmp_path: Path) -> None:
    """`[data].val_split` streamed: the first val_pairs usable pairs of that split are measured; every training
    pair sharing one of their prompts is held out, not measured (never dropped), and counted so."""
    folder = _folder(tmp_path / "set", [f"p{i % 4}" for i in range(16)], files=2)
    pq.write_table(_table(["p1", "v1", "v2", "v1"], 50), folder / "data" / "validation-00000-of-00001.parquet")
    cfg = DataRecipe(source=f"hf:{folder}", resolution=8, streaming=True, val_split="validation", val_pairs=3,
                     shuffle_buffer=4)
    parts = data.build_datasets(cfg, seed=0, draws=20, batch_size=2)
    assert [p.prompt for p in parts.val.pairs] == ["p1", "v1", "v2"] and "from split 'validation'" in parts.heldout
    assert all("[validation] row" in row["where"] for row in parts.heldout_rows)
    batches = list(torch.utils.data.DataLoader(parts.train, batch_size=2, collate_fn=data.collate))
    assert "p1" not in {p for b in batches for p in b.prompts}
    stats = _counted(batches)
    stats.merge(parts.stats)
    usable = [i for i in range(16) if i % 9 != 4]
    p1 = sum(i % 4 == 1 for i in usable)
    assert stats.summary() == (f"19 pairs read: {len(usable) - p1} train, {p1 + 3} held out (3 measured, {p1} not "
                               f"measured); dropped: {16 - len(usable)} ties")
