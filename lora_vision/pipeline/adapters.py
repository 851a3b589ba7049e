"""Adapters in diffusers pipelines (SD 1.x / 2.x / SDXL with a `unet`; Flux.1, Flux.2, SD 3.x, Qwen-Image, Z-Image
with a `transformer`): load, strength per component and block, switch, unload.

Every adapter loaded into a pipeline gets one StrengthTable per device, shared by all its layers in the denoiser
(UNet or transformer) and the text encoder(s), so a strength change is one small host-to-device copy. Switching the active adapters flips which
adapters each cached LoRA layer runs: nothing is reloaded. The bookkeeping lives on the pipeline object
(`pipe._lora_vision`), the LoRA wrappers in its modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..adapter import Adapter
from ..formats import AdapterMismatchError, AdapterSource, read_adapter
from ..io import AdapterFileError
from ..lora.inject import (ModuleNames, adapter_slot, expected_shapes, find_module, inject_lora, kind_problems,
                           remove_lora)
from ..lora.layers import LoRALayer, StrengthTable, lora_layers
from ..lora.spec import LayerSpec, split_key
from .control import FullTensor, Widening, install, plan_full, plan_widening, set_full, uninstall
from .embeddings import add_embeddings, prepare_embeddings, remove_embeddings
from .blocks import BlockStrengths, block_counts, block_of, multiplier, parse_block_strengths

PIPELINE_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
DENOISERS = ("unet", "transformer")  # the component that block strengths and `strength` apply to


@dataclass
class AdapterLoadReport:
    """What `load_adapter` did: the modules adapted per component, and what was skipped (strict=False)."""

    name: str
    source: str
    format: str
    modules: dict[str, list[str]]
    skipped: list[str] = field(default_factory=list)
    strength: float = 1.0
    te_strength: float = 1.0
    block_strengths: dict[str, float] = field(default_factory=dict)
    source_report: Any = None
    tokens: list[str] = field(default_factory=list)
    """Tokens of the bundled text embeddings added to the tokenizer(s) (pipeline.embeddings)."""

    @property
    def num_modules(self) -> int:
        return sum(len(v) for v in self.modules.values())

    def __str__(self) -> str:
        comps = ", ".join(f"{c} {len(m)} modules" for c, m in self.modules.items())
        blocks = f", blocks {self.block_strengths}" if self.block_strengths else ""
        skipped = f"; skipped {len(self.skipped)} that did not fit" if self.skipped else ""
        tokens = f"; embedding token(s) {', '.join(self.tokens)} added" if self.tokens else ""
        return (f"loaded adapter {self.name!r} from {self.source} ({self.format}): {comps}; strength "
                f"{self.strength:g} (text encoder {self.te_strength:g}{blocks}){skipped}{tokens}")


@dataclass
class _Loaded:
    """One adapter resident in a pipeline."""

    name: str
    modules: dict[str, list[str]]
    tables: list[StrengthTable]
    slot_groups: list[torch.Tensor]  # per table: group index of every slot
    groups: list[str]  # "<denoiser>:<block>" (unet / transformer) or a text-encoder component name
    strength: float
    te_strength: float
    blocks: dict[str, float]
    full: list[FullTensor] = field(default_factory=list)  # tensors it sets in full (pipeline.control)


@dataclass
class _State:
    adapters: dict[str, _Loaded] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    fused: dict[str, float] = field(default_factory=dict)
    layers: list[LoRALayer] = field(default_factory=list)
    widened: dict[str, Widening] = field(default_factory=dict)  # input layers widened for control LoRAs


def _state(pipe: Any) -> _State:
    st = getattr(pipe, "_lora_vision", None)
    if st is None:
        st = _State()
        pipe._lora_vision = st
    return st


def pipeline_components(pipe: Any) -> dict[str, nn.Module]:
    """The adaptable components of a diffusers pipeline: unet or transformer, text_encoder, text_encoder_2,
    text_encoder_3 (those present)."""
    comps = {c: getattr(pipe, c, None) for c in PIPELINE_COMPONENTS}
    comps = {c: m for c, m in comps.items() if isinstance(m, nn.Module)}
    if not any(c in comps for c in DENOISERS):
        raise TypeError(f"{type(pipe).__name__} has no `unet` or `transformer`; expected a diffusers Stable Diffusion "
                        "1.x/2.x/SDXL pipeline (unet, text_encoder[, text_encoder_2]) or a DiT pipeline such as "
                        "FluxPipeline (transformer, text encoders)")
    return comps


def denoiser(comps: Mapping[str, nn.Module]) -> nn.Module:
    """The UNet or the transformer among a pipeline's components (pipeline_components)."""
    return next(comps[c] for c in DENOISERS if c in comps)


