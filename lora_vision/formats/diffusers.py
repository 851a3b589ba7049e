"""The diffusers/PEFT single-file format that `pipe.load_lora_weights` reads (as diffusers'
`save_lora_weights` writes it).

Keys: `unet.<diffusers module>.lora_A.weight` / `.lora_B.weight` (DiT pipelines: `transformer.<diffusers module>`),
`text_encoder.<...>`, `text_encoder_2.<...>`, `text_encoder_3.<...>`; no
alpha tensors: alpha lives in the `lora_adapter_metadata` JSON (LoraConfig kwargs with component prefixes).
Import also reads the older spellings: `.lora.down/.lora.up`, processor-style `attn1.processor.to_q_lora.down`,
`.lora_linear_layer.down/.up`, `.lora_A.default.weight`, and `<module>.alpha` tensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import torch

from ..adapter import Adapter
from ..io import AdapterFileError, write_safetensors
from ..lora.ops import parse_canonical
from ..lora.spec import plain_alpha
from ..metadata import FORMAT_KEY, PREFIX
from . import naming
from .common import SD_COMPONENTS, ComponentInfo, ImportReport, alpha_value, fit_pair, is_unsupported, put
from .resolve import NameResolver, default_infos, guess_unet_layout, te_layer_count

METADATA_KEY = "lora_adapter_metadata"
_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_A.default.weight", ".lora_B.default.weight"),
          (".lora.down.weight", ".lora.up.weight"), (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
          ("_lora.down.weight", "_lora.up.weight"))
_PROC = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)$")
_TE_OLD = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_UNET_HEADS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.", "add_embedding.")


def is_diffusers_key(key: str) -> bool:
    """True for keys in one of the diffusers/PEFT spellings."""
    return any(key.endswith(s) for pair in _PAIRS for s in pair) or key.endswith(".alpha")


def _component(key: str) -> tuple[str, str]:
    for comp in ("text_encoder_3", "text_encoder_2", "text_encoder", "transformer", "unet"):
        if key.startswith(comp + "."):
            return comp, key[len(comp) + 1:]
    if key.startswith(_UNET_HEADS):
        return "unet", key
    if key.startswith(("text_model.", "encoder.layers.")):
        return "text_encoder", key
    return "", key


def _module_name(comp: str, mod: str) -> str:
    """Undo the pre-PEFT processor naming: `attn1.processor.to_q` -> `attn1.to_q`, `to_out` -> `to_out.0`."""
    m = _PROC.match(mod)
    if m:
        parent, proj = m.groups()
        if comp == "unet":
            return f"{parent}.{proj}" + (".0" if proj == "to_out" else "")
        return f"{parent}.{_TE_OLD[proj]}"
    if comp != "unet":
        head, _, last = mod.rpartition(".")
        if last in _TE_OLD and head.endswith("self_attn"):  # pre-PEFT text-encoder attention processors
            return f"{head}.{_TE_OLD[last]}"
    return mod


def _group(tensors: Mapping[str, torch.Tensor], report: ImportReport) -> dict[tuple[str, str], dict]:
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        comp, rest = _component(key)
        if not comp:
            report.unused.append(key)
            continue
        for down_s, up_s in _PAIRS:
            if rest.endswith(down_s) or rest.endswith(up_s):
                which = "down" if rest.endswith(down_s) else "up"
                mod = rest[: -len(down_s if which == "down" else up_s)]
                groups.setdefault((comp, _module_name(comp, mod)), {})[which] = t
                break
        else:
            mod, _, suffix = rest.rpartition(".")
            if suffix == "alpha":
                groups.setdefault((comp, _module_name(comp, mod)), {})["alpha"] = t
            elif is_unsupported(rest.rsplit(".", 1)[-1]) or is_unsupported(rest):
                report.unsupported.append(key)
            else:
                report.unused.append(key)
    return groups


def _alpha_rule(metadata: Mapping[str, str], comp: str) -> tuple[dict, bool] | None:
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{METADATA_KEY} is not valid JSON ({e})") from None
    sub = {k[len(comp) + 1:]: v for k, v in meta.items() if k.startswith(comp + ".")}
    return (sub, bool(sub.get("use_rslora", False))) if sub else None


def _pattern_value(patterns: Mapping[str, float], name: str) -> float | None:
    # PEFT's rule: a pattern key matches a module whose name ends with it at a dot boundary.
    for pat, v in patterns.items():
        if name == pat or re.fullmatch(rf"(.*\.)?{pat}", name):
            return float(v)
    return None


def peft_alpha(cfg: Mapping, name: str, rank: int) -> float:
    """Our alpha (scaling = alpha / rank) for module `name` from PEFT LoraConfig kwargs (rsLoRA converted)."""
    a = _pattern_value(cfg.get("alpha_pattern") or {}, name)
    if a is None:
        a = float(cfg.get("lora_alpha", cfg.get("r", rank)))
    return plain_alpha(a, rank, "rslora" if cfg.get("use_rslora") else "lora")


def import_diffusers(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                     infos: Mapping[str, ComponentInfo] | None = None,
                     source: str = "<tensors>") -> tuple[dict[str, torch.Tensor], ImportReport]:
    """diffusers/PEFT-style tensors -> canonical adapter tensors and a report."""
    metadata = metadata or {}
    report = ImportReport("diffusers")
    groups = _group(tensors, report)
    if not infos:
        unet_mods = [m for c, m in groups if c == "unet"]
        layout = guess_unet_layout(unet_mods, kohya_keys=False) if unet_mods else None
        infos = default_infos(layout, {c: te_layer_count(m for cc, m in groups if cc == c)
                                       for c in ("text_encoder", "text_encoder_2")})
    resolver = NameResolver(infos)
    rules = {c: _alpha_rule(metadata, c) for c in SD_COMPONENTS}
    out: dict[str, torch.Tensor] = {}
    for (comp, mod), g in groups.items():
        label = f"{source}: {comp}.{mod}"
        if "down" not in g or "up" not in g:
            raise AdapterFileError(f"{label} has only {sorted(g)}; a LoRA module needs both A/down and B/up "
                                   "(an orphan alpha or half a pair means the file is broken)")
        info = resolver.info(comp)
        if info is None and comp == "transformer":  # no model given: the file's diffusers names are the live ones
            info = ComponentInfo({m: ("Linear", ()) for c, m in groups if c == comp})
            resolver.infos[comp] = info
        live = None
        if info is not None:
            live = mod if mod in info.modules else (resolver.te_live(comp, mod) if comp != "unet" else None)
        if live is None:
            report.not_found.append(f"{comp}.{mod}")
            continue
        kind, wshape = info.modules[live]
        if not info.live:
            kind = "Conv2d" if g["down"].dim() == 4 else "Linear"
        a, b = fit_pair(label, kind, wshape or None, g["down"], g["up"], info.live)
        r = a.shape[0]
        rule = rules.get(comp)
        if rule is not None:
            alpha = peft_alpha(rule[0], mod, r)
        else:
            alpha = alpha_value(label, g.get("alpha"), r)
        put(out, comp, live, a, b, alpha)
        report.matched.append(f"{comp}.{live}")
    if not any(rules.values()) and not any("alpha" in g for g in groups.values()) and groups:
        report.notes.append("no alpha in the file (no lora_adapter_metadata): alpha = rank, as diffusers does")
    return out, report


def adapter_metadata(adapter: Adapter, comp: str) -> dict:
    """PEFT LoraConfig kwargs for one component: most common rank/alpha plus exact per-module patterns."""
    entries = parse_canonical(adapter.state_dict_for(comp))
    names = {m: file_module(comp, m) for (m, _p) in entries}
    ranks = [e["rank"] for e in entries.values()]
    alphas = [e["alpha"] for e in entries.values()]
    r = max(set(ranks), key=ranks.count)
    a = max(set(alphas), key=alphas.count)
    # Patterns use the name without `text_model.` so they match transformers 4 and 5 CLIP modules alike.
    short = {m: n.removeprefix(naming.TEXT_MODEL) for m, n in names.items()}
    return {"r": r, "lora_alpha": a, "target_modules": sorted(short.values()),
            "rank_pattern": {short[m]: e["rank"] for (m, _), e in entries.items() if e["rank"] != r},
            "alpha_pattern": {short[m]: e["alpha"] for (m, _), e in entries.items() if e["alpha"] != a},
            "use_rslora": False, "use_dora": False, "lora_dropout": 0.0, "bias": "none",
            "init_lora_weights": True}


# User-facing facts carried into every export; everything else (hashes, dims, dates) is recomputed there.
CARRIED_METADATA = ("modelspec.trigger_phrase", "modelspec.title", "modelspec.description", "modelspec.author",
                    "modelspec.tags", "modelspec.thumbnail", "modelspec.license", "modelspec.usage_hint",
                    "ss_output_name", "ss_tag_frequency", "ssmd_cover_images", "ss_training_comment")


def provenance(metadata: Mapping[str, str]) -> dict[str, str]:
    """Metadata carried into foreign files: our `lora_vision.*` (without `lora_vision.format`, which marks native
    files) and the user-facing CARRIED_METADATA. These files are made for sharing, so local paths in the values
    (the training config's folders, the base model's path) are cut to their last component, as kohya does."""
    return {k: shareable(k, v) if k.startswith(PREFIX) else v for k, v in metadata.items()
            if (k.startswith(PREFIX) and k != FORMAT_KEY) or k in CARRIED_METADATA}


_PATH_KEYS = ("_dir", "_path", "_file", "_name_or_path", "base_model", "resume_from_checkpoint", "config")
_ABSOLUTE = re.compile(r"^(?:/[^/\s]+/|~[\\/]|[A-Za-z]:[\\/]|\\\\)")  # /home/..., ~/..., C:\..., \\server


def path_name(value: str) -> str:
    """The last component of a POSIX or Windows path (`/home/me/data/dog/` -> `dog`)."""
    return re.split(r"[\\/]", value.rstrip("\\/"))[-1] or value


def shareable(key: str, value: object) -> object:
    """`value` with local paths reduced to their last component: strings under path-like keys (`*_dir`,
    `*_name_or_path`, ...) and every absolute path, also inside JSON objects and lists given as text."""
    if isinstance(value, str):
        if value[:1] in "{[":
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            if isinstance(parsed, (dict, list)):
                return json.dumps(shareable(key, parsed))
        key_says_path = key.rsplit(".", 1)[-1].endswith(_PATH_KEYS)
        return path_name(value) if key_says_path or _ABSOLUTE.match(value) else value
    if isinstance(value, dict):
        return {k: shareable(str(k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [shareable(key, v) for v in value]
    return value


def file_module(comp: str, live: str) -> str:
    """The module name written to files: diffusers names for the UNet and DiT transformers, transformers-4 names for
    CLIP."""
    return live if comp in ("unet", "transformer") else naming.te_to_file(live)


def export_diffusers(adapter: Adapter, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write a file `pipe.load_lora_weights` loads with alpha kept (through `lora_adapter_metadata`; plain alpha /
    rank scaling, so `use_rslora` is false)."""
    adapter = adapter.plain()
    comps = adapter.components()
    if not comps or any(c not in SD_COMPONENTS for c in comps):
        raise ValueError(f"the diffusers format holds {'/'.join(SD_COMPONENTS)} adapters; this one has "
                         f"{comps}. Export single models (ViT) with fmt='peft'")
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {}
    for comp in comps:
        entries = parse_canonical(adapter.state_dict_for(comp))
        if any(p for (_m, p) in entries):
            raise ValueError(f"{comp}: fused q/k/v parts have no diffusers spelling")
        for (m, _p), e in entries.items():
            key = f"{comp}.{file_module(comp, m)}"
            tensors[f"{key}.lora_A.weight"] = e["A"] if dtype is None else e["A"].to(dtype)
            tensors[f"{key}.lora_B.weight"] = e["B"] if dtype is None else e["B"].to(dtype)
        meta.update({f"{comp}.{k}": v for k, v in adapter_metadata(adapter, comp).items()})
    md = {"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}
    md.update(provenance(adapter.metadata))
    return write_safetensors(path, tensors, md)
