"""ViT classifiers: load (transformers, torchvision, timm, tiny test models), fit a new head, export a peft folder.

Model names:
- a local folder or hub id of a transformers image classifier (ViTForImageClassification and relatives);
- `torchvision:vit_b_16` (or the bare names vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14), weights from a
  local .safetensors file;
- `timm:<model name>` (needs timm), weights from a local .safetensors file;
- `tiny-hf`, `tiny-torchvision`, `tiny-timm`: the small random models of lora_vision.models.tiny (tests, offline demo).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..data.imagenet import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ..io import atomic_write_text, read_safetensors, write_safetensors
from ..lora.inject import lora_layers
from ..lora.layers import LoRAFusedLinear, LoRALinear, LoRAMultiheadAttention
from ..lora.ops import lora_state_dict

FAMILIES = ("hf", "torchvision", "timm")
HEADS = {"hf": "classifier", "torchvision": "heads.head", "timm": "head"}
PRESETS = {"hf": "hf-vit-attn", "torchvision": "tv-vit-attn", "timm": "timm-vit-attn"}
TV_VITS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")


class ModelLoadError(ValueError):
    """A model name, weight file or head did not fit; the message says what to do."""


@dataclass
class LoadedViT:
    """A classifier with a head sized to the classes, and how to feed it."""

    model: nn.Module
    family: str
    source: str
    preprocessing: Preprocessing

    @property
    def head_name(self) -> str:
        """Module name of the classification head (trained in full next to LoRA)."""
        return HEADS[self.family]

    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Class logits for a batch of normalised images (N, 3, H, W)."""
        out = self.model(pixel_values=pixel_values) if self.family == "hf" else self.model(pixel_values)
        return out.logits if hasattr(out, "logits") else out


def _family_of(source: str) -> str:
    if source.startswith("tiny-"):
        return source.removeprefix("tiny-")
    if source.startswith("torchvision:") or source in TV_VITS:
        return "torchvision"
    if source.startswith("timm:"):
        return "timm"
    return "hf"


def _load_weights(model: nn.Module, path: str | Path, head: str) -> None:
    """Load a .safetensors state dict, leaving out the old head (its size differs)."""
    if not str(path).endswith(".safetensors"):
        raise ModelLoadError(
            f"weights {path}: only .safetensors files are loaded (no pickles); convert a .pth once with "
            "`python -c \"import torch,safetensors.torch as s; s.save_file(torch.load('in.pth', weights_only=True), "
            "'out.safetensors')\"`")
    sd, _ = read_safetensors(path)
    sd = {k: v for k, v in sd.items() if not k.startswith(head + ".")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(head + ".")]
    if missing or unexpected:
        raise ModelLoadError(f"weights {path} do not fit {type(model).__name__}: {len(missing)} missing "
                             f"(first: {missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]})")


def load_vit(source: str, num_classes: int, weights: str | Path | None = None, labels: Sequence[str] | None = None,
             seed: int = 0) -> LoadedViT:
    """Build or load the classifier `source` with a new head of `num_classes` outputs (see the module docstring)."""
    family = _family_of(source)
    torch.manual_seed(seed)  # the new head's initialisation is part of the run's seed
    if source.startswith("tiny-"):
        from . import tiny

        builders = {"hf": tiny.build_tiny_hf_vit, "torchvision": tiny.build_tiny_torchvision_vit,
                    "timm": tiny.build_tiny_timm_vit}
        if family not in builders:
            raise ModelLoadError(f"unknown tiny model {source!r}; choose tiny-hf, tiny-torchvision or tiny-timm")
        model = builders[family](num_classes, 32, seed)
        if weights:
            _load_weights(model, weights, HEADS[family])
        pre = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1.0)
    elif family == "torchvision":
        import torchvision

        name = source.removeprefix("torchvision:")
        if name not in TV_VITS:
            raise ModelLoadError(f"{name!r} is not a torchvision ViT; choose one of {TV_VITS}")
        model = torchvision.models.get_model(name, weights=None)
        if weights:
            _load_weights(model, weights, "heads")
        model.heads.head = nn.Linear(model.hidden_dim, num_classes)
        pre = Preprocessing(model.image_size, IMAGENET_MEAN, IMAGENET_STD, 224 / 256)
    elif family == "timm":
        try:
            import timm
        except ImportError:
            raise ModelLoadError("timm models need timm: pip install timm") from None
        model = timm.create_model(source.removeprefix("timm:"), pretrained=False, num_classes=num_classes)
        if weights:
            _load_weights(model, weights, "head")
        cfg = timm.data.resolve_data_config({}, model=model)
        pre = Preprocessing(cfg["input_size"][-1], tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("crop_pct", 0.875))
    else:
        model, pre = _load_hf(source, num_classes, labels)
    return LoadedViT(model, family, source, pre)


