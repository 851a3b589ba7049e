"""Resumable checkpoints of both recipes: weights + optimizer + RNG states + step, in safetensors and JSON only.

A checkpoint is the folder `<output_dir>/checkpoint-<step>/`, written under a temporary name and renamed when
complete, so a crash never leaves a half-written checkpoint under a final name. Files:
  adapter.safetensors    the LoRA weights (native adapter format; train_sd.py), or
  trainable.safetensors  every trained parameter by name (LoRA + a new head, full fine-tuning; train_vit.py)
  optimizer.safetensors  every tensor of the optimizer state
  state.json             step, run id, the files above, optimizer param groups and non-tensor state, RNG states,
                         the run's config, the recipe's loop state (written last)
  rng.safetensors        torch CPU / CUDA / device-generator RNG states

The run lifecycle around them, shared by both recipes: a fresh run refuses a folder that holds another run's
checkpoints (`prepare_output_dir`), temporary files of killed runs are removed at the next start, pruning deletes
only this run's checkpoints and never leaves a partial one under its name, `latest` skips incomplete checkpoints,
and Ctrl-C stops at the end of the current step (`StopOnInterrupt`) so the recipe can save and print the command that
resumes (`resume_command`).
"""

from __future__ import annotations

import datetime
import json
import re
import shlex
import shutil
import signal
import sys
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import numpy as np
import torch
from torch import nn

from ..adapter import Adapter
from ..formats import read_adapter
from ..io import (atomic_write_text, read_safetensors, remove_stale_temps, remove_tree, replace_dir, temp_sibling,
                  write_safetensors)
from ..lora.ops import load_lora_state_dict

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE = "state.json"
# What a checkpoint written before state.json listed its files must hold besides state.json and its weights.
_LEGACY_FILES = ("optimizer.safetensors", "rng.safetensors")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not match the run that wants to resume from it."""


def new_run_id() -> str:
    """A fresh run's identity, stored in each of its checkpoints (a resumed run keeps the one it resumes)."""
    return uuid.uuid4().hex[:16]


def read_state(path: str | Path) -> dict[str, Any]:
    """state.json of checkpoint folder `path`; CheckpointError naming the file when it is missing or not valid."""
    file = Path(path) / STATE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{file} does not exist: {path} is not a complete checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is not readable JSON ({err}); the checkpoint is corrupt: delete {path} and "
                              "resume from an earlier one (--resume_from_checkpoint checkpoint-N)") from None
    files = state.get("files") if isinstance(state, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not (
            files is None or isinstance(files, list) and all(isinstance(f, str) and "/" not in f for f in files)):
        raise CheckpointError(f"{file} is not a checkpoint state (expected a JSON object with an integer 'step' and "
                              "a list of file names 'files'); "
                              f"delete {path} and resume from an earlier one (--resume_from_checkpoint checkpoint-N)")
    return state


def _missing_files(path: Path, state: Mapping[str, Any]) -> list[str]:
    names = state.get("files") or _LEGACY_FILES
    return [n for n in names if not (path / n).is_file()]


def _checkpoint_dirs(root: Path) -> list[tuple[int, Path]]:
    """Every `checkpoint-N` folder in root, complete or not, lowest step first."""
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name)))


def list_checkpoints(output_dir: str | Path, run_id: Any = ...) -> list[Path]:
    """Complete checkpoint folders in `output_dir` (state.json valid, every file it lists present), oldest first;
    with `run_id`, only that run's (None: checkpoints written before runs had an id)."""
    found = []
    for _, path in _checkpoint_dirs(Path(output_dir)):
        try:
            state = read_state(path)
        except CheckpointError:
            continue
        if not _missing_files(path, state) and (run_id is ... or state.get("run_id") == run_id):
            found.append(path)
    return found


