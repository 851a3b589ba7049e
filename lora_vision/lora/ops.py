"""Operations on a model that carries LoRA: strength, enable/disable, merge/unmerge, state dicts, counts."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from .config import matches
from .layers import LoRALayer, lora_layers
from . import kinds as _kinds
from .spec import LayerSpec, layer_key


class LoRAStateDictError(KeyError):
    """A LoRA state dict does not fit the adapters of a model; the message lists every mismatch."""

    def __str__(self) -> str:  # KeyError quotes its message; show it as written
        return str(self.args[0])


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters present anywhere in `model`, in order of creation."""
    seen: dict[str, None] = {}
    for _, layer in lora_layers(model):
        for n in layer.lora_A:
            seen.setdefault(n)
    return list(seen)


def _require(model: nn.Module, name: str | None) -> list[str]:
    names = adapter_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters; call inject_lora first")
    if name is not None and name not in names:
        raise KeyError(f"no adapter named {name!r}; this model has {names}")
    return names if name is None else [name]


def set_strength(model: nn.Module, strength: float, name: str | None = None, pattern: str | None = None) -> int:
    """Set the strength of adapter `name` (all adapters if None) in the layers whose name matches `pattern`.

    One small copy per adapter table: cheap enough to call every step, and no recompilation under torch.compile.
    Returns the number of layers changed.
    """
    names = _require(model, name)
    per_table: dict[int, tuple] = {}
    for mod_name, layer in lora_layers(model):
        if pattern is not None and not matches(mod_name, pattern):
            continue
        for n in names:
            if n in layer.tables:
                table, slot = layer.tables[n]
                per_table.setdefault(id(table), (table, []))[1].append(slot)
    count = 0
    for table, slots in per_table.values():
        table.set_strength(strength, None if len(slots) == len(table.layer_names) else slots)
        count += len(slots)
    return count


def get_strength(model: nn.Module, name: str) -> dict[str, float]:
    """Strength of adapter `name` per adapted layer."""
    _require(model, name)
    return {m: layer.current_strength(name) for m, layer in lora_layers(model) if name in layer.tables}


def set_active_adapters(model: nn.Module, names: list[str] | str) -> None:
    """Which adapters run in forward (the others stay loaded)."""
    names = [names] if isinstance(names, str) else list(names)
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown}; this model has {known}")
    for _, layer in lora_layers(model):
        layer.set_active(names)


@contextlib.contextmanager
def disable_lora(model: nn.Module) -> Iterator[None]:
    """Run the base model inside the block (merged adapters stay in the weights)."""
    layers = [layer for _, layer in lora_layers(model)]
    before = [layer.disabled for layer in layers]
    try:
        for layer in layers:
            layer.disabled = True
            layer._refresh()
        yield
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was
            layer._refresh()


def merge_lora(model: nn.Module, strength: float | None = None, adapters: list[str] | None = None) -> int:
    """Fold the active adapters (or `adapters`) into the base weights; returns the number of layers changed.

    The update is computed in float32 and cast back to the weight dtype. `strength` None uses each adapter's
    current strength. If any layer would get a NaN or Inf, nothing is changed and FloatingPointError is raised.
    Merged adapters stop running in forward; `unmerge_lora` restores the base weights bit for bit.
    """
    plan = []
    for mod_name, layer in lora_layers(model):
        names = [n for n in (adapters if adapters is not None else layer.active) if n in layer.lora_A]
        if names:
            strengths = {n: float(strength) if strength is not None else layer.current_strength(n) for n in names}
            plan.append((mod_name, layer, names, strengths))
    if adapters is not None and not plan:
        _require(model, adapters[0] if adapters else None)
    # One pass: merge every layer, collecting NaN/Inf flags on the device, then one sync. If any layer went bad,
    # every layer merged here is put back exactly, so a bad adapter leaves the whole model untouched.
    flags: list[tuple[str, torch.Tensor]] = []
    done: list[LoRALayer] = []
    try:
        for mod_name, layer, names, strengths in plan:
            flag = layer.merge_(names, strengths, check=False)
            done.append(layer)
            if flag is not None:
                flags.append((mod_name, flag))
        per_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
        for mod_name, flag in flags:
            per_device.setdefault(flag.device, []).append((mod_name, flag))
        bad = []
        for items in per_device.values():  # one transfer (one sync) per device
            values = torch.stack([f for _, f in items]).tolist()
            bad += [mod_name for (mod_name, _), v in zip(items, values) if v]
    except BaseException:
        for layer in reversed(done):
            layer.undo_merge_()
        raise
    if bad:
        for layer in reversed(done):
            layer.undo_merge_()
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        raise FloatingPointError(f"merging would put NaN/Inf into {', '.join(bad[:5])}{more}; weights left unchanged")
    for layer in done:
        layer.drop_undo_()
    return len(plan)