def _require(pipe: Any, names: Sequence[str]) -> _State:
    st = _state(pipe)
    unknown = [n for n in names if n not in st.adapters]
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown}; loaded in this pipeline: {list(st.adapters) or 'none'} "
                       "(load one with load_adapter(pipe, path, name=...))")
    return st


def _no_fused(st: _State, what: str) -> None:
    if st.fused:
        raise RuntimeError(f"cannot {what} while adapter(s) {list(st.fused)} are fused into the weights; "
                           "call unfuse(pipe) first")


# ---- loading ---------------------------------------------------------------------------------------------------

def _check_finite(moved: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN/Inf weights; one check of the buffer they view when they share one (the one-transfer load),
    else one fused norm per tensor list; a single sync. Only when that finds something, tensor by tensor."""
    if not moved:
        return
    vals = list(moved.values())
    whole = _whole_buffer(vals)
    if whole is not None and bool(torch.isfinite(whole).all()):
        return
    if whole is None and bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(vals)])).all()):
        return
    bad = [k for k, t in moved.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise AdapterFileError(f"{source}: {len(bad)} tensor(s) contain NaN/Inf (or overflow the weight dtype): "
                               f"{', '.join(bad[:5])}")


def _live_name(name: str, modules: Mapping[str, nn.Module]) -> str | None:
    # Files may carry transformers-4 CLIP names (`text_model.` prefix) that transformers 5 flattened, or the reverse.
    for cand in (name, name.removeprefix("text_model."), "text_model." + name):
        if cand in modules:
            return cand
    return None


def _plan(pipe: Any, comps: Mapping[str, nn.Module], adapter: Adapter, name: str, source: str,
          strict: bool, parsed: Mapping[str, Mapping[str, LayerSpec]] | None = None,
          replaced: Mapping[str, nn.Module] | None = None
          ) -> tuple[dict[str, dict[str, tuple[nn.Module, LayerSpec]]], list[str]]:
    """Match every layer of the adapter to the pipeline ({component: {live module: (module, LayerSpec)}}) and
    check shapes, before anything changes. `parsed`: the adapter's layers as its reader kept them
    (ImportReport.layers), so that they are not parsed again. `replaced`: {component.module: module} that will
    stand in place of the live ones when the layers go in (a control LoRA's widened input)."""
    problems: list[str] = []
    skipped: list[str] = []
    plan: dict[str, dict[str, tuple[nn.Module, LayerSpec]]] = {}
    extra = [c for c in adapter.components() if c not in comps]
    if extra:
        hint = " (an SDXL adapter?)" if "text_encoder_2" in extra else ""
        problems.append(f"the file has weights for {extra}, which {type(pipe).__name__} does not have{hint}")
    for comp in adapter.components():
        if comp not in comps:
            continue
        modules = ModuleNames(comps[comp])
        entries = parsed.get(comp, {}) if parsed is not None else adapter.layers(comp)
        missing, bad = [], []
        for key, spec in entries.items():
            mod, part = split_key(key, modules)
            live = _live_name(mod, modules)
            label = f"{comp}.{key}"
            # A module inside a wrapper (`to_q.base`) is there but takes no adapter: the one rule says which do.
            slot = adapter_slot(comps[comp], live) if live is not None and not part else None
            if slot is None:
                missing.append(label)
                continue
            target = (replaced or {}).get(f"{comp}.{live}")
            target = slot[0] if target is None else target
            if isinstance(target, LoRALayer) and name in target.lora_A:
                raise ValueError(f"{comp}.{live} already has an adapter named {name!r}; unload it first or "
                                 "choose another name")
            base = target.base if isinstance(target, LoRALayer) else target
            shapes = expected_shapes(base, spec.rank) if isinstance(base, (nn.Linear, nn.Conv2d)) else None
            if not spec.is_plain:  # LoHa, LoKr, DoRA, OFT, ...: the factors' shapes against the weight
                why = kind_problems(target, spec)
                if why:
                    bad.append(f"{label}: {why[0]}")
                else:
                    plan.setdefault(comp, {})[live] = (target, spec)
            elif shapes is None:
                bad.append(f"{label} is a {type(base).__name__}, which cannot take LoRA")
            elif (tuple(spec.A.shape), tuple(spec.B.shape)) != shapes:
                bad.append(f"{label}: lora_A {tuple(spec.A.shape)} / lora_B {tuple(spec.B.shape)}, expected "
                           f"{shapes[0]} / {shapes[1]}")
            else:
                plan.setdefault(comp, {})[live] = (target, spec)
        if missing:
            problems.append(f"{len(missing)} of {len(entries)} {comp} modules not found (first: {missing[:3]})")
        if bad:
            problems.append(f"{len(bad)} {comp} modules have other shapes (first: {bad[:2]})")
        skipped += missing + bad
    if (problems and strict) or not plan:
        raise AdapterMismatchError(
            f"{source} does not fit this {type(pipe).__name__}: " + "; ".join(problems or ["it adapts nothing"])
            + ". It was probably made for another base model (e.g. an SDXL LoRA on an SD 1.x pipeline, or "
            "SD 2.x on SD 1.x); load it into the model it was trained for, or pass strict=False to load only the "
            "modules that fit.")
    return plan, skipped


def load_adapter(pipe: Any, source: AdapterSource, name: str = "default", strength: float = 1.0,
                 te_strength: float | None = None, block_strengths: BlockStrengths = None, strict: bool = True,
                 dtype: torch.dtype | None = None) -> AdapterLoadReport:
    """Apply an adapter (a file in any supported format, or an `Adapter`) to the UNet or transformer and the text
    encoder(s) of `pipe`.

    Every adapter kind applies (LoRA, LoHa, LoKr, DoRA, Tucker LoCon, OFT, BOFT, (IA)^3, full diff; see lora.kinds)
    as W + strength * delta. The adapter is added to the active set with UNet/transformer strength `strength`,
    text-encoder strength `te_strength` (None: same as `strength`), and block multipliers `block_strengths` (syntax
    in pipeline.blocks, e.g. "down=1,mid=0.5,up=0", or "double=1,single.3=0" for a transformer). LoRA weights take
    the dtype of the layer they adapt unless `dtype` is given.
    Nothing changes if the file does not fit the pipeline (AdapterMismatchError); strict=False loads what fits.
    Tensors the file sets in full (a Flux.1 control LoRA's norm scales, peft's modules_to_save) are set as they are
    while the adapter is active, whatever the strength; a Flux.1 control LoRA loads into a FluxControlPipeline
    only, which gets its x_embedder widened for the control latents (pipeline.control) until the adapter is
    unloaded.
    A file is read by `lora_vision.formats.read_adapter`, whatever its format: one made for another base model is
    an AdapterMismatchError, and modules of it that the pipeline does not have are left out and listed in the
    report's `source_report` (the same for our files and kohya / diffusers / peft ones).
    """
    if not name or "." in name:
        raise ValueError(f"adapter name {name!r}: expected a non-empty name without '.'")
    st = _state(pipe)
    if name in st.adapters:
        raise ValueError(f"an adapter named {name!r} is already loaded; unload_adapter(pipe, {name!r}) first or "
                         "choose another name")
    comps = pipeline_components(pipe)
    blocks = parse_block_strengths(block_strengths, block_counts(denoiser(comps)))
    try:
        adapter, src_report = read_adapter(source, comps, check_finite=False)
    except AdapterMismatchError as e:
        raise type(e)(f"{type(pipe).__name__}: {e}") from None
    label = "<Adapter>" if isinstance(source, Adapter) else "<tensors>" if isinstance(source, Mapping) else str(source)
    fmt = src_report.format if src_report is not None else "lora_vision"
    broken = list(src_report.invalid) if src_report is not None else []  # layers the reader could not build
    if broken and strict:
        more = f" (+{len(broken) - 3} more)" if len(broken) > 3 else ""
        raise AdapterMismatchError(f"{label}: {len(broken)} broken layers in the file, nothing was loaded: "
                                   f"{'; '.join(broken[:3])}{more}. Fix or re-export the file, or pass strict=False "
                                   "to load the layers that are whole")
    widen = plan_widening(pipe, comps, src_report, label)  # a control LoRA's wider input; refused elsewhere
    plan, skipped = _plan(pipe, comps, adapter, name, label, strict,
                          src_report.layers if src_report is not None else None,
                          {k: w.wide for k, w in widen.items()})
    skipped += broken
    full = plan_full(comps, adapter, label, {id(t.param): n for n, a in st.adapters.items() for t in a.full})
    prepared = prepare_embeddings(pipe, name, adapter.embeddings(), label)  # checked before anything changes
    # Move every A and B to its layer's device and dtype first, and check them there, before anything changes.
    moved = _move_factors(plan, dtype)
    _check_finite({f"{c}.{live}.{n}": t for c, specs in moved.items() for live, s in specs.items()
                   for n, t in s.all_factors.items() if t.is_floating_point()}
                  | {t.key: t.value for t in full if t.value.is_floating_point()}, label)
    tables: dict[str, StrengthTable] = {}  # one per device, shared by the UNet and the text encoders
    modules: dict[str, list[str]] = {}
    try:
        known = {id(x) for x in st.layers}
        install(comps, widen)
        with torch.no_grad():
            for comp, specs in moved.items():
                modules[comp] = inject_lora(comps[comp], name=name, layers=specs, freeze_base=False, dtype=None,
                                            trainable=False, tables=tables, label=comp + ".", checked=True)
                for live in modules[comp]:
                    layer = find_module(comps[comp], live)
                    if id(layer) not in known:
                        known.add(id(layer))
                        st.layers.append(layer)
    except BaseException:
        for comp in plan:
            remove_lora(comps[comp], name)
        uninstall(comps, widen)
        st.layers = _collect_layers(pipe)
        raise
    groups: list[str] = []  # "<denoiser>:<block>" or a text-encoder component, in order of first use
    slot_groups = []
    for dev, table in tables.items():
        table.to(torch.device(dev))
        idx = []
        for slot_label in table.layer_names:
            comp, _, live = slot_label.partition(".")
            group = f"{comp}:{block_of(live)}" if comp in DENOISERS else comp
            if group not in groups:
                groups.append(group)
            idx.append(groups.index(group))
        slot_groups.append(torch.tensor(idx))
    loaded = _Loaded(name, modules, list(tables.values()), slot_groups, groups,
                     float(strength), float(strength if te_strength is None else te_strength), blocks, full)
    st.widened.update(widen)
    for w in st.widened.values():  # every adapter with a layer on a widened module keeps it wide
        if w.module in modules.get(w.comp, ()):
            w.owners.add(name)
    _release_widened(comps, st)
    set_full(full, True)
    st.adapters[name] = loaded
    st.active.append(name)
    tokens = add_embeddings(pipe, prepared)
    _apply_strength(loaded)
    for layer in st.layers:
        if name in layer.lora_A:
            layer.set_active(st.active)
    return AdapterLoadReport(name, label, fmt, modules, skipped, loaded.strength, loaded.te_strength, blocks,
                             src_report, tokens)


def _move_factors(plan: Mapping[str, Mapping[str, tuple[nn.Module, LayerSpec]]], dtype: torch.dtype | None,
                  pack: bool | None = None) -> dict[str, dict[str, LayerSpec]]:
    """Every layer of `plan` ({comp: {module: (target, spec)}}) with its factors on its module's device, in `dtype`
    or the module weight's dtype. The plain LoRA pairs bound for another device travel together: one flat buffer,
    cast once, copied over in one transfer, each factor a view of it (an SD 1.5 adapter is 352 small tensors: one
    copy instead of 352). On their own device a per-tensor cast is quicker; `pack` forces either way (None: pack
    what changes device). Other kinds move tensor by tensor (_to)."""
    moved: dict[str, dict[str, LayerSpec]] = {}
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, str, LayerSpec]]] = {}
    for comp, specs in plan.items():
        out = moved.setdefault(comp, {})
        for live, (target, spec) in specs.items():
            w = (target.base if isinstance(target, LoRALayer) else target).weight
            want = dtype or w.dtype
            other = spec.is_plain and (spec.A.device != w.device or spec.B.device != w.device)
            if spec.is_plain and (other if pack is None else pack) and (other or spec.A.dtype != want
                                                                        or spec.B.dtype != want):
                groups.setdefault((w.device, want), []).append((comp, live, spec))
                out[live] = spec  # placeholder: keeps the plan's order
            else:
                out[live] = _to(spec, w.device, want)
    for (device, want), items in groups.items():
        tensors = [t for _, _, spec in items for t in (spec.A, spec.B)]
        whole = _whole_buffer(tensors)
        if whole is not None:  # views of one buffer (a file as read): it goes over whole, then each view is taken
            dev = whole.to(device).to(want)
            views = iter([dev.as_strided(t.shape, t.stride(), t.storage_offset()) for t in tensors])
        else:
            flat = torch.cat([t.reshape(-1) for t in tensors]).to(device, want)  # one conversion, one transfer
            views = iter([p.view(t.shape) for p, t in zip(flat.split([t.numel() for t in tensors]), tensors)])
        for comp, live, spec in items:
            moved[comp][live] = spec.with_factors(next(views), next(views))
    return moved


