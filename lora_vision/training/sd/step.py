"""The DreamBooth training step: sample latents, noise and timesteps on the device, predict, weigh, update.

Two ways to run the same step:
- `eager`: plain PyTorch (any device, gradient accumulation, DDP, live text encoders);
- `static`: the step reads fixed input buffers, so it can be captured once in a CUDA graph and replayed every
  step, which removes the per-step host work (Python and kernel launches) that dominates on fast GPUs. Random
  numbers are drawn outside the graph into the buffers, from the same generator in the same order as `eager`,
  so both paths compute the same function (tests compare their loss curves on CPU, where `static` runs uncaptured).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .caching import BucketCache, TextTable, encode_text
from .losses import (add_noise, debiased_weights, diffusion_loss, huber_threshold, min_snr_weights, multires_noise,
                     target_for)


@dataclass(frozen=True)
class StepSettings:
    """What the loss needs besides the data."""

    prediction_type: str
    num_timesteps: int
    snr_gamma: float | None
    noise_offset: float
    prior_loss_weight: float
    max_grad_norm: float
    sdxl: bool
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    debiased_estimation: bool = False
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3


@dataclass
class Inputs:
    """One step's tensors (instance rows first, then class rows)."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    text_rows: torch.Tensor
    time_ids: torch.Tensor
    n_instance: int
    mask: torch.Tensor | None = None
    """(N, 1, h, w) loss weights on the latent grid (--masked_loss), or None."""


def gather_inputs(parts: list[tuple[BucketCache, torch.Tensor]], generator: torch.Generator,
                  settings: StepSettings, host_rng: np.random.Generator | None = None) -> Inputs:
    """Rows of one or two caches (same size) -> latent samples plus fresh noise and timesteps (no host sync).

    Multires noise draws its level sizes from `host_rng` (the data generator: checkpointed, the same on every
    process); masks come from the caches that have them, class rows without one weigh every pixel fully.
    """
    mean = torch.cat([c.mean[rows] for c, rows in parts])
    std = torch.cat([c.std[rows] for c, rows in parts])
    dev, n = mean.device, mean.shape[0]
    latents = mean + std * torch.randn(mean.shape, generator=generator, device=dev, dtype=mean.dtype)
    noise = torch.randn(mean.shape, generator=generator, device=dev, dtype=mean.dtype)
    if settings.noise_offset:
        noise = noise + settings.noise_offset * torch.randn((n, mean.shape[1], 1, 1), generator=generator,
                                                            device=dev, dtype=mean.dtype)
    if settings.multires_noise_iterations:
        if host_rng is None:
            raise ValueError("multires noise needs host_rng (a numpy Generator) for the sizes of its levels")
        stretches = host_rng.uniform(2.0, 4.0, settings.multires_noise_iterations)
        noise = multires_noise(noise, generator, settings.multires_noise_iterations,
                               settings.multires_noise_discount, stretches)
    t = torch.randint(0, settings.num_timesteps, (n,), generator=generator, device=dev)
    return Inputs(latents, noise, t, torch.cat([c.text_row[rows] for c, rows in parts]),
                  torch.cat([c.time_ids[rows] for c, rows in parts]), parts[0][1].shape[0], gather_masks(parts))


def gather_masks(parts: list[tuple[BucketCache, torch.Tensor]]) -> torch.Tensor | None:
    """The loss masks of the rows (N, 1, h, w), ones for a cache without masks (class images); None when no cache
    has masks."""
    if all(c.mask is None for c, _ in parts):
        return None
    return torch.cat([c.mask[rows] if c.mask is not None
                      else torch.ones((rows.shape[0], 1, *c.mean.shape[2:]), device=c.mean.device,
                                      dtype=c.mean.dtype)
                      for c, rows in parts])


def shard_inputs(x: Inputs, rank: int, world: int) -> Inputs:
    """Process `rank`'s part of a global batch: its slice of the instance rows and of the class rows.

    Random numbers are drawn for the whole global batch (the same generator state on every process) and then
    sliced, so N processes at batch b compute exactly the per-row inputs of one process at batch N*b.
    """
    if world == 1:
        return x
    n, n_class = x.n_instance, x.latents.shape[0] - x.n_instance
    if n % world or n_class % world:
        raise ValueError(f"a global batch of {n} instance + {n_class} class rows cannot be split over {world} "
                         "processes; expected multiples of the number of processes")
    a, b = rank * n // world, (rank + 1) * n // world
    c, d = n + rank * n_class // world, n + (rank + 1) * n_class // world

    def pick(t: torch.Tensor) -> torch.Tensor:  # slices on the device: no index tensor to copy, no host sync
        return torch.cat([t[a:b], t[c:d]])

    return Inputs(pick(x.latents), pick(x.noise), pick(x.timesteps), pick(x.text_rows), pick(x.time_ids), n // world,
                  pick(x.mask) if x.mask is not None else None)


