"""PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`): the ViT exchange format
(the layout peft 0.21's `save_pretrained` writes; ViT LoRA has no A1111/ComfyUI-style file format).

- Keys `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`; alpha only in the JSON (r, lora_alpha,
  rank_pattern, alpha_pattern, use_rslora); `modules_to_save` heads stored in full (`base_model.model.head.weight`).
- Fused projections, exactly: our q/k/v adapters (rank r each) on timm's `qkv` Linear or on torchvision's
  nn.MultiheadAttention become one rank-P*r adapter on the fused weight, A = cat(A_q, A_k, A_v) and
  B = block_diag(B_q, B_k, B_v), with alpha scaled by P so alpha/rank is unchanged. PEFT adapts
  MultiheadAttention as a whole (in_proj and out_proj with one rank): out_proj gets our `o` part zero-padded to
  that rank (an all-zero pair when there is no `o`). Import undoes both: rank columns that are zero in A or B are
  dropped per part, which is exact, and a general fused adapter becomes q/k/v parts sharing A.
- HF ViT names are written as the installed transformers names them (recorded in lora_vision.* metadata of the
  safetensors file); import converts transformers-4 names to the live ones.
- LoHa (peft_type LOHA), LoKr (LOKR) and DoRA (LORA with use_dora) layers are written and read as peft has them
  (keys, scales and the config that makes peft rebuild the same factors: formats/peft_kinds.py). One folder holds
  one kind per component; other kinds (OFT, BOFT, (IA)^3, full diff) and mixtures are refused by name.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ..adapter import Adapter
from ..io import AdapterFileError, atomic_write_text, read_safetensors, replace_dir, write_safetensors
from ..lora.kinds import DORA, LOKR_ROWS, check as check_kind, describe, get_kind, kind_of
from ..lora.ops import layer_tensors, parse_canonical
from ..lora.spec import LayerSpec, layer_key, split_key as split_layer_key
from ..metadata import AdapterMetadata
from . import naming
from .common import ComponentInfo, ImportReport, alpha_value, fit_pair, put
from .diffusers import _pattern_value, peft_alpha, provenance
from .peft_kinds import (MAGNITUDE, PEFT_TYPES, PREFIX, PeftExportError, kind_label, lokr_state, loha_state, lora_view,
                         lycoris_scale, magnitude_problem, our_magnitude, peft_type, scaled_spec, split_key)

# Measured with peft 0.21.2 (tests/formats/test_peft_format.py): its MultiheadAttention layer applies the out_proj
# LoRA twice (forward and merge_and_unload alike). We write out_proj's B halved and double it on import, so the
# folder gives our outputs in PEFT and round-trips exactly (x2 and /2 are exact in floating point).
PEFT_MHA_OUT_PROJ_FACTOR = 2.0
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_OUT_PROJ = ".base_layer.out_proj"


def _drop_zero_rank(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = [i for i in range(a.shape[0]) if a[i].abs().sum() > 0 and b[:, i].abs().sum() > 0]
    keep = keep or [0]
    return a[keep], b[:, keep]


def split_fused(a: torch.Tensor, b: torch.Tensor,
                parts: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A fused (R, d_in) / (P*d, R) pair -> per-part pairs; exact, with unused rank columns dropped."""
    d = b.shape[0] // len(parts)
    blocks = {p: b[i * d:(i + 1) * d] for i, p in enumerate(parts)}
    return {p: _drop_zero_rank(a, bp) for p, bp in blocks.items() if bp.abs().sum() > 0 or not bp.numel()}


def _pad(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    r = max(a.shape[0] for a, _ in pairs.values())
    out = {}
    for p, (a, b) in pairs.items():
        extra = r - a.shape[0]
        out[p] = (torch.cat([a, a.new_zeros(extra, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], extra)], 1))
    return out


def _component(mods: list[str], infos: Mapping[str, ComponentInfo] | None) -> str:
    if infos and len(infos) == 1:
        return next(iter(infos))
    if infos and "model" in infos:
        return "model"
    if any(m.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for m in mods):
        return "unet"
    return "model"


