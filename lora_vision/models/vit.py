"""ViT classifiers: load (transformers, torchvision, timm, tiny test models), fit a new head, export a peft folder.

Model names:
- a local folder or hub id of a transformers image classifier (ViTForImageClassification and relatives);
- `torchvision:vit_b_16` (or the bare names vit_b_16, vit_b_32, vit_l_16, vit_l_32, vit_h_14), weights from a
  local .safetensors file;
- `timm:<model name>` (needs timm), weights from a local .safetensors file;
- `tiny-hf`, `tiny-torchvision`, `tiny-timm`: the small random models of lora_vision.models.tiny (tests, offline demo).

The peft adapter folder is written by lora_vision.formats.peft.export_peft (the head goes in as modules_to_save).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.imagenet import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from ..io import read_safetensors, write_safetensors
from ..lora.inject import fold_lora, replace_module
from ..metadata import MODEL_SOURCE_KEY
from ..targets import PRESETS as NAMED_PRESETS
from . import tiny

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
        builders = {"hf": tiny.build_tiny_hf_vit, "torchvision": tiny.build_tiny_torchvision_vit,
                    "timm": tiny.build_tiny_timm_vit}
        if family not in builders:
            raise ModelLoadError(f"unknown tiny model {source!r}; choose tiny-hf, tiny-torchvision or tiny-timm")
        # The tiny models stand for one fixed pretrained base (seed 0); the run's seed draws only the new head.
        model = builders[family](num_classes, 32, 0)
        torch.manual_seed(seed)
        model.get_submodule(HEADS[family]).reset_parameters()
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
    from transformers.utils import logging as hf_logging

    # A new head of another size is the point here: transformers' size-mismatch table (and its num_labels vs
    # id2label notice) would read like a failure, so it is silenced and one line of ours says what happened.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForImageClassification.from_pretrained(source, num_labels=num_classes, dtype=torch.float32,
                                                                ignore_mismatched_sizes=True, **kw)
    finally:
        hf_logging.set_verbosity(verbosity)
    if config.num_labels != num_classes:
        print(f"{source}: new classification head for {num_classes} classes (the checkpoint's has "
              f"{config.num_labels}); it starts from random weights")
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


class PatchLinear(nn.Module):
    """A patch-embedding Conv2d (kernel_size == stride, no padding) computed as one matrix product.

    Same parameters (`weight`, `bias`: state-dict keys unchanged) and the same output (N, C, H/p, W/p), returned as
    a view whose `flatten(2).transpose(1, 2)` (what ViTs do next) needs no copy.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.kernel_size != conv.stride or conv.padding not in (0, (0, 0)) or conv.groups != 1 \
                or conv.dilation not in (1, (1, 1)):
            raise ValueError(f"PatchLinear needs kernel_size == stride, no padding, groups 1; got {conv}")
        self.patch, self.out_channels = conv.kernel_size, conv.out_channels
        self.weight, self.bias = conv.weight, conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        (ph, pw), gh, gw = self.patch, h // self.patch[0], w // self.patch[1]
        x = x[:, :, :gh * ph, :gw * pw].reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
        y = F.linear(x.reshape(b, gh * gw, c * ph * pw), self.weight.reshape(self.out_channels, -1), self.bias)
        return y.view(b, gh, gw, self.out_channels).permute(0, 3, 1, 2)


def patchify_as_linear(model: nn.Module) -> list[str]:
    """Replace every patch-embedding Conv2d (kernel == stride) of `model` by PatchLinear; returns their names."""
    done = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Conv2d) and mod.kernel_size == mod.stride and mod.kernel_size != (1, 1) \
                and mod.padding in (0, (0, 0)) and mod.groups == 1:
            replace_module(model, name, PatchLinear(mod))
            done.append(name)
    return done


def lora_targets(loaded: LoadedViT, spec: str = "") -> str | tuple[str, ...]:
    """Target spec for LoRAConfig: the family's preset when `spec` is empty, a preset name, or comma patterns."""
    if not spec:
        return PRESETS[loaded.family]
    if spec in NAMED_PRESETS:
        return spec
    return tuple(p.strip() for p in spec.split(",") if p.strip())


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every LoRA adapter folded into plain layers (no LoRA wrappers left: zero overhead)."""
    out = copy.deepcopy(model)
    fold_lora(out)
    return out


def save_model(loaded: LoadedViT, out_dir: str | Path, model: nn.Module | None = None) -> Path:
    """Save a whole classifier: transformers' save_pretrained (safetensors) for HF, else model.safetensors."""
    model = model if model is not None else loaded.model
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if loaded.family == "hf":
        model.save_pretrained(out_dir, safe_serialization=True)
    else:
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        write_safetensors(out_dir / "model.safetensors", sd, {MODEL_SOURCE_KEY: loaded.source})
    return out_dir
