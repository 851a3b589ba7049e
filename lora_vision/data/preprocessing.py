"""What a classifier expects as input (Preprocessing), the transforms made from it, and training augmentation.

`Preprocessing` is derived from the model's own processor (lora_vision.models.vit.derive_preprocessing): evaluation
uses it as it is, training puts the augmentation (`Augmentation`) in front of the same normalisation. The two ways
of resizing follow the libraries the models come from:

- backend "tensor": transformers' image processors (torchvision backend, the default in transformers 5) resize the
  uint8 tensor with antialiasing, crop at floor((h - crop) / 2) and normalise with mean * 255 / std * 255;
- backend "pil": timm's and torchvision's eval transforms resize the PIL image, then centre-crop (rounded offsets).

Records written before these fields existed (image_size, mean, std, crop_pct) are read by `Preprocessing.from_dict`
with the behaviour they were trained with (shorter side to image_size / crop_pct, centre crop, bilinear, PIL).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
# PIL.Image.Resampling numbers, as transformers' processor configs store them ("resample").
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
BACKENDS = ("tensor", "pil")
AUGMENT_PRESETS = ("none", "light", "imagenet")


@dataclass(frozen=True)
class Preprocessing:
    """How a model expects its input: resize, optional centre crop, normalisation."""

    image_size: int = 224
    """Side of the square image the model sees."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_pct: float = 0.875
    """image_size / resize_size when resize_size is None (the older spelling, kept for old records)."""
    resize_size: int | None = None
    """Size of the resize before the centre crop; equal to image_size: no crop. None: image_size / crop_pct."""
    keep_aspect: bool = True
    """True: the shorter side goes to resize_size; False: both sides do (transformers' ViT: no crop, squashed)."""
    interpolation: str = "bilinear"
    backend: str = "pil"
    """Where the resize happens: "tensor" (transformers' processors) or "pil" (timm, torchvision)."""

    def __post_init__(self) -> None:
        problems = []
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation={self.interpolation!r}: expected one of {INTERPOLATIONS}")
        if self.backend not in BACKENDS:
            problems.append(f"backend={self.backend!r}: expected one of {BACKENDS}")
        if self.image_size < 1 or (self.resize_size is not None and self.resize_size < self.image_size):
            problems.append(f"image_size={self.image_size}, resize_size={self.resize_size}: expected "
                            "1 <= image_size <= resize_size")
        if problems:
            raise ValueError("invalid preprocessing: " + "; ".join(problems))

    @property
    def resize_to(self) -> int:
        """The resize size (the shorter side, or both sides when keep_aspect is False)."""
        if self.resize_size is not None:
            return self.resize_size
        return max(self.image_size, int(round(self.image_size / self.crop_pct)))

    @property
    def crops(self) -> bool:
        """Whether a centre crop follows the resize."""
        return self.keep_aspect or self.resize_to != self.image_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields (what the adapter metadata records)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["resize_size"] = self.resize_to
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessing":
        """Read a record (to_dict's, or an older one without the resize fields); unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"preprocessing record has unknown keys {unknown}; expected some of {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def processor_config(self) -> dict[str, Any]:
        """The transformers image processor config (preprocessor_config.json) that preprocesses the same way.

        It names transformers' ViTImageProcessor (the torchvision backend), which applies exactly these steps; it
        matches this preprocessing exactly for backend "tensor" (transformers models) and to resize rounding for
        backend "pil".
        """
        size = {"shortest_edge": self.resize_to} if self.keep_aspect else \
            {"height": self.resize_to, "width": self.resize_to}
        return {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": size,
                "resample": PIL_RESAMPLE[self.interpolation], "do_center_crop": self.crops,
                "crop_size": {"height": self.image_size, "width": self.image_size}, "do_rescale": True,
                "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(self.mean),
                "image_std": list(self.std), "do_convert_rgb": True}


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation in front of the model's normalisation: random-resized crop and horizontal flip."""

    crop_scale: tuple[float, float] | None = (0.35, 1.0)
    """Area range of the random-resized crop; None: the evaluation resize (and crop), no random crop."""
    hflip: bool = True
    """Random horizontal flip (off for digits, text, or anything where a mirror image is another class)."""

    @classmethod
    def preset(cls, name: str, hflip: bool | None = None,
               crop_scale: tuple[float, float] | None = None) -> "Augmentation":
        """none (no augmentation), light (crop 0.8-1 of the area + flip) or imagenet (crop 0.35-1 + flip); hflip
        and crop_scale, when given, override the preset's."""
        if name not in AUGMENT_PRESETS:
            raise ValueError(f"augment={name!r}: expected one of {AUGMENT_PRESETS} (or true = imagenet, "
                             "false = none)")
        base = {"none": cls(None, False), "light": cls((0.8, 1.0), True), "imagenet": cls((0.35, 1.0), True)}[name]
        return cls(crop_scale if crop_scale is not None else base.crop_scale,
                   hflip if hflip is not None else base.hflip)

    @property
    def active(self) -> bool:
        """Whether anything random happens."""
        return self.crop_scale is not None or self.hflip


