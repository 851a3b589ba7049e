"""Optimizers (AdamW, fused on CUDA; 8-bit AdamW from bitsandbytes) and learning-rate schedules with warm-up."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

SCHEDULES: tuple[str, ...] = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                              "polynomial")


def build_optimizer(groups: list[dict], *, betas: tuple[float, float], weight_decay: float, eps: float,
                    use_8bit: bool = False, capturable: bool = False) -> torch.optim.Optimizer:
    """AdamW over parameter groups ({"params": [...], "lr": float}).

    On CUDA the fused kernel is used; `capturable=True` keeps step counters and the learning rate on the device
    (lr becomes a tensor) so the optimizer step can be captured in a CUDA graph. `use_8bit` uses bitsandbytes'
    AdamW8bit, which must be installed.
    """
    if use_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ImportError("use_8bit_adam needs bitsandbytes, which is not installed; "
                              "`pip install bitsandbytes` or drop --use_8bit_adam") from err
        return bnb.optim.AdamW8bit(groups, betas=betas, weight_decay=weight_decay, eps=eps)
    params = [p for g in groups for p in g["params"]]
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    if on_cuda and capturable:
        groups = [dict(g, lr=torch.tensor(float(g["lr"]), device=params[0].device)) for g in groups]
        return torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay, eps=eps, fused=True,
                                 capturable=True)
    return torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay, eps=eps,
                             fused=True if on_cuda else None, foreach=None if on_cuda else False)


@dataclass(frozen=True)
class LRSchedule:
    """Learning-rate factor per optimizer step, as diffusers' get_scheduler computes it (warm-up from 0)."""

    name: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 1
    num_cycles: int = 1
    power: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown lr_scheduler {self.name!r}; expected one of {', '.join(SCHEDULES)}")

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate for the update made at 0-based optimizer step `step`."""
        warm = self.warmup_steps if self.name != "constant" else 0
        if step < warm:
            return float(step) / max(1, warm)
        if self.name in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warm) / max(1, self.total_steps - warm)
        if self.name == "linear":
            return max(0.0, 1.0 - progress)
        if self.name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if self.name == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((self.num_cycles * progress) % 1.0))))
        remaining = max(0.0, 1.0 - progress)  # polynomial decay to 0
        return remaining ** self.power

    def apply(self, optimizer: torch.optim.Optimizer, base_lrs: list[float], step: int) -> float:
        """Set each group's lr to base_lr x factor(step) (in place when lr is a device tensor); returns the factor."""
        f = self.factor(step)
        for group, base in zip(optimizer.param_groups, base_lrs):
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(base * f)
            else:
                group["lr"] = base * f
        return f


def loraplus_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], lr: float,
                    ratio: float | None = None) -> list[dict]:
    """Optimizer parameter groups for LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): every LoRA B
    matrix (a parameter named `...lora_B...`) learns at `ratio` x `lr`, everything else (A, heads, biases) at `lr`.

    With `ratio` None (or 1) it is one group at `lr`. Give only the parameters to train, e.g.
    `[(n, p) for n, p in model.named_parameters() if p.requires_grad]`; pass the groups to `build_optimizer` and
    their lrs (`[g["lr"] for g in groups]`) to `LRSchedule.apply`, so the schedule keeps the ratio.
    """
    named = list(named_params)
    if ratio is None or ratio == 1:
        return [{"params": [p for _, p in named], "lr": lr}]
    if not ratio > 0:
        raise ValueError(f"loraplus_lr_ratio={ratio}: expected a number > 0")
    is_b = ["lora_B" in n.split(".") for n, _ in named]
    if not any(is_b):
        raise ValueError("loraplus_lr_ratio is set but no trainable parameter is a LoRA B matrix (lora_B); "
                         "it applies to LoRA training only")
    return [{"params": [p for (_, p), b in zip(named, is_b) if not b], "lr": lr},
            {"params": [p for (_, p), b in zip(named, is_b) if b], "lr": lr * ratio}]
