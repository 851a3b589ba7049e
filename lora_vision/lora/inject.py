"""inject_lora / remove_lora: replace matched child modules by LoRA wrappers and back."""

from __future__ import annotations

import collections
import difflib
from typing import Iterator, Mapping

import torch
from torch import nn

from .config import LoRAConfig, matches
from .layers import (LoRAConv2d, LoRAFusedLinear, LoRALayer, LoRALinear, LoRAMultiheadAttention,
                     StrengthTable)

ADAPTABLE = (nn.Linear, nn.Conv2d, nn.MultiheadAttention)


class TargetError(ValueError):
    """A target pattern or preset does not fit the model."""


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """Every LoRA wrapper in `model` with its module name."""
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALayer):
            yield name, mod


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that can carry LoRA: Linear, Conv2d, MultiheadAttention and existing wrappers (not their insides)."""
    out: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(mod, LoRALayer):
            out[name] = mod
            skip.append(name)
        elif isinstance(mod, nn.MultiheadAttention):
            # Its out_proj is read directly by the parent's forward: only the parent can be adapted.
            out[name] = mod
            skip.append(name)
        elif isinstance(mod, ADAPTABLE):
            out[name] = mod
    return out


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
    """Target patterns (a preset expanded) and the modules of `model` they select, exclusions applied."""
    from ..targets import resolve_preset

    patterns = config.targets
    if isinstance(patterns, str):
        patterns = resolve_preset(patterns, model)
    cands = candidate_modules(model)
    chosen = {n: m for n, m in cands.items()
              if any(matches(n, p) for p in patterns) and not any(matches(n, e) for e in config.exclude)}
    if not chosen:
        what = f"preset {config.targets!r} ({', '.join(patterns)})" if isinstance(config.targets, str) else \
            f"targets {tuple(patterns)!r}"
        raise TargetError(
            f"{what} matched 0 of {len(cands)} Linear/Conv2d/MultiheadAttention modules in {type(model).__name__}; "
            f"{_target_hint(tuple(patterns), list(cands))}")
    return tuple(patterns), chosen


def _wrap(name: str, mod: nn.Module, config: LoRAConfig) -> LoRALayer:
    if isinstance(mod, nn.MultiheadAttention):
        return LoRAMultiheadAttention(mod, config.fused_parts)
    if _is_fused_qkv(name, mod) and config.split_qkv:
        parts = tuple(p for p in config.fused_parts if p in ("q", "k", "v"))
        if not parts:
            raise TargetError(f"{name} is a fused qkv Linear but fused_parts={config.fused_parts!r} has no q/k/v")
        return LoRAFusedLinear(mod, parts)
    if isinstance(mod, nn.Linear):
        return LoRALinear(mod)
    if isinstance(mod, nn.Conv2d):
        return LoRAConv2d(mod)
    raise TargetError(f"{name}: cannot adapt a {type(mod).__name__}")


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _kernel(mod: nn.Module) -> int:
    base = mod.base if isinstance(mod, LoRALayer) else mod
    return max(base.kernel_size) if isinstance(base, nn.Conv2d) else 1


def inject_lora(model: nn.Module, config: LoRAConfig, name: str = "default", strength: float = 1.0,
                freeze_base: bool = True, dtype: torch.dtype = torch.float32) -> list[str]:
    """Add adapter `name` to the modules of `model` selected by `config`; returns the adapted module names.

    Modules are replaced by LoRA wrappers (the original is kept as `.base`); an existing wrapper gets one more
    adapter. With `freeze_base`, every parameter of `model` except LoRA parameters is frozen.
    """
    if "." in name or not name:
        raise ValueError(f"adapter name {name!r}: expected a non-empty name without '.'")
    _, chosen = resolve_targets(model, config)
    if freeze_base:
        model.requires_grad_(False)
    table = StrengthTable(name)
    adapted: list[str] = []
    for mod_name, mod in chosen.items():
        layer = mod if isinstance(mod, LoRALayer) else _wrap(mod_name, mod, config)
        k = _kernel(mod)
        layer.add_adapter(name, config.rank_for(mod_name, k), config.alpha_for(mod_name, k), config.dropout,
                          config.init, config.rslora, table, mod_name)
        for p in (layer.lora_A[name], layer.lora_B[name]):
            p.data = p.data.to(dtype)
            p.requires_grad_(True)
        if layer is not mod:
            _set_child(model, mod_name, layer)
        adapted.append(mod_name)
    table.set_strength(strength)
    return adapted


def inject_lora_from_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str = "default",
                                strength: float = 1.0, dropout: float = 0.0, rslora: bool = False,
                                freeze_base: bool = True, dtype: torch.dtype = torch.float32) -> list[str]:
    """Inject adapter `name` with the modules, ranks and alphas that a canonical state dict describes, then load it.

    Canonical keys: `<module>[.<part>].lora_A.weight`, `.lora_B.weight` and `.alpha` (alpha defaults to rank).
    """
    from .ops import load_lora_state_dict, parse_canonical

    entries = parse_canonical(state_dict)
    cands = candidate_modules(model)
    modules: dict[str, dict[str, int]] = {}
    missing = []
    for (mod_name, part), e in entries.items():
        if mod_name not in cands:
            missing.append(mod_name)
            continue
        modules.setdefault(mod_name, {})[part] = e["rank"]
    if missing:
        raise KeyError(f"the state dict adapts {len(set(missing))} module(s) that {type(model).__name__} does not "
                       f"have (first: {sorted(set(missing))[:3]}); is it for another model?")
    rank_pattern, alpha_pattern, parts_needed = {}, {}, set()
    for mod_name, parts in modules.items():
        ranks = set(parts.values())
        if len(ranks) != 1:
            raise ValueError(f"{mod_name}: fused parts with different ranks {dict(parts)} are not supported")
        rank_pattern["re:" + _escape(mod_name)] = ranks.pop()
        alphas = {entries[(mod_name, p)]["alpha"] for p in parts}
        if len(alphas) != 1:
            raise ValueError(f"{mod_name}: fused parts with different alphas {sorted(alphas)} are not supported")
        alpha_pattern["re:" + _escape(mod_name)] = alphas.pop()
        parts_needed |= {p for p in parts if p}
    config = LoRAConfig(rank=1, targets=tuple("re:" + _escape(m) for m in modules), dropout=dropout,
                        rslora=rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                        fused_parts=tuple(p for p in ("q", "k", "v", "o") if p in parts_needed) or ("q", "k", "v", "o"),
                        split_qkv=bool(parts_needed))
    adapted = inject_lora(model, config, name=name, strength=strength, freeze_base=freeze_base, dtype=dtype)
    load_lora_state_dict(model, state_dict, name=name, strict=True)
    return adapted


def _escape(name: str) -> str:
    import re

    return re.escape(name)


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
            _set_child(model, mod_name, layer.base)
            restored.append(mod_name)
    return restored
