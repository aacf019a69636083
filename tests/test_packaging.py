"""Setting up as a new user does: pyproject.toml as setuptools reads it (the license as an SPDX string, PEP 639, no
deprecation warnings, a build floor that understands that form), and `make demo` ending with how to run the next
steps (the venv activated), as the README's "What next" says."""

import shutil
import subprocess
import tomllib
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).parent.parent
SPDX_FLOOR = Version("77")  # the first setuptools that reads `project.license` as an SPDX expression


def test_the_build_floor_reads_the_license_as_written() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)  # a table is deprecated (removed after 2027-02-18)
    [backend] = [Requirement(r) for r in project["build-system"]["requires"] if Requirement(r).name == "setuptools"]
    assert backend.specifier.contains(SPDX_FLOOR) and not backend.specifier.contains("76.9")


def test_setuptools_applies_the_project_table_without_a_warning() -> None:
    setuptools = pytest.importorskip("setuptools")  # torch depends on it, so it is in every venv this suite runs
    if Version(setuptools.__version__) < SPDX_FLOOR:  # python 3.11's bundled 65.x: pip builds with a newer one
        pytest.skip(f"setuptools {setuptools.__version__} here predates the build floor {SPDX_FLOOR}")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert [str(w.message).splitlines()[0] for w in caught] == []
    assert dist.metadata.license_expression == "Apache-2.0"


def test_make_demo_ends_by_saying_how_to_run_the_next_steps() -> None:
    """`make -n` prints what `make demo` would run, in order, without running it: after the training, how to put
    `lora-dpo` on the PATH (activate the venv) and a next command; the README's "What next" opens with the same."""
    assert shutil.which("make"), "make runs the README's two commands; install it"
    planned = subprocess.run(["make", "-n", "demo", "VENV=/nonexistent/venv"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, check=True).stdout.splitlines()
    trained = next(i for i, line in enumerate(planned) if "lora-dpo train recipes/tiny.toml" in line)
    after = "\n".join(planned[trained + 1:])
    assert ". /nonexistent/venv/bin/activate" in after and "lora-dpo inspect adapters/tiny" in after
    readme = (ROOT / "README.md").read_text()
    what_next = readme.split("## What next")[1].split("\n## ")[0]
    assert ". .venv/bin/activate" in what_next.split("1. ")[0]  # before the first command it lists
