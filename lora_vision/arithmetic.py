"""Adapter arithmetic: SVD resize, merging several adapters into one, and extracting an adapter from two models.

Every function works on canonical `Adapter` tensors and returns per-layer rows saying how much of each layer's
update was kept: kept = ||approximation||_F / ||update||_F (1.0 means exact). The update of a layer is
delta = scaling * B @ A (flattened to out x in*kh*kw for convolutions; A keeps the kernel), with the layer's own
scaling rule (lora.spec); results carry the scale in B and use the plain rule with alpha = rank.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .adapter import FULL, Adapter
from .analysis.linalg import lowrank_svd as _lowrank_svd
from .formats import naming
from .io import read_safetensors
from .lora.spec import LayerSpec
from .metadata import FORMAT_VERSION, AdapterMetadata


@dataclass
class LayerRow:
    """One line of a resize/merge/extract report."""

    module: str
    rank_in: int
    rank_out: int
    kept: float  # Frobenius norm kept, in [0, 1]

    note: str = ""  # e.g. the kind a layer was converted from

    def __str__(self) -> str:
        note = f" ({self.note})" if self.note else ""
        return (f"{self.module}: rank {self.rank_in} -> {self.rank_out}, kept {100 * self.kept:.2f}% of "
                f"||delta||_F{note}")


def _entries(adapter: Adapter) -> dict[str, LayerSpec]:
    return {f"{comp}.{key}": spec for comp in adapter.components() for key, spec in adapter.layers(comp).items()}


def _choose_rank(s: torch.Tensor, rank: int | None, energy: float | None, floor: float = 0.0) -> int:
    """Rank to keep: `rank` (capped at the numerical rank: values above `floor` and 1e-7 * s[0]), or the fewest
    values holding `energy` of sum(s^2)."""
    n = int((s > max(float(s[0]) * 1e-7, floor)).sum()) if s.numel() and s[0] > 0 else 0
    if energy is not None:
        if not 0 < energy <= 1:
            raise ValueError(f"energy={energy}: expected a fraction in (0, 1]")
        c = torch.cumsum(s.double() ** 2, 0)
        k = int((c < energy * c[-1] * (1 - 1e-12)).sum()) + 1 if n else 0
        return max(1, min(k, max(n, 1)))
    if rank is None or rank < 1:
        raise ValueError(f"rank={rank!r}: expected a positive integer (or give energy)")
    return max(1, min(rank, max(n, 1)))


def _factor(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A (k, in), B (out, k) with B @ A = best rank-k approximation (Eckart-Young); plus the kept norm fraction."""
    root = s[:k].sqrt()
    total = float(s.double().pow(2).sum().sqrt())
    kept = float(s[:k].double().pow(2).sum().sqrt()) / total if total > 0 else 1.0
    return root[:, None] * vh[:k], u[:, :k] * root[None, :], kept


def lowrank_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD (U, S, Vh) of B @ A (B: out x r, A: r x in) from the factors, in float64 (see analysis.linalg)."""
    r = _lowrank_svd(b, a)
    return r.U, r.S, r.V.T


def _shape_back(e_like: LayerSpec | tuple[int, ...], a: torch.Tensor, b: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape flat (k, in*kh*kw) / (out, k) factors to the canonical layout of `e_like` (a plain layer, or the
    layer's weight shape; conv: 4D)."""
    shape = tuple(e_like) if isinstance(e_like, tuple) else tuple(e_like.A.shape)
    if len(shape) == 4:
        return a.reshape(a.shape[0], *shape[1:]), b.reshape(b.shape[0], b.shape[1], 1, 1)
    return a, b


class ConversionError(ValueError):
    """A layer of some kind cannot be turned into plain LoRA with what was given (e.g. it needs the base weight)."""


