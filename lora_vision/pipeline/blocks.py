"""Per-block strength for UNet adapters: which block a module is in, and the block-strength syntax.

Block strengths multiply the UNet strength of an adapter per diffusers UNet block, as A1111's block weights do:

- a mapping or a string of `key=value` pairs, comma separated (`:` works instead of `=`):
  `"down=1, mid=0.5, up=0"`, `{"down": 1.0, "up.1": 0.0}`;
- or three numbers `"1,0.5,0"` / `(1, 0.5, 0)`, read as down, mid, up.

Keys: `down`, `mid`, `up` (a whole section), `down.N` / `up.N` (diffusers block index N, which wins over its
section), `other` (modules outside the blocks: conv_in, conv_out, time and added-condition embeddings). Keys left
out mean 1. Note the diffusers indices: `down.0` is the first (highest-resolution) down block, `up.0` the first
(lowest-resolution) up block, so in SD 1.5 `up.0` is a block without attention.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence, Union

BlockStrengths = Union[Mapping[str, float], str, Sequence[float], None]

SECTIONS = ("down", "mid", "up", "other")
_BLOCK_RE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.")
_KEY_RE = re.compile(r"^(down|up)\.(\d+)$")
SYNTAX = ("block strengths: 'down=1,mid=0.5,up=0' (keys down, mid, up, other, down.N, up.N), a dict with those "
          "keys, or three numbers 'down,mid,up' such as '1,0.5,0'")


def block_of(module_name: str) -> str:
    """The block key of a UNet module: "down.N", "mid", "up.N" or "other"."""
    m = _BLOCK_RE.match(module_name)
    if m:
        return ("down." if m.group(1) == "down_blocks" else "up.") + m.group(2)
    if module_name.startswith("mid_block."):
        return "mid"
    return "other"


def parse_block_strengths(spec: BlockStrengths, n_down: int, n_up: int) -> dict[str, float]:
    """Validate a block-strength spec against a UNet with `n_down` down and `n_up` up blocks.

    Returns the explicit entries as {key: multiplier}; raises ValueError naming the bad part and the syntax.
    """
    if spec is None:
        return {}
    if isinstance(spec, str):
        items = _parse_string(spec)
    elif isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, Sequence):
        items = _positional(list(spec), spec)
    else:
        raise ValueError(f"block_strengths={spec!r} ({type(spec).__name__}): expected {SYNTAX}")
    out: dict[str, float] = {}
    problems = []
    for key, value in items:
        key = str(key).strip()
        m = _KEY_RE.match(key)
        if key not in SECTIONS and not m:
            problems.append(f"unknown block {key!r}")
            continue
        if m:
            limit = n_down if m.group(1) == "down" else n_up
            if int(m.group(2)) >= limit:
                problems.append(f"block {key!r} does not exist: this UNet has {limit} {m.group(1)} blocks "
                                f"({m.group(1)}.0 .. {m.group(1)}.{limit - 1})")
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


def _parse_string(spec: str) -> list[tuple[str, str]]:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"block_strengths {spec!r} is empty; expected {SYNTAX}")
    if all("=" not in p and ":" not in p for p in parts):
        return _positional(parts, spec)
    out = []
    for p in parts:
        key, sep, value = p.replace(":", "=", 1).partition("=")
        if not sep:
            raise ValueError(f"block_strengths {spec!r}: {p!r} is not key=value; expected {SYNTAX}")
        out.append((key.strip(), value.strip()))
    return out


def _positional(values: list, spec: object) -> list[tuple[str, object]]:
    if len(values) != 3:
        raise ValueError(f"block_strengths {spec!r}: {len(values)} positional values, expected 3 (down, mid, up); "
                         f"or use {SYNTAX}")
    return list(zip(("down", "mid", "up"), values))


def multiplier(block: str, table: Mapping[str, float]) -> float:
    """The multiplier of block key `block` ("down.1", "mid", ...): its own entry, else its section's, else 1."""
    if block in table:
        return table[block]
    return table.get(block.split(".", 1)[0], 1.0)
