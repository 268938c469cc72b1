"""``pyproject.toml`` is read without setuptools' deprecation warnings (issue 14: ``make``
printed ~40 lines about the ``project.license`` table). PEP 639's SPDX string needs
setuptools 77, so the build requirement must not allow an older one."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

from packaging.requirements import Requirement
from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
FIRST_PEP639_SETUPTOOLS = "77.0.0"


def test_pyproject_is_read_without_deprecation_warnings() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), PYPROJECT)
    assert not [str(w.message) for w in caught if "deprecat" in str(w.message).lower()]


def test_build_requires_a_setuptools_that_reads_an_spdx_license() -> None:
    config = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    assert isinstance(config["project"]["license"], str)
    (setuptools,) = [
        Requirement(r) for r in config["build-system"]["requires"] if r.startswith("setuptools")
    ]
    assert setuptools.specifier.contains(FIRST_PEP639_SETUPTOOLS)
    assert not setuptools.specifier.contains("76.9")