def _kind_shape(key: str, e: LayerSpec, base: Mapping[str, torch.Tensor] | None) -> tuple[int, ...]:
    """The weight shape of a kind layer: from the base weights when given, else from its factors when they carry
    the kernel (Tucker cores, 4-D LoKr w2, 4-D diff); flat factors on a convolution cannot tell its kernel."""
    if base is not None and key in base:
        return tuple(base[key].shape)
    if e.weight_dependent:
        raise ConversionError(f"{key} is a {e.label} layer: its update depends on the base weight; give the base "
                              "model (--base MODEL, or base= in Python) to convert it")
    d = e.delta(None)
    f = e.factors
    for n in ("lora_mid", "hada_t1", "lokr_t2"):
        if n in f:
            k = tuple(f[n].shape[2:])
            return (d.shape[0], d.shape[1] // max(1, math.prod(k)), *k)
    for n in ("lokr_w2", "diff"):
        if n in f and f[n].dim() == 4:
            k = tuple(f[n].shape[2:])
            return (d.shape[0], d.shape[1] // math.prod(k), *k)
    if any(n in f and f[n].dim() == 2 for n in ("hada_w1_b", "lokr_w2_b", "lokr_w2")) and base is None \
            and e.kind in ("loha", "lokr"):
        # Linear or a flat convolution: only the model can tell; a 1x1 / Linear reading would be wrong for k x k.
        raise ConversionError(f"{key} is a {e.label} layer with flat factors {d.shape[0]} x {d.shape[1]}, which may "
                              "be a Linear layer or a k x k convolution; give the base model (--base MODEL, or base= "
                              "in Python) so the plain LoRA gets the layer's shape")
    return tuple(d.shape)


def _flat_pair(key: str, e: LayerSpec, base: Mapping[str, torch.Tensor] | None
               ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...] | LayerSpec, str]:
    """(B * scaling (out, r), A (r, in*kh*kw)) with B @ A = the layer's update at strength 1, the shape to write it
    back in, and a note naming the kind converted. Plain LoRA (and Tucker LoCon, folded) keep their factors; other
    kinds are factored exactly by SVD of their update (rank = its numerical rank)."""
    plain = e.as_plain()
    if plain is not None:
        fb, fa = plain.update_factors()
        return fb, fa, plain, "" if e.is_plain else f"from {e.label}"
    if e.kind == "norm":
        raise ConversionError(f"{key} is a norm-layer update (w_norm / b_norm) of a LayerNorm / GroupNorm, which plain "
                              "LoRA has no layer for; leave it out or keep the adapter in its own format")
    shape = _kind_shape(key, e, base)
    if e.bias_delta() is not None:
        raise ConversionError(f"{key} is a {e.label} layer with a bias update (diff_b), which plain LoRA cannot "
                              "carry; leave it out or keep the adapter in its own format")
    w = base[key].float().reshape(shape) if e.weight_dependent else None
    fb, fa = e.update_factors(w)
    return fb, fa, shape, f"from {e.label}"


def _build(rows: dict[str, tuple[torch.Tensor, torch.Tensor]], metadata: Mapping[str, str],
           dtype: torch.dtype = torch.float32) -> Adapter:
    """Canonical adapter with alpha = rank under the plain rule (scaling 1); parts of one fused module are padded to
    one rank."""
    by_mod: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key, pair in rows.items():
        mod, _, last = key.rpartition(".")
        if last in ("q", "k", "v", "o"):
            by_mod.setdefault(mod, {})[last] = pair
        else:
            by_mod.setdefault(key, {})[""] = pair
    tensors: dict[str, torch.Tensor] = {}
    for mod, parts in by_mod.items():
        r = max(a.shape[0] for a, _ in parts.values())
        for part, (a, b) in parts.items():
            extra = r - a.shape[0]
            if extra:  # zero rank columns change nothing
                a = torch.cat([a, a.new_zeros(extra, *a.shape[1:])])
                b = torch.cat([b, b.new_zeros(b.shape[0], extra, *b.shape[2:])], 1)
            k = f"{mod}.{part}" if part else mod
            tensors[f"{k}.lora_A.weight"] = a.to(dtype).contiguous()
            tensors[f"{k}.lora_B.weight"] = b.to(dtype).contiguous()
            tensors[f"{k}.alpha"] = torch.tensor(float(r), dtype=torch.float32)
    info = AdapterMetadata.from_strings(metadata).replace(scaling={})
    return Adapter(tensors, info.to_strings())


def resize(adapter: Adapter, rank: int | None = None, energy: float | None = None,
           ranks: Mapping[str, int] | None = None, progress: bool = True,
           base: Mapping[str, torch.Tensor] | None = None) -> tuple[Adapter, list[LayerRow]]:
    """Reduce every layer to `rank` (or the fewest singular values keeping `energy` of sum(s^2)) by SVD.

    ranks: {component.module[.part]: rank} per layer instead (layers not listed keep their rank, exactly).
    Layers of other kinds (LoHa, LoKr, DoRA, OFT, ...) become plain LoRA: the SVD of their update (lora.kinds),
    the row noting the kind. `base` ({component.module: weight}) is needed for kinds whose update depends on the
    weight (DoRA, OFT, BOFT, (IA)^3) and for flat LoHa / LoKr factors on convolutions (the kernel shape).
    """
    if sum(x is not None for x in (rank, energy, ranks)) != 1:
        raise ValueError("give exactly one of rank, energy or ranks")
    entries = _entries(adapter)
    unknown = [k for k in (ranks or {}) if k not in entries]
    if unknown:
        raise KeyError(f"ranks names {len(unknown)} layer(s) the adapter does not have (first: {unknown[:3]})")
    rows, report = {}, []
    for key, e in tqdm(entries.items(), desc="resize", disable=not progress, leave=False):
        fb, fa, shape, note = _flat_pair(key, e, base)
        u, s, vh = lowrank_svd(fb, fa)
        want = rank if ranks is None else int(ranks.get(key, fa.shape[0]))
        k = _choose_rank(s, want, energy)
        a, b, kept = _factor(u, s, vh, k)
        rows[key] = _shape_back(shape, a, b)
        # rank in: a kind's update rank (LoHa reaches rank^2, LoKr rank(w1) * rank(w2)), not its factor rank
        report.append(LayerRow(key, e.rank if e.is_plain else fa.shape[0], k, kept, note))
    how = f"rank={rank}" if rank is not None else (f"energy={energy}" if energy is not None else "per-layer ranks")
    full = {k: v for k, v in adapter.tensors.items() if k.startswith(FULL + ".")}
    out = _build(rows, {**adapter.metadata, **AdapterMetadata(resized=how).to_strings()})
    out.tensors.update(full)
    return out, report


def _layer_shape(pair: tuple) -> tuple[int, ...]:
    fb, fa, shape, _ = pair
    full = tuple(shape) if isinstance(shape, tuple) else (shape.B.shape[0], *shape.A.shape[1:])
    return full if len(full) == 4 else (fb.shape[0], fa.shape[1])


def merge_adapters(adapters: Sequence[Adapter], weights: Sequence[float] | None = None, rank: int | None = None,
                   energy: float | None = None, progress: bool = True,
                   base: Mapping[str, torch.Tensor] | None = None) -> tuple[Adapter, list[LayerRow]]:
    """One adapter whose update is sum_i w_i * delta_i (any kinds: see `resize` for `base`).

    Without rank/energy it is exact: ranks are concatenated, A = [A_1; A_2; ...], B = [w_1 s_1 B_1, ...].
    With rank or energy the sum is compressed by SVD, and each row says how much of its norm was kept.
    """
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters) or not adapters:
        raise ValueError(f"got {len(adapters)} adapters and {len(weights)} weights; give one weight per adapter")
    all_entries = [_entries(ad) for ad in adapters]
    keys = list(dict.fromkeys(k for es in all_entries for k in es))
    rows, report = {}, []
    for key in tqdm(keys, desc="merge", disable=not progress, leave=False):
        es = [(w, _flat_pair(key, es[key], base)) for w, es in zip(weights, all_entries) if key in es]
        shapes = {_layer_shape(p) for _, p in es}
        if len(shapes) != 1:
            raise ValueError(f"{key}: the adapters disagree on the layer's shape {sorted(shapes)}; they are for "
                             "different base models")
        a = torch.cat([fa for _, (_, fa, _, _) in es])
        b = torch.cat([fb * w for w, (fb, _, _, _) in es], 1)
        r_in = a.shape[0]
        if rank is None and energy is None:
            rows[key] = _shape_back(es[0][1][2], a, b)
            report.append(LayerRow(key, r_in, r_in, 1.0))
            continue
        u, s, vh = lowrank_svd(b, a)
        k = _choose_rank(s, rank, energy)
        fa, fb, kept = _factor(u, s, vh, k)
        rows[key] = _shape_back(es[0][1][2], fa, fb)
        report.append(LayerRow(key, r_in, k, kept))
    return _build(rows, {**adapters[0].metadata, **AdapterMetadata(merged_from=len(adapters)).to_strings()}), report


