"""One way to write: `files.atomic_file` / `atomic_folder` publish whole or not at all, and no other module renames
temporaries by hand."""

import re
from pathlib import Path

import pytest

from lora_dpo import files


def test_a_file_is_published_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), files.atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    files.write_text(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_folder_is_published_whole_and_the_first_copy_can_be_kept(tmp_path: Path) -> None:
    target = tmp_path / "base"
    with files.atomic_folder(target) as tmp:
        (tmp / "a").write_text("first")
    with files.atomic_folder(target, replace=False) as tmp:  # another process finished first: its copy stays
        (tmp / "a").write_text("second")
    assert (target / "a").read_text() == "first"
    with files.atomic_folder(target) as tmp:
        (tmp / "a").write_text("third")
    assert (target / "a").read_text() == "third" and sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_no_module_renames_temporaries_by_hand() -> None:
    """Temporary names, fsync and clean-up live in files.py alone."""
    package = Path(files.__file__).parent
    for source in package.rglob("*.py"):
        if source.name == "files.py":
            continue
        text = source.read_text()
        assert not re.search(r"os\.replace\(|\.rename\(|\.replace\(\w*path\)", text), source


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    """safetensors creates 0600 files; what lora-dpo publishes is readable as the user's umask says."""
    import os

    import torch
    from safetensors.torch import save_file

    previous = os.umask(0o022)
    try:
        with files.atomic_file(tmp_path / "a.safetensors") as tmp:
            save_file({"x": torch.zeros(1)}, tmp)
        with files.atomic_folder(tmp_path / "folder") as tmp:
            save_file({"x": torch.zeros(1)}, tmp / "b.safetensors")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "folder" / "b.safetensors").stat().st_mode & 0o777 == 0o644
