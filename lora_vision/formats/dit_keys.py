"""Key dialects of the transformer (DiT) families: Flux.1, Flux.2, SD 3.x, Qwen-Image and Z-Image.

Reads a file in any dialect into canonical names (the live module paths of the diffusers transformer, component
"transformer") and writes the native (kohya / ComfyUI) spelling back. The name tables, the prefixes and the
dialects they cover are data in formats/dit_tables.py.

A fused file module maps to several live modules: its lora_down is shared (the same A for each part) and its
lora_up rows are split by the model's sizes; when lora_up is block-diagonal over the parts (as our export writes
parts with their own A) each part gets its own slice of A and B, which is exact too. Export fuses back: one A when
the parts share it, else A stacked and B block-diagonal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..adapter import Adapter
from ..io import AdapterFileError, write_safetensors
from ..lora.ops import parse_canonical
from ..metadata import AdapterMetadata
from .diffusers import _alpha_rule, peft_alpha
from .common import BaseMismatchError, ComponentInfo, ImportReport, alpha_value, fit_pair, is_unsupported, put
from .dit_tables import COMPONENT, EXTRA_DIALECTS, FAMILIES, FLUX2_SIZES, PREFIXES, TEXT_ENCODERS, Family

_SUFFIX = re.compile(r"(?P<sep>[._])(?P<kind>lora_down|lora_up|lora_A|lora_B)(?:\.default)?\.weight$"
                     r"|\.lora(?:_linear_layer)?\.(?P<kind2>down|up)\.weight$"
                     r"|\.(?P<kind3>down|up)\.weight$|\.(?P<alpha>alpha)$")
_TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.",
                "text_encoder_3.", "text_encoders.")


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
    """(file module, tensor kind "down" / "up" / "alpha") of a LoRA key in any DiT dialect; None otherwise."""
    m = _SUFFIX.search(key)
    if not m:
        return None
    kind = m.group("kind") or m.group("kind2") or m.group("kind3") or "alpha"
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


def _swaps(up: torch.Tensor, down: torch.Tensor) -> bool:
    # Two chunks (shift, scale) <-> (scale, shift): only AdaLayerNormContinuous layers (out = 2 x in) trade halves.
    return up.shape[0] == 2 * down.shape[1]


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _part_rows(label: str, names: tuple[str, ...], info: ComponentInfo | None, down: torch.Tensor,
               up: torch.Tensor) -> list[int]:
    """Rows of each part of a fused module: the model's sizes, or (no model) the input width for q, k and v and the
    rest for the MLP input. Raises ValueError with the reason when the rows do not split so."""
    total = up.shape[0]
    if info is not None and info.live:
        missing = [n for n in names if n not in info.modules]
        if missing:
            raise KeyError(", ".join(missing))
        sizes = [info.modules[n][1][0] for n in names]
        ins = {info.modules[n][1][1] for n in names}
        if down.shape[1] not in ins or len(ins) != 1:
            raise BaseMismatchError(f"{label}: lora_down has {down.shape[1]} inputs but the model's "
                                    f"{', '.join(names)} take {sorted(ins)}; the file was made for another size")
    else:
        width = down.shape[1]
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


def import_dit(raw: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
               infos: Mapping[str, ComponentInfo] | None = None, source: str = "<tensors>"
               ) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """DiT LoRA tensors in any dialect -> canonical tensors (component "transformer") and a report naming what
    mapped, what was split and what mapped to nothing. Text-encoder keys go to the SD importers."""
    metadata = metadata or {}
    info = (infos or {}).get(COMPONENT)
    model_family = family_of_modules(info.modules) if info is not None and info.live else None
    family, notes = detect_family(raw, metadata, model_family)
    if model_family and family != model_family:
        raise BaseMismatchError(f"{source}: the file is a {FAMILIES[family].label} LoRA but the transformer given is "
                                f"{FAMILIES[model_family].label}; load it into a {FAMILIES[family].label} model")
    report = ImportReport("dit", base=family)
    report.notes += notes
    te_raw = {k: v for k, v in raw.items() if k.startswith(_TE_PREFIXES)}
    groups = _group({k: v for k, v in raw.items() if k not in te_raw})
    report.unused += [k for k in raw if k not in te_raw and split_key(k) is None and not is_unsupported(k)]
    report.unsupported += [k for k in raw if k not in te_raw and split_key(k) is None and is_unsupported(k)]
    out: dict[str, torch.Tensor] = {}
    dialects: set[str] = set()
    try:
        _import_modules(groups, family, info, source, out, report, dialects, metadata)
    except BaseMismatchError as e:
        raise BaseMismatchError(f"{e}; {_sizes(family, groups, info)}") from None
    report.format = "+".join(sorted(dialects)) if dialects else "dit"
    if te_raw:
        te_raw = _import_family_encoders(te_raw, family, infos, source, out, report)
    if te_raw:
        te_tensors, te_report = _import_text_encoders(te_raw, metadata, infos, source)
        out.update(te_tensors)
        for what in ("matched", "unused", "not_found", "unsupported", "notes"):
            getattr(report, what).extend(getattr(te_report, what))
    return out, report


def _hidden(family: str, widths: Mapping[str, int]) -> str:
    return ", ".join(f"{w}" + (f" ({FLUX2_SIZES[w]})" if family == "flux2" and w in FLUX2_SIZES else "")
                     for w in sorted(set(widths.values()))) or "unknown"


def _sizes(family: str, groups: Mapping[str, dict], info: ComponentInfo | None) -> str:
    """"hidden size: file 3072 (Flux.2-klein 4B), model 4096 (...)", from the attention q projections."""
    file_w, model_w = {}, {}
    for mod, g in groups.items():
        hit = resolve(family, mod)
        if hit and any(x.endswith(("to_q", "attention.to_q")) for x in hit[1].live) and "down" in g:
            file_w[mod] = int(g["down"].shape[-1] if g["down"].dim() == 2 else g["down"].shape[1])
    if info is not None:
        model_w = {n: s[1] for n, (_k, s) in info.modules.items() if n.endswith(".to_q") and len(s) == 2}
    return f"hidden size: file {_hidden(family, file_w)}, model {_hidden(family, model_w)}"


def _import_modules(groups: Mapping[str, dict], family: str, info: ComponentInfo | None, source: str,
                    out: dict[str, torch.Tensor], report: ImportReport, dialects: set[str],
                    metadata: Mapping[str, str]) -> None:
    """Map every (down, up, alpha) group of the file into `out`; what does not map goes to `report`. A module
    without an alpha tensor takes its alpha from diffusers' `lora_adapter_metadata` when the file has one."""
    rule = _alpha_rule(metadata, COMPONENT)
    for mod, g in groups.items():
        if "down" not in g or "up" not in g:
            raise AdapterFileError(f"{source}: module {mod} has only [{', '.join(sorted(g))}]; a LoRA module needs "
                                   "lora_down and lora_up (an orphan alpha or half a pair means the file is broken)")
        hit = resolve(family, mod)
        if hit is None:
            report.not_found.append(f"{COMPONENT}.{mod}")
            continue
        label, target = hit
        dialects.add(target.dialect if target.dialect in ("xlabs", "diffsynth") else label)
        down, up = g["down"], g["up"]
        alpha = alpha_value(f"{source}: {mod}", g.get("alpha"), down.shape[0])
        if g.get("alpha") is None and rule is not None and len(target.live) == 1:
            alpha = peft_alpha(rule[0], target.live[0], down.shape[0])
        if up.dim() < 2 or up.shape[1] != down.shape[0]:
            raise AdapterFileError(f"{source}: {mod}: lora_up has shape {tuple(up.shape)} but lora_down has rank "
                                   f"{down.shape[0]}; the file is broken")
        if target.swap and down.dim() == 2 and _swaps(up, down):
            up = _swap_halves(up)
        if len(target.live) == 1:
            name = target.live[0]
            if info is not None and info.live and name not in info.modules:
                report.not_found.append(f"{COMPONENT}.{mod}")
                continue
            kind, wshape = (info.modules[name] if info is not None and info.live else
                            ("Conv2d" if down.dim() == 4 else "Linear", None))
            a, b = fit_pair(f"{source}: {mod}", kind, wshape, down, up, info is not None and info.live)
            put(out, COMPONENT, name, a, b, alpha)
            report.matched.append(f"{COMPONENT}.{name}")
            continue
        try:
            sizes = _part_rows(f"{source}: {mod}", target.live, info, down, up)
        except KeyError:
            report.not_found.append(f"{COMPONENT}.{mod}")
            continue
        except ValueError as e:
            report.unsupported.append(f"{mod} ({e})")
            continue
        parts = _split_fused(down, up, sizes)
        done = []
        for name, pair in zip(target.live, parts):
            if pair is None:
                continue
            a, b = pair
            # each part keeps the file's scale: alpha / rank of the fused module
            put(out, COMPONENT, name, a.contiguous(), b.contiguous(), alpha * a.shape[0] / down.shape[0])
            report.matched.append(f"{COMPONENT}.{name}")
            done.append(name.rsplit(".", 1)[-1])
        report.split.append(f"{mod} -> {', '.join(done)}")