def _whole_buffer(tensors: Sequence[torch.Tensor], most: float = 4.0) -> torch.Tensor | None:
    """The one storage all `tensors` view, as a flat tensor of their dtype, when they share it (a file read by
    io.read_safetensors), have one dtype and together cover at least 1/`most` of it; else None."""
    first = tensors[0]
    ptr, dtype = first.untyped_storage().data_ptr(), first.dtype
    if any(t.dtype != dtype or t.untyped_storage().data_ptr() != ptr for t in tensors):
        return None
    storage = first.untyped_storage()
    n = storage.nbytes() // first.element_size()
    if not n or n > most * sum(t.numel() for t in tensors):  # mostly other data: copy the factors alone
        return None
    return torch.empty(0, dtype=dtype, device=first.device).set_(storage, 0, (n,), (1,))


def _to(spec: LayerSpec, device: torch.device, dtype: torch.dtype) -> LayerSpec:
    """The layer with its floating factors on `device` in `dtype` (LoRA: A and B; other kinds: every factor)."""
    if spec.is_plain:
        return spec.with_factors(spec.A.to(device, dtype), spec.B.to(device, dtype))
    moved = {n: t.to(device, dtype) if t.is_floating_point() else t.to(device) for n, t in spec.factors.items()}
    a, b = (spec.A.to(device, dtype), spec.B.to(device, dtype)) if spec.kind == "lora" else (None, None)
    return LayerSpec(a, b, spec.alpha, spec.rule, spec.kind, moved)


