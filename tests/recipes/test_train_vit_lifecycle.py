"""scripts/train_vit.py across runs of one output folder: a reused folder is refused, Ctrl-C saves and resumes exactly."""

from __future__ import annotations

import json
import shlex
import signal
import types
from pathlib import Path

import pytest
import torch

from lora_vision.io import read_safetensors
from lora_vision.training.checkpoint import CheckpointError
from test_train_vit import REPO, _run, data, train_vit  # noqa: F401  (data is a fixture)

COMMON = ("--model_name_or_path", "tiny-hf", "--save_peft", "false", "--checkpointing_steps", "100")


def test_reused_output_folder_is_refused_and_overwrite_starts_over(data: Path, tmp_path: Path) -> None:
    _run(tmp_path, data, *COMMON, "--max_train_steps", "3", "--checkpointing_steps", "1")
    kept = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    config = (tmp_path / "train_config.yaml").read_text()
    with pytest.raises(CheckpointError, match=f"{tmp_path} already holds checkpoints of another run .*"
                                              "--overwrite_output_dir"):
        _run(tmp_path, data, *COMMON, "--max_train_steps", "2", "--lora_rank", "2")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == kept
    assert (tmp_path / "train_config.yaml").read_text() == config  # nothing of the first run was touched
    with pytest.raises(CheckpointError, match="checkpoint-2 is at step 2, past this run's last step 1"):
        _run(tmp_path, data, *COMMON, "--max_train_steps", "1", "--resume_from_checkpoint", "latest")
    m = _run(tmp_path, data, *COMMON, "--max_train_steps", "2", "--lora_rank", "2", "--overwrite_output_dir")
    assert m["steps"] == 2 and not list(tmp_path.glob("checkpoint-*"))


def test_ctrl_c_saves_prints_the_resume_command_and_resumes_exactly(data: Path, tmp_path: Path, capsys,
                                                                    monkeypatch) -> None:
    steps = ("--max_train_steps", "6")
    full = _run(tmp_path / "full", data, *COMMON, *steps)
    real_loss, calls = train_vit.F.cross_entropy, []

    def loss_then_ctrl_c(*args, **kwargs):  # Ctrl-C during the 2nd training step (an epoch has 4)
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_vit, "F", types.SimpleNamespace(cross_entropy=loss_then_ctrl_c))
    out = tmp_path / "parts"
    args = ["--train_dir", str(data), "--output_dir", str(out), "--dataloader_num_workers", "0",
            "--per_device_train_batch_size", "16", "--logging_steps", "1", *COMMON, *steps]
    try:
        code = train_vit.main(args)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped as KeyboardInterrupt")
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 130 and len(calls) == 2
    assert f"[lora] interrupted at step 2 of 6; saved {out / 'checkpoint-2'}" in err
    assert not (out / "adapter.safetensors").exists()
    python, script, *argv = shlex.split(err.split("Resume with:\n", 1)[1].splitlines()[0])
    assert python == "python" and Path(script).resolve() == REPO / "scripts" / "train_vit.py"
    assert argv == ["--config", str(out / "train_config.yaml"), "--resume_from_checkpoint", "latest"]
    assert train_vit.main(argv) == 0  # the printed command, as it is
    a, _ = read_safetensors(tmp_path / "full" / "adapter.safetensors")
    b, _ = read_safetensors(out / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["history"] == full["history"] and resumed["steps"] == 6
