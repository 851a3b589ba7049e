"""LoRA wrappers: each keeps the frozen layer as `self.base` and adds `lora_A` / `lora_B` per named adapter.

h = base(x) + strength * scaling * B(A(dropout(x)))  with scaling = alpha / rank (alpha / sqrt(rank) for rsLoRA).

The per-layer factor strength * scaling lives in a `StrengthTable` shared by every layer of one adapter, as one
tensor: changing the strength of an adapter is one small copy, and under torch.compile only a tensor value
changes, so nothing recompiles.

Other adapter kinds (LoHa, LoKr, DoRA, Tucker LoCon, OFT, BOFT, (IA)^3, full diff; see lora.kinds) live in the same
wrappers around nn.Linear and nn.Conv2d (and on the q / k / v / o parts of nn.MultiheadAttention, one layer per
part): their factors are parameters in `kind_factors[name]` (per part on attention), `kinds[name]` says the kind, and
`lora_A[name]` / `lora_B[name]` hold empty placeholders so that every "which adapters does this layer have" question
keeps one answer. Such an adapter runs unfused as
h = base(x) + strength * (x through Δ), Δ = LayerSpec.delta(W) rebuilt from the factors at every forward (nothing
cached, so training works), and its table slot holds the strength alone (the scale is inside Δ). Norm-layer updates
(`w_norm` / `b_norm`) live in `LoRANorm`, around nn.LayerNorm and nn.GroupNorm: the norm is affine in its weight
and bias, so x through Δ is the same normalisation with weight w_norm and bias b_norm.
"""

from __future__ import annotations

import math
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import kinds as _kinds
from .kinds import KindError
from .spec import LayerSpec, scaling as _scaling

# Part letters of fused projections and their row block in the fused weight.
_QKV = ("q", "k", "v")
NORMS = (nn.LayerNorm, nn.GroupNorm)
"""The normalisation layers norm-kind updates (w_norm / b_norm) go on."""
# LoRALayer attributes that hold plain Python data (see LoRALayer.__setattr__).
_LAYOUT = [0]


def layout_changed() -> None:
    """Say that the modules a forward runs have changed (an adapter added, removed, switched, merged or disabled;
    slots installed): graphs captured before (lora_vision.captured) are stale."""
    _LAYOUT[0] += 1


def layout_generation() -> int:
    """A number that changes with every layout_changed(): a captured graph keeps the one it was recorded under."""
    return _LAYOUT[0]


_PLAIN_STATE = frozenset({"ranks", "alphas", "rules", "tables", "active", "merged", "disabled", "_backup", "_undo",
                          "_run", "kinds", "in_features", "out_features", "parts", "d", "d_in", "batch_first",
                          "compute_dtype"})


class StrengthTable:
    """Strength of one adapter in every layer it adapts, stored as `values[slot] = scaling[slot] * strength[slot]`.

    Slots are registered one per layer while an adapter is added; they are built into the tensors in one go, the
    first time `scaling`, `strength` or `values` is read after them (one small tensor build per load instead of a
    few tensor operations per layer)."""

    _TENSORS = ("scaling", "strength", "values")

    def __init__(self, name: str) -> None:
        self.name = name
        self.layer_names: list[str] = []
        self.scaling = torch.zeros(0, dtype=torch.float64)
        self.strength = torch.zeros(0, dtype=torch.float64)
        self.values = torch.zeros(0, dtype=torch.float32)
        self._pending: list[tuple[float, float]] = []  # (scaling, strength) of slots not built yet

    def add_slot(self, layer_name: str, scaling: float, strength: float = 1.0) -> int:
        """Register one more layer; returns its slot index."""
        if not self._pending:  # the built tensors step aside until the next read (__getattr__)
            self._built = tuple(self.__dict__.pop(n) for n in self._TENSORS)
        self._pending.append((scaling, strength))
        self.layer_names.append(layer_name)
        return len(self.layer_names) - 1

    def __getattr__(self, name: str) -> torch.Tensor:
        # Called only for attributes not set: the tensors while slots are pending.
        if name in StrengthTable._TENSORS and self.__dict__.get("_pending"):
            scaling, strength, values = self.__dict__.pop("_built")
            new = torch.tensor(self._pending, dtype=torch.float64)
            self._pending = []
            self.scaling = torch.cat([scaling, new[:, 0]])
            self.strength = torch.cat([strength, new[:, 1]])
            self.values = (self.scaling * self.strength).to(torch.float32).to(values.device)
            return self.__dict__[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def set_strength(self, strength: float | torch.Tensor, slots: list[int] | None = None) -> None:
        """Set the strength of all slots (or of the given ones); one host-to-device copy."""
        if slots is None:
            self.strength.fill_(float(strength)) if not torch.is_tensor(strength) else self.strength.copy_(strength)
        else:
            self.strength[slots] = float(strength)
        self.values.copy_((self.scaling * self.strength).to(torch.float32), non_blocking=True)

    def to(self, device: torch.device) -> None:
        """Move the values to `device` (done lazily by the layers on first use)."""
        self.values = self.values.to(device)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, "LoRALayer"]]:
    """Every LoRA wrapper in `model` with its module name."""
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALayer):
            yield name, mod


