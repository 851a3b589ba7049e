"""Where `analyze` gets its matrices: the factors of each adapted layer, and the base weights they modify.

Layer keys are `<component>.<module>[.<part>]`, the same keys `Adapter.ranks()` returns. Conv2d factors are
flattened to matrices: A (r, in * kh * kw), B (out, r), matching the base weight flattened to (out, in * kh * kw).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from safetensors import safe_open

from ..adapter import COMPONENTS, Adapter
from ..io import AdapterFileError, read_header
from ..models.sd import TINY_PIPELINES, load_sd_pipeline

_QKV = ("q", "k", "v")


@dataclass
class LayerFactors:
    """One adapted weight: update = scaling * B @ A."""

    key: str
    A: torch.Tensor
    B: torch.Tensor
    rank: int
    alpha: float
    scaling: float
    kernel: tuple[int, ...] = ()

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in * kernel) of the update as a matrix."""
        return int(self.B.shape[0]), int(self.A.shape[1])


# Attention projections sort as q, k, v, out (not alphabetically) in reports and plots.
_PROJ_ORDER = {name: f"\x00{i}" for i, names in enumerate((
    ("q", "to_q", "q_proj", "query"), ("k", "to_k", "k_proj", "key"), ("v", "to_v", "v_proj", "value"),
    ("o", "to_out", "out_proj", "output"))) for name in names}


def natural_key(key: str) -> tuple[str, ...]:
    """Sort key: component in canonical order, numbers compared as numbers (layers.2 < layers.10), q/k/v/out."""
    comp, _, rest = key.partition(".")
    order = COMPONENTS.index(comp) if comp in COMPONENTS else len(COMPONENTS)
    toks = [_PROJ_ORDER.get(t, t) for t in rest.split(".")]
    return (f"{order:02d}", comp) + tuple(re.sub(r"\d+", lambda m: m.group().zfill(8), t) for t in toks)


def adapter_layers(adapter: Adapter, base: "BaseWeights | None" = None) -> dict[str, LayerFactors]:
    """Every adapted weight of `adapter`, in natural order, as float32 factors on the CPU.

    Layers of other kinds (LoHa, LoKr, DoRA, OFT, ...) are their update's exact low-rank factors
    (`LayerSpec.update_factors`, scaling 1, rank = the update's rank), so spectra are those of the update; kinds
    whose update depends on the base weight need `base`."""
    out: dict[str, LayerFactors] = {}
    for comp in adapter.components():
        for layer, spec in adapter.layers(comp).items():
            key = f"{comp}.{layer}"
            if spec.is_plain:
                a, b = spec.A.detach().float().cpu(), spec.B.detach().float().cpu()
                out[key] = LayerFactors(key=key, A=a.flatten(1), B=b.flatten(1), rank=spec.rank, alpha=spec.alpha,
                                        scaling=spec.scaling, kernel=spec.kernel)
                continue
            w = None
            if spec.weight_dependent:
                w = base.weight(key, 0) if base is not None else None  # kinds sit on whole weights, never parts
                if w is None:
                    raise ValueError(f"{key} is a {spec.label} layer: its update depends on the base weight; give "
                                     "the base model with --base MODEL to analyse it")
            b, a = spec.update_factors(w)
            kernel = tuple(spec.factors["lora_mid"].shape[2:]) if "lora_mid" in spec.factors else ()
            out[key] = LayerFactors(key=key, A=a.float(), B=b.float(), rank=int(a.shape[0]), alpha=float(a.shape[0]),
                                    scaling=1.0, kernel=kernel)
    return {k: out[k] for k in sorted(out, key=natural_key)}


# ---- base weights --------------------------------------------------------------------------------------------
Getter = Callable[[str], "torch.Tensor | None"]


