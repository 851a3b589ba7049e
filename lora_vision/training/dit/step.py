"""The DiT training step: cached latents -> noisy latents at sampled noise levels -> the family's transformer call
(packing, position ids, guidance) -> the flow-matching loss.

`FlowTrainingSteps` is the SD recipe's TrainingSteps (batches, accumulation, DDP, the static/CUDA-graph step) with
the inputs and the loss of flow matching: the noise levels travel in `Inputs.timesteps` as sigmas in (0, 1].
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from ..sd.caching import BucketCache, TextTable
from ..sd.loop import TrainingSteps
from ..sd.losses import diffusion_loss
from ..sd.step import Inputs, gather_masks
from ..sd.validation_loss import TIMESTEP_FRACTIONS, fixed_batches, mean_loss
from .flow import (ResolutionShift, denoised, loss_weights, noisy_latents, pick_sigmas, sample_density,
                   velocity_target)


@dataclass(frozen=True)
class FlowSettings:
    """What the flow-matching loss needs besides the data."""

    family: str
    weighting_scheme: str
    logit_mean: float
    logit_std: float
    mode_scale: float
    guidance_scale: float | None
    """The value fed to a guidance embedding (Flux.1-dev); None when the transformer has none."""
    shift: ResolutionShift | None
    """The image-size shift of the training sigmas; None: the scheduler's table as it is."""
    prior_loss_weight: float
    pipeline_class: Any
    """The pipeline class, whose static helpers pack latents and build position ids for its transformer."""
    precondition_outputs: bool = False
    """Train x_sigma - sigma x prediction against x0 instead of the prediction against noise - x0."""
    live_text: Any = None
    """(prompts, cached hidden states) -> (hidden, pooled) encoded now (--train_text_encoder); None: the cache."""


