"""pyproject.toml as setuptools reads it: the license as an SPDX string (PEP 639), no deprecation warnings, and a
build floor that understands that form."""

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
