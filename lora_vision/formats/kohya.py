"""The kohya format (`lora_unet_...`, `lora_te[12]_...`) that A1111, ComfyUI and kohya sd-scripts load.

Import accepts both UNet naming styles (diffusers and LDM/SGM), `lycoris_` (SimpleTuner) and ComfyUI's generic
`diffusion_model.<ldm>` / `text_encoders.<clip>.transformer.<hf>` names. Export follows formats.md section 8
("Export (UI-targeted)"); see `export_kohya`.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from ..io import AdapterFileError
from .common import ComponentInfo, ImportReport, alpha_value, fit_pair, is_unsupported, put
from .resolve import (COMFY_CLIP, KOHYA_TE_PREFIXES, NameResolver, default_infos, guess_unet_layout,
                      te_layer_count)

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lycoris_")
COMFY_PREFIXES = ("diffusion_model.", "text_encoders.")
_DOWN = ("lora_down.weight", "lora_A.weight")
_UP = ("lora_up.weight", "lora_B.weight")
_COMFY_TE = re.compile(r"^text_encoders\.(clip_[lgh])\.transformer\.(.+)$")
_TENSOR_SUFFIX = re.compile(r"\.(lora_(?:down|up|A|B)\.weight|alpha|lora_mid\.weight|dora_scale|scale|bias|"
                            r"hada_\w+|lokr_\w+|diff(?:_b)?|w_norm|b_norm|reshape_weight|oft_\w+)$")


def is_kohya_key(key: str) -> bool:
    """True for keys in the kohya / LyCORIS / ComfyUI-generic naming."""
    return key.startswith(KOHYA_PREFIXES) or key.startswith(COMFY_PREFIXES)


def _split(key: str) -> tuple[str, str]:
    """(module key, tensor suffix). kohya module keys have no dots; ComfyUI generic ones do."""
    if key.startswith(COMFY_PREFIXES):
        m = _TENSOR_SUFFIX.search(key)
        return (key[: m.start()], m.group(1)) if m else (key, "")
    mod, _, suffix = key.partition(".")
    return mod, suffix


def _infos_for(groups: Mapping[str, dict], infos: Mapping[str, ComponentInfo] | None) -> dict[str, ComponentInfo]:
    if infos:
        return dict(infos)
    unet_keys = [k for k in groups if k.startswith(("lora_unet_", "lycoris_"))]
    comfy_unet = [k for k in groups if k.startswith("diffusion_model.")]
    layout = None
    if unet_keys or comfy_unet:
        layout = guess_unet_layout(unet_keys or comfy_unet, kohya_keys=bool(unet_keys))
    te1 = [k for k in groups if k.startswith(("lora_te_", "lora_te1_")) or re.match(r"text_encoders\.clip_[lh]", k)]
    te2 = [k for k in groups if k.startswith("lora_te2_") or k.startswith("text_encoders.clip_g")]
    return default_infos(layout, {"text_encoder": te_layer_count(te1), "text_encoder_2": te_layer_count(te2)})


def import_kohya(tensors: Mapping[str, torch.Tensor], infos: Mapping[str, ComponentInfo] | None = None,
                 source: str = "<tensors>") -> tuple[dict[str, torch.Tensor], ImportReport]:
    """kohya/LyCORIS/ComfyUI tensors -> canonical adapter tensors (component-prefixed, live names) and a report.

    `infos` describes the target models (see `describe_models`); without it, standard layouts are assumed.
    """
    report = ImportReport("kohya")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not is_kohya_key(key):
            report.unused.append(key)
            continue
        mod, suffix = _split(key)
        groups.setdefault(mod, {})[suffix] = t
    resolver = NameResolver(_infos_for(groups, infos))
    out: dict[str, torch.Tensor] = {}
    for mod, g in groups.items():
        scale = g.pop("scale", None)  # A1111: `scale` overrides alpha / r
        bad = sorted(s for s in g if is_unsupported(s))
        if bad:
            # A LoHa/LoKr/DoRA/Tucker module cannot be represented as plain LoRA: skip it whole, say so.
            report.unsupported += [f"{mod}.{s}" for s in bad]
            continue
        down = next((g[s] for s in _DOWN if s in g), None)
        up = next((g[s] for s in _UP if s in g), None)
        known = {*_DOWN, *_UP, "alpha"}
        report.unused += [f"{mod}.{s}" for s in g if s not in known]
        if down is None or up is None:
            have = ", ".join(sorted(g))
            raise AdapterFileError(f"{source}: module {mod} has only [{have}]; a LoRA module needs lora_down and "
                                   "lora_up (an orphan alpha or half a pair means the file is broken)")
        target = _resolve(mod, resolver)
        if target is None:
            report.not_found.append(mod)
            continue
        comp, live = target
        info = resolver.info(comp)
        kind, wshape = info.modules.get(live, ("", ()))
        if not info.live:
            kind = "Conv2d" if down.dim() == 4 else "Linear"
        a, b = fit_pair(f"{source}: {mod}", kind, wshape or None, down, up, info.live)
        alpha = alpha_value(f"{source}: {mod}", g.get("alpha"), a.shape[0])
        if scale is not None:
            alpha = alpha_value(f"{source}: {mod}.scale", scale, 1) * a.shape[0]
        put(out, comp, live, a, b, alpha)
        report.matched.append(f"{comp}.{live}")
    return out, report


def _resolve(mod: str, r: NameResolver) -> tuple[str, str] | None:
    if mod in r.kohya:
        return r.kohya[mod]
    if mod.startswith("diffusion_model."):
        live = r.unet_names.get(mod)
        return ("unet", live) if live else None
    m = _COMFY_TE.match(mod)
    if m:
        comp = COMFY_CLIP[m.group(1)]
        live = r.te_live(comp, m.group(2))
        return (comp, live) if live else None
    # lora_te1_ on a single-encoder model (A1111 and ComfyUI accept it): already in the table via the prefixes.
    return None


__all__ = ["KOHYA_PREFIXES", "KOHYA_TE_PREFIXES", "import_kohya", "is_kohya_key"]
