"""Foreign LoRA formats at the edge: detect a file's format, import it into our canonical `Adapter` for the live
module names of the installed libraries, and export an `Adapter` to kohya (A1111 / ComfyUI), diffusers or PEFT.

    adapter, report = read_adapter("my_lora.safetensors", models={"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    export(adapter, "kohya", "out.safetensors", base="sd1")

Give `models` (or `infos` from `describe_models`) whenever the target is known: names are then matched against
the real modules and shapes are checked, so a file made for another base is an error that says so.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Union

import torch
from torch import nn

from ..adapter import COMPONENTS, EMBEDDINGS, FULL, Adapter, embedding_tensors
from ..io import AdapterFileError, read_safetensors
from ..lora.ops import canonical_layers, layer_tensors
from ..lora.spec import SCALING_RULES, layer_key, split_key
from ..metadata import FORMAT_VERSION, AdapterMetadata, scaling_entries
from . import naming
from .common import (NORM_TYPES, AdapterMismatchError, BaseMismatchError, ComponentInfo, ImportReport, describe_models,
                     fit_pair, guess_base, part_weight_shape, put)
from .detect import FORMATS, classify_keys, detect_format
from .diffusers import export_diffusers, import_diffusers
from .dit_control import widened_inputs
from .dit_keys import export_dit_kohya, import_dit, is_dit_keys
from .kohya import BUNDLE, export_kohya, import_bundle, import_kohya
from .peft import export_peft, import_peft_dir, import_peft_tensors

__all__ = ["FORMATS", "AdapterMismatchError", "AdapterSource", "BaseMismatchError", "ComponentInfo", "ImportReport",
           "adapter_summary", "describe_models", "declared_base", "detect_format", "export", "guess_base",
           "import_tensors", "load_any", "read_adapter"]


AdapterSource = Union[str, os.PathLike, Mapping[str, torch.Tensor], Adapter]


def read_adapter(source: AdapterSource, models: Mapping[str, nn.Module] | None = None, strict: bool = False,
                 check_finite: bool = True, infos: Mapping[str, ComponentInfo] | None = None,
                 metadata: Mapping[str, str] | None = None) -> tuple[Adapter, ImportReport | None]:
    """The one way to read an adapter: any supported file (lora_vision, kohya, diffusers, peft), a PEFT folder, a
    dict of tensors (with `metadata`) or an `Adapter` (returned as it is, report None) -> (Adapter, ImportReport).

    Files are header-validated safetensors (pickles refused); check_finite=False leaves the NaN/Inf check of the
    tensors to the caller (the pipeline loader does it on the device). Our own files keep their alphas and each
    layer's scaling rule; the other formats' alphas are for the plain rule (alpha / rank).
    models: the live target components ({"unet": ..., "text_encoder": ..., "text_encoder_2": ...} or
    {"model": vit}); infos: the same described ahead of time. Names are then matched against the real modules and
    shapes checked. strict: any unused tensor, module not found or unsupported tensor kind raises
    AdapterMismatchError. A file made for another base raises BaseMismatchError (an AdapterMismatchError) in every
    mode.
    """
    if isinstance(source, Adapter):
        return source, None
    if not isinstance(source, (str, os.PathLike, Mapping)):
        raise TypeError(f"expected an adapter file path, a PEFT folder, a dict of tensors or an Adapter, got "
                        f"{type(source).__name__}")
    if infos is None and models is not None:
        infos = describe_models(models)
    label = "<tensors>" if isinstance(source, Mapping) else str(source)
    if not isinstance(source, Mapping) and Path(source).is_dir():
        tensors, report = import_peft_dir(Path(source), infos)
        report.base = guess_base(tensors) if tensors else None
        meta: dict[str, str] = {}
    else:
        if isinstance(source, Mapping):  # files are checked by read_safetensors; tensors given directly here
            raw, meta = dict(source), dict(metadata or {})
            bad = [k for k, t in raw.items() if check_finite and t.is_floating_point() and not torch.isfinite(t).all()]
            if bad:
                raise AdapterFileError(f"{label}: {len(bad)} tensor(s) contain NaN/Inf: {', '.join(bad[:5])}")
        else:
            raw, meta = read_safetensors(source, check_finite=check_finite)
        try:
            tensors, report = import_tensors(raw, meta, infos, label)
        except BaseMismatchError as e:
            if not infos:
                raise
            raise BaseMismatchError(f"{e}\n{_bases(source, infos, label)}") from None
    _check_base(tensors, report, infos, source, label)
    report.raise_if_strict(strict, label)
    if not tensors:
        raise AdapterFileError(f"{label}: no LoRA module could be imported ({report}); the file is for another "
                               "model, or of a kind lora_vision does not apply")
    tensors.update({f"{FULL}.{k}": v for k, v in report.full_weights.items()})
    info = AdapterMetadata.from_strings({k: v for k, v in meta.items() if k != "format"})
    info = info.replace(source_format=report.format, format=info.format or FORMAT_VERSION,
                        base=info.base or report.base or "unknown", scaling=scaling_entries(report.rules))
    return Adapter(tensors, info.to_strings()), report


load_any = read_adapter  # the earlier name of read_adapter


def import_tensors(raw: Mapping[str, torch.Tensor], metadata: Mapping[str, str], infos: Mapping[str, ComponentInfo]
                   | None = None, source: str = "<tensors>") -> tuple[dict[str, torch.Tensor], ImportReport]:
    """Canonical tensors and a report from the tensors and metadata of a single file of any supported format."""
    fmt = classify_keys(list(raw), metadata, source)
    if fmt != "lora_vision" and is_dit_keys(list(raw)):
        return import_dit(raw, metadata, infos, source)  # the report names the DiT family as its base
    if fmt == "kohya":  # bundled text embeddings (pivotal tuning): read apart from the LoRA import
        tensors, report = import_kohya(raw, infos, source)
        bundled = import_bundle(raw, source)
        if bundled:
            tensors.update(bundled)
            report.unused = [k for k in report.unused if not k.startswith(BUNDLE + ".")]
            report.notes.append(f"{BUNDLE}: bundled text embedding(s) "
                                f"{', '.join(sorted({k.split('.')[1] for k in bundled}))} read as embeddings")
    elif fmt == "diffusers":
        tensors, report = import_diffusers(raw, metadata, infos, source)
    elif fmt == "peft":
        tensors, report = import_peft_tensors(raw, {}, infos, source)
    else:
        tensors, report = import_native(raw, infos, source, metadata)
    report.base = guess_base({k: v for k, v in tensors.items() if not k.startswith(FULL + ".")}) if tensors else None
    if report.base in ("sd1", "sd2"):  # same module names: the file's own metadata tells them apart when present
        report.base = declared_base(metadata) or report.base
    return tensors, report


def declared_base(metadata: Mapping[str, str]) -> str | None:
    """The SD 1.x / 2.x family a file's metadata declares (sd1, sd2, sd2-v), or None when it says nothing."""
    version = metadata.get("ss_base_model_version", "")
    ours = AdapterMetadata.from_strings(metadata).base
    if ours in ("sd1", "sd2", "sd2-v"):
        return ours
    if version.startswith("sd_v2") or metadata.get("ss_v2") == "True":
        return "sd2-v" if version.endswith("_v") else "sd2"
    if version.startswith("sd_v1"):
        return "sd1"
    return None