class BaseWeights:
    """Base weights for adapted layers, from a diffusers pipeline folder, a built-in tiny pipeline name, or one
    safetensors state dict (keys with or without the `<component>.` prefix). Tensors are read lazily."""

    def __init__(self, description: str, getters: dict[str, Getter], shared: Getter | None = None) -> None:
        self.description = description
        self._getters = getters
        self._shared = shared

    @classmethod
    def open(cls, spec: str, components: Iterable[str] = COMPONENTS) -> "BaseWeights":
        """Open `spec`: "tiny"/"tiny-sd1"/"tiny-sd2"/"tiny-sdxl", a pipeline folder, or a .safetensors file."""
        comps = list(components)
        if spec in TINY_PIPELINES:
            pipe = load_sd_pipeline(spec)
            getters = {}
            for c in comps:
                model = getattr(pipe, c, None)
                if model is not None:
                    getters[c] = model.state_dict().get
            return cls(f"built-in pipeline {spec!r}", getters)
        path = Path(spec).expanduser()
        if path.is_dir():
            return cls._from_folder(path, comps)
        if path.is_file():
            return cls(str(path), {}, shared=_lazy_file_getter([path]))
        raise FileNotFoundError(
            f"--base {spec!r} does not exist; expected a diffusers pipeline folder (with model_index.json), one of "
            f"{sorted(TINY_PIPELINES)}, or a .safetensors state dict of the base model")

    @classmethod
    def _from_folder(cls, path: Path, comps: list[str]) -> "BaseWeights":
        if not (path / "model_index.json").is_file():
            files = sorted(path.glob("*.safetensors"))
            if files:  # a single model saved with save_pretrained (e.g. a ViT): its weights sit in the folder
                return cls(str(path), {}, shared=_lazy_file_getter(files))
            raise FileNotFoundError(f"--base folder {str(path)!r} has neither model_index.json nor .safetensors "
                                    "files; expected a diffusers pipeline folder or a model folder")
        getters = {}
        for c in comps:
            files = _pick_weight_files(path / c)
            if files:
                getters[c] = _lazy_file_getter(files)
        if not getters:
            raise FileNotFoundError(f"--base folder {str(path)!r} has no .safetensors weights for any of {comps} "
                                    "(only safetensors are read; .bin pickles are refused)")
        return cls(str(path), getters)

    def _get(self, comp: str, key: str) -> torch.Tensor | None:
        if comp in self._getters:
            return self._getters[comp](key)
        if self._shared is not None:
            t = self._shared(f"{comp}.{key}")
            return t if t is not None else self._shared(key)
        return None

    def weight(self, layer_key: str, out_rows: int) -> torch.Tensor | None:
        """The base weight of `layer_key` as an (out, in * kernel) float matrix, or None if the base lacks it.

        Fused parts: `q`/`k`/`v` take their third of a packed qkv weight (timm `qkv.weight`, MultiheadAttention
        `in_proj_weight`), `o` is MultiheadAttention's `out_proj.weight`.
        """
        comp, _, rest = layer_key.partition(".")
        for name in _name_variants(rest):  # the module itself first: T5's Linears are named q, k, v and o
            t = self._get(comp, f"{name}.weight")
            if t is not None:
                return t.detach().float().cpu().flatten(1)
        mod, _, part = rest.rpartition(".")
        if part not in _QKV + ("o",) or not mod:
            return None
        for name in _name_variants(mod):
            packed = f"{name}.out_proj.weight" if part == "o" else f"{name}.in_proj_weight"
            for cand in (packed, f"{name}.weight"):
                t = self._get(comp, cand)
                if t is None:
                    continue
                if part in _QKV and t.shape[0] == 3 * out_rows:
                    t = t[_QKV.index(part) * out_rows:(_QKV.index(part) + 1) * out_rows]
                return t.detach().float().cpu().flatten(1)
        return None


def _name_variants(mod: str) -> list[str]:
    # transformers 5 dropped CLIPTextModel's `text_model.` level; files in the wild keep it.
    if mod.startswith("text_model."):
        return [mod, mod[len("text_model."):]]
    return [mod, "text_model." + mod]


def _pick_weight_files(folder: Path) -> list[Path]:
    """The safetensors weight files of one component folder, preferring full precision over `.fp16` variants."""
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    plain = [f for f in files if not re.search(r"\.(fp16|bf16|fp32)\.", f.name) and ".fp16-" not in f.name]
    return plain or files


def _lazy_file_getter(files: list[Path]) -> Getter:
    """A key -> tensor lookup over safetensors files (validated headers, tensors read on demand)."""
    index: dict[str, Path] = {}
    for f in files:
        try:
            header, _ = read_header(f)
        except AdapterFileError as e:
            raise AdapterFileError(f"--base: {e}") from None
        for k in header:
            if k != "__metadata__":
                index.setdefault(k, f)
    handles: dict[Path, object] = {}

    def get(key: str) -> torch.Tensor | None:
        f = index.get(key)
        if f is None:
            return None
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(key)  # type: ignore[attr-defined]

    return get
