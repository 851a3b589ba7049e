"""LoRAConfig: what to adapt and how (rank, alpha, dropout, init, targets, per-module overrides)."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from .kinds import TRAINABLE
from .spec import FUSED_PARTS, rule_name
from .spec import scaling as _scaling

INITS = ("kaiming", "gaussian")


class ConfigError(ValueError):
    """A configuration had one or more problems; the message lists all of them."""


class TargetError(ValueError):
    """A target pattern or preset does not fit the model."""


@dataclass(frozen=True)
class LoRAConfig:
    """How to adapt a model with LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685)."""

    rank: int = 4
    """Rank r of the update B @ A."""
    alpha: float | None = None
    """Scale numerator: scaling = alpha / rank (alpha / sqrt(rank) with rslora). None means alpha = rank."""
    dropout: float = 0.0
    """Dropout probability on the input of the low-rank path, in [0, 1)."""
    init: str = "kaiming"
    """Initialisation of A: "kaiming" (uniform, as the paper's reference code) or "gaussian" (std 1/rank). B is zero."""
    rslora: bool = False
    """Use rank-stabilised scaling alpha / sqrt(rank) (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732)."""
    targets: tuple[str, ...] | str = ("to_q", "to_k", "to_v", "to_out.0")
    """Preset name, or module-name patterns: dotted suffixes ("attn2.to_q") or regexes prefixed with "re:"."""
    exclude: tuple[str, ...] = ()
    """Patterns (same syntax as targets) of modules never to adapt, even if a target matches."""
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    """Per-module rank overrides: pattern -> rank. The first matching pattern (in order) wins."""
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    """Per-module alpha overrides: pattern -> alpha. The first matching pattern (in order) wins."""
    conv_rank: int | None = None
    """Rank for k x k convolutions with k > 1 (kohya's conv_dim); None uses rank."""
    conv_alpha: float | None = None
    """Alpha for k x k convolutions with k > 1 (kohya's conv_alpha); None uses conv_rank's default alpha rule."""
    fused_parts: tuple[str, ...] = ("q", "k", "v", "o")
    """Which parts of fused projections get adapters (MultiheadAttention: q, k, v, o; timm qkv Linear: q, k, v)."""
    split_qkv: bool = True
    """Adapt a fused `qkv` Linear (timm) with separate q, k, v adapters; False adapts it as one plain Linear."""
    adapter_type: str = "lora"
    """Kind of the new layers: "lora", "loha", "lokr" or "dora" (LoRA with a DoRA magnitude); see lora.kinds."""
    lokr_factor: int = -1
    """LoKr: split each side of the weight as (factor, size / factor); -1 splits as square as possible."""
    decompose_both: bool = False
    """LoKr: also write the small Kronecker factor w1 as w1_a @ w1_b (rank `rank`) when that is smaller."""
    full_rank: bool = False
    """LoKr: keep w2 as a full matrix (no rank; the scale is then 1, as in LyCORIS)."""

    def __post_init__(self) -> None:
        # Normalise sequences to tuples so the config stays hashable and YAML lists work.
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.exclude, (list, str)):
            object.__setattr__(self, "exclude", (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude))
        if isinstance(self.fused_parts, (list, str)):
            parts = (self.fused_parts,) if isinstance(self.fused_parts, str) else tuple(self.fused_parts)
            object.__setattr__(self, "fused_parts", parts)
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern))
        problems = self.problems()
        if problems:
            raise ConfigError("invalid LoRAConfig:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        """Every problem of this config, one line each (empty when valid)."""
        out: list[str] = []
        out += _check_rank("rank", self.rank)
        if self.alpha is not None:
            out += _check_alpha("alpha", self.alpha)
        if not isinstance(self.dropout, (int, float)) or not (0.0 <= float(self.dropout) < 1.0):
            out.append(f"dropout={self.dropout!r}: expected a probability in [0, 1)")
        if self.init not in INITS:
            out.append(f"init={self.init!r}: expected one of {INITS}")
        if isinstance(self.targets, str):
            if not self.targets:
                out.append("targets is empty: give a preset name or module-name patterns")
        elif not self.targets:
            out.append("targets is empty: give a preset name or module-name patterns")
        for pat in (self.targets if isinstance(self.targets, tuple) else ()) + tuple(self.exclude):
            out += _check_pattern(pat)
        for pat, r in self.rank_pattern.items():
            out += _check_pattern(pat) + _check_rank(f"rank_pattern[{pat!r}]", r)
        for pat, a in self.alpha_pattern.items():
            out += _check_pattern(pat) + _check_alpha(f"alpha_pattern[{pat!r}]", a)
        if self.conv_rank is not None:
            out += _check_rank("conv_rank", self.conv_rank)
        if self.conv_alpha is not None:
            out += _check_alpha("conv_alpha", self.conv_alpha)
        if self.adapter_type not in TRAINABLE:
            out.append(f"adapter_type={self.adapter_type!r}: expected one of {TRAINABLE}")
        if isinstance(self.lokr_factor, bool) or not isinstance(self.lokr_factor, int) or (
                self.lokr_factor <= 0 and self.lokr_factor != -1):
            out.append(f"lokr_factor={self.lokr_factor!r}: expected a positive integer or -1")
        if self.adapter_type != "lokr" and (self.decompose_both or self.full_rank or self.lokr_factor != -1):
            out.append(f"lokr_factor / decompose_both / full_rank are LoKr settings; adapter_type is "
                       f"{self.adapter_type!r}")
        bad_parts = [p for p in self.fused_parts if p not in FUSED_PARTS]
        if bad_parts or not self.fused_parts:
            out.append(f"fused_parts={self.fused_parts!r}: expected a non-empty subset of {FUSED_PARTS}")
        return out

    def rank_for(self, name: str, kernel_size: int = 1) -> int:
        """Rank for the module called `name` (rank_pattern first, then conv_rank for k x k convs, then rank)."""
        for pat, r in self.rank_pattern.items():
            if matches(name, pat):
                return int(r)
        if kernel_size > 1 and self.conv_rank is not None:
            return self.conv_rank
        return self.rank

    def alpha_for(self, name: str, kernel_size: int = 1) -> float:
        """Alpha for the module called `name`; defaults to its rank so that scaling is 1."""
        for pat, a in self.alpha_pattern.items():
            if matches(name, pat):
                return float(a)
        if kernel_size > 1 and self.conv_rank is not None:
            return float(self.conv_alpha if self.conv_alpha is not None else self.conv_rank)
        return float(self.alpha if self.alpha is not None else self.rank_for(name, kernel_size))

    @property
    def rule(self) -> str:
        """The scaling rule of this config: "rslora" or "lora"."""
        return rule_name(self.rslora)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/YAML friendly) of every field."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("targets", "exclude", "fused_parts"):
            d[k] = list(d[k]) if isinstance(d[k], tuple) else d[k]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoRAConfig":
        """Build from a dict; unknown keys are reported with a "did you mean" hint."""
        known = {f.name for f in fields(cls)}
        unknown = [k for k in d if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, sorted(known), n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"unknown LoRAConfig keys: {', '.join(hints)}; known keys: {', '.join(sorted(known))}")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> "LoRAConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """The paper's scaling alpha / r, or alpha / sqrt(r) for rsLoRA (computed by lora.spec.scaling)."""
    return _scaling(alpha, rank, rule_name(rslora))


def matches(name: str, pattern: str) -> bool:
    """True when module `name` matches `pattern`: "re:<regex>" (full match) or a dotted suffix."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _check_pattern(pat: Any) -> list[str]:
    if not isinstance(pat, str) or not pat:
        return [f"pattern {pat!r}: expected a non-empty string"]
    if pat.startswith("re:"):
        try:
            re.compile(pat[3:])
        except re.error as e:
            return [f"pattern {pat!r}: invalid regex ({e})"]
    return []


def _check_rank(what: str, r: Any) -> list[str]:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        return [f"{what}={r!r}: expected a positive integer"]
    return []


def _check_alpha(what: str, a: Any) -> list[str]:
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
        return [f"{what}={a!r}: expected a finite number > 0"]
    return []
