"""A1111 conventions for generation: `<lora:name:...>` prompt tags, LoRA folders, and the "parameters" infotext.

Prompt tags follow AUTOMATIC1111's extensions-builtin/Lora (`extra_networks_lora.py`, `modules/extra_networks.py`):

- `<lora:NAME>`, `<lora:NAME:TE>`, `<lora:NAME:TE:UNET>`; named `te=`, `unet=` override positions
  (`<lora:x:0.6:unet=1>`); the UNet multiplier defaults to the text-encoder one; `<lyco:...>` is an alias.
- Matched with A1111's regex `<(\\w+):([^>]+)>`, arguments split on `:`, so names cannot hold `:` or `>`.
- NAME is a file stem in the LoRA folder or the file's `ss_output_name` alias.

The infotext is what A1111 writes into a PNG's "parameters" text chunk and reads back with "PNG Info":
prompt line(s), an optional `Negative prompt:` line, then one line of `Key: value` pairs.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..io import AdapterFileError, read_header

EXTRA_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")   # A1111 modules/extra_networks.py
LORA_TYPES = ("lora", "lyco")
PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:...>` tag: the name as written and its UNet / text-encoder multipliers."""

    name: str
    unet: float
    te: float
    text: str


def parse_strength(value: str | float, what: str) -> float:
    """A strength (multiplier) from text: a finite number, or ValueError naming `what` and the value.

    The one parser of strengths for tags, --lora flags, --sweep values and merge --weights: NaN and Inf (also
    what float() makes of "1e999") are refused, because they turn every image black.
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {str(value).strip()!r} is not a number; expected a strength such as 0.8 "
                         "or -0.5") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} {str(value).strip()!r} is not a finite number; expected a strength such as 0.8 "
                         "(NaN and Inf give black images)")
    return number


def _number(value: str, what: str, tag: str) -> float:
    return parse_strength(value, f"{tag}: {what}")


def parse_lora_tag(body: str, text: str) -> LoraTag:
    """Read the part after `<lora:` (A1111 positional and named arguments)."""
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in body.split(":"):
        parts = item.split("=", 1)
        if len(parts) == 2:
            named[parts[0].strip()] = parts[1]
        else:
            positional.append(item)
    name = positional[0].strip() if positional else ""
    if not name:
        raise ValueError(f"{text}: no LoRA name; expected <lora:NAME> or <lora:NAME:STRENGTH>")
    unknown = sorted(set(named) - {"te", "unet", "dyn"})
    if unknown:
        raise ValueError(f"{text}: unknown argument(s) {unknown}; expected te=, unet=")
    if "dyn" in named or len(positional) > 3:
        raise ValueError(f"{text}: dyn (rank truncation) is not supported; use lora-vision resize to make a "
                         "lower-rank file")
    te = _number(positional[1], "text-encoder strength", text) if len(positional) > 1 else 1.0
    te = _number(named["te"], "te", text) if "te" in named else te
    unet = _number(positional[2], "UNet strength", text) if len(positional) > 2 else te
    unet = _number(named["unet"], "unet", text) if "unet" in named else unet
    return LoraTag(name, unet, te, text)


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag], list[str]]:
    """(prompt without tags, LoRA tags in order, other extra-network tags that were removed).

    Like A1111, every `<type:...>` tag is removed from the text that reaches the text encoder; whitespace left
    behind is collapsed. The same name twice with different strengths is an error.
    """
    tags: list[LoraTag] = []
    ignored: list[str] = []

    def take(m: re.Match) -> str:
        kind, body = m.group(1), m.group(2)
        if kind.lower() in LORA_TYPES:
            tags.append(parse_lora_tag(body, m.group(0)))
        else:
            ignored.append(m.group(0))
        return " "

    clean = EXTRA_NETWORK_RE.sub(take, prompt)
    clean = re.sub(r"\s+([,.;])", r"\1", re.sub(r"[ \t]+", " ", clean)).strip()
    clean = re.sub(r"^[,;\s]+|[,;\s]+$", "", clean)
    unique: dict[str, LoraTag] = {}
    for t in tags:
        prev = unique.get(t.name)
        if prev is not None and (prev.unet, prev.te) != (t.unet, t.te):
            raise ValueError(f"LoRA {t.name!r} appears twice with different strengths ({prev.text} and {t.text})")
        unique.setdefault(t.name, t)
    return clean, list(unique.values()), ignored


def parse_lora_flag(text: str) -> tuple[Path, float, float]:
    """`FILE[:STRENGTH[:TE_STRENGTH]]` -> (path, UNet strength, text-encoder strength; defaults 1 and STRENGTH).

    Numbers are taken from the right, so paths that contain ':' still work.
    """
    parts = text.split(":")
    nums: list[float] = []
    while len(parts) > 1 and len(nums) < 2:
        try:
            float(parts[-1])
        except ValueError:
            prefix = ":".join(parts[:-1])
            last_is_file = Path(parts[-1]).suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)
            if not Path(text).exists() and not last_is_file and (Path(prefix).suffix or Path(prefix).is_file()):
                # "style.safetensors:abc": a file name, then something that should have been a number.
                parse_strength(parts[-1], f"--lora {text!r}: strength")
            break
        nums.insert(0, parse_strength(parts.pop(), f"--lora {text!r}: strength"))
    path = ":".join(parts)
    if not path:
        raise ValueError(f"--lora {text!r}: no file; expected FILE[:STRENGTH[:TE_STRENGTH]]")
    strength = nums[0] if nums else 1.0
    return Path(path), strength, nums[1] if len(nums) > 1 else strength


# ---- LoRA folders ------------------------------------------------------------------------------------------------

def _alias(path: Path) -> str | None:
    try:
        header, _ = read_header(path)
    except AdapterFileError:
        return None
    return header.get("__metadata__", {}).get("ss_output_name") or None


class LoraDirectory:
    """The .safetensors files under a folder (recursive), found by file stem or `ss_output_name` alias."""

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.root = Path(root) if root is not None else None
        self.by_stem: dict[str, Path] = {}
        self.by_alias: dict[str, list[Path]] = {}
        self.pickles: dict[str, Path] = {}
        if self.root is None:
            return
        if not self.root.is_dir():
            raise FileNotFoundError(f"--lora_dir {str(self.root)!r} is not a folder")
        for p in sorted(self.root.rglob("*")):
            if p.suffix == ".safetensors" and p.is_file():
                self.by_stem.setdefault(p.stem, p)
                alias = _alias(p)
                if alias:
                    self.by_alias.setdefault(alias, []).append(p)
            elif p.suffix in PICKLE_SUFFIXES:
                self.pickles.setdefault(p.stem, p)

    def resolve(self, name: str) -> Path:
        """The file for `name`: an exact file stem first, then a unique `ss_output_name` alias."""
        if self.root is None:
            raise FileNotFoundError(f"the prompt names LoRA {name!r} but no --lora_dir was given to look it up in")
        if name in self.by_stem:
            return self.by_stem[name]
        hits = self.by_alias.get(name, [])
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ValueError(f"LoRA alias {name!r} (ss_output_name) is used by {len(hits)} files in {self.root}: "
                             f"{', '.join(p.name for p in hits)}; write the file name instead")
        if name in self.pickles:
            raise AdapterFileError(f"LoRA {name!r} is {self.pickles[name]}, a pickle file; lora_vision loads only "
                                   ".safetensors (convert it in a trusted environment first)")
        known = sorted(set(self.by_stem) | set(self.by_alias))
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else \
            f"; available: {', '.join(known[:10]) or 'none'}" + (" ..." if len(known) > 10 else "")
        raise FileNotFoundError(f"no LoRA named {name!r} in {self.root} (by file name or ss_output_name){hint}")


def addnet_hash(path: str | os.PathLike) -> str:
    """sha256 of a safetensors file's data region (what A1111 and kohya call the model hash of a LoRA).

    The file's own `sshs_model_hash` is used when present, as A1111 does.
    """
    header, n = read_header(path)
    stored = header.get("__metadata__", {}).get("sshs_model_hash")
    if stored and re.fullmatch(r"[0-9a-f]{64}", stored):
        return stored
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- infotext ----------------------------------------------------------------------------------------------------

_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')   # A1111 infotext_utils.re_param


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else text


def build_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """The A1111 "parameters" text: prompt, `Negative prompt: ...`, then `Key: value, ...` (values quoted when
    they contain ',', ':' or a newline). None values are left out."""
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
    neg = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{neg}\n{line}"


def parse_infotext(text: str) -> dict[str, str]:
    """Read an A1111 "parameters" text back: {"Prompt", "Negative prompt", and every key of the last line}."""
    lines = text.strip().split("\n")
    last = lines[-1] if len(_PARAM_RE.findall(lines[-1])) >= 3 else ""
    if last:
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for ln in lines:
        if ln.startswith("Negative prompt:"):
            in_negative = True
            ln = ln[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(ln)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM_RE.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        out[key.strip()] = value
    return out


def lora_hashes_field(hashes: Mapping[str, str]) -> str | None:
    """A1111's `Lora hashes` value: "name: first 12 hex chars, ..." (None when there are no adapters)."""
    return ", ".join(f"{n.replace(':', '').replace(',', '')}: {h[:12]}" for n, h in hashes.items()) or None


def parse_lora_hashes(value: str) -> dict[str, str]:
    """Inverse of lora_hashes_field."""
    out = {}
    for item in value.split(","):
        name, _, h = item.strip().rpartition(":")
        out[name.strip()] = h.strip()
    return out
