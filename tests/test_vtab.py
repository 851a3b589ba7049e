"""The VTAB-1k layout loader on a tiny generated copy of the layout (issue 19)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_vision.data.imagenet import DatasetError
from lora_vision.data.synthetic import make_pattern_folder
from lora_vision.data.vtab import build_vtab_subset

KINDS = ("hstripes", "vstripes", "checker", "rings")  # kitti has 4 classes: label = index here


def make_vtab_copy(root: Path, task: str = "kitti", per_class: int = 5) -> Path:
    """<root>/<task>/images/... and the four split files, as in the VTAB-1k release (3 train, 2 val per class;
    test: the val images again)."""
    task_dir = root / task
    make_pattern_folder(task_dir / "images", KINDS, per_class=per_class, seed=5)
    train, val = [], []
    for label, kind in enumerate(KINDS):
        files = sorted((task_dir / "images" / kind).glob("*.png"))
        train += [f"{f.relative_to(task_dir)} {label}" for f in files[:3]]
        val += [f"{f.relative_to(task_dir)} {label}" for f in files[3:]]
    for name, lines in (("train800.txt", train), ("val200.txt", val), ("train800val200.txt", train + val),
                        ("test.txt", val)):
        (task_dir / name).write_text("\n".join(lines) + "\n")
    return root


def test_vtab_splits(tmp_path: Path) -> None:
    root = make_vtab_copy(tmp_path)
    tune = build_vtab_subset(root, "kitti", "tune")
    assert tune.classes == ["0", "1", "2", "3"] and len(tune.train) == 12 and len(tune.val) == 8
    assert tune.train[0][0].endswith("images/hstripes/hstripes_000.png") and tune.train[0][1] == 0
    final = build_vtab_subset(root, "kitti", "final")
    assert len(final.train) == 20 and len(final.val) == 8 and final.split == "vtab-kitti-final"


def test_vtab_errors_name_the_file_and_every_problem(tmp_path: Path) -> None:
    root = make_vtab_copy(tmp_path)
    with pytest.raises(DatasetError, match="unknown VTAB task 'kiti'"):
        build_vtab_subset(root, "kiti")
    with pytest.raises(DatasetError, match="cifar does not exist"):
        build_vtab_subset(root, "cifar")
    split = root / "kitti" / "val200.txt"
    split.write_text(split.read_text() + "images/none.png 1\nimages/hstripes/hstripes_000.png 7\njust-a-name\n")
    with pytest.raises(DatasetError) as err:
        build_vtab_subset(root, "kitti", "tune")
    text = str(err.value)
    assert "val200.txt: 2 bad line(s)" in text and "label 7 outside 0..3" in text and "just-a-name" in text
    assert "1 listed image(s) missing" in text and "none.png" in text and "\n" not in text
    (root / "kitti" / "test.txt").unlink()
    with pytest.raises(DatasetError, match="test.txt does not exist; expected the VTAB-1k layout"):
        build_vtab_subset(root, "kitti", "final")