def _collect_layers(pipe: Any) -> list[LoRALayer]:
    return [layer for m in pipeline_components(pipe).values() for _, layer in lora_layers(m)]


def _apply_strength(loaded: _Loaded) -> None:
    """Write every slot's strength: one small copy per table (one table per device)."""
    vals = []
    for g in loaded.groups:
        comp, _, block = g.partition(":")
        if comp in DENOISERS:
            vals.append(loaded.strength * multiplier(block, loaded.blocks))
        else:
            vals.append(loaded.te_strength)
    v = torch.tensor(vals, dtype=torch.float64)
    for table, idx in zip(loaded.tables, loaded.slot_groups):
        table.set_strength(v[idx])


# ---- runtime control -------------------------------------------------------------------------------------------

def set_adapter_strength(pipe: Any, name: str, strength: float, te_strength: float | None = None,
                         block_strengths: BlockStrengths = None) -> None:
    """Change the strength of a loaded adapter without reloading: UNet `strength`, text encoder `te_strength`
    (None: same as `strength`), block multipliers (None keeps the current ones; {} resets them to 1)."""
    st = _require(pipe, [name])
    if name in st.fused:
        raise RuntimeError(f"adapter {name!r} is fused into the weights; call unfuse(pipe) before changing its "
                           "strength")
    loaded = st.adapters[name]
    if block_strengths is not None:
        loaded.blocks = parse_block_strengths(block_strengths, block_counts(denoiser(pipeline_components(pipe))))
    loaded.strength = float(strength)
    loaded.te_strength = float(strength if te_strength is None else te_strength)
    _apply_strength(loaded)


