"""DreamBooth data: instance images with captions, optional class images, aspect-ratio buckets, crops and flips.

Each image is assigned the bucket (width, height) whose aspect ratio is closest to its own; all buckets have about
resolution**2 pixels and sides that are multiples of `bucket_step`. With `bucketing=False` every image uses the
square bucket (resolution x resolution), as in diffusers' DreamBooth example. An image is resized so that it covers
its bucket, then cropped to it (center or random), and optionally flipped.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import (ImageFolderError, UnreadableImageError, check_size, list_images, name_list, open_image,
                     read_text)


@dataclass(frozen=True)
class Example:
    """One training image, ready to encode: pixels in [-1, 1] plus what SDXL's size conditioning needs."""

    pixels: torch.Tensor
    """(3, H, W) float32 in [-1, 1]."""
    caption: str
    """The prompt of this image."""
    original_size: tuple[int, int]
    """(height, width) of the image as read (after EXIF rotation)."""
    crop_top_left: tuple[int, int]
    """(top, left) of the crop in the resized image."""
    path: str
    """Where the image came from."""
    flipped: bool = False
    """Whether the pixels were mirrored left-right."""


def make_buckets(resolution: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """Bucket sizes (width, height), multiples of `step`, about resolution**2 pixels, aspect ratio <= max_ratio."""
    if resolution % step:
        raise ValueError(f"resolution {resolution} is not a multiple of the bucket step {step}; expected a multiple")
    area = resolution * resolution
    buckets = {(resolution, resolution)}
    width = resolution
    while True:
        width += step
        height = (area // width) // step * step
        if height < step or width / height > max_ratio:
            break
        buckets.update({(width, height), (height, width)})
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio (in log space) is closest to that of `size` (width, height)."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def resize_and_crop(image: Image.Image, bucket: tuple[int, int], center_crop: bool,
                    rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int]]:
    """Resize `image` to cover `bucket` (width, height) and crop it; returns the crop and its (top, left)."""
    bw, bh = bucket
    scale = max(bw / image.width, bh / image.height)
    new_w, new_h = max(bw, round(image.width * scale)), max(bh, round(image.height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if center_crop:
        top, left = (new_h - bh) // 2, (new_w - bw) // 2
    else:
        top, left = int(rng.integers(0, new_h - bh + 1)), int(rng.integers(0, new_w - bw + 1))
    return image.crop((left, top, left + bw, top + bh)), (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 PIL image -> (3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def read_caption(path: Path, default: str) -> str:
    """The text of `<image>.txt` beside the image when it exists and is not empty, else `default`."""
    txt = path.with_suffix(".txt")
    if txt.is_file():
        text = read_text(txt, "caption file").strip()
        if text:
            return text
    return default


@dataclass(frozen=True)
class DreamBoothImages:
    """The usable images of one folder with their captions and buckets (nothing decoded is kept)."""

    paths: tuple[Path, ...]
    captions: tuple[str, ...]
    buckets: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.paths)


def scan_folder(folder: str | Path, prompt: str, resolution: int, *, what: str = "instance",
                use_captions: bool = True, bucketing: bool = False, bucket_step: int = 64,
                small_images: str = "upscale") -> DreamBoothImages:
    """Read every image of `folder` once: skip unreadable files (listed in one warning), check sizes, pick captions
    and buckets."""
    files = list_images(folder, what)
    buckets = make_buckets(resolution, bucket_step) if bucketing else [(resolution, resolution)]
    paths, captions, chosen, skipped = [], [], [], []
    for path in files:
        try:
            image = open_image(path)
        except UnreadableImageError as err:
            skipped.append(f"{path.name} ({err.reason})")
            continue
        check_size(image, path, resolution, small_images)
        paths.append(path)
        captions.append(read_caption(path, prompt) if use_captions else prompt)
        chosen.append(nearest_bucket(image.size, buckets))
    if skipped:
        warnings.warn(f"skipping {len(skipped)} of {len(files)} image file(s) in the {what} folder {str(folder)!r} "
                      f"that cannot be read: {name_list(skipped)}", stacklevel=2)
    if not paths:
        raise ImageFolderError(
            f"none of the {len(files)} image file(s) in the {what} folder {str(folder)!r} could be read "
            f"(first: {files[0].name}); expected JPEG/PNG/WebP images")
    return DreamBoothImages(tuple(paths), tuple(captions), tuple(chosen))


def hold_out(images: DreamBoothImages, fraction: float, seed: int) -> tuple[DreamBoothImages, DreamBoothImages]:
    """(training images, held-out images): round(fraction x n) images, at least one, chosen at random with `seed`
    (the same split every run). ValueError when no image would be left to train on."""
    n_out = max(1, round(fraction * len(images)))
    if n_out >= len(images):
        raise ValueError(f"validation_split={fraction} holds out {n_out} of the {len(images)} instance image(s), "
                         "leaving none to train on; use a smaller --validation_split, more images, or a "
                         "--validation_data_dir")
    chosen = set(np.random.default_rng([seed, 2]).choice(len(images), n_out, replace=False).tolist())

    def pick(keep: bool) -> DreamBoothImages:
        idx = [i for i in range(len(images)) if (i in chosen) != keep]
        return DreamBoothImages(*(tuple(getattr(images, f)[i] for i in idx) for f in ("paths", "captions", "buckets")))

    return pick(True), pick(False)


def load_example(images: DreamBoothImages, index: int, center_crop: bool, flip: bool,
                 rng: np.random.Generator) -> Example:
    """Decode, resize, crop and (optionally) flip image `index` of `images`."""
    path = images.paths[index]
    try:
        image = open_image(path)
    except UnreadableImageError as err:  # it was readable when scanned; it changed on disk since
        raise ImageFolderError(f"{err}; it was readable when the folder was scanned: restore it or remove it "
                               f"and start again") from None
    original = (image.height, image.width)
    crop, top_left = resize_and_crop(image, images.buckets[index], center_crop, rng)
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return Example(to_tensor(crop), images.captions[index], original, top_left, str(path), flip)
