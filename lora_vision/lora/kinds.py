"""Adapter kinds: the update rule of every layer type users download (LoRA/LoCon, LoHa, LoKr, DoRA, OFT, BOFT,
(IA)^3, full diff, norm), as one table. `LayerSpec` (lora.spec) carries a kind and its factors and asks this module
for the rank, the scale, the shape check and the update; nothing else in the package knows a kind's formula.

Factor names are the tensor suffixes LyCORIS and kohya write (so reading and writing foreign files is a rename of
the module part only). Layout of the weight W: (out, in) for Linear, (out, in, kh, kw) for Conv2d.

| kind | factors (required / optional) | rank | update at strength 1 |
|---|---|---|---|
| lora | A (`lora_down`), B (`lora_up`) / `lora_mid` (Tucker core, conv), `dora_scale`, `diff_b` | rows of A | s·B·A (Tucker: mid ×₀ up ×₁ down); bias: diff_b |
| loha | `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b` / `hada_t1`, `hada_t2`, `dora_scale` | rows of w1_b | s·(w1_a w1_b) ⊙ (w2_a w2_b) |
| lokr | `lokr_w1` or `lokr_w1_a`+`lokr_w1_b`; `lokr_w2` or `lokr_w2_a`+`lokr_w2_b` / `lokr_t2`, `dora_scale` | rows of w1_b, else of w2_b, else 0 | s·w1 ⊗ w2 |
| oft | `oft_blocks` (n, b, b) or `oft_diag` (n, b, b) / `rescale` | b | rescale·R W − W, R block-diagonal Cayley |
| boft | `oft_blocks` (m, n, b, b) or `oft_diag` (m, n, b, b) / `rescale` | b | rescale·(butterfly of m stages) W − W |
| ia3 | `weight` / `on_input` | 0 | W ⊙ weight (per output row, or per input column when on_input) |
| full | `diff` / `diff_b` | 0 | diff (bias: diff_b) |
| norm | `w_norm` / `b_norm` | 0 | w_norm (bias: b_norm); norm layers only |

Scale s: alpha / rank for lora, loha and lokr (alpha / sqrt(rank) under the "rslora" rule); a missing alpha means
alpha = rank. LoKr with neither w1 nor w2 decomposed has no rank and s = 1 whatever alpha says (LyCORIS and
ComfyUI both do this). OFT/BOFT read alpha as LyCORIS writes it, the constraint per output channel: the skew
matrix Q is rescaled to norm alpha * out when its norm is larger (alpha 0: no constraint). `oft_diag` is what
LyCORIS wrote before 2.1 (Nov 2023 to Feb 2024, its `custom_state_dict`): the rotation R itself, constraint already
applied, so alpha is not read (A1111's network_oft.py reads it the same way). (IA)^3, full and norm ignore alpha.

DoRA (`dora_scale`, Liu et al. 2024, https://arxiv.org/abs/2402.09353) modifies lora, loha and lokr: with
W' = W + ΔW the kind's update, the layer's weight becomes dora_scale · W' / ‖W'‖, the norm taken per output row
when dora_scale has `out` entries (shape (out, 1, ...), LyCORIS' wd_on_out, its default) or per input column when
it has `in` entries (shape (1, in, ...), the orientation ComfyUI's weight_decompose reads). The update of a DoRA
layer is therefore weight-dependent: Δ = dora(W + ΔW) − W.

Strength: every kind applies as W + strength · Δ, Δ the update at strength 1 (ComfyUI's rule for DoRA:
`weight + strength * (weight_calc - weight)`). LyCORIS' own multiplier differs for the non-linear kinds (DoRA
interpolates the magnitude, BOFT each butterfly stage, OFT the rotation), so tests compare with LyCORIS at
strength 1 and with the formula above at other strengths. Two ComfyUI behaviours we do not copy: its OFT loader
multiplies by the strength twice and ignores `rescale`, and it reads the OFT alpha as an absolute norm; we follow
LyCORIS, which wrote those files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

Factors = Mapping[str, torch.Tensor]

DORA = "dora_scale"
LOKR_ROWS = "lokr_rows"  # a LoKr part's window [start, stop) into kron(w1, w2); see split_rows
INTEGER_FACTORS = ("on_input", LOKR_ROWS)  # flags and indices, not weights: never cast, scaled or checked as such
LORA_FACTORS = ("A", "B", "lora_mid", DORA)  # A and B are LayerSpec.A / LayerSpec.B


@dataclass(frozen=True)
class Kind:
    """One adapter kind: its name, what users call it, its factor names, and whether it needs the base weight."""

    name: str
    label: str
    required: tuple[tuple[str, ...], ...]
    """Groups of factors; each group must be present in full (alternatives: see `alternatives`)."""
    optional: tuple[str, ...]
    alternatives: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """(full factor, its decomposed pair): either the one or the pair must be present (LoKr's w1 / w2)."""
    weight_dependent: bool = False
    uses_alpha: bool = True
    norm_layers: bool = False
    """Applies to normalisation layers (LayerNorm, GroupNorm), not to Linear / Conv2d."""

    @property
    def factor_names(self) -> tuple[str, ...]:
        """Every factor name this kind knows."""
        names = [n for g in self.required for n in g] + list(self.optional)
        for full, pair in self.alternatives:
            names += [full, *pair]
        return tuple(dict.fromkeys(names))


KINDS: dict[str, Kind] = {k.name: k for k in (
    # diff_b: the bias update a LoRA with a biased lora_up carries (BFL's Flux.1 control LoRAs, peft's lora_bias),
    # stored at strength 1 (its scale folded in), as ComfyUI reads `diff_b` next to a LoRA pair.
    Kind("lora", "LoRA", (("A", "B"),), ("lora_mid", DORA, "diff_b")),
    Kind("loha", "LoHa", (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),), ("hada_t1", "hada_t2", DORA)),
    # lokr_rows [start, stop]: the layer is rows start:stop of kron(w1, w2), a part of a LoKr on a fused module
    # (BFL's linear1) whose w2 rows do not divide the parts (split_rows); no other tool's file has it
    Kind("lokr", "LoKr", (), ("lokr_t2", DORA, LOKR_ROWS),
         alternatives=(("lokr_w1", ("lokr_w1_a", "lokr_w1_b")), ("lokr_w2", ("lokr_w2_a", "lokr_w2_b")))),
    Kind("oft", "OFT", (), ("rescale",), alternatives=(("oft_blocks", ("oft_diag",)),), weight_dependent=True),
    Kind("boft", "BOFT", (), ("rescale",), alternatives=(("oft_blocks", ("oft_diag",)),), weight_dependent=True),
    Kind("ia3", "(IA)^3", (("weight",),), ("on_input",), weight_dependent=True, uses_alpha=False),
    Kind("full", "full diff", (("diff",),), ("diff_b",), uses_alpha=False),
    Kind("norm", "norm", (("w_norm",),), ("b_norm",), uses_alpha=False, norm_layers=True),
)}