def _import_family_encoders(raw: Mapping[str, torch.Tensor], family: str, infos: Mapping[str, ComponentInfo] | None,
                            source: str, out: dict[str, torch.Tensor], report: ImportReport
                            ) -> dict[str, torch.Tensor]:
    """The family's non-CLIP text encoders (T5, Qwen, Mistral; dit_tables.TEXT_ENCODERS) read into their pipeline
    component by the model's own module names; returns the keys left for the CLIP importers. kohya's underscored
    names need the model (its module names) to be read back; without it they are reported not found."""
    from .naming import kohya_lookup

    table = TEXT_ENCODERS.get(family, {})
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        s = split_key(key)
        m = re.match(r"text_encoders\.([^.]+)\.transformer\.(.+)$", s[0]) if s else None
        if m and m.group(1) in table:
            groups.setdefault((table[m.group(1)], m.group(2)), {})[s[1]] = t
            continue
        prefix = next((p for p in table if p.startswith("lora_") and s and s[0].startswith(p)), None)
        if prefix is None:
            rest[key] = t
            continue
        comp = table[prefix]
        info = (infos or {}).get(comp)
        names = kohya_lookup(prefix.rstrip("_"), info.modules) if info is not None and info.live else {}
        groups.setdefault((comp, names.get(s[0], "?" + s[0])), {})[s[1]] = t
    for (comp, name), g in groups.items():
        label = f"{comp}.{name.lstrip('?')}"
        if "down" not in g or "up" not in g:
            raise AdapterFileError(f"{source}: {label} has only [{', '.join(sorted(g))}]; a LoRA module needs "
                                   "lora_down and lora_up (an orphan alpha or half a pair means the file is broken)")
        info = (infos or {}).get(comp)
        if name.startswith("?") or (info is not None and info.live and name not in info.modules):
            report.not_found.append(label)
            continue
        kind, wshape = info.modules[name] if info is not None and info.live else ("Linear", None)
        a, b = fit_pair(f"{source}: {label}", kind, wshape, g["down"], g["up"], info is not None and info.live)
        put(out, comp, name, a, b, alpha_value(f"{source}: {label}", g.get("alpha"), a.shape[0]))
        report.matched.append(label)
    return rest


