"""Optimizers (AdamW, fused on CUDA; 8-bit AdamW from bitsandbytes; Prodigy; schedule-free AdamW; Adafactor),
LoRA+ and per-block parameter groups, and learning-rate schedules with warm-up."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from .optim_graph import GRAPH_OPTIMIZERS

SCHEDULES: tuple[str, ...] = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                              "polynomial")


OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit", "prodigy", "schedulefree", "adafactor")
# The package each optional optimizer needs, and the pip line that installs it (the extras pin the tested versions).
_OPTIONAL: dict[str, tuple[str, str]] = {"adamw8bit": ("bitsandbytes", "pip install bitsandbytes"),
                                         "prodigy": ("prodigyopt", 'pip install "lora_vision[prodigy]"'),
                                         "schedulefree": ("schedulefree", 'pip install "lora_vision[schedulefree]"')}


def _optional_module(name: str):
    package, install = _OPTIONAL[name]
    try:
        return __import__(package)
    except ImportError as err:
        raise ImportError(f"--optimizer {name} needs the package {package}, which is not installed; `{install}` or "
                          f"choose another --optimizer ({', '.join(OPTIMIZERS)})") from err


def build_optimizer(groups: list[dict], *, betas: tuple[float, float], weight_decay: float, eps: float,
                    use_8bit: bool = False, capturable: bool = False, name: str = "adamw") -> torch.optim.Optimizer:
    """The optimizer `name` (one of OPTIMIZERS) over parameter groups ({"params": [...], "lr": float}).

    adamw: on CUDA the fused kernel is used; `capturable=True` keeps step counters and the learning rate on the
    device (lr becomes a tensor) so the optimizer step can be captured in a CUDA graph. With `capturable=True`,
    prodigy, schedulefree and adafactor are the re-implementations of training/optim_graph.py (the same updates
    and state_dict layout as the packages, no host reads inside the step; the package is then not needed).
    adamw8bit (or `use_8bit`): bitsandbytes' AdamW8bit. prodigy: prodigyopt's Prodigy (learning rates near 1.0;
    it estimates the step size). schedulefree: schedulefree's AdamWScheduleFree, returned in train mode (see
    `eval_mode`). adafactor: torch's Adafactor (factored second moments; betas and eps are not used). A missing
    package is an ImportError naming it.
    """
    name = "adamw8bit" if use_8bit else name
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    if capturable and name in GRAPH_OPTIMIZERS:  # the same updates, with no host reads inside the step
        kwargs = {"weight_decay": weight_decay} if name == "adafactor" else dict(betas=betas,
                                                                                 weight_decay=weight_decay, eps=eps)
        optimizer = GRAPH_OPTIMIZERS[name](groups, **kwargs)
        if name == "schedulefree":
            optimizer.train()
        return optimizer
    if name == "adamw8bit":
        bnb = _optional_module(name)
        return bnb.optim.AdamW8bit(groups, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "prodigy":
        return _optional_module(name).Prodigy(groups, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "schedulefree":
        optimizer = _optional_module(name).AdamWScheduleFree(groups, betas=betas, weight_decay=weight_decay, eps=eps)
        optimizer.train()  # it refuses to step in eval mode, its initial state
        return optimizer
    if name == "adafactor":
        return torch.optim.Adafactor(groups, weight_decay=weight_decay, foreach=False)
    params = [p for g in groups for p in g["params"]]
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    if on_cuda and capturable:
        groups = [dict(g, lr=torch.tensor(float(g["lr"]), device=params[0].device)) for g in groups]
        return torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay, eps=eps, fused=True,
                                 capturable=True)
    return torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay, eps=eps,
                             fused=True if on_cuda else None, foreach=None if on_cuda else False)


@contextlib.contextmanager
def eval_mode(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Inside the block the parameters hold the weights to evaluate and save. Schedule-free optimizers train on an
    interpolation of two sequences and evaluate on their average (Defazio et al. 2024, arXiv:2405.15682):
    optimizer.eval() swaps the average in and optimizer.train() swaps back; other optimizers, and an optimizer
    already in eval mode (a nested block), are left alone."""
    swap = callable(getattr(optimizer, "eval", None)) and callable(getattr(optimizer, "train", None)) and any(
        g.get("train_mode") for g in optimizer.param_groups)  # nested blocks: only the outermost swaps
    if swap:
        optimizer.eval()
    try:
        yield
    finally:
        if swap:
            optimizer.train()


def loraplus_param_groups(model_or_params: nn.Module | Iterable[tuple[str, torch.Tensor]], lr: float,
                          ratio: float | None, weight_decay: float | None = None) -> list[dict]:
    """LoRA+ (Hayou et al. 2024, arXiv:2402.12354): the LoRA B matrices learn at `lr * ratio`, everything else
    (A, a new head, biases) at `lr` (B learns faster; the paper suggests ratios around 16). The one LoRA+ rule of
    both recipes.

    `model_or_params` is a module (its parameters that require grad) or (name, parameter) pairs; a parameter is a
    B matrix when its name has a `lora_B` part. With `ratio` None (or 1) it is one group at `lr`. `weight_decay`
    (when given) is set on every group. Empty groups are left out; each group has a "name" ("lora", or "lora_A" /
    "lora_B") for logs. Pass the groups to `build_optimizer` and their lrs to `LRSchedule.apply`, so the schedule
    keeps the ratio."""
    pairs = ([(n, p) for n, p in model_or_params.named_parameters() if p.requires_grad]
             if isinstance(model_or_params, nn.Module) else list(model_or_params))
    extra = {} if weight_decay is None else {"weight_decay": weight_decay}
    if ratio is None or ratio == 1:
        return [{"name": "lora", "params": [p for _, p in pairs], "lr": lr, **extra}]
    if not ratio > 0:
        raise ValueError(f"loraplus_lr_ratio={ratio}: expected a number > 0")
    is_b = ["lora_B" in n.split(".") for n, _ in pairs]
    if not any(is_b):
        raise ValueError("loraplus_lr_ratio is set but no trainable parameter is a LoRA B matrix (lora_B); "
                         "it applies to LoRA training only")
    groups = [{"name": "lora_A", "params": [p for (_, p), b in zip(pairs, is_b) if not b], "lr": lr, **extra},
              {"name": "lora_B", "params": [p for (_, p), b in zip(pairs, is_b) if b], "lr": lr * ratio, **extra}]
    return [g for g in groups if g["params"]]


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

