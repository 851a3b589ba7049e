"""The rectified-flow (flow-matching) objective of the DiT families: noise levels, their sampling, loss weights.

A noise level sigma in (0, 1] mixes an image latent x0 with noise: x_sigma = (1 - sigma) x0 + sigma noise; the
transformer predicts the velocity noise - x0. Noise levels are drawn the way diffusers' examples
(train_dreambooth_lora_flux.py / _sd3.py and diffusers.training_utils) draw them: a number u in [0, 1) from
the chosen density picks an entry of the scheduler's table of training sigmas (which already holds the static
shift of SD 3.x and Z-Image), and sigma_sqrt / cosmap weigh the per-sample losses. Families whose scheduler shifts
by image size at inference (use_dynamic_shifting: Flux.1, Flux.2, Qwen-Image) can shift the training sigmas the
same way (Esser et al. 2024, https://arxiv.org/abs/2403.03206, section 5.3.2). Everything runs on device tensors
without host syncs, so the step can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

WEIGHTING_SCHEMES: tuple[str, ...] = ("none", "uniform", "logit_normal", "mode", "sigma_sqrt", "cosmap")


@dataclass(frozen=True)
class ResolutionShift:
    """The scheduler's image-size shift: mu grows linearly from base_shift at base_seq_len image tokens to
    max_shift at max_seq_len, and sigma becomes e^mu / (e^mu + 1/sigma - 1)."""

    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    @classmethod
    def of(cls, scheduler_config: dict) -> "ResolutionShift | None":
        """The shift of a FlowMatchEulerDiscreteScheduler config, or None when it does not shift by image size."""
        if not scheduler_config.get("use_dynamic_shifting", False):
            return None
        keys = {"base_seq_len": "base_image_seq_len", "max_seq_len": "max_image_seq_len",
                "base_shift": "base_shift", "max_shift": "max_shift"}
        default = cls()
        return cls(**{k: type(getattr(default, k))(scheduler_config.get(c) or getattr(default, k))
                      for k, c in keys.items()})

    def mu(self, image_seq_len: int) -> float:
        """The log-shift at `image_seq_len` image tokens."""
        slope = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        return image_seq_len * slope + self.base_shift - slope * self.base_seq_len

    def apply(self, sigmas: torch.Tensor, image_seq_len: int) -> torch.Tensor:
        """Shifted noise levels (sigma = 1 stays 1; larger images get more noise)."""
        e = math.exp(self.mu(image_seq_len))
        return e / (e + (1 / sigmas - 1))


def training_sigmas(scheduler_config: dict, device: torch.device | str) -> torch.Tensor:
    """The table of training noise levels of a FlowMatchEulerDiscreteScheduler config (a fresh scheduler: the
    pipeline's own one is changed by every generation), float32 on `device`, from the highest level down."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    return torch.as_tensor(scheduler.sigmas, dtype=torch.float32)[: scheduler.config.num_train_timesteps].to(device)


def sample_density(scheme: str, n: int, generator: torch.Generator, logit_mean: float = 0.0, logit_std: float = 1.0,
                   mode_scale: float = 1.29, device: torch.device | str = "cpu") -> torch.Tensor:
    """n numbers u in [0, 1) that pick the noise levels: logit_normal (sigmoid of N(logit_mean, logit_std)),
    mode (Esser et al. 2024, eq. 20, with mode_scale), else uniform."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator, device=device) * logit_std + logit_mean)
    u = torch.rand(n, generator=generator, device=device)
    if scheme == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def pick_sigmas(u: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The noise levels u selects from the training table (index floor(u x len), as the reference)."""
    index = (u * table.shape[0]).long().clamp(0, table.shape[0] - 1)
    return table[index]


def loss_weights(scheme: str, sigmas: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weights: sigma_sqrt 1/sigma^2, cosmap 2 / (pi (1 - 2 sigma + 2 sigma^2)); None (all 1) else."""
    if scheme == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas.float() + 2 * sigmas.float() ** 2))
    return None


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """(1 - sigma) x0 + sigma noise, per sample, in float32."""
    s = sigmas.float().reshape(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0.float() + s * noise.float()


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the transformer predicts: noise - x0 (float32)."""
    return noise.float() - x0.float()


def denoised(velocity: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The clean latent a velocity prediction implies, x_sigma - sigma v (float32): the preconditioned output of
    diffusers' train_dreambooth_lora_sd3.py (--precondition_outputs, after Karras et al. 2022, section 5,
    https://arxiv.org/abs/2206.00364), trained against x0. Its squared error is the velocity's times sigma^2."""
    s = sigmas.float().reshape(-1, *([1] * (noisy.dim() - 1)))
    return noisy.float() - s * velocity.float()
