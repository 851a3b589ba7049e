"""Serving many LoRA adapters on one diffusers pipeline: switch per request without reloading or recompiling.

Every adapted Linear / Conv2d gets one fixed *slot*: preallocated low-rank tensors sized for the largest rank and
the union of the target sets of all adapters the server knows. Switching adapters copies the chosen adapter's
(zero-padded) weights into the slots in place (`torch._foreach_copy_`, a handful of kernel launches for all
modules), and strength is folded into the slot's B the same way. Slots hold plain LoRA; a Tucker LoCon conv is
folded into the pair exactly; the other kinds (LoHa, LoKr, DoRA, OFT, BOFT, (IA)^3, full diff) have no fixed low-rank
pair and are refused by `add`, naming the kind and why. No module, attribute or tensor shape changes, so
a `torch.compile`d UNet keeps its graph: zero recompiles on switch or strength change.

Unfused cost: each slot adds two GEMMs, the second one accumulating into the base output in place (`addmm_`).
With `fuse_qkv=True` the UNet's q/k/v projections run through diffusers' fused projections (`to_qkv` for
self-attention, `to_kv` for cross-attention): then one A GEMM serves q, k and v of a block, and one B GEMM with a
block-diagonal B writes all three outputs.

    server = AdapterServer(pipe, fuse_qkv=True)
    server.add("ink", "ink.safetensors"); server.add("clay", clay_adapter)
    server.prepare()                       # allocate slots (before torch.compile)
    pipe.unet = torch.compile(pipe.unet)
    server.activate("ink", strength=0.8)   # per request; None runs the base model
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import Adapter
from .formats import read_adapter
from .lora.inject import ModuleNames, replace_module
from .lora.layers import layout_changed
from .lora.spec import LayerSpec, split_key
from .pipeline import block_of, parse_block_strengths
from .pipeline.adapters import DENOISERS
from .pipeline.blocks import BlockStrengths, block_counts, multiplier

SERVED_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


class SlotLinear(nn.Module):
    """nn.Linear plus one LoRA slot: A (R, in) and B stored transposed as BT (R, out); both updated in place."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        self.base = base
        w = base.weight
        self.register_buffer("slot_A", torch.zeros(rank, base.in_features, device=w.device, dtype=w.dtype),
                             persistent=False)
        self.register_buffer("slot_BT", torch.zeros(rank, base.out_features, device=w.device, dtype=w.dtype),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = F.linear(x, self.slot_A)
        if torch.is_grad_enabled():
            return out + h @ self.slot_BT
        # Accumulate into the fresh base output: one GEMM with beta=1, no extra add kernel.
        out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), self.slot_BT)
        return out