def image_tokens(family: str, latents: torch.Tensor) -> int:
    """How many image tokens the transformer sees for latents (B, C, H, W): 2x2 patches except Flux.2's
    (already patchified when cached)."""
    h, w = latents.shape[-2:]
    return h * w if family == "flux2" else (h // 2) * (w // 2)


def gather_flow_inputs(parts: list[tuple[BucketCache, torch.Tensor]], generator: torch.Generator,
                       settings: FlowSettings, table: torch.Tensor) -> Inputs:
    """Rows of one or two caches (same size) -> latent samples, noise and noise levels (no host sync)."""
    mean = torch.cat([c.mean[rows] for c, rows in parts])
    std = torch.cat([c.std[rows] for c, rows in parts])
    dev, n = mean.device, mean.shape[0]
    latents = mean + std * torch.randn(mean.shape, generator=generator, device=dev, dtype=mean.dtype)
    noise = torch.randn(mean.shape, generator=generator, device=dev, dtype=mean.dtype)
    u = sample_density(settings.weighting_scheme, n, generator, settings.logit_mean, settings.logit_std,
                       settings.mode_scale, device=dev)
    sigmas = pick_sigmas(u, table)
    if settings.shift is not None:
        sigmas = settings.shift.apply(sigmas, image_tokens(settings.family, mean))
    return Inputs(latents, noise, sigmas, torch.cat([c.text_row[rows] for c, rows in parts]),
                  torch.cat([c.time_ids[rows] for c, rows in parts]), parts[0][1].shape[0], gather_masks(parts))


@functools.lru_cache(maxsize=64)
def position_ids(pipeline_class: Any, family: str, batch: int, height: int, width: int, text_len: int,
                 device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(text ids, image ids) of Flux.1 / Flux.2 for latents of (height, width) and text_len text tokens, made by
    the pipeline's own helpers and kept on the device per shape. They depend only on the shapes; the helpers build
    them on the host, and a copy from the host inside a CUDA-graph capture fails (unpinned memory), so the step
    makes them once, in the capture's warm-up, and reuses the same tensors after (they are never written).
    `dtype` is the ids' dtype for Flux.1; Flux.2's are integers (its helpers')."""
    if family == "flux1":
        img = pipeline_class._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        return torch.zeros(text_len, 3, device=device, dtype=dtype), img
    if family == "flux2":
        img = pipeline_class._prepare_latent_ids(torch.empty(batch, 1, height, width, device="meta"))
        txt = pipeline_class._prepare_text_ids(torch.empty(batch, text_len, 1, device="meta"))
        return txt.to(device), img.to(device)
    raise ValueError(f"position_ids is for flux1 and flux2, not {family!r}")


def predict(transformer: nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, hidden: torch.Tensor,
            pooled: torch.Tensor | None, mask: torch.Tensor, settings: FlowSettings) -> torch.Tensor:
    """The transformer's velocity prediction (B, C, H, W) for noisy latents (B, C, H, W) at noise levels sigmas,
    called as the family's pipeline calls it."""
    fam, cls = settings.family, settings.pipeline_class
    b, c, h, w = noisy.shape
    dev, dtype = noisy.device, noisy.dtype
    t = sigmas.to(dtype)
    if fam == "sd3":
        return transformer(hidden_states=noisy, timestep=t * 1000, encoder_hidden_states=hidden,
                           pooled_projections=pooled, return_dict=False)[0]
    if fam == "z-image":  # the pipeline feeds 1 - sigma and negates the output
        out = transformer([x[:, None] for x in noisy], 1 - t, [e[m] for e, m in zip(hidden, mask)],
                          return_dict=False)[0]
        return -torch.stack(list(out))[:, :, 0]
    if fam == "flux1":
        packed = cls._pack_latents(noisy, b, c, h, w)
        txt_ids, img_ids = position_ids(cls, fam, b, h, w, hidden.shape[1], dev, dtype)
        guidance = (torch.full((b,), settings.guidance_scale, device=dev, dtype=torch.float32)
                    if settings.guidance_scale is not None else None)
        out = transformer(hidden_states=packed, timestep=t, guidance=guidance, pooled_projections=pooled,
                          encoder_hidden_states=hidden, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return cls._unpack_latents(out, h * 8, w * 8, 8)  # _unpack_latents wants pixels and the VAE factor
    if fam == "flux2":
        txt_ids, latent_ids = position_ids(cls, fam, b, h, w, hidden.shape[1], dev, torch.int64)
        out = transformer(hidden_states=cls._pack_latents(noisy), timestep=t, guidance=None,
                          encoder_hidden_states=hidden, txt_ids=txt_ids, img_ids=latent_ids, return_dict=False)[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)
    if fam == "qwen-image":
        packed = cls._pack_latents(noisy, b, c, h, w)
        out = transformer(hidden_states=packed, timestep=t, encoder_hidden_states=hidden,
                          encoder_hidden_states_mask=mask.to(torch.long), img_shapes=[[(1, h // 2, w // 2)]] * b,
                          return_dict=False)[0]
        return cls._unpack_latents(out, h * 8, w * 8, 8)[:, :, 0]
    raise ValueError(f"predict got family {fam!r}; expected flux1, flux2, sd3, qwen-image or z-image")


def flow_loss(transformer: nn.Module, x: Inputs, table: TextTable, settings: FlowSettings,
              dtype: torch.dtype) -> torch.Tensor:
    """The DreamBooth flow-matching loss of one batch (instance loss + prior_loss_weight x class loss)."""
    noisy = noisy_latents(x.latents, x.noise, x.timesteps)
    hidden = table.hidden[x.text_rows].to(dtype)
    pooled = table.pooled[x.text_rows].to(dtype) if table.pooled is not None else None
    if settings.live_text is not None:  # the CLIP encoders train: their part of the embeddings is encoded now
        hidden, pooled = settings.live_text([table.prompts[i] for i in x.text_rows.tolist()], hidden)
    pred = predict(transformer, noisy.to(dtype), x.timesteps, hidden, pooled, table.mask[x.text_rows], settings)
    if settings.precondition_outputs:
        pred, target = denoised(pred, noisy, x.timesteps), x.latents.float()
    else:
        target = velocity_target(x.latents, x.noise)
    weights = loss_weights(settings.weighting_scheme, x.timesteps)
    return diffusion_loss(pred, target, weights, x.n_instance, settings.prior_loss_weight, mask=x.mask)


class FlowTrainingSteps(TrainingSteps):
    """TrainingSteps over a DiT transformer: `ac` is the table of training sigmas, `settings` a FlowSettings."""

    def _gather(self, parts: list) -> Inputs:
        return gather_flow_inputs(parts, self.generator, self.settings, self.ac)

    def loss_of(self, x: Inputs) -> torch.Tensor:
        """The flow-matching DreamBooth loss of one batch."""
        return flow_loss(self.unet, x, self.table, self.settings, self.dtype)


class FlowValidationLoss:
    """Call with nothing: the plain velocity loss (no loss weights, no preconditioning) over every held-out image at
    the noise levels TIMESTEP_FRACTIONS with noise drawn once, a device scalar: it moves only when the weights do."""

    def __init__(self, transformer: nn.Module, caches: Mapping[tuple[int, int], BucketCache], table: TextTable,
                 settings: FlowSettings, dtype: torch.dtype, batch_size: int, seed: int) -> None:
        self.transformer, self.table, self.dtype = transformer, table, dtype
        self.settings = dataclasses.replace(settings, weighting_scheme="none", precondition_outputs=False)
        self.batches = fixed_batches(caches, torch.tensor(TIMESTEP_FRACTIONS), batch_size, seed)

    def __call__(self) -> torch.Tensor:
        return mean_loss([self.transformer], self.batches,  # the text encoders have no dropout
                         lambda x: flow_loss(self.transformer, x, self.table, self.settings, self.dtype))