def _live_name(mod: str, info: ComponentInfo | None, comp: str) -> str | None:
    if comp.startswith("text_encoder"):
        has = info.has_text_model if info is not None else naming.default_has_text_model(comp)
        mod = naming.te_to_live(mod, has)
    if info is None or not info.live:
        return naming.vit_v4_to_v5(mod) if comp == "model" and naming.transformers_major() >= 5 else mod
    for cand in (mod, naming.vit_v4_to_v5(mod), naming.vit_v5_to_v4(mod)):
        if cand in info.modules:
            return cand
    return None


def import_peft_tensors(raw: Mapping[str, torch.Tensor], config: Mapping, infos: Mapping[str, ComponentInfo] | None
                        = None, source: str = "<tensors>", comp: str | None = None
                        ) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """PEFT state dict (+ its adapter_config) -> canonical tensors; full weights go to report.full_weights.

    LoRA, LoRA+DoRA, LoHa and LoKr modules are read (peft_kinds); a module whose tensors are not the kind the
    config declares (peft_type, use_dora), or are broken (half a kind's tensors, a magnitude of the wrong length,
    shapes that do not fit the model), is named in `report.invalid` and skipped."""
    report = ImportReport("peft")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        hit = split_key(key)
        if hit is not None:
            groups.setdefault(hit[0], {})[hit[1]] = t
            continue
        k = key.removeprefix(PREFIX).replace(".default.weight", ".weight")
        if ".lora_" in k or k.endswith(".alpha"):
            report.unsupported.append(key)
        else:
            full[k.replace(".modules_to_save", "")] = t
    mods = [m.removesuffix(_OUT_PROJ) for m in groups]
    comp = comp or _component(mods, infos)
    info = (infos or {}).get(comp)
    out: dict[str, torch.Tensor] = {}
    mha: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for mod, g in groups.items():
        label = f"{source}: {mod}"
        problem = _kind_problem(g, config)
        if problem:
            report.invalid.append(f"{label}: {problem}")
            continue
        if set(g) - {"A", "B"}:  # LoHa, LoKr, LoRA+DoRA
            _import_kind(out, report, g, config, mod, info, comp, label)
            continue
        if "A" not in g or "B" not in g:
            raise AdapterFileError(f"{label} has only lora_{''.join(sorted(g))}; a LoRA module needs lora_A and lora_B")
        alpha = peft_alpha(config, mod.removesuffix(_OUT_PROJ), g["A"].shape[0]) if config else \
            alpha_value(label, None, g["A"].shape[0])
        is_out = mod.endswith(_OUT_PROJ)
        base = mod.removesuffix(_OUT_PROJ)
        live = _live_name(base, info, comp)
        if live is None:
            report.not_found.append(f"{comp}.{base}")
            continue
        kind, wshape = info.modules[live] if info is not None and live in info.modules else ("", ())
        a, b = g["A"], g["B"]
        fused = kind == "MultiheadAttention" or is_out or (live.endswith("qkv") and b.shape[0] == 3 * a.shape[1]) \
            or (kind == "" and b.shape[0] == 3 * a.shape[1] and live.endswith(("qkv", "self_attention")))
        if fused:
            scale = (alpha, a.shape[0])  # scaling alpha / R of the fused adapter
            if is_out:
                parts = {"o": _drop_zero_rank(a, b * PEFT_MHA_OUT_PROJ_FACTOR)}
            else:
                parts = split_fused(a, b, ("q", "k", "v"))
            for p, (pa, pb) in parts.items():
                mha.setdefault(live, {})[p] = (pa, pb, scale)
            continue
        if info is None or not info.live:
            kind = "Conv2d" if a.dim() == 4 else "Linear"
        a, b = fit_pair(label, kind, wshape or None, a, b, bool(info and info.live))
        put(out, comp, live, a, b, alpha)
        report.matched.append(f"{comp}.{live}")
        report.kinds["LoRA"] = report.kinds.get("LoRA", 0) + 1
    for live, parts in mha.items():
        # Parts of one module share rank and alpha: keep the first part's scaling, fold any other into B.
        (al0, r0) = next(iter(parts.values()))[2]
        pairs = _pad({p: (a, b if s == (al0, r0) else b * (s[0] / s[1] * r0 / al0)) for p, (a, b, s) in parts.items()})
        for p, (a, b) in pairs.items():
            put(out, comp, f"{live}.{p}", a, b, al0 * a.shape[0] / r0)
            report.matched.append(f"{comp}.{live}.{p}")
            report.kinds["LoRA"] = report.kinds.get("LoRA", 0) + 1
    report.full_weights = {f"{comp}.{k}": v for k, v in full.items()}
    return out, report


