"""The text-encoder part of a DiT LoRA file: the family's own encoders (T5, Qwen, Mistral; dit_tables.TEXT_ENCODERS)
read here by the model's module names, CLIP read by the SD importers; and written for ComfyUI
(`text_encoders.<encoder>.transformer.<name>`) by the DiT kohya export."""

from __future__ import annotations

import re
from typing import Mapping

import torch

from ..adapter import Adapter
from ..io import AdapterFileError
from ..lora import spec as layer_spec
from ..lora.kinds import kind_of
from ..lora.ops import layer_tensors
from ..lora.spec import LayerSpec
from .common import ComponentInfo, ImportReport, alpha_value, fit_pair, put
from .diffusers import _alpha_rule, peft_alpha
from .dit_detect import FILE_SUFFIX, split_key
from .dit_tables import FLUX2_QWEN3, TEXT_ENCODERS
from .naming import comfy_llm_name, kohya_lookup, llm_aliases
from .detect import classify_keys
from .diffusers import import_diffusers
from .kohya import import_kohya, kind_factors, kind_spec, kind_tensors


def import_family_encoders(raw: Mapping[str, torch.Tensor], family: str, infos: Mapping[str, ComponentInfo] | None,
                           source: str, out: dict[str, torch.Tensor], report: ImportReport,
                           metadata: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The family's non-CLIP text encoders (T5, Qwen, Mistral; dit_tables.TEXT_ENCODERS) read into their pipeline
    component by the model's own module names; returns the keys left for the CLIP importers.

    Three spellings: ComfyUI's `text_encoders.<encoder>.transformer.<name>`, kohya's `lora_te[N]_<name with
    underscores>`, and (for the encoders without CLIP) diffusers / PEFT `text_encoder.<name>`. The name may be any
    of the encoder's spellings (naming.llm_aliases: transformers 5 and older module paths). kohya's underscored
    names need the model (its module names) to be read back; without it they are reported not found. A module
    without an alpha tensor takes its alpha from diffusers' `lora_adapter_metadata` when the file has one.

    Every adapter kind (LoHa, LoKr, full diff, DoRA, ...; lora.kinds) goes through the same names, its factors
    spelt as LyCORIS writes them (`<module>.lokr_w1`, `.hada_w1_a`, `.diff`, `.dora_scale`): kept whole on its
    module and checked against the live weight; a layer whose factors do not make that weight's update (half a
    kind's tensors, another model size, a fused weight such as Qwen2.5-VL's vision `attn.qkv` given a part's
    rows) goes to `report.invalid`, one line each."""
    table = TEXT_ENCODERS.get(family, {})
    lookups: dict[tuple[str, str], dict[str, str]] = {}  # (component, kohya prefix or "") -> file name -> live
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    files: dict[tuple[str, str], str] = {}  # (component, live or "?" + file name) -> the file's module key
    rest: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        s = split_key(key)
        hit = _spelling(s[0], table) if s else None
        if hit is None:
            rest[key] = t
            continue
        comp, kohya, name = hit
        info = (infos or {}).get(comp)
        if info is None or not info.live:
            live = "?" + name if kohya else name
        else:
            if (comp, kohya) not in lookups:
                lookups[comp, kohya] = _lookup(info, kohya)
            live = lookups[comp, kohya].get(name, "?" + name)
        groups.setdefault((comp, live), {})[s[1]] = t
        files[comp, live] = s[0]
    rules = {c: _alpha_rule(metadata or {}, c) for c in {c for c, _ in groups}}
    for (comp, name), g in groups.items():
        label = f"{comp}.{name.lstrip('?')}"
        factors = kind_factors({FILE_SUFFIX.get(n, n): t for n, t in g.items()})
        kind = kind_of(factors, factors)
        if kind is not None and (kind != "lora" or set(factors) - {"A", "B"}):
            if name.startswith("?"):
                report.not_found.append(label)
                continue
            _import_kind(files[comp, name], comp, name, kind, g, factors, (infos or {}).get(comp), source, out,
                         report)
            continue
        if "down" not in g or "up" not in g:
            raise AdapterFileError(f"{source}: {label} has only [{', '.join(sorted(g))}]; a LoRA module needs "
                                   "lora_down and lora_up (an orphan alpha or half a pair means the file is broken)")
        info = (infos or {}).get(comp)
        if name.startswith("?"):
            report.not_found.append(label)
            continue
        kind, wshape = info.modules[name] if info is not None and info.live else ("Linear", None)
        a, b = fit_pair(f"{source}: {label}", kind, wshape, g["down"], g["up"], info is not None and info.live)
        alpha = alpha_value(f"{source}: {label}", g.get("alpha"), a.shape[0])
        if g.get("alpha") is None and rules[comp] is not None:
            alpha = peft_alpha(rules[comp][0], name, a.shape[0])
        put(out, comp, name, a, b, alpha)
        report.matched.append(label)
    return rest


def _import_kind(mod: str, comp: str, name: str, kind: str, g: Mapping[str, torch.Tensor],
                 factors: dict[str, torch.Tensor], info: ComponentInfo | None, source: str,
                 out: dict[str, torch.Tensor], report: ImportReport) -> None:
    """One encoder module of another kind than plain LoRA (file module `mod`, live module `name`): checked against
    the live weight when the model is given and stored whole; a broken one goes to `report.invalid`."""
    live = info is not None and info.live
    mtype, wshape = info.modules[name] if live else ("", ())
    spec = kind_spec(source, mod, kind, g, factors, None, mtype, wshape, live)
    if isinstance(spec, list):
        report.invalid += spec
        return
    out.update({f"{comp}.{k}": t for k, t in layer_tensors(name, spec).items()})
    report.matched.append(f"{comp}.{name}")
    report.kinds[spec.label] = report.kinds.get(spec.label, 0) + 1


def _spelling(module: str, table: Mapping[str, str]) -> tuple[str, str, str] | None:
    """(component, kohya prefix or "", module name in the file) of a text-encoder file module, or None when the
    family's table does not know its spelling. Table keys: ComfyUI encoder names (`t5xxl`), kohya prefixes
    (ending in `_`) and diffusers component prefixes (ending in `.`)."""
    m = re.match(r"text_encoders\.([^.]+)\.transformer\.(.+)$", module)
    if m and m.group(1) in table:
        return table[m.group(1)], "", m.group(2)
    for p, comp in table.items():
        if p.endswith("_") and module.startswith(p):
            return comp, p, module
        if p.endswith(".") and module.startswith(p):
            return comp, "", module[len(p):].removeprefix("base_model.model.")
    return None


def _lookup(info: ComponentInfo, kohya: str) -> dict[str, str]:
    """Every spelling of every module of a live encoder -> its live name (kohya keys when `kohya` is a prefix)."""
    spellings = {alias: live for live in info.modules for alias in llm_aliases(live)}
    if not kohya:
        return spellings
    return {k: spellings[alias] for k, alias in kohya_lookup(kohya.rstrip("_"), spellings).items()}


def import_clip_encoders(raw: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                          infos: Mapping[str, ComponentInfo] | None, source: str
                          ) -> tuple[dict[str, torch.Tensor], ImportReport]:
    """The CLIP text-encoder part of a DiT file, read by the SD importers."""

    te_infos = {c: i for c, i in (infos or {}).items() if c.startswith("text_encoder")} or None
    if classify_keys(list(raw), metadata, source) == "kohya":
        return import_kohya(raw, te_infos, source)
    return import_diffusers(raw, metadata, te_infos, source)


def encoder_components(family: str) -> list[str]:
    """The pipeline components of the family's own (non-CLIP) text encoders, which the DiT kohya export writes."""
    return sorted(set(TEXT_ENCODERS.get(family, {}).values()))