def _load_hf(source: str, num_classes: int, labels: Sequence[str] | None) -> tuple[nn.Module, Preprocessing]:
    from transformers import AutoConfig, AutoModelForImageClassification

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load {source!r} as a transformers model ({e}); give a local folder with "
                             "config.json, a hub id, torchvision:vit_b_16, timm:<name> or tiny-hf") from None
    kw = {}
    if labels:
        kw = {"id2label": dict(enumerate(labels)), "label2id": {c: i for i, c in enumerate(labels)}}
    model = AutoModelForImageClassification.from_pretrained(source, num_labels=num_classes,
                                                            ignore_mismatched_sizes=True, **kw)
    size = getattr(config, "image_size", 224)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # ViTImageProcessor's defaults
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(source)
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return model, Preprocessing(int(size if isinstance(size, int) else size[0]), mean, std, 0.875)


def freeze_to(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every frozen parameter (requires_grad False) to `dtype`; trainable ones stay as they are.

    With a bf16 base, autocast has no per-step weight casts to do, and frozen weights take half the memory.
    Returns the number of parameters cast.
    """
    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += p.numel()
    return n


# ---- peft adapter folder (formats.md 4.4 / 7) -------------------------------------------------------------------

def _peft_pairs(model: nn.Module, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, alpha) per peft target module; timm's split q/k/v become one qkv LoRA of rank P*r (same update)."""
    sd = lora_state_dict(model, name)
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for mod, layer in lora_layers(model):
        if name not in layer.lora_A:
            continue
        alpha = layer.alphas[name]
        if isinstance(layer, LoRAMultiheadAttention):
            raise NotImplementedError(
                f"{mod}: peft export of torchvision MultiheadAttention adapters is not supported (peft wraps "
                "MultiheadAttention differently); use the lora_vision adapter file, or the HF/timm models")
        if isinstance(layer, LoRAFusedLinear):
            a = torch.cat([sd[f"{mod}.{p}.lora_A.weight"] for p in layer.parts])
            blocks = [sd[f"{mod}.{p}.lora_B.weight"] if p in layer.parts else None for p in ("q", "k", "v")]
            r = layer.ranks[name]
            # (3d, P*r): each part's B in its row block and its own rank columns.
            b = torch.zeros(3 * layer.d, a.shape[0])
            j = 0
            for i, blk in enumerate(blocks):
                if blk is not None:
                    b[i * layer.d:(i + 1) * layer.d, j * r:(j + 1) * r] = blk
                    j += 1
            # peft's scaling is alpha / rank: keep alpha / r per part with rank P*r.
            out[mod] = (a, b, alpha * len(layer.parts))
        elif isinstance(layer, LoRALinear):
            out[mod] = (sd[f"{mod}.lora_A.weight"], sd[f"{mod}.lora_B.weight"], alpha)
        else:
            raise NotImplementedError(f"{mod}: peft export of {type(layer).__name__} is not supported here")
    return out


def save_peft_folder(loaded: LoadedViT, out_dir: str | Path, name: str = "default", rslora: bool = False) -> Path:
    """Write a peft adapter folder (adapter_config.json + adapter_model.safetensors) with the head in full.

    Load it with `PeftModel.from_pretrained(base, out_dir)` where `base` has a head of the same size.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = _peft_pairs(loaded.model, name)
    if not pairs:
        raise ValueError(f"no adapter {name!r} in the model")
    ranks = {m: int(a.shape[0]) for m, (a, _, _) in pairs.items()}
    alphas = {m: float(al) for m, (_, _, al) in pairs.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    tensors = {}
    for m, (a, b, _) in pairs.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"base_model.model.{m}.lora_B.weight"] = b.detach().float().cpu().contiguous()
    head = loaded.model.get_submodule(loaded.head_name)
    for k, v in head.state_dict().items():
        tensors[f"base_model.model.{loaded.head_name}.{k}"] = v.detach().float().cpu().contiguous()
    cls = type(loaded.model)
    config = {
        "peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted(pairs), "modules_to_save": [loaded.head_name],
        # Full module names: peft matches a rank_pattern key as a suffix of the module name.
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "use_rslora": rslora, "use_dora": False, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "inference_mode": True, "base_model_name_or_path": None if loaded.source.startswith("tiny-") else loaded.source,
        "auto_mapping": {"base_model_class": cls.__name__, "parent_library": cls.__module__},
    }
    write_safetensors(out_dir / "adapter_model.safetensors", tensors, {"format": "pt"})
    atomic_write_text(out_dir / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(out_dir / "README.md", f"# LoRA adapter for {loaded.source}\n\npeft adapter folder written by "
                      f"lora_vision: `PeftModel.from_pretrained(base, \"{out_dir.name}\")` with a base whose "
                      f"`{loaded.head_name}` has {head.state_dict()['weight'].shape[0]} outputs.\n")
    return out_dir