_PEFT_NAME = {"A": "lora_A.weight", "B": "lora_B.weight", DORA: MAGNITUDE}


def _kind_problem(g: Mapping[str, torch.Tensor], config: Mapping) -> str | None:
    """Why a module's tensors are not one layer of the kind its adapter_config declares (None when they are)."""
    names = ", ".join(_PEFT_NAME.get(n, n) for n in sorted(g))
    kind = kind_of(g)
    if kind is None or any(n not in get_kind(kind).factor_names for n in g):
        return f"has {names}, which make no LoRA, LoRA+DoRA, LoHa or LoKr module"
    if not config:
        return None
    pt = str(config.get("peft_type", "LORA")).upper()
    dora = pt == "LORA" and bool(config.get("use_dora"))
    if kind != PEFT_TYPES.get(pt) or (DORA in g) != dora:
        return (f"has {describe(kind, g)} tensors ({names}) but adapter_config.json declares {kind_label(pt, dora)} "
                f"(peft_type {pt}{', use_dora true' if dora else ''}); the folder is inconsistent")
    return None


def _import_kind(out: dict[str, torch.Tensor], report: ImportReport, g: Mapping[str, torch.Tensor], config: Mapping,
                 mod: str, info: ComponentInfo | None, comp: str, label: str) -> None:
    """One LoHa / LoKr / LoRA+DoRA module: checked against the live weight when known, stored with our factor
    names and peft's scale (alpha / r; rsLoRA for DoRA converted)."""
    kind = kind_of(g)
    live = _live_name(mod, info, comp)
    if live is None:
        report.not_found.append(f"{comp}.{mod}")
        return
    mtype, wshape = info.modules[live] if info is not None and live in info.modules else ("", ())
    is_live = bool(info and info.live)
    f = dict(g)
    if kind == "lora" and "A" in f and "B" in f and DORA in f:
        ktype = mtype if is_live else ("Conv2d" if f["A"].dim() == 4 else "Linear")
        try:
            f["A"], f["B"] = fit_pair(label, ktype, None, f["A"], f["B"], False)
        except AdapterFileError as e:
            report.invalid.append(str(e))
            return
        problem = magnitude_problem(f[DORA], f["B"].shape[0])
        if problem:
            report.invalid.append(f"{label}: {problem}")
            return
        f[DORA] = our_magnitude(f[DORA], f["A"])
    problems = check_kind(kind, f, tuple(wshape) if is_live and wshape else None, f"{mtype} weight")
    if problems:
        report.invalid += [f"{label}: {p}" for p in problems]
        return
    if kind == "lora":
        a, b = f.pop("A"), f.pop("B")
        spec = LayerSpec(a, b, peft_alpha(config, mod, a.shape[0]), "lora", "lora", f)
    else:
        spec = scaled_spec(kind, f, lycoris_scale(config, mod, _pattern_value))
    out.update({f"{comp}.{k}": t for k, t in layer_tensors(live, spec).items()})
    report.matched.append(f"{comp}.{live}")
    report.kinds[spec.label] = report.kinds.get(spec.label, 0) + 1


