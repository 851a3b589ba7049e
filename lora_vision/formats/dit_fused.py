"""Fused modules of the DiT families: the native (BFL / MMDiT / NextDiT) files fuse q, k and v (Flux.1 single
blocks: q, k, v and the MLP input) into one Linear where diffusers has one module each.

Reading splits a fused module's rows into the live parts: its lora_down is shared (the same A for each part) and
its lora_up rows are split by the model's sizes; when lora_up is block-diagonal over the parts (as our export
writes parts with their own A) each part gets its own slice of A and B, which is exact too. Writing fuses back: one
A when the parts share it, else A stacked and B block-diagonal. AdaLayerNormContinuous layers trade their two
output halves ((shift, scale) natively, (scale, shift) in diffusers).
"""

from __future__ import annotations

import torch

from ..lora.kinds import DORA, LOKR_ROWS, lokr_block_rows, lokr_window, update_shape
from ..lora.spec import LayerSpec
from .common import BaseMismatchError, ComponentInfo


def swaps(rows: int, inputs: int) -> bool:
    """True when a swapping row's output halves trade places: (shift, scale) <-> (scale, shift), two chunks, only
    in AdaLayerNormContinuous layers (out = 2 x in)."""
    return rows == 2 * inputs


def _swaps(up: torch.Tensor, down: torch.Tensor) -> bool:
    return swaps(up.shape[0], down.shape[1])


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _part_rows(label: str, names: tuple[str, ...], info: ComponentInfo | None, total: int, width: int) -> list[int]:
    """Rows of each part of a fused module of `total` rows and `width` inputs: the model's sizes, or (no model) the
    input width for q, k and v and the rest for the MLP input. Raises ValueError with the reason when the rows do
    not split so (KeyError naming the parts the model lacks)."""
    if info is not None and info.live:
        missing = [n for n in names if n not in info.modules]
        if missing:
            raise KeyError(", ".join(missing))
        sizes = [info.modules[n][1][0] for n in names]
        ins = {info.modules[n][1][1] for n in names}
        if width not in ins or len(ins) != 1:
            raise BaseMismatchError(f"{label}: lora_down has {width} inputs but the model's "
                                    f"{', '.join(names)} take {sorted(ins)}; the file was made for another size")
    else:
        sizes = [width if not n.endswith("proj_mlp") else total - 3 * width for n in names]
    if sum(sizes) != total or min(sizes) <= 0:
        raise ValueError(f"{total} rows do not split into {' + '.join(map(str, sizes))} "
                         f"({', '.join(n.rsplit('.', 1)[-1] for n in names)})")
    return sizes


def _split_fused(down: torch.Tensor, up: torch.Tensor, sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Exact (A, B) per part: the shared A with B's rows, or, when B is block-diagonal over the parts (each part
    using its own columns), each part's own A rows and B block. Parts whose rows are all zero are left out (None)."""
    ups = list(up.split(sizes, dim=0))
    cols = [torch.nonzero(u.abs().sum(0)).flatten() for u in ups]
    used = [c for c in cols if c.numel()]
    block = len(used) == len(ups) and sum(c.numel() for c in used) == len({int(i) for c in used for i in c})
    out = []
    for u, c in zip(ups, cols):
        if not c.numel() and any(x.numel() for x in cols):
            out.append(None)  # this part is not adapted in the file (zero rows)
        elif block:
            out.append((down[c], u[:, c]))
        else:
            out.append((down, u))
    return out