def import_native(raw: Mapping[str, torch.Tensor], infos: Mapping[str, ComponentInfo] | None = None,
                  source: str = "<tensors>", metadata: Mapping[str, str] | None = None
                  ) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """Our own files: names are re-mapped for the installed transformers (CLIP `text_model.`) and checked; alphas
    are kept as written and each layer's recorded scaling rule goes to `report.rules`."""
    report = ImportReport("lora_vision", layers={})
    info_meta = AdapterMetadata.from_strings(metadata or {})
    out: dict[str, torch.Tensor] = {}
    comps = sorted({k.split(".", 1)[0] for k in raw})
    for comp in comps:
        if comp == FULL:  # modules stored in full (a new head): kept as they are
            out.update({k: v for k, v in raw.items() if k.startswith(FULL + ".")})
            continue
        if comp == EMBEDDINGS:  # bundled text embeddings: checked and kept as they are
            try:
                bundled = Adapter({k: v for k, v in raw.items() if k.startswith(EMBEDDINGS + ".")}).embeddings()
                out.update(embedding_tensors(bundled))
            except ValueError as e:
                raise AdapterFileError(f"{source}: {e}") from None
            continue
        if comp not in COMPONENTS:
            report.unused += [k for k in raw if k.startswith(comp + ".")]
            continue
        p = comp + "."
        try:
            specs = canonical_layers({k[len(p):]: v for k, v in raw.items() if k.startswith(p)})
        except KeyError as e:
            raise AdapterFileError(f"{source}: {e}") from None
        info = (infos or {}).get(comp)
        live_info = info is not None and info.live
        has = None
        if comp.startswith("text_encoder"):
            has = info.has_text_model if info is not None else naming.default_has_text_model(comp)
        for key, spec in specs.items():
            # With the model, a key that names a module itself is that module (T5's Linears named q / k / v / o),
            # not a fused module's part (split_key)
            live, part = split_key(naming.te_to_live(key, has) if has is not None else key,
                                   info.modules if live_info else None)
            found = info.module_of(live) if live_info else None
            if live_info and found is None:
                report.not_found.append(f"{comp}.{live}")
                continue
            if found is not None and spec.kind == "lora" and widened_inputs(info.family or "", live, spec.A, found[1]):
                report.widened[f"{comp}.{live}"] = (int(found[1][1]), int(spec.A.shape[1]))  # a control LoRA
                found = (found[0], (found[1][0], int(spec.A.shape[1])))
            live_key = layer_key(live, part)
            if spec.is_plain:
                a, b = spec.A, spec.B
                if found is not None and found[0] in NORM_TYPES:
                    report.invalid.append(f"{comp}.{live}: a LoRA pair on a {found[0]}, which takes w_norm / b_norm "
                                          "only")
                    continue
                if live_info and not part:
                    mtype, wshape = found
                    a, b = fit_pair(f"{source}: {comp}.{key}", mtype, wshape, a, b, True)
                put(out, comp, live_key, a, b, spec.alpha)
                if a is not spec.A or b is not spec.B:
                    spec = spec.with_factors(a, b)
            else:  # another kind (lora.kinds): its factors as stored, checked against the live weight
                if live_info:
                    mtype, wshape = found
                    problems = spec.check(part_weight_shape(mtype, wshape, part) if wshape else None)
                    if problems:
                        report.invalid += [f"{comp}.{live_key}: {q}" for q in problems]
                        continue
                out.update({f"{comp}.{k}": t for k, t in layer_tensors(live_key, spec).items()})
            rule = info_meta.rule(comp, key)
            if rule not in SCALING_RULES:  # not kept: Adapter.layers refuses it when asked, as for any adapter
                report.layers = None
            elif report.layers is not None:
                # The layer as the adapter's tensors give it back: alpha as stored there (a float32 0-dim tensor).
                alpha = float(out[f"{comp}.{live_key}.alpha"].item())
                report.layers.setdefault(comp, {})[live_key] = spec if (alpha, rule) == (spec.alpha, spec.rule) \
                    else replace(spec, alpha=alpha, rule=rule)
            label = spec.label
            report.kinds[label] = report.kinds.get(label, 0) + 1
            report.rules.setdefault(comp, {})[live_key] = rule
            report.matched.append(f"{comp}.{live}" + (f".{part}" if part else ""))
    return out, report


