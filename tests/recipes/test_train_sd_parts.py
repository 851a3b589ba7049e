"""The pieces of the DreamBooth recipe against independent references: diffusers' noising, velocity, SNR and LR
schedules; the static (CUDA-graph-ready) step against the eager one; the bf16 LoRA product against float32."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lora_vision.lora import LoRAConfig, inject_lora, lora_parameters
from lora_vision.lora.layers import LoRALinear
from lora_vision.training.sd.caching import BucketCache, TextTable
from lora_vision.training.sd.losses import add_noise, alphas_cumprod, min_snr_weights, snr, target_for
from lora_vision.training.optim import SCHEDULES, LRSchedule, build_optimizer
from lora_vision.training.sd.step import StaticStep, StepSettings, clip_and_step, gather_inputs, step_loss


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type=prediction_type)


def test_noising_velocity_and_snr_match_diffusers():
    from diffusers.training_utils import compute_snr

    sched = _scheduler("v_prediction")
    ac = alphas_cumprod(sched, "cpu")
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 250, 500, 900, 999])
    torch.testing.assert_close(add_noise(x, eps, t, ac), sched.add_noise(x, eps, t), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(target_for("v_prediction", x, eps, t, ac), sched.get_velocity(x, eps, t),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(snr(t, ac), compute_snr(sched, t), rtol=1e-5, atol=0)
    w = min_snr_weights(t, ac, 5.0, "epsilon")
    s = compute_snr(sched, t)
    torch.testing.assert_close(w, torch.minimum(s, torch.full_like(s, 5.0)) / s, rtol=1e-5, atol=0)
    assert target_for("epsilon", x, eps, t, ac).equal(eps)


@pytest.mark.parametrize("name", SCHEDULES)
def test_lr_schedules_match_diffusers(name):
    from diffusers.optimization import get_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    ref = get_scheduler(name, opt, num_warmup_steps=5, num_training_steps=40, num_cycles=2, power=2.0)
    ours = LRSchedule(name, 5, 40, 2, 2.0)
    for step in range(40):
        assert ours.factor(step) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-7), step
        opt.step()
        ref.step()


def _setup():
    from lora_vision.models.tiny import build_tiny_sd

    pipe = build_tiny_sd("sd1")
    torch.manual_seed(0)
    inject_lora(pipe.unet, LoRAConfig(rank=4, targets=("to_q", "to_k", "to_v", "to_out.0")))
    params = lora_parameters(pipe.unet)
    opt = build_optimizer([{"params": params, "lr": 1e-2}], betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    g = torch.Generator().manual_seed(1)
    cache = BucketCache((64, 64), torch.randn(5, 4, 8, 8, generator=g), 0.1 * torch.rand(5, 4, 8, 8, generator=g),
                        torch.tensor([0, 1, 0, 1, 0]), torch.zeros(5, 6))
    table = TextTable(["a", "b"], [torch.zeros(2, 77, dtype=torch.long)], torch.randn(2, 77, 32, generator=g))
    settings = StepSettings("epsilon", 1000, 5.0, 0.1, 1.0, 1.0, False)
    return pipe.unet, params, opt, cache, table, settings, alphas_cumprod(pipe.scheduler, "cpu")


def test_static_step_equals_eager_step():
    """The buffer-based step (what the CUDA graph replays) computes the same losses and weights as plain PyTorch."""
    runs = []
    for static in (False, True):
        unet, params, opt, cache, table, settings, ac = _setup()
        gen = torch.Generator().manual_seed(7)
        rows = [torch.tensor([0, 2]), torch.tensor([1, 4]), torch.tensor([3, 0]), torch.tensor([2, 1])]

        def loss_fn(x):
            return step_loss(unet, x, table, [], ac, settings, torch.float32)

        step = None
        if static:
            step = StaticStep(loss_fn, params, opt, 1.0, gather_inputs([(cache, rows[0])],
                                                                        torch.Generator().manual_seed(99), settings))
        losses = []
        for r in rows:
            x = gather_inputs([(cache, r)], gen, settings)
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
    assert max(p.abs().max().item() for p in p_eager[1::2]) > 0  # B moved away from zero


@pytest.mark.parametrize("name", ["prodigy", "schedulefree", "adafactor"])
def test_static_step_with_a_graph_optimizer_equals_the_package_eagerly(name):
    """The static step with the capturable optimizer (training/optim_graph.py, its host part run by the step
    before each replay) trains as the eager step with the package does (prodigyopt, schedulefree, torch): the
    check benchmarks/graph_optim_check.py runs captured on a GPU, here uncaptured."""
    import importlib.util

    pytest.importorskip({"prodigy": "prodigyopt", "schedulefree": "schedulefree"}.get(name, "torch"))
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "graph_optim_check.py"
    spec = importlib.util.spec_from_file_location("graph_optim_check", path)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    cpu = torch.device("cpu")
    l_eager, p_eager, start, how_eager = check.one_run(name, "package", 8, cpu)
    l_static, p_static, _, how = check.one_run(name, "static", 8, cpu)
    assert "optim_graph" in how and "optim_graph" not in how_eager
    assert l_eager == pytest.approx(l_static, abs=1e-5)
    assert check.largest_difference(p_eager, p_static) <= 1e-5
    assert check.largest_difference(p_eager, start) > 1e-5  # the weights moved
    # float64, the dtype the GPU check decides on: its tolerance holds here too
    _, p64_eager, _, _ = check.one_run(name, "package", 8, cpu, torch.float64)
    _, p64_static, _, _ = check.one_run(name, "static", 8, cpu, torch.float64)
    assert check.largest_difference(p64_eager, p64_static) <= 1e-6
    with pytest.raises(ValueError, match="CUDA"):
        check.one_run(name, "captured", 1, cpu)


def test_bf16_lora_product_matches_float32_and_keeps_float32_grads():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48)
    layer = inject_target = torch.nn.Sequential(base)
    inject_lora(inject_target, LoRAConfig(rank=4, targets=("0",)))
    lora = layer[0]
    assert isinstance(lora, LoRALinear)
    with torch.no_grad():
        lora.lora_B["default"].normal_()
    x = torch.randn(8, 64)
    ref = lora(x)
    lora.to(torch.bfloat16)
    lora.lora_A["default"].data = lora.lora_A["default"].data.float()
    lora.lora_B["default"].data = lora.lora_B["default"].data.float()
    lora.compute_dtype = torch.bfloat16
    out = lora(x.bfloat16())
    assert out.dtype == torch.bfloat16
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel
    out.float().sum().backward()
    assert lora.lora_A["default"].grad.dtype == torch.float32 and lora.lora_B["default"].grad.abs().sum() > 0


def test_gathered_inputs_draw_timesteps_uniformly_and_latents_from_the_cached_distribution():
    """What each step trains on: timesteps uniform over the scheduler's whole range (a constant or a narrow
    timestep sampler fails; the recipe-level quality test catches a constant one only by a thin margin), standard
    normal noise, and latents drawn as mean + std * N(0, 1) of the rows asked for."""
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(4, 4, 8, 8, generator=g), 0.1 + torch.rand(4, 4, 8, 8, generator=g)
    cache = BucketCache((64, 64), mean, std, torch.tensor([0, 1, 0, 1]), torch.zeros(4, 6))
    settings = StepSettings("epsilon", 1000, 5.0, 0.1, 1.0, 1.0, False)
    gen = torch.Generator().manual_seed(1)
    draws = [gather_inputs([(cache, torch.tensor([0, 3]))], gen, settings) for _ in range(2000)]
    t = torch.cat([x.timesteps for x in draws])
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
    counts = torch.bincount(t // 100, minlength=10).float()  # 4000 draws in 10 bins of 100 timesteps
    assert (counts - 400).abs().max() < 80, counts.tolist()  # about 5 standard deviations of a fair bin
    assert int(t.min()) < 10 and int(t.max()) > 989
    noise = torch.cat([x.noise for x in draws])
    assert abs(float(noise.mean())) < 0.01 and abs(float(noise.std()) - 1) < 0.01
    lat = torch.stack([x.latents for x in draws])  # (draws, rows, C, H, W)
    z = (lat - mean[[0, 3]]) / std[[0, 3]]
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01


def test_compile_regions_compiles_each_repeated_block_and_keeps_the_function(tmp_path, monkeypatch):
    """--compile is regional: each of the UNet's repeated blocks (diffusers' _repeated_blocks) is compiled in place,
    not the UNet; the kernel cache goes to the given folder; the compiled model computes the same loss and
    gradients (dynamo's eager backend here: the tracing through the LoRA layers, without inductor's C++ build)."""
    from lora_vision.training.sd.loop import compile_cache_dir, compile_regions

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache_dir(None) == tmp_path / "xdg" / "lora_vision" / "torch_compile"
    assert compile_cache_dir("~/c") == Path("~/c").expanduser()
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        unet, params, _, cache, table, settings, ac = _setup()
        if compiled:
            n = compile_regions(unet, tmp_path / "cache", backend="eager")
            blocks = [m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
            assert n == len(blocks) > 0
            assert all(b._compiled_call_impl is not None for b in blocks)
            assert unet._compiled_call_impl is None  # the UNet itself is not compiled whole
            assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache")
            assert (tmp_path / "cache").is_dir()
        x = gather_inputs([(cache, torch.tensor([0, 2]))], torch.Generator().manual_seed(3), settings)
        loss = step_loss(unet, x, table, [], ac, settings, torch.float32)
        loss.backward()
        results.append((float(loss.detach()), [p.grad.clone() for p in params]))
    torch._dynamo.reset()
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    assert max((a - b).abs().max().item() for a, b in zip(results[0][1], results[1][1])) <= 1e-6


def test_a_released_static_step_gives_the_optimizer_its_host_part_back():
    """A capture that fails hands the run to the eager step (TrainingSteps.use_static): the captured optimizer must
    then advance its own counters in step() again, or it would repeat its first step's numbers."""
    unet, params, _, cache, table, settings, ac = _setup()
    opt = build_optimizer([{"params": params, "lr": 1e-2}], betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8,
                          name="schedulefree", capturable=True)
    example = gather_inputs([(cache, torch.tensor([0, 1]))], torch.Generator().manual_seed(9), settings)
    step = StaticStep(lambda x: step_loss(unet, x, table, [], ac, settings, torch.float32), params, opt, 1.0, example)
    assert opt.prepared_outside
    step.release()
    assert not opt.prepared_outside and step.prepare is None
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.step()
    assert opt.param_groups[0]["k"] == 2  # each step() prepared itself