def unmerge_lora(model: nn.Module) -> int:
    """Restore the base weights saved at merge time (bit-exact); returns the number of layers restored."""
    count = 0
    for _, layer in lora_layers(model):
        if layer.merged:
            layer.unmerge_()
            count += 1
    return count


def lora_parameters(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """The LoRA parameters (A and B, or another kind's factors) of adapter `name`, or of all adapters."""
    out = []
    for _, layer in lora_layers(model):
        for n in layer.lora_A:
            if name is None or n == name:
                out += layer.adapter_parameters(n)
    return out


def lora_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Canonical state dict of adapter `name`: `<module>[.<part>].lora_A.weight`, `.lora_B.weight`, `.alpha`.

    Fused projections (MultiheadAttention, timm qkv) get one entry per part (`q`, `k`, `v`, `o`). Layers of other
    kinds (LoHa, LoKr, DoRA, ...) hold their factors under their LyCORIS names, `<module>.<kind>.<factor>` (see
    `canonical_layers`), next to `<module>.alpha`. Tensors are detached views; alpha is a 0-dim float32 tensor.
    `load_lora_state_dict` reads every kind back.
    """
    return {k: t for key, spec in lora_specs(model, name).items() for k, t in layer_tensors(key, spec).items()}


def lora_specs(model: nn.Module, name: str = "default") -> dict[str, LayerSpec]:
    """Adapter `name` of `model` as {module[.part]: LayerSpec} (factors, alpha and scaling rule per layer)."""
    _require(model, name)
    return {layer_key(mod_name, part): spec for mod_name, layer in lora_layers(model) if name in layer.lora_A
            for part, spec in layer.specs(name).items()}


def canonical_layers(state_dict: Mapping[str, torch.Tensor],
                     rule_for: Callable[[str], str] | None = None) -> dict[str, LayerSpec]:
    """A canonical state dict as {module[.part]: LayerSpec} of any kind; `rule_for(key)` gives each layer's scaling
    rule (the state dict itself stores only factors and alpha; default: the plain rule).

    Layers of other kinds than plain LoRA are stored as `<module>.<kind>.<factor>` (factor names as in LyCORIS
    files, e.g. `...to_q.loha.hada_w1_a`, `...conv1.lora.lora_mid`, `...to_k.lora.dora_scale`) next to
    `<module>.alpha`; a LoRA layer's A and B stay `.lora_A.weight` / `.lora_B.weight`."""
    plain, kinds = _split_kind_keys(state_dict)
    out = {}
    for (mod, part), e in parse_canonical(plain, allow_kinds=True).items():
        key = layer_key(mod, part)
        extra = kinds.pop(key, {})
        rule = rule_for(key) if rule_for else "lora"
        out[key] = LayerSpec(e["A"], e["B"], e["alpha"], rule, "lora", extra.get("lora", {}))
        if set(extra) - {"lora"}:
            raise LoRAStateDictError(f"{key}: has LoRA factors and {sorted(set(extra) - {'lora'})} factors; a layer "
                                     "has one kind")
    problems = []
    for key, per_kind in kinds.items():
        if len(per_kind) > 1:
            problems.append(f"{key}: factors of several kinds {sorted(per_kind)}; a layer has one kind")
            continue
        (kind, factors), = per_kind.items()
        missing = _kinds.missing_factors(kind, factors if kind != "lora" else {"A": None, "B": None, **factors})
        if kind == "lora" or missing:
            problems.append(f"{key}: {kind} layer with {sorted(factors)} lacks {', '.join(missing) or 'lora_A/lora_B'}")
            continue
        alpha = state_dict.get(f"{key}.alpha")
        rank = _kinds.rank_of(kind, factors)
        out[key] = LayerSpec(None, None, float(alpha.item()) if alpha is not None else float(rank or 1),
                             rule_for(key) if rule_for else "lora", kind, factors)
    problems += [f"{k}: {p}" for k, sp in out.items() if not sp.is_plain for p in sp.check(None)]
    if problems:
        raise LoRAStateDictError("invalid adapter state dict:\n  - " + "\n  - ".join(problems))
    return out


def layer_tensors(key: str, spec: LayerSpec) -> dict[str, torch.Tensor]:
    """The canonical tensors of one layer (the inverse of canonical_layers): `key.lora_A.weight`, ...,
    `key.<kind>.<factor>`, `key.alpha` (0-dim float32)."""
    out = {}
    if spec.kind == "lora":
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = spec.A, spec.B
    for n, t in spec.factors.items():
        out[f"{key}.{spec.kind}.{n}"] = t
    out[f"{key}.alpha"] = torch.tensor(float(spec.alpha), dtype=torch.float32)
    return out


def _split_kind_keys(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict[str, dict[str, dict]]]:
    """(plain LoRA keys, {layer: {kind: {factor: tensor}}}) of a canonical state dict."""
    plain, kinds = {}, {}
    for key, t in state_dict.items():
        head, _, factor = key.rpartition(".")
        layer, _, kind = head.rpartition(".")
        if layer and kind in _kinds.KINDS and factor in _kinds.get_kind(kind).factor_names and factor not in ("A", "B"):
            kinds.setdefault(layer, {}).setdefault(kind, {})[factor] = t
        else:
            plain[key] = t
    for layer in kinds:  # the alpha of a kind layer is not a LoRA entry
        if not any(f"{layer}{s}" in plain for s in (".lora_A.weight", ".lora_B.weight")):
            plain.pop(f"{layer}.alpha", None)
    return plain, kinds


def parse_canonical(state_dict: Mapping[str, torch.Tensor], allow_kinds: bool = False) -> dict[tuple[str, str], dict]:
    """Group plain LoRA keys per (module, part); checks that every entry has both A and B and ranks agree.

    Keys of other kinds (`<module>.<kind>.<factor>`) are refused with a message naming the kind, for the
    operations that handle plain LoRA only; `allow_kinds` skips them (canonical_layers reads them)."""
    if allow_kinds:
        groups_in = state_dict
    else:
        groups_in, kinds = _split_kind_keys(state_dict)
        if kinds:
            first = next(iter(kinds))
            raise LoRAStateDictError(
                f"{len(kinds)} layer(s) are not plain LoRA (first: {first}, {'/'.join(kinds[first])} "
                f"{sorted(next(iter(kinds[first].values())))}); this operation handles plain LoRA (A and B) only, "
                "other kinds are applied by Adapter.apply_to / inject_lora and kept by Adapter.save")
    state_dict = groups_in
    groups: dict[str, dict[str, torch.Tensor]] = {}
    bad: list[str] = []
    for key, t in state_dict.items():
        for suffix in (".lora_A.weight", ".lora_B.weight", ".alpha"):
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[suffix] = t
                break
        else:
            bad.append(key)
    problems = [f"unexpected key {k!r} (expected <module>.lora_A.weight / .lora_B.weight / .alpha)" for k in bad]
    entries: dict[tuple[str, str], dict] = {}
    for key, g in groups.items():
        if ".lora_A.weight" not in g or ".lora_B.weight" not in g:
            have = sorted(s.lstrip(".") for s in g)
            problems.append(f"{key}: has {have} but needs both lora_A.weight and lora_B.weight")
            continue
        a, b = g[".lora_A.weight"], g[".lora_B.weight"]
        if a.shape[0] != b.shape[1]:
            problems.append(f"{key}: lora_A has rank {a.shape[0]} but lora_B has rank {b.shape[1]}")
            continue
        alpha = float(g[".alpha"].item()) if ".alpha" in g else float(a.shape[0])
        mod, _, last = key.rpartition(".")
        part = last if last in ("q", "k", "v", "o") and mod else ""
        entries[(mod if part else key, part)] = {"A": a, "B": b, "rank": int(a.shape[0]), "alpha": alpha}
    if problems:
        raise LoRAStateDictError("invalid LoRA state dict:\n  - " + "\n  - ".join(problems))
    return entries


@dataclass
class LoadReport:
    """What `load_lora_state_dict` matched and what it did not."""

    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"matched {len(self.matched)} LoRA modules"]
        for what in ("missing", "unexpected", "mismatched"):
            items = getattr(self, what)
            if items:
                more = f" ... (+{len(items) - 8} more)" if len(items) > 8 else ""
                lines.append(f"{what} ({len(items)}): " + ", ".join(items[:8]) + more)
        return "\n".join(lines)


