"""Low-memory DiT training: the frozen transformer's Linear weights quantized in place with torchao (weight-only),
the LoRA trained on top in the compute dtype (issue #16's low-memory mode; QLoRA, Dettmers et al. 2023,
https://arxiv.org/abs/2305.14314, for NF4).

| --quantize_base | torchao config            | where it runs                          | weight bytes |
|-----------------|---------------------------|----------------------------------------|--------------|
| int8            | Int8WeightOnlyConfig      | CPU and CUDA                           | 1 + scales   |
| fp8             | Float8WeightOnlyConfig    | CUDA, compute capability 8.9 or newer  | 1 + scales   |
| nf4             | NF4WeightOnlyConfig       | CPU and CUDA; weights of a multiple of 64 x 256 elements | 0.5 + scales |

Only the base weights change: the LoRA layers wrap the quantized Linear (their own A and B stay ordinary float
parameters), the adapter file holds LoRA tensors only, and it loads on the unquantized base. Merging into a
quantized base is not possible; the training run never merges.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

QUANTIZE_KINDS: tuple[str, ...] = ("none", "int8", "fp8", "nf4")
TORCHAO_PIN = "torchao==0.17.0"
# NF4 stores one scale per 64 weights and quantizes those scales in blocks of 256 (torchao's defaults).
_NF4_BLOCK, _NF4_SCALER_BLOCK = 64, 256


def quantize_unsupported_reason(kind: str, device: torch.device) -> str | None:
    """Why `kind` cannot quantize the base on `device` (one clause), or None when it can."""
    if kind == "none":
        return None
    try:
        import torchao  # noqa: F401
    except ImportError:
        return f"it needs torchao: pip install \"lora_vision[lowmem]\" (or {TORCHAO_PIN})"
    if kind == "fp8":
        if device.type != "cuda":
            return (f"fp8 weight-only is for CUDA GPUs of compute capability 8.9 or newer (native float8); on "
                    f"{device.type} use --quantize_base int8 or nf4")
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return (f"fp8 weight-only needs compute capability 8.9 or newer (native float8; this GPU has "
                    f"{major}.{minor}); use --quantize_base int8 or nf4")
    return None


def _config(kind: str) -> Any:
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    if kind == "int8":
        return Int8WeightOnlyConfig(version=2)  # the Int8Tensor weight (version 1 is deprecated in torchao)
    if kind == "fp8":
        return Float8WeightOnlyConfig()
    if kind == "nf4":
        from torchao.prototype._nf4tensor_api import NF4WeightOnlyConfig

        config = NF4WeightOnlyConfig()
        config.block_size, config.scaler_block_size = _NF4_BLOCK, _NF4_SCALER_BLOCK
        return config
    raise ValueError(f"quantize_base got {kind!r}; expected one of {', '.join(QUANTIZE_KINDS)}")


_SHAPES = {"nf4": f"NF4 needs a multiple of {_NF4_BLOCK * _NF4_SCALER_BLOCK} weights per layer",
           "fp8": "fp8 needs both sides a multiple of 16", "int8": "any shape"}


def _fits(kind: str, linear: nn.Linear) -> bool:
    """Whether torchao can quantize this layer's weight as `kind` (NF4 and fp8 need block-aligned shapes)."""
    if kind == "nf4":
        return linear.weight.numel() % (_NF4_BLOCK * _NF4_SCALER_BLOCK) == 0
    if kind == "fp8":
        return linear.in_features % 16 == 0 and linear.out_features % 16 == 0
    return True


def quantize_base(model: nn.Module, kind: str) -> str:
    """Quantize the weights of `model`'s frozen nn.Linear layers in place (before any LoRA is added); returns a
    line for the user: how many layers, and the weight bytes before and after."""
    from torchao.quantization import quantize_

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    chosen = {id(m) for m in linears if _fits(kind, m)}
    if not chosen:
        raise ValueError(f"--quantize_base {kind}: none of the {len(linears)} Linear layers of the "
                         f"{type(model).__name__} has a weight torchao can quantize as {kind} ({_SHAPES[kind]}); "
                         "use --quantize_base int8")
    before = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    quantize_(model, _config(kind), filter_fn=lambda m, _name: id(m) in chosen)
    after = sum(_bytes(m.weight) for m in linears)
    return (f"quantized base: {len(chosen)} of {len(linears)} Linear layers of the {type(model).__name__} to {kind} "
            f"(torchao), Linear weights {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB")


def _bytes(t: torch.Tensor) -> int:
    """Storage bytes of a plain or torchao-quantized tensor (its inner tensors summed)."""
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is None or type(t) is torch.Tensor or type(t) is nn.Parameter:
        return t.numel() * t.element_size()
    names, _ = inner()
    return sum(_bytes(getattr(t, n)) for n in names)
