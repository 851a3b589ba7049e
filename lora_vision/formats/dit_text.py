"""The text-encoder part of a DiT LoRA file: the family's own encoders (T5, Qwen, Mistral; dit_tables.TEXT_ENCODERS)
read here by the model's module names, CLIP read by the SD importers."""

from __future__ import annotations

import re
from typing import Mapping

import torch

from ..io import AdapterFileError
from .common import ComponentInfo, ImportReport, alpha_value, fit_pair, put
from .dit_detect import split_key
from .dit_tables import TEXT_ENCODERS


def import_family_encoders(raw: Mapping[str, torch.Tensor], family: str, infos: Mapping[str, ComponentInfo] | None,
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


def import_clip_encoders(raw: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
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
