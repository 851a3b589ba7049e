"""Fuse adapters into a pipeline's weights and back (bit-exact), and write merged pipelines to disk."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from ..io import replace_dir, write_safetensors
from ..lora.inject import replace_module
from ..lora.layers import lora_layers
from ..models.sd import load_sd_pipeline
from ..lora.ops import merge_lora, unmerge_lora
from ..metadata import FUSED_FROM_KEY, FUSED_LAYOUT_KEY
from .adapters import (AdapterLoadReport, AdapterSource, _apply_strength, _require, _state, load_adapter,
                       pipeline_components, unload_adapter)

# (source, strength) or (source, strength, te_strength)
MergeItem = Union[tuple[AdapterSource, float], tuple[AdapterSource, float, float]]
SINGLE_FILE_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")


def fuse(pipe: Any, strength: float | None = None, names: Sequence[str] | None = None) -> int:
    """Fold adapters (default: the active ones) into the weights at their current strengths per component and
    block, multiplied by `strength` if given (like diffusers' `lora_scale`). Returns the number of layers changed.

    Math in float32, cast back to the weight dtype. If any layer would get NaN/Inf, nothing changes
    (FloatingPointError). Fused adapters stop running in forward; `unfuse` restores the weights bit for bit.
    """
    st = _state(pipe)
    names = list(st.active) if names is None else ([names] if isinstance(names, str) else list(names))
    _require(pipe, names)
    if not names:
        raise ValueError("no adapters to fuse: none is active; pass names=[...] or load one with load_adapter")
    if st.fused:
        raise RuntimeError(f"adapter(s) {list(st.fused)} are already fused; call unfuse(pipe) first")
    mult = 1.0 if strength is None else float(strength)
    comps = pipeline_components(pipe)
    done: list[nn.Module] = []
    count = 0
    try:
        if mult != 1.0:
            for n in names:
                for table in st.adapters[n].tables:
                    table.set_strength(table.strength * mult)
        for comp, model in comps.items():
            here = [n for n in names if comp in st.adapters[n].modules]
            if here:
                count += merge_lora(model, adapters=here)
                done.append(model)
    except BaseException:
        for model in done:
            unmerge_lora(model)
        raise
    finally:
        if mult != 1.0:
            for n in names:
                _apply_strength(st.adapters[n])
    st.fused = {n: mult for n in names}
    return count


def unfuse(pipe: Any) -> int:
    """Restore the exact weights from before `fuse`; returns the number of layers restored (0 if nothing fused)."""
    st = _state(pipe)
    count = sum(unmerge_lora(m) for m in pipeline_components(pipe).values())
    st.fused = {}
    return count


@contextlib.contextmanager
def plain_modules(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every LoRA wrapper of `model` is replaced by its base layer (fused weights included)."""
    wrappers = list(lora_layers(model))
    for name, layer in wrappers:
        replace_module(model, name, layer.base)
    try:
        yield model
    finally:
        for name, layer in wrappers:
            replace_module(model, name, layer)


@dataclass
class MergeResult:
    """Where `merge_into_pipeline` wrote, and how each adapter was loaded."""

    out_dir: Path
    single_file: Path | None
    adapters: list[AdapterLoadReport] = field(default_factory=list)

    def __str__(self) -> str:
        what = ", ".join(f"{r.source} at {r.strength:g} (text encoder {r.te_strength:g})" for r in self.adapters)
        extra = f" and {self.single_file}" if self.single_file else ""
        return f"merged {what} into {self.out_dir}{extra}"


def merge_into_pipeline(base: Any, adapters_with_strengths: Sequence[MergeItem] | Mapping[AdapterSource, float],
                        out_dir: str | os.PathLike, single_file: bool | str | os.PathLike = False,
                        overwrite: bool = False, torch_dtype: torch.dtype | None = None) -> MergeResult:
    """Fuse adapters into a base pipeline and write it as a diffusers folder (save_pretrained, safetensors).

    `base`: a pipeline object (left exactly as it was afterwards) or anything `load_sd_pipeline` takes.
    `adapters_with_strengths`: [(file_or_adapter, strength[, te_strength]), ...] or {file: strength}.
    `single_file`: also write one .safetensors checkpoint (True: `<out_dir>/<out_dir name>.safetensors`, or a
    path). Its keys are the diffusers state dicts prefixed by component: `unet.<key>` (or `transformer.<key>` for
    a DiT pipeline: Flux, SD 3.x, Qwen-Image, Z-Image), `text_encoder.<key>`, `text_encoder_2.<key>` (SDXL, Flux.1,
    SD 3.x), `text_encoder_3.<key>` (SD 3.x), `vae.<key>`; metadata `lora_vision.layout = "diffusers"` and
    `lora_vision.merged` (JSON list of the adapters and strengths). The folder appears atomically.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite on the command line) or "
                              "choose another output folder")
    if out.exists() and not (out / "model_index.json").is_file():
        # overwrite replaces a previous pipeline output only, never a folder of something else.
        raise FileExistsError(f"{out} exists and is not a diffusers pipeline folder (no model_index.json); "
                              "refusing to replace it even with overwrite / --overwrite: choose another output "
                              "folder")
    items = list(adapters_with_strengths.items()) if isinstance(adapters_with_strengths, Mapping) else \
        list(adapters_with_strengths)
    if not items:
        raise ValueError("no adapters to merge: give [(file, strength), ...]")
    if isinstance(base, (str, os.PathLike)) or base is None:
        pipe = load_sd_pipeline(None if base is None else str(base), torch_dtype=torch_dtype)
    else:
        pipe = base
    st = _state(pipe)
    names = []
    reports = []
    try:
        for i, item in enumerate(items):
            if not isinstance(item, tuple) or len(item) not in (2, 3):
                raise ValueError(f"adapters_with_strengths[{i}] = {item!r}: expected (file, strength) or "
                                 "(file, strength, te_strength)")
            name = f"merge{i}"
            while name in st.adapters:
                name += "_"
            reports.append(load_adapter(pipe, item[0], name=name, strength=float(item[1]),
                                        te_strength=float(item[2]) if len(item) == 3 else None))
            names.append(name)
        fuse(pipe, names=names)
        try:
            single = _write(pipe, out, single_file, reports)
        finally:
            unfuse(pipe)
    finally:
        for n in names:
            unload_adapter(pipe, n)
    return MergeResult(out, single, reports)


def _write(pipe: Any, out: Path, single_file: bool | str | os.PathLike,
           reports: list[AdapterLoadReport]) -> Path | None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    single: Path | None = None
    try:
        with contextlib.ExitStack() as stack:
            for model in pipeline_components(pipe).values():
                stack.enter_context(plain_modules(model))
            pipe.save_pretrained(tmp, safe_serialization=True)
            if single_file:
                meta = {"format": "pt", FUSED_LAYOUT_KEY: "diffusers", FUSED_FROM_KEY: json.dumps(
                    [{"source": r.source, "strength": r.strength, "te_strength": r.te_strength} for r in reports])}
                tensors = {f"{c}.{k}": v.detach().clone() for c in SINGLE_FILE_COMPONENTS
                           if isinstance(getattr(pipe, c, None), nn.Module)
                           for k, v in getattr(pipe, c).state_dict().items()}
                if single_file is True:
                    single = out / f"{out.name}.safetensors"
                    write_safetensors(tmp / single.name, tensors, meta)
                else:
                    single = Path(single_file)
                    write_safetensors(single, tensors, meta)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return single