class KindError(ValueError):
    """The factors of a layer do not make a valid update of the given kind (or of the layer's weight)."""


def get_kind(name: str) -> Kind:
    """The Kind called `name`; a clear error for unknown names."""
    try:
        return KINDS[name]
    except KeyError:
        raise KindError(f"unknown adapter kind {name!r}; known kinds: {', '.join(KINDS)}") from None


def is_dora(factors: Factors) -> bool:
    """True when the layer carries a DoRA magnitude."""
    return DORA in factors


def describe(kind: str, factors: Factors) -> str:
    """What a layer is, in the words users know: `LoHa`, `LoRA+DoRA`, `LoCon (Tucker)`."""
    label = get_kind(kind).label
    if any(t in factors for t in ("lora_mid", "hada_t1", "hada_t2", "lokr_t2")):
        label += " (Tucker)"
    if kind == "lora" and "diff_b" in factors:
        label += "+bias"
    return label + ("+DoRA" if is_dora(factors) else "")


# ---- per-kind rank, scale and composition (shapes first, then values) ---------------------------------------------

def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _fmt(factors: Factors, names: tuple[str, ...] | None = None) -> str:
    names = tuple(n for n in (names or tuple(factors)) if n in factors and factors[n] is not None)
    return ", ".join(f"{n} {_shape(factors[n])}" for n in names)


