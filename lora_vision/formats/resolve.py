"""Map the module names a file uses (diffusers, LDM/SGM, kohya keys, transformers-4 CLIP) to live module names.

Every mapping is a lookup over the names the target model really has (or a standard layout when no model is given),
built by applying the forward rules of `naming` to each known name. Nothing is inverted by string replacement.
"""

from __future__ import annotations

import functools
import re
from typing import Iterable, Mapping

from . import naming
from .common import ComponentInfo, standard_unet_info

KOHYA_TE_PREFIXES = {"lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
COMFY_CLIP = {"clip_l": "text_encoder", "clip_h": "text_encoder", "clip_g": "text_encoder_2"}
_TE_LAYER = re.compile(r"(?:^|\.|_)layers[._](\d+)[._]")


class NameResolver:
    """Lookups from file-side names to (component, live module name) for the SD components."""

    def __init__(self, infos: Mapping[str, ComponentInfo]) -> None:
        self.infos = dict(infos)
        self.unet_names: dict[str, str] = {}  # any accepted UNet spelling -> diffusers (live) name
        self.kohya: dict[str, tuple[str, str]] = {}  # kohya module key -> (component, live name)
        self.te_names: dict[str, dict[str, str]] = {}  # component -> file (v4) name -> live name
        unet = self.infos.get("unet")
        if unet is not None:
            names, kohya = _unet_tables(unet.family) if not unet.live and unet.family else _build_unet_tables(unet)
            self.unet_names.update(names)
            self.kohya.update(kohya)
        for comp in ("text_encoder", "text_encoder_2"):
            info = self.infos.get(comp)
            if info is None:
                continue
            table = {naming.te_to_file(n): n for n in (*info.modules, *info.norms)}
            self.te_names[comp] = table
            prefixes = [p for p, c in KOHYA_TE_PREFIXES.items() if c == comp]
            for file_name, live in table.items():
                for p in prefixes:
                    self.kohya.setdefault(naming.kohya_key(p, file_name), (comp, live))

    def info(self, comp: str) -> ComponentInfo | None:
        """The description of component `comp`, if the target has it."""
        return self.infos.get(comp)

    def te_live(self, comp: str, file_name: str) -> str | None:
        """Live name of a text-encoder module given with or without `text_model.`."""
        table = self.te_names.get(comp, {})
        return table.get(naming.te_to_file(file_name))


def _build_unet_tables(unet: ComponentInfo) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    """(accepted UNet spelling -> live name, kohya key -> ("unet", live name)) for one UNet description."""
    names: dict[str, str] = {}
    kohya: dict[str, tuple[str, str]] = {}
    bmap = naming.unet_block_map(unet.unet_config) if unet.unet_config else None
    for n in (*unet.modules, *unet.norms):
        names[n] = n
        kohya[naming.kohya_key("lora_unet", n)] = ("unet", n)
        kohya[naming.kohya_key("lycoris", n)] = ("unet", n)
        if bmap is not None:
            try:
                ldm = naming.diffusers_to_ldm(n, bmap)
            except KeyError:
                continue
            names["diffusion_model." + ldm] = n
            kohya[naming.kohya_key("lora_unet", ldm)] = ("unet", n)
    return names, kohya


@functools.lru_cache(maxsize=4)
def _unet_tables(layout: str) -> tuple[dict[str, str], dict[str, tuple[str, str]]]:
    # Standard layouts never change: build their lookups once (callers copy them into their own dicts).
    return _build_unet_tables(standard_unet_info(layout))


def te_layer_count(keys: Iterable[str]) -> int:
    """1 + the highest CLIP encoder layer index in `keys` (0 when none)."""
    idx = [int(m.group(1)) for k in keys for m in [_TE_LAYER.search(k)] if m]
    return max(idx) + 1 if idx else 0


def synthetic_te_info(comp: str, num_layers: int) -> ComponentInfo:
    """A CLIP text encoder with `num_layers` layers named as the installed transformers names it (shapes unknown)."""
    has = naming.default_has_text_model(comp)
    mods = {naming.te_to_live(n, has): ("Linear", ()) for n in naming.clip_file_names(num_layers)}
    norms = {naming.te_to_live(n, has): ("LayerNorm", ()) for n in naming.clip_norm_names(num_layers)}
    return ComponentInfo(mods, has_text_model=has, norms=norms)


def guess_unet_layout(candidates: Iterable[str], kohya_keys: bool) -> str:
    """The standard layout ("sd1" or "sdxl") whose names match the most of `candidates`."""
    cands = set(candidates)
    best, best_n = "sd1", -1
    for layout in ("sd1", "sdxl"):
        r = NameResolver({"unet": standard_unet_info(layout)})
        table = r.kohya if kohya_keys else r.unet_names
        n = sum(1 for c in cands if c in table)
        if n > best_n:
            best, best_n = layout, n
    return best


def default_infos(unet_layout: str | None, te_layers: Mapping[str, int]) -> dict[str, ComponentInfo]:
    """ComponentInfos for a file loaded without models: a standard UNet layout and synthetic CLIP encoders."""
    out: dict[str, ComponentInfo] = {}
    if unet_layout:
        out["unet"] = standard_unet_info(unet_layout)
    for comp, n in te_layers.items():
        if n:
            out[comp] = synthetic_te_info(comp, n)
    return out

