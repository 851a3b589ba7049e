"""inject_lora / remove_lora / fold_lora: replace matched child modules by LoRA wrappers and back.

`inject_lora` is the one way adapters get into a model: from a `LoRAConfig` (fresh, trainable factors) or from
given `LayerSpec`s (a file's weights: the pipeline loader, `Adapter.apply_to`). `replace_module` is the one place
a child module is swapped.

Named target sets (presets) live outside the core (`lora_vision.targets`), which hands its lookup to
`use_named_targets`; the core only knows patterns.
"""

from __future__ import annotations

import collections
import difflib
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from .config import LoRAConfig, TargetError, matches
from .layers import (NORMS, LoRAConv2d, LoRAFusedLinear, LoRALayer, LoRALinear, LoRAMultiheadAttention, LoRANorm,
                     StrengthTable, lora_layers, part_weight)
from .ops import LoRAStateDictError, canonical_layers, merge_lora
from .kinds import BIAS_FACTORS, fresh_factors, get_kind
from .spec import FUSED_PARTS, LayerSpec, layer_key, split_key

ADAPTABLE = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)
NamedTargets = Callable[[str, nn.Module], "tuple[str, ...]"]
_named_targets: list[NamedTargets] = []

__all__ = ["ADAPTABLE", "ModuleNames", "TargetError", "adapter_slot", "adapter_slots", "candidate_modules",
           "expected_shapes", "find_module", "fold_lora", "inject_lora", "inject_lora_from_state_dict", "lora_layers",
           "remove_lora", "replace_module", "resolve_targets", "slot_kind", "use_named_targets"]


def use_named_targets(resolve: NamedTargets) -> None:
    """Install the lookup of named target sets (`LoRAConfig(targets="unet-attn")`): name, model -> patterns."""
    _named_targets[:] = [resolve]


# Insides of these are never adapted: a wrapper's `base` is adapted through the wrapper, and MultiheadAttention's
# forward reads its out_proj's weight itself (only the MultiheadAttention can be adapted).
_CLOSED = (LoRALayer, nn.MultiheadAttention)


def slot_kind(module: nn.Module) -> str | None:
    """What adapters `module` can carry: "lora" (LoRA pairs and the other kinds: Linear, Conv2d,
    MultiheadAttention, or a wrapper of one), "norm" (norm-layer updates, w_norm / b_norm: LayerNorm, GroupNorm,
    or their LoRANorm), or None."""
    if isinstance(module, (LoRANorm, *NORMS)):
        return "norm"
    return "lora" if isinstance(module, (LoRALayer, *ADAPTABLE)) else None


def adapter_slot(model: nn.Module, name: str) -> tuple[nn.Module, nn.Module, str] | None:
    """(module, parent, slot_kind) of module `name` of `model` when an adapter can go on it, else None: the rule
    of which modules can be adapted, looked up along the children without walking the model.

    The model itself (name "") is never a slot: an adapter replaces a child module in its parent. Nothing inside a
    wrapper or a MultiheadAttention is one (see _CLOSED). `adapter_slots` walks the same rule over the model.
    """
    if not name:
        return None
    parent, mod = None, model
    for atom in name.split("."):
        if isinstance(mod, _CLOSED):
            return None
        parent, mod = mod, mod._modules.get(atom)
        if mod is None:
            return None
    kind = slot_kind(mod)
    return None if kind is None else (mod, parent, kind)


