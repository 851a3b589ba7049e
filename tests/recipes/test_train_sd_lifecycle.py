"""scripts/train_sd.py across runs of one output folder: a reused folder, Ctrl-C, a run killed after logging, a full
disk. Each fault ends in one clear message and leaves the folder resumable to the adapter of an unbroken run."""

from __future__ import annotations

import errno
import json
import shlex
import shutil
import signal
from pathlib import Path

import pytest

import lora_vision.io
from lora_vision.io import read_safetensors
from test_train_sd import _load_script

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def train_sd():
    """The script module (its `main(argv) -> int`), loaded as test_train_sd loads it."""
    return _load_script()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    """Two instance folders with different images."""
    root = tmp_path_factory.mktemp("instances")
    for folder, names in (("a", ("toy_00", "toy_01")), ("b", ("toy_03",))):
        (root / folder).mkdir()
        for name in names:
            shutil.copy(REPO / "samples" / "instance" / f"{name}.jpg", root / folder)
    return root / "a", root / "b"


def _args(instance: Path, out: Path, steps: int, every: int = 1000, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", "tiny-sd1", "--instance_data_dir", str(instance), "--instance_prompt",
            "a photo of sks toy", "--output_dir", str(out), "--max_train_steps", str(steps), "--train_batch_size", "1",
            "--logging_steps", "1", "--report_to", "none", "--strength_sweep=", "--export_kohya", "false",
            "--learning_rate", "1e-3", "--checkpointing_steps", str(every), "--checkpoints_total_limit", "10", *extra]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("train_sd.py: error")]


def _same_adapter(a: Path, b: Path) -> None:
    ta, _ = read_safetensors(a / "adapter.safetensors")
    tb, _ = read_safetensors(b / "adapter.safetensors")
    assert ta.keys() == tb.keys()
    assert all(ta[k].equal(tb[k]) for k in ta), "the resumed adapter differs from the unbroken run's"
    assert max(float(ta[k].abs().max()) for k in ta if "lora_B" in k) > 0  # trained weights, not zeros


@pytest.fixture(scope="module")
def unbroken(train_sd, images, tmp_path_factory) -> Path:
    """A 4-step run without faults: what every recovered run must reproduce."""
    out = tmp_path_factory.mktemp("unbroken") / "out"
    assert train_sd.main(_args(images[0], out, 4)) == 0
    return out


def test_reused_output_folder_is_refused_and_overwrite_starts_over(train_sd, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert train_sd.main(_args(images[0], out, 2, 1)) == 0  # run A: checkpoint-1, checkpoint-2
    config_a = (out / "config.yaml").read_text()
    capsys.readouterr()
    # run B, other images, same folder: refused before anything of A is touched
    assert train_sd.main(_args(images[1], out, 1)) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert f"{out} already holds checkpoints of another run (checkpoint-1, checkpoint-2)" in line
    assert "--resume_from_checkpoint latest" in line and "--output_dir" in line and "--overwrite_output_dir" in line
    assert (out / "config.yaml").read_text() == config_a
    # resuming A with fewer steps than it has would write A's weights as a 1-step adapter: refused
    assert train_sd.main(_args(images[0], out, 1, 1000, "--resume_from_checkpoint", "latest")) == 1
    (line,) = _error_lines(capsys.readouterr().err)
    assert "checkpoint-2 is at step 2, past this run's last step 1" in line
    # --overwrite_output_dir: A's checkpoints go, B's are the only ones
    assert train_sd.main(_args(images[1], out, 1, 1000, "--overwrite_output_dir")) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
    state = json.loads((out / "checkpoint-1" / "state.json").read_text())
    assert state["config"]["instance_data_dir"] == str(images[1])


def test_ctrl_c_saves_the_step_prints_the_resume_command_and_resumes_exactly(train_sd, images, unbroken, tmp_path,
                                                                             capsys, monkeypatch):
    out, real_step, calls = tmp_path / "out", train_sd.clip_and_step, []

    def step_then_ctrl_c(*args, **kwargs):  # the user presses Ctrl-C during step 3 (after its optimizer step)
        real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(train_sd, "clip_and_step", step_then_ctrl_c)
    try:
        code = train_sd.main(_args(images[0], out, 4))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as KeyboardInterrupt")
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 130 and len(calls) == 3
    assert f"interrupted at step 3 of 4; saved {out / 'checkpoint-3'}" in err
    assert (out / "checkpoint-3" / "state.json").is_file() and not (out / "adapter.safetensors").exists()
    command = err.split("Resume with:\n", 1)[1].splitlines()[0].strip()
    python, script, *argv = shlex.split(command)
    assert python == "python" and Path(script).resolve() == REPO / "scripts" / "train_sd.py"
    assert argv == ["--config", str(out / "config.yaml"), "--resume_from_checkpoint", "latest"]
    assert train_sd.main(argv) == 0  # the printed command, as it is
    assert "resumed from" in capsys.readouterr().out
    _same_adapter(out, unbroken)
    assert (out / "logs" / "loss.csv").read_text() == (unbroken / "logs" / "loss.csv").read_text()


def test_kill_after_logging_resumes_without_duplicate_log_rows(train_sd, images, unbroken, tmp_path):
    out = tmp_path / "out"
    assert train_sd.main(_args(images[0], out, 4, 2)) == 0
    # as if killed after step 4 was logged, before its checkpoint and the adapter were written
    shutil.rmtree(out / "checkpoint-4")
    (out / "adapter.safetensors").unlink()
    assert len((out / "logs" / "loss.csv").read_text().splitlines()) == 1 + 4
    assert train_sd.main(_args(images[0], out, 4, 2, "--resume_from_checkpoint", "latest")) == 0
    assert (out / "logs" / "loss.csv").read_text() == (unbroken / "logs" / "loss.csv").read_text()
    _same_adapter(out, unbroken)


def test_disk_full_while_checkpointing_is_one_line_and_leaves_nothing_half_written(train_sd, images, unbroken,
                                                                                  tmp_path, capsys, monkeypatch):
    out, real_write, writes = tmp_path / "out", lora_vision.io._save_file, []

    def fills_up(tensors, path, metadata):  # the 5th safetensors write (checkpoint-4's optimizer) hits a full disk
        writes.append(path)
        if len(writes) == 5:
            path.write_bytes(b"\0" * 100)  # what got written before the disk was full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(tensors, path, metadata)

    monkeypatch.setattr(lora_vision.io, "_save_file", fills_up)
    assert train_sd.main(_args(images[0], out, 4, 2)) == 1
    monkeypatch.undo()
    (line,) = _error_lines(capsys.readouterr().err)
    assert f"could not write {out / 'checkpoint-4'}: No space left on device" in line
    assert "checkpoint-2" in line and "--resume_from_checkpoint latest" in line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "config.yaml", "logs"]  # no temporaries
    assert sorted(p.name for p in (out / "checkpoint-2").iterdir()) == [
        "adapter.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    assert train_sd.main(_args(images[0], out, 4, 2, "--resume_from_checkpoint", "latest")) == 0
    _same_adapter(out, unbroken)
