"""Per-layer analysis of one or two adapters, collected into a JSON-ready report (Hu et al. 2021, section 7).

For every adapted weight: the update's norm (and relative to the base weight's norm), its singular values,
effective ranks, the rank keeping `energy` of its squared Frobenius norm, and, with a base model, the section 7.3
amplification numbers. For two adapters: the section 7.2 subspace similarity phi(i, j) of every shared layer.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..adapter import Adapter
from .linalg import (LowRankSVD, amplification, effective_rank, energy_rank, lowrank_svd, row_space,
                     subspace_similarity)
from .sources import BaseWeights, LayerFactors, adapter_layers

REPORT_FORMAT = "lora_vision.analysis/1"
SUBSPACES = ("A", "update")


@dataclass(frozen=True)
class AnalysisOptions:
    """What `analyze` computes."""

    energy: float = 0.99
    """Share of the update's squared Frobenius norm that the suggested rank keeps."""
    subspace: str = "A"
    """Directions compared between two adapters: "A" = right-singular vectors of A (the paper's choice, 7.2),
    "update" = right-singular vectors of the update scale * B @ A (input directions that B does not cancel)."""

    def __post_init__(self) -> None:
        if self.subspace not in SUBSPACES:
            raise ValueError(f"subspace must be one of {SUBSPACES}, got {self.subspace!r}")
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")


def _r(x: float, digits: int = 6) -> float | None:
    """Round for JSON to `digits` significant digits; NaN/Inf become None (JSON has no NaN)."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def top_singular_values(W: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest singular values of W (descending), from the eigenvalues of the smaller Gram matrix.

    The Gram product runs in float32 and the eigenvalues in float64: about 3x cheaper than svdvals(W) on SD 1.5
    weights, with |difference| < 1e-6 * sigma_1 (tests/test_analysis.py; benchmarks/analyze_cpu.py measures both).
    """
    w = W.to(torch.float32)
    g = (w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w).to(torch.float64)
    ev = torch.linalg.eigvalsh(g).flip(0)[:k]
    return ev.clamp_min(0).sqrt()


def layer_stats(f: LayerFactors, base_w: torch.Tensor | None, options: AnalysisOptions) -> tuple[dict, LowRankSVD]:
    """Numbers for one adapted weight; also returns the update's SVD for the similarity step."""
    svd = lowrank_svd(f.B, f.A, f.scaling)
    s = svd.S
    out: dict[str, Any] = {
        "rank": f.rank, "alpha": _r(f.alpha), "scaling": _r(f.scaling), "shape": list(f.shape),
        "update_norm": _r(float(torch.linalg.vector_norm(s))),
        "singular_values": [_r(float(x)) for x in s],
        "numerical_rank": svd.numerical_rank(f.shape),
        "effective_rank": _r(effective_rank(s), 4),
        "rank_90": energy_rank(s, 0.90),
        "rank_99": energy_rank(s, 0.99),
        "suggested_rank": max(1, energy_rank(s, options.energy)),
    }
    if f.kernel:
        out["kernel"] = list(f.kernel)
    if base_w is not None:
        if tuple(base_w.shape) != f.shape:
            raise ValueError(f"{f.key}: the update is {f.shape[0]} x {f.shape[1]} but the base weight is "
                             f"{base_w.shape[0]} x {base_w.shape[1]}; is --base the model this adapter was trained on?")
        k = svd.numerical_rank(f.shape)
        amp = amplification(base_w, svd, k=k, base_svdvals=top_singular_values(base_w, max(k, 1)))
        out["base_norm"] = _r(amp["base_norm"])
        out["relative_norm"] = _r(out["update_norm"] / out["base_norm"]) if out["base_norm"] else None
        out["amplification"] = {k2: (_r(v) if isinstance(v, float) else v) for k2, v in amp.items()
                                if k2 not in ("update_norm", "base_norm")}
    return out, svd


