"""Export of DiT transformer adapters in the native (kohya / ComfyUI / Forge) spelling of each family:
`lora_unet_<native name>`, fused where the native model fuses (formats/dit_fused.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..adapter import Adapter
from ..io import write_safetensors
from ..lora.ops import layer_tensors, parse_canonical
from ..lora.kinds import LOKR_ROWS
from ..lora.spec import LayerSpec, split_key
from ..metadata import AdapterMetadata
from .dit_detect import _u, declared_family, family_of_modules, family_of_names
from .dit_fused import _fuse, _swap_halves, _swaps, join_lokr
from .dit_tables import COMPONENT, FAMILIES, Family
from .kohya import _output_dtype, kind_tensors, lycoris_args
from .diffusers import provenance
from .dit_text import encoder_components, family_encoder_tensors

def _native_rows(fam: Family) -> list[tuple[str, str, tuple[str, ...], bool]]:
    """(group live prefix or "", native name template, live name templates, swap) for every row of the family."""
    rows = [("", r.native, r.live, r.swap) for r in fam.top]
    for g in fam.groups:
        rows += [(g.live, f"{g.native}.{{}}.{r.native}", tuple(f"{g.live}.{{}}.{x}" for x in r.live), r.swap)
                 for r in g.rows]
    return rows


def dit_family(adapter: Adapter, family: str | None = None) -> str:
    """The family to export for: `family`, else the adapter's metadata, else its module names."""
    names = {split_key(k)[0] for k in adapter.layers(COMPONENT)}
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


def dit_kohya_tensors(adapter: Adapter, family: str | None = None, dtype: torch.dtype | None = None,
                      text_encoder: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The transformer of `adapter` as kohya / ComfyUI keys (`lora_unet_<native name>`, fused where the native
    model fuses) plus the ss_/modelspec metadata that names the family; the family's own text encoders (Qwen,
    Mistral, T5; not CLIP) as ComfyUI reads them (`text_encoders.<encoder>.transformer.<name>`, every kind kept;
    dit_text.family_encoder_tensors, where `text_encoder` is explained).

    Layers of other kinds (LoKr, LoHa, DoRA, full diff, ...; lora.kinds) keep their kind, written as LyCORIS writes
    them (kohya.kind_tensors): under `lora_unet_<native name>` when the native module is the live one, else (a part
    of a fused qkv / linear1, or a layer whose native output halves are swapped) under SimpleTuner's
    `lycoris_<diffusers name>`, which ComfyUI maps onto its slice of the fused weight; no kind is fused, so the
    file reads back exactly."""

    fam = dit_family(adapter, family)
    adapter = adapter.plain()
    layers = adapter.layers(COMPONENT)
    kinds = {k: spec for k, spec in layers.items() if not spec.is_plain}
    tensors: dict[str, torch.Tensor] = {}
    if len(kinds) < len(layers):
        plain = Adapter({f"{COMPONENT}.{k}": t for key, spec in layers.items() if spec.is_plain
                         for k, t in layer_tensors(key, spec).items()}, adapter.metadata)
        for native, (a, b, alpha) in fuse_tensors(plain, fam).items():
            key = "lora_unet_" + _u(native)
            tensors[f"{key}.lora_down.weight"] = a
            tensors[f"{key}.lora_up.weight"] = b
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
    natives = _one_to_one(FAMILIES[fam])
    joined, used = _joined_lokrs(kinds, FAMILIES[fam])
    tensors.update(joined)
    for live, spec in kinds.items():
        if live in used:
            continue
        native = natives(live)
        key = "lora_unet_" + _u(native) if native is not None else "lycoris_" + _u(live)
        tensors.update(kind_tensors(key, spec))
    te_tensors, te_kinds = family_encoder_tensors(adapter, fam, text_encoder)
    tensors.update(te_tensors)
    written = list(kinds.values()) + te_kinds  # the layers of other kinds, for LyCORIS' metadata
    want = _output_dtype({k: v for k, v in tensors.items() if v.is_floating_point()}, dtype)
    tensors = {k: (v.to(want) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    f = FAMILIES[fam]
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": f.base_version,
            "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": f.architecture,
            **AdapterMetadata(base=fam).to_strings()}
    if written:  # LyCORIS' own metadata, as the SD kohya export writes it
        meta["ss_network_module"] = "lycoris.kohya"
        meta["ss_network_args"] = json.dumps(lycoris_args(written))
    return tensors, meta


def _joined_lokrs(kinds: Mapping[str, LayerSpec], fam: Family) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The LoKr of each fused native module whose parts are windows of it (read from a BFL file whose w2 rows do
    not divide the parts, lora.kinds.split_rows), put back together and written under its native name
    (`lora_unet_<native>`), as the file had it; no other tool reads a window. Returns the tensors and the live
    names they cover; a window no fused module takes is a ValueError."""
    windows = {k for k, sp in kinds.items() if LOKR_ROWS in sp.factors}
    tensors: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for _group, native_t, live_t, _swap in (_native_rows(fam) if windows else []):
        if len(live_t) < 2:
            continue
        for name in sorted(windows - used):
            for template in live_t:
                m = _live_pattern(template).fullmatch(name)
                if m:
                    lives = [t.format(*m.groups()) for t in live_t]
                    native = native_t.format(*m.groups())
                    spec = join_lokr([kinds.get(n) for n in lives], lives, native)
                    tensors.update(kind_tensors("lora_unet_" + _u(native), spec))
                    used.update(lives)
                    break
    if windows - used:
        raise ValueError(f"LoKr window(s) {sorted(windows - used)[:3]} belong to no fused {fam.label} module; "
                         "they cannot be written")
    return tensors, used