class SlotConv2d(nn.Module):
    """nn.Conv2d plus one LoRA slot: A (R, in, kh, kw) carries the kernel, B (out, R, 1, 1)."""

    def __init__(self, base: nn.Conv2d, rank: int) -> None:
        super().__init__()
        if base.groups != 1:
            raise ValueError(f"SlotConv2d supports groups=1 only, got groups={base.groups}")
        self.base = base
        w = base.weight
        self.register_buffer("slot_A", torch.zeros(rank, base.in_channels, *base.kernel_size, device=w.device,
                                                   dtype=w.dtype), persistent=False)
        self.register_buffer("slot_B", torch.zeros(base.out_channels, rank, 1, 1, device=w.device, dtype=w.dtype),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.base
        out = c(x)
        low = F.conv2d(F.conv2d(x, self.slot_A, None, c.stride, c.padding, c.dilation), self.slot_B)
        return out + low if torch.is_grad_enabled() else out.add_(low)


@dataclass
class _Source:
    """Where one adapted module of an adapter goes: a slot module and its rank rows / output columns."""

    component: str
    module: str            # module name in the adapter (e.g. ...attn1.to_k)
    slot: str              # slot module name (e.g. ...attn1.to_qkv)
    row: int               # first rank row in the slot
    col: int               # first output column (fused projections), 0 otherwise
    width: int             # output width of this module


# Why a kind cannot take a fixed low-rank slot (see lora.kinds for the updates).
_NOT_SERVED = {
    "loha": "its update is a Hadamard product of two low-rank matrices (rank up to rank^2), not one fixed "
            "low-rank pair",
    "lokr": "its update is a Kronecker product (rank up to rank(w1) * rank(w2)), not one fixed low-rank pair",
    "oft": "its update rotates the base weight (it depends on the weight), not a low-rank pair",
    "boft": "its update rotates the base weight (it depends on the weight), not a low-rank pair",
    "ia3": "its update rescales the base weight (it depends on the weight), not a low-rank pair",
    "full": "it stores a full-rank weight difference",
    "norm": "it updates normalisation layers, which have no slot",
}


def _servable(name: str, label: str, spec: LayerSpec) -> LayerSpec:
    """A layer as the plain LoRA pair a slot holds (Tucker LoCon folded exactly); other kinds are refused, naming
    the kind and why."""
    plain = spec.as_plain()
    if plain is not None:
        return plain
    why = ("its DoRA magnitude renormalises the updated weight per row (the update depends on the weight), not a "
           "low-rank pair") if "dora_scale" in spec.factors else _NOT_SERVED[spec.kind]
    raise ValueError(f"adapter {name!r}: {label} is a {spec.label} layer, which AdapterServer cannot hold in a fixed "
                     f"low-rank slot: {why}. Serve plain LoRA or Tucker LoCon; convert this adapter first "
                     f"(lora-vision convert FILE --to lora_vision --rank N -o OUT) or load it with "
                     f"lora_vision.pipeline.load_adapter")


class AdapterServer:
    """Many adapters resident on a pipeline's UNet and text encoder(s); `activate` switches in a few launches."""

    def __init__(self, pipe: Any, max_rank: int | None = None, fuse_qkv: bool = False) -> None:
        self.pipe = pipe
        self.max_rank = max_rank
        self.fuse_qkv = fuse_qkv
        self.components = {c: getattr(pipe, c) for c in SERVED_COMPONENTS if getattr(pipe, c, None) is not None}
        self._pending: dict[str, dict[str, dict[tuple[str, str], LayerSpec]]] = {}
        self._resident: dict[str, dict] = {}
        self._sources: dict[tuple[str, str], _Source] = {}
        self._slots: dict[tuple[str, str], nn.Module] = {}
        self._dst_A: list[torch.Tensor] = []
        self._dst_B: list[torch.Tensor] = []
        self._order: list[tuple[str, str]] = []   # (component, module) per destination pair
        self.rank = 0
        self.active: str | None = None
        self.strengths: dict[str, float] = {}

    # ---- adapters ------------------------------------------------------------------------------------
    def add(self, name: str, adapter: Adapter | str | os.PathLike) -> None:
        """Register an adapter (an Adapter or a file). Before `prepare` any adapter fits; after, it must fit the
        slots (rank <= slot rank, modules within the slots) and is copied to the device at once."""
        if name in self._pending or name in self._resident:
            raise ValueError(f"adapter {name!r} is already loaded; remove it first or use another name")
        adapter = read_adapter(adapter)[0]
        entries: dict[str, dict[tuple[str, str], LayerSpec]] = {}
        for comp in adapter.components():
            if comp not in self.components:
                raise KeyError(f"adapter {name!r} has weights for {comp!r} but the pipeline has no such component "
                               f"(it has {list(self.components)})")
            named = ModuleNames(self.components[comp])  # T5's `SelfAttention.q` is a Linear, not a fused part
            parsed = {split_key(k, named): _servable(name, f"{comp}.{k}", spec)
                      for k, spec in adapter.layers(comp).items()}
            parts = [f"{m}.{p}" for (m, p) in parsed if p]
            if parts:
                raise ValueError(f"adapter {name!r}: fused-part entries such as {parts[0]} are not served; "
                                 "AdapterServer handles diffusers UNets and CLIP text encoders")
            entries[comp] = parsed
        if self._slots:
            self._check_fits(name, entries)
            self._resident[name] = self._stage(entries)
        else:
            self._pending[name] = entries

    def remove(self, name: str) -> None:
        """Forget adapter `name` (the slots keep their size; the base model runs if it was active)."""
        if name == self.active:
            self.activate(None)
        if self._pending.pop(name, None) is None and self._resident.pop(name, None) is None:
            raise KeyError(f"no adapter named {name!r}; loaded: {self.names()}")

    def names(self) -> list[str]:
        """The adapters the server holds."""
        return list(self._resident) + list(self._pending)

    # ---- slots ---------------------------------------------------------------------------------------
    def prepare(self) -> int:
        """Allocate slots for the union of all added adapters' modules at the largest rank; returns the slot count.

        Call before torch.compile; adapters added later must fit these slots.
        """
        if self._slots:
            raise RuntimeError("prepare() was already called; slots are fixed so compiled graphs stay valid")
        if not self._pending:
            raise ValueError("add at least one adapter before prepare()")
        ranks = [e.rank for ents in self._pending.values() for comp in ents.values() for e in comp.values()]
        self.rank = self.max_rank or max(ranks)
        if max(ranks) > self.rank:
            raise ValueError(f"an adapter has rank {max(ranks)} but max_rank={self.rank}; raise max_rank")
        wanted: dict[str, set[str]] = {}
        for ents in self._pending.values():
            for comp, parsed in ents.items():
                wanted.setdefault(comp, set()).update(m for m, _ in parsed)
        if self.fuse_qkv and "unet" in self.components:
            self.components["unet"].fuse_qkv_projections()
        for comp, modules in wanted.items():
            self._build_component(comp, sorted(modules))
        for name, ents in self._pending.items():
            self._resident[name] = self._stage(ents)
        self._pending.clear()
        layout_changed()  # the slot modules replaced the plain ones: graphs captured before are stale
        return len(self._slots)

    def _build_component(self, comp: str, modules: list[str]) -> None:
        model = self.components[comp]
        layout: dict[str, list[tuple[str, int, int]]] = {}   # slot -> [(module, column, width)]
        for m in modules:
            slot, col, width = self._slot_of(model, comp, m)
            layout.setdefault(slot, []).append((m, col, width))
        for slot, members in layout.items():
            try:
                base = model.get_submodule(slot)
            except AttributeError:
                raise KeyError(f"{comp} has no module {slot!r} (needed by an adapter); is the adapter for another "
                               f"model?") from None
            if isinstance(base, nn.Linear):
                new: nn.Module = SlotLinear(base, self.rank * len(members))
            elif isinstance(base, nn.Conv2d):
                if len(members) != 1:
                    raise AssertionError(slot)
                new = SlotConv2d(base, self.rank)
            else:
                raise TypeError(f"{comp}.{slot} is a {type(base).__name__}; served adapters need Linear or Conv2d")
            replace_module(model, slot, new)
            self._slots[(comp, slot)] = new
            for i, (m, col, width) in enumerate(members):
                r0 = i * self.rank
                self._sources[(comp, m)] = _Source(comp, m, slot, r0, col, width)
                self._order.append((comp, m))
                self._dst_A.append(new.slot_A[r0:r0 + self.rank])
                self._dst_B.append(new.slot_BT[r0:r0 + self.rank] if isinstance(new, SlotLinear) else new.slot_B)

    def _slot_of(self, model: nn.Module, comp: str, module: str) -> tuple[str, int, int]:
        """(slot module, output column, output width) of an adapted module; q/k/v map into fused projections."""
        base = model.get_submodule(module)
        width = base.out_features if isinstance(base, nn.Linear) else getattr(base, "out_channels", 0)
        if not (self.fuse_qkv and comp == "unet"):
            return module, 0, width
        parent_name, _, leaf = module.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if leaf in ("to_q", "to_k", "to_v") and getattr(parent, "fused_projections", False):
            if not parent.is_cross_attention:
                return f"{parent_name}.to_qkv", ("to_q", "to_k", "to_v").index(leaf) * width, width
            if leaf != "to_q":
                return f"{parent_name}.to_kv", ("to_k", "to_v").index(leaf) * width, width
        return module, 0, width

    def _check_alive(self) -> None:
        # pipe.to(...) after prepare() replaces the slot buffers; our views would then write to dead tensors.
        (comp, slot), mod = next(iter(self._slots.items()))
        if self._dst_A and self._dst_A[0]._base is not None and self._dst_A[0]._base is not mod.slot_A:
            raise RuntimeError("the pipeline was moved or cast after AdapterServer.prepare(); build the server "
                               "after pipe.to(device, dtype)")

    def _check_fits(self, name: str, entries: Mapping[str, Mapping[tuple[str, str], LayerSpec]]) -> None:
        for comp, parsed in entries.items():
            for (m, _), e in parsed.items():
                if (comp, m) not in self._sources:
                    raise ValueError(f"adapter {name!r} adapts {comp}.{m}, which has no slot; slots are fixed "
                                     "after prepare(): add every adapter (or one covering its targets) before it")
                if e.rank > self.rank:
                    raise ValueError(f"adapter {name!r} has rank {e.rank} at {comp}.{m} but the slots have rank "
                                     f"{self.rank}; create the server with max_rank>={e.rank}")

    def _stage(self, entries: Mapping[str, Mapping[tuple[str, str], LayerSpec]]) -> dict:
        """Zero-padded device copies of an adapter in slot layout, aligned with the destination lists."""
        A, B, scaling, idx = [], [], [], []
        for i, key in enumerate(self._order):
            comp, m = key
            e = entries.get(comp, {}).get((m, ""))
            if e is None:
                continue
            src = self._sources[key]
            dst_a, dst_b = self._dst_A[i], self._dst_B[i]
            a = torch.zeros_like(dst_a)
            r = e.rank
            a[:r] = e.A.to(a.dtype).reshape(r, *a.shape[1:])
            b = torch.zeros_like(dst_b)
            if b.dim() == 2:   # BT rows: (R, out); this module's columns
                b[:r, src.col:src.col + src.width] = e.B.reshape(src.width, r).t().to(b.dtype)
            else:              # conv B: (out, R, 1, 1)
                b[:, :r] = e.B.to(b.dtype).reshape(b.shape[0], r, 1, 1)
            A.append(a)
            B.append(b)
            scaling.append(e.scaling)
            idx.append(i)
        present = set(idx)
        absent = [i for i in range(len(self._order)) if i not in present]
        return {"A": A, "B": B, "scaling": scaling, "idx": idx, "absent": absent}

    # ---- per request ---------------------------------------------------------------------------------
    def activate(self, name: str | None, strength: float = 1.0, te_strength: float | None = None,
                 block_strengths: BlockStrengths = None) -> None:
        """Make adapter `name` the one that runs (None: the base model), at a UNet / text-encoder strength.

        block_strengths: optional UNet multipliers per block, on top of `strength` (syntax of
        lora_vision.pipeline.blocks: "down=1,mid=0.5,up=0", {"up.1": 0}, ...).
        """
        if not self._slots:
            self.prepare()
        self._check_alive()
        if name is not None and name not in self._resident:
            raise KeyError(f"no adapter named {name!r}; loaded: {self.names()}")
        with torch.no_grad():
            if name is None:
                torch._foreach_zero_(self._dst_A)
                torch._foreach_zero_(self._dst_B)
                self.active = None
                return
            st = self._resident[name]
            dst_a = [self._dst_A[i] for i in st["idx"]]
            torch._foreach_copy_(dst_a, st["A"])
            if st["absent"]:
                torch._foreach_zero_([self._dst_A[i] for i in st["absent"]])
                torch._foreach_zero_([self._dst_B[i] for i in st["absent"]])
        self.active = name
        self.set_strength(strength, te_strength, block_strengths)

    def set_strength(self, strength: float, te_strength: float | None = None,
                     block_strengths: BlockStrengths = None) -> None:
        """Change the strength of the active adapter: two multi-tensor kernels, no recompile."""
        if self.active is None:
            raise RuntimeError("no adapter is active; call activate(name) first")
        te = strength if te_strength is None else te_strength
        den = next((self.components[c] for c in DENOISERS if c in self.components), None)
        blocks = parse_block_strengths(block_strengths, block_counts(den)) if den is not None else {}
        st = self._resident[self.active]
        factors = []
        for i, s in zip(st["idx"], st["scaling"]):
            comp, m = self._order[i]
            f = te if comp not in DENOISERS else strength * multiplier(block_of(m), blocks)
            factors.append(s * f)
        with torch.no_grad():
            dst_b = [self._dst_B[i] for i in st["idx"]]
            torch._foreach_copy_(dst_b, st["B"])
            torch._foreach_mul_(dst_b, factors)
        self.strengths = {"unet": strength, "text_encoder": te, **blocks}