def _check_base(tensors: dict, report: ImportReport, infos: Mapping[str, ComponentInfo] | None,
                source: object, label: str) -> None:
    """A file for another base (SDXL file on SD 1.5, ...) is an error whatever `strict` says."""
    if not infos or not any(i.live for i in infos.values()):
        return
    file_comps = {_component_hint(m) for m in report.matched + report.not_found}
    lacking = [c for c in file_comps if c in COMPONENTS and c not in infos]
    matched = len(report.matched)
    if lacking or (report.not_found and len(report.not_found) >= max(1, matched)):
        what = f"components {lacking} that the model does not have" if lacking else \
            f"{len(report.not_found)} modules the model does not have ({_where(report.not_found)}; first: " \
            f"{report.not_found[:3]})"
        bases = _bases(source, infos, label)
        if lacking and "same layout" in bases:
            raise AdapterFileError(f"{label}: it has weights for {lacking}, which were not given; pass those "
                                   f"components too (models={{...}}) so that nothing is silently dropped")
        raise BaseMismatchError(f"{label} was made for another base model: it has {what}.\n{bases}")


def _where(names: list[str]) -> str:
    """"3 in the UNet, 1 in text_encoder": how many of `names` each component holds."""
    counts: dict[str, int] = {}
    for n in names:
        comp = _component_hint(n)
        counts[comp] = counts.get(comp, 0) + 1
    label = {"unet": "the UNet", "transformer": "the transformer"}
    return ", ".join(f"{n} in {label.get(c, c)}" for c, n in counts.items())


