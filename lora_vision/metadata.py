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


@dataclass(frozen=True)
class AdapterMetadata:
    """What an adapter file says about itself."""

    format: str | None = None
    """Version of our native layout; set only on native files (its absence marks foreign files)."""
    components: tuple[str, ...] = ()
    """Components with LoRA weights."""
    base: str | None = None
    """Base model family (sd1, sd2, sd2-v, sdxl, hf-vit, ...) when known."""
    source_format: str | None = None
    """The format a file was imported from (kohya, diffusers, peft, lora_vision)."""
    transformers_version: str | None = None
    """transformers version of the live module names."""
    configs: Mapping[str, Any] = field(default_factory=dict)
    """Training config (LoRAConfig.to_dict()) per component."""
    scaling: Mapping[str, str] | None = None
    """Scaling rule per component or layer when not "lora"; None: not recorded (older files)."""
    preprocessing: Mapping[str, Any] | None = None
    """Classifiers: the input preprocessing the adapter was trained and evaluated with
    (lora_vision.data.preprocessing.Preprocessing.to_dict()); None: not recorded."""
    extra: Mapping[str, str] = field(default_factory=dict)
    """Every other key, as written."""

    @classmethod
    def from_strings(cls, meta: Mapping[str, str]) -> "AdapterMetadata":
        """Parse safetensors metadata; malformed JSON values of our keys are kept as plain strings in `extra`."""
        known: dict[str, Any] = {"configs": {}, "extra": {}}
        for k, v in meta.items():
            name = k[len(PREFIX):] if k.startswith(PREFIX) else None
            if name in ("format", "base", "source_format", "transformers_version"):
                known[name] = v
            elif name in ("components", "scaling", "preprocessing") or k.startswith(_CONFIG):
                try:
                    value = json.loads(v)
                except ValueError:
                    known["extra"][k] = v
                    continue
                if name == "components":
                    known["components"] = tuple(value)
                elif name in ("scaling", "preprocessing"):
                    if not isinstance(value, dict):
                        known["extra"][k] = v
                        continue
                    known[name] = dict(value)
                else:
                    known["configs"][k[len(_CONFIG):]] = value
            else:
                known["extra"][k] = v
        return cls(**known)

    def to_strings(self) -> dict[str, str]:
        """The safetensors metadata (strings only)."""
        out: dict[str, str] = {}
        for f in ("format", "base", "source_format", "transformers_version"):
            if getattr(self, f) is not None:
                out[PREFIX + f] = str(getattr(self, f))
        if self.components:
            out[PREFIX + "components"] = json.dumps(list(self.components))
        if self.scaling is not None:
            out[PREFIX + "scaling"] = json.dumps(dict(sorted(self.scaling.items())))
        if self.preprocessing is not None:
            out[PREFIX + "preprocessing"] = json.dumps(dict(self.preprocessing))
        for comp, cfg in self.configs.items():
            out[_CONFIG + comp] = json.dumps(cfg)
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
