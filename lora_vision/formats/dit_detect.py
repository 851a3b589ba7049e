"""Key syntax, name resolution and family detection of the transformer (DiT) families' LoRA files: Flux.1, Flux.2,
SD 3.x, Qwen-Image and Z-Image.

A file module (any dialect, any prefix) resolves to the live module(s) of the diffusers transformer through the
name tables of formats/dit_tables.py; the family of a file is the one whose tables resolve most of its modules
(widths and metadata break ties).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

import torch

from ..metadata import AdapterMetadata
from .dit_tables import EXTRA_DIALECTS, FAMILIES, PREFIXES, Family

_SUFFIX = re.compile(r"(?P<sep>[._])(?P<kind>lora_down|lora_up|lora_A|lora_B)(?:\.default)?\.weight$"
                     r"|\.lora(?:_linear_layer)?\.(?P<kind2>down|up)\.weight$"
                     r"|\.(?P<kind3>down|up)\.weight$|\.(?P<alpha>alpha)$"
                     # factors of the other adapter kinds as LyCORIS writes them (lora.kinds names); (IA)^3's bare
                     # `.weight` is left out: it cannot be told from a full weight
                     r"|\.(?P<factor>hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2|diff(?:_b)?|dora_scale"
                     r"|oft_blocks|rescale)$|\.(?P<mid>lora_mid)\.weight$")
# split_key's tensor names -> the kohya suffixes kohya.kind_factors reads (the other kinds' factors keep their names)
FILE_SUFFIX = {"down": "lora_down.weight", "up": "lora_up.weight", "lora_mid": "lora_mid.weight"}
_TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_te_", "text_encoder.",
                "text_encoder_2.", "text_encoder_3.", "text_encoders.")


def _u(name: str) -> str:
    return name.replace(".", "_")


@dataclass(frozen=True)
class Target:
    """What one file module maps to: the live module names (several for a fused one) and the swap flag."""

    live: tuple[str, ...]
    swap: bool
    dialect: str  # "native", "diffusers", "xlabs" or "diffsynth" (the name space)


def _tables(fam: Family) -> tuple[dict[str, dict[str, Target]], dict[str, Target]]:
    """({block prefix (underscored): {row suffix (underscored): target suffixes}}, {top name (underscored): target})
    for every name space of the family. Live prefixes and suffixes are kept relative (joined per block later)."""
    blocks: dict[str, dict[str, Target]] = {}
    spaces = [("native", fam.groups)] + list(EXTRA_DIALECTS.get(fam.name, ()))
    for space, groups in spaces:
        for g in groups:
            for r in g.rows:
                blocks.setdefault(_u(g.native), {})[_u(r.native)] = Target(
                    tuple(f"{g.live}.{{}}.{x}" for x in r.live), r.swap, space)
    for g in fam.groups:  # diffusers names: every live suffix on its own
        for r in g.rows:
            for x in r.live:
                blocks.setdefault(_u(g.live), {}).setdefault(_u(x), Target((f"{g.live}.{{}}.{x}",), False,
                                                                           "diffusers"))
    top: dict[str, Target] = {}
    for r in fam.top:
        top[_u(r.native)] = Target(r.live, r.swap, "native")
        for x in r.live:
            top.setdefault(_u(x), Target((x,), False, "diffusers"))
    return blocks, top


_TABLES = {name: _tables(f) for name, f in FAMILIES.items()}


def split_key(key: str) -> tuple[str, str] | None:
    """(file module, tensor kind "down" / "up" / "alpha", or the factor name of another adapter kind: "lokr_w1",
    "hada_w2_b", "diff", "dora_scale", "lora_mid", ...) of a LoRA key in any DiT dialect; None otherwise."""
    m = _SUFFIX.search(key)
    if not m:
        return None
    kind = (m.group("kind") or m.group("kind2") or m.group("kind3") or m.group("factor") or m.group("mid")
            or "alpha")
    kind = {"lora_down": "down", "lora_A": "down", "lora_up": "up", "lora_B": "up"}.get(kind, kind)
    return key[: m.start()], kind


def strip_prefix(module: str) -> tuple[str, str]:
    """(dialect label, module name with underscores) of a file module: its prefix removed."""
    for p, (label, _sep) in PREFIXES.items():
        if p and module.startswith(p):
            return label, _u(module[len(p):])
    return "bare", _u(module)


def resolve(fam: str, module: str) -> tuple[str, Target] | None:
    """(dialect, target with block indices filled in) for a file module of family `fam`, or None."""
    label, body = strip_prefix(module)
    blocks, top = _TABLES[fam]
    if body in top:
        return label, top[body]
    for prefix, rows in blocks.items():
        if body.startswith(prefix + "_"):
            idx, _, rest = body[len(prefix) + 1:].partition("_")
            if idx.isdigit() and rest in rows:
                t = rows[rest]
                return label, Target(tuple(x.format(idx) for x in t.live), t.swap, t.dialect)
    return None


def is_dit_keys(keys: list[str]) -> bool:
    """True when most LoRA modules of the keys (text encoders aside) are DiT modules of one family."""
    mods = _modules(keys)
    if not mods:
        return False
    best = max(sum(1 for m in mods if resolve(f, m)) for f in FAMILIES)
    return best > 0 and best * 2 > len(mods)


def dit_format(keys: list[str]) -> str:
    """The format name of a DiT file for `detect_format`: kohya (kohya / musubi / OneTrainer / LyCORIS / ComfyUI
    prefixes), peft, xlabs, diffsynth, or diffusers (the `transformer.` prefix or none)."""
    mods = _modules(keys)
    if any(".processor." in m for m in mods):
        return "xlabs"
    if any(re.match(r"blocks\.\d+\.", m) for m in mods):
        return "diffsynth"
    labels = {strip_prefix(m)[0] for m in mods}
    if labels & {"kohya", "onetrainer", "lycoris", "comfyui"}:
        return "kohya"
    return "peft" if labels == {"peft"} else "diffusers"


def _modules(keys: list[str]) -> set[str]:
    out = set()
    for k in keys:
        s = split_key(k)
        if s and not s[0].startswith(_TE_PREFIXES):
            out.add(s[0])
    return out


def family_of_modules(names: list[str] | set[str]) -> str | None:
    """The family of a live model from its module names (markers in the tables), or None."""
    names = set(names)
    for fam in FAMILIES.values():
        if any(m in names for m in fam.markers):
            return fam.name
    if "transformer_blocks.0.ff.net.0.proj" in names and "pos_embed.proj" not in names:
        return "flux1" if any(n.startswith("single_transformer_blocks.") for n in names) else None
    return None


def family_of_names(names: set[str]) -> str | None:
    """The one family whose tables resolve the most of these module names (diffusers or native), or None on a tie."""
    scores = {f: sum(1 for n in names if resolve(f, n)) for f in FAMILIES}
    best = max(scores.values())
    winners = [f for f, s in scores.items() if s == best]
    return winners[0] if best and len(winners) == 1 else None


def declared_family(metadata: Mapping[str, str]) -> str | None:
    """The family a file's metadata names (lora_vision.base, modelspec.architecture, ss_base_model_version)."""
    base = AdapterMetadata.from_strings(metadata).base
    if base in FAMILIES:
        return base
    text = " ".join(metadata.get(k, "") for k in ("modelspec.architecture", "ss_base_model_version")).lower()
    for pattern, fam in ((r"flux[-_.]?1", "flux1"), (r"flux[-_.]?2", "flux2"),
                         (r"sd3|stable-diffusion-v?3", "sd3"), (r"qwen", "qwen-image"), (r"z[-_]?image", "z-image")):
        if re.search(pattern, text):
            return fam
    return None