def _live_pattern(template: str) -> re.Pattern:
    """A live-name template of the family tables (`transformer_blocks.{}.attn.to_q`) as a regex, the block index a
    group."""
    return re.compile(re.escape(template).replace(r"\{\}", r"(\d+)"))


def _one_to_one(fam: Family) -> Callable[[str], str | None]:
    """live module name -> its native name, for the rows where one native module is one live module with the same
    output layout (not fused, not swapped); None for the others."""
    rows = []
    for _group, native_t, live_t, swap in _native_rows(fam):
        if len(live_t) == 1 and not swap:
            rows.append((_live_pattern(live_t[0]), native_t))

    def native(live: str) -> str | None:
        for pattern, native_t in rows:
            m = pattern.fullmatch(live)
            if m:
                return native_t.format(*m.groups())
        return None
    return native


def export_dit_kohya(adapter: Adapter, path: str | Path, family: str | None = None, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, str] | None = None, title: str | None = None,
                     trigger_phrase: str | None = None, text_encoder: str | None = None) -> Path:
    """Write the transformer adapter as the file ComfyUI, Forge and kohya read for its family (see
    `dit_kohya_tensors`), with the family's own text encoders (Qwen, Mistral, T5); CLIP encoders are not written
    (export them separately). `title` and `trigger_phrase` go to modelspec.title / ss_output_name and
    modelspec.trigger_phrase, as for the SD kohya export."""

    fam = dit_family(adapter, family)
    comps = adapter.components()
    others = [c for c in comps if c not in (COMPONENT, *encoder_components(fam))]
    if COMPONENT not in comps or others:
        raise ValueError(f"the DiT kohya export holds a transformer adapter and the {FAMILIES[fam].label} text "
                         f"encoder(s) {encoder_components(fam)}; this one has components {comps}"
                         + (f" ({others}: export them separately)" if others else ""))
    tensors, meta = dit_kohya_tensors(adapter, fam, dtype, text_encoder)
    out = provenance(adapter.metadata)
    out.update(meta)
    if title:
        out["modelspec.title"] = out["ss_output_name"] = title
    if trigger_phrase:
        out["modelspec.trigger_phrase"] = trigger_phrase
    out.update(metadata or {})
    return write_safetensors(path, tensors, out)
