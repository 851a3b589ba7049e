"""What every importer shares: the description of the target models, the import report, the assembly of
foreign (down, up, alpha) groups into canonical tensors checked against the target's shapes, and the guess of an
adapter's base architecture."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ..io import AdapterFileError
from ..lora.spec import LayerSpec
from ..terminal import printable
from . import naming

# The components of diffusers pipelines that adapters and the diffusers/PEFT format know (SD and DiT pipelines).
SD_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


class AdapterMismatchError(AdapterFileError):
    """An adapter does not fit the model it is read for (another base model, missing modules, other shapes)."""


class BaseMismatchError(AdapterMismatchError):
    """The file was made for another base model (other architecture, other widths)."""


@dataclass
class ComponentInfo:
    """What an importer needs to know about one live model: adaptable modules (class name, weight shape) and
    naming facts. Built from a live model (`describe_models`) or from a standard layout when none is given."""

    modules: Mapping[str, tuple[str, tuple[int, ...]]]
    has_text_model: bool = False
    unet_config: Mapping[str, Any] | None = None
    family: str | None = None
    live: bool = False  # True when built from the real target model (shapes are authoritative)
    weight: Callable[[str], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    """The live module's base weight by name (live models only): for updates that depend on it (DoRA, OFT, ...)
    when a reader must work them out itself (a kind over a fused DiT module)."""
    norms: Mapping[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    """LayerNorm / GroupNorm modules (class name, weight shape): where norm-layer updates (w_norm / b_norm) go."""

    def module_of(self, name: str) -> tuple[str, tuple[int, ...]] | None:
        """(class name, weight shape) of module `name`, adaptable or norm; None when the model has no such module."""
        return self.modules.get(name) or self.norms.get(name)


def describe_models(models: Mapping[str, nn.Module]) -> dict[str, ComponentInfo]:
    """ComponentInfo per component of live models, e.g. {"unet": pipe.unet, "text_encoder": pipe.text_encoder}.

    The modules are described when asked (LiveModules): a reader that asks about the names of its file looks up
    those, one that goes through them all walks the model once; nothing is kept beyond the description."""
    out: dict[str, ComponentInfo] = {}
    for comp, model in models.items():
        if model is None:
            continue
        cfg = dict(model.config) if comp == "unet" and hasattr(model, "config") else None
        fam = naming.sd_family(cfg) if cfg is not None else (
            naming.dit_family(type(model).__name__) if comp == "transformer" else None)
        out[comp] = ComponentInfo(LiveModules(model), hasattr(model, "text_model"), cfg, fam, live=True,
                                  weight=functools.partial(_live_weight, model),
                                  norms=LiveModules(model, norms=True))
    return out


class LiveModules(Mapping[str, tuple[str, tuple[int, ...]]]):
    """(class name, weight shape) of the adaptable modules of a live model by name (naming.adaptable_modules), or
    of its LayerNorm / GroupNorm modules (`norms`, naming.norm_modules): a name is looked up along the children
    when asked (naming.live_module); iterating walks the model, once."""

    def __init__(self, model: nn.Module, norms: bool = False) -> None:
        self._model, self._norms = model, norms
        self._all: dict[str, tuple[str, tuple[int, ...]]] | None = None

    def _walked(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        if self._all is None:
            mods = naming.norm_modules(self._model) if self._norms else naming.adaptable_modules(self._model)
            self._all = {n: (type(m).__name__, _weight_shape(m)) for n, m in mods.items()}
        return self._all

    def __getitem__(self, name: str) -> tuple[str, tuple[int, ...]]:
        if self._all is not None:
            return self._all[name]
        m = naming.live_module(self._model, name, self._norms) if isinstance(name, str) else None
        if m is None:
            raise KeyError(name)
        return type(m).__name__, _weight_shape(m)

    def __iter__(self) -> Iterator[str]:
        return iter(self._walked())

    def __len__(self) -> int:
        return len(self._walked())

    def __repr__(self) -> str:
        return f"LiveModules({self._walked()!r})"


def _live_weight(model: nn.Module, name: str) -> torch.Tensor:
    m = naming.live_module(model, name)
    if m is None:
        raise KeyError(name)
    return m.weight


def _weight_shape(m: nn.Module) -> tuple[int, ...]:
    if isinstance(m, nn.MultiheadAttention):
        return tuple(m.in_proj_weight.shape)
    return tuple(m.weight.shape)


def part_weight_shape(mtype: str, wshape: tuple[int, ...], part: str) -> tuple[int, ...]:
    """The weight shape a layer on `part` (q / k / v / o) of a module sees: a MultiheadAttention's part is one
    (d, d) block of its (3d, d) in_proj_weight (or out_proj.weight); a module without parts, its own weight."""
    if part and mtype == "MultiheadAttention":
        return (wshape[1], wshape[1])
    return tuple(wshape)


def standard_unet_info(layout: str) -> ComponentInfo:
    """ComponentInfo of a standard full-size UNet layout ("sd1", "sd2", "sdxl"), for files loaded without a model."""
    return ComponentInfo(naming.standard_unet_modules(layout), unet_config=naming.STANDARD_UNET_CONFIGS[layout],
                         family=layout, norms=naming.standard_unet_modules(layout, norms=True))


@dataclass
class ImportReport:
    """What an import matched and what it did not; `strict` loads raise unless `ok`."""

    format: str
    base: str | None = None
    matched: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    """Layers whose tensors are broken (half a kind's factors, shapes that do not fit, ...), one line each."""
    kinds: dict[str, int] = field(default_factory=dict)
    """Matched layers per kind ("LoRA", "LoHa", "LoKr+DoRA", ...)."""
    notes: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)  # fused file modules split into live ones: "qkv -> to_q, to_k"
    full_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    rules: dict[str, dict[str, str]] = field(default_factory=dict)
    """Scaling rule of every imported layer, {component: {module[.part]: rule}}, for files that record one (ours);
    the other formats' alphas are for the plain rule."""
    widened: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Modules whose input the file widens, {component.module: (model inputs, file inputs)}: a Flux.1 control LoRA's
    x_embedder takes image + control latents, which only a FluxControlPipeline feeds (pipeline.load_adapter widens
    the module there); any other model does not take the file."""
    variant: str | None = None
    """What the file is within its base family when it is a special one ("Flux.1 control LoRA")."""
    layers: dict[str, dict[str, LayerSpec]] | None = field(default=None, repr=False)
    """The imported layers as parsed, {component: {module[.part]: LayerSpec}} under the live names, rules included:
    what `Adapter.layers` of the adapter read gives, kept by the readers that parse layers (our own files) so that
    a loader need not parse them again; None when the reader did not keep them."""

    @property
    def ok(self) -> bool:
        return not (self.unused or self.not_found or self.unsupported or self.invalid or self.widened)

    def __str__(self) -> str:
        lines = [f"format {self.format}" + (f", base {self.base}" if self.base else "")
                 + f": matched {len(self.matched)} modules"
                 + (f" ({', '.join(f'{k} {n}' for k, n in self.kinds.items())})" if self.kinds else "")]
        for what, label in (("unused", "tensors not used"), ("not_found", "modules not found in the model"),
                            ("unsupported", "unsupported tensors (not applied)"),
                            ("invalid", "broken layers (not applied)")):
            items = getattr(self, what)
            if items:
                more = f" ... (+{len(items) - 6} more)" if len(items) > 6 else ""
                lines.append(f"{label} ({len(items)}): " + ", ".join(printable(i) for i in items[:6]) + more)
        if self.widened:
            lines.append("widened inputs, for a FluxControlPipeline only: " + ", ".join(
                f"{m} takes {new} inputs, the model {old}" for m, (old, new) in self.widened.items()))
        if self.split:
            more = f" ... (+{len(self.split) - 6} more)" if len(self.split) > 6 else ""
            lines.append(f"split ({len(self.split)}): " + "; ".join(printable(i) for i in self.split[:6]) + more)
        lines += [printable(n) for n in self.notes]
        if self.full_weights:
            names = sorted(self.full_weights)
            more = f" ... (+{len(names) - 6} more)" if len(names) > 6 else ""
            lines.append(f"full weights, set as they are ({len(names)}; peft's modules_to_save, a control LoRA's norm "
                         f"scales): {printable(', '.join(names[:6]))}{more}")
        return "\n".join(lines)

    def raise_if_strict(self, strict: bool, source: str) -> None:
        """In strict mode any mismatch is an error naming all of them."""
        if strict and not self.ok:
            raise AdapterMismatchError(f"{source}: strict load failed:\n{self}\n(pass strict=False to load what fits)")


NORM_TYPES = ("LayerNorm", "GroupNorm")
"""Class names of the modules that take norm-layer updates only (never a LoRA pair)."""

# Tensor kinds we recognise but cannot represent as plain LoRA.
UNSUPPORTED_MARKERS = ("hada_", "lokr_", "dora_scale", "lora_mid", ".scale", ".bias", "oft_", "boft_", ".diff",
                       "w_norm", "b_norm", "bundle_emb", "lora_te_embedding", "reshape_weight", "magnitude_vector")


def is_unsupported(suffix: str) -> bool:
    """True for tensor suffixes of LoRA variants we do not apply (LoHa, LoKr, DoRA, Tucker mid, ...)."""
    s = "." + suffix
    return any(m in s for m in UNSUPPORTED_MARKERS)


def fit_pair(label: str, kind: str, wshape: tuple[int, ...] | None, down: torch.Tensor, up: torch.Tensor,
             live: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape (down, up) to the canonical layout of a `kind` module with weight `wshape`; raise on mismatch.

    Linear: A (r, in), B (out, r). Conv2d: A (r, in, kh, kw) carrying the kernel, B (out, r, 1, 1).
    """
    r = down.shape[0]
    if up.dim() < 2 or up.shape[1] != r:
        raise AdapterFileError(f"{label}: lora_up/B has shape {tuple(up.shape)} but lora_down/A has rank {r}; "
                               "the file is broken")
    if kind == "Conv2d":
        if down.dim() == 2:
            down = down.reshape(r, down.shape[1], 1, 1)
        if up.dim() == 2:
            up = up.reshape(up.shape[0], r, 1, 1)
    elif kind == "Linear":
        if down.dim() == 4 and down.shape[2:] == (1, 1):
            down = down.flatten(1)
        if up.dim() == 4 and up.shape[2:] == (1, 1):
            up = up.flatten(1)
    if wshape is not None and live:
        want_a = (r, wshape[1], *wshape[2:]) if kind == "Conv2d" else (r, wshape[1])
        want_b = (wshape[0], r, 1, 1) if kind == "Conv2d" else (wshape[0], r)
        if tuple(down.shape) != want_a or tuple(up.shape) != want_b:
            raise BaseMismatchError(
                f"{label}: the file has lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} but the model's "
                f"{kind} weight is {tuple(wshape)} (needs {want_a} / {want_b}); the file was made for another base "
                f"model (different widths)")
    return down, up