class LoRALayer(nn.Module):
    """Common state of every LoRA wrapper: adapters, their tables, which ones run, merge backups."""

    base: nn.Module
    compute_dtype: torch.dtype | None = None
    """When set (e.g. torch.bfloat16 for a bf16 base), A and B are cast to it for the forward product, so the
    low-rank path runs in the base's precision while the parameters (and their gradients) stay float32; None keeps
    the default (the input is cast to the LoRA weights' dtype outside autocast)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.ranks: dict[str, int] = {}
        self.alphas: dict[str, float] = {}
        self.rules: dict[str, str] = {}
        self.tables: dict[str, tuple[StrengthTable, int]] = {}
        self.active: list[str] = []
        self.merged: dict[str, float] = {}
        self.disabled = False
        self._backup: dict[str, torch.Tensor] = {}
        self._undo: tuple[dict[str, torch.Tensor | None], dict[str, float]] | None = None
        self._run: tuple[str, ...] = ()
        self.kinds: dict[str, str] = {}
        # `kind_factors` (name -> ParameterDict of that adapter's factors) is created with the first adapter of
        # another kind (add_kind_adapter), `lora_dropout` (name -> nn.Dropout) with the first adapter that has
        # dropout (_add_dropout): plain LoRA layers and loaded adapters do without the extra modules.

    def __setattr__(self, name: str, value: object) -> None:
        # The bookkeeping above is plain data, set on every load (one wrapper per adapted layer) and every switch
        # (set_active): it skips nn.Module.__setattr__, which checks each value against parameters, buffers and
        # modules.
        if name in _PLAIN_STATE:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ---- adapter bookkeeping -------------------------------------------------------------------------
    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float, init: str, rule: str,
                    table: StrengthTable, layer_name: str,
                    weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Create adapter `name` with zero B (so it starts as the identity) and register it in `table`.

        `rule` is the scaling rule ("lora": alpha / rank, "rslora": alpha / sqrt(rank); see lora.spec).

        `weights` (A, B), in this layer's parameter layout, are used as they are instead of a fresh
        initialisation (loading a file: nothing is allocated or initialised twice); they are not trainable.
        """
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists in {layer_name}; remove it first or use another name")
        if weights is None:
            a, b = self._new_params(rank)
            self._init_A(a, init, rank)
        else:
            a, b = weights
        self.lora_A[name] = nn.Parameter(a, requires_grad=weights is None)
        self.lora_B[name] = nn.Parameter(b, requires_grad=weights is None)
        self._add_dropout(name, dropout)
        self.ranks[name], self.alphas[name], self.rules[name] = rank, float(alpha), rule
        self.tables[name] = (table, table.add_slot(layer_name, _scaling(alpha, rank, rule)))
        self.active.append(name)
        self._refresh()

    def add_kind_adapter(self, name: str, specs: Mapping[str, LayerSpec], table: StrengthTable, layer_name: str,
                         trainable: bool, dropout: float = 0.0) -> None:
        """Create adapter `name` of any kind from `specs` ({part: LayerSpec}: {"": spec} for a plain module, q / k /
        v / o for a MultiheadAttention; one kind, alpha and rule), its factors this layer's parameters, used as given
        (the caller has placed them on the right device and dtype), registered in `table` at scale 1."""
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists in {layer_name}; remove it first or use another name")
        self._check_kind_parts(specs, layer_name)
        first = next(iter(specs.values()))
        stores = {}
        for part, spec in specs.items():
            params = nn.ParameterDict()
            for n, t in spec.all_factors.items():
                params[n] = nn.Parameter(t, requires_grad=trainable and t.is_floating_point())
            stores[part] = params
        if "kind_factors" not in self._modules:
            self.kind_factors = nn.ModuleDict()
        self.kind_factors[name] = stores[""] if set(stores) == {""} else nn.ModuleDict(stores)
        self.kinds[name] = first.kind
        dev = next(self.base.parameters()).device
        self.lora_A[name] = nn.Parameter(torch.empty(0, device=dev), requires_grad=False)
        self.lora_B[name] = nn.Parameter(torch.empty(0, device=dev), requires_grad=False)
        self._add_dropout(name, dropout)
        self.ranks[name], self.alphas[name], self.rules[name] = first.rank, float(first.alpha), first.rule
        self.tables[name] = (table, table.add_slot(layer_name, 1.0))
        self.active.append(name)
        self._refresh()

    def _check_kind_parts(self, specs: Mapping[str, LayerSpec], layer_name: str) -> None:
        """Raise KindError unless `specs` fits this layer: one spec on the whole module."""
        spec = next(iter(specs.values()))
        norm = _kinds.get_kind(spec.kind).norm_layers
        if set(specs) != {""} or norm != isinstance(self.base, NORMS) or isinstance(self, _FusedLoRA) or \
                not isinstance(self.base, (nn.Linear, nn.Conv2d, *NORMS)):
            where = "LayerNorm and GroupNorm" if norm else "Linear and Conv2d"
            part = " part" if set(specs) != {""} else ""
            raise KindError(f"{layer_name}: {spec.label} layers go on {where} modules only, not on a "
                            f"{type(self.base).__name__}{part}")

    def kind_parts(self, name: str) -> tuple[str, ...]:
        """The parts kind adapter `name` has factors on: ("",) for a plain module (q / k / v / o on attention)."""
        return ("",)

    def kind_params(self, name: str, part: str = "") -> nn.ParameterDict:
        """The factors of kind adapter `name` on `part`, as this layer's parameters."""
        return self.kind_factors[name]

    def kind_spec(self, name: str, detach: bool = True, part: str | None = None) -> LayerSpec:
        """Adapter `name` (a kind adapter) on `part` (default: its first) as a LayerSpec; `detach=False` keeps the
        parameters (for training)."""
        params = self.kind_params(name, self.kind_parts(name)[0] if part is None else part)
        f = {n: (p.detach() if detach else p) for n, p in params.items()}
        kind = self.kinds[name]
        a, b = (f.pop("A"), f.pop("B")) if kind == "lora" else (None, None)
        return LayerSpec(a, b, self.alphas[name], self.rules[name], kind, f)

    def part_weight(self, part: str = "") -> torch.Tensor:
        """The base weight `part` reads ("" for the whole module) before any merge (see the function part_weight):
        weight-dependent kinds rebuild their update from it."""
        return part_weight(self.base, part, self._backup)

    def _kind_update(self, spec: LayerSpec, part: str = "") -> torch.Tensor:
        """The update of `part`'s weight at strength 1 of a kind adapter's `spec` (kind_spec), in that weight's
        shape."""
        w = self.part_weight(part).detach()
        return spec.delta(w if spec.weight_dependent else None).reshape(w.shape)

    def _kind_delta(self, name: str, detach: bool = True) -> dict[str, torch.Tensor]:
        spec = self.kind_spec(name, detach)
        out = {"weight": self._kind_update(spec)}
        bias = spec.bias_delta()
        if bias is not None:
            out["bias"] = bias
        return out

    def _kind_out(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + strength * (x through Δ [+ bias Δ]) for a kind adapter, differentiable in its factors."""
        f = self.kind_factors[name]
        if self.kinds[name] == "lora" and set(f) == {"A", "B", "diff_b"} and isinstance(self.base, nn.Linear):
            # A LoRA pair with a bias update (lora.kinds): the low-rank product, no full-size Δ per call.
            dtype = self.compute_dtype or torch.float32
            a, b, bias = (f[n].to(dtype) for n in ("A", "B", "diff_b"))
            h = self._dropout(name, _cast_in(x, a))
            y = F.linear(F.linear(h, a.to(h.dtype)) * self.scaling(name), b.to(h.dtype), bias.to(h.dtype))
            return out + (y * self.factor(name, out.device)).to(out.dtype)
        d = self._kind_delta(name, detach=False)
        dtype = self.compute_dtype or torch.float32
        h = self._dropout(name, _cast_in(x, d["weight"].to(dtype)))
        w, bias = d["weight"].to(h.dtype), d.get("bias")
        bias = bias.to(h.dtype) if bias is not None else None
        c = self.base
        if isinstance(c, nn.Conv2d):
            y = F.conv2d(h, w, bias, c.stride, c.padding, c.dilation)
        elif isinstance(c, nn.LayerNorm):
            y = F.layer_norm(h, c.normalized_shape, w, bias, c.eps)
        elif isinstance(c, nn.GroupNorm):
            y = F.group_norm(h, c.num_groups, w, bias, c.eps)
        else:
            y = F.linear(h, w, bias)
        return out + (y * self.factor(name, out.device)).to(out.dtype)

    def _add_dropout(self, name: str, p: float) -> None:
        if p > 0:
            if "lora_dropout" not in self._modules:
                self.lora_dropout = nn.ModuleDict()
            self.lora_dropout[name] = nn.Dropout(p)

    def _dropout(self, name: str, h: torch.Tensor) -> torch.Tensor:
        """Adapter `name`'s dropout on its input (in training mode), or `h` itself when it has none."""
        drops = self._modules.get("lora_dropout")
        return drops[name](h) if drops is not None and name in drops else h

    def delete_adapter(self, name: str) -> None:
        """Remove adapter `name` (unmerging it first if it was merged)."""
        if name in self.merged:
            self.unmerge_()
        for d in (self.lora_A, self.lora_B):
            del d[name]
        drops = self._modules.get("lora_dropout")
        if drops is not None and name in drops:
            del drops[name]
        for d in (self.ranks, self.alphas, self.rules, self.tables):
            d.pop(name)
        if name in self.kinds:
            del self.kind_factors[name]
            del self.kinds[name]
        if name in self.active:
            self.active.remove(name)
        self._refresh()

    def set_active(self, names: list[str]) -> None:
        """Which adapters run (a subset of the adapters of this layer, others are ignored)."""
        self.active = [n for n in names if n in self.lora_A]
        self._refresh()

    def _pair(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of adapter `name`, cast to compute_dtype when one is set."""
        a, b = self.lora_A[name], self.lora_B[name]
        if self.compute_dtype is not None and a.dtype != self.compute_dtype:
            return a.to(self.compute_dtype), b.to(self.compute_dtype)
        return a, b

    def _refresh(self) -> None:
        self._run = () if self.disabled else tuple(n for n in self.active if n not in self.merged)
        layout_changed()

    def factor(self, name: str, device: torch.device) -> torch.Tensor:
        """0-dim tensor strength * scaling of adapter `name` on `device`."""
        table, slot = self.tables[name]
        if table.values.device != device:
            table.to(device)
        return table.values[slot]

    def current_strength(self, name: str) -> float:
        """The strength of adapter `name` in this layer."""
        table, slot = self.tables[name]
        return float(table.strength[slot])

    def scaling(self, name: str) -> float:
        """alpha / rank (or alpha / sqrt(rank)) of adapter `name`."""
        return _scaling(self.alphas[name], self.ranks[name], self.rules[name])

    def specs(self, name: str) -> dict[str, LayerSpec]:
        """Adapter `name` as one LayerSpec per canonical sub-module suffix (detached views of A and B)."""
        if name in self.kinds:
            return {p: self.kind_spec(name, part=p) for p in self.kind_parts(name)}
        return {part: LayerSpec(a.detach(), b.detach(), self.alphas[name], self.rules[name])
                for part, (a, b) in self.lora_pairs(name).items()}

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter `name`: A and B, or the factors of another kind."""
        if name in self.kinds:
            return [t for p in self.kind_parts(name) for t in self.kind_params(name, p).values()]
        return [self.lora_A[name], self.lora_B[name]]

    def _refuse_kind(self, name: str, what: str) -> None:
        if name in self.kinds:
            raise KindError(f"adapter {name!r} is a {self.kind_spec(name).label} adapter; {what} handles plain LoRA "
                            "(A and B) only: read other kinds with specs() / kind_spec()")

    # ---- merge ---------------------------------------------------------------------------------------
    def merge_(self, names: list[str], strengths: dict[str, float], check: bool = True) -> torch.Tensor | None:
        """Fold adapters into the base weights (fp32 math, cast back).

        Returns a 0-dim bool tensor on the weights' device that is True when the result holds NaN or Inf (also
        after the cast to a half-precision weight), without waiting for the device; `merge_lora` checks all layers
        with one sync and undoes the merge if any is bad. With `check`, this raises FloatingPointError itself and
        leaves the weights unchanged. Returns None when there was nothing to merge.
        """
        names = [n for n in names if n not in self.merged]
        if not names:
            return None
        targets = dict(self._base_weights())
        # One plain low-rank product in the weight's dtype: one addmm writes W + factor * B @ A straight into the
        # weight (fp32 accumulation and sum, one rounding, as below), without the fp32 copies of the weight.
        product = self._low_rank_product(names, strengths) if not check and list(targets) == ["weight"] else None
        new: dict[str, torch.Tensor] = {}
        bad = None
        with torch.no_grad():
            if product is None:
                deltas = {n: self.delta(n) for n in names}  # once per adapter, not once per weight it touches
                for key, w in targets.items():
                    acc = w.detach().to(torch.float32, copy=True)  # never alias the weight itself
                    for n in names:
                        d = deltas[n].get(key)
                        if d is not None:
                            acc.add_(d.to(acc.device), alpha=strengths[n])
                    cast = acc.to(w.dtype)
                    flag = ~torch.isfinite(cast).all()
                    bad = flag if bad is None else bad | flag
                    new[key] = cast
                if check and bool(bad):
                    raise FloatingPointError(f"merging adapter(s) {names} would put NaN/Inf into "
                                             f"{', '.join(targets)}; weights left unchanged")
            # Unchecked merges keep what `undo_merge_` needs until the caller has checked the flag (merge_lora then
            # drops it with `drop_undo_`); checked merges need no undo.
            self._undo = None if check else (
                {k: (None if k not in self._backup else w.detach().clone()) for k, w in targets.items()},
                dict(self.merged))
            for key, w in targets.items():
                first = key not in self._backup
                if first:
                    self._backup[key] = w.detach().clone()
                if product is None:
                    w.data.copy_(new[key])
                elif first:
                    torch.addmm(self._backup[key], product[0], product[1], alpha=product[2], out=w.data)
                else:
                    w.data.addmm_(product[0], product[1], alpha=product[2])
            if product is not None:
                bad = ~torch.isfinite(targets["weight"]).all()
        for n in names:
            self.merged[n] = strengths[n]
        self._refresh()
        return bad

    def _low_rank_product(self, names: list[str], strengths: dict[str, float]
                          ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(B, A, factor) when merging `names` is W + factor * B @ A with B, A 2-d in W's dtype and device (one
        plain LoRA adapter): `merge_` then does it in one addmm. None: the general path."""
        return None

    def undo_merge_(self) -> None:
        """Undo the last `merge_` exactly (weights and merged state as they were before it)."""
        snapshot, merged = self._undo
        targets = dict(self._base_weights())
        with torch.no_grad():
            for key, before in snapshot.items():
                if before is None:  # this merge made the backup: the backup is the state before it
                    targets[key].data.copy_(self._backup.pop(key))
                else:
                    targets[key].data.copy_(before)
        self.merged = merged
        self._undo = None
        self._refresh()

    def drop_undo_(self) -> None:
        """Forget the undo state of the last unchecked `merge_` (it may hold weight copies)."""
        self._undo = None

    def unmerge_(self) -> None:
        """Restore the exact base weights saved at the first merge (bit for bit)."""
        targets = dict(self._base_weights())
        for key, saved in self._backup.items():
            targets[key].data.copy_(saved)
        self._backup.clear()
        self.merged.clear()
        self._refresh()

    # ---- per-kind hooks ------------------------------------------------------------------------------
    def _new_params(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _init_A(self, a: torch.Tensor, init: str, rank: int) -> None:
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / rank)
            return
        # Same as nn.Linear's default and the paper's reference code (loralib): kaiming-uniform with a = sqrt(5).
        # Fused layers stack parts on dim 0 (P, r, in): each part is initialised as its own matrix.
        for chunk in (a.unbind(0) if a.dim() == 3 else [a]):
            nn.init.kaiming_uniform_(chunk, a=math.sqrt(5))

    def _base_weights(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield "weight", self.base.weight
        if self.kinds and getattr(self.base, "bias", None) is not None and any(
                f in self.kind_factors[n] for n in self.kinds for f in _kinds.BIAS_FACTORS.values()):
            yield "bias", self.base.bias

    def delta(self, name: str) -> dict[str, torch.Tensor]:
        """The update scaling * B @ A of adapter `name` in fp32, per base weight it touches, at strength 1."""
        raise NotImplementedError

    def lora_pairs(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Canonical (A, B) per sub-module suffix ("" for plain layers, "q"/"k"/"v"/"o" for fused parts)."""
        self._refuse_kind(name, "an (A, B) pair")
        return {"": (self.lora_A[name], self.lora_B[name])}

    def load_pair_(self, name: str, suffix: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Copy canonical A and B (shapes as lora_pairs returns them) into adapter `name`."""
        self._refuse_kind(name, "an (A, B) pair")
        with torch.no_grad():
            self.lora_A[name].copy_(a)
            self.lora_B[name].copy_(b)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {self.kind_spec(n).label + ' ' if n in self.kinds else ''}r={self.ranks[n]} "
                         f"alpha={self.alphas[n]:g}" for n in self.lora_A)


def _cast_in(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # Under autocast the matmul picks its own dtype; otherwise run the low-rank path in the LoRA weights' dtype.
    if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
        return x.to(w.dtype)
    return x


class LoRALinear(LoRALayer):
    """LoRA around nn.Linear: A is (rank, in), B is (out, rank)."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__(base)
        self.in_features, self.out_features = base.in_features, base.out_features

    def _new_params(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.base.weight.device
        return (torch.empty(rank, self.in_features, device=dev, dtype=torch.float32),
                torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))

    def delta(self, name: str) -> dict[str, torch.Tensor]:
        if name in self.kinds:
            return self._kind_delta(name)
        return {"weight": (self.lora_B[name].float() @ self.lora_A[name].float()) * self.scaling(name)}

    def _low_rank_product(self, names: list[str], strengths: dict[str, float]
                          ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        w = self.base.weight
        if len(names) != 1 or names[0] in self.kinds or not w.is_contiguous():
            return None
        a, b = self.lora_A[names[0]], self.lora_B[names[0]]
        if a.dtype != w.dtype or b.dtype != w.dtype or a.device != w.device or b.device != w.device:
            return None  # fp32 factors on a half-precision weight: the general path keeps their fp32 product
        return b, a, self.scaling(names[0]) * strengths[names[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for name in self._run:
            if name in self.kinds:
                out = self._kind_out(name, x, out)
                continue
            a, b = self._pair(name)
            h = self._dropout(name, _cast_in(x, a))
            # Scale the small (..., r) intermediate, not the output, and let one addmm add B's product to the
            # base output: no extra full-size elementwise passes.
            low = F.linear(h, a) * self.factor(name, out.device)
            if low.dtype == out.dtype or torch.is_autocast_enabled(out.device.type):
                flat = torch.addmm(out.reshape(-1, out.shape[-1]), low.reshape(-1, low.shape[-1]), b.t())
                out = flat.view(out.shape)
            else:
                out = out + F.linear(low, b).to(out.dtype)
        return out


class LoRAConv2d(LoRALayer):
    """LoRA around nn.Conv2d: A carries the kernel, stride, padding and dilation (rank, in, kh, kw); B is 1x1."""

    def __init__(self, base: nn.Conv2d) -> None:
        if base.groups != 1:
            raise ValueError(f"LoRAConv2d supports groups=1 only, got a Conv2d with groups={base.groups}")
        if base.padding_mode != "zeros":
            raise ValueError(f"LoRAConv2d supports padding_mode='zeros' only, got {base.padding_mode!r}")
        super().__init__(base)

    def _new_params(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.base
        dev = c.weight.device
        return (torch.empty(rank, c.in_channels, *c.kernel_size, device=dev, dtype=torch.float32),
                torch.zeros(c.out_channels, rank, 1, 1, device=dev, dtype=torch.float32))

    def delta(self, name: str) -> dict[str, torch.Tensor]:
        if name in self.kinds:
            return self._kind_delta(name)
        a, b = self.lora_A[name].float(), self.lora_B[name].float()
        w = (b.flatten(1) @ a.flatten(1)).reshape(self.base.weight.shape)
        return {"weight": w * self.scaling(name)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        c = self.base
        for name in self._run:
            if name in self.kinds:
                out = self._kind_out(name, x, out)
                continue
            a, b = self._pair(name)
            h = self._dropout(name, _cast_in(x, a))
            h = F.conv2d(h, a, None, c.stride, c.padding, c.dilation)
            out = out + (F.conv2d(h, b) * self.factor(name, out.device)).to(out.dtype)
        return out


class LoRANorm(LoRALayer):
    """Norm-layer updates (`w_norm` / `b_norm`, LyCORIS' NormModule) around nn.LayerNorm or nn.GroupNorm:
    h = norm(x; W, b) + strength * norm(x; w_norm, b_norm), which equals norm(x; W + strength * w_norm, b +
    strength * b_norm). Carries norm-kind adapters only (no LoRA pairs)."""

    def __init__(self, base: nn.Module) -> None:
        if not isinstance(base, NORMS):
            raise KindError(f"LoRANorm wraps a LayerNorm or GroupNorm, got a {type(base).__name__}")
        if base.weight is None:
            raise KindError(f"the {type(base).__name__} has no weight (built without an affine part): w_norm has "
                            "nothing to update")
        super().__init__(base)

    def add_adapter(self, name: str, *args, **kwargs) -> None:
        raise KindError(f"a {type(self.base).__name__} takes norm-layer updates (w_norm / b_norm) only, not a LoRA "
                        f"pair; leave it out of the targets")

    def delta(self, name: str) -> dict[str, torch.Tensor]:
        return self._kind_delta(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for name in self._run:
            out = self._kind_out(name, x, out)
        return out


class _FusedLoRA(LoRALayer):
    """Shared logic of fused projections: adapters per part, stored stacked as A (P, r, in) and B (P, d, r)."""

    part_names: tuple[str, ...] = _QKV

    def __init__(self, base: nn.Module, parts: tuple[str, ...], d: int, d_in: int) -> None:
        super().__init__(base)
        unknown = [p for p in parts if p not in self.part_names]
        if unknown or not parts:
            raise ValueError(f"parts {parts!r} not valid for {type(base).__name__}: choose from {self.part_names}")
        self.parts = tuple(p for p in self.part_names if p in parts)
        self.d, self.d_in = d, d_in

    def _new_params(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self._device()
        p = len(self.parts)
        return (torch.empty(p, rank, self.d_in, device=dev, dtype=torch.float32),
                torch.zeros(p, self.d, rank, device=dev, dtype=torch.float32))

    def _device(self) -> torch.device:
        return next(self.base.parameters()).device

    def _qkv_B(self, name: str) -> torch.Tensor:
        """B of the q/k/v parts as one (3d, P_qkv * r) block matrix, zero rows for parts without adapter."""
        b = self.lora_B[name]
        blocks = [b[self.parts.index(p)] if p in self.parts else b.new_zeros(self.d, 0) for p in _QKV]
        return torch.block_diag(*blocks)

    def _qkv_A(self, name: str) -> torch.Tensor:
        idx = [self.parts.index(p) for p in _QKV if p in self.parts]
        return self.lora_A[name][idx].reshape(-1, self.d_in)

    def lora_pairs(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        self._refuse_kind(name, "an (A, B) pair")
        a, b = self.lora_A[name], self.lora_B[name]
        return {p: (a[i], b[i]) for i, p in enumerate(self.parts)}

    def load_pair_(self, name: str, suffix: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self._refuse_kind(name, "an (A, B) pair")
        i = self.parts.index(suffix)
        with torch.no_grad():
            self.lora_A[name][i].copy_(a)
            self.lora_B[name][i].copy_(b)

    def _part_deltas(self, name: str) -> dict[str, torch.Tensor]:
        a, b = self.lora_A[name].float(), self.lora_B[name].float()
        s = self.scaling(name)
        return {p: (b[i] @ a[i]) * s for i, p in enumerate(self.parts)}

    def _qkv_delta(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        parts = self._part_deltas(name)
        if not any(p in parts for p in _QKV):
            return None
        zero = torch.zeros(self.d, self.d_in, device=like.device, dtype=torch.float32)
        return torch.cat([parts.get(p, zero) for p in _QKV], dim=0)


class LoRAFusedLinear(_FusedLoRA):
    """LoRA around a fused q/k/v nn.Linear (timm's `qkv`): separate adapters for q, k and v in one batched product."""

    def __init__(self, base: nn.Linear, parts: tuple[str, ...] = _QKV) -> None:
        if base.out_features % 3:
            raise ValueError(f"fused qkv Linear must have out_features divisible by 3, got {base.out_features}")
        super().__init__(base, tuple(p for p in parts if p in _QKV), base.out_features // 3, base.in_features)

    def delta(self, name: str) -> dict[str, torch.Tensor]:
        return {"weight": self._qkv_delta(name, self.base.weight)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for name in self._run:
            a = self.lora_A[name]
            h = self._dropout(name, _cast_in(x, a))
            # One (P*r, in) product for all parts, then one block-diagonal (3d, P*r) product.
            low = F.linear(F.linear(h, a.reshape(-1, self.d_in)), self._qkv_B(name))
            out = out + (low * self.factor(name, out.device)).to(out.dtype)
        return out


def part_weight(module: nn.Module, part: str = "", saved: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The weight one adapted part of `module` (a plain module, or a wrapper: its base) reads: the module's own
    weight for "", q / k / v's rows of a MultiheadAttention's in_proj_weight or of a fused qkv Linear's weight, and
    a MultiheadAttention's out_proj.weight for o. A view: writing into it writes the module's weight. `saved`
    ({"weight": ...}, {"in_proj_weight": ..., "out_proj.weight": ...}: a wrapper's merge backup) is read in place of
    the live weights it holds."""
    base = module.base if isinstance(module, LoRALayer) else module
    saved = saved or {}
    if isinstance(base, nn.MultiheadAttention):
        if part == "o":
            return saved.get("out_proj.weight", base.out_proj.weight)
        if not base._qkv_same_embed_dim:
            raise ValueError(f"a MultiheadAttention with kdim={base.kdim}, vdim={base.vdim} other than embed_dim="
                             f"{base.embed_dim} has no packed in_proj_weight to take a {part} part from")
        w, d = saved.get("in_proj_weight", base.in_proj_weight), base.embed_dim
    else:
        w = saved.get("weight", base.weight)
        if not part:
            return w
        d = w.shape[0] // 3
    i = _QKV.index(part)
    return w[i * d:(i + 1) * d]


class LoRAMultiheadAttention(_FusedLoRA):
    """LoRA around nn.MultiheadAttention (torchvision ViT) with adapters on q, k, v and out_proj (o).

    MultiheadAttention's forward reads `in_proj_weight` and `out_proj.weight` directly, so wrapping a child Linear
    is not enough: this wrapper adds the low-rank updates to those weights and calls the functional attention.
    Adapters of other kinds (LoHa, LoKr, DoRA; lora.kinds) sit on the parts one by one, each part's (d, d) block
    of the weights being one Linear weight for its kind (`kind_factors[name][part]`).
    """

    part_names = ("q", "k", "v", "o")

    def __init__(self, base: nn.MultiheadAttention, parts: tuple[str, ...] = ("q", "k", "v", "o")) -> None:
        if not base._qkv_same_embed_dim:
            raise ValueError("LoRAMultiheadAttention needs kdim == vdim == embed_dim (a packed in_proj_weight)")
        super().__init__(base, parts, base.embed_dim, base.embed_dim)
        self.batch_first = base.batch_first

    def _base_weights(self) -> Iterator[tuple[str, nn.Parameter]]:
        used = set(self.parts).union(*(self.kind_parts(n) for n in self.kinds))
        if used & set(_QKV):
            yield "in_proj_weight", self.base.in_proj_weight
        if "o" in used:
            yield "out_proj.weight", self.base.out_proj.weight

    # ---- other kinds, part by part -------------------------------------------------------------------
    def _check_kind_parts(self, specs: Mapping[str, LayerSpec], layer_name: str) -> None:
        bad = [p for p in specs if p not in self.part_names]
        kinds = {s.kind for s in specs.values()}
        spec = next(iter(specs.values()))
        if bad or not specs:
            raise KindError(f"{layer_name}: {spec.label} layers on a MultiheadAttention go on its parts "
                            f"{self.part_names}, got {bad or 'none'}")
        scales = {(s.alpha, s.rule) for s in specs.values()}
        if len(kinds) > 1 or len(scales) > 1:
            raise KindError(f"{layer_name}: the parts of one adapter on a MultiheadAttention have one kind, alpha "
                            f"and rule; got kinds {sorted(kinds)}, (alpha, rule) {sorted(scales)}")
        if _kinds.get_kind(spec.kind).norm_layers or any(f in s.factors for s in specs.values()
                                                         for f in _kinds.BIAS_FACTORS.values()):
            raise KindError(f"{layer_name}: {spec.label} layers with norm or bias updates do not go on a "
                            "MultiheadAttention")

    def kind_parts(self, name: str) -> tuple[str, ...]:
        return tuple(self.kind_factors[name])

    def kind_params(self, name: str, part: str = "") -> nn.ParameterDict:
        return self.kind_factors[name][part]

    def _kind_delta(self, name: str, detach: bool = True) -> dict[str, torch.Tensor]:
        deltas = {p: self._kind_update(self.kind_spec(name, detach, p), p).float() for p in self.kind_parts(name)}
        out = {}
        if any(p in deltas for p in _QKV):
            zero = self.base.in_proj_weight.new_zeros(self.d, self.d_in, dtype=torch.float32)
            out["in_proj_weight"] = torch.cat([deltas.get(p, zero) for p in _QKV], dim=0)
        if "o" in deltas:
            out["out_proj.weight"] = deltas["o"]
        return out

    # ---- LoRA ----------------------------------------------------------------------------------------
    def delta(self, name: str) -> dict[str, torch.Tensor]:
        if name in self.kinds:
            return self._kind_delta(name)
        out = {}
        qkv = self._qkv_delta(name, self.base.in_proj_weight)
        if qkv is not None:
            out["in_proj_weight"] = qkv
        if "o" in self.parts:
            out["out_proj.weight"] = self._part_deltas(name)["o"]
        return out

    def _weights_with_lora(self) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.base
        w_in, w_out = m.in_proj_weight, m.out_proj.weight
        for name in self._run:
            f = self.factor(name, w_in.device)
            if name in self.kinds:  # differentiable in the factors, rebuilt at every call (training works)
                d = self._kind_delta(name, detach=False)
                if "in_proj_weight" in d:
                    w_in = w_in + (d["in_proj_weight"] * f).to(w_in.dtype)
                if "out_proj.weight" in d:
                    w_out = w_out + (d["out_proj.weight"] * f).to(w_out.dtype)
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            if any(p in self.parts for p in _QKV):
                w_in = w_in + (self._qkv_B(name) @ self._qkv_A(name) * f).to(w_in.dtype)
            if "o" in self.parts:
                i = self.parts.index("o")
                w_out = w_out + (b[i] @ a[i] * f).to(w_out.dtype)
        return w_in, w_out

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.base
        if not self._run:
            return m(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                     attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        w_in, w_out = self._weights_with_lora()
        batched = query.dim() == 3
        if self.batch_first and batched:
            # (L, N, E) copies, made once for self-attention: the functional attention then runs one packed input
            # projection (it checks `query is key is value`), and a contiguous input keeps its matmul a plain GEMM
            # (on a transposed view it ran as a batched matmul, 3x slower on the CPU for ViT-B).
            q = query.transpose(0, 1).contiguous()
            k = q if key is query else key.transpose(0, 1).contiguous()
            value = k if value is key else q if value is query else value.transpose(0, 1).contiguous()
            query, key = q, k
        out, weights = F.multi_head_attention_forward(
            query, key, value, m.embed_dim, m.num_heads, w_in, m.in_proj_bias, m.bias_k, m.bias_v,
            m.add_zero_attn, m.dropout, w_out, m.out_proj.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        return out, weights