def family_encoder_tensors(adapter: Adapter, family: str, text_encoder: str | None = None
                           ) -> tuple[dict[str, torch.Tensor], list[LayerSpec]]:
    """(tensors, the layers of other kinds than plain LoRA) of the adapter's text encoders of `family` in the
    spelling ComfyUI reads for every encoder: `text_encoders.<encoder>.transformer.<ComfyUI's module name>`
    (naming.comfy_llm_name), each layer as LyCORIS writes it (kohya.kind_tensors: lora_down / lora_up / alpha for
    LoRA, `lokr_w1`, `hada_w1_a`, `diff`, `dora_scale`, ... for the other kinds) with its own alpha, so the file
    reads back exactly. `text_encoder` names ComfyUI's encoder (Flux.2: `mistral3_24b` for dev, `qwen3_4b` /
    `qwen3_8b` for klein 4B / 9B; None: told from the module names and widths, a Qwen3 of another width being
    written as qwen3_4b). A part of a fused projection (q of Qwen2.5-VL's vision `attn.qkv`) has no such spelling
    and is refused."""
    tensors: dict[str, torch.Tensor] = {}
    kinds: list[LayerSpec] = []
    for comp in encoder_components(family):
        layers = adapter.layers(comp)
        if not layers:
            continue
        enc = _comfy_encoder(family, comp, layers, text_encoder)
        for key, spec in layers.items():
            mod, part = layer_spec.split_key(key)
            if part and mod.endswith("qkv"):  # T5's `SelfAttention.q` is a module of its own, not a part
                raise ValueError(f"{comp}.{mod} ({part} part): a part of a fused projection has no ComfyUI "
                                 f"spelling (ComfyUI adapts {mod} whole); adapt the whole module instead")
            name = f"text_encoders.{enc}.transformer.{comfy_llm_name(key)}"
            if any(k.startswith(name + ".") for k in tensors):
                raise ValueError(f"two modules of {comp} map to the ComfyUI key {name}")
            tensors.update(kind_tensors(name, spec))
            if not spec.is_plain:
                kinds.append(spec)
    return tensors, kinds


def _comfy_encoder(family: str, comp: str, layers: Mapping[str, LayerSpec], given: str | None) -> str:
    """ComfyUI's name of the `comp` encoder of `family` (dit_tables.TEXT_ENCODERS): `given` when it is one, the
    only one, or for Flux.2 Mistral 3 (told by its `language_model` modules) or Qwen3 (by its hidden width)."""
    names = [k for k, c in TEXT_ENCODERS[family].items() if c == comp and not k.endswith(("_", "."))]
    if given is not None:
        if given not in names:
            raise ValueError(f"text_encoder={given!r}: ComfyUI's {comp} of this family is one of {names}")
        return given
    if len(names) == 1:
        return names[0]
    if any("language_model." in k for k in layers):
        return "mistral3_24b"
    widths = {_hidden_width(k, spec) for k, spec in layers.items()} - {None}
    return next((FLUX2_QWEN3[w] for w in widths if w in FLUX2_QWEN3), FLUX2_QWEN3[min(FLUX2_QWEN3)])


def _hidden_width(key: str, spec: LayerSpec) -> int | None:
    """The hidden width of a decoder layer's module (the input of q/k/v/gate/up, the output of o/down), or None."""
    inputs = key.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    if not inputs and not key.endswith(("o_proj", "down_proj")):
        return None
    if spec.A is not None:
        return int(spec.A.shape[1] if inputs else spec.B.shape[0])
    if spec.weight_dependent:
        return None
    return int(spec.delta().shape[1 if inputs else 0])