def _is_adaptable_weight(name: str, t: torch.Tensor) -> bool:
    if not name.endswith(".weight") or t.dim() not in (2, 4) or not t.is_floating_point():
        return False
    last_module = name[: -len(".weight")].rsplit(".", 1)[-1]
    return "embed" not in last_module or last_module.startswith("linear")  # token/position/patch embeddings


def _weight_diffs(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], comp: str,
                  min_change: float) -> dict[str, tuple[torch.Tensor, float]]:
    """Canonical layer name -> (tuned - base in float64, its rounding-noise level) for the weights that changed.

    The noise level eps(dtype) * max|W| * sqrt(max dim) bounds the singular values that storing the weights in
    their dtype can create; values below it are not counted as rank.

    nn.MultiheadAttention (`X.in_proj_weight` + `X.out_proj.weight`) becomes the parts X.q, X.k, X.v and X.o.
    """
    mha = {k[: -len(".in_proj_weight")] for k in tuned if k.endswith(".in_proj_weight")}
    out: dict[str, torch.Tensor] = {}
    for k, w1 in tuned.items():
        is_in_proj = k.endswith(".in_proj_weight") and w1.dim() == 2
        if k not in base or not (is_in_proj or _is_adaptable_weight(k, w1)):
            continue
        w0 = base[k]
        if w0.shape != w1.shape:
            raise ValueError(f"{comp}.{k}: base {tuple(w0.shape)} vs tuned {tuple(w1.shape)}; not the same model")
        d = w1.double() - w0.double()
        if float(d.norm()) <= min_change * max(float(w0.double().norm()), 1e-30):
            continue
        floor = torch.finfo(w1.dtype).eps * float(torch.maximum(w0.abs().max(), w1.abs().max())) * \
            max(d.flatten(1).shape) ** 0.5
        if is_in_proj:
            mod = k[: -len(".in_proj_weight")]
            for p, block in zip("qkv", d.chunk(3)):
                if float(block.norm()) > 0:
                    out[f"{mod}.{p}"] = (block, floor)
            continue
        mod = k[: -len(".weight")]
        if mod.endswith(".out_proj") and mod[: -len(".out_proj")] in mha:
            out[f"{mod[: -len('.out_proj')]}.o"] = (d, floor)
            continue
        if comp.startswith("text_encoder"):
            mod = naming.te_to_live(mod, naming.default_has_text_model(comp))
        elif comp == "model" and naming.transformers_major() >= 5:
            mod = naming.vit_v4_to_v5(mod)  # checkpoints saved by transformers 4 keep the old ViT names
        out[mod] = (d, floor)
    return out