def load_lora_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str = "default",
                         strict: bool = True) -> LoadReport:
    """Copy a canonical state dict into adapter `name` of `model`.

    strict: any missing, unexpected or wrongly shaped entry (or a different alpha) raises LoRAStateDictError
    listing all of them, before anything is copied. Non-strict: loads what fits and returns the report.
    """
    _require(model, name)
    plain_sd, kind_sd = _split_kind_keys(state_dict)
    # By the key as written: a Linear named q / k / v / o (T5's) and a fused module's part both read back
    entries = {layer_key(m, p): e for (m, p), e in parse_canonical(plain_sd).items()}
    report = LoadReport()
    todo = []
    kind_todo: list[tuple[nn.ParameterDict, dict[str, torch.Tensor]]] = []
    present: set[str] = set()
    for mod_name, layer in lora_layers(model):
        if name not in layer.lora_A:
            continue
        if name in layer.kinds:  # LoHa, LoKr, DoRA, ...: every factor by name, shape and alpha, part by part
            for part in layer.kind_parts(name):
                key = layer_key(mod_name, part)
                present.add(key)
                got = _kind_entry(layer, name, part, key, kind_sd.pop(key, None), entries.pop(key, None),
                                  state_dict.get(f"{key}.alpha"), report)
                if got is not None:
                    kind_todo.append((layer.kind_params(name, part), got))
            continue
        for suffix, (a, b) in layer.lora_pairs(name).items():
            label = layer_key(mod_name, suffix)
            present.add(label)
            e = entries.get(label)
            if e is None:
                report.missing.append(label)
                continue
            bad = []
            if tuple(e["A"].shape) != tuple(a.shape):
                bad.append(f"lora_A {tuple(e['A'].shape)} vs expected {tuple(a.shape)}")
            if tuple(e["B"].shape) != tuple(b.shape):
                bad.append(f"lora_B {tuple(e['B'].shape)} vs expected {tuple(b.shape)}")
            if abs(e["alpha"] - layer.alphas[name]) > 1e-6 * max(1.0, abs(layer.alphas[name])):
                bad.append(f"alpha {e['alpha']:g} vs expected {layer.alphas[name]:g}")
            for t, what in ((e["A"], "lora_A"), (e["B"], "lora_B")):
                if not t.is_floating_point():
                    bad.append(f"{what} dtype {t.dtype} is not floating point")
                elif not torch.isfinite(t).all():
                    bad.append(f"{what} contains NaN/Inf")
            if bad:
                report.mismatched.append(f"{label} ({'; '.join(bad)})")
                continue
            report.matched.append(label)
            todo.append((layer, suffix, e))
    report.unexpected = [k for k in entries if k not in present] + list(kind_sd)
    if strict and not report.ok:
        raise LoRAStateDictError(f"LoRA state dict does not fit adapter {name!r} of {type(model).__name__}:\n"
                                 + str(report))
    for layer, suffix, e in todo:
        layer.load_pair_(name, suffix, e["A"], e["B"])
    with torch.no_grad():
        for params, factors in kind_todo:
            for n, t in factors.items():
                params[n].copy_(t)
    return report