def text_conditioning(table: TextTable, rows: torch.Tensor, time_ids: torch.Tensor, text_encoders: list,
                      settings: StepSettings, dtype: torch.dtype) -> tuple[torch.Tensor, dict | None]:
    """Encoder hidden states (cached, or from the live LoRA text encoders) and SDXL's added conditioning."""
    if table.hidden is not None:
        hidden, pooled = table.hidden[rows], (table.pooled[rows] if table.pooled is not None else None)
    else:
        hidden, pooled = encode_text(text_encoders, [ids[rows] for ids in table.ids], settings.sdxl)
    added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)} if settings.sdxl else None
    return hidden.to(dtype), added


def step_loss(unet: nn.Module, x: Inputs, table: TextTable, text_encoders: list, ac: torch.Tensor,
              settings: StepSettings, dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    """The DreamBooth loss of one batch (instance loss + prior_loss_weight x class loss)."""
    noisy = add_noise(x.latents, x.noise, x.timesteps, ac).to(dtype)
    if channels_last:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    hidden, added = text_conditioning(table, x.text_rows, x.time_ids, text_encoders, settings, dtype)
    pred = unet(noisy, x.timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]
    target = target_for(settings.prediction_type, x.latents, x.noise, x.timesteps, ac)
    weights = (min_snr_weights(x.timesteps, ac, settings.snr_gamma, settings.prediction_type)
               if settings.snr_gamma else None)
    if settings.debiased_estimation:  # kohya multiplies both when both are on
        debiased = debiased_weights(x.timesteps, ac, settings.prediction_type)
        weights = debiased if weights is None else weights * debiased
    huber_c = (huber_threshold(x.timesteps, ac, settings.huber_c, settings.huber_schedule)
               if settings.loss_type in ("huber", "smooth_l1") else None)
    return diffusion_loss(pred, target, weights, x.n_instance, settings.prior_loss_weight,
                          loss_type=settings.loss_type, huber_c=huber_c, mask=x.mask)


class GradientBucket:
    """The gradients of `params` kept in one preallocated flat buffer and averaged over the `world` processes with
    one all-reduce of it: what replaces DDP's hooks in the training step, eager or captured.

    `attach()` (before the backward) zeroes the buffer and makes each `p.grad` a view into it, so the backward
    accumulates into the same memory every step; `all_reduce()` (after it) averages the buffer in place. The
    tensors never move, so the step that uses them can be captured in a CUDA graph with the all-reduce inside it
    (NCCL), and the eager step on gloo runs exactly the same code. A tensor that gets no gradient on this process
    counts as zeros. One buffer per dtype (the LoRA parameters are float32: one all-reduce).
    """

    def __init__(self, params: list[torch.Tensor], world: int, group: Any = None) -> None:
        self.params, self.world, self.group = list(params), world, group
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self.params:
            by_dtype.setdefault(p.dtype, []).append(p)
        self.flats: list[torch.Tensor] = []
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its gradient's place in a flat)
        for dtype, ps in by_dtype.items():
            flat = torch.zeros(sum(p.numel() for p in ps), dtype=dtype, device=ps[0].device)
            offset = 0
            for p in ps:
                self.views.append((p, flat[offset:offset + p.numel()].view_as(p)))
                offset += p.numel()
            self.flats.append(flat)

    def attach(self) -> None:
        """Zero the buffer and point every parameter's gradient at its view (a no-op for a view already there)."""
        for flat in self.flats:
            flat.zero_()
        for p, view in self.views:
            if p.grad is not view:
                p.grad = view

    def all_reduce(self) -> None:
        """Average the gradients over the processes: one all-reduce (sum) per buffer, then / world, in place."""
        for flat in self.flats:
            torch.distributed.all_reduce(flat, group=self.group)
            flat.div_(self.world)


def clip_and_step(params: list[torch.Tensor], optimizer: torch.optim.Optimizer, max_grad_norm: float,
                  scaler: torch.amp.GradScaler | None = None) -> None:
    """Clip the gradient norm (no host sync) and step the optimizer; grads are set to None afterwards."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class StaticStep:
    """A training step over fixed buffers, optionally captured as one CUDA graph (forward, backward, optimizer).

    `load(inputs)` copies a step's inputs into the buffers; `run()` replays the graph (or calls the step when
    not captured) and returns the loss buffer. Capturing first runs warm-up steps on a side stream and then puts
    back the LoRA weights and optimizer state, so capturing does not change the training. With a `bucket` (several
    processes) the gradients live in its flat buffer and its all-reduce runs between the backward and the update,
    inside the graph when captured: N processes replay N graphs that meet in that all-reduce.
    """

    def __init__(self, loss_fn: Callable[[Inputs], torch.Tensor], params: list[torch.Tensor],
                 optimizer: torch.optim.Optimizer, max_grad_norm: float, example: Inputs,
                 bucket: GradientBucket | None = None) -> None:
        self.loss_fn, self.params, self.optimizer, self.max_grad_norm = loss_fn, params, optimizer, max_grad_norm
        self.bucket = bucket
        self.buf = Inputs(*(t.clone() for t in (example.latents, example.noise, example.timesteps,
                                                 example.text_rows, example.time_ids)), example.n_instance,
                          example.mask.clone() if example.mask is not None else None)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.loss = torch.zeros((), device=example.latents.device)
        # an optimizer of training/optim_graph.py: its host bookkeeping runs here, before each step, outside a graph
        self.prepare = getattr(optimizer, "prepare_step", None)
        if self.prepare is not None:
            optimizer.prepared_outside = True

    def release(self) -> None:
        """Hand the optimizer back to the eager step (a capture that failed): a training/optim_graph.py optimizer
        runs its host part inside step() again."""
        if self.prepare is not None:
            self.optimizer.prepared_outside = False
            self.prepare = None

    def shape(self) -> tuple:
        """The input shape this step was built for."""
        return tuple(self.buf.latents.shape), self.buf.n_instance

    def load(self, x: Inputs) -> None:
        """Copy one step's inputs into the buffers."""
        for dst, src in ((self.buf.latents, x.latents), (self.buf.noise, x.noise), (self.buf.timesteps, x.timesteps),
                         (self.buf.text_rows, x.text_rows), (self.buf.time_ids, x.time_ids)):
            dst.copy_(src, non_blocking=True)
        if self.buf.mask is not None:
            self.buf.mask.copy_(x.mask, non_blocking=True)

    def _body(self) -> torch.Tensor:
        if self.bucket is not None:
            self.bucket.attach()
        loss = self.loss_fn(self.buf)
        loss.backward()
        if self.bucket is not None:
            self.bucket.all_reduce()
        clip_and_step(self.params, self.optimizer, self.max_grad_norm)
        return loss.detach()

    def run(self) -> torch.Tensor:
        """One training step on the current buffers; returns the loss (a device tensor)."""
        if self.prepare is not None:
            self.prepare()
        if self.graph is not None:
            self.graph.replay()
            return self.loss
        self.loss = self._body()
        return self.loss

    def capture(self, warmup: int = 3) -> None:
        """Record the step as a CUDA graph (CUDA only)."""
        saved_params = [p.detach().clone() for p in self.params]
        had_state = {id(p) for p in self.params if self.optimizer.state.get(p)}
        saved_state = {id(p): {k: v.clone() for k, v in self.optimizer.state[p].items() if torch.is_tensor(v)}
                       for p in self.params if id(p) in had_state}
        snapshot = getattr(self.optimizer, "snapshot", None)
        saved_optimizer = snapshot() if snapshot is not None else None  # host counters and device scalars too
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    if self.prepare is not None:
                        self.prepare()
                    self._body()
        finally:  # also when a warm-up step fails: the eager step that takes over starts from the same weights
            torch.cuda.current_stream().wait_stream(side)
            with torch.no_grad():  # undo the warm-up updates: the same tensors, their values from before
                for p, v in zip(self.params, saved_params):
                    p.copy_(v)
                if saved_optimizer is not None:
                    self.optimizer.restore(saved_optimizer)
                else:
                    for p in self.params:
                        for k, v in self.optimizer.state[p].items():
                            if torch.is_tensor(v):
                                v.copy_(saved_state[id(p)][k]) if id(p) in had_state else v.zero_()
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        # several processes: NCCL's watchdog thread polls its events while this thread captures, which the global
        # capture mode forbids (NCCL's guide, "Using NCCL with CUDA Graphs", capture modes)
        mode = "thread_local" if self.bucket is not None else "global"
        with torch.cuda.graph(graph, capture_error_mode=mode):
            self.loss = self._body()
        self.graph = graph
