"""Pure bf16 training: the model runs in bf16 and the optimizer steps fp32 master copies of what trains."""

from __future__ import annotations

import torch
from torch import nn


class MasterWeights:
    """fp32 master copies of half-precision trainable parameters, for pure bf16 training (no autocast at all).

    The whole model, activations included, runs in bf16, so no op casts and no fp32 residual stream is written;
    the optimizer steps the fp32 copies. `grads_to_master` adds the model's gradients into the copies (micro-batches
    accumulate in fp32) and `master_to_model` writes the updated values back into the model.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = list(params)
        self.master = [nn.Parameter(p.detach().float().clone()) for p in self.params]

    def grads_to_master(self) -> None:
        """Move (and add) the model's gradients into the fp32 copies; the model's gradients are cleared."""
        for m, p in zip(self.master, self.params):
            if p.grad is not None:
                g = p.grad.float()
                m.grad = g if m.grad is None else m.grad.add_(g)
                p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        """Copy the fp32 values into the model's parameters (rounded to their dtype)."""
        torch._foreach_copy_(self.params, self.master)
