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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.preprocessing import PIL_RESAMPLE, Preprocessing
from ..io import read_safetensors, write_safetensors
from ..lora.inject import fold_lora, replace_module
from ..metadata import MODEL_SOURCE_KEY
from ..targets import PRESETS as NAMED_PRESETS
from . import tiny

FAMILIES = ("hf", "torchvision", "timm")
HEADS = {"hf": "classifier", "torchvision": "heads.head", "timm": "head"}
PRESETS = {"hf": "hf-vit-attn", "torchvision": "tv-vit-attn", "timm": "timm-vit-attn"}
PROCESSOR_FILE = "preprocessor_config.json"  # transformers' image processor file
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
    elif family == "torchvision":
        import torchvision

        name = source.removeprefix("torchvision:")
        if name not in TV_VITS:
            raise ModelLoadError(f"{name!r} is not a torchvision ViT; choose one of {TV_VITS}")
        model = torchvision.models.get_model(name, weights=None)
        if weights:
            _load_weights(model, weights, "heads")
        model.heads.head = nn.Linear(model.hidden_dim, num_classes)
    elif family == "timm":
        try:
            import timm
        except ImportError:
            raise ModelLoadError("timm models need timm: pip install timm") from None
        model = timm.create_model(source.removeprefix("timm:"), pretrained=False, num_classes=num_classes)
        if weights:
            _load_weights(model, weights, "head")
    else:
        model = _load_hf(source, num_classes, labels)
    return LoadedViT(model, family, source, derive_preprocessing(model, family, source))


def derive_preprocessing(model: nn.Module, family: str, source: str) -> Preprocessing:
    """The preprocessing of the model's own processor: the one place it is worked out, for evaluation, as the base
    of the training transforms, and for the processor file written next to adapters and merged models.

    - transformers: its image processor (AutoImageProcessor of the folder or hub id); a folder without one gets
      the defaults of its model type's processor class at the model's image_size (ViTImageProcessor: resize to
      image_size x image_size, no crop, mean = std = 0.5), which is what transformers users get;
    - timm: the pretrained config's data config (input size, crop_pct, crop_mode, interpolation, mean, std);
    - torchvision: the transforms of the architecture's default weights (resize 256, crop 224, bilinear, ImageNet
      mean and std for the ViTs);
    - tiny-torchvision / tiny-timm (test models, no processor of their own): 32 px, mean = std = 0.5.
    """
    if family == "hf":
        return _hf_preprocessing(source, model.config)
    if source.startswith("tiny-"):
        return Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), resize_size=32)
    if family == "torchvision":
        import torchvision

        t = torchvision.models.get_model_weights(source.removeprefix("torchvision:")).DEFAULT.transforms()
        return Preprocessing(t.crop_size[0], tuple(t.mean), tuple(t.std), resize_size=t.resize_size[0],
                             interpolation=t.interpolation.value)
    import timm

    cfg = timm.data.resolve_data_config({}, model=model)
    size, crop_pct, mode = cfg["input_size"][-1], cfg.get("crop_pct", 0.875), cfg.get("crop_mode", "center")
    if mode not in ("center", "squash"):
        raise ModelLoadError(f"{source}: timm crop_mode {mode!r} is not supported (center and squash are); "
                             "give a model whose pretrained config uses one of them")
    return Preprocessing(size, tuple(cfg["mean"]), tuple(cfg["std"]), resize_size=math.floor(size / crop_pct),
                         keep_aspect=mode == "center", interpolation=cfg.get("interpolation", "bicubic"))


def _hf_preprocessing(source: str, config) -> Preprocessing:
    from transformers import AutoImageProcessor
    from transformers.models.auto.image_processing_auto import (IMAGE_PROCESSOR_MAPPING_NAMES,
                                                                get_image_processor_class_from_name)

    model_size = getattr(config, "image_size", 224)
    model_size = int(model_size if isinstance(model_size, int) else model_size[0])
    proc = None
    local = Path(source).is_dir() or source.startswith("tiny-")
    if not local or (Path(source) / PROCESSOR_FILE).is_file():
        try:
            proc = AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError, TypeError):
            proc = None
    own = proc is not None
    if proc is None:  # no preprocessor_config.json: the defaults of the model type's processor class
        names = IMAGE_PROCESSOR_MAPPING_NAMES.get(config.model_type) or {}
        if not isinstance(names, dict):
            names = {"torchvision": names[-1] or names[0]}
        proc = get_image_processor_class_from_name(names.get("torchvision") or names.get("pil")
                                                   or "ViTImageProcessor")()
    size, crop = dict(proc.size or {}), dict(getattr(proc, "crop_size", None) or {})
    do_crop = bool(getattr(proc, "do_center_crop", False))
    if not own:  # the class defaults are for its usual 224 px: scale them to this model's input size
        final = (crop if do_crop else size).get("height") or size.get("shortest_edge") or model_size
        factor = model_size / final
        size = {k: int(round(v * factor)) for k, v in size.items() if v}
        crop = {k: int(round(v * factor)) for k, v in crop.items() if v}
    if "shortest_edge" in size:
        resize, keep = size["shortest_edge"], True
    elif size.get("height") and size.get("height") == size.get("width"):
        resize, keep = size["height"], False
    else:
        raise ModelLoadError(f"{source}: image processor size {size} is not supported (expected shortest_edge or a "
                             "square height/width)")
    out = crop.get("height", resize) if do_crop else resize
    if do_crop and crop.get("height") != crop.get("width"):
        raise ModelLoadError(f"{source}: non-square crop_size {crop} is not supported")
    if keep and not do_crop:
        raise ModelLoadError(f"{source}: a shortest_edge resize without a centre crop gives images of varying "
                             "shape; give the processor a crop_size")
    if getattr(proc, "do_rescale", True) and abs(getattr(proc, "rescale_factor", 1 / 255) - 1 / 255) > 1e-12:
        raise ModelLoadError(f"{source}: rescale_factor {proc.rescale_factor} is not supported (1/255 is)")
    normalize = getattr(proc, "do_normalize", True)
    mean = tuple(proc.image_mean) if normalize else (0.0, 0.0, 0.0)
    std = tuple(proc.image_std) if normalize else (1.0, 1.0, 1.0)
    resample = {v: k for k, v in PIL_RESAMPLE.items()}.get(int(getattr(proc, "resample", 2) or 2), "bilinear")
    backend = "pil" if getattr(proc, "backend", "torchvision") == "pil" else "tensor"
    return Preprocessing(out, mean, std, resize_size=resize, keep_aspect=keep, interpolation=resample,
                         backend=backend)


def _load_hf(source: str, num_classes: int, labels: Sequence[str] | None) -> nn.Module:
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
    return model


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