def _import_text_encoders(raw: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                          infos: Mapping[str, ComponentInfo] | None, source: str
                          ) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """The CLIP text-encoder part of a DiT file, read by the SD importers."""
    from .detect import classify_keys
    from .diffusers import import_diffusers
    from .kohya import import_kohya

    te_infos = {c: i for c, i in (infos or {}).items() if c.startswith("text_encoder")} or None
    if classify_keys(list(raw), metadata, source) == "kohya":
        return import_kohya(raw, te_infos, source)
    return import_diffusers(raw, metadata, te_infos, source)


# ---- export ----------------------------------------------------------------------------------------------------

def _native_rows(fam: Family) -> list[tuple[str, str, tuple[str, ...], bool]]:
    """(group live prefix or "", native name template, live name templates, swap) for every row of the family."""
    rows = [("", r.native, r.live, r.swap) for r in fam.top]
    for g in fam.groups:
        rows += [(g.live, f"{g.native}.{{}}.{r.native}", tuple(f"{g.live}.{{}}.{x}" for x in r.live), r.swap)
                 for r in g.rows]
    return rows


def dit_family(adapter: Adapter, family: str | None = None) -> str:
    """The family to export for: `family`, else the adapter's metadata, else its module names."""
    names = {m for (m, _p) in parse_canonical(adapter.state_dict_for(COMPONENT))}
    fam = family or declared_family(adapter.metadata) or family_of_modules(names) or family_of_names(names)
    if fam not in FAMILIES:
        raise ValueError(f"cannot tell the DiT family of this adapter (got {fam!r}); pass family= one of "
                         f"{list(FAMILIES)}")
    return fam


