"""The step profiler behind --profile_steps (lora_vision.training.profiling): which steps it profiles, the table of
kernel categories, and kernel names as CUDA profiles spell them."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from lora_vision.training.profiling import StepProfiler, kernel_category, kernel_table


@pytest.mark.parametrize("name, category", [
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM"),
    ("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNN", "GEMM"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<float>", "convolution"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("Memcpy DtoD (Device -> Device)", "copies and layout"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "elementwise"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>", "normalization"),
    ("aten::addmm", "GEMM"),
    ("aten::mul", "elementwise"),
    ("cudaGraphLaunch", "other"),
])
def test_kernel_names_fall_in_their_category(name, category):
    assert kernel_category(name) == category


def test_profiler_covers_the_asked_steps_and_its_table_adds_up(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    prof = StepProfiler(3, start=0, device=torch.device("cpu"), folder=tmp_path / "p", warmup=2, header="command: x")
    for step in range(8):
        loss = model(torch.randn(32, 64)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        prof.after_step(step)
    assert prof.written == tmp_path / "p" / "kernels.md"
    text = prof.written.read_text()
    assert text.startswith("# Where the training step's time goes\n\ncommand: x\n\nSteps 3-5 of the run")
    # 3 steps x 3 matmuls forward (2 Linear + the loss has none) ... each Linear is one addmm per step forward
    addmm = [line for line in text.splitlines() if line.startswith("| `aten::addmm`")]
    assert addmm and addmm[0].split(" | ")[2] == "2", addmm  # two Linear layers: 2 calls per step
    cats = [line for line in text.splitlines()[:20] if re.match(r"\| [a-zA-Z ]+ \| [\d.]+ \| \d+ \| [\d.]+% \|", line)]
    assert abs(sum(float(c.split(" | ")[3].rstrip("% |")) for c in cats) - 100) < 0.5, cats
    assert prof.finish() == prof.written  # nothing more to write once done


def test_a_run_that_ends_before_the_profiled_steps_writes_nothing(tmp_path):
    prof = StepProfiler(2, start=10, device=torch.device("cpu"), folder=tmp_path / "p", warmup=5)
    for step in range(10, 14):
        prof.after_step(step)
    assert prof.finish() is None and not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match="at least 1"):
        StepProfiler(0, start=0, device=torch.device("cpu"), folder=tmp_path / "q")


def test_device_kernels_are_counted_once_not_again_under_the_op_that_launched_them():
    class Avg:  # the fields kernel_table reads of torch's FunctionEventAvg
        def __init__(self, key, device_type, count, self_cpu, self_device):
            self.key, self.device_type, self.count = key, device_type, count
            self.self_cpu_time_total, self.self_device_time_total = self_cpu, self_device

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    events = [Avg("aten::mm", cpu, 4, 50.0, 900.0), Avg("sm90_xmma_gemm_bf16", cuda, 4, 0.0, 900.0),
              Avg("flash_fwd_kernel", cuda, 2, 0.0, 100.0)]
    table = kernel_table(events, on_device=True, steps=2, wall_s=0.002)
    assert "device kernels busy 0.50 ms per step (50% of the wall time" in table, table
    assert "| GEMM | 0.450 | 2 | 90.0% |" in table and "| attention | 0.050 | 1 | 10.0% |" in table, table