def find_checkpoint(output_dir: str | Path, spec: str, max_steps: int | None = None) -> Path | None:
    """`spec` 'latest' -> the newest complete checkpoint in output_dir (None when there is none); else the folder
    named. Incomplete checkpoints (a file missing: an interrupted copy or deletion) are skipped by 'latest', with a
    warning; a checkpoint past `max_steps` is refused (resuming it would train nothing and write its weights)."""
    if spec == "latest":
        path = None
        for _, candidate in reversed(_checkpoint_dirs(Path(output_dir))):
            if not (candidate / STATE).is_file():
                missing = [STATE]
            else:
                missing = _missing_files(candidate, read_state(candidate))  # a corrupt state.json is an error
            if not missing:
                path = candidate
                break
            warnings.warn(f"skipping incomplete {candidate} (missing {', '.join(missing)}; left by an interrupted "
                          "copy or deletion)", stacklevel=2)
        if path is None:
            return None
    else:
        path = Path(spec)
        if not path.is_dir():
            path = Path(output_dir) / spec
        if not (path / STATE).is_file():
            raise CheckpointError(f"resume_from_checkpoint={spec!r}: {path} is not a checkpoint folder (no "
                                  f"state.json); expected 'latest' or one of "
                                  f"{[p.name for p in list_checkpoints(output_dir)]}")
        missing = _missing_files(path, read_state(path))
        if missing:
            raise CheckpointError(f"resume_from_checkpoint={spec!r}: {path} is incomplete (missing "
                                  f"{', '.join(missing)}); pick another one of "
                                  f"{[p.name for p in list_checkpoints(output_dir)]}")
    if max_steps is not None:
        check_resume_step(path, max_steps)
    return path


def check_resume_step(path: str | Path, max_steps: int) -> int:
    """The step of checkpoint `path`; CheckpointError when it is past `max_steps` (resuming would train nothing and
    write that checkpoint's weights as this run's)."""
    step = read_state(path)["step"]
    if step > max_steps:
        raise CheckpointError(f"{path} is at step {step}, past this run's last step {max_steps}: resuming it would "
                              f"train nothing. To continue that run, set --max_train_steps to at least {step}; for "
                              f"a new {max_steps}-step run, use another --output_dir or --overwrite_output_dir")
    return step


def prepare_output_dir(output_dir: str | Path, resuming: bool, overwrite: bool, main_process: bool = True) -> list[str]:
    """Get output_dir ready for a run; returns what was done, one line each, for the user.

    Removes temporary files and folders left by killed runs (`remove_stale_temps`, in output_dir and its direct
    sub-folders). A run that does not resume refuses a folder holding checkpoints (they belong to another run: its
    checkpoints would be mixed with them, pruned in their favour, and `latest` would pick them), unless `overwrite`,
    which deletes them. Only the main process changes files; every process raises the same error.
    """
    root = Path(output_dir)
    found = [p for _, p in _checkpoint_dirs(root)]
    if found and not resuming and not overwrite:
        names = ", ".join(p.name for p in found[-3:]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise CheckpointError(f"{root} already holds checkpoints of another run ({names}); continue that run with "
                              "--resume_from_checkpoint latest, use another --output_dir, or pass "
                              "--overwrite_output_dir to delete them and start over")
    if not main_process:
        return []
    done = []
    folders = [root] + [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
                        and not _NAME.match(p.name)] if root.is_dir() else []
    stale = [p for folder in folders for p in remove_stale_temps(folder)]
    if stale:
        done.append(f"removed {len(stale)} temporary file(s) left by a killed run: "
                    + ", ".join(str(p) for p in stale[:3]) + (" ..." if len(stale) > 3 else ""))
    if found and not resuming:
        for path in found:
            remove_tree(path)
        done.append(f"--overwrite_output_dir: deleted {len(found)} checkpoint(s) of an earlier run in {root}")
    return done


def trim_log(path: str | Path, step: int, header: str) -> None:
    """Make the CSV log `path` (first column: step) hold only the rows up to `step`, so that a resumed run does not
    log the steps it redoes twice; step 0 (a fresh run) leaves just the header. Written atomically."""
    path = Path(path)
    rows = path.read_text(encoding="utf-8").splitlines()[1:] if step > 0 and path.is_file() else []
    kept = [r for r in rows if r.split(",", 1)[0].isdigit() and int(r.split(",", 1)[0]) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in [header] + kept))


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C after saving a checkpoint; the message says where and how to resume."""


def end_process_group(clean: bool = False, timeout_s: float = 120.0) -> None:
    """Destroy the process group of a multi-process run (torchrun / accelerate launch) before the process exits.
    Left to the interpreter's exit, gloo's threads could die mid-teardown (`terminate called without an active
    exception`, SIGABRT) after the run had finished and written everything, so the launcher reported a failure.
    It still happened, rarely, when one rank tore its connections down while another was still writing its files:
    so on a `clean` exit (every rank ends its run normally) the ranks first meet at a barrier and leave together.
    On gloo the barrier is `monitored_barrier` with `timeout_s`; it raises nothing here, so a rank that failed
    costs the others that wait at most, never a hang. Without `clean` (an error, Ctrl-C) no rank waits for the
    others. Nothing happens in a single process."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean and dist.get_world_size() > 1:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
            else:
                dist.barrier()
        except Exception as err:  # noqa: BLE001 - a peer that failed: tear down anyway, and say so
            print(f"note: not every process reached the end of the run ({str(err).splitlines()[0][:200]}); "
                  "closing this one's connections", file=sys.stderr)
    dist.destroy_process_group()


