"""README's Development section describes the repository as it is."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_names_every_test_folder_and_top_level_test_area():
    dev = ROOT.joinpath("README.md").read_text(encoding="utf-8").split("## Development", 1)[1]
    dev = " ".join(dev.split())
    tests = ROOT / "tests"
    folders = sorted(p.name for p in tests.iterdir() if p.is_dir() and any(p.glob("test_*.py")))
    assert folders and all(f"`tests/{name}/`" in dev for name in folders), folders
    areas = sorted(p.stem[len("test_"):] for p in tests.glob("test_*.py"))
    missing = [a for a in areas if f"`{a}`" not in dev]
    assert not missing, f"README's Development section does not list tests/test_{{{','.join(missing)}}}.py"
    assert "mirrors the package" not in dev
    named = re.findall(r"`lora_vision/(\w+)/`", dev)
    assert named and all((ROOT / "lora_vision" / n).is_dir() for n in named), named
