"""Adapters that start from the base weight's own directions: PiSSA and OLoRA, as peft's `init_lora_weights`.

- PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948): W = U S Vᵀ; A = sqrt(S_r / s) V_rᵀ, B = U_r sqrt(S_r / s).
- OLoRA (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775): W = Q R; A = R_r (first r rows), B = Q_r.

In both, the base weight becomes the residual W - s B A (s = the layer's scaling), so the model's output at the start
is unchanged, and training moves A and B away from where they started. The trained model is then
W_res + s B A, which is not "original base + an update": an adapter file meant for the ORIGINAL base must carry
s (B A - B0 A0). `to_plain_delta_` does what peft's conversion on save does (`convert_pissa_to_lora` /
`path_initial_model_for_weight_conversion`): it restores the original base weights and turns every adapter into
the rank-2r plain update A' = [A; A0], B' = [B, -B0], with alpha' = s * 2r so that the scale is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .inject import inject_lora, remove_lora
from .layers import LoRALinear, lora_layers
from .ops import lora_specs
from .spec import LayerSpec

WEIGHT_INITS = ("pissa", "olora")


@dataclass
class StartPoint:
    """What a weight-based initialisation changed in one layer: its original base weight and starting factors."""

    weight: torch.Tensor
    """The base weight before it became the residual (its own dtype, on the CPU)."""
    A: torch.Tensor
    B: torch.Tensor


@torch.no_grad()
def init_from_weights_(model: nn.Module, method: str, name: str = "default") -> dict[str, StartPoint]:
    """Initialise adapter `name` of every adapted Linear layer with `method` ("pissa" or "olora") and replace the
    base weights by the residuals; returns {module: StartPoint}, what `to_plain_delta_` needs at export.

    Only plain Linear layers are supported (fused q/k/v and MultiheadAttention parts share one base weight):
    other adapted layers are an error naming them, before anything changes.
    """
    if method not in WEIGHT_INITS:
        raise ValueError(f"init={method!r}: expected one of {WEIGHT_INITS}")
    layers = [(n, layer) for n, layer in lora_layers(model) if name in layer.lora_A]
    if not layers:
        raise ValueError(f"no adapter named {name!r} in {type(model).__name__}; inject it first")
    fused = [n for n, layer in layers if not isinstance(layer, LoRALinear)]
    too_big = [f"{n} (rank {layer.ranks[name]} > {min(layer.base.weight.shape)})" for n, layer in layers
               if isinstance(layer, LoRALinear) and layer.ranks[name] > min(layer.base.weight.shape)]
    if fused or too_big:
        raise ValueError(f"{method} initialisation needs plain Linear layers with rank <= min(out, in): "
                         + "; ".join(([f"fused or attention layers {fused[:3]}" + (" ..." if len(fused) > 3 else "")]
                                      if fused else []) + ([f"too large rank: {too_big[:3]}"] if too_big else []))
                         + "; choose targets without fused projections (e.g. the -attn-mlp presets' Linear layers "
                         "by name) or a smaller rank")
    out: dict[str, StartPoint] = {}
    for mod_name, layer in layers:
        weight = layer.base.weight
        w, s, r = weight.detach().float(), layer.scaling(name), layer.ranks[name]
        if method == "pissa":
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            root = (sv[:r] / s).sqrt()
            a, b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
        else:
            q, rr = torch.linalg.qr(w)
            a, b = rr[:r].contiguous(), q[:, :r].contiguous()
        out[mod_name] = StartPoint(weight.detach().to("cpu", copy=True), a.cpu().clone(), b.cpu().clone())
        weight.data = (w - s * (b @ a)).to(weight.dtype)
        layer.load_pair_(name, "", a, b)
    return out


@torch.no_grad()
def to_plain_delta_(model: nn.Module, starts: dict[str, StartPoint], name: str = "default") -> int:
    """Restore the original base weights of the layers in `starts` and make adapter `name` there the plain update
    on them: A' = [A; A0], B' = [B, -B0], alpha' = s * 2r (rule "lora"), so that base + update is the trained model.
    Returns the number of layers converted; the adapter is no longer trainable afterwards (export only)."""
    specs = lora_specs(model, name)
    new: dict[str, LayerSpec] = {}
    for key, spec in specs.items():
        st = starts.get(key)
        if st is None:
            new[key] = spec
            continue
        a = torch.cat([spec.A.detach().float().cpu(), st.A.float()], dim=0)
        b = torch.cat([spec.B.detach().float().cpu(), -st.B.float()], dim=1)
        new[key] = LayerSpec(a, b, spec.scaling * a.shape[0], "lora")
    remove_lora(model, name)
    for mod_name, st in starts.items():
        weight = model.get_submodule(mod_name).weight
        weight.data = st.weight.to(weight.device)
    inject_lora(model, name=name, layers=new, freeze_base=False, trainable=False)
    return len(starts)
