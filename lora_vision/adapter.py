"""The on-disk adapter: canonical LoRA tensors per model component plus string metadata, in one .safetensors file.

Keys: `<component>.<module>[.<part>].lora_A.weight`, `.lora_B.weight`, `.alpha` (0-dim), where component is one of
`unet` or `transformer` (the DiT families), `text_encoder`, `text_encoder_2`, `text_encoder_3` (diffusers pipelines)
or `model` (a single model such as a ViT), and `module` is the live module name in that component. Metadata values
are strings; ours live under `lora_vision.`
(`lora_vision.metadata.AdapterMetadata` reads and writes them), including each layer's scaling rule.

Layers of other kinds (LoHa, LoKr, DoRA, Tucker LoCon, OFT, BOFT, (IA)^3, full diff, norm; see lora.kinds) are
stored as `<component>.<module>.<kind>.<factor>` with the LyCORIS factor names (`unet.<m>.loha.hada_w1_a`,
`unet.<m>.lokr.lokr_w2_b`, `unet.<m>.lora.lora_mid`, `unet.<m>.lora.dora_scale`, `unet.<m>.oft.oft_blocks`, ...)
next to `<component>.<module>.alpha`; `lora.ops.canonical_layers` reads them and `lora.ops.layer_tensors` writes them.

Modules trained in full next to the adapter (a new classification head; peft's `modules_to_save`) are stored as
`full.<component>.<module>.<param>`; `apply_to` copies them into the model after checking every shape.

Text embeddings trained next to the adapter (pivotal tuning: new tokens of the text encoders) are stored as
`embeddings.<token>.<component>`, one (vectors, width) tensor per text encoder (`text_encoder`, `text_encoder_2`):
the token is the word written in prompts (e.g. `TOK`), standing for that many vectors. `Adapter.embeddings()` reads
them, `embedding_tensors` writes them; `lora_vision.pipeline.load_adapter` adds them to the tokenizers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
import transformers
from torch import nn

from .io import write_safetensors
from .lora.inject import inject_lora
from .lora.layers import lora_layers
from .lora.ops import LoRAStateDictError, canonical_layers, layer_tensors, lora_specs
from .lora.spec import LayerSpec
from .metadata import FORMAT_VERSION, AdapterMetadata, scaling_entries

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "model")
FULL = "full"
EMBEDDINGS = "embeddings"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def check_token(token: str) -> str | None:
    """Why `token` cannot name a bundled embedding (None: it can): it must be one non-empty word without dots."""
    if not isinstance(token, str) or not token or any(c.isspace() for c in token) or "." in token:
        return f"embedding token {token!r}: expected one word without spaces or dots (e.g. TOK)"
    return None


def embedding_tensors(embeddings: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Native keys `embeddings.<token>.<component>` for {token: {text encoder component: (vectors, width)}}."""
    out: dict[str, torch.Tensor] = {}
    for token, per_comp in embeddings.items():
        why = check_token(token)
        if why:
            raise ValueError(why)
        for comp, vectors in per_comp.items():
            if comp not in TEXT_ENCODERS or vectors.dim() != 2:
                raise ValueError(f"embedding {token!r}: {comp} with shape {tuple(vectors.shape)}; expected a text "
                                 f"encoder of {TEXT_ENCODERS} and a (vectors, width) tensor")
            out[f"{EMBEDDINGS}.{token}.{comp}"] = vectors.detach().float().cpu().contiguous()
    return out