class StopOnInterrupt:
    """While active, the first Ctrl-C (SIGINT) only sets `requested`: the training loop stops at the end of the
    current step, saves a checkpoint and exits; a second Ctrl-C interrupts at once (KeyboardInterrupt). Outside the
    main thread (where Python cannot handle signals) it does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def should_stop(self, accelerator: Any, step: int, every: int) -> bool:
        """Whether to stop after `step`. One process: as soon as Ctrl-C was pressed. Several: only at multiples of
        `every` (a step where the loop synchronises anyway), where all agree: Ctrl-C on any process stops all."""
        if accelerator.num_processes == 1:
            return self.requested
        if step % every:
            return False
        return bool(accelerator.reduce(torch.tensor(float(self.requested), device=accelerator.device), "sum") > 0)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: stopping after this step and saving a checkpoint (Ctrl-C again stops at once, saving "
              "nothing more)", file=sys.stderr, flush=True)


def resume_command(script: str | Path, config: str | Path, processes: int = 1) -> str:
    """The shell command that resumes a run from the config it saved: `python SCRIPT --config CONFIG
    --resume_from_checkpoint latest` (accelerate launch for several processes)."""
    script, here = Path(script).resolve(), Path.cwd()
    shown = script.relative_to(here) if script.is_relative_to(here) else script
    launcher = "python" if processes == 1 else f"accelerate launch --num_processes {processes}"
    return f"{launcher} {shlex.quote(str(shown))} --config {shlex.quote(str(config))} --resume_from_checkpoint latest"


def _split_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                other[f"{idx}.{key}"] = value
    groups = [{k: (float(v) if torch.is_tensor(v) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "state": other}


def _join_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["state"].items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state(device_generator: torch.Generator | None = None,
              data_rng: np.random.Generator | None = None) -> tuple[dict, dict]:
    """(tensors, json) holding every RNG the training loop draws from: torch's CPU and CUDA states, plus a device
    generator and a numpy generator when the recipe has them."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device_generator is not None:
        tensors["device_generator"] = device_generator.get_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    return tensors, ({"data_rng": data_rng.bit_generator.state} if data_rng is not None else {})