def set_adapters(pipe: Any, names: Sequence[str] | str,
                 strengths: float | Sequence[float] | Mapping[str, float] | None = None) -> None:
    """Make exactly `names` active (the others stay loaded but do not run), optionally setting their strengths
    (one number for all, one per name, or {name: strength}; text encoders follow, block multipliers are kept)."""
    names = [names] if isinstance(names, str) else list(names)
    st = _require(pipe, names)
    _no_fused(st, "switch adapters")
    if strengths is not None:
        if isinstance(strengths, Mapping):
            per = dict(strengths)
            _require(pipe, list(per))
        elif isinstance(strengths, (int, float)):
            per = {n: float(strengths) for n in names}
        else:
            strengths = list(strengths)
            if len(strengths) != len(names):
                raise ValueError(f"{len(strengths)} strengths for {len(names)} adapters {names}")
            per = dict(zip(names, strengths))
        for n, s in per.items():
            set_adapter_strength(pipe, n, s)
    st.active = names
    for layer in st.layers:
        layer.set_active(names)
    for n, loaded in st.adapters.items():  # tensors set in full follow their adapter
        set_full(loaded.full, n in names)


def active_adapters(pipe: Any) -> list[str]:
    """Names of the adapters that run, in load order."""
    return list(_state(pipe).active)


