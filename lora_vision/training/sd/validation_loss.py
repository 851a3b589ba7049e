"""The validation loss: the diffusion loss on held-out images at fixed timesteps and fixed noise.

Training losses jump from step to step because each step draws its own timesteps and noise; here every image is
noised once at each of a fixed set of timesteps with noise drawn once from a seeded generator, and its latent is the
mean of the VAE's distribution, so the number changes only when the weights do. Plain mean squared error (no min-SNR
weighting, no offset noise), so it reads the same whatever the training loss options are.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import torch
from torch import nn

from .caching import BucketCache, TextTable
from .step import Inputs, StepSettings, step_loss

# Where on the noise schedule the loss is measured, as fractions of the number of training timesteps.
TIMESTEP_FRACTIONS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)


def fixed_batches(caches: Mapping[tuple[int, int], BucketCache], levels: torch.Tensor, batch_size: int,
                  seed: int) -> list[Inputs]:
    """Every held-out image at every noise level of `levels` (timesteps, or a DiT's sigmas), each with noise drawn
    once from a generator seeded with `seed`, in batches of at most batch_size (one bucket per batch)."""
    batches: list[Inputs] = []
    for cache in caches.values():
        dev, n = cache.mean.device, cache.mean.shape[0]
        generator = torch.Generator(device=dev).manual_seed(seed)
        rows = torch.arange(n, device=dev).repeat(levels.shape[0])
        t = levels.to(dev).repeat_interleave(n)
        noise = torch.randn((rows.shape[0], *cache.mean.shape[1:]), generator=generator, device=dev,
                            dtype=cache.mean.dtype)
        for a in range(0, rows.shape[0], batch_size):
            r = rows[a:a + batch_size]
            batches.append(Inputs(cache.mean[r], noise[a:a + batch_size], t[a:a + batch_size],
                                  cache.text_row[r], cache.time_ids[r], r.shape[0]))
    return batches


@torch.no_grad()
def mean_loss(modules: list[nn.Module], batches: list[Inputs], loss_of: Callable[[Inputs], torch.Tensor]
              ) -> torch.Tensor:
    """The mean of `loss_of` over the samples of `batches` with `modules` in eval mode (restored after)."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()  # no dropout: the same weights give the same number
    try:
        total = sum(loss_of(x) * x.latents.shape[0] for x in batches)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return total / sum(x.latents.shape[0] for x in batches)


class ValidationLoss:
    """Call with nothing: the mean loss over every held-out image x timestep, a device scalar (no host sync)."""

    def __init__(self, unet: nn.Module, caches: Mapping[tuple[int, int], BucketCache], table: TextTable,
                 text_encoders: list, ac: torch.Tensor, settings: StepSettings, dtype: torch.dtype,
                 batch_size: int, seed: int) -> None:
        self.unet, self.table, self.text_encoders, self.ac, self.dtype = unet, table, text_encoders, ac, dtype
        self.settings = dataclasses.replace(settings, snr_gamma=None, noise_offset=0.0, loss_type="l2",
                                            debiased_estimation=False, multires_noise_iterations=0)
        steps = [min(settings.num_timesteps - 1, int(f * settings.num_timesteps)) for f in TIMESTEP_FRACTIONS]
        self.batches = fixed_batches(caches, torch.tensor(steps), batch_size, seed)
        self.count = sum(x.latents.shape[0] for x in self.batches)

    def __call__(self) -> torch.Tensor:
        return mean_loss([self.unet, *self.text_encoders], self.batches,
                         lambda x: step_loss(self.unet, x, self.table, self.text_encoders, self.ac, self.settings,
                                             self.dtype))
