"""Loss options of scripts/train_sd.py (kohya's definitions): Huber / smooth-L1 with their schedules, multires noise,
debiased estimation, masked loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_vision.models import build_tiny_sd
from lora_vision.training.sd.losses import (alphas_cumprod, debiased_weights, diffusion_loss, elementwise_loss,
                                            huber_threshold, multires_noise, snr)


def _pair(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)


def test_huber_at_large_c_equals_l2_and_differs_at_small_c():
    pred, target = _pair()
    l2 = diffusion_loss(pred, target)
    t = torch.tensor([0, 300, 600, 999])
    ac = alphas_cumprod(build_tiny_sd("sd1").scheduler, "cpu")
    big = huber_threshold(t, ac, 1e4, "constant")
    torch.testing.assert_close(diffusion_loss(pred, target, loss_type="huber", huber_c=big), l2, rtol=1e-5, atol=0)
    small = huber_threshold(t, ac, 0.01, "constant")
    huber = diffusion_loss(pred, target, loss_type="huber", huber_c=small)
    d = (pred - target).abs()
    assert huber < 0.1 * l2  # about 2 c |d|: linear, not quadratic, in the error
    torch.testing.assert_close(huber, (2 * 0.01 * d).mean(), rtol=0.02, atol=0)
    smooth = diffusion_loss(pred, target, loss_type="smooth_l1", huber_c=small)
    torch.testing.assert_close(smooth, (2 * d).mean(), rtol=0.02, atol=0)  # about 2 |d|
    # kohya's closed form, element by element, at a middle threshold
    c = torch.full((4,), 0.5)
    direct = 2 * 0.5 * (torch.sqrt((pred - target) ** 2 + 0.25) - 0.5)
    torch.testing.assert_close(elementwise_loss(pred, target, "huber", c), direct, rtol=1e-5, atol=1e-6)


def test_huber_schedules_follow_kohya():
    ac = alphas_cumprod(build_tiny_sd("sd1").scheduler, "cpu")
    t = torch.tensor([0, 500, 999])
    c = 0.1
    torch.testing.assert_close(huber_threshold(t, ac, c, "constant"), torch.full((3,), c))
    expo = huber_threshold(t, ac, c, "exponential")
    torch.testing.assert_close(expo, torch.exp(t.float() * np.log(c) / 1000))
    assert expo[0] == 1 and expo[1] > expo[2] > c
    sigma = ((1 - ac[t]) / ac[t]).sqrt()
    torch.testing.assert_close(huber_threshold(t, ac, c, "snr"), (1 - c) / (1 + sigma) ** 2 + c)
    assert huber_threshold(t, ac, c, "snr")[-1] < 0.2


def test_debiased_estimation_weights():
    ac = alphas_cumprod(build_tiny_sd("sd1").scheduler, "cpu")
    t = torch.tensor([0, 100, 900])
    s = torch.clamp(snr(t, ac), max=1000)
    torch.testing.assert_close(debiased_weights(t, ac, "epsilon"), 1 / s.sqrt())
    torch.testing.assert_close(debiased_weights(t, ac, "v_prediction"), 1 / (s + 1))
    assert torch.isfinite(debiased_weights(t, ac, "epsilon")).all()  # SNR is capped where it is huge


def test_multires_noise_has_unit_variance_and_low_frequencies():
    g = torch.Generator().manual_seed(0)
    white = torch.randn(16, 4, 32, 32, generator=g)
    rng = np.random.default_rng(0)
    pyramid = multires_noise(white.clone(), g, 6, 0.8, rng.uniform(2, 4, 6))
    assert pyramid.shape == white.shape
    assert abs(pyramid.std().item() - 1) < 1e-4 and abs(pyramid.mean().item()) < 0.15

    def neighbour_corr(x):
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    assert abs(neighbour_corr(white)) < 0.03
    assert neighbour_corr(pyramid) > 0.2  # neighbouring latent pixels move together
    # the mean of each channel of each image varies far more than white noise's (1 / 32 = 0.03)
    assert pyramid.mean((2, 3)).std().item() > 0.15 > white.mean((2, 3)).std().item()
    # one level (i = 0 only) is white noise again: fresh full-size noise added and rescaled
    flat = multires_noise(white.clone(), g, 1, 0.8, [3.0])
    assert abs(neighbour_corr(flat)) < 0.03


def test_masked_loss_zero_mask_gives_zero_loss_and_gradient_and_half_mask_halves():
    pred, target = _pair()
    pred.requires_grad_(True)
    mask = torch.ones(4, 1, 8, 8)
    mask[1] = 0.0  # image 1 fully masked out
    mask[2] = 0.5  # image 2 at half weight
    loss = diffusion_loss(pred, target, mask=mask)
    loss.backward()
    per = (pred.detach() - target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss, (per[0] + 0 + 0.5 * per[2] + per[3]) / 4)
    assert torch.count_nonzero(pred.grad[1]) == 0 and pred.grad[0].abs().sum() > 0
    torch.testing.assert_close(pred.grad[2], 0.5 * 2 * (pred.detach()[2] - target[2]) / (4 * pred[0].numel()))
    # the same with Huber: the mask multiplies whatever the element loss is
    c = torch.full((4,), 0.3)
    huber = diffusion_loss(pred.detach(), target, loss_type="huber", huber_c=c, mask=mask)
    per_h = elementwise_loss(pred.detach(), target, "huber", c).flatten(1).mean(1)
    torch.testing.assert_close(huber, (per_h[0] + 0.5 * per_h[2] + per_h[3]) / 4)


@pytest.mark.parametrize("flags, problem", [
    (["--loss_type", "hubber"], "did you mean 'huber'"),
    (["--huber_schedule", "linear"], "expected one of constant, exponential, snr"),
    (["--huber_c", "0"], "huber_c=0.0: expected a number > 0"),
    (["--multires_noise_iterations", "-1"], "expected an integer >= 0"),
])
def test_bad_loss_options_are_named(flags, problem):
    from lora_vision.lora.config import ConfigError
    from lora_vision.training.config import load_config
    from lora_vision.training.sd.config import SDTrainConfig

    with pytest.raises(ConfigError, match=problem):
        load_config(SDTrainConfig, flags + ["--instance_data_dir", "x"])


def test_static_step_with_loss_options_and_masks_equals_eager_step():
    """The buffer-based step (what the CUDA graph replays) with Huber, debiased weights, multires noise and masks
    computes what plain PyTorch computes: the mask is one more buffer, the thresholds and weights device ops."""
    import dataclasses

    from lora_vision.lora import LoRAConfig, inject_lora, lora_parameters
    from lora_vision.training.optim import build_optimizer
    from lora_vision.training.sd.caching import BucketCache, TextTable
    from lora_vision.training.sd.step import StaticStep, StepSettings, clip_and_step, gather_inputs, step_loss

    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(5, 1, 8, 8, generator=g) > 0.5).float()
    cache = BucketCache((64, 64), torch.randn(5, 4, 8, 8, generator=g), 0.1 * torch.rand(5, 4, 8, 8, generator=g),
                        torch.tensor([0, 1, 0, 1, 0]), torch.zeros(5, 6), mask=mask)
    text = torch.randn(2, 77, 32, generator=g)
    settings = StepSettings("epsilon", 1000, 5.0, 0.1, 1.0, 1.0, False, loss_type="huber", huber_schedule="snr",
                            huber_c=0.1, debiased_estimation=True, multires_noise_iterations=4,
                            multires_noise_discount=0.5)
    rows = [torch.tensor([0, 2]), torch.tensor([1, 4]), torch.tensor([3, 0])]
    runs = []
    for static in (False, True):
        pipe = build_tiny_sd("sd1")
        torch.manual_seed(0)
        inject_lora(pipe.unet, LoRAConfig(rank=4, targets=("to_q", "to_v")))
        params = lora_parameters(pipe.unet)
        opt = build_optimizer([{"params": params, "lr": 1e-2}], betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
        table = TextTable(["a", "b"], [torch.zeros(2, 77, dtype=torch.long)], text)
        ac = alphas_cumprod(pipe.scheduler, "cpu")

        def loss_fn(x):
            return step_loss(pipe.unet, x, table, [], ac, settings, torch.float32)

        gen, host = torch.Generator().manual_seed(7), np.random.default_rng(7)
        example = gather_inputs([(cache, rows[0])], torch.Generator().manual_seed(99), settings,
                                np.random.default_rng(99))
        step = StaticStep(loss_fn, params, opt, 1.0, example) if static else None
        losses = []
        for r in rows:
            x = gather_inputs([(cache, r)], gen, settings, host)
            assert torch.equal(x.mask, mask[r])
            if step is not None:
                step.load(x)
                losses.append(float(step.run()))
            else:
                loss = loss_fn(x)
                loss.backward()
                clip_and_step(params, opt, 1.0)
                losses.append(float(loss.detach()))
        runs.append((losses, [p.detach().clone() for p in params]))
    (l_eager, p_eager), (l_static, p_static) = runs
    assert l_eager == pytest.approx(l_static, abs=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(p_eager, p_static)) <= 1e-6
    # and the options change the loss: the same inputs without them give another number
    plain = dataclasses.replace(settings, loss_type="l2", debiased_estimation=False)
    x = gather_inputs([(cache, rows[0])], torch.Generator().manual_seed(7), settings, np.random.default_rng(7))
    with torch.no_grad():
        with_options = float(step_loss(pipe.unet, x, table, [], ac, settings, torch.float32))
        without = float(step_loss(pipe.unet, x, table, [], ac, plain, torch.float32))
    assert abs(with_options - without) > 1e-4
