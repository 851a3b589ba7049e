"""What one adapted layer is: its factors, rank, alpha, scaling rule and kind. The one place the scale is computed.

Every path that turns stored numbers into an update (`inject_lora`, `Adapter.apply_to`, the pipeline loader, the
adapter server, merge / resize / extract, the exporters, the analysis) goes through `LayerSpec.scaling`, i.e. through
`scaling` below.

Scaling rules: "lora" is the paper's alpha / rank (Hu et al. 2021), "rslora" the rank-stabilised alpha / sqrt(rank)
(Kalajdzievski 2023, https://arxiv.org/abs/2312.03732). Other tools (kohya, A1111, ComfyUI, diffusers) only know
"lora"; `plain_alpha` gives the alpha that makes the same scale under it (alpha' = alpha * sqrt(rank) for rsLoRA).

Kinds: only "lora" (update = scaling * B @ A) today. LoHa, LoKr or DoRA layers are meant to be new kinds here (their
own factors and `delta`), read and written by the same paths, not new paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

SCALING_RULES: dict[str, Callable[[float, int], float]] = {
    "lora": lambda alpha, rank: alpha / rank,
    "rslora": lambda alpha, rank: alpha / math.sqrt(rank),
}
KINDS = ("lora",)
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
    """One adapted weight: update = scaling * B @ A, scaling given by `alpha`, `rank` and `rule`.

    A is (rank, in) for Linear layers and (rank, in, kh, kw) for Conv2d (the kernel sits on A); B is (out, rank)
    or (out, rank, 1, 1). Parts of fused projections (q, k, v, o) are one LayerSpec each.
    """

    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    rule: str = "lora"
    kind: str = "lora"

    def __post_init__(self) -> None:
        if self.rule not in SCALING_RULES:
            raise ValueError(f"unknown scaling rule {self.rule!r}; expected one of {tuple(SCALING_RULES)}")
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind {self.kind!r} is not supported; supported: {KINDS}")

    @property
    def rank(self) -> int:
        """Rank r: rows of A."""
        return int(self.A.shape[0])

    @property
    def scaling(self) -> float:
        """The factor of B @ A (the only place it is worked out)."""
        return scaling(self.alpha, self.rank, self.rule)

    @property
    def kernel(self) -> tuple[int, ...]:
        """(kh, kw) of a convolution, () for a Linear layer."""
        return tuple(self.A.shape[2:])

    def plain(self) -> "LayerSpec":
        """The same update under the plain rule (alpha' = scaling * rank): what other tools' files carry."""
        if self.rule == "lora":
            return self
        return replace(self, alpha=plain_alpha(self.alpha, self.rank, self.rule), rule="lora")

    def with_factors(self, A: torch.Tensor, B: torch.Tensor) -> "LayerSpec":
        """The same rule and alpha with other factors."""
        return replace(self, A=A, B=B)

    def delta(self) -> torch.Tensor:
        """scaling * B @ A in float32 as a matrix (out, in * kh * kw)."""
        return (self.B.float().flatten(1) @ self.A.float().flatten(1)) * self.scaling


def layer_key(module: str, part: str = "") -> str:
    """`module` or `module.part` (the canonical spelling of one adapted weight)."""
    return f"{module}.{part}" if part else module


def split_key(key: str) -> tuple[str, str]:
    """(module, part) of a canonical layer key; part is "" unless the key ends in a fused part letter."""
    mod, _, last = key.rpartition(".")
    return (mod, last) if last in FUSED_PARTS and mod else (key, "")
