"""The installed libraries are the tested set that pyproject.toml pins, and they accept each other.

A fresh `pip install -e ".[test]"` resolves whatever the pins allow; when a new release of one library needs a newer
release of another than we pin (transformers 5.24 needs peft >= 0.22), these tests name the pair instead of a
format test failing deep inside transformers.
"""

from __future__ import annotations

import importlib.metadata as md
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
    return [Requirement(r) for r in reqs]


@pytest.mark.parametrize("req", _requirements(), ids=lambda r: r.name)
def test_installed_version_is_the_pinned_one(req: Requirement) -> None:
    try:
        installed = md.version(req.name)
    except md.PackageNotFoundError:
        pytest.fail(f"{req.name} is not installed; run the README's install command")
    assert req.specifier.contains(installed, prereleases=True), (
        f"{req.name} {installed} is installed but pyproject.toml asks for {req.specifier}; reinstall with the README's "
        "command in a fresh virtual environment")


def test_transformers_accepts_the_pinned_peft() -> None:
    from transformers.integrations.peft import MIN_PEFT_VERSION

    assert Version(md.version("peft")) >= Version(MIN_PEFT_VERSION), (
        f"transformers {md.version('transformers')} needs peft >= {MIN_PEFT_VERSION}, "
        f"peft {md.version('peft')} is installed")


def test_readme_lists_the_pinned_versions() -> None:
    readme = (REPO / "README.md").read_text()
    for req in _requirements():
        exact = [s.version for s in req.specifier if s.operator == "=="]
        if exact:
            assert f"{req.name} {exact[0]}" in readme, f"README's tested versions do not list {req.name} {exact[0]}"
