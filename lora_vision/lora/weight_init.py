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
from .layers import lora_layers, part_weight
from .ops import lora_specs
from .spec import LayerSpec, layer_key

WEIGHT_INITS = ("pissa", "olora")


@dataclass
class StartPoint:
    """What a weight-based initialisation changed in one adapted weight: its original base weight and starting
    factors (`module` and `part`: where it sits, q / k / v / o of a fused projection or "")."""

    weight: torch.Tensor
    """The base weight before it became the residual (its own dtype, on the CPU): the part's rows for a part."""
    A: torch.Tensor
    B: torch.Tensor
    module: str = ""
    part: str = ""


@torch.no_grad()
def init_from_weights_(model: nn.Module, method: str, name: str = "default") -> dict[str, StartPoint]:
    """Initialise adapter `name` of every adapted Linear layer with `method` ("pissa" or "olora") and replace the
    base weights by the residuals; returns {module[.part]: StartPoint}, what `to_plain_delta_` needs at export.

    Fused projections (timm's qkv Linear, nn.MultiheadAttention) are initialised part by part, each from its own
    (d, in) block of the packed weight (lora.layers.part_weight), as if it were its own Linear. Convolutions and
    other kinds than plain LoRA are an error naming them, before anything changes, as is a rank above a weight's
    smaller side.
    """
    if method not in WEIGHT_INITS:
        raise ValueError(f"init={method!r}: expected one of {WEIGHT_INITS}")
    layers = [(n, layer) for n, layer in lora_layers(model) if name in layer.lora_A]
    if not layers:
        raise ValueError(f"no adapter named {name!r} in {type(model).__name__}; inject it first")
    other = [n for n, layer in layers if name in layer.kinds or not isinstance(layer.base, (nn.Linear,
                                                                                            nn.MultiheadAttention))]
    parts = [(layer_key(n, p), n, layer, p) for n, layer in layers if n not in other for p in layer.lora_pairs(name)]
    too_big = [f"{key} (rank {layer.ranks[name]} > {min(part_weight(layer, p).shape)})"
               for key, _, layer, p in parts if layer.ranks[name] > min(part_weight(layer, p).shape)]
    if other or too_big:
        raise ValueError(f"{method} initialisation needs Linear layers (fused projections included) of plain LoRA "
                         "with rank <= min(out, in): "
                         + "; ".join(([f"not plain LoRA on a Linear: {other[:3]}" + (" ..." if len(other) > 3 else "")]
                                      if other else []) + ([f"too large rank: {too_big[:3]}"] if too_big else []))
                         + "; leave those layers out of the targets or choose a smaller rank")
    out: dict[str, StartPoint] = {}
    for key, mod_name, layer, part in parts:
        view = part_weight(layer, part)
        w, s, r = view.detach().float(), layer.scaling(name), layer.ranks[name]
        if method == "pissa":
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            root = (sv[:r] / s).sqrt()
            a, b = root[:, None] * vh[:r], u[:, :r] * root[None, :]
        else:
            q, rr = torch.linalg.qr(w)
            a, b = rr[:r].contiguous(), q[:, :r].contiguous()
        out[key] = StartPoint(view.detach().to("cpu", copy=True), a.cpu().clone(), b.cpu().clone(), mod_name, part)
        view.copy_((w - s * (b @ a)).to(view.dtype))
        layer.load_pair_(name, part, a, b)
    return out


@torch.no_grad()
def to_plain_delta_(model: nn.Module, starts: dict[str, StartPoint], name: str = "default") -> int:
    """Restore the original base weights of the layers in `starts` and make adapter `name` there the plain update
    on them: A' = [A; A0], B' = [B, -B0], alpha' = s * 2r (rule "lora"), so that base + update is the trained model.
    Returns the number of weights converted; the adapter is no longer trainable afterwards (export only)."""
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
    for st in starts.values():
        view = part_weight(model.get_submodule(st.module), st.part)
        view.copy_(st.weight.to(view.device))
    inject_lora(model, name=name, layers=new, freeze_base=False, trainable=False)
    return len(starts)