def import_peft_dir(path: Path, infos: Mapping[str, ComponentInfo] | None = None
                    ) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """A PEFT folder, or a folder of per-component PEFT folders (unet/, text_encoder/, ...)."""
    if not (path / CONFIG).is_file():
        subs = [d for d in sorted(path.iterdir()) if (d / CONFIG).is_file()]
        if not subs:
            raise AdapterFileError(f"{path}: no {CONFIG} (not a PEFT adapter folder)")
        out, report = {}, ImportReport("peft")
        for d in subs:
            t, r = _import_one(d, infos, d.name)
            out.update(t)
            for f in ("matched", "unused", "not_found", "unsupported", "notes"):
                getattr(report, f).extend(getattr(r, f))
            report.full_weights.update(r.full_weights)
        return out, report
    return _import_one(path, infos, None)


def _import_one(path: Path, infos, comp: str | None) -> tuple[dict[str, torch.Tensor], ImportReport]:
    try:
        config = json.loads((path / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path / CONFIG}: not valid JSON ({e})") from None
    if str(config.get("peft_type", "LORA")).upper() not in PEFT_TYPES:
        raise AdapterFileError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; lora_vision reads "
                               f"peft's {', '.join(PEFT_TYPES)} adapters (LORA with or without use_dora)")
    weights = path / WEIGHTS
    if not weights.is_file():
        raise AdapterFileError(f"{path}: no {WEIGHTS} (pickled adapter_model.bin files are not loaded)")
    raw, _meta = read_safetensors(weights)
    sub = {comp: infos[comp]} if comp and infos and comp in infos else infos
    return import_peft_tensors(raw, config, sub, str(path), comp)


def _fused_pair(entries: dict, mod: str, parts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    have = [p for p in parts if (mod, p) in entries]
    if not have:
        return None
    a = torch.cat([entries[(mod, p)]["A"] for p in have])
    d = entries[(mod, have[0])]["B"].shape[0]
    blocks = [entries[(mod, p)]["B"] if p in have else entries[(mod, have[0])]["B"].new_zeros(d, 0) for p in parts]
    return a, torch.block_diag(*blocks), entries[(mod, have[0])]["alpha"]


def peft_state(adapter: Adapter, comp: str, weights: Mapping[str, tuple[int, ...]] | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]], dict]:
    """PEFT tensors (prefixed), (rank, alpha) per PEFT target module and the config fields of its peft_type
    (peft_type, use_dora, ...) for one component. Plain LoRA, LoRA+DoRA, LoHa and LoKr (peft_kinds); other kinds
    and mixtures raise PeftExportError. `weights`: module -> weight shape, when the model is known."""
    layers = adapter.layers(comp)
    if all(spec.is_plain for spec in layers.values()):
        return (*_lora_tensors(adapter.state_dict_for(comp), weights), {"peft_type": "LORA", "use_dora": False})
    on_parts = [k for k, spec in layers.items() if not spec.is_plain and _fused_part(*split_layer_key(k), weights)]
    if on_parts:
        raise PeftExportError(f"{comp}.{on_parts[0]}: a {layers[on_parts[0]].label} layer on a part of an "
                              f"nn.MultiheadAttention (torchvision's attention; {len(on_parts)} such layer(s)); "
                              "peft's LoHa, LoKr and DoRA do not go on nn.MultiheadAttention: keep it in our own "
                              "format (--to lora_vision), or turn it into plain LoRA (lora-vision convert FILE "
                              "--rank N --base MODEL --to peft)")
    windows = [k for k, spec in layers.items() if LOKR_ROWS in spec.factors]
    if windows:
        raise PeftExportError(f"{comp}.{windows[0]}: a window of a LoKr on a fused module (lokr_rows, read from a "
                              f"BFL file; {len(windows)} such layer(s)); peft's LoKr cannot hold one: export it with "
                              "the DiT kohya export, which writes the fused LoKr back")
    kind, _ = peft_type(layers, comp)
    if kind == "LOHA":
        return loha_state(layers, comp)
    if kind == "LOKR":
        return lokr_state(layers, comp, weights)
    state, magnitudes = lora_view(layers, comp)
    tensors, targets = _lora_tensors(state, weights)
    tensors.update({f"{PREFIX}{mod}.{MAGNITUDE}": m for mod, m in magnitudes.items()})
    return tensors, targets, {"peft_type": "LORA", "use_dora": bool(magnitudes)}