def alpha_value(label: str, t: torch.Tensor | None, rank: int) -> float:
    """alpha as a float (defaults to rank, as every loader does); rejects non-scalar, 0 or non-finite."""
    if t is None:
        return float(rank)
    if t.numel() != 1:
        raise AdapterFileError(f"{label}: alpha must be a scalar, got shape {tuple(t.shape)}")
    a = float(t.float().item())
    if not (a == a) or a in (float("inf"), float("-inf")) or a == 0:
        raise AdapterFileError(f"{label}: alpha {a} is not a usable scale (must be finite and non-zero)")
    return a


def put(out: dict[str, torch.Tensor], comp: str, module: str, down: torch.Tensor, up: torch.Tensor,
        alpha: float) -> None:
    """Store one canonical entry `comp.module.lora_A.weight` / `.lora_B.weight` / `.alpha`."""
    key = f"{comp}.{module}"
    out[f"{key}.lora_A.weight"] = down
    out[f"{key}.lora_B.weight"] = up
    out[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)


def guess_base(tensors: Mapping[str, torch.Tensor]) -> str:
    """Base architecture of canonical adapter tensors: sd1, sd2, sdxl, hf-vit, torchvision-vit, timm-vit or unknown.

    SDXL is told by its layout (text_encoder_2, transformer depth > 1 in the UNet); SD 1.x from SD 2.x by
    widths when they are the real ones (cross-attention 768 vs 1024, CLIP 768 vs 1024), else by proj_in (1x1 conv
    in SD 1.x, Linear in SD 2.x).
    """
    keys = list(tensors)
    if any(k.startswith("transformer.") for k in keys):
        return "unknown"  # a DiT transformer: its family is not told from canonical names here
    if any(k.startswith("text_encoder_2.") for k in keys) or any(
            ".transformer_blocks.1." in k for k in keys if k.startswith("unet.")):
        return "sdxl"
    if any(k.startswith("model.") for k in keys):
        if any(".self_attention." in k for k in keys):
            return "torchvision-vit"
        if any(".attn.qkv." in k for k in keys):
            return "timm-vit"
        return "hf-vit" if any("attention" in k for k in keys) else "unknown"
    if not any(k.startswith(("unet.", "text_encoder.")) for k in keys):
        return "unknown"
    for k, t in tensors.items():
        if k.endswith("attn2.to_k.lora_A.weight") and t.shape[1] in (768, 1024):
            return "sd1" if t.shape[1] == 768 else "sd2"
        if k.startswith("text_encoder.") and k.endswith("q_proj.lora_A.weight") and t.shape[1] in (768, 1024):
            return "sd1" if t.shape[1] == 768 else "sd2"
    for k, t in tensors.items():
        if (k.endswith("proj_in.lora_A.weight") or k.endswith("proj_out.lora_A.weight")) and k.startswith("unet."):
            return "sd1" if t.dim() == 4 else "sd2"
    return "sd1"  # SD 1.x and 2.x share names; without width hints assume the more common one
