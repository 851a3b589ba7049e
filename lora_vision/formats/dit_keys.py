"""Reading DiT LoRA files: Flux.1, Flux.2, SD 3.x, Qwen-Image and Z-Image files in any dialect into canonical names
(the live module paths of the diffusers transformer, component "transformer"), with the load report.

The work is split by job: formats/dit_tables.py holds the name tables, formats/dit_detect.py the key syntax, name
resolution and family detection, formats/dit_fused.py the splitting (and fusing) of fused q/k/v modules,
formats/dit_text.py the text-encoder keys, formats/dit_export.py the native export; this module reads the
transformer's modules and puts the pieces together.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from ..io import AdapterFileError
from ..lora import kinds
from ..lora.kinds import kind_of
from ..lora.ops import layer_tensors
from ..lora.spec import LayerSpec
from .common import BaseMismatchError, ComponentInfo, ImportReport, alpha_value, fit_pair, is_unsupported, put
from .diffusers import _alpha_rule, peft_alpha
from .dit_control import BIAS_SUFFIX, VARIANT, check_bias, control_note, full_tensor_name, lora_biases, split_biases, \
    widened_inputs
from .dit_detect import (_TE_PREFIXES, FILE_SUFFIX, Target, _group, detect_family, declared_family,  # noqa: F401
                         dit_format, family_of_modules, family_of_names, is_dit_keys, resolve, split_key,
                         strip_prefix)
from .dit_export import _native_rows, dit_family, dit_kohya_tensors, export_dit_kohya, fuse_tensors  # noqa: F401
from .dit_fused import _part_rows, _split_fused, _swap_halves, _swaps, swaps
from .dit_tables import COMPONENT, CONTROL_INPUT, FAMILIES, FLUX2_SIZES
from .dit_text import import_clip_encoders, import_family_encoders
from .kohya import kind_factors, kind_spec


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
    # Flux.1 control LoRAs: full tensors (norm scales) and lora_B biases beside the pairs (formats/dit_control.py)
    full = {k: n for k in raw if k not in te_raw and family == "flux1" and (n := full_tensor_name(k))}
    biases = lora_biases({k: v for k, v in raw.items() if k not in te_raw})
    rest = [k for k in raw if k not in te_raw and k not in full and not k.endswith(BIAS_SUFFIX)]
    groups = _group({k: raw[k] for k in rest})
    report.unused += [k for k in rest if split_key(k) is None and not is_unsupported(k)]
    report.unsupported += [k for k in rest if split_key(k) is None and is_unsupported(k)]
    report.full_weights.update({f"{COMPONENT}.{n}": raw[k] for k, n in full.items()})
    out: dict[str, torch.Tensor] = {}
    dialects: set[str] = set()
    try:
        _import_modules(groups, family, info, source, out, report, dialects, metadata, biases)
    except BaseMismatchError as e:
        raise BaseMismatchError(f"{e}; {_sizes(family, groups, info)}") from None
    report.unused += [m + BIAS_SUFFIX for m in biases]  # biases of no pair
    if family == "flux1":
        _note_control(out, info, len(full), report)
    report.format = "+".join(sorted(dialects)) if dialects else "dit"
    if te_raw:
        te_raw = import_family_encoders(te_raw, family, infos, source, out, report, metadata)
    if te_raw:
        te_tensors, te_report = import_clip_encoders(te_raw, metadata, infos, source)
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


def _target(family: str, mod: str, report: ImportReport, dialects: set[str]) -> Target | None:
    """The live module(s) a file module maps to (its dialect noted in `dialects`), or None, noted as not found."""
    hit = resolve(family, mod)
    if hit is None:
        report.not_found.append(f"{COMPONENT}.{mod}")
        return None
    label, target = hit
    dialects.add(target.dialect if target.dialect in ("xlabs", "diffsynth") else label)
    return target


def _note_control(out: Mapping[str, torch.Tensor], info: ComponentInfo | None, norms: int,
                  report: ImportReport) -> None:
    """Name a Flux.1 control LoRA in the report (variant and a note), from its img_in width and full tensors."""
    a = out.get(f"{COMPONENT}.{CONTROL_INPUT}.lora_A.weight")
    live = info is not None and info.live and CONTROL_INPUT in info.modules
    model_inputs = info.modules[CONTROL_INPUT][1][1] if live else None
    biases = sum(1 for k in out if k.endswith(".lora.diff_b"))
    note = control_note(int(a.shape[1]) if a is not None and a.dim() == 2 else None, model_inputs, norms, biases)
    if note:
        report.variant = VARIANT
        report.notes.append(note)


def _import_modules(groups: Mapping[str, dict], family: str, info: ComponentInfo | None, source: str,
                    out: dict[str, torch.Tensor], report: ImportReport, dialects: set[str],
                    metadata: Mapping[str, str], biases: dict[str, torch.Tensor]) -> None:
    """Map every (down, up, alpha) group of the file into `out`; what does not map goes to `report`. A module
    without an alpha tensor takes its alpha from diffusers' `lora_adapter_metadata` when the file has one. `biases`
    ({file module: lora_B bias}, Flux.1 control LoRAs) become the LoRA layers' bias updates; the ones used are
    removed from it."""
    rule = _alpha_rule(metadata, COMPONENT)
    for mod, g in groups.items():
        factors = kind_factors({FILE_SUFFIX.get(n, n): t for n, t in g.items()})
        kind = kind_of(factors, factors)
        if kind is not None and (kind != "lora" or set(factors) - {"A", "B"}):
            _import_kind(mod, kind, g, factors, family, info, source, out, report, dialects)
            continue
        bias = biases.pop(mod, None)
        if "down" not in g or "up" not in g:
            raise AdapterFileError(f"{source}: module {mod} has only [{', '.join(sorted(g))}]; a LoRA module needs "
                                   "lora_down and lora_up (an orphan alpha or half a pair means the file is broken)")
        target = _target(family, mod, report, dialects)
        if target is None:
            continue
        down, up = g["down"], g["up"]
        alpha = alpha_value(f"{source}: {mod}", g.get("alpha"), down.shape[0])
        if g.get("alpha") is None and rule is not None and len(target.live) == 1:
            alpha = peft_alpha(rule[0], target.live[0], down.shape[0])
        if up.dim() < 2 or up.shape[1] != down.shape[0]:
            raise AdapterFileError(f"{source}: {mod}: lora_up has shape {tuple(up.shape)} but lora_down has rank "
                                   f"{down.shape[0]}; the file is broken")
        if bias is not None:
            try:
                check_bias(f"{source}: {mod}", bias, up.shape[0])
            except ValueError as e:
                raise AdapterFileError(str(e)) from None
        if target.swap and down.dim() == 2 and _swaps(up, down):
            up = _swap_halves(up)
            bias = _swap_halves(bias) if bias is not None else None
        if len(target.live) == 1:
            name = target.live[0]
            if info is not None and info.live and name not in info.modules:
                report.not_found.append(f"{COMPONENT}.{mod}")
                continue
            kind, wshape = (info.modules[name] if info is not None and info.live else
                            ("Conv2d" if down.dim() == 4 else "Linear", None))
            wide = info is not None and info.live and widened_inputs(family, name, down, wshape)
            if wide:  # image + control latents: the pipeline loader widens the module (FluxControlPipeline only)
                report.widened[f"{COMPONENT}.{name}"] = (int(wshape[1]), int(down.shape[1]))
                wshape = (wshape[0], down.shape[1])
            a, b = fit_pair(f"{source}: {mod}", kind, wshape, down, up, info is not None and info.live)
            put(out, COMPONENT, name, a, b, alpha)
            _put_bias(out, name, bias, alpha / down.shape[0])
            report.matched.append(f"{COMPONENT}.{name}")
            continue
        try:
            sizes = _part_rows(f"{source}: {mod}", target.live, info, up.shape[0], down.shape[1])
        except KeyError:
            report.not_found.append(f"{COMPONENT}.{mod}")
            continue
        except ValueError as e:
            report.unsupported.append(f"{mod} ({e})")
            continue
        parts = _split_fused(down, up, sizes)
        done = []
        for name, pair, rows, part_bias in zip(target.live, parts, up.split(sizes, 0), split_biases(bias, sizes)):
            if pair is None and part_bias is not None and part_bias.any():
                pair = (down, rows)  # no rows of lora_B but a bias update: the part is adapted
            if pair is None:
                continue
            a, b = pair
            # each part keeps the file's scale: alpha / rank of the fused module
            put(out, COMPONENT, name, a.contiguous(), b.contiguous(), alpha * a.shape[0] / down.shape[0])
            _put_bias(out, name, part_bias, alpha / down.shape[0])
            report.matched.append(f"{COMPONENT}.{name}")
            done.append(name.rsplit(".", 1)[-1])
        report.split.append(f"{mod} -> {', '.join(done)}")


def _put_bias(out: dict[str, torch.Tensor], name: str, bias: torch.Tensor | None, scale: float) -> None:
    """A lora_B bias as the LoRA layer's bias update at strength 1 (`diff_b`, its scale alpha / rank folded in:
    the bias runs through lora_B, so the scale applies to it as to B @ A)."""
    if bias is not None:
        out[f"{COMPONENT}.{name}.lora.diff_b"] = (bias.float() * scale).to(bias.dtype) if scale != 1 else bias


def _import_kind(mod: str, kind: str, g: Mapping[str, torch.Tensor], factors: dict[str, torch.Tensor], family: str,
                 info: ComponentInfo | None, source: str, out: dict[str, torch.Tensor], report: ImportReport,
                 dialects: set[str]) -> None:
    """One file module of another kind than plain LoRA (LoKr, LoHa, full diff, DoRA, ...; lora.kinds). On one live
    module it is kept whole, checked against the model's weight. On a fused native module (BFL qkv, Flux.1's
    linear1) or one whose output halves trade places (final_layer.adaLN_modulation.1), the kind's update is worked
    out over the native weight (the kind's rule, LayerSpec.delta) and its rows go to the live modules as full
    diffs, which is exact at every strength; the report's `split` says so. Broken layers (half a kind's tensors,
    rows that do not split into the model's parts) go to `report.invalid`, one line each."""
    target = _target(family, mod, report, dialects)
    if target is None:
        return
    live = info is not None and info.live
    if live and any(n not in info.modules for n in target.live):
        report.not_found.append(f"{COMPONENT}.{mod}")
        return
    names = target.live
    if len(names) == 1 and not target.swap:  # the kind whole, on its one live module
        mtype, wshape = info.modules[names[0]] if live else ("", ())
        spec = kind_spec(source, mod, kind, g, factors, None, mtype, wshape, live)
        if isinstance(spec, list):
            report.invalid += spec
            return
        _put_layer(out, report, names[0], spec)
        return
    spec = kind_spec(source, mod, kind, g, factors, None, "Linear", None, False)  # the factors among themselves
    if isinstance(spec, list):
        report.invalid += spec
        return
    if not target.swap and _split_kind(source, mod, spec, names, info, live, out, report):
        return
    weight = None
    if spec.weight_dependent:  # DoRA, OFT, ...: the update needs the native (fused) weight
        if not live or info.weight is None:
            report.unsupported.append(f"{mod} ({spec.label} over {', '.join(n.rsplit('.', 1)[-1] for n in names)}: "
                                      "its update depends on the base weights; give the model (models=...) to read "
                                      "it)")
            return
        weight = torch.cat([info.weight(n).detach().float() for n in names], 0)
        problems = spec.check(tuple(weight.shape))
        if problems:
            report.invalid += [f"{mod}: {p}" for p in problems]
            return
    if weight is not None and target.swap and swaps(*weight.shape):
        weight = _swap_halves(weight)  # the native layout of the live weight
    delta, bias = spec.delta(weight), spec.bias_delta()
    swap = target.swap and swaps(*delta.shape)
    if swap:  # native (shift, scale) rows -> the live (scale, shift)
        delta, bias = _swap_halves(delta), (_swap_halves(bias) if bias is not None else None)
    try:
        sizes = _part_rows(f"{source}: {mod}", names, info, delta.shape[0], delta.shape[1]) if len(names) > 1 \
            else [delta.shape[0]]
    except ValueError as e:
        report.invalid.append(f"{mod}: {spec.label} update {tuple(delta.shape)}: {e}")
        return
    done = []
    for name, rows, d, b in zip(names, sizes, delta.split(sizes, 0),
                                bias.split(sizes, 0) if bias is not None else [None] * len(sizes)):
        if not d.any() and (b is None or not b.any()):
            continue  # this part is not adapted in the file (zero rows)
        mtype, wshape = info.modules[name] if live else ("Linear", (rows, d.shape[1]))
        full = {"diff": d.reshape(wshape).clone()} | ({"diff_b": b.clone()} if b is not None else {})
        _put_layer(out, report, name, LayerSpec(None, None, 1.0, "lora", "full", full))
        done.append(name.rsplit(".", 1)[-1] if len(names) > 1 else name)
    how = "computed with the model's weights, " if weight is not None else ""
    what = "output halves swapped" if swap else "rows split"
    report.split.append(f"{mod} -> {', '.join(done)} ({spec.label} over the native weight, {how}{what}, applied as "
                        "full diffs)")


def _split_kind(source: str, mod: str, spec: LayerSpec, names: tuple[str, ...], info: ComponentInfo | None,
                live: bool, out: dict[str, torch.Tensor], report: ImportReport) -> bool:
    """A kind on a fused native module, kept as that kind on each live part where its algebra splits by rows
    (LayerSpec.split_rows: LoRA+DoRA, LoHa, LoKr, full diff, (IA)^3): the factors stay about the size of the
    file's instead of a dense diff per part (gigabytes for a real Flux.1 LoKr). False when the kind does not split
    there (the caller applies it as full diffs). A DoRA or (IA)^3 part runs on its own rows of the weight, so no
    weight is needed here."""
    shape = kinds.update_shape(spec.kind, spec.all_factors)
    if shape is None:
        return False
    try:
        sizes = _part_rows(f"{source}: {mod}", names, info, shape[0], math.prod(shape[1:]))
    except ValueError as e:
        report.invalid.append(f"{mod}: {spec.label} update {tuple(shape)}: {e}")
        return True
    parts = spec.split_rows(sizes)
    if parts is None:
        return False
    windows = sum(kinds.LOKR_ROWS in p.factors for p in parts)  # LoKr parts that cut through w2's rows
    how = f"{spec.label} split by rows, kept as {spec.label}" + (
        f"; {windows} part(s) as a window of kron(w1, w2)" if windows else "")
    whole = spec.all_factors
    done = []
    for name, part in zip(names, parts):
        own = [t for n, t in part.all_factors.items() if n in whole and t is not whole[n]]  # its slices
        if not part.weight_dependent and not any(t.any() for t in own):
            continue  # this part is not adapted in the file (its rows of the split factors are zero)
        if live:
            problems = part.check(info.modules[name][1])
            if problems:
                report.invalid += [f"{mod} -> {name}: {p}" for p in problems]
                continue
        _put_layer(out, report, name, part)
        done.append(name.rsplit(".", 1)[-1])
    report.split.append(f"{mod} -> {', '.join(done)} ({how})")
    return True


def _put_layer(out: dict[str, torch.Tensor], report: ImportReport, name: str, spec: LayerSpec) -> None:
    out.update({f"{COMPONENT}.{k}": t for k, t in layer_tensors(name, spec).items()})
    report.matched.append(f"{COMPONENT}.{name}")
    report.kinds[spec.label] = report.kinds.get(spec.label, 0) + 1