def extract(base: Mapping[str, Mapping[str, torch.Tensor]], tuned: Mapping[str, Mapping[str, torch.Tensor]],
            rank: int | None = None, energy: float | None = None, min_change: float = 1e-6,
            progress: bool = True) -> tuple[Adapter, list[LayerRow]]:
    """Adapter from the difference of two models: per component, per Linear/Conv weight, SVD of tuned - base.

    base/tuned: {component: state dict}. Layers whose relative change ||dW|| / ||W|| is below min_change are
    skipped. Text-encoder (and HF ViT) names are mapped to the installed transformers' live names.
    """
    diffs, floors = {}, {}
    for c in tuned:
        if c in base:
            for m, (d, floor) in _weight_diffs(base[c], tuned[c], c, min_change).items():
                diffs[f"{c}.{m}"], floors[f"{c}.{m}"] = d, floor
    rows, report = {}, []
    for key, d in tqdm(diffs.items(), desc="extract", disable=not progress, leave=False):
        u, s, vh = torch.linalg.svd(d.flatten(1), full_matrices=False)
        r = _choose_rank(s, rank, energy, floors[key])
        a, b, kept = _factor(u, s, vh, r)
        rows[key] = (a.reshape(r, *d.shape[1:]), b.reshape(b.shape[0], r, 1, 1)) if d.dim() == 4 else (a, b)
        report.append(LayerRow(key, min(d.flatten(1).shape), r, kept))
    if not rows:
        raise ValueError("the two models have no differing Linear/Conv2d weights; nothing to extract")
    return _build(rows, AdapterMetadata(format=FORMAT_VERSION, extracted=True).to_strings()), \
        report


