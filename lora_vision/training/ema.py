"""An exponential moving average of the trained weights (both recipes' --use_ema).

After every optimizer step: ema = decay * ema + (1 - decay) * weight, for each trained parameter. The average is
what validation images are drawn with and what is saved beside the plain adapter (adapter_ema.safetensors); its
tensors go into each checkpoint so a resumed run continues the same average.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Sequence

import torch


class EMA:
    """The moving average of `params` (float32 copies on `device`: the parameters' own device, or the CPU to save
    accelerator memory at the price of one copy to the host per step)."""

    def __init__(self, params: Sequence[torch.Tensor], decay: float, device: torch.device | str | None = None) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"ema decay {decay}: expected a number in (0, 1), e.g. 0.999")
        self.params, self.decay = list(params), float(decay)
        self.shadow = [p.detach().to(device or p.device, torch.float32, copy=True) for p in self.params]
        self.on_host = device is not None and torch.device(device).type == "cpu" and any(
            p.device.type != "cpu" for p in self.params)

    @torch.no_grad()
    def update(self) -> None:
        """Move the average one step towards the current weights (no host sync unless the copies live on the CPU)."""
        current = [p.detach().to(s.device, torch.float32) for p, s in zip(self.params, self.shadow)]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Inside the block the parameters hold the average; the trained weights are put back bit for bit after."""
        saved = [p.detach().clone() for p in self.params]
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)
        try:
            yield
        finally:
            for p, v in zip(self.params, saved):
                p.copy_(v)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The average as named CPU tensors (`ema.<index>`), for checkpoints."""
        return {f"ema.{i}": s.detach().cpu().contiguous() for i, s in enumerate(self.shadow)}

    @torch.no_grad()
    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor], where: str = "the checkpoint") -> None:
        """Put back an average written by state_tensors; ValueError naming `where` when it does not fit."""
        want = {f"ema.{i}": tuple(s.shape) for i, s in enumerate(self.shadow)}
        have = {k: tuple(v.shape) for k, v in tensors.items()}
        if want != have:
            raise ValueError(f"{where} holds an EMA of {len(have)} tensors that does not fit this run's {len(want)} "
                             "trained tensors; resume with the same settings, or use a new output_dir")
        for i, s in enumerate(self.shadow):
            s.copy_(tensors[f"ema.{i}"])