def _kind_entry(layer: LoRALayer, name: str, part: str, label: str, given: dict | None, plain: dict | None,
                alpha: torch.Tensor | None, report: LoadReport) -> dict[str, torch.Tensor] | None:
    """The factors of a kind adapter's layer (its `part`) from a state dict, checked against the layer (names,
    shapes, alpha, values); problems go to `report`."""
    kind, params = layer.kinds[name], layer.kind_params(name, part)
    if given is None and plain is None:
        report.missing.append(label)
        return None
    factors = dict((given or {}).get(kind, {}))
    if plain is not None:
        factors |= {"A": plain["A"], "B": plain["B"]}
    bad = []
    if given and set(given) != {kind}:
        bad.append(f"{'/'.join(sorted(given))} factors vs expected {kind}")
    if set(factors) != set(params):
        bad.append(f"factors {sorted(factors)} vs expected {sorted(params)}")
    for n, t in factors.items():
        if n in params and tuple(t.shape) != tuple(params[n].shape):
            bad.append(f"{n} {tuple(t.shape)} vs expected {tuple(params[n].shape)}")
        elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(f"{n} contains NaN/Inf")
    a = float(alpha.item()) if alpha is not None else None
    if a is not None and abs(a - layer.alphas[name]) > 1e-6 * max(1.0, abs(layer.alphas[name])):
        bad.append(f"alpha {a:g} vs expected {layer.alphas[name]:g}")
    if bad:
        report.mismatched.append(f"{label} ({'; '.join(bad)})")
        return None
    report.matched.append(label)
    return factors


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def lora_report(model: nn.Module, label: str | None = None) -> str:
    """One line: `adapted 192 modules in unet (797,184 trainable parameters, 0.09%)`."""
    layers = list(lora_layers(model))
    trainable, total = count_parameters(model)
    where = label or type(model).__name__
    names = adapter_names(model)
    pct = 100.0 * trainable / max(total, 1)
    adapters = f", adapters: {', '.join(names)}" if len(names) > 1 else ""
    return f"adapted {len(layers)} modules in {where} ({trainable:,} trainable parameters, {pct:.2f}%{adapters})"


def is_lora_layer(module: nn.Module) -> bool:
    """True for a LoRA wrapper."""
    return isinstance(module, LoRALayer)