PIPELINE_FILES = {"unet": ("unet/diffusion_pytorch_model.safetensors",),
                  "transformer": ("transformer/diffusion_pytorch_model.safetensors",),
                  "text_encoder": ("text_encoder/model.safetensors",),
                  "text_encoder_2": ("text_encoder_2/model.safetensors",),
                  "text_encoder_3": ("text_encoder_3/model.safetensors",)}


def load_weights(path: str | os.PathLike, component: str = "model") -> dict[str, dict[str, torch.Tensor]]:
    """{component: state dict} from a diffusers pipeline folder (unet or transformer, text encoders) or one
    .safetensors file."""
    p = Path(path)
    if p.is_dir():
        out = {}
        for comp, names in PIPELINE_FILES.items():
            for n in names:
                if (p / n).is_file():
                    out[comp] = read_safetensors(p / n, check_finite=False)[0]
        if not out:
            raise FileNotFoundError(f"{p}: no unet/transformer/text_encoder safetensors weights found (expected a diffusers "
                                    "pipeline folder saved with safe_serialization)")
        return out
    return {component: read_safetensors(p, check_finite=False)[0]}


def layer_weights(path: str | os.PathLike, component: str = "model") -> dict[str, torch.Tensor]:
    """{component.module: weight} of a base model (pipeline folder or one .safetensors file, as `load_weights`),
    module names as adapters spell them: what `resize` / `merge_adapters` need for weight-dependent kinds."""
    out = {}
    for comp, sd in load_weights(path, component).items():
        for k, t in sd.items():
            if not k.endswith(".weight"):
                continue
            mod = k[: -len(".weight")]
            if comp.startswith("text_encoder"):
                mod = naming.te_to_live(mod, naming.default_has_text_model(comp))
            elif comp == "model" and naming.transformers_major() >= 5:
                mod = naming.vit_v4_to_v5(mod)
            out[f"{comp}.{mod}"] = t
    return out


def print_rows(rows: Iterable[LayerRow], limit: int | None = None) -> str:
    """The per-layer report as text, with a summary line."""
    rows = list(rows)
    lines = [str(r) for r in (rows if limit is None else rows[:limit])]
    if limit is not None and len(rows) > limit:
        lines.append(f"... ({len(rows) - limit} more layers)")
    if rows:
        worst = min(rows, key=lambda r: r.kept)
        mean = sum(r.kept for r in rows) / len(rows)
        lines.append(f"{len(rows)} layers; mean kept {100 * mean:.2f}%, lowest {100 * worst.kept:.2f}% "
                     f"({worst.module})")
    return "\n".join(lines)

