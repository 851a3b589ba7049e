"""lora_vision.training.checkpoint: the folder lifecycle of resumable checkpoints (runs, pruning, incomplete and
corrupt checkpoints, files left by killed processes, the loss log after a resume)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_vision.lora import LoRAConfig, inject_lora, lora_parameters
from lora_vision.training import first_step
from lora_vision.training.first_step import report_first_step
from lora_vision.training.checkpoint import (CheckpointError, TrainableWeights, end_process_group, find_checkpoint,
                                             list_checkpoints, load_checkpoint, prepare_output_dir, read_state,
                                             restore_rng, rng_state, save_checkpoint, trim_log)


def _run_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    inject_lora(model, LoRAConfig(rank=2, targets=("0",)))
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    return {"unet": model}, optimizer, rng_state(torch.Generator(), np.random.default_rng(0))


def _save(root: Path, step: int, run_id: str | None, limit: int | None = None) -> Path:
    models, optimizer, rng = _run_state()
    return save_checkpoint(root, step, models, optimizer, rng, {"rank": 2}, limit, run_id=run_id)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_pruning_deletes_only_this_runs_checkpoints(tmp_path: Path) -> None:
    for step in (30, 40):
        _save(tmp_path, step, "run-a")
    for step in (5, 10, 15):
        _save(tmp_path, step, "run-b", limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-15", "checkpoint-30",
                                                            "checkpoint-40"]
    assert [p.name for p in list_checkpoints(tmp_path, "run-b")] == ["checkpoint-10", "checkpoint-15"]
    assert read_state(tmp_path / "checkpoint-15")["run_id"] == "run-b"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no trash or temporary names left


def test_latest_skips_a_half_deleted_checkpoint(tmp_path: Path) -> None:
    _save(tmp_path, 1, "r")
    _save(tmp_path, 2, "r")
    (tmp_path / "checkpoint-2" / "optimizer.safetensors").unlink()  # a deletion killed half-way
    with pytest.warns(UserWarning, match="skipping incomplete .*checkpoint-2 .*optimizer.safetensors"):
        assert find_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-1"
    with pytest.raises(CheckpointError, match="checkpoint-2 is incomplete .*optimizer.safetensors"):
        find_checkpoint(tmp_path, "checkpoint-2")


def test_corrupt_state_json_is_named(tmp_path: Path) -> None:
    path = _save(tmp_path, 3, "r")
    (path / "state.json").write_text('{"step": 3, "optim')
    state_file = str(path / "state.json")
    with pytest.raises(CheckpointError, match=f"{state_file} is not readable JSON"):
        find_checkpoint(tmp_path, "latest")
    models, optimizer, _ = _run_state()
    with pytest.raises(CheckpointError, match=f"{state_file} is not readable JSON"):
        load_checkpoint(path, models, optimizer)
    for bad in ("[1, 2]", '{"step": 3, "files": 7}', '{"step": 3, "files": ["../../x"]}'):
        (path / "state.json").write_text(bad)
        with pytest.raises(CheckpointError, match=f"{state_file} is not a checkpoint state"):
            load_checkpoint(path, models, optimizer)


def test_resuming_past_the_last_step_is_refused(tmp_path: Path) -> None:
    _save(tmp_path, 40, "a")
    with pytest.raises(CheckpointError, match="checkpoint-40 is at step 40, past this run's last step 20"):
        find_checkpoint(tmp_path, "latest", max_steps=20)
    assert find_checkpoint(tmp_path, "latest", max_steps=40) == tmp_path / "checkpoint-40"


def test_fresh_run_refuses_a_folder_with_checkpoints_unless_overwrite(tmp_path: Path) -> None:
    _save(tmp_path, 10, "a")
    with pytest.raises(CheckpointError, match=f"{tmp_path} already holds checkpoints of another run "
                                              r"\(checkpoint-10\).*--overwrite_output_dir"):
        prepare_output_dir(tmp_path, resuming=False, overwrite=False)
    assert prepare_output_dir(tmp_path, resuming=True, overwrite=False) == []
    notes = prepare_output_dir(tmp_path, resuming=False, overwrite=True)
    assert "deleted 1 checkpoint" in notes[0] and not any(tmp_path.iterdir())


def test_temporaries_of_killed_processes_are_removed_at_start(tmp_path: Path) -> None:
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE)
    try:
        (tmp_path / "logs").mkdir()
        stale = [tmp_path / f".checkpoint-5.tmp-{dead}", tmp_path / f".checkpoint-3.trash-{dead}",
                 tmp_path / f".checkpoint-4.old-{dead}"]
        for folder in stale:
            folder.mkdir()
            (folder / "adapter.safetensors").write_bytes(b"half")
        stale += [tmp_path / f".adapter.safetensors.{dead}-k2j3h4.tmp", tmp_path / "logs" / f".loss.csv.{dead}-x.tmp"]
        for file in stale[3:]:
            file.write_bytes(b"half")
        kept = [tmp_path / f".checkpoint-6.tmp-{live.pid}", tmp_path / f".adapter.safetensors.{live.pid}-a1.tmp",
                tmp_path / "notes.tmp", tmp_path / ".hidden"]
        kept[0].mkdir()
        for file in kept[1:]:
            file.write_bytes(b"someone else's")
        notes = prepare_output_dir(tmp_path, resuming=False, overwrite=False)
        assert "removed 5 temporary file(s) left by a killed run" in notes[0]
        assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    finally:
        live.kill()
        live.wait()


def test_trim_log_drops_the_rows_a_resumed_run_redoes(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "loss.csv"
    log.parent.mkdir()
    log.write_text("step,loss,lr\n1,0.5,0.1\n2,0.4,0.1\n3,0.3,0.1\n4,0.2,0.1\n")
    trim_log(log, 2, "step,loss,lr")
    assert log.read_text() == "step,loss,lr\n1,0.5,0.1\n2,0.4,0.1\n"
    trim_log(log, 0, "step,loss,lr")
    assert log.read_text() == "step,loss,lr\n"
    trim_log(tmp_path / "logs" / "missing.csv", 5, "step,loss,lr")
    assert (tmp_path / "logs" / "missing.csv").read_text() == "step,loss,lr\n"


def test_state_json_lists_the_checkpoint_files(tmp_path: Path) -> None:
    path = _save(tmp_path, 1, "r")
    state = json.loads((path / "state.json").read_text())
    assert state["files"] == ["adapter.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    assert sorted(p.name for p in path.iterdir()) == state["files"]


def test_trainable_weights_resume_exactly_through_the_same_checkpoint(tmp_path: Path) -> None:
    """The classification recipe's checkpoints (whole parameters by name, loop state at the top of state.json) go
    through the same writer and reader as the LoRA ones: weights, optimizer and RNG come back exactly."""
    def run(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    model, optimizer = run(0)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, 1, TrainableWeights.of_model(model), optimizer, rng_state(), {"rank": 2},
                           extra={"epoch": 3, "batch_in_epoch": 0})
    expected_draw = torch.rand(3)
    state = json.loads((path / "state.json").read_text())
    assert state["epoch"] == 3 and state["batch_in_epoch"] == 0 and state["config"] == {"rank": 2}
    assert state["files"] == ["optimizer.safetensors", "rng.safetensors", "trainable.safetensors", "state.json"]

    other, other_opt = run(1)
    loaded = load_checkpoint(path, TrainableWeights.of_model(other), other_opt)
    restore_rng(loaded["rng_tensors"], loaded["rng"])
    assert torch.equal(torch.rand(3), expected_draw)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], other_opt.state_dict()["state"][0]["exp_avg"])

    wider = torch.nn.Sequential(torch.nn.Linear(4, 5))
    before = wider[0].weight.detach().clone()
    with pytest.raises(CheckpointError, match=r"shapes differ for \['0.weight', '0.bias'\]"):
        load_checkpoint(path, TrainableWeights.of_model(wider), torch.optim.AdamW(wider.parameters()))
    assert torch.equal(wider[0].weight, before)  # nothing was loaded
    with pytest.raises(ValueError, match="reserved key"):
        save_checkpoint(tmp_path, 2, TrainableWeights.of_model(model), optimizer, rng_state(), {}, extra={"step": 9})


# ---- the time to the first step, as both recipes print it (lora_vision.training.first_step) ----------------------

FIRST_STEP_LINE = re.compile(r"first step done ([\d.]+) s after start \(imports and setup ([\d.]+) s, (?:(capture|compile \+ "
                  r"capture) ([\d.]+) s, )?first step ([\d.]+) s(, compile included)?\)")


def test_first_step_parts_add_up_to_the_time_since_start(capsys):
    first_step._MARKS.clear()  # marks another test's run left
    now = time.perf_counter()
    line = report_first_step(torch.device("cpu"), now - 10.0, now - 3.0, compiled=False, static_s=2.0, prefix="[x] ")
    assert capsys.readouterr().out == line + "\n" and line.startswith("[x] first step done")
    total, setup, what, built, first, compile_note = FIRST_STEP_LINE.search(line).groups()
    assert what == "capture" and float(built) == 2.0 and compile_note is None
    assert abs(float(setup) - 5.0) < 0.05 and 3.0 <= float(first) < 3.5 and 10.0 <= float(total) < 10.5


def test_start_up_phases_split_the_setup_and_are_used_up(capsys, monkeypatch):
    first_step._MARKS.clear()
    now = time.perf_counter()
    monkeypatch.setattr(first_step, "_MARKS", [("too early", now - 20.0), ("imports", now - 8.0),
                                                ("model load", now - 5.5)])
    line = report_first_step(torch.device("cpu"), now - 10.0, now - 3.0, compiled=False, static_s=2.0)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == line
    # the setup ends where the capture began (now - 5): imports 2.0, model load 2.5, other setup 0.5
    assert out[1] == "start-up: imports 2.0 s, model load 2.5 s, other setup 0.5 s"
    assert first_step._MARKS == []
    report_first_step(torch.device("cpu"), now - 10.0, now - 3.0, compiled=False)
    assert len(capsys.readouterr().out.splitlines()) == 1  # no marks: no start-up line


def test_first_step_without_a_static_step_a_compiled_first_step_says_it_holds_the_compile():
    now = time.perf_counter()
    line = report_first_step(torch.device("cpu"), now - 4.0, now - 1.0, compiled=True)
    total, setup, what, built, first, compile_note = FIRST_STEP_LINE.search(line).groups()
    assert what is None and built is None and compile_note == ", compile included"
    assert abs(float(setup) - 3.0) < 0.05
    line = report_first_step(torch.device("cpu"), now - 4.0, now - 1.0, compiled=True, static_s=1.5)
    assert "compile + capture 1.5 s" in line and "compile included" not in line
    line = report_first_step(torch.device("cpu"), now - 4.0, now - 1.0, compiled=True, static_s=0.0)
    assert "compile + capture 0.0 s" in line and "compile included" not in line


def _end_after(rank: int, init: str, clean: bool, delay_s: float, times: "dict") -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.distributed.all_reduce(torch.ones(4))  # a collective, as a run has had
    if rank == 0:
        time.sleep(delay_s)  # the main process writing its files
    t0 = time.perf_counter()
    end_process_group(clean=clean, timeout_s=30)
    times[rank] = (time.perf_counter() - t0, torch.distributed.is_initialized())


@pytest.mark.parametrize("clean", [True, False])
def test_end_process_group_lets_the_processes_leave_together_only_after_a_clean_run(tmp_path, clean):
    ctx = torch.multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        times = manager.dict()
        torch.multiprocessing.start_processes(_end_after, args=(f"file://{tmp_path / 'rdv'}", clean, 2.0, times),
                                              nprocs=2, join=True, start_method="spawn")
        times = dict(times)
    assert not times[0][1] and not times[1][1], "a process group was left for the interpreter's exit"
    if clean:  # rank 1 waited for rank 0's writing at the barrier
        assert times[1][0] > 1.5, times
    else:  # an error or Ctrl-C: nobody waits for the others
        assert times[1][0] < 1.5, times
