"""Resumable checkpoints: adapter + optimizer + schedule step + RNG states + step, in safetensors and JSON only.

A checkpoint is the folder `<output_dir>/checkpoint-<step>/`, written under a temporary name and renamed when
complete, so a crash never leaves a half-written checkpoint under a final name. Files:
  adapter.safetensors    the LoRA weights (native adapter format)
  optimizer.safetensors  every tensor of the optimizer state
  state.json             step, optimizer param groups and non-tensor state, RNG states, the run's config
  rng.safetensors        torch CPU / CUDA / device-generator RNG states
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..adapter import Adapter
from ..io import atomic_write_text, read_safetensors, replace_dir, write_safetensors
from ..lora.ops import load_lora_state_dict

_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not match the run that wants to resume from it."""


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders in `output_dir`, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))
             and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(output_dir: str | Path, spec: str) -> Path | None:
    """`spec` 'latest' -> the newest checkpoint in output_dir (None when there is none); else the folder named."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(spec)
    if not path.is_dir():
        path = Path(output_dir) / spec
    if not (path / "state.json").is_file():
        raise CheckpointError(f"resume_from_checkpoint={spec!r}: {path} is not a checkpoint folder (no state.json); "
                              f"expected 'latest' or one of {[p.name for p in list_checkpoints(output_dir)]}")
    return path


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


def rng_state(device_generator: torch.Generator, data_rng: np.random.Generator) -> tuple[dict, dict]:
    """(tensors, json) holding every RNG the training loop draws from."""
    tensors = {"torch_cpu": torch.get_rng_state(), "device_generator": device_generator.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    return tensors, {"data_rng": data_rng.bit_generator.state}


def restore_rng(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], device_generator: torch.Generator,
                data_rng: np.random.Generator) -> None:
    """Put back the RNG states written by rng_state."""
    torch.set_rng_state(tensors["torch_cpu"])
    device_generator.set_state(tensors["device_generator"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    data_rng.bit_generator.state = meta["data_rng"]


def save_checkpoint(output_dir: str | Path, step: int, models: Mapping[str, nn.Module],
                    optimizer: torch.optim.Optimizer, rng: tuple[dict, dict], config: Mapping[str, Any],
                    total_limit: int | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write checkpoint-<step> atomically (temporary folder, then rename) and prune to `total_limit` folders."""
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        Adapter.from_models(models).save(tmp / "adapter.safetensors")
        opt_tensors, opt_meta = _split_optimizer(optimizer)
        write_safetensors(tmp / "optimizer.safetensors", opt_tensors)
        rng_tensors, rng_meta = rng
        write_safetensors(tmp / "rng.safetensors", {k: v.cpu().contiguous() for k, v in rng_tensors.items()})
        state = {"step": step, "optimizer": opt_meta, "rng": rng_meta, "config": dict(config),
                 "extra": dict(extra or {})}
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=1, default=str))
        replace_dir(tmp, final)  # re-saving a step (e.g. after a resume) swaps, never leaving no checkpoint
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if total_limit is not None:
        for stale in list_checkpoints(root)[:-total_limit]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, models: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer,
                    name: str = "default") -> dict[str, Any]:
    """Load LoRA weights and optimizer state from checkpoint `path`; returns state.json plus the RNG tensors.

    Raises CheckpointError, before changing anything it can check first, when the adapter or the optimizer state
    does not fit the models (e.g. another rank, other targets, text encoder trained or not).
    """
    path = Path(path)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    adapter = Adapter.load(path / "adapter.safetensors")
    have, want = set(adapter.components()), {c for c in models}
    if have != want:
        raise CheckpointError(f"{path} has LoRA weights for {sorted(have)} but this run trains {sorted(want)}; "
                              "resume with the same --train_text_encoder setting or start a new output_dir")
    try:
        for comp, model in models.items():
            load_lora_state_dict(model, adapter.state_dict_for(comp), name=name, strict=True)
    except KeyError as err:
        raise CheckpointError(f"{path} does not match this run's LoRA layout: {err}") from None
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
