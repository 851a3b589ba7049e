"""AdapterMetadata: the typed view of an adapter file's string metadata (safetensors stores only strings).

Our keys live under `lora_vision.`; this module is the one place that spells them. Every other key (kohya's ss_*,
modelspec.*, the recipes' own) is kept as it is in `extra`.

The scaling rule of each layer (see lora.spec) is `scaling`: {component or component.module[.part]: rule}, only
for layers whose rule is not the plain "lora"; a component entry covers all its layers. Files written before the
rule was recorded per layer carry it in the training config (`lora_vision.config.<component>`: rslora); that is
read when `scaling` is absent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

PREFIX = "lora_vision."
FORMAT_VERSION = "1"
_CONFIG = PREFIX + "config."

# How the strings of our fields read (the strings on disk stay as they were written before these fields existed).
_TEXT = ("format", "base", "source_format", "transformers_version", "base_model", "trigger_phrase", "family", "mode",
         "top1", "resized", "init")
_INT = ("rank", "steps", "merged_from")
_NUMBER = ("alpha",)
_FLAG = ("extracted",)
_JSON = ("targets", "training_config", "classes", "preprocessing")

# Keys of our files that are not adapters.
FORMAT_KEY = PREFIX + "format"
"""Marks our native adapter files (see AdapterMetadata.format)."""
PROBE_KEY = PREFIX + "probe"
"""The quality probe file of the SD recipe's metrics (training/sd/metrics.py): JSON {"width": ...}."""
MODEL_SOURCE_KEY = PREFIX + "source"
"""A model saved by models.vit: where it was loaded from (hub id or path)."""
FUSED_LAYOUT_KEY = PREFIX + "layout"
"""A fused pipeline written as one file (pipeline.fuse): the layout of its keys ("diffusers")."""
FUSED_FROM_KEY = PREFIX + "merged"
"""The same file: the adapters folded in, JSON [{"source", "strength", "te_strength"}, ...]."""