def _shape_votes(raw: Mapping[str, torch.Tensor], groups: dict[str, dict]) -> dict[str, int]:
    """Flux.1 / Flux.2 from widths when the names are the same: MLP input rows per hidden unit (4 vs 6) and the
    single blocks' fused linear1 (7 vs 9)."""
    votes = {"flux1": 0, "flux2": 0}
    for mod, g in groups.items():
        if "down" not in g or "up" not in g or g["down"].dim() != 2:
            continue
        ratio = g["up"].shape[0] / max(1, g["down"].shape[1])
        body = strip_prefix(mod)[1]
        if re.search(r"(img|txt)_mlp_0$", body):
            votes["flux1" if ratio == 4 else "flux2" if ratio == 6 else "flux1"] += ratio in (4, 6)
        elif body.endswith("linear1"):
            votes["flux1" if ratio == 7 else "flux2"] += ratio in (7, 9)
    return votes


def detect_family(raw: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                  model_family: str | None = None) -> tuple[str, list[str]]:
    """(family, notes) of a DiT LoRA file from its module names, widths and metadata. The name tables decide
    when they can (most modules resolved); widths tell Flux.1 from Flux.2; metadata breaks remaining ties."""
    groups = _group(raw)
    mods = [m for m in groups if not m.startswith(_TE_PREFIXES)]
    scores = {f: sum(1 for m in mods if resolve(f, m)) for f in FAMILIES}
    top = max(scores.values())
    tied = [f for f, s in scores.items() if s == top]
    notes: list[str] = []
    if len(tied) == 1:
        return tied[0], notes
    declared = declared_family(metadata or {})
    if "flux1" in tied and "flux2" in tied:
        votes = _shape_votes(raw, groups)
        if votes["flux1"] != votes["flux2"]:
            return max(votes, key=votes.get), notes
    for choice in (declared, model_family):
        if choice in tied:
            return choice, notes
    notes.append(f"the names fit {', '.join(FAMILIES[f].label for f in tied)} alike; read as {FAMILIES[tied[0]].label}"
                 " (give the model, models={'transformer': ...}, to decide)")
    return tied[0], notes


def _group(raw: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        s = split_key(key)
        if s:
            groups.setdefault(s[0], {})[s[1]] = t
    return groups