def _fuse(parts: list[dict | None], names: list[str], native: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    present = [p for p in parts if p is not None]
    width = present[0]["A"].shape[1]
    mlp_rows = None
    for n, p in zip(names, parts):
        if p is not None and n.endswith("proj_mlp"):
            mlp_rows = p["B"].shape[0]
    scales = [p["alpha"] / p["rank"] for p in present]
    shared = all(torch.equal(p["A"], present[0]["A"]) for p in present) and len(set(scales)) == 1
    if shared:
        a = present[0]["A"]
        rank = a.shape[0]
        blocks = []
        for n, p in zip(names, parts):
            rows = _rows_of(n, p, width, mlp_rows, native)
            blocks.append(p["B"] if p is not None else torch.zeros(rows, rank, dtype=a.dtype))
        return a, torch.cat(blocks, 0), present[0]["alpha"]
    # Own A per part: stack A, B block-diagonal; every part keeps its scale (B rescaled to one file alpha).
    rank = sum(p["rank"] for p in present)
    s0 = scales[0]
    a = torch.cat([p["A"].float() for p in present], 0)
    rows_b = []
    col = 0
    for n, p in zip(names, parts):
        rows = _rows_of(n, p, width, mlp_rows, native)
        b = torch.zeros(rows, rank)
        if p is not None:
            b[:, col: col + p["rank"]] = p["B"].float() * (p["alpha"] / p["rank"] / s0)
            col += p["rank"]
        rows_b.append(b)
    return a, torch.cat(rows_b, 0), s0 * rank


def _rows_of(name: str, part: dict | None, width: int, mlp_rows: int | None, native: str) -> int:
    if part is not None:
        return part["B"].shape[0]
    if name.endswith("proj_mlp"):
        if mlp_rows is None:
            raise ValueError(f"{native}: the adapter has no proj_mlp layer, so the size of its zero rows in the fused "
                             "linear1 is unknown; adapt proj_mlp too (it may be zero) or export to diffusers")
        return mlp_rows
    return width


def join_lokr(parts: list[LayerSpec | None], names: list[str], native: str) -> LayerSpec:
    """The LoKr of a fused native module, put back together from its parts as split_rows left them: each part
    holds the w1 rows it touches and, where it cuts through w2's rows, its window (`lokr_rows`); the parts share
    w2, alpha and rule. Overlapping w1 rows must agree; a per-row DoRA magnitude is stacked. Raises ValueError
    naming the module when the parts are not one LoKr's (a part missing, another w2, rows that do not line up)."""
    where = f"{native} ({', '.join(n.rsplit('.', 1)[-1] for n in names)})"
    if any(p is None or p.kind != "lokr" for p in parts):
        raise ValueError(f"{where}: a LoKr part is a window of the fused module's LoKr, but not every part is a "
                         "LoKr; the fused LoKr cannot be written back")
    first = parts[0].factors
    w1 = "lokr_w1" if "lokr_w1" in first else "lokr_w1_a"
    shared = [n for n in first if n not in (w1, DORA, LOKR_ROWS)]
    for p in parts[1:]:
        same = (p.alpha, p.rule) == (parts[0].alpha, parts[0].rule) and set(p.factors) - {LOKR_ROWS} == \
            set(first) - {LOKR_ROWS} and all(torch.equal(p.factors[n], first[n]) for n in shared)
        if not same:
            raise ValueError(f"{where}: the LoKr parts have other w2 factors, alphas or rules; they are not one LoKr")
    c = lokr_block_rows(first)
    sizes = [update_shape("lokr", p.factors)[0] for p in parts]
    if sum(sizes) % c:
        raise ValueError(f"{where}: {sum(sizes)} rows are not whole rows of w1 (w2 has {c})")
    rows = torch.zeros(sum(sizes) // c, *first[w1].shape[1:], dtype=first[w1].dtype)
    seen = torch.zeros(rows.shape[0], dtype=torch.bool)
    at = 0
    for p, size in zip(parts, sizes):
        start = (lokr_window(p.factors) or (0, 0))[0]
        top, off = divmod(at - start, c) if at >= start else (-1, 1)
        block = p.factors[w1]
        if off or top < 0 or top + block.shape[0] > rows.shape[0]:
            raise ValueError(f"{where}: a part's rows do not line up with w1's rows")
        old = seen[top:top + block.shape[0]]
        if not torch.equal(rows[top:top + block.shape[0]][old], block[old]):
            raise ValueError(f"{where}: the parts disagree on the w1 rows they share")
        rows[top:top + block.shape[0]] = block
        seen[top:top + block.shape[0]] = True
        at += size
    factors = {n: first[n] for n in shared} | {w1: rows}
    if DORA in first:
        factors[DORA] = torch.cat([p.factors[DORA] for p in parts], 0)
    return LayerSpec(None, None, parts[0].alpha, parts[0].rule, "lokr", factors)