def adapter_slots(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(name, module, slot_kind) of every module that `adapter_slot` accepts, in named_modules order (a module
    registered under two names is listed under the first)."""
    if isinstance(model, _CLOSED):
        return
    skip = None  # named_modules walks depth first: the insides of a closed module follow it directly
    for name, mod in model.named_modules():
        if not name or (skip is not None and name.startswith(skip)):
            continue
        if isinstance(mod, _CLOSED):
            skip = name + "."
        kind = slot_kind(mod)
        if kind is not None:
            yield name, mod, kind


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that can carry LoRA: Linear, Conv2d, MultiheadAttention and existing wrappers (not their insides,
    not norm layers, not the model itself); see adapter_slot."""
    return {name: mod for name, mod, kind in adapter_slots(model) if kind == "lora"}


def find_module(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule of `model` named `name` (as named_modules names it; "" is `model`), or None: looked up along
    the children, without walking the model or going through nn.Module.__getattr__."""
    mod: nn.Module | None = model
    for atom in name.split(".") if name else ():
        mod = mod._modules.get(atom)
        if mod is None:
            return None
    return mod


class ModuleNames(Mapping[str, nn.Module]):
    """The modules of `model` by name, each looked up when asked (find_module): what `dict(named_modules())` gives
    to a caller that asks about a few names, without walking the whole model first."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __getitem__(self, name: str) -> nn.Module:
        mod = find_module(self.model, name) if isinstance(name, str) else None
        if mod is None:
            raise KeyError(name)
        return mod

    def __iter__(self) -> Iterator[str]:
        return (n for n, _ in self.model.named_modules())

    def __len__(self) -> int:
        return sum(1 for _ in self.model.named_modules())


def _is_fused_qkv(name: str, mod: nn.Module) -> bool:
    return (isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] == "qkv"
            and mod.out_features == 3 * mod.in_features)


def _closest(patterns: tuple[str, ...], names: list[str], n: int = 3) -> list[str]:
    # Compare the last two name components, which is how people write targets ("attn2.to_q").
    tails = sorted({".".join(x.split(".")[-2:]) for x in names})
    close: list[str] = []
    for p in patterns:
        for c in difflib.get_close_matches(p.removeprefix("re:"), tails, n=n, cutoff=0.4):
            if c not in close:
                close.append(c)
    return close[:n]


def _target_hint(patterns: tuple[str, ...], names: list[str]) -> str:
    """"closest: ..." when some names resemble the patterns; else the most common name endings (never an
    unrelated name picked alphabetically)."""
    close = _closest(patterns, names)
    if close:
        return f"closest: {', '.join(close)}"
    ends = [".".join(x.split(".")[-2:]) if x.rsplit(".", 1)[-1].isdigit() else x.rsplit(".", 1)[-1] for x in names]
    common = collections.Counter(ends).most_common(6)  # "to_out.0", not "0"
    return f"no module name resembles them; module names end in: {', '.join(n for n, _ in common) or 'nothing'}"


def resolve_targets(model: nn.Module, config: LoRAConfig) -> tuple[tuple[str, ...], dict[str, nn.Module]]:
    """Target patterns (a named set expanded) and the modules of `model` they select, exclusions applied."""
    patterns = config.targets
    if isinstance(patterns, str):
        if not _named_targets:
            raise TargetError(f"targets={patterns!r} names a preset, but no preset table is installed; import "
                              "lora_vision (or give module-name patterns)")
        patterns = _named_targets[0](patterns, model)
    cands = candidate_modules(model)
    chosen = {n: m for n, m in cands.items()
              if any(matches(n, p) for p in patterns) and not any(matches(n, e) for e in config.exclude)}
    if not chosen:
        what = f"preset {config.targets!r} ({', '.join(patterns)})" if isinstance(config.targets, str) else \
            f"targets {tuple(patterns)!r}"
        hint = _target_hint(tuple(patterns), list(cands))
        if not cands and slot_kind(model) is not None:  # adapters replace children: the model itself is none
            hint = (f"the model is itself a {type(model).__name__}, and an adapter replaces a module in its parent: "
                    "put the model in one (e.g. nn.Sequential(model)) and adapt that")
        raise TargetError(
            f"{what} matched 0 of {len(cands)} Linear/Conv2d/MultiheadAttention modules in {type(model).__name__}; "
            f"{hint}")
    return tuple(patterns), chosen


def _wrap(name: str, mod: nn.Module, parts: tuple[str, ...], split_qkv: bool = True) -> LoRALayer:
    if isinstance(mod, nn.MultiheadAttention):
        return LoRAMultiheadAttention(mod, parts)
    if _is_fused_qkv(name, mod) and split_qkv:
        qkv = tuple(p for p in parts if p in ("q", "k", "v"))
        if not qkv:
            raise TargetError(f"{name} is a fused qkv Linear but fused_parts={parts!r} has no q/k/v")
        return LoRAFusedLinear(mod, qkv)
    if isinstance(mod, nn.Linear):
        return LoRALinear(mod)
    if isinstance(mod, nn.Conv2d):
        return LoRAConv2d(mod)
    if isinstance(mod, NORMS):
        return LoRANorm(mod)
    raise TargetError(f"{name}: cannot adapt a {type(mod).__name__}")


def replace_module(model: nn.Module, name: str, new: nn.Module, parent: nn.Module | None = None) -> None:
    """Put `new` in place of the child module `name` of `model` (`parent`: its parent, when already known)."""
    parent_name, _, child = name.rpartition(".")
    if parent is None:
        parent = find_module(model, parent_name)
        if parent is None:
            raise AttributeError(f"{type(model).__name__} has no module {parent_name!r}")
    setattr(parent, child, new)


def _kernel(mod: nn.Module) -> int:
    base = mod.base if isinstance(mod, LoRALayer) else mod
    return max(base.kernel_size) if isinstance(base, nn.Conv2d) else 1


def expected_shapes(module: nn.Module, rank: int, part: str = "") -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(A shape, B shape) of a rank-`rank` LoRA on `module` (a plain module or a wrapper), or None if it cannot
    take one. `part` is a fused projection's q/k/v/o (MultiheadAttention, timm qkv)."""
    base = module.base if isinstance(module, LoRALayer) else module
    if isinstance(base, nn.MultiheadAttention):
        d = base.embed_dim
        return ((rank, d), (d, rank)) if part in FUSED_PARTS and base._qkv_same_embed_dim else None
    if part:
        if isinstance(base, nn.Linear) and base.out_features % 3 == 0 and part in ("q", "k", "v"):
            return (rank, base.in_features), (base.out_features // 3, rank)
        return None
    if isinstance(base, nn.Linear):
        return (rank, base.in_features), (base.out_features, rank)
    if isinstance(base, nn.Conv2d) and base.groups == 1:
        return (rank, base.in_channels, *base.kernel_size), (base.out_channels, rank, 1, 1)
    return None


def _device(mod: nn.Module) -> torch.device:
    w = getattr(mod, "weight", None)  # Linear / Conv2d: no parameter walk
    if isinstance(w, torch.Tensor):
        return w.device
    p = next(mod.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def inject_lora(model: nn.Module, config: LoRAConfig | None = None, name: str = "default", strength: float = 1.0,
                freeze_base: bool = True, dtype: torch.dtype | None = torch.float32, *,
                layers: Mapping[str, LayerSpec] | None = None, dropout: float = 0.0, trainable: bool = True,
                tables: dict[str, StrengthTable] | None = None, label: str = "", checked: bool = False) -> list[str]:
    """Add adapter `name` to `model`; returns the adapted module names.

    Either `config` (targets, ranks, alphas, rule: fresh factors, B zero) or `layers` ({module[.part]: LayerSpec},
    factors given, checked against the modules before anything changes). Modules are replaced by LoRA wrappers (the
    original is kept as `.base`); an existing wrapper gets one more adapter. With `freeze_base`, every parameter of
    `model` except LoRA parameters is frozen. `dtype` None keeps the given factors' dtype; given factors move to
    their module's device. `trainable=False` uses the given factors as they are (no copy, no grad).

    `tables` (device -> StrengthTable, shared by callers that adapt several models as one adapter): slots are added
    there, labelled `label + module`, and the caller sets their strengths; by default one table holds every layer
    at `strength`.

    `checked=True` is for a caller that has already matched every layer of `layers` to its module (keys are module
    names without parts), checked the factors' shapes and values and placed them on the module's device in the
    dtype wanted (the pipeline loader): only the modules are looked up, the factors are used as they are
    (`trainable=False`), and the checks are not done a second time.
    """
    if "." in name or not name:
        raise ValueError(f"adapter name {name!r}: expected a non-empty name without '.'")
    if (config is None) == (layers is None):
        raise ValueError("give exactly one of config (fresh adapters) or layers (given factors)")
    if checked and (layers is None or trainable):
        raise ValueError("checked=True is for given layers used as they are: pass layers= and trainable=False")
    if config is not None:
        plan = _plan_config(model, config)
    elif checked:
        plan = _plan_checked(model, layers, dropout)
    else:
        plan = _plan_layers(model, layers, name, dtype, dropout, trainable)
    # Every wrapper is built before the model changes: a module no wrapper takes (a grouped or padded convolution,
    # ...) is an error naming it, with nothing wrapped or frozen yet.
    wrappers = {}
    for mod_name, (mod, _, wrap, _) in plan.items():
        try:
            wrappers[mod_name] = mod if isinstance(mod, LoRALayer) else wrap()
        except ValueError as e:
            raise TargetError(str(e) if str(e).startswith(mod_name) else f"{mod_name}: {e}") from None
    if freeze_base:
        model.requires_grad_(False)
    own = tables is None
    tables = {} if own else tables
    shared = StrengthTable(name) if own else None
    adapted: list[str] = []
    for mod_name, (mod, parts, _, parent) in plan.items():
        layer = wrappers[mod_name]
        first = next(iter(parts.values()))
        if shared is not None:
            table = shared
        else:
            dev = str(_device(layer.base))
            table = tables.get(dev) or tables.setdefault(dev, StrengthTable(name))
        if first.spec is not None:  # any other kind: its factors as given (or freshly initialised), part by part
            layer.add_kind_adapter(name, {p: pt.spec for p, pt in parts.items()}, table, label + mod_name, trainable,
                                   first.dropout)
            if layer is not mod:
                replace_module(model, mod_name, layer, parent)
            adapted.append(mod_name)
            continue
        plain = set(parts) == {""}
        layer.add_adapter(name, first.rank, first.alpha, first.dropout, first.init, first.rule, table,
                          label + mod_name, weights=parts[""].weights if plain else None)
        want = dtype if dtype is not None or first.weights is None else first.weights[0].dtype
        for prm in (layer.lora_A[name], layer.lora_B[name]):
            if want is not None and prm.dtype != want:
                prm.data = prm.data.to(want)
            prm.requires_grad_(trainable)
        if not plain and first.weights is not None:  # fused parts: stacked parameters, filled part by part
            for part, p in parts.items():
                layer.load_pair_(name, part, *p.weights)
        if layer is not mod:
            replace_module(model, mod_name, layer, parent)
        adapted.append(mod_name)
    if own:
        shared.set_strength(strength)
    return adapted


class _Part:
    """What one adapted weight of the plan gets: rank, alpha, rule, dropout, init and, when given, its factors."""

    __slots__ = ("rank", "alpha", "rule", "dropout", "init", "weights", "spec")

    def __init__(self, rank: int, alpha: float, rule: str, dropout: float = 0.0, init: str = "kaiming",
                 weights: tuple[torch.Tensor, torch.Tensor] | None = None, spec: LayerSpec | None = None) -> None:
        self.rank, self.alpha, self.rule, self.dropout, self.init, self.weights, self.spec = \
            rank, alpha, rule, dropout, init, weights, spec


def _plan_config(model: nn.Module, config: LoRAConfig) -> dict:
    _, chosen = resolve_targets(model, config)
    plan = {}
    for mod_name, mod in chosen.items():
        base = mod.base if isinstance(mod, LoRALayer) else mod
        if isinstance(base, nn.MultiheadAttention) and not base._qkv_same_embed_dim:
            raise TargetError(f"{mod_name}: a MultiheadAttention with kdim / vdim other than embed_dim has no packed "
                              "in_proj_weight, which the adapters go on; exclude it")
        k = _kernel(mod)
        part = _Part(config.rank_for(mod_name, k), config.alpha_for(mod_name, k), config.rule, config.dropout,
                     config.init)
        split = config.split_qkv
        parts = {"": part}
        if config.adapter_type != "lora":
            if isinstance(mod, LoRAFusedLinear) or not isinstance(base, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)):
                raise TargetError(f"{mod_name}: adapter_type={config.adapter_type!r} goes on Linear and Conv2d "
                                  f"modules (a fused qkv Linear included, as one layer) and on the q / k / v / o "
                                  f"parts of a MultiheadAttention, not on a {type(mod).__name__}; exclude it or use "
                                  "adapter_type='lora'")
            # A fused qkv Linear (timm) takes the kind over its whole (3d, d) weight, as one Linear; a
            # MultiheadAttention takes one per part (`fused_parts`), each on its (d, d) block.
            split = False
            weights = {"": base.weight} if not isinstance(base, nn.MultiheadAttention) else \
                {p: part_weight(base, p) for p in FUSED_PARTS if p in config.fused_parts}
            parts = {}
            for p, w in weights.items():
                a, b, kind, factors = fresh_factors(config.adapter_type, w.detach(), part.rank,
                                                    factor=config.lokr_factor, decompose_both=config.decompose_both,
                                                    full_rank=config.full_rank, init=config.init)
                parts[p] = _Part(part.rank, part.alpha, part.rule, part.dropout, part.init,
                                 spec=LayerSpec(a, b, part.alpha, part.rule, kind, factors))
        wrap = (lambda n=mod_name, m=mod, split=split: _wrap(n, m, config.fused_parts, split))
        plan[mod_name] = (mod, parts, wrap, None)
    return plan


def _plan_layers(model: nn.Module, layers: Mapping[str, LayerSpec], name: str, dtype: torch.dtype | None,
                 dropout: float, trainable: bool) -> dict:
    """Check every given layer against the model (module, shapes, values) and place its factors on the module's
    device; raises before anything changes."""
    grouped: dict[str, dict[str, LayerSpec]] = {}
    named = ModuleNames(model)
    for key, spec in layers.items():
        mod, part = split_key(key, named)
        grouped.setdefault(mod, {})[part] = spec
    cands = {m: found[:2] for m in grouped if (found := adapter_slot(model, m)) is not None}
    missing = sorted(m for m in grouped if m not in cands)
    if missing:
        raise KeyError(f"the state dict adapts {len(missing)} module(s) that {type(model).__name__} does not "
                       f"have (first: {missing[:3]}); is it for another model?")
    problems: list[str] = []
    plan = {}
    for mod_name, specs in grouped.items():
        mod, parent = cands[mod_name]
        if isinstance(mod, LoRALayer) and name in mod.lora_A:
            raise ValueError(f"{mod_name} already has an adapter named {name!r}; remove it first or use another name")
        for what in ("rank", "alpha", "rule"):
            values = {p: getattr(s, what) for p, s in specs.items()}
            if len(set(values.values())) != 1:
                raise ValueError(f"{mod_name}: fused parts with different {what}s {values} are not supported")
        dev = _device(mod.base if isinstance(mod, LoRALayer) else mod)
        parts = {}
        kind_spec = next((sp for sp in specs.values() if not sp.is_plain), None)
        if kind_spec is not None:
            kind_parts = _plan_kind(mod_name, mod, specs, dev, dtype, trainable, dropout, problems)
            if kind_parts is not None:
                plan[mod_name] = (mod, kind_parts, lambda n=mod_name, m=mod: _wrap(n, m, FUSED_PARTS, False), parent)
            continue
        for part, s in specs.items():
            label = layer_key(mod_name, part)
            shapes = expected_shapes(mod, s.rank, part)
            if shapes is None:
                problems.append(f"{label}: a {type(mod).__name__} cannot take this LoRA")
                continue
            if (tuple(s.A.shape), tuple(s.B.shape)) != shapes:
                problems.append(f"{label}: lora_A {tuple(s.A.shape)} / lora_B {tuple(s.B.shape)}, expected "
                                f"{shapes[0]} / {shapes[1]}")
                continue
            pair = []
            for t, what in ((s.A, "lora_A"), (s.B, "lora_B")):
                if not t.is_floating_point():
                    problems.append(f"{label}: {what} dtype {t.dtype} is not floating point")
                elif trainable and not bool(torch.isfinite(t).all()):
                    problems.append(f"{label}: {what} contains NaN/Inf")
                moved = t.to(dev, dtype or t.dtype)
                pair.append(moved.clone() if trainable and moved is t else moved)  # never train the caller's tensor
            parts[part] = _Part(s.rank, s.alpha, s.rule, dropout, weights=(pair[0], pair[1]))
        names = tuple(p for p in FUSED_PARTS if p in specs)
        plan[mod_name] = (mod, parts, (lambda n=mod_name, m=mod, ps=names: _wrap(n, m, ps or FUSED_PARTS, bool(ps))),
                          parent)
    if problems:
        raise LoRAStateDictError(f"the LoRA weights do not fit {type(model).__name__}:\n  - "
                                 + "\n  - ".join(problems))
    return plan


def _plan_checked(model: nn.Module, layers: Mapping[str, LayerSpec], dropout: float) -> dict:
    """The plan of layers already checked against the model by the caller (inject_lora's `checked`): the modules
    are looked up, nothing else is checked or moved."""
    plan = {}
    for mod_name, spec in layers.items():
        found = adapter_slot(model, mod_name)
        if found is None:
            raise KeyError(f"the state dict adapts a module that {type(model).__name__} does not have "
                           f"({mod_name!r}); is it for another model?")
        mod, parent, _ = found
        part = _Part(spec.rank, spec.alpha, spec.rule, dropout, weights=(spec.A, spec.B)) if spec.is_plain else \
            _Part(spec.rank, spec.alpha, spec.rule, dropout, spec=spec)
        plan[mod_name] = (mod, {"": part}, lambda n=mod_name, m=mod: _wrap(n, m, FUSED_PARTS, False), parent)
    return plan


def kind_problems(module: nn.Module, spec: LayerSpec, part: str = "") -> list[str]:
    """Why a layer of another kind than plain LoRA cannot go on `module` (a plain module or a wrapper; `part`: q / k /
    v / o of a MultiheadAttention), one line each naming the factors and shapes; empty when it fits. The one check
    every loader of kinds uses."""
    base = module.base if isinstance(module, LoRALayer) else module
    kind = get_kind(spec.kind)
    bias_factor = BIAS_FACTORS.get(spec.kind)
    given = spec.factors.get(bias_factor) if bias_factor else None
    if isinstance(base, nn.MultiheadAttention):
        if part not in FUSED_PARTS:
            return [f"{spec.label} layers on a MultiheadAttention go on its parts {FUSED_PARTS}, not on the whole "
                    "module"]
        if kind.norm_layers or given is not None:
            return [f"{spec.label} layers with norm or bias updates do not go on a MultiheadAttention part"]
        if not base._qkv_same_embed_dim:
            return ["a MultiheadAttention with kdim / vdim other than embed_dim (no packed in_proj_weight)"]
        return spec.check(tuple(part_weight(base, part).shape))
    if part:
        return [f"{spec.label} layers go on Linear and Conv2d modules only, not on a {type(base).__name__} part"]
    if kind.norm_layers:
        if not isinstance(base, NORMS):
            return [f"{spec.label} layers (w_norm / b_norm) go on LayerNorm and GroupNorm modules only, not on a "
                    f"{type(base).__name__}"]
        if base.weight is None:
            return [f"the {type(base).__name__} has no weight (built without an affine part): w_norm has nothing "
                    "to update"]
    elif not isinstance(base, (nn.Linear, nn.Conv2d)) or isinstance(module, LoRAFusedLinear):
        return [f"{spec.label} layers go on Linear and Conv2d modules only, not on a {type(base).__name__}"]
    if isinstance(base, nn.Conv2d) and (base.groups != 1 or base.padding_mode != "zeros"):
        return [f"{spec.label} needs a Conv2d with groups=1 and zero padding"]
    bad = spec.check(tuple(base.weight.shape))
    if given is not None and getattr(base, "bias", None) is None:
        bad.append(f"{bias_factor} {tuple(given.shape)} updates a bias the layer does not have")
    elif given is not None and tuple(given.shape) != tuple(base.bias.shape):
        bad.append(f"{bias_factor} has shape {tuple(given.shape)} but the layer's bias is {tuple(base.bias.shape)}")
    return bad


def _plan_kind(mod_name: str, mod: nn.Module, specs: dict[str, LayerSpec], dev: torch.device,
               dtype: torch.dtype | None, trainable: bool, dropout: float,
               problems: list[str]) -> "dict[str, _Part] | None":
    """Check the layer(s) of another kind than plain LoRA on one module (one per part on a MultiheadAttention)
    against it; their factors on the module's device, {part: _Part}."""
    kinds = {s.label for s in specs.values()}
    if len(kinds) > 1:
        problems.append(f"{mod_name}: parts of one module with different kinds {sorted(kinds)}; one adapter has one "
                        "kind per module")
        return None
    out = {}
    for part, spec in specs.items():
        label = layer_key(mod_name, part)
        bad = kind_problems(mod, spec, part)
        if bad:
            problems += [f"{label}: {b}" for b in bad]
            continue
        moved: dict[str, torch.Tensor] = {}
        for n, t in spec.all_factors.items():
            if t.is_floating_point():
                if trainable and not bool(torch.isfinite(t).all()):
                    bad.append(f"{n} contains NaN/Inf")
                m = t.to(dev, dtype or t.dtype)
                moved[n] = m.clone() if trainable and m is t else m  # never train the caller's tensor
            else:
                moved[n] = t.to(dev)
        if bad:
            problems += [f"{label}: {b}" for b in bad]
            continue
        a, b = (moved.pop("A"), moved.pop("B")) if spec.kind == "lora" else (None, None)
        given = LayerSpec(a, b, spec.alpha, spec.rule, spec.kind, moved)
        out[part] = _Part(spec.rank, spec.alpha, spec.rule, dropout, spec=given)
    return out if len(out) == len(specs) else None


def inject_lora_from_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str = "default",
                                strength: float = 1.0, dropout: float = 0.0, rslora: bool = False,
                                freeze_base: bool = True, dtype: torch.dtype = torch.float32) -> list[str]:
    """Inject adapter `name` with the modules, ranks, alphas and factors that a canonical state dict describes.

    Canonical keys: `<module>[.<part>].lora_A.weight`, `.lora_B.weight` and `.alpha` (alpha defaults to rank), and
    `<module>.<kind>.<factor>` for layers of other kinds (what `lora_state_dict` writes for them).
    `rslora` applies alpha / sqrt(rank) to every layer. `dropout` is not applied to given factors.
    """
    rule = "rslora" if rslora else "lora"
    layers = canonical_layers(state_dict, lambda _key: rule)
    return inject_lora(model, name=name, strength=strength, freeze_base=freeze_base, dtype=dtype, layers=layers,
                       dropout=dropout)


def remove_lora(model: nn.Module, name: str | None = None) -> list[str]:
    """Remove adapter `name` (all adapters if None); wrappers left without adapters are replaced by their base.

    Merged weights are unmerged first, so the model returns to its exact original weights. Returns the names of
    the modules restored to their original class.
    """
    restored: list[str] = []
    for mod_name, layer in list(lora_layers(model)):
        names = list(layer.lora_A) if name is None else [n for n in layer.lora_A if n == name]
        if layer.merged and any(n in layer.merged for n in names):
            layer.unmerge_()
        for n in names:
            layer.delete_adapter(n)
        if not len(layer.lora_A):
            if layer.merged:
                layer.unmerge_()
            replace_module(model, mod_name, layer.base)
            restored.append(mod_name)
    return restored


def fold_lora(model: nn.Module, strength: float | None = None) -> list[str]:
    """Fold every active adapter into the base weights for good and put the plain modules back (no wrapper, no
    overhead, no way back); returns the names of the modules unwrapped. NaN/Inf: nothing changes (see merge_lora)."""
    merge_lora(model, strength)
    unwrapped = []
    for mod_name, layer in list(lora_layers(model)):
        replace_module(model, mod_name, layer.base)
        unwrapped.append(mod_name)
    return unwrapped
