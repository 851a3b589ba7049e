"""Per-block strength for UNet and DiT-transformer adapters: which block a module is in, and the block-strength
syntax.

Block strengths multiply the UNet strength of an adapter per diffusers UNet block, as A1111's block weights do:

- a mapping or a string of `key=value` pairs, comma separated (`:` works instead of `=`):
  `"down=1, mid=0.5, up=0"`, `{"down": 1.0, "up.1": 0.0}`;
- or three numbers `"1,0.5,0"` / `(1, 0.5, 0)`, read as down, mid, up.

Keys: `down`, `mid`, `up` (a whole section), `down.N` / `up.N` (diffusers block index N, which wins over its
section), `other` (modules outside the blocks: conv_in, conv_out, time and added-condition embeddings). Keys left
out mean 1. Note the diffusers indices: `down.0` is the first (highest-resolution) down block, `up.0` the first
(lowest-resolution) up block, so in SD 1.5 `up.0` is a block without attention.

DiT transformers (Flux.1, Flux.2, SD 3.x, Qwen-Image, Z-Image) have the sections `double` (the double-stream
`transformer_blocks`), `single` (the single-stream `single_transformer_blocks`; Z-Image's `layers`) and `other`
(embedders, final layer, Z-Image's refiners); `double.N` / `single.N` pick one block by its diffusers index, and two
positional numbers read as double, single: `"double=1, single.3=0"`, `"1,0.5"`.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence, Union

BlockStrengths = Union[Mapping[str, float], str, Sequence[float], None]

SECTIONS = ("down", "mid", "up", "other")
DIT_SECTIONS = ("double", "single", "other")
_BLOCK_RE = re.compile(r"^(down_blocks|up_blocks|transformer_blocks|single_transformer_blocks|layers)\.(\d+)\.")
_BLOCK_KEY = {"down_blocks": "down", "up_blocks": "up", "transformer_blocks": "double",
              "single_transformer_blocks": "single", "layers": "single"}
_KEY_RE = re.compile(r"^(down|up|double|single)\.(\d+)$")
SYNTAX = ("block strengths: 'down=1,mid=0.5,up=0' (keys down, mid, up, other, down.N, up.N), a dict with those "
          "keys, or three numbers 'down,mid,up' such as '1,0.5,0'; for DiT transformers 'double=1,single=0.5' "
          "(keys double, single, other, double.N, single.N) or two numbers 'double,single'")


def block_counts(denoiser: object) -> dict[str, int]:
    """Blocks per indexed section of a UNet ({"down": n, "up": n}) or a DiT transformer ({"double": n,
    "single": n}: transformer_blocks, single_transformer_blocks or Z-Image's layers)."""
    if hasattr(denoiser, "down_blocks"):
        return {"down": len(denoiser.down_blocks), "up": len(denoiser.up_blocks)}
    single = getattr(denoiser, "single_transformer_blocks", None) or getattr(denoiser, "layers", None) or ()
    return {"double": len(getattr(denoiser, "transformer_blocks", None) or ()), "single": len(single)}


def block_of(module_name: str) -> str:
    """The block key of a UNet module ("down.N", "mid", "up.N" or "other") or of a DiT transformer module
    ("double.N", "single.N" or "other")."""
    m = _BLOCK_RE.match(module_name)
    if m:
        return f"{_BLOCK_KEY[m.group(1)]}.{m.group(2)}"
    if module_name.startswith("mid_block."):
        return "mid"
    return "other"


def parse_block_strengths(spec: BlockStrengths, n_down: int | Mapping[str, int], n_up: int = 0) -> dict[str, float]:
    """Validate a block-strength spec against a UNet with `n_down` down and `n_up` up blocks, or against the block
    counts of any denoiser (`block_counts`: {"down": n, "up": n} or {"double": n, "single": n}).

    Returns the explicit entries as {key: multiplier}; raises ValueError naming the bad part and the syntax.
    """
    if spec is None:
        return {}
    counts = dict(n_down) if isinstance(n_down, Mapping) else {"down": n_down, "up": n_up}
    sections = DIT_SECTIONS if "double" in counts else SECTIONS
    order = tuple(s for s in sections if s != "other")
    if isinstance(spec, str):
        items = _parse_string(spec, order)
    elif isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, Sequence):
        items = _positional(list(spec), spec, order)
    else:
        raise ValueError(f"block_strengths={spec!r} ({type(spec).__name__}): expected {SYNTAX}")
    out: dict[str, float] = {}
    problems = []
    for key, value in items:
        key = str(key).strip()
        m = _KEY_RE.match(key)
        if key not in sections and not (m and m.group(1) in counts):
            problems.append(f"unknown block {key!r} (this model's sections: {', '.join(sections)})")
            continue
        if m:
            limit = counts[m.group(1)]
            if int(m.group(2)) >= limit:
                what = "UNet" if "down" in counts else "transformer"
                problems.append(f"block {key!r} does not exist: this {what} has {limit} {m.group(1)} blocks"
                                + (f" ({m.group(1)}.0 .. {m.group(1)}.{limit - 1})" if limit else ""))
                continue
        try:
            v = float(value)
        except (TypeError, ValueError):
            problems.append(f"{key}={value!r} is not a number")
            continue
        if not math.isfinite(v):
            problems.append(f"{key}={value!r} is not finite")
            continue
        if key in out:
            problems.append(f"block {key!r} given twice")
            continue
        out[key] = v
    if problems:
        raise ValueError(f"block_strengths {spec!r}: " + "; ".join(problems) + f". Expected {SYNTAX}")
    return out


def _parse_string(spec: str, order: tuple[str, ...]) -> list[tuple[str, str]]:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"block_strengths {spec!r} is empty; expected {SYNTAX}")
    if all("=" not in p and ":" not in p for p in parts):
        return _positional(parts, spec, order)
    out = []
    for p in parts:
        key, sep, value = p.replace(":", "=", 1).partition("=")
        if not sep:
            raise ValueError(f"block_strengths {spec!r}: {p!r} is not key=value; expected {SYNTAX}")
        out.append((key.strip(), value.strip()))
    return out


def _positional(values: list, spec: object, order: tuple[str, ...]) -> list[tuple[str, object]]:
    if len(values) != len(order):
        raise ValueError(f"block_strengths {spec!r}: {len(values)} positional values, expected {len(order)} "
                         f"({', '.join(order)}); or use {SYNTAX}")
    return list(zip(order, values))


def multiplier(block: str, table: Mapping[str, float]) -> float:
    """The multiplier of block key `block` ("down.1", "mid", ...): its own entry, else its section's, else 1."""
    if block in table:
        return table[block]
    return table.get(block.split(".", 1)[0], 1.0)
