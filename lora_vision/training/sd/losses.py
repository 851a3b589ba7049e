"""Diffusion training targets and losses: forward noising, epsilon / v targets, min-SNR-gamma and debiased-estimation
weights, L2 / L1 / Huber / smooth-L1 losses with their timestep schedule, multires (pyramid) noise, masks, prior loss.

Everything works on device tensors without host syncs, so it can be captured in a CUDA graph. The loss options
follow kohya sd-scripts' definitions (library/train_util.py `get_huber_threshold_if_needed`, `conditional_loss`;
library/custom_train_functions.py `pyramid_noise_like`, `apply_debiased_estimation`, `apply_masked_loss`), so a
run here and a kohya run with the same flags optimise the same objective.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

LOSS_TYPES: tuple[str, ...] = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES: tuple[str, ...] = ("constant", "exponential", "snr")


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


def debiased_weights(t: torch.Tensor, ac: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Per-sample weights of debiased estimation (Yu et al. 2023, https://arxiv.org/abs/2310.08442), as kohya:
    1 / sqrt(SNR) for epsilon, 1 / (SNR + 1) for v-prediction, with SNR capped at 1000 (it is infinite at t = 0)."""
    s = torch.clamp(snr(t, ac), max=1000.0)
    return 1 / (s + 1) if prediction_type == "v_prediction" else 1 / s.sqrt()


def huber_threshold(t: torch.Tensor, ac: torch.Tensor, huber_c: float, schedule: str) -> torch.Tensor:
    """Per-sample Huber threshold c_t (kohya's `get_huber_threshold_if_needed`, huber_scale 1).

    constant: c. exponential: exp(-a t) with a = -ln(c) / T, so 1 at t = 0 and c at t = T. snr: (1 - c) / (1 + sigma)^2
    + c with sigma = sqrt((1 - a_t) / a_t): about 1 for clean samples, down to c for noisy ones.
    """
    if schedule == "constant":
        return torch.full(t.shape, huber_c, device=t.device, dtype=torch.float32)
    if schedule == "exponential":
        return torch.exp(t.float() * (math.log(huber_c) / ac.shape[0]))
    if schedule == "snr":
        a = ac[t]
        sigma = ((1 - a) / a).sqrt()
        return (1 - huber_c) / (1 + sigma) ** 2 + huber_c
    raise ValueError(f"unknown huber_schedule {schedule!r}; expected one of {', '.join(HUBER_SCHEDULES)}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of every element (float32), kohya's `conditional_loss` without reduction.

    huber: 2 c (sqrt(d^2 + c^2) - c), which tends to d^2 (= l2) as c grows and to 2 c |d| as c shrinks; smooth_l1:
    2 (sqrt(d^2 + c^2) - c), about 2 |d| for small c. `huber_c` holds one c per sample. sqrt(d^2 + c^2) - c is computed
    as d^2 / (sqrt(d^2 + c^2) + c), the same number without the cancellation that loses it in float32 at large c.
    """
    d = pred.float() - target.float()
    if loss_type == "l2":
        return d.pow(2)
    if loss_type == "l1":
        return d.abs()
    if loss_type not in ("huber", "smooth_l1"):
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs huber_c (one threshold per sample, see huber_threshold)")
    c = huber_c.float().reshape(-1, *([1] * (d.dim() - 1)))
    d2 = d.pow(2)
    soft = d2 / ((d2 + c * c).sqrt() + c)
    return 2 * c * soft if loss_type == "huber" else 2 * soft


def multires_noise(noise: torch.Tensor, generator: torch.Generator, iterations: int, discount: float,
                   stretches: Sequence[float]) -> torch.Tensor:
    """Multires (pyramid) noise, as kohya's `pyramid_noise_like`: noise plus, for i = 0 .. iterations - 1, noise
    drawn at 1 / r_i^i of the size (r_i in [2, 4): `stretches`, drawn on the host by the caller), upsampled
    bilinearly and weighted discount^i, stopping after a 1-pixel level; then divided by its standard deviation
    (over the whole batch), so it has unit variance with more low-frequency content than white noise.
    """
    n, ch, h, w = noise.shape
    out = noise.float()
    for i in range(iterations):
        r = float(stretches[i]) ** i
        hn, wn = max(1, int(h / r)), max(1, int(w / r))
        low = torch.randn((n, ch, hn, wn), generator=generator, device=noise.device, dtype=torch.float32)
        out = out + F.interpolate(low, size=(h, w), mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return (out / out.std()).to(noise.dtype)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                   n_instance: int | None = None, prior_loss_weight: float = 1.0, *, loss_type: str = "l2",
                   huber_c: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss per sample (float32, `elementwise_loss`; plain squared error by default), optionally weighted; with
    `n_instance`, the samples after the first n_instance are class images and add prior_loss_weight x their mean
    loss (DreamBooth prior preservation). `mask` (N, 1, h, w) in [0, 1] on the latent grid multiplies every
    element's loss before the mean (kohya's masked loss): a zero mask removes a pixel's loss and gradient, 0.5
    halves its weight.
    """
    per_element = elementwise_loss(pred, target, loss_type, huber_c)
    if mask is not None:
        per_element = per_element * mask.float()
    per_sample = per_element.flatten(1).mean(1)
    if weights is not None:
        per_sample = per_sample * weights
    if n_instance is None or n_instance >= per_sample.shape[0]:
        return per_sample.mean()
    return per_sample[:n_instance].mean() + prior_loss_weight * per_sample[n_instance:].mean()
