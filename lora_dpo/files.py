"""Reading and writing the project's files so that a crash, a kill or a full disk never leaves half a file.

Writes: only safetensors and JSON (never pickles). A file or folder is written under a hidden temporary name
(`.<name>.<pid>.tmp`) in its own folder, flushed to disk, and renamed into place (`atomic_file`, `atomic_folder`,
the one way lora-dpo writes): a reader sees the old version or the new one, never part of one. `writing` turns
the operating system's refusal (disk full, read-only, a file where a folder should be) into an `OutputError` that
names the path, after removing the temporaries.

Reads: `read_safetensors` and `read_json` turn truncated or corrupt files into a `FileFormatError` naming the
file; `check_tensors` says when tensors read from a file do not fit the model they are meant for.

Hashes: `sha256` is the one hash lora-dpo gives a file, of its bytes (what `sha256sum` prints).

Where: `cache_home` is the folder of lora-dpo's own cached assets (the tiny bases, the generated demo set).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from lora_dpo.errors import FileFormatError, OutputError

TMP_SUFFIX = ".tmp"


def cache_home() -> Path:
    """Where built-in assets (tiny base, demo data) are cached: $LORA_DPO_HOME or ~/.cache/lora-dpo."""
    return Path(os.environ.get("LORA_DPO_HOME", Path.home() / ".cache" / "lora-dpo"))


def temporary(path: Path) -> Path:
    """Where `path` is written before the rename that publishes it: a hidden sibling, this process's own (the
    processes of one run may write the same file at once)."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def _umask_mode(path: Path) -> None:
    """Give a written file the mode the user's umask gives new files (safetensors and some writers create 0600
    files, which another account or a web server could not read)."""
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Write `path` whole or not at all: the block writes the yielded temporary path; on success it is flushed to
    disk and renamed into place, on failure removed. The one way lora-dpo writes a file."""
    tmp = temporary(path)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        _umask_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """`path.write_text(text)`, atomically (`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_folder(path: Path, replace: bool = True) -> Iterator[Path]:
    """The same for a folder: the block fills the yielded temporary folder, which is then flushed and renamed
    into place (`publish_folder`). `replace=False`: when another process published `path` first, keep its copy
    (and never delete a folder another process may be reading)."""
    tmp = temporary(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _umask_mode(file)
        if replace:
            publish_folder(tmp, path)
        else:
            sync_folder(tmp)
            with contextlib.suppress(OSError):  # renaming onto a non-empty folder fails: another copy won
                tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_temporaries(folder: Path) -> None:
    """Delete what an interrupted write left in `folder` (its hidden `.*.tmp` entries)."""
    for tmp in folder.glob(f".*{TMP_SUFFIX}"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def sha256(path: Path) -> str:
    """The sha256 of the file's bytes, in hex: the value training prints and records in metrics.json, the model card
    and eval reports show, so each names the same file and `sha256sum` checks any of them."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _reason(err: Exception) -> str:
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return str(err).rsplit("I/O error: ", 1)[-1]  # safetensors: "Error while serializing: I/O error: <os text>"


@contextmanager
def writing(target: Path, run_dir: Path | None = None) -> Iterator[None]:
    """Wrap the writing of `target`: an OS refusal becomes an OutputError naming it, and the temporaries left in
    `run_dir` (a run folder, which lora-dpo owns; never a user's folder) are removed."""
    try:
        yield
    except (OSError, SafetensorError) as err:  # safetensors reports the OS error in its own exception
        if run_dir is not None:
            remove_temporaries(run_dir)
        raise OutputError(f"cannot write {target}: {_reason(err)}. Free some disk space or choose another "
                          "[output].dir, then run again (nothing half-written was left behind)") from None


def make_folder(folder: Path) -> None:
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)


def sync_folder(folder: Path) -> None:
    """Flush every file in `folder`, then the folder's own entry list, to disk (before a rename publishes it)."""
    for file in folder.iterdir():
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def publish_folder(tmp: Path, final: Path) -> None:
    """Rename a finished temporary folder to `final`. An older `final` is moved aside first and deleted after,
    so a crash in between leaves a temporary (cleaned at the next start), never a mixed folder."""
    sync_folder(tmp)
    aside = temporary(final.with_name(final.name + ".old"))
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
    tmp.rename(final)
    sync_folder(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileFormatError(f"{path}: missing; the {what} is incomplete")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise FileFormatError(f"{path}: the {what} is not valid JSON ({err}); it is truncated or corrupt") from None


def read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (the only format lora-dpo reads weights from: no pickles)."""
    if not path.is_file():
        raise FileFormatError(f"{path}: missing; the {what} is incomplete")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise FileFormatError(f"{path}: the {what} is not a readable safetensors file ({err}); it is truncated "
                              "or corrupt") from None


def check_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Tensors read from `path` must have exactly `expected`'s names and shapes, floating dtypes and finite
    values; otherwise say what differs, with one example of each problem."""
    problems = []
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing (e.g. {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s) (e.g. {extra[0]})")
    shapes = [k for k in expected if k in found and found[k].shape != expected[k].shape]
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} tensor(s) of another shape (e.g. {k}: {tuple(found[k].shape)} in the "
                        f"file, {tuple(expected[k].shape)} here)")
    if problems:
        raise FileFormatError(f"{path}: the {what} does not fit this model: {'; '.join(problems)}. It was saved "
                              "with another base model or other [lora] settings (rank, target_modules)")
    dtypes = [k for k, v in found.items() if not v.dtype.is_floating_point]
    if dtypes:
        problems.append(f"{len(dtypes)} tensor(s) that are not floating point (e.g. {dtypes[0]}: "
                        f"{found[dtypes[0]].dtype})")
    nonfinite = [k for k, v in found.items() if v.dtype.is_floating_point and not bool(torch.isfinite(v).all())]
    if nonfinite:
        problems.append(f"{len(nonfinite)} tensor(s) with NaN or Inf values (e.g. {nonfinite[0]})")
    if problems:
        raise FileFormatError(f"{path}: the {what} is corrupt: {'; '.join(problems)}")
