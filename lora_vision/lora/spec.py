"""What one adapted layer is: its factors, rank, alpha, scaling rule and kind. The one place the scale is computed.

Every path that turns stored numbers into an update (`inject_lora`, `Adapter.apply_to`, the pipeline loader, the
adapter server, merge / resize / extract, the exporters, the analysis) goes through `LayerSpec.scaling`, i.e. through
`scaling` below.

Scaling rules: "lora" is the paper's alpha / rank (Hu et al. 2021), "rslora" the rank-stabilised alpha / sqrt(rank)
(Kalajdzievski 2023, https://arxiv.org/abs/2312.03732). Other tools (kohya, A1111, ComfyUI, diffusers) only know
"lora"; `plain_alpha` gives the alpha that makes the same scale under it (alpha' = alpha * sqrt(rank) for rsLoRA).

Kinds: a LayerSpec carries its kind ("lora", "loha", "lokr", "oft", "boft", "ia3", "full", "norm"; see lora.kinds
for the table of factors, ranks, scales and updates, DoRA and Tucker included). A plain LoRA layer keeps its
factors in `A` and `B` (so LoRA-only code reads them as before); a LoRA layer's Tucker core or DoRA magnitude and
every factor of the other kinds live in `factors`, under the LyCORIS names. `LayerSpec.scaling` and
`LayerSpec.delta` stay the one place the scale and the update are worked out, for every kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch

from . import kinds as _kinds

SCALING_RULES: dict[str, Callable[[float, int], float]] = {
    "lora": lambda alpha, rank: alpha / rank,
    "rslora": lambda alpha, rank: alpha / math.sqrt(rank),
}
KINDS = tuple(_kinds.KINDS)
FUSED_PARTS = ("q", "k", "v", "o")


def scaling(alpha: float, rank: int, rule: str = "lora") -> float:
    """The factor the update B @ A is multiplied by: alpha / rank, or alpha / sqrt(rank) for rule "rslora"."""
    try:
        return SCALING_RULES[rule](float(alpha), int(rank))
    except KeyError:
        raise ValueError(f"unknown scaling rule {rule!r}; expected one of {tuple(SCALING_RULES)}") from None


def rule_name(rslora: bool) -> str:
    """The scaling rule of LoRAConfig(rslora=...)."""
    return "rslora" if rslora else "lora"


def plain_alpha(alpha: float, rank: int, rule: str = "lora") -> float:
    """The alpha that gives the same scale under the plain rule: scaling(plain_alpha, rank) == scaling(alpha, rank,
    rule). What files for other tools carry."""
    return float(alpha) if rule == "lora" else scaling(alpha, rank, rule) * rank


@dataclass(frozen=True)
class LayerSpec:
    """One adapted weight of some kind. For kind "lora": update = scaling * B @ A, scaling given by `alpha`, `rank`
    and `rule`; other kinds (and a LoRA's Tucker core `lora_mid` or DoRA `dora_scale`) keep their factors in
    `factors`, named as in LyCORIS files, and A / B are None for them (see lora.kinds).

    A is (rank, in) for Linear layers and (rank, in, kh, kw) for Conv2d (the kernel sits on A; with a Tucker core
    A is (rank, in, 1, 1) and the kernel sits on `lora_mid`); B is (out, rank) or (out, rank, 1, 1). Parts of fused
    projections (q, k, v, o) are one LayerSpec each (plain LoRA only).
    """

    A: torch.Tensor | None
    B: torch.Tensor | None
    alpha: float
    rule: str = "lora"
    kind: str = "lora"
    factors: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rule not in SCALING_RULES:
            raise ValueError(f"unknown scaling rule {self.rule!r}; expected one of {tuple(SCALING_RULES)}")
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind {self.kind!r} is not supported; supported: {KINDS}")
        if self.kind == "lora" and (self.A is None or self.B is None):
            raise ValueError("a LoRA LayerSpec needs both A and B")
        if self.kind != "lora" and (self.A is not None or self.B is not None):
            raise ValueError(f"a {self.kind} LayerSpec keeps its factors in `factors`; A and B must be None")
        unknown = [n for n in self.factors if n not in _kinds.get_kind(self.kind).factor_names or n in ("A", "B")]
        if unknown:
            raise ValueError(f"{self.kind} LayerSpec: unknown factor(s) {unknown}; a {self.kind} layer has "
                             f"{[n for n in _kinds.get_kind(self.kind).factor_names if n not in ('A', 'B')]}")

    @property
    def is_plain(self) -> bool:
        """True for a plain LoRA layer (A and B only): what LoRA-only code (exporters, resize, ...) handles."""
        return self.kind == "lora" and not self.factors

    @property
    def all_factors(self) -> dict[str, torch.Tensor]:
        """Every factor by name (A and B included for LoRA)."""
        return ({"A": self.A, "B": self.B} if self.kind == "lora" else {}) | dict(self.factors)

    @property
    def label(self) -> str:
        """What users call this layer: "LoRA", "LoHa", "LoKr+DoRA", "LoRA (Tucker)"."""
        return _kinds.describe(self.kind, self.factors)

    @property
    def rank(self) -> int:
        """Rank r: rows of A for LoRA; the rank the kind's scale divides by otherwise (0 when it has none)."""
        if self.kind == "lora":
            return int(self.A.shape[0])
        return _kinds.rank_of(self.kind, self.factors)

    @property
    def scaling(self) -> float:
        """The factor of the update (the only place it is worked out; 1 for kinds without a scale)."""
        if self.kind == "lora":
            return scaling(self.alpha, self.rank, self.rule)
        return _kinds.scale_of(self.kind, self.alpha, self.rank, lambda a, r: scaling(a, r, self.rule))

    @property
    def weight_dependent(self) -> bool:
        """True when the update depends on the base weight (DoRA, OFT, BOFT, (IA)^3)."""
        return _kinds.get_kind(self.kind).weight_dependent or _kinds.DORA in self.factors

    @property
    def kernel(self) -> tuple[int, ...]:
        """(kh, kw) of a convolution, () for a Linear layer (plain LoRA)."""
        return tuple(self.A.shape[2:]) if self.A is not None else ()

    def plain(self) -> "LayerSpec":
        """The same update under the plain rule (alpha' = scaling * rank): what other tools' files carry."""
        if self.rule == "lora" or self.rank == 0:
            return self
        return replace(self, alpha=plain_alpha(self.alpha, self.rank, self.rule), rule="lora")

    def as_plain(self) -> "LayerSpec | None":
        """The same update as a plain LoRA layer (A and B only) when the kind is one exactly (plain LoRA itself; a
        Tucker LoCon conv, its core folded into A: A'[i, c, kh, kw] = sum_j mid[i, j, kh, kw] A[j, c]); None for
        kinds whose update is no fixed low-rank pair (LoHa, LoKr, DoRA, OFT, BOFT, (IA)^3, full, norm)."""
        if self.is_plain:
            return self
        if self.kind != "lora" or set(self.factors) != {"lora_mid"}:
            return None
        mid = self.factors["lora_mid"]
        a = torch.einsum("ij...,jc->ic...", mid.float(), self.A.float().flatten(1)).to(self.A.dtype)
        return LayerSpec(a, self.B, self.alpha, self.rule)

    def update_factors(self, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A') in float64, flat (out, n) and (n, in * kh * kw), with B' @ A' = the update at strength 1: the
        scaled factors for plain LoRA and Tucker LoCon (`as_plain`), else the SVD of the kind's update cut at its
        numerical rank (exact to rounding). `weight` is needed by weight-dependent kinds (see `delta`)."""
        plain = self.as_plain()
        if plain is not None:
            return plain.B.flatten(1).double() * plain.scaling, plain.A.flatten(1).double()
        d = self.delta(weight if self.weight_dependent else None).double()
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        n = max(1, int((s > float(s[0]) * 1e-12).sum())) if s.numel() and s[0] > 0 else 1
        return u[:, :n] * s[:n], vh[:n]

    def with_factors(self, A: torch.Tensor, B: torch.Tensor) -> "LayerSpec":
        """The same rule and alpha with other factors."""
        return replace(self, A=A, B=B)

    def check(self, weight_shape: tuple[int, ...] | None) -> list[str]:
        """Problems of this layer on a weight of `weight_shape`, one line each naming the factors and their shapes
        (empty when it fits)."""
        return _kinds.check(self.kind, self.all_factors, weight_shape)

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The update at strength 1 in float32 as a matrix (out, in * kh * kw): scaling * B @ A for LoRA.

        `weight` (the layer's base weight) is needed by weight-dependent kinds (DoRA, OFT, BOFT, (IA)^3); strength s
        applies as W + s * delta for every kind."""
        if self.is_plain:
            return (self.B.float().flatten(1) @ self.A.float().flatten(1)) * self.scaling
        d = _kinds.update(self.kind, self.all_factors, self.scaling, self.alpha, weight)
        return d.reshape(d.shape[0], -1)

    def split_rows(self, sizes: Sequence[int]) -> "list[LayerSpec] | None":
        """This layer as one layer per block of consecutive output rows (`sizes`, in order), each of the same kind,
        alpha and rule, whose updates stacked are this update at every strength (lora.kinds.split_rows says which
        kinds split and where); None when the kind does not split there."""
        parts = _kinds.split_rows(self.kind, self.all_factors, sizes)
        if parts is None:
            return None
        out = []
        for f in parts:
            a, b = (f.pop("A"), f.pop("B")) if self.kind == "lora" else (None, None)
            out.append(LayerSpec(a, b, self.alpha, self.rule, self.kind, f))
        return out

    def bias_delta(self) -> torch.Tensor | None:
        """The update of the layer's bias at strength 1 (full `diff_b`, norm `b_norm`), None for other kinds."""
        return _kinds.bias_update(self.kind, self.factors)


def layer_key(module: str, part: str = "") -> str:
    """`module` or `module.part` (the canonical spelling of one adapted weight)."""
    return f"{module}.{part}" if part else module


def split_key(key: str, modules: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """(module, part) of a canonical layer key; part is "" unless the key ends in a fused part letter. With the
    model's `modules` (name -> module), a key that names a module itself (T5's `SelfAttention.q`) is that module."""
    mod, _, last = key.rpartition(".")
    if modules is not None and key in modules:
        return key, ""
    return (mod, last) if last in FUSED_PARTS and mod else (key, "")
