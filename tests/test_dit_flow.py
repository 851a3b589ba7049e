"""training.dit.flow: noise levels, their densities and weights, and the image-size shift, against the formulas of
the papers and diffusers' own scheduler."""

from __future__ import annotations

import math

import pytest
import torch

from lora_vision.training.dit.flow import (ResolutionShift, denoised, loss_weights, noisy_latents, pick_sigmas,
                                           sample_density, training_sigmas, velocity_target)


def test_noisy_latents_and_target_follow_the_straight_path():
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigmas = torch.tensor([0.0, 0.5, 1.0])
    x = noisy_latents(x0, noise, sigmas)
    torch.testing.assert_close(x[0], x0[0])
    torch.testing.assert_close(x[2], noise[2])
    torch.testing.assert_close(x[1], 0.5 * (x0[1] + noise[1]))
    # Following the velocity from x_sigma for sigma lands on the clean latent.
    torch.testing.assert_close(x[1] - 0.5 * velocity_target(x0, noise)[1], x0[1])


def test_densities_stay_in_the_unit_interval_and_mode_scale_zero_is_uniform_again():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for scheme in ("none", "uniform", "logit_normal", "mode"):
        u = sample_density(scheme, 10_000, g())
        assert 0 <= float(u.min()) and float(u.max()) < 1
    # mode with scale 0 is 1 - u: uniform again.
    torch.testing.assert_close(sample_density("mode", 100, g(), mode_scale=0.0), 1 - sample_density("uniform", 100, g()))
    # logit_normal: the logit of u is N(mean, std).
    u = sample_density("logit_normal", 20_000, g(), logit_mean=0.5, logit_std=2.0)
    logit = torch.log(u / (1 - u))
    assert abs(float(logit.mean()) - 0.5) < 0.05 and abs(float(logit.std()) - 2.0) < 0.05


def test_loss_weights_are_the_papers():
    s = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(loss_weights("sigma_sqrt", s), torch.tensor([16.0, 4.0]))
    torch.testing.assert_close(loss_weights("cosmap", s), 2 / (math.pi * (1 - 2 * s + 2 * s**2)))
    assert all(loss_weights(k, s) is None for k in ("none", "uniform", "logit_normal", "mode"))


def test_training_sigmas_are_the_schedulers_and_u_picks_them_as_the_reference():
    from diffusers import FlowMatchEulerDiscreteScheduler

    table = training_sigmas({"shift": 3.0, "num_train_timesteps": 1000}, "cpu")
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    torch.testing.assert_close(table, ref.sigmas[:1000].float())
    u = torch.tensor([0.0, 0.4999, 0.9999])
    torch.testing.assert_close(pick_sigmas(u, table) * 1000, ref.timesteps[(u * 1000).long()].float())


@pytest.mark.parametrize("seq_len", [16, 1024, 4096])
def test_resolution_shift_matches_diffusers_dynamic_shift(seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                  max_image_seq_len=4096)
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    shift = ResolutionShift.of(dict(scheduler.config))
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    assert shift.mu(seq_len) == pytest.approx(mu)
    sigmas = torch.tensor([0.1, 0.5, 0.9, 1.0])
    torch.testing.assert_close(shift.apply(sigmas, seq_len), scheduler.time_shift(mu, 1.0, sigmas))
    assert ResolutionShift.of({"use_dynamic_shifting": False}) is None


def test_denoised_inverts_the_straight_path():
    x0, noise, sigmas = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0.1, 0.5, 1.0])
    noisy = noisy_latents(x0, noise, sigmas)
    torch.testing.assert_close(denoised(velocity_target(x0, noise), noisy, sigmas), x0)


@pytest.mark.parametrize("sigma", [0.2, 0.7])
def test_preconditioned_loss_is_the_velocity_loss_times_sigma_squared(sigma):
    from lora_vision.models.dit import build_tiny_dit
    from lora_vision.training.dit.step import FlowSettings, flow_loss
    from lora_vision.training.sd.caching import TextTable
    from lora_vision.training.sd.step import Inputs

    pipe = build_tiny_dit("tiny-sd3")
    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(0)
    x = Inputs(torch.randn(1, cfg.in_channels, 8, 8, generator=g), torch.randn(1, cfg.in_channels, 8, 8, generator=g),
               torch.tensor([sigma]), torch.tensor([0]), torch.zeros(1, 6), 1)
    table = TextTable([""], [], hidden=torch.randn(1, 4, cfg.joint_attention_dim, generator=g),
                      pooled=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                      mask=torch.ones(1, 4, dtype=torch.bool))
    losses = {}
    for precondition in (False, True):
        settings = FlowSettings("sd3", "none", 0.0, 1.0, 1.29, None, None, 1.0, type(pipe), precondition)
        with torch.no_grad():
            losses[precondition] = float(flow_loss(pipe.transformer, x, table, settings, torch.float32))
    assert losses[False] > 0
    assert losses[True] == pytest.approx(sigma ** 2 * losses[False], rel=1e-5)