class _ToFloat:
    """uint8 tensor -> float32, values kept (0..255), as transformers' processors normalise."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


class _CentreCropFloor:
    """Centre crop with the offsets transformers uses: floor((h - size) / 2) (torchvision's CenterCrop rounds)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        top, left = int((h - self.size) / 2.0), int((w - self.size) / 2.0)
        return x[..., top:top + self.size, left:left + self.size]


def build_transforms(pre: Preprocessing, train: bool, augment: bool | Augmentation = True) -> Callable:
    """PIL image -> normalised tensor. Evaluation: the model's resize, crop and normalisation. Training: the same,
    with `augment` (an Augmentation; True = the imagenet preset, False = none) in place of the resize and crop."""
    from torchvision import transforms as T
    from torchvision.transforms import v2

    aug = augment if isinstance(augment, Augmentation) else Augmentation.preset("imagenet" if augment else "none")
    mode = T.InterpolationMode(pre.interpolation)
    size = pre.resize_to if pre.keep_aspect else [pre.resize_to, pre.resize_to]
    tensor = pre.backend == "tensor"
    if tensor:
        scale = 1 / (1 / 255)  # transformers multiplies mean and std by 1 / rescale_factor
        head = [T.PILToTensor()]
        norm = [_ToFloat(), T.Normalize([m * scale for m in pre.mean], [s * scale for s in pre.std])]
        crop = [_CentreCropFloor(pre.image_size)] if pre.crops else []
    else:
        head, norm = [], [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
        crop = [T.CenterCrop(pre.image_size)] if pre.crops else []
    # transformers resizes uint8 tensors with torchvision's v2 kernels (they round differently from v1's)
    ops = v2 if tensor else T
    if train and aug.crop_scale is not None:
        geometry = [ops.RandomResizedCrop(pre.image_size, scale=aug.crop_scale, interpolation=mode, antialias=True)]
    else:
        geometry = [ops.Resize(size, interpolation=mode, antialias=True)] + crop
    flip = [ops.RandomHorizontalFlip()] if train and aug.hflip else []
    if tensor:
        return T.Compose(head + geometry + flip + norm)
    return T.Compose(geometry + flip + norm)


def check_crop_scale(scale: tuple[float, ...]) -> list[str]:
    """Problems of a crop-scale range (MIN MAX with 0 < MIN <= MAX <= 1), one line each."""
    if len(scale) != 2:
        return [f"crop_scale={list(scale)}: expected two numbers MIN MAX"]
    lo, hi = scale
    if not (0 < lo <= hi <= 1) or math.isnan(lo) or math.isnan(hi):
        return [f"crop_scale={list(scale)}: expected 0 < MIN <= MAX <= 1 (fractions of the image area)"]
    return []
