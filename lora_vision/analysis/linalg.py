"""The linear algebra behind `lora-vision analyze` (Hu et al. 2021, section 7, https://arxiv.org/abs/2106.09685).

Everything works from the small factors: the update is scale * B @ A with B (m, r) and A (r, n), so its SVD comes
from two thin QR factorisations and the SVD of an r x r core, never from the m x n product. Math runs in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class LowRankSVD:
    """Thin SVD of a low-rank matrix: M = U @ diag(S) @ V.T with U (m, k), S (k,) descending, V (n, k)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    def numerical_rank(self, shape: tuple[int, int] | None = None) -> int:
        """Number of singular values above max(m, n) * eps(float32) * S[0] (the factors are stored in fp32)."""
        if self.S.numel() == 0 or float(self.S[0]) == 0.0:
            return 0
        m, n = shape if shape is not None else (self.U.shape[0], self.V.shape[0])
        tol = max(m, n) * torch.finfo(torch.float32).eps * float(self.S[0])
        return int((self.S > tol).sum())


def lowrank_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> LowRankSVD:
    """SVD of scale * B @ A from its factors B (m, r) and A (r, n), in float64.

    B = Q_B R_B and A.T = Q_A R_A (thin QR), so B @ A = Q_B (R_B R_A^T) Q_A^T; the SVD of the small core
    R_B R_A^T = U_c S V_c^T gives U = Q_B U_c and V = Q_A V_c. Cost O((m + n) r^2 + r^3) instead of O(m n r).
    """
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"lowrank_svd needs B (m, r) and A (r, n); got B {tuple(B.shape)} and A {tuple(A.shape)}")
    qb, rb = torch.linalg.qr(B.detach().to(torch.float64))
    qa, ra = torch.linalg.qr(A.detach().to(torch.float64).T)
    uc, s, vch = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    s = s * abs(scale)
    u = qb @ uc
    if scale < 0:
        u = -u
    return LowRankSVD(U=u, S=s, V=qa @ vch.T)


def row_space(A: torch.Tensor) -> LowRankSVD:
    """SVD of A (r, n) itself; V holds its right-singular vectors, the input directions the paper compares (7.2)."""
    return lowrank_svd(torch.eye(A.shape[0], dtype=torch.float64), A)


def effective_rank(s: torch.Tensor) -> float:
    """Entropy effective rank exp(H(p)) with p = s / sum(s) (Roy & Vetterli 2007).

    Equals k for k equal non-zero singular values and is between 1 and k otherwise; 0 for a zero matrix.
    """
    s = s.to(torch.float64)
    total = float(s.sum())
    if total <= 0.0:
        return 0.0
    p = s[s > 0] / total
    return float(math.exp(-float((p * p.log()).sum())))


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k with sum(s[:k]^2) >= energy * sum(s^2): the rank keeping that share of ||M||_F^2."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    e = s.to(torch.float64) ** 2
    total = float(e.sum())
    if total <= 0.0:
        return 0
    cum = torch.cumsum(e, 0) / total
    # A tiny slack so that energy=1.0 is reached despite rounding in the cumulative sum.
    return min(int((cum < energy - 1e-12).sum()) + 1, int(s.numel()))


def subspace_similarity(V1: torch.Tensor, V2: torch.Tensor) -> torch.Tensor:
    """phi[i-1, j-1] = ||V1[:, :i]^T V2[:, :j]||_F^2 / min(i, j) for orthonormal columns V1 (n, r1), V2 (n, r2).

    The normalized subspace similarity of the paper (section 7.2): 1 when one top subspace contains the other,
    0 when they are orthogonal. Computed for the whole grid at once from cumulative sums of (V1^T V2)^2.
    """
    if V1.shape[0] != V2.shape[0]:
        raise ValueError(f"subspaces live in different spaces: {V1.shape[0]} vs {V2.shape[0]} dimensions")
    m = (V1.to(torch.float64).T @ V2.to(torch.float64)) ** 2
    cum = m.cumsum(0).cumsum(1)
    i = torch.arange(1, m.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, m.shape[1] + 1, dtype=torch.float64)[None, :]
    return cum / torch.minimum(i, j)


def random_orthonormal(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """n x k matrix with orthonormal columns spanning a uniformly random k-dimensional subspace."""
    q, r = torch.linalg.qr(torch.randn(n, k, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def projection_norm(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """||U^T W V||_F: how much of W acts between the subspaces spanned by U (m, k) and V (n, k)."""
    return float(torch.linalg.matrix_norm(U.T @ W.to(torch.float64) @ V))


def random_projection_norm(W: torch.Tensor, k: int, draws: int = 4, seed: int = 0) -> float:
    """Root-mean-square of ||U^T W V||_F over `draws` pairs of uniformly random k-dimensional subspaces (sampled)."""
    gen = torch.Generator().manual_seed(seed)
    m, n = W.shape
    w = W.to(torch.float64)
    sq = [projection_norm(w, random_orthonormal(m, k, gen), random_orthonormal(n, k, gen)) ** 2 for _ in range(draws)]
    return math.sqrt(sum(sq) / len(sq))


def amplification(W: torch.Tensor, update: LowRankSVD, k: int | None = None,
                  base_svdvals: torch.Tensor | None = None) -> dict[str, float]:
    """The paper's section 7.3 comparison for one layer with base weight W (m, n) and update SVD `update`.

    With U, V the update's top-k singular vectors (k = its numerical rank unless given):
      - `proj_update` = ||U^T W V||_F (how strongly W acts along the update's directions),
      - `proj_base_top` = the same for W's own top-k directions, i.e. sqrt(sum of W's k largest sigma^2),
      - `proj_random` = the same for random directions: sqrt(E ||U^T W V||_F^2) = k ||W||_F / sqrt(m n) over
        uniformly random k-dimensional subspaces (exact, since E[V V^T] = (k / n) I; sampled subspaces concentrate
        around it, see `random_projection_norm` and the tests),
      - `amplification` = ||dW||_F / proj_update: a large factor means the update amplifies directions W does not
        emphasise (the paper reports about 21 for GPT-3 W_q at r = 4).
    `base_svdvals`: W's singular values in descending order, at least k of them (computed when not given).
    """
    m, n = W.shape
    if update.U.shape[0] != m or update.V.shape[0] != n:
        raise ValueError(f"update is {update.U.shape[0]} x {update.V.shape[0]} but the base weight is {m} x {n}")
    k = update.numerical_rank((m, n)) if k is None else min(k, update.S.numel())
    w = W.to(torch.float64)
    upd_norm = float(torch.linalg.vector_norm(update.S))
    base_norm = float(torch.linalg.matrix_norm(w))
    if k == 0:
        return {"k": 0, "update_norm": upd_norm, "base_norm": base_norm, "proj_update": 0.0, "proj_base_top": 0.0,
                "proj_random": 0.0, "amplification": float("nan")}
    proj = projection_norm(w, update.U[:, :k], update.V[:, :k])
    sv = torch.linalg.svdvals(w) if base_svdvals is None else base_svdvals.to(torch.float64)
    return {
        "k": k,
        "update_norm": upd_norm,
        "base_norm": base_norm,
        "proj_update": proj,
        "proj_base_top": float(torch.linalg.vector_norm(sv[:k])),
        "proj_random": k * base_norm / math.sqrt(m * n),
        "amplification": upd_norm / proj if proj > 0 else float("inf"),
    }
