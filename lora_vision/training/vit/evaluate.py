"""Classifier evaluation: top-1 / top-5 accuracy and mean cross-entropy (scripts/train_vit.py, scripts/eval_vit.py)."""

from __future__ import annotations

from typing import Any, Callable

import torch


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, per k (k capped at the number of classes)."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hit = top == labels[:, None]
    return [int(hit[:, :min(k, logits.shape[-1])].any(dim=-1).sum()) for k in ks]


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], loader: Any, device: torch.device,
             gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (in %) and mean cross-entropy of `forward` over `loader`."""
    n = c1 = c5 = 0
    loss_sum = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = forward(x).float()
        if gather is not None:
            logits, y = gather(logits), gather(y)
        a, b = topk_correct(logits, y)
        c1, c5, n = c1 + a, c5 + b, n + y.numel()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "loss": loss_sum / max(n, 1), "n": n}