@dataclass
class Adapter:
    """LoRA weights for one or more model components, with metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_models(cls, models: Mapping[str, nn.Module], name: str = "default",
                    metadata: Mapping[str, str] | None = None,
                    configs: Mapping[str, object] | None = None,
                    full_modules: Mapping[str, Sequence[str]] | None = None) -> "Adapter":
        """Collect adapter `name` from each component (e.g. {"unet": unet, "text_encoder": te}).

        `full_modules` names modules per component whose weights are stored in full (e.g. {"model": ["classifier"]}).
        """
        tensors: dict[str, torch.Tensor] = {}
        rules: dict[str, dict[str, str]] = {}
        for comp, mods in (full_modules or {}).items():
            _check_component(comp)
            for mod in mods:
                for k, v in models[comp].get_submodule(mod).state_dict().items():
                    tensors[f"{FULL}.{comp}.{mod}.{k}"] = v.detach().to("cpu").clone()
        for comp, model in models.items():
            _check_component(comp)
            if not any(name in layer.lora_A for _, layer in lora_layers(model)):
                continue
            specs = lora_specs(model, name)
            for key, spec in specs.items():
                for k, v in layer_tensors(key, spec).items():
                    tensors[f"{comp}.{k}"] = v.detach().to("cpu").clone()
            rules[comp] = {k: spec.rule for k, spec in specs.items()}
        if not any(not k.startswith(FULL + ".") for k in tensors):
            raise ValueError(f"no adapter named {name!r} in components {list(models)}")
        info = AdapterMetadata(
            format=FORMAT_VERSION, components=tuple(sorted({k.split(".", 1)[0] for k in tensors} - {FULL})),
            transformers_version=transformers.__version__, scaling=scaling_entries(rules),
            configs={c: cfg.to_dict() if hasattr(cfg, "to_dict") else cfg for c, cfg in (configs or {}).items()})
        return cls(tensors, {**info.to_strings(), **(metadata or {})})

    @property
    def info(self) -> AdapterMetadata:
        """The metadata, typed."""
        return AdapterMetadata.from_strings(self.metadata)

    def layers(self, component: str) -> dict[str, LayerSpec]:
        """Every adapted weight of `component` as {module[.part]: LayerSpec}, with its scaling rule."""
        info = self.info
        return canonical_layers(self.state_dict_for(component), lambda key: info.rule(component, key))

    def plain(self) -> "Adapter":
        """The same adapter with every layer under the plain rule (alpha' = scaling * rank, so the updates are
        unchanged): what files for other tools (kohya, diffusers, peft) carry, since they know only alpha / rank."""
        info = self.info
        if not any(info.rule(c, k) != "lora" for c in self.components() for k in self.layers(c)):
            return self
        tensors = dict(self.tensors)
        for comp in self.components():
            for key, spec in self.layers(comp).items():
                tensors[f"{comp}.{key}.alpha"] = torch.tensor(spec.plain().alpha, dtype=torch.float32)
        return Adapter(tensors, {**self.metadata, **info.replace(scaling={}).to_strings()})

    def embeddings(self) -> dict[str, dict[str, torch.Tensor]]:
        """The bundled text embeddings: {token: {text encoder component: (vectors, width)}} (empty when none)."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in self.tensors.items():
            if key.startswith(EMBEDDINGS + "."):
                token, _, comp = key[len(EMBEDDINGS) + 1:].rpartition(".")
                out.setdefault(token, {})[comp] = t
        return out

    def components(self) -> list[str]:
        """Components present in the file, in canonical order."""
        present = {k.split(".", 1)[0] for k in self.tensors}
        return [c for c in COMPONENTS if c in present]

    def full_state_dict_for(self, component: str) -> dict[str, torch.Tensor]:
        """Weights of the modules stored in full for `component`: `<module>.<param>` -> tensor."""
        _check_component(component)
        p = f"{FULL}.{component}."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}

    def state_dict_for(self, component: str) -> dict[str, torch.Tensor]:
        """The canonical state dict of one component (prefix stripped)."""
        _check_component(component)
        p = component + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}

    def apply_to(self, models: Mapping[str, nn.Module], name: str = "default", strength: float = 1.0,
                 freeze_base: bool = True) -> dict[str, list[str]]:
        """Inject this adapter as `name` into the given components; returns the adapted module names per component.

        Every component of the file must be given, so nothing is silently dropped.
        """
        full = {c: self.full_state_dict_for(c) for c in COMPONENTS if self.full_state_dict_for(c)}
        missing = [c for c in dict.fromkeys(self.components() + list(full)) if c not in models]
        if missing:
            raise KeyError(f"the adapter has weights for {missing} but only {list(models)} were given")
        for c, sd in full.items():  # check every shape before anything changes
            _check_full(models[c], sd, c)
        for c, sd in full.items():
            with torch.no_grad():
                for k, v in sd.items():
                    _model_tensor(models[c], k).copy_(v)
        return {c: inject_lora(models[c], name=name, strength=strength, freeze_base=freeze_base,
                               layers=self.layers(c))
                for c in self.components()}

    def kinds(self) -> dict[str, int]:
        """Number of layers per kind over all components, e.g. {"LoRA": 192, "LoHa+DoRA": 12}."""
        counts: dict[str, int] = {}
        for comp in self.components():
            for spec in self.layers(comp).values():
                counts[spec.label] = counts.get(spec.label, 0) + 1
        return counts

    def ranks(self) -> dict[str, int]:
        """Rank per adapted module (`component.module[.part]`)."""
        return {f"{comp}.{key}": spec.rank for comp in self.components() for key, spec in self.layers(comp).items()}

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write the adapter atomically (optionally casting LoRA weights to `dtype`; alphas stay float32)."""
        for comp in self.components():
            canonical_layers(self.state_dict_for(comp))  # refuse to write something we could not read back
        tensors = {k: (v.to(dtype) if dtype is not None and not k.endswith(".alpha") else v)
                   for k, v in self.tensors.items()}
        return write_safetensors(path, tensors, self.metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Adapter":
        """Read an adapter file in any supported format: `lora_vision.formats.read_adapter(path)[0]`."""
        from .formats import read_adapter  # formats builds on this module, so it cannot be imported at the top

        return read_adapter(path)[0]


def _model_tensor(model: nn.Module, key: str) -> torch.Tensor:
    mod, _, attr = key.rpartition(".")
    owner = model.get_submodule(mod) if mod else model
    t = getattr(owner, attr, None)
    if not isinstance(t, torch.Tensor):
        raise AttributeError(f"{type(model).__name__} has no parameter or buffer {key!r}")
    return t


def _check_full(model: nn.Module, sd: Mapping[str, torch.Tensor], comp: str) -> None:
    problems = []
    for k, v in sd.items():
        try:
            t = _model_tensor(model, k)
        except AttributeError:
            problems.append(f"{k}: the model has no such parameter")
            continue
        if tuple(t.shape) != tuple(v.shape):
            problems.append(f"{k}: adapter has shape {tuple(v.shape)}, model has {tuple(t.shape)}")
    if problems:
        raise ValueError(f"the adapter's fully trained modules do not fit {comp} ({type(model).__name__}):\n  - "
                         + "\n  - ".join(problems) + "\nbuild the model with the same head size (number of "
                         "classes) the adapter was trained with")


def _check_component(comp: str) -> None:
    if comp not in COMPONENTS:
        raise ValueError(f"unknown component {comp!r}; expected one of {COMPONENTS}")