def list_adapters(pipe: Any) -> dict[str, dict[str, Any]]:
    """Every loaded adapter: active, fused, strengths, block multipliers, and modules per component."""
    st = _state(pipe)
    return {n: {"active": n in st.active, "fused": n in st.fused, "strength": a.strength,
                "te_strength": a.te_strength, "block_strengths": dict(a.blocks),
                "modules": {c: len(m) for c, m in a.modules.items()}} for n, a in st.adapters.items()}


def unload_adapter(pipe: Any, name: str | None = None) -> list[str]:
    """Remove adapter `name` (all if None) and return the pipeline to its original modules and exact weights.

    Returns the names of the adapters removed.
    """
    st = _state(pipe)
    names = list(st.adapters) if name is None else [name]
    _require(pipe, names)
    _no_fused(st, "unload adapters")
    comps = pipeline_components(pipe)
    for n in names:
        for comp in st.adapters[n].modules:
            remove_lora(comps[comp], n)
        set_full(st.adapters[n].full, False)
        for w in st.widened.values():
            w.owners.discard(n)
        del st.adapters[n]
        remove_embeddings(pipe, n)
        if n in st.active:
            st.active.remove(n)
    _release_widened(comps, st)
    st.layers = _collect_layers(pipe)
    return names


def _release_widened(comps: Mapping[str, nn.Module], st: _State) -> None:
    """Put back the original input layers that no adapter uses any more (pipeline.control)."""
    done = {k: w for k, w in st.widened.items() if not w.owners}
    uninstall(comps, done)
    for k in done:
        del st.widened[k]