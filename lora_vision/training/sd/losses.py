"""Diffusion training targets and losses: forward noising, epsilon / v targets, min-SNR-gamma weights, prior loss.

Everything works on device tensors without host syncs, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch


def alphas_cumprod(scheduler: object, device: torch.device | str) -> torch.Tensor:
    """The scheduler's cumulative alpha products (float32, on `device`)."""
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod; expected a DDPM-style scheduler")
    return torch.as_tensor(ac, dtype=torch.float32).to(device)


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return values[t].reshape(-1, *([1] * (ndim - 1)))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (DDPM forward process), computed in float32, returned as latents."""
    a = _gather(ac, t, latents.dim())
    return (a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()).to(latents.dtype)


def target_for(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
               ac: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 (Salimans & Ho 2022)."""
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "v_prediction":
        a = _gather(ac, t, latents.dim())
        return a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")


def snr(t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) at timesteps t."""
    a = ac[t]
    return a / (1 - a)


def min_snr_weights(t: torch.Tensor, ac: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023, https://arxiv.org/abs/2303.09556).

    epsilon: min(SNR, gamma) / SNR; v-prediction: min(SNR, gamma) / (SNR + 1).
    """
    s = snr(t, ac)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1) if prediction_type == "v_prediction" else clipped / s


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                   n_instance: int | None = None, prior_loss_weight: float = 1.0) -> torch.Tensor:
    """Mean squared error per sample (float32), optionally weighted; with `n_instance`, the samples after the
    first n_instance are class images and add prior_loss_weight x their mean loss (DreamBooth prior preservation).
    """
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if weights is not None:
        per_sample = per_sample * weights
    if n_instance is None or n_instance >= per_sample.shape[0]:
        return per_sample.mean()
    return per_sample[:n_instance].mean() + prior_loss_weight * per_sample[n_instance:].mean()