@dataclass(frozen=True)
class AdapterMetadata:
    """What an adapter file says about itself."""

    format: str | None = None
    """Version of our native layout; set only on native files (its absence marks foreign files)."""
    components: tuple[str, ...] = ()
    """Components with LoRA weights."""
    base: str | None = None
    """Base model family (sd1, sd2, sd2-v, sdxl, hf-vit, ...) when known; the ViT recipe writes the model's hub id
    or path here."""
    source_format: str | None = None
    """The format a file was imported from (kohya, diffusers, peft, lora_vision)."""
    transformers_version: str | None = None
    """transformers version of the live module names."""
    configs: Mapping[str, Any] = field(default_factory=dict)
    """Training config (LoRAConfig.to_dict()) per component."""
    scaling: Mapping[str, str] | None = None
    """Scaling rule per component or layer when not "lora"; None: not recorded (older files)."""
    base_model: str | None = None
    """Name or path of the base model the adapter was trained on."""
    trigger_phrase: str | None = None
    """The prompt that calls up what was trained (DreamBooth's instance prompt)."""
    rank: int | None = None
    """The recipe's LoRA rank."""
    alpha: float | None = None
    """The recipe's LoRA alpha."""
    targets: Mapping[str, Any] | None = None
    """The recipe's target modules per component."""
    steps: int | None = None
    """Training steps the recipe ran."""
    training_config: Mapping[str, Any] | None = None
    """The recipe's resolved configuration."""
    family: str | None = None
    """Model family of a ViT adapter (hf-vit, torchvision-vit, timm-vit)."""
    mode: str | None = None
    """How a ViT was trained (lora, full, head)."""
    classes: list[str] | None = None
    """Class names, in the order of the classifier's outputs."""
    preprocessing: Mapping[str, Any] | None = None
    """Classifiers: the input preprocessing the adapter was trained and evaluated with
    (lora_vision.data.preprocessing.Preprocessing.to_dict()); None: not recorded."""
    top1: str | None = None
    """Last validation top-1 accuracy of a ViT run, as written ("" when none was measured)."""
    init: str | None = None
    """How a ViT adapter's factors were initialised when not the default (pissa, olora); the file holds the plain
    update on the original base either way."""
    resized: str | None = None
    """How `resize` chose the ranks (rank=..., energy=..., per-layer ranks)."""
    merged_from: int | None = None
    """Number of adapters `merge` combined into this one."""
    extracted: bool | None = None
    """True for an adapter `extract` made from two models' weights."""
    extra: Mapping[str, str] = field(default_factory=dict)
    """Every other key, as written."""

    @classmethod
    def from_strings(cls, meta: Mapping[str, str]) -> "AdapterMetadata":
        """Parse safetensors metadata; malformed values of our keys are kept as plain strings in `extra`."""
        known: dict[str, Any] = {"configs": {}, "extra": {}}
        for k, v in meta.items():
            name = k[len(PREFIX):] if k.startswith(PREFIX) else None
            try:
                if name in _TEXT:
                    known[name] = v
                elif name == "components":
                    known[name] = tuple(json.loads(v))
                elif name == "scaling":
                    known[name] = dict(json.loads(v))
                elif k.startswith(_CONFIG):
                    known["configs"][k[len(_CONFIG):]] = json.loads(v)
                elif name in _JSON:
                    known[name] = json.loads(v)
                elif name in _INT:
                    known[name] = int(v)
                elif name in _NUMBER:
                    known[name] = _number(v)
                elif name in _FLAG and v in ("0", "1"):
                    known[name] = v == "1"
                else:
                    known["extra"][k] = v
            except (TypeError, ValueError):
                known["extra"][k] = v
        return cls(**known)

    def to_strings(self) -> dict[str, str]:
        """The safetensors metadata (strings only)."""
        out: dict[str, str] = {}
        for f in _TEXT + _INT + _NUMBER:
            if getattr(self, f) is not None:
                out[PREFIX + f] = str(getattr(self, f))
        if self.components:
            out[PREFIX + "components"] = json.dumps(list(self.components))
        if self.scaling is not None:
            out[PREFIX + "scaling"] = json.dumps(dict(sorted(self.scaling.items())))
        for comp, cfg in self.configs.items():
            out[_CONFIG + comp] = json.dumps(cfg)
        for f in _JSON:
            if getattr(self, f) is not None:
                out[PREFIX + f] = json.dumps(getattr(self, f))
        for f in _FLAG:
            if getattr(self, f) is not None:
                out[PREFIX + f] = "1" if getattr(self, f) else "0"
        out.update(self.extra)
        return out

    def replace(self, **changes: Any) -> "AdapterMetadata":
        """A copy with some fields changed."""
        return replace(self, **changes)

    def rule(self, component: str, layer: str) -> str:
        """The scaling rule of `layer` (module[.part]) of `component`."""
        if self.scaling is not None:
            return self.scaling.get(f"{component}.{layer}", self.scaling.get(component, "lora"))
        cfg = self.configs.get(component)
        return "rslora" if isinstance(cfg, Mapping) and cfg.get("rslora") else "lora"


def scaling_entries(rules: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """The compact `scaling` field for {component: {layer: rule}}: one entry per component whose layers share a
    rule other than "lora", else one per such layer."""
    out: dict[str, str] = {}
    for comp, per_layer in rules.items():
        distinct = set(per_layer.values())
        if len(distinct) == 1:
            rule = distinct.pop()
            if rule != "lora":
                out[comp] = rule
            continue
        out.update({f"{comp}.{k}": r for k, r in per_layer.items() if r != "lora"})
    return out


def _number(text: str) -> float:
    """A number as written: "4" reads as 4 and "4.0" as 4.0, so that str() gives the same text back."""
    try:
        return int(text)
    except ValueError:
        return float(text)