def _summary(layers: dict[str, dict]) -> dict[str, Any]:
    def med(name: str, sub: str | None = None) -> float | None:
        vals = [(v[name][sub] if sub else v[name]) for v in layers.values() if name in v]
        vals = [x for x in vals if x is not None]
        return _r(statistics.median(vals), 4) if vals else None

    out = {"layers": len(layers), "median_effective_rank": med("effective_rank"),
           "median_rank_90": med("rank_90"), "median_rank_99": med("rank_99"),
           "median_update_norm": med("update_norm")}
    if any("relative_norm" in v for v in layers.values()):
        out["median_relative_norm"] = med("relative_norm")
        out["median_amplification"] = med("amplification", "amplification")
    return out


def analyze(adapters: Sequence[tuple[str, Adapter]], base: BaseWeights | None = None,
            options: AnalysisOptions = AnalysisOptions(), progress: bool | None = None,
            paths: Sequence[str] | None = None) -> dict[str, Any]:
    """Analyse one or two adapters (given as (label, Adapter) pairs); returns the JSON-ready report.

    `progress`: show a progress bar (None: only on a terminal).
    """
    from tqdm.auto import tqdm

    if not 1 <= len(adapters) <= 2:
        raise ValueError(f"analyze takes one or two adapters, got {len(adapters)}")
    factors = [adapter_layers(a, base) for _, a in adapters]
    total = sum(len(f) for f in factors)
    report: dict[str, Any] = {"format": REPORT_FORMAT, "energy": options.energy,
                              "base": base.description if base is not None else None, "adapters": []}
    svds: list[dict[str, LowRankSVD]] = []
    disable = (not progress) if progress is not None else None  # None: tqdm shows the bar on a terminal only
    with tqdm(total=total, desc="analyze", unit="layer", disable=disable) as bar:
        for idx, ((label, _), layers) in enumerate(zip(adapters, factors)):
            stats, svd_of, missing = {}, {}, []
            for key, f in layers.items():
                bw = base.weight(key, f.shape[0]) if base is not None else None
                if base is not None and bw is None:
                    missing.append(key)
                stats[key], svd_of[key] = layer_stats(f, bw, options)
                bar.update(1)
            if base is not None and len(missing) == len(layers):
                raise ValueError(f"--base {base.description} has none of the {len(layers)} weights adapted by "
                                 f"{label!r} (first: {missing[:3]}); is it the model the adapter was trained on?")
            entry = {"label": label, "path": paths[idx] if paths else None, "summary": _summary(stats),
                     "layers": stats}
            if missing:
                entry["base_missing"] = missing
            report["adapters"].append(entry)
            svds.append(svd_of)
    report["similarity"] = similarity(factors, svds, options) if len(adapters) == 2 else None
    return report


def similarity(factors: Sequence[dict[str, LayerFactors]], svds: Sequence[dict[str, LowRankSVD]],
               options: AnalysisOptions) -> dict[str, Any]:
    """phi(i, j) per layer present in both adapters (section 7.2), with which directions were compared."""
    shared = [k for k in factors[0] if k in factors[1]]
    layers: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for key in shared:
        fa, fb = factors[0][key], factors[1][key]
        if fa.A.shape[1] != fb.A.shape[1]:
            skipped[key] = f"input sizes differ ({fa.A.shape[1]} vs {fb.A.shape[1]})"
            continue
        if options.subspace == "A":
            va, vb = row_space(fa.A).V, row_space(fb.A).V
        else:
            va, vb = svds[0][key].V, svds[1][key].V
        phi = subspace_similarity(va, vb)
        n = min(phi.shape)
        layers[key] = {"input_dim": int(fa.A.shape[1]), "phi": [[round(float(x), 4) for x in row] for row in phi],
                       "phi_diag": [round(float(phi[i, i]), 4) for i in range(n)],
                       "mean_phi": round(float(phi.mean()), 4)}
    return {"space": options.subspace, "layers": layers,
            "only_first": [k for k in factors[0] if k not in factors[1]],
            "only_second": [k for k in factors[1] if k not in factors[0]], "skipped": skipped}


def suggested_ranks(report: dict[str, Any], adapter_index: int = 0) -> dict[str, int]:
    """{layer key: rank} keeping `energy` of each update (keys as in Adapter.ranks(): component.module[.part])."""
    return {k: int(v["suggested_rank"]) for k, v in report["adapters"][adapter_index]["layers"].items()}
