"""Two processes (gloo, CPU) through `accelerate launch` on the tiny models: sharding and gradient averaging.

- both ranks hold identical LoRA weights after training;
- 2 processes at per-device batch b give the adapter of 1 process at batch 2b (same global batches, averaged
  gradients), to float32 rounding;
- a checkpoint written by the 2-process run resumes on 1 process and ends where the 1-process run ends;
- the ViT recipe shards its loader: each process runs half the steps' batches, not all of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_vision.io import read_safetensors

REPO = Path(__file__).resolve().parents[2]
DUMP = "LORA_VISION_DUMP_RANK_LORA"
pytestmark = pytest.mark.slow


def _launch(args: list[str], processes: int, dump: Path | None = None) -> str:
    """Run a recipe under torchrun with `processes` CPU processes (gloo); accelerate picks the setup up from it.

    (`accelerate launch --cpu --num_processes 2` without an MPI setup starts ONE process, silently.)
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true")
    if dump is not None:
        env[DUMP] = str(dump)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
           "29517", *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("instance")
    for name in ("toy_00", "toy_01", "toy_03"):
        shutil.copy(REPO / "samples" / "instance" / f"{name}.jpg", folder)
    return folder


def _sd_args(instance: Path, out: Path, batch: int, steps: int = 4) -> list[str]:
    return ["scripts/train_sd.py", "--pretrained_model_name_or_path", "tiny-sd1", "--instance_data_dir",
            str(instance), "--instance_prompt", "a photo of sks toy", "--output_dir", str(out), "--max_train_steps",
            str(steps), "--train_batch_size", str(batch), "--logging_steps", "1", "--report_to", "none",
            "--strength_sweep=", "--learning_rate", "1e-3", "--checkpointing_steps", "2", "--export_kohya", "false",
            "--random_flip", "true"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_sd_two_processes_equal_one_process_at_twice_the_batch(instance_dir: Path, tmp_path: Path) -> None:
    two, one, resumed = tmp_path / "two", tmp_path / "one", tmp_path / "resumed"
    _launch(_sd_args(instance_dir, two, batch=2), 2, dump=tmp_path / "dump2")
    _launch(_sd_args(instance_dir, one, batch=4), 1, dump=tmp_path / "dump1")
    r0, r1 = _weights(tmp_path / "dump2" / "rank0.safetensors"), _weights(tmp_path / "dump2" / "rank1.safetensors")
    assert _max_diff(r0, r1) == 0.0, "the two ranks hold different LoRA weights"
    single = _weights(tmp_path / "dump1" / "rank0.safetensors")
    moved = max(float(single[k].abs().max()) for k in single if k.endswith("lora_B.weight"))  # B starts at 0
    assert moved > 1e-4, "training did not change the weights; the comparison below would prove nothing"
    assert _max_diff(r0, single) < 1e-5 * max(1.0, moved * 100), _max_diff(r0, single)
    # the logged (global) loss curves agree too
    curve = [(two / "logs" / "loss.csv").read_text().splitlines()[1:], (one / "logs" / "loss.csv").read_text()
             .splitlines()[1:]]
    for a, b in zip(*curve):
        assert abs(float(a.split(",")[1]) - float(b.split(",")[1])) < 1e-4, (a, b)
    # a 2-process checkpoint resumes on 1 process (global batch kept) and ends where the 1-process run ends
    shutil.copytree(two / "checkpoint-2", resumed / "checkpoint-2")
    _launch(_sd_args(instance_dir, resumed, batch=4) + ["--resume_from_checkpoint", "latest"], 1,
            dump=tmp_path / "dump_resumed")
    assert _max_diff(_weights(tmp_path / "dump_resumed" / "rank0.safetensors"), single) < 1e-5


def test_vit_loader_is_sharded_and_ranks_agree(tmp_path: Path) -> None:
    from lora_vision.data.synthetic import make_pattern_folder

    data = tmp_path / "train"
    make_pattern_folder(data, classes=("hstripes", "vstripes", "checker", "rings"), per_class=16, size=32, seed=1)
    args = ["scripts/train_vit.py", "--train_dir", str(data), "--dataloader_num_workers", "0",
            "--per_device_train_batch_size", "8", "--model_name_or_path", str(REPO / "samples" / "vit" /
                                                                             "tiny-vit-patterns"),
            "--mode", "lora", "--num_train_epochs", "1", "--logging_steps", "1"]
    _launch(args + ["--output_dir", str(tmp_path / "two")], 2, dump=tmp_path / "dump2")
    _launch(args + ["--output_dir", str(tmp_path / "one")], 1)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert two["train_images"] == one["train_images"]
    assert one["steps"] == -(-one["train_images"] // 8)
    assert two["steps"] == -(-two["train_images"] // 16), "each process should run half of the epoch's batches"
    r0, r1 = _weights(tmp_path / "dump2" / "rank0.safetensors"), _weights(tmp_path / "dump2" / "rank1.safetensors")
    assert _max_diff(r0, r1) == 0.0, "the two ranks hold different trainable weights"
