"""Shared checks of the training-feature tests: the logged losses of a run, and a resumed run equal to an unbroken one."""

from __future__ import annotations

import csv
from pathlib import Path

from lora_vision.adapter import Adapter

from test_train_sd import base_args  # tests/recipes is on sys.path


def logged_losses(out: Path) -> list[float]:
    """The loss column of a run's logs/loss.csv."""
    with (out / "logs" / "loss.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def largest_difference(a: Path, b: Path) -> float:
    """The largest absolute difference between the tensors of two adapter files."""
    x, y = Adapter.load(a), Adapter.load(b)
    return max((x.tensors[k] - y.tensors[k]).abs().max().item() for k in x.tensors)


def check_resume_exact(train_sd, instance: Path, tmp_path: Path, flags: list[str], steps: int = 4) -> Path:
    """Train `steps` steps unbroken, and half of them then resumed; asserts equal adapters and losses. Returns the
    unbroken run's folder."""
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert train_sd.main(base_args("tiny-sd1", instance, full, steps=steps) + flags) == 0
    assert train_sd.main(base_args("tiny-sd1", instance, parts, steps=steps // 2) + flags) == 0
    assert train_sd.main(base_args("tiny-sd1", instance, parts, steps=steps) + flags
                         + ["--resume_from_checkpoint", "latest"]) == 0
    assert largest_difference(full / "adapter.safetensors", parts / "adapter.safetensors") <= 1e-6
    assert logged_losses(full) == logged_losses(parts)
    return full
