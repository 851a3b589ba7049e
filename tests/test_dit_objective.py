"""The training objective of each DiT family agrees with its own diffusers pipeline: a transformer that learned our
target perfectly, run by the pipeline's real denoising loop (its scheduler, shift, timestep scaling and latent
packing), walks the straight path from its noise to the clean latent.

The perfect transformer is read off our training code, not written down per family: our `predict` is probed with
a recording stand-in for the transformer to learn how it packs a latent, which timestep it feeds at a noise level
and whether it negates the output. For a single clean latent x0 the best velocity at x_sigma is (x_sigma - x0) /
sigma; the stand-in returns exactly what makes our `predict` answer that. A sign, a scaling or a timestep
convention that differs between our training and the pipeline makes the pipeline miss x0.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lora_vision.models.dit import DIT_KINDS, build_tiny_dit
from lora_vision.training.dit.step import FlowSettings, predict


def _hidden_and_timestep(args: tuple, kwargs: dict) -> tuple[Any, torch.Tensor]:
    """The latent input and the timestep of a call to any of the five transformers (Z-Image's are positional)."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
    return hidden, timestep


class PerfectTransformer:
    """Stands in for `pipe.transformer.forward`. Mode 'probe': records its inputs and returns the latent input
    unchanged; mode 'perfect': returns sign x (H - H0) / sigma(t), the output our `predict` turns into the best
    velocity for the clean latent whose transformer input is H0."""

    def __init__(self) -> None:
        self.mode, self.calls = "probe", []
        self.h0: Any = None
        self.sign, self.a, self.b = 1.0, 1.0, 0.0  # timestep = a sigma + b in our training convention

    def __call__(self, *args: Any, **kwargs: Any) -> tuple:
        hidden, timestep = _hidden_and_timestep(args, kwargs)
        self.calls.append((hidden, timestep))
        if self.mode == "probe":
            return (hidden,)
        sigma = (timestep.float() - self.b) / self.a
        if isinstance(hidden, (list, tuple)):  # Z-Image: one (C, 1, H, W) latent per image
            return ([self.sign * (h.float() - self.h0[0]) / s for h, s in zip(hidden, sigma)],)
        s = sigma.reshape(-1, *([1] * (hidden.dim() - 1)))
        return (self.sign * (hidden.float() - self.h0) / s,)


def _text_inputs(pipe: Any, family: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Text inputs of the right widths for `predict` (the stand-in ignores them)."""
    cfg = pipe.transformer.config
    width = {"flux1": "joint_attention_dim", "flux2": "joint_attention_dim", "sd3": "joint_attention_dim",
             "qwen-image": "joint_attention_dim", "z-image": "cap_feat_dim"}[family]
    hidden = torch.randn(1, 4, getattr(cfg, width))
    pooled = torch.randn(1, cfg.pooled_projection_dim) if family in ("flux1", "sd3") else None
    return hidden, pooled, torch.ones(1, 4, dtype=torch.bool)


def _learn_training_convention(pipe: Any, family: str, x0: torch.Tensor, stub: PerfectTransformer) -> None:
    """Probe our `predict`: the transformer input of x0, the timestep it feeds per noise level, the output sign."""
    guidance = 3.5 if pipe.transformer.config.get("guidance_embeds") else None
    settings = FlowSettings(family, "none", 0.0, 1.0, 1.29, guidance, None, 1.0, type(pipe))
    hidden, pooled, mask = _text_inputs(pipe, family)
    times = []
    for sigma in (0.25, 0.75):
        stub.calls.clear()
        out = predict(pipe.transformer, x0, torch.tensor([sigma]), hidden, pooled, mask, settings)
        (h0, t), = stub.calls
        times.append(float(t.reshape(-1)[0]))
    # With the identity stand-in, predict returns sign x x0: our own packing and unpacking are each other's inverse.
    sign = float((out * x0).sum() / (x0 * x0).sum())
    assert sign in (1.0, -1.0), f"{family}: predict with an identity transformer gave {sign} x the latent"
    torch.testing.assert_close(out, sign * x0, atol=1e-6, rtol=0)
    stub.h0 = [h.float() for h in h0] if isinstance(h0, (list, tuple)) else h0.float()
    stub.sign = sign
    stub.a = (times[1] - times[0]) / 0.5
    stub.b = times[0] - 0.25 * stub.a


def _pipeline_latent(latents: torch.Tensor, like: Any) -> torch.Tensor:
    """The pipeline's latents (its loop's layout) in the layout of the transformer input `like`."""
    if isinstance(like, (list, tuple)):  # Z-Image: (B, C, H, W) in the loop, a list of (C, 1, H, W) in the call
        return latents[:, :, None]
    return latents.reshape(like.shape)


@pytest.mark.parametrize("model", list(DIT_KINDS))
def test_the_pipeline_walks_our_perfect_prediction_to_the_clean_latent(model):
    family = DIT_KINDS[model]
    pipe = build_tiny_dit(model)
    stub = PerfectTransformer()
    pipe.transformer.forward = stub
    size = 64
    torch.manual_seed(0)
    channels = pipe.transformer.config.in_channels
    if family in ("flux1", "qwen-image"):  # the packed 2x2 patches of a 4-channel latent
        channels //= 4
    factor = pipe.vae_scale_factor * (2 if family == "flux2" else 1)  # Flux.2 trains on patchified latents
    x0 = torch.randn(1, channels, size // factor, size // factor)
    _learn_training_convention(pipe, family, x0, stub)

    stub.mode, stub.calls = "perfect", []
    seen: list[torch.Tensor] = []

    def after_step(_pipe: Any, _i: int, _t: Any, kw: dict) -> dict:
        seen.append(kw["latents"].detach().clone())
        return {}

    steps = 4
    pipe(prompt="a photo", height=size, width=size, num_inference_steps=steps, output_type="latent",
         generator=torch.Generator().manual_seed(1), callback_on_step_end=after_step,
         callback_on_step_end_tensor_inputs=["latents"], max_sequence_length=16)
    assert len(seen) == steps and len(stub.calls) >= steps
    h0 = stub.h0[0] if isinstance(stub.h0, list) else stub.h0
    # Every step lands on the straight path between the first call's noise and x0, at the next noise level.
    first_hidden, first_t = stub.calls[0]
    first = first_hidden[0] if isinstance(first_hidden, (list, tuple)) else first_hidden[:1]  # CFG: a doubled batch
    s0 = float((first_t.float().reshape(-1)[0] - stub.b) / stub.a)
    noise = (first.float() - (1 - s0) * h0) / s0
    sigmas = [float((t.float().reshape(-1)[0] - stub.b) / stub.a) for _, t in stub.calls[1:]] + [0.0]
    per_step = len(stub.calls) // steps  # two calls a step where the pipeline runs classifier-free guidance
    for latents, sigma in zip(seen, sigmas[per_step - 1::per_step]):
        expected = (1 - sigma) * h0 + sigma * noise
        got = _pipeline_latent(latents, stub.h0 if isinstance(stub.h0, list) else h0)
        got = got[0] if isinstance(stub.h0, list) else got
        torch.testing.assert_close(got.float(), expected, atol=1e-5, rtol=1e-5)
    final = _pipeline_latent(seen[-1], stub.h0)
    torch.testing.assert_close((final[0] if isinstance(stub.h0, list) else final).float(), h0, atol=1e-5, rtol=1e-5)
