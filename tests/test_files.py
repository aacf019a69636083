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
