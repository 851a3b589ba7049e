"""training.dit.lowmem: the frozen base quantized with torchao under a LoRA that still trains (CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_vision import LoRAConfig, inject_lora, lora_parameters
from lora_vision.training.dit.lowmem import quantize_base, quantize_unsupported_reason


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 128), nn.GELU(), nn.Linear(128, 256))  # 32,768 weights each: NF4 fits


@pytest.mark.parametrize("kind, tol", [("int8", 0.02), ("nf4", 0.15)])
def test_quantized_base_stays_close_and_the_lora_on_top_trains(kind, tol):
    model, reference = _mlp(), _mlp()
    model.requires_grad_(False)
    note = quantize_base(model, kind)
    assert f"2 of 2 Linear layers of the Sequential to {kind}" in note
    assert type(model[0].weight) is not nn.Parameter and type(model[0].weight) is not torch.Tensor
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = reference(x)
        assert (model(x) - ref).norm() < tol * ref.norm()  # relative error of the outputs
    inject_lora(model, LoRAConfig(rank=4, targets=("0", "2")))
    params = list(lora_parameters(model))
    optimizer = torch.optim.Adam(params, lr=1e-2)
    target = torch.randn(8, 256, generator=torch.Generator().manual_seed(2))
    first = None
    for _ in range(30):
        loss = (model(x) - target).pow(2).mean()
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.9 * first
    assert all(p.dtype == torch.float32 for p in params)  # the LoRA stays in the compute dtype


def test_a_layer_shape_nf4_cannot_hold_is_left_alone_and_none_at_all_is_an_error():
    small = nn.Sequential(nn.Linear(256, 128), nn.Linear(128, 8))  # the second has 1,024 weights
    assert "1 of 2 Linear layers" in quantize_base(small.requires_grad_(False), "nf4")
    assert type(small[1].weight) is nn.Parameter
    with pytest.raises(ValueError, match="none of the 1 Linear layers .* use --quantize_base int8"):
        quantize_base(nn.Sequential(nn.Linear(8, 8)), "nf4")


def test_fp8_is_refused_on_a_cpu_with_what_to_use():
    assert quantize_unsupported_reason("none", torch.device("cpu")) is None
    assert quantize_unsupported_reason("int8", torch.device("cpu")) is None
    why = quantize_unsupported_reason("fp8", torch.device("cpu"))
    assert "compute capability 8.9" in why and "int8 or nf4" in why