def missing_factors(kind: str, factors: Factors) -> list[str]:
    """Names of required factors that are absent (for "half a kind's tensors" reports)."""
    k = get_kind(kind)
    out = [n for g in k.required for n in g if factors.get(n) is None]
    for full, pair in k.alternatives:
        if factors.get(full) is None:
            have = [p for p in pair if factors.get(p) is not None]
            if len(have) != len(pair):
                out.append(f"{full} (or {' and '.join(pair)})")
    if kind == "loha" and (factors.get("hada_t1") is None) != (factors.get("hada_t2") is None):
        out.append("hada_t2" if factors.get("hada_t2") is None else "hada_t1")
    return out


def rank_of(kind: str, factors: Factors) -> int:
    """The rank the scale divides by (0 for kinds without a rank)."""
    if kind == "lora":
        return int(factors["A"].shape[0])
    if kind == "loha":
        return int(factors["hada_w1_b"].shape[0])
    if kind == "lokr":
        for n in ("lokr_w1_b", "lokr_w2_b"):
            if factors.get(n) is not None:
                return int(factors[n].shape[0])
        return 0
    if kind in ("oft", "boft"):
        return int(_oft_factor(factors).shape[-1])
    return 0


def scale_of(kind: str, alpha: float, rank: int, rule_scaling: Callable[[float, int], float]) -> float:
    """The scale of the update: `rule_scaling(alpha, rank)` for lora / loha / lokr with a rank, else 1."""
    if kind in ("lora", "loha") or (kind == "lokr" and rank > 0):
        return float(rule_scaling(alpha, rank))
    return 1.0