def restore_rng(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                device_generator: torch.Generator | None = None, data_rng: np.random.Generator | None = None) -> None:
    """Put back the RNG states written by rng_state."""
    torch.set_rng_state(tensors["torch_cpu"])
    if device_generator is not None:
        device_generator.set_state(tensors["device_generator"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if data_rng is not None:
        data_rng.bit_generator.state = meta["data_rng"]


class LoRAWeights:
    """What a checkpoint keeps of LoRA-trained models: their LoRA layers by component, as adapter.safetensors."""

    def __init__(self, models: Mapping[str, nn.Module], name: str = "default") -> None:
        self.models, self.name = dict(models), name

    def write(self, folder: Path) -> None:
        """Write adapter.safetensors into `folder`."""
        Adapter.from_models(self.models).save(folder / "adapter.safetensors")

    def load(self, path: Path) -> None:
        """Load the LoRA weights of checkpoint `path` into the models; CheckpointError when they do not fit."""
        adapter = read_adapter(path / "adapter.safetensors")[0]
        have, want = set(adapter.components()), set(self.models)
        if have != want:
            raise CheckpointError(f"{path} has LoRA weights for {sorted(have)} but this run trains {sorted(want)}; "
                                  "resume with the same --train_text_encoder setting or start a new output_dir")
        try:
            for comp, model in self.models.items():
                load_lora_state_dict(model, adapter.state_dict_for(comp), name=self.name, strict=True)
        except KeyError as err:
            raise CheckpointError(f"{path} does not match this run's LoRA layout: {err}") from None


class TrainableWeights:
    """What a checkpoint keeps of any trained parameters (a new head, full fine-tuning, fp32 master copies): each
    one by name, whole, as trainable.safetensors."""

    def __init__(self, params: Mapping[str, torch.Tensor]) -> None:
        self.params = dict(params)

    @classmethod
    def of_model(cls, model: nn.Module) -> "TrainableWeights":
        """The parameters of `model` that require grad."""
        return cls({n: p for n, p in model.named_parameters() if p.requires_grad})

    def write(self, folder: Path) -> None:
        """Write trainable.safetensors into `folder`."""
        write_safetensors(folder / "trainable.safetensors",
                          {n: p.detach().cpu().contiguous() for n, p in self.params.items()})

    def load(self, path: Path) -> None:
        """Copy the weights of checkpoint `path` into the parameters; CheckpointError (nothing changed) when a name
        or a shape differs."""
        weights, _ = read_safetensors(path / "trainable.safetensors", check_finite=False)
        if set(weights) != set(self.params):
            extra, missing = sorted(set(weights) - set(self.params)), sorted(set(self.params) - set(weights))
            raise CheckpointError(f"{path} does not fit this run: {len(missing)} trainable parameter(s) missing "
                                  f"(first: {missing[:3]}), {len(extra)} unknown (first: {extra[:3]}); resume with "
                                  "the same mode, model, targets and rank, or use a new output_dir")
        bad = [n for n, p in self.params.items() if tuple(p.shape) != tuple(weights[n].shape)]
        if bad:
            raise CheckpointError(f"{path} does not fit this run: shapes differ for {bad[:5]} (another rank or "
                                  "number of classes?); resume with the same settings or use a new output_dir")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(weights[n])


Weights = Union[LoRAWeights, TrainableWeights, Mapping[str, nn.Module]]


def _as_weights(weights: Weights, name: str = "default") -> LoRAWeights | TrainableWeights:
    """A mapping of models is their LoRA layers (the SD recipe's checkpoints)."""
    return weights if isinstance(weights, (LoRAWeights, TrainableWeights)) else LoRAWeights(weights, name)


def write_checkpoint(output_dir: str | Path, step: int, write_files: Callable[[Path], None],
                     state: Mapping[str, Any], total_limit: int | None = None, run_id: str | None = None) -> Path:
    """Write checkpoint-<step> atomically and prune this run's older checkpoints to `total_limit`.

    `write_files(folder)` writes the checkpoint's files into a temporary folder; state.json (step, run id, the list
    of files, plus `state`) is written last and the folder renamed to its final name. When writing fails (a full
    disk), nothing of it is left and CheckpointError says so; the earlier checkpoints are untouched.
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = temp_sibling(final, "tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write_files(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        body = {"step": step, "run_id": run_id, "files": files + [STATE], **state}
        atomic_write_text(tmp / STATE, json.dumps(body, indent=1, default=str))
        replace_dir(tmp, final)  # re-saving a step (e.g. after a resume) swaps, never leaving no checkpoint
    except OSError as err:
        kept = list_checkpoints(root, run_id)
        raise CheckpointError(f"could not write {final}: {err.strerror or err}; nothing of it was kept and the earlier "
                              f"checkpoints are intact ({kept[-1].name if kept else 'none yet'}); free space (or use "
                              "another --output_dir) and resume with --resume_from_checkpoint latest") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if total_limit:
        for stale in list_checkpoints(root, run_id)[:-total_limit]:  # another run's checkpoints are never deleted
            remove_tree(stale)
    return final


def save_checkpoint(output_dir: str | Path, step: int, weights: Weights, optimizer: torch.optim.Optimizer,
                    rng: tuple[dict, dict], config: Mapping[str, Any], total_limit: int | None = None,
                    extra: Mapping[str, Any] | None = None, run_id: str | None = None,
                    tensor_files: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> Path:
    """Write checkpoint-<step> (write_checkpoint) and prune this run's older ones to `total_limit` folders.

    `weights`: the models whose LoRA layers train (a mapping component -> model, or LoRAWeights), or
    TrainableWeights; `rng` from rng_state; `config` the run's resolved settings (checked on resume); `extra` the
    recipe's own loop state (e.g. epoch and batch), stored as top-level keys of state.json; `tensor_files` more
    safetensors files of the recipe, file name -> tensors (e.g. {"ema.safetensors": ...}; read_checkpoint_tensors).
    """
    opt_tensors, opt_meta = _split_optimizer(optimizer)
    rng_tensors, rng_meta = rng
    state = {"optimizer": opt_meta, "rng": rng_meta, "config": dict(config)}
    clash = sorted(set(extra or {}) & (set(state) | {"step", "run_id", "files"}))
    if clash:
        raise ValueError(f"checkpoint extra state uses reserved key(s) {clash}; rename them")
    weights = _as_weights(weights)

    def write(folder: Path) -> None:
        weights.write(folder)
        write_safetensors(folder / "optimizer.safetensors", opt_tensors)
        write_safetensors(folder / "rng.safetensors", {k: v.cpu().contiguous() for k, v in rng_tensors.items()})
        for file, tensors in (tensor_files or {}).items():
            write_safetensors(folder / file, tensors)

    return write_checkpoint(output_dir, step, write, {**state, **(extra or {})}, total_limit, run_id)


def read_checkpoint_tensors(path: str | Path, file: str, why: str) -> dict[str, torch.Tensor]:
    """The tensors of `file` in checkpoint `path` (written through save_checkpoint's `tensor_files`);
    CheckpointError when the checkpoint has no such file (`why`: the setting that needs it)."""
    target = Path(path) / file
    if not target.is_file():
        raise CheckpointError(f"{path} has no {file}, which {why} needs: it was written without that setting; resume "
                              "with the same settings, or use a new output_dir")
    tensors, _ = read_safetensors(target, check_finite=False)
    return tensors


def load_checkpoint(path: str | Path, weights: Weights, optimizer: torch.optim.Optimizer,
                    name: str = "default") -> dict[str, Any]:
    """Load the weights and the optimizer state of checkpoint `path`; returns state.json plus the RNG tensors
    (`rng_tensors`, for restore_rng). `name`: the adapter name when `weights` is a mapping of models.

    Raises CheckpointError, before changing anything it can check first, when the weights or the optimizer state
    do not fit (e.g. another rank, other targets, text encoder trained or not, another mode).
    """
    path = Path(path)
    state = read_state(path)
    _as_weights(weights, name).load(path)
    opt_tensors, _ = read_safetensors(path / "optimizer.safetensors", check_finite=False)
    lrs = [g["lr"] for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(_join_optimizer(opt_tensors, state["optimizer"]))
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: optimizer state does not fit this run ({err})") from None
    for group, lr in zip(optimizer.param_groups, lrs):  # keep device-tensor learning rates (CUDA graphs) as tensors
        if torch.is_tensor(lr):
            lr.fill_(float(group["lr"]))
            group["lr"] = lr
    state["rng_tensors"], _ = read_safetensors(path / "rng.safetensors", check_finite=False)
    return state