def _bases(source: object, infos: Mapping[str, ComponentInfo], label: str) -> str:
    """"the file looks like a <base> LoRA but the target is <family>", from a model-free import of the file."""
    file_base, file_comps = "unknown", []
    try:
        if isinstance(source, Mapping):
            tensors, rep = import_tensors(source, {}, None, label)
        elif not Path(str(source)).is_dir():
            raw, meta = read_safetensors(str(source))
            tensors, rep = import_tensors(raw, meta, None, label)
        else:
            tensors, rep = {}, None
        file_base = (rep.base if rep is not None else None) or "unknown"
        file_comps = sorted({k.split(".", 1)[0] for k in tensors})
    except (AdapterFileError, KeyError, ValueError):
        pass
    fams = {i.family for i in infos.values() if i.family}
    target = ", ".join(sorted(fams)) or "the given model"
    if file_base in fams:
        return f"The file is also a {file_base} LoRA (same layout as the target)."
    comps = f" (the file has weights for {file_comps}, the target has {list(infos)})" if file_comps else ""
    return (f"The file looks like a {file_base} LoRA but the target is {target}: load it into a {file_base} "
            f"model{comps}.")


def _component_hint(name: str) -> str:
    """The component a matched or unmatched module name belongs to (kohya keys carry it in their prefix)."""
    for prefixes, comp in ((("lora_te2_", "text_encoders.clip_g"), "text_encoder_2"),
                           (("lora_te_", "lora_te1_", "text_encoders."), "text_encoder"),
                           (("lora_unet_", "lycoris_", "diffusion_model."), "unet")):
        if name.startswith(prefixes):
            return comp
    return name.split(".", 1)[0]


def export(adapter: Adapter, fmt: str, path: str | os.PathLike, base: str | None = None, **kwargs) -> Path:
    """Write `adapter` as fmt ("kohya", "diffusers", "peft" or "lora_vision") to `path`; returns the path.

    base: for kohya, "sd1", "sd2", "sd2-v" or "sdxl" (default: the adapter's metadata, else guessed from its
    tensors); pass the target UNet's config as unet_config= for its SGM names. For a transformer (DiT) adapter the
    family ("flux1", "flux2", "sd3", "qwen-image", "z-image"), written with the native names ComfyUI and Forge read,
    its own text encoders (Qwen, Mistral, T5) in ComfyUI's `text_encoders.<encoder>.transformer.` names.
    Extra keyword arguments go to the format's exporter (e.g. dtype, title, trigger_phrase; DiT: text_encoder).
    """
    if fmt == "kohya" and "transformer" in adapter.components():
        full = sorted(k[len(FULL) + 1:] for k in adapter.tensors if k.startswith(FULL + "."))
        if full:  # not silently dropped: the file would not do what the adapter does
            raise ValueError(f"the adapter sets {len(full)} tensors in full (first: {full[0]}; the norm scales of a "
                             "Flux.1 control LoRA), which the DiT kohya export does not write; keep it in our own "
                             "format (--to lora_vision) or use the original file")
        return export_dit_kohya(adapter, path, family=base if isinstance(base, str) else None, **kwargs)
    if fmt == "kohya":
        return export_kohya(adapter, path, base=base, **kwargs)
    if fmt == "diffusers":
        return export_diffusers(adapter, path, **kwargs)
    if fmt == "peft":
        return export_peft(adapter, path, **kwargs)
    if fmt == "lora_vision":
        return adapter.save(path, **kwargs)
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def adapter_summary(adapter: Adapter) -> dict:
    """Modules, ranks, alphas and kinds per component (what `inspect` prints)."""
    out = {}
    for comp in adapter.components():
        layers = adapter.layers(comp)
        kinds: dict[str, int] = {}
        for spec in layers.values():
            kinds[spec.label] = kinds.get(spec.label, 0) + 1
        out[comp] = {"modules": len(layers),
                     "ranks": sorted({spec.rank for spec in layers.values()}),
                     "alphas": sorted({float(spec.alpha) for spec in layers.values()}), "kinds": kinds}
    return json.loads(json.dumps(out))