def _fused_part(mod: str, part: str, weights: Mapping[str, tuple[int, ...]] | None) -> bool:
    """True when `part` (q / k / v / o) of `mod` is a part of a fused projection (torchvision's nn.MultiheadAttention,
    timm's qkv Linear), False for a Linear of that name (T5's q / k / v / o): no module of the model when the model
    is known, else the names torchvision and timm give the fused modules (`self_attention`, `qkv`)."""
    if not part:
        return False
    return f"{mod}.{part}" not in weights if weights is not None else mod.endswith(("self_attention", "qkv"))


def _lora_tensors(state: Mapping[str, torch.Tensor], weights: Mapping[str, tuple[int, ...]] | None = None
                  ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
    """PEFT LoRA tensors (prefixed) and (rank, alpha) per PEFT target module of a canonical plain-LoRA state dict
    (`weights`: module -> weight shape, when the model is known; see _fused_part)."""
    entries = {(m, p) if _fused_part(m, p, weights) else (layer_key(m, p), ""): e
               for (m, p), e in parse_canonical(state).items()}
    tensors: dict[str, torch.Tensor] = {}
    targets: dict[str, tuple[int, float]] = {}
    fused = sorted({m for (m, p) in entries if p})
    for (mod, part), e in entries.items():
        if part:
            continue
        # Live names: PEFT matches them against the installed model (import converts older names back).
        tensors[f"{PREFIX}{mod}.lora_A.weight"], tensors[f"{PREFIX}{mod}.lora_B.weight"] = e["A"], e["B"]
        targets[mod] = (e["rank"], e["alpha"])
    for mod in fused:
        qkv = _fused_pair(entries, mod, ("q", "k", "v"))
        o = entries.get((mod, "o"))
        is_mha = o is not None or mod.endswith("self_attention")
        any_e = next(e for (m, p), e in entries.items() if m == mod)
        r_part, alpha_part = any_e["rank"], any_e["alpha"]
        if qkv is None:  # only `o`: PEFT still adapts in_proj; give it an all-zero pair of the same rank
            d = o["B"].shape[0]
            qkv = (o["A"].new_zeros(r_part, d), o["B"].new_zeros(3 * d, r_part), alpha_part)
        a, b, _ = qkv
        rank = a.shape[0]
        tensors[f"{PREFIX}{mod}.lora_A.weight"], tensors[f"{PREFIX}{mod}.lora_B.weight"] = a, b
        targets[mod] = (rank, alpha_part * rank / r_part)
        if is_mha:
            d = b.shape[0] // 3
            oa = o["A"] if o is not None else a.new_zeros(0, d)
            ob = o["B"] / PEFT_MHA_OUT_PROJ_FACTOR if o is not None else b.new_zeros(d, 0)
            extra = rank - oa.shape[0]
            tensors[f"{PREFIX}{mod}{_OUT_PROJ}.lora_A.weight"] = torch.cat([oa, oa.new_zeros(extra, d)])
            tensors[f"{PREFIX}{mod}{_OUT_PROJ}.lora_B.weight"] = torch.cat([ob, ob.new_zeros(d, extra)], 1)
    return tensors, targets


def check_peft_export(adapter: Adapter) -> None:
    """Raise PeftExportError when export_peft could not write `adapter` (a kind peft lacks, a mixture, a LoKr layout
    no peft config rebuilds): the writer's own rules, run without writing anything."""
    plain = adapter.plain()
    for comp in plain.components():
        peft_state(plain, comp)


def export_peft(adapter: Adapter, path: str | Path, model: nn.Module | None = None,
                modules_to_save: list[str] | None = None, full_weights: Mapping[str, torch.Tensor] | None = None,
                base_model_name_or_path: str | None = None, dtype: torch.dtype | None = None,
                per_component: bool = False) -> Path:
    """Write a PEFT adapter folder; several components go to one subfolder each (unet/, text_encoder/, ...), and
    with `per_component` a single one does too (train_sd.py's peft/unet/ whether or not text encoders trained).

    Modules stored in full in the adapter (`full.<component>.*`) become `modules_to_save`; more can be named in
    `modules_to_save` (taken from `model`) or given as `full_weights` (`<module>.weight` -> tensor).
    A new folder is written under a temporary name and renamed when complete, so a failure (a full disk) leaves
    nothing behind; in an existing folder each file is replaced atomically.
    """
    path = Path(path)
    adapter = adapter.plain()  # alphas for PEFT's alpha / rank (use_rslora false): the same updates
    args = (model, modules_to_save, full_weights, base_model_name_or_path, dtype, per_component)
    if path.exists():
        _write_peft(adapter, path, *args)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        _write_peft(adapter, tmp, *args)
        replace_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _write_peft(adapter: Adapter, path: Path, model: nn.Module | None, modules_to_save: list[str] | None,
                full_weights: Mapping[str, torch.Tensor] | None, base_model_name_or_path: str | None,
                dtype: torch.dtype | None, per_component: bool = False) -> None:
    comps = adapter.components()
    if len(comps) > 1 or per_component:
        for c in comps:
            sub = Adapter({k: v for k, v in adapter.tensors.items() if k.startswith((c + ".", f"full.{c}."))},
                          adapter.metadata)
            _write_peft(sub, path / c, None, None, None, base_model_name_or_path, dtype)
        return
    comp = comps[0]
    weights = {n: tuple(m.weight.shape) for n, m in naming.adaptable_modules(model).items()
               if isinstance(getattr(m, "weight", None), torch.Tensor)} if model is not None else None
    tensors, targets, fields = peft_state(adapter, comp, weights)
    full = dict(adapter.full_state_dict_for(comp))
    full.update(full_weights or {})
    for m in modules_to_save or []:
        if model is None and not any(k.startswith(m + ".") for k in full):
            raise ValueError(f"modules_to_save {m!r}: pass the model or full_weights holding its tensors")
        if model is not None:
            full.update({f"{m}.{k}": v for k, v in model.get_submodule(m).state_dict().items()})
    tensors.update({PREFIX + k: v for k, v in full.items()})
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    ranks = [r for r, _ in targets.values()]
    alphas = [a for _, a in targets.values()]
    r = max(set(ranks), key=ranks.count)
    a = max(set(alphas), key=alphas.count)
    config = {
        "task_type": None, "r": r, "target_modules": sorted(targets),
        "rank_pattern": {m: rk for m, (rk, _) in targets.items() if rk != r},
        "alpha_pattern": {m: al for m, (_, al) in targets.items() if al != a},
        "modules_to_save": sorted({k.rsplit(".", 1)[0] for k in full}) or None,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True, **fields,
    }
    if fields["peft_type"] == "LORA":
        config.update({"lora_alpha": a, "use_rslora": False, "bias": "none", "lora_dropout": 0.0,
                       "fan_in_fan_out": False, "init_lora_weights": True})
    else:  # peft's LycorisConfig (LoHaConfig, LoKrConfig)
        config.update({"alpha": a, "rank_dropout": 0.0, "module_dropout": 0.0, "init_weights": True})
    base = adapter.info.base or ""
    if "timm" in base or any(m.endswith(".qkv") for m in targets):
        config["auto_mapping"] = {"base_model_class": "VisionTransformer",
                                  "parent_library": "timm.models.vision_transformer"}
    import transformers

    meta = {"format": "pt", **provenance(adapter.metadata),
            **AdapterMetadata(transformers_version=transformers.__version__).to_strings()}
    write_safetensors(path / WEIGHTS, tensors, meta)
    atomic_write_text(path / CONFIG, json.dumps(config, indent=2, sort_keys=True))
