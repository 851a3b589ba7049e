"""What a loaded adapter changes besides its LoRA layers: the widened input of a Flux.1 control LoRA, and tensors an
adapter sets in full (a control LoRA's norm scales, peft's modules_to_save).

A Flux.1 control LoRA (formats/dit_control.py) widens x_embedder to take the image latents and the control latents
side by side. In a FluxControlPipeline the loader replaces x_embedder by a Linear with the wider input, its weight in
the first columns and zeros in the new ones (the control channels add nothing until the LoRA layer on it runs), the
same bias, and sets the transformer's `in_channels` to match, as diffusers' FluxLoraLoaderMixin does; the original
module object is kept and put back when the last adapter on the widened module is unloaded. Any other pipeline
does not feed control latents: the file is refused whole, never half applied.

Full tensors are copied into the model's parameters as they are (no strength: that applies to the LoRA part), the
originals kept; they follow the adapter: set while it is active, the originals while it is not, and restored
exactly when it is unloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ..adapter import FULL, Adapter, _model_tensor
from ..formats import AdapterMismatchError, ImportReport
from ..formats.dit_tables import CONTROL_CONFIG, CONTROL_INPUT, CONTROL_PIPELINES
from ..lora.inject import find_module, replace_module
from ..lora.layers import LoRALayer


@dataclass
class Widening:
    """One widened input layer: the original module (put back at the end) and its wider copy, and the adapters
    that have a layer on it."""

    comp: str
    module: str
    original: nn.Module
    wide: nn.Module
    inputs: tuple[int, int]  # (original, widened)
    owners: set[str] = field(default_factory=set)


@dataclass
class FullTensor:
    """A model tensor an adapter sets: the live parameter, its original value and the adapter's value (both on the
    parameter's device and in its dtype)."""

    key: str
    param: torch.Tensor
    original: torch.Tensor
    value: torch.Tensor


def is_control_pipeline(pipe: Any) -> bool:
    """True for the diffusers pipelines that feed image and control latents side by side (FluxControlPipeline,
    its Img2Img and Inpaint variants, and subclasses)."""
    return any(c.__name__ in CONTROL_PIPELINES for c in type(pipe).__mro__)


def widened_linear(lin: nn.Linear, inputs: int) -> nn.Linear:
    """A copy of `lin` taking `inputs` inputs: its weight in the first columns, zeros in the others, the same bias,
    device, dtype and training flags."""
    wide = nn.utils.skip_init(nn.Linear, inputs, lin.out_features, bias=lin.bias is not None,
                              device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, : lin.in_features].copy_(lin.weight)
        if lin.bias is not None:
            wide.bias.copy_(lin.bias)
    wide.weight.requires_grad_(lin.weight.requires_grad)
    if lin.bias is not None:
        wide.bias.requires_grad_(lin.bias.requires_grad)
    return wide.train(lin.training)


def plan_widening(pipe: Any, comps: Mapping[str, nn.Module], report: ImportReport | None,
                  label: str) -> dict[str, Widening]:
    """The input layers the file widens ({component.module: Widening}, built but not installed; empty when none).
    Raises AdapterMismatchError, in every mode, when the pipeline does not feed control latents or the layer
    already carries adapters made for its original width."""
    if report is None or not report.widened:
        return {}
    what = ", ".join(f"{k} takes {new} input channels in the file (image + control latents), {old} in the model"
                     for k, (old, new) in report.widened.items())
    if not is_control_pipeline(pipe):
        raise AdapterMismatchError(
            f"{label} is a Flux.1 control LoRA: {what}; {type(pipe).__name__} does not feed control latents, so "
            "nothing was loaded (strict=False does not change this: every layer of the file was trained with the "
            "control input). Load it into a FluxControlPipeline of the same model: FluxControlPipeline.from_pipe(pipe)")
    out = {}
    for key, (old, new) in report.widened.items():
        comp, _, mod = key.partition(".")
        target = find_module(comps[comp], mod)
        if isinstance(target, LoRALayer):
            raise AdapterMismatchError(
                f"{label}: {what}, but {key} carries adapter(s) {list(target.lora_A)} made for {old} inputs; unload "
                "them first (unload_adapter), then load the control LoRA")
        if not isinstance(target, nn.Linear):
            raise AdapterMismatchError(f"{label}: {what}, but {key} is a {type(target).__name__}, not a Linear")
        out[key] = Widening(comp, mod, target, widened_linear(target, new), (old, new))
    return out


def _set_inputs(model: nn.Module, w: Widening, inputs: int) -> None:
    config = getattr(model, "config", None)
    if w.module == CONTROL_INPUT and config is not None and CONTROL_CONFIG in config:
        model.register_to_config(**{CONTROL_CONFIG: inputs})


def install(comps: Mapping[str, nn.Module], widenings: Mapping[str, Widening]) -> None:
    """Put the widened layers in place (and the transformer's in_channels to match)."""
    for w in widenings.values():
        replace_module(comps[w.comp], w.module, w.wide)
        _set_inputs(comps[w.comp], w, w.inputs[1])


def uninstall(comps: Mapping[str, nn.Module], widenings: Mapping[str, Widening]) -> None:
    """Put the original layers back (the same module objects) and the transformer's in_channels."""
    for w in widenings.values():
        replace_module(comps[w.comp], w.module, w.original)
        _set_inputs(comps[w.comp], w, w.inputs[0])


def plan_full(comps: Mapping[str, nn.Module], adapter: Adapter, label: str,
              taken: Mapping[int, str]) -> list[FullTensor]:
    """The tensors the adapter sets in full, checked against the model before anything changes: each must name a
    parameter of a given component, with the same shape, not set by another loaded adapter (`taken`: id of the
    parameter -> adapter name). Raises AdapterMismatchError naming every problem, in every mode."""
    out, problems = [], []
    prefix = FULL + "."
    for key in sorted(k for k in adapter.tensors if k.startswith(prefix)):
        comp, _, name = key[len(prefix):].partition(".")
        new = adapter.tensors[key]
        try:
            param = _model_tensor(comps[comp], name) if comp in comps else None
        except AttributeError:
            param = None
        if param is None:
            problems.append(f"{comp}.{name}: the pipeline has no such parameter")
        elif tuple(param.shape) != tuple(new.shape):
            problems.append(f"{comp}.{name}: the file has shape {tuple(new.shape)}, the model {tuple(param.shape)}")
        elif id(param) in taken:
            problems.append(f"{comp}.{name}: already set by adapter {taken[id(param)]!r}")
        else:
            out.append(FullTensor(f"{comp}.{name}", param, param.detach().clone(),
                                  new.to(param.device, param.dtype)))
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise AdapterMismatchError(
            f"{label}: {len(problems)} of the tensors it sets in full do not fit, nothing was loaded: "
            f"{'; '.join(problems[:3])}{more}. Load it into the model it was made for, or unload the adapter that "
            "sets the same tensors first")
    return out


def set_full(tensors: list[FullTensor], active: bool) -> None:
    """The adapter's values (active) or the originals into the model's parameters."""
    with torch.no_grad():
        for t in tensors:
            t.param.copy_(t.value if active else t.original)