def fuse_tensors(adapter: Adapter, family: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{native module name: (down, up, alpha)} for the transformer of `adapter`: fused rows built from their parts
    (one A when all parts share it, else A stacked and B block-diagonal; a part the adapter lacks gets zero rows,
    which needs the part's size from the others: q, k, v are square, the MLP input is the rest)."""
    fam = FAMILIES[family]
    entries = {}
    for (m, p), e in parse_canonical(adapter.state_dict_for(COMPONENT)).items():
        if p:
            raise ValueError(f"{COMPONENT}.{m}.{p}: fused q/k/v parts of one module have no {fam.label} spelling")
        entries[m] = e
    used: set[str] = set()
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    indices: dict[str, set[str]] = {}
    for m in entries:
        for g in fam.groups:
            mm = re.match(rf"{re.escape(g.live)}\.(\d+)\.", m)
            if mm:
                indices.setdefault(g.live, set()).add(mm.group(1))
    for group, native_t, live_t, swap in _native_rows(fam):
        for idx in (sorted(indices.get(group, ()), key=int) if group else [""]):
            lives = [x.format(idx) for x in live_t]
            have = [n for n in lives if n in entries]
            if not have:
                continue
            native = native_t.format(idx)
            if len(lives) == 1:
                e = entries[lives[0]]
                up = _swap_halves(e["B"]) if swap and e["A"].dim() == 2 and _swaps(e["B"], e["A"]) else e["B"]
                out[native] = (e["A"], up, e["alpha"])
            else:
                out[native] = _fuse([entries.get(n) for n in lives], lives, native)
            used.update(have)
    left = sorted(set(entries) - used)
    if left:
        raise ValueError(f"{len(left)} adapted module(s) have no {fam.label} native name: {left[:5]}; the adapter "
                         f"is not for {fam.label} or adapts modules ComfyUI cannot load")
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


def dit_kohya_tensors(adapter: Adapter, family: str | None = None,
                      dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The transformer of `adapter` as kohya / ComfyUI keys (`lora_unet_<native name>`, fused where the native
    model fuses) plus the ss_/modelspec metadata that names the family."""
    from .kohya import _output_dtype

    fam = dit_family(adapter, family)
    tensors: dict[str, torch.Tensor] = {}
    for native, (a, b, alpha) in fuse_tensors(adapter.plain(), fam).items():
        key = "lora_unet_" + _u(native)
        tensors[f"{key}.lora_down.weight"] = a
        tensors[f"{key}.lora_up.weight"] = b
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    want = _output_dtype(tensors, dtype)
    tensors = {k: v.to(want).contiguous() for k, v in tensors.items()}
    f = FAMILIES[fam]
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": f.base_version,
            "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": f.architecture,
            **AdapterMetadata(base=fam).to_strings()}
    return tensors, meta


def export_dit_kohya(adapter: Adapter, path: str | Path, family: str | None = None, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, str] | None = None, title: str | None = None,
                     trigger_phrase: str | None = None) -> Path:
    """Write the transformer adapter as the file ComfyUI, Forge and kohya read for its family (see
    `dit_kohya_tensors`); text encoders are not written (export them separately). `title` and `trigger_phrase`
    go to modelspec.title / ss_output_name and modelspec.trigger_phrase, as for the SD kohya export."""
    from .diffusers import provenance

    comps = adapter.components()
    if comps != [COMPONENT]:
        raise ValueError(f"the DiT kohya export holds one transformer adapter; this one has components {comps}")
    tensors, meta = dit_kohya_tensors(adapter, family, dtype)
    out = provenance(adapter.metadata)
    out.update(meta)
    if title:
        out["modelspec.title"] = out["ss_output_name"] = title
    if trigger_phrase:
        out["modelspec.trigger_phrase"] = trigger_phrase
    out.update(metadata or {})
    return write_safetensors(path, tensors, out)