def _loha_half(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    if t is None:  # (out, r) @ (r, in * k * k)
        return a.flatten(1) @ b.flatten(1)
    # Tucker: t (r, r, kh, kw), a (r, out), b (r, in) -> (out, in, kh, kw)
    return torch.einsum("ij...,ip,jq->pq...", t, a, b)


def _loha_shape(f: Factors) -> tuple[int, ...]:
    w1a, w1b, w2a, w2b = (f[n] for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    t1, t2 = f.get("hada_t1"), f.get("hada_t2")
    shapes = []
    for a, b, t in ((w1a, w1b, t1), (w2a, w2b, t2)):
        if t is None:
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
                raise KindError("the _a factor's columns must equal the _b factor's rows")
            shapes.append((a.shape[0], b.shape[1]))
        else:
            if t.dim() < 2 or a.shape[0] != t.shape[0] or b.shape[0] != t.shape[1]:
                raise KindError("the Tucker core's first two sizes must equal the rows of its _a and _b factors")
            shapes.append((a.shape[1], b.shape[1], *t.shape[2:]))
    if shapes[0] != shapes[1]:
        raise KindError(f"the two Hadamard halves have different shapes {shapes[0]} and {shapes[1]}")
    return shapes[0]


def _lokr_part(f: Factors, which: str) -> torch.Tensor:
    full = f.get(f"lokr_{which}")
    if full is not None:
        return full
    a, b = f[f"lokr_{which}_a"], f[f"lokr_{which}_b"]
    t = f.get("lokr_t2") if which == "w2" else None
    if t is not None:  # t2 (r, r, kh, kw), w2_a (r, out2), w2_b (r, in2) -> (out2, in2, kh, kw)
        return torch.einsum("ij...,ip,jq->pq...", t, a, b)
    return a.flatten(1) @ b.flatten(1)


def _lokr_part_shape(f: Factors, which: str) -> tuple[int, ...]:
    full = f.get(f"lokr_{which}")
    if full is not None:
        return _shape(full)
    a, b = f[f"lokr_{which}_a"], f[f"lokr_{which}_b"]
    t = f.get("lokr_t2") if which == "w2" else None
    if t is not None:
        if a.shape[0] != t.shape[0] or b.shape[0] != t.shape[1]:
            raise KindError("lokr_t2's first two sizes must equal the rows of lokr_w2_a and lokr_w2_b")
        return (a.shape[1], b.shape[1], *t.shape[2:])
    if a.dim() != 2 or a.shape[1] != b.shape[0]:
        raise KindError(f"lokr_{which}_a's columns must equal lokr_{which}_b's rows")
    return (a.shape[0], *b.shape[1:])


def _lokr_shape(f: Factors, wshape: tuple[int, ...]) -> tuple[int, ...]:
    s1, s2 = _lokr_part_shape(f, "w1"), _lokr_part_shape(f, "w2")
    if len(s1) != 2:
        raise KindError("lokr_w1 must be a matrix")
    out, cols = s1[0] * s2[0], s1[1] * math.prod(s2[1:])
    window = lokr_window(f)
    if window is not None:
        start, stop = window
        if not 0 <= start < stop <= out:
            raise KindError(f"lokr_rows [{start}, {stop}) is not a window of the {out} rows of kron(w1, w2)")
        out = stop - start
    return (out, cols)


def lokr_block_rows(f: Factors) -> int:
    """The rows of a LoKr's w2: kron(w1, w2) is w1's rows, each a block of this many rows."""
    return _lokr_part_shape(f, "w2")[0]


def lokr_window(f: Factors) -> tuple[int, int] | None:
    """(start, stop) of a LoKr part's `lokr_rows`, None for a whole LoKr. Raises KindError when it is not two
    integers."""
    t = f.get(LOKR_ROWS)
    if t is None:
        return None
    if t.is_floating_point() or t.numel() != 2:
        raise KindError(f"lokr_rows must be two integers [start, stop]; got {t.dtype} of shape {tuple(t.shape)}")
    start, stop = (int(v) for v in t.reshape(-1).tolist())
    return start, stop


def _oft_factor(f: Factors) -> torch.Tensor:
    """The OFT / BOFT blocks of a layer: `oft_blocks` (skew-symmetric generators) or `oft_diag` (R itself)."""
    blocks = f.get("oft_blocks")
    return blocks if blocks is not None else f["oft_diag"]


def _oft_rotation(f: Factors, out: int, alpha: float) -> torch.Tensor:
    """R of every block: the Cayley transform of `oft_blocks` under the constraint alpha * out, or `oft_diag`."""
    if f.get("oft_blocks") is None:
        return f["oft_diag"]
    return _oft_r(f["oft_blocks"], alpha * out)


def _oft_r(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """Cayley transform R = (I + Q)(I - Q)^-1 of Q = B - B^T, Q rescaled to norm `constraint` when larger."""
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.norm(q) + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _oft_apply(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """R^T applied per block of output rows (LyCORIS' diag-OFT); r (n, b, b)."""
    n, b, _ = r.shape
    rows = w.reshape(n, b, -1)
    return torch.einsum("knm,knx->kmx", r, rows).reshape(w.shape)


def _boft_apply(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """m butterfly stages; stage i mixes output rows 2^i * b/2 apart within blocks of b (LyCORIS' BOFT); r (m, n,
    b, b)."""
    m, _, b, _ = r.shape
    x = w.reshape(w.shape[0], -1)
    half = b // 2
    for i in range(m):
        k = 2 ** i * half
        # rows (c, g=2, k) -> (c, k, g): pair up rows k apart, then blocks of b consecutive rows
        x = x.unflatten(0, (-1, 2, k)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
        x = torch.einsum("nij,nj...->ni...", r[i], x)
        x = x.flatten(0, 1).unflatten(0, (-1, k, 2)).transpose(1, 2).flatten(0, 2)
    return x.reshape(w.shape)


def dora_on_out(scale: torch.Tensor, out_rows: int) -> bool:
    """True when a DoRA magnitude holds one value per output row ((out,) or (out, 1, ...), LyCORIS' wd_on_out and
    peft's orientation), False when it is per input column ((1, in, ...), ComfyUI's)."""
    return scale.shape[0] == out_rows and scale.numel() == out_rows and (scale.dim() < 2 or scale.shape[1] == 1)


def _dora(weight: torch.Tensor, updated: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """dora(W') - W: W' rescaled to the magnitude `scale` per output row or per input column."""
    out_axis = dora_on_out(scale, updated.shape[0])
    eps = torch.finfo(torch.float32).eps
    if out_axis:
        norm = updated.reshape(updated.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (updated.dim() - 1))
        mag = scale.reshape(-1, *[1] * (updated.dim() - 1))
    else:
        norm = updated.transpose(0, 1).reshape(updated.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, -1, *[1] * (updated.dim() - 2))
        mag = scale.reshape(1, -1, *[1] * (updated.dim() - 2))
    return updated * (mag.to(updated) / (norm + eps)) - weight


def check(kind: str, factors: Factors, weight_shape: tuple[int, ...] | None, what: str = "weight") -> list[str]:
    """Problems of `factors` as a `kind` layer on a weight of `weight_shape` (None: internal consistency only),
    each naming the factors with their shapes and what the layer needs. Empty when the layer is usable."""
    missing = missing_factors(kind, factors)
    if missing:
        return [f"{describe(kind, factors)} layer has {_fmt(factors) or 'no factors'} but lacks {', '.join(missing)}"]
    ws = tuple(weight_shape) if weight_shape is not None else None
    k = get_kind(kind)
    problems: list[str] = []
    for n in k.factor_names:
        t = factors.get(n)
        if t is not None and n not in INTEGER_FACTORS and not t.is_floating_point():
            problems.append(f"{n} has dtype {t.dtype}; expected a floating point tensor")
    if problems:
        return problems
    try:
        got = _product_shape(kind, factors, ws)
    except KindError as e:
        return [f"{describe(kind, factors)} factors {_fmt(factors)} do not fit together: {e}"]
    if ws is not None and got is not None:
        flat = (ws[0], math.prod(ws[1:]))
        if got != ws and got != flat:
            problems.append(f"{describe(kind, factors)} factors {_fmt(factors)} make a {got} update but the layer's "
                            f"{what} is {ws}")
    if DORA in factors and ws is not None:
        d = factors[DORA]
        if d.numel() not in (ws[0], ws[1]) or (d.numel() != ws[0] and d.dim() >= 2 and d.shape[0] != 1):
            problems.append(f"dora_scale has shape {_shape(d)} ({d.numel()} values) but the layer's {what} {ws} needs "
                            f"{ws[0]} (one per output row) or {ws[1]} (one per input column)")
    return problems


def update_shape(kind: str, factors: Factors) -> tuple[int, ...] | None:
    """The shape of the update the factors make on their own, None when it takes the weight's shape (OFT, BOFT,
    (IA)^3). Raises KindError when the factors do not fit together."""
    return _product_shape(kind, factors, None)


def _product_shape(kind: str, f: Factors, ws: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The shape of the update the factors make (for shape checks; None when it is the weight's own shape)."""
    if kind == "lora":
        a, b, mid = f["A"], f["B"], f.get("lora_mid")
        r = a.shape[0]
        if b.dim() < 2 or b.shape[1] != r:
            raise KindError(f"lora_up's second size must equal lora_down's rank {r}")
        if mid is None:
            return (b.shape[0], *a.shape[1:]) if a.dim() > 2 else (b.shape[0], a.shape[1])
        if mid.dim() != 4 or mid.shape[:2] != (b.shape[1], r):
            raise KindError(f"lora_mid must be (rank, rank, kh, kw) = ({r}, {r}, kh, kw)")
        return (b.shape[0], a.shape[1], *mid.shape[2:])
    if kind == "loha":
        return _loha_shape(f)
    if kind == "lokr":
        got = _lokr_shape(f, ws or ())
        return got
    if kind in ("oft", "boft"):
        if f.get("oft_blocks") is not None and f.get("oft_diag") is not None:
            raise KindError("a layer has oft_blocks or oft_diag, not both")
        blocks = _oft_factor(f)
        name = "oft_blocks" if f.get("oft_blocks") is not None else "oft_diag"
        want_dim = 3 if kind == "oft" else 4
        if blocks.dim() != want_dim or blocks.shape[-1] != blocks.shape[-2]:
            raise KindError(f"{name} must be {'(blocks, b, b)' if kind == 'oft' else '(stages, blocks, b, b)'}")
        if kind == "boft" and blocks.shape[-1] % 2:
            raise KindError("BOFT blocks must have an even size")
        out = blocks.shape[-3] * blocks.shape[-1]
        if ws is not None and out != ws[0]:
            raise KindError(f"the blocks cover {out} output rows but the layer has {ws[0]}")
        rescale = f.get("rescale")
        if rescale is not None and rescale.numel() != out:
            raise KindError(f"rescale has {rescale.numel()} values for {out} output rows")
        return None
    if kind == "ia3":
        w = f["weight"]
        if ws is not None:
            axis = 1 if _on_input(f) else 0
            if w.numel() != ws[axis]:
                raise KindError(f"weight has {w.numel()} values but the layer has {ws[axis]} "
                                f"{'input columns' if axis else 'output rows'}")
        return None
    if kind == "full":
        return _shape(f["diff"])
    if kind == "norm":
        w, b = f["w_norm"], f.get("b_norm")
        if w.dim() != 1 or (b is not None and tuple(b.shape) != tuple(w.shape)):
            raise KindError("w_norm must be a vector and b_norm (when present) one of the same length")
        return _shape(w)
    raise KindError(f"unknown adapter kind {kind!r}")


def _on_input(f: Factors) -> bool:
    t = f.get("on_input")
    return bool(t is not None and bool(torch.as_tensor(t).reshape(-1)[0]))


def update(kind: str, factors: Factors, scale: float, alpha: float, weight: torch.Tensor | None) -> torch.Tensor:
    """The update Δ of the weight at strength 1, in float32 and in the weight's shape (2-D (out, in·kh·kw) when no
    weight is given). Differentiable in the factors; `weight` is needed by DoRA, OFT, BOFT and (IA)^3."""
    k = get_kind(kind)
    needs_weight = k.weight_dependent or DORA in factors
    if needs_weight and weight is None:
        raise KindError(f"the update of a {describe(kind, factors)} layer depends on the base weight; pass it")
    f = {n: (t.float() if torch.is_tensor(t) and t.is_floating_point() else t) for n, t in factors.items()}
    w = weight.float() if weight is not None else None
    shape = tuple(w.shape) if w is not None else None
    if kind == "lora":
        a, b, mid = f["A"], f["B"], f.get("lora_mid")
        if mid is None:
            d = b.flatten(1) @ a.flatten(1)
        else:
            d = torch.einsum("ij...,pi,jq->pq...", mid, b.flatten(1), a.flatten(1))
    elif kind == "loha":
        d = (_loha_half(f["hada_w1_a"], f["hada_w1_b"], f.get("hada_t1"))
             * _loha_half(f["hada_w2_a"], f["hada_w2_b"], f.get("hada_t2")))
    elif kind == "lokr":
        w1, w2 = _lokr_part(f, "w1"), _lokr_part(f, "w2")
        d = torch.kron(w1, w2.flatten(1))
        window = lokr_window(f)
        if window is not None:
            d = d[window[0]:window[1]]
    elif kind == "oft":
        d = _oft_apply(w, _oft_rotation(f, w.shape[0], alpha))
    elif kind == "boft":
        d = _boft_apply(w, _oft_rotation(f, w.shape[0], alpha))
    elif kind == "ia3":
        v = f["weight"]
        d = w * (v.reshape(1, -1, *[1] * (w.dim() - 2)) if _on_input(f) else v.reshape(-1, *[1] * (w.dim() - 1)))
    elif kind == "full":
        d = f["diff"]
    elif kind == "norm":
        d = f["w_norm"]
    else:
        raise KindError(f"unknown adapter kind {kind!r}")
    if kind in ("oft", "boft"):
        rescale = f.get("rescale")
        if rescale is not None:
            d = d * rescale.reshape(-1, *[1] * (d.dim() - 1))
        d = d - w
    if shape is not None:
        d = d.reshape(shape)
    if scale != 1.0:
        d = d * scale
    if DORA in f:
        d = _dora(w, w + d, f[DORA])
    return d if shape is not None else d.reshape(d.shape[0], -1)


def split_rows(kind: str, factors: Factors, sizes: Sequence[int]) -> list[dict[str, torch.Tensor]] | None:
    """The factors of each block of consecutive output rows of the update (blocks of `sizes` rows, in order): each
    block the same kind, making exactly those rows of the update at every strength and, for DoRA and (IA)^3, from
    its own rows of the weight. Used where a file adapts a fused module (BFL's qkv) that the model holds as parts.
    None when the kind does not split there: OFT / BOFT (rotations mix rows), a DoRA magnitude per input column
    (its norm runs over all rows), a norm layer.

    Split: LoRA's B (its Tucker core and A shared), LoHa's w1_a / w2_a (the rows of the Hadamard halves), LoKr's w1
    (or w1_a) rows each block touches (a block that cuts through w2's rows keeps its window, `lokr_rows`), full
    diff's rows, (IA)^3's per-row vector (a per-column one is shared), diff_b and a per-row DoRA magnitude. The
    pieces are views and the unsplit factors are shared by the parts, as the q / k / v of a split LoRA share its A
    (io.write_safetensors writes shared storage in full)."""
    total = sum(sizes)
    if kind in ("oft", "boft", "norm") or not sizes or min(sizes) <= 0:
        return None
    f = dict(factors)
    split: dict[str, tuple[int, list[int]]] = {}  # factor -> (axis, block sizes along it)
    if DORA in f:
        if not dora_on_out(f[DORA], total):
            return None
        split[DORA] = (0, list(sizes))
    if f.get("diff_b") is not None:
        split["diff_b"] = (0, list(sizes))
    if kind == "lora":
        split["B"] = (0, list(sizes))
    elif kind == "loha":
        for a, t in (("hada_w1_a", "hada_t1"), ("hada_w2_a", "hada_t2")):
            split[a] = (1 if f.get(t) is not None else 0, list(sizes))  # Tucker: a is (r, out)
    elif kind == "lokr":
        if f.get(LOKR_ROWS) is not None or total != _lokr_shape(f, ())[0]:
            return None  # a window is not split again
    elif kind == "full":
        split["diff"] = (0, list(sizes))
    elif kind == "ia3":
        if not _on_input(f):
            split["weight"] = (0, list(sizes))
    else:
        return None
    for name, (axis, blocks) in split.items():
        if f[name].shape[axis] != sum(blocks):
            return None  # the factors make another number of rows than the blocks add up to
    pieces = {name: f[name].split(blocks, axis) for name, (axis, blocks) in split.items()}
    parts = [{n: pieces[n][i] if n in pieces else t for n, t in f.items()} for i in range(len(sizes))]
    if kind == "lokr":
        _lokr_windows(f, list(sizes), parts)
    return parts


def _lokr_windows(f: Factors, sizes: list[int], parts: list[dict[str, torch.Tensor]]) -> None:
    """The LoKr part of split_rows: row i of kron(w1, w2) is w1's row i // c times w2's row i % c (c = w2's
    rows), so each part takes the w1 (or w1_a) rows it touches, and a part that does not start and end on a
    multiple of c also keeps `lokr_rows`, its window into their kron."""
    c = lokr_block_rows(f)
    name = "lokr_w1" if f.get("lokr_w1") is not None else "lokr_w1_a"
    at = 0
    for part, size in zip(parts, sizes):
        first, start = divmod(at, c)
        count = -(-(start + size) // c)
        part[name] = f[name][first:first + count]
        if start or size != count * c:
            part[LOKR_ROWS] = torch.tensor([start, start + size])
        at += size


BIAS_FACTORS = {"lora": "diff_b", "full": "diff_b", "norm": "b_norm"}
"""The factor that updates the layer's bias, per kind that has one."""


def bias_update(kind: str, factors: Factors) -> torch.Tensor | None:
    """The update of the layer's bias at strength 1 (lora and full: `diff_b`, norm: `b_norm`), None for other kinds
    or when the layer has none."""
    name = BIAS_FACTORS.get(kind)
    t = factors.get(name) if name else None
    return t.float() if t is not None else None


# ---- reading factor names ---------------------------------------------------------------------------------------

def kind_of(names: set[str] | tuple[str, ...] | list[str], factors: Factors | None = None) -> str | None:
    """The kind a set of LyCORIS/kohya factor names belongs to (A / B for LoRA's down / up), or None when the
    names match no kind. `factors` (when given) tells diag-OFT (3-D oft_blocks) from BOFT (4-D)."""
    names = set(names)
    if any(n.startswith("hada_") for n in names):
        return "loha"
    if any(n.startswith("lokr_") for n in names):
        return "lokr"
    if "oft_blocks" in names or "oft_diag" in names:
        blocks = _oft_factor(factors) if factors and ("oft_blocks" in factors or "oft_diag" in factors) else None
        return "boft" if blocks is not None and blocks.dim() == 4 else "oft"
    if names & {"A", "B", "lora_mid"}:
        return "lora"
    if "diff" in names or "diff_b" in names:
        return "full"
    if "w_norm" in names or "b_norm" in names:
        return "norm"
    if "weight" in names or "on_input" in names:
        return "ia3"
    return None


def known_factor(name: str) -> bool:
    """True when `name` is a factor of some kind (or alpha)."""
    return name == "alpha" or any(name in k.factor_names for k in KINDS.values())


# ---- fresh (trainable) layers ---------------------------------------------------------------------------------------

TRAINABLE = ("lora", "loha", "lokr", "dora")
"""`LoRAConfig.adapter_type` values: the kinds `inject_lora(model, config)` can build for training."""


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dim: m = `factor` when it divides dim, else the largest divisor of dim not above
    `factor` (any, when factor <= 0) and not above sqrt(dim). LoKr splits each side of the weight this way."""
    if factor > 0 and dim % factor == 0:
        return (min(factor, dim // factor), max(factor, dim // factor))
    limit = factor if factor > 0 else dim
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0 and d <= limit)
    return m, dim // m


def _dora_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖ per output row, shaped (out, 1, ...): the DoRA magnitude that makes a fresh layer the identity."""
    w = weight.detach().float()
    return w.reshape(w.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))


def fresh_factors(adapter_type: str, weight: torch.Tensor, rank: int, factor: int = -1,
                  decompose_both: bool = False, full_rank: bool = False, init: str = "kaiming"
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, str, dict[str, torch.Tensor]]:
    """The factors of a new trainable layer of `adapter_type` for a base weight, as (A, B, kind, other factors) for
    a LayerSpec: LyCORIS' standard inits, one factor zero so that the first update is zero (LoHa: hada_w2_a; LoKr:
    lokr_w2 or lokr_w2_b; LoRA/DoRA: B). DoRA starts with dora_scale = ‖W‖ per output row. LoKr: `factor` splits the
    sides (-1: as square as possible), `full_rank` keeps w2 whole, `decompose_both` also splits w1 into w1_a @ w1_b
    when the rank is small enough."""
    if adapter_type not in TRAINABLE:
        raise KindError(f"adapter_type {adapter_type!r}: expected one of {TRAINABLE}")
    out_dim, in_dim, *k = weight.shape
    dev = weight.device

    def kaiming(*shape: int) -> torch.Tensor:
        t = torch.empty(*shape, device=dev)
        torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5))
        return t

    if adapter_type in ("lora", "dora"):
        a = kaiming(rank, in_dim, *k) if init == "kaiming" else torch.randn(rank, in_dim, *k, device=dev) / rank
        b = torch.zeros(out_dim, rank, *[1] * len(k), device=dev)
        extra = {DORA: _dora_magnitude(weight).to(dev)} if adapter_type == "dora" else {}
        return a, b, "lora", extra
    cols = in_dim * math.prod(k)
    if adapter_type == "loha":
        f = {"hada_w1_a": torch.randn(out_dim, rank, device=dev) * 0.1,
             "hada_w1_b": torch.randn(rank, cols, device=dev),
             "hada_w2_a": torch.zeros(out_dim, rank, device=dev),
             "hada_w2_b": torch.randn(rank, cols, device=dev)}
        return None, None, "loha", f
    out_l, out_k = factorization(out_dim, factor)
    in_m, in_n = factorization(in_dim, factor)
    f = {}
    if decompose_both and not full_rank and rank < max(out_l, in_m) / 2:
        f["lokr_w1_a"], f["lokr_w1_b"] = kaiming(out_l, rank), kaiming(rank, in_m)
    else:
        f["lokr_w1"] = kaiming(out_l, in_m)
    if not full_rank and rank < max(out_k, in_n) / 2:
        f["lokr_w2_a"], f["lokr_w2_b"] = kaiming(out_k, rank), torch.zeros(rank, in_n * math.prod(k), device=dev)
    else:
        f["lokr_w2"] = torch.zeros(out_k, in_n, *k, device=dev)
    return None, None, "lokr", f
