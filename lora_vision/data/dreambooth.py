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

from .images import (IMAGE_SUFFIXES, ImageFolderError, UnreadableImageError, alpha_channel, check_size, list_images,
                     name_list, open_image, read_text, to_mask)

# A mask beside its image (kohya's convention for masked loss without a mask folder): <stem>_mask.<image suffix>.
MASK_SUFFIX = "_mask"


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
    mask: torch.Tensor | None = None
    """(1, H, W) float32 loss weights in [0, 1], cropped and flipped with the pixels (masked loss), or None."""


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


def cover_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The (width, height) to which an image of `size` is resized so that it covers `bucket` (width, height)."""
    bw, bh = bucket
    scale = max(bw / size[0], bh / size[1])
    return max(bw, round(size[0] * scale)), max(bh, round(size[1] * scale))


def resize_and_crop(image: Image.Image, bucket: tuple[int, int], center_crop: bool,
                    rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int]]:
    """Resize `image` to cover `bucket` (width, height) and crop it; returns the crop and its (top, left)."""
    bw, bh = bucket
    new_w, new_h = cover_size(image.size, bucket)
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


def read_caption(path: Path, default: str, extension: str = ".txt") -> str:
    """The text of `<image><extension>` (e.g. `.txt`) beside the image when it exists and is not empty, else
    `default`."""
    txt = path.with_suffix(extension)
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
    masks: tuple[Path | None, ...] = ()
    """Masked loss: each image's mask file, or None for its own alpha channel (or no alpha: every pixel counts);
    empty when the loss is not masked."""

    def __len__(self) -> int:
        return len(self.paths)


def mask_path(image: Path, mask_dir: str | Path | None) -> Path | None:
    """The mask file of `image`: the file with the image's stem in `mask_dir` (kohya's conditioning_data_dir), or
    `<stem>_mask.<suffix>` beside the image; None when there is none."""
    folder, stem = (Path(mask_dir), image.stem) if mask_dir is not None else (image.parent, image.stem + MASK_SUFFIX)
    found = sorted(p for p in folder.glob(glob_escape(stem) + ".*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return found[0] if found else None


def glob_escape(text: str) -> str:
    """`text` with glob's special characters escaped, for Path.glob."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _is_mask_file(path: Path, names: set[str]) -> bool:
    """Whether `path` is `<stem>_mask.<suffix>` of another image in the same folder (`names`: their stems)."""
    return path.stem.endswith(MASK_SUFFIX) and path.stem[:-len(MASK_SUFFIX)] in names


def scan_folder(folder: str | Path, prompt: str, resolution: int, *, what: str = "instance",
                use_captions: bool = True, bucketing: bool = False, bucket_step: int = 64,
                small_images: str = "upscale", caption_extension: str = ".txt", masks: str | None = None,
                mask_dir: str | Path | None = None) -> DreamBoothImages:
    """Read every image of `folder` once: skip unreadable files (listed in one warning), check sizes, pick captions
    and buckets. `masks`: None (no masked loss), "files" (a mask file per image, in `mask_dir` or beside it as
    <stem>_mask.png: those files are not training images) or "alpha" (each image's alpha channel)."""
    files = list_images(folder, what)
    if masks == "files" and mask_dir is None:
        stems = {p.stem for p in files}
        files = [p for p in files if not _is_mask_file(p, stems)]
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
        captions.append(read_caption(path, prompt, caption_extension) if use_captions else prompt)
        chosen.append(nearest_bucket(image.size, buckets))
    if skipped:
        warnings.warn(f"skipping {len(skipped)} of {len(files)} image file(s) in the {what} folder {str(folder)!r} "
                      f"that cannot be read: {name_list(skipped)}", stacklevel=2)
    if not paths:
        raise ImageFolderError(
            f"none of the {len(files)} image file(s) in the {what} folder {str(folder)!r} could be read "
            f"(first: {files[0].name}); expected JPEG/PNG/WebP images")
    found: tuple[Path | None, ...] = ()
    if masks == "files" and mask_dir is not None and not Path(mask_dir).is_dir():
        raise ImageFolderError(f"the mask folder {str(mask_dir)!r} does not exist or is not a folder; expected a "
                               "folder of masks named as the instance images")
    if masks == "files":
        found = tuple(mask_path(p, mask_dir) for p in paths)
        missing = [p.name for p, m in zip(paths, found) if m is None]
        if missing:
            where = (f"in the mask folder {str(mask_dir)!r} (same name, any image suffix)" if mask_dir is not None
                     else f"beside it (<name>{MASK_SUFFIX}.png)")
            raise ImageFolderError(f"--masked_loss: {len(missing)} {what} image(s) have no mask file {where}: "
                                   f"{name_list(missing)}; add the masks (white = trained, black = ignored), or "
                                   "use --alpha_mask for masks in the images' alpha channel")
    elif masks == "alpha":
        found = (None,) * len(paths)
    return DreamBoothImages(tuple(paths), tuple(captions), tuple(chosen), found)


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
        masks = tuple(images.masks[i] for i in idx) if images.masks else ()
        return DreamBoothImages(*(tuple(getattr(images, f)[i] for i in idx) for f in ("paths", "captions", "buckets")),
                                masks)

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
    bucket = images.buckets[index]
    crop, top_left = resize_and_crop(image, bucket, center_crop, rng)
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    mask = None
    if images.masks:
        m = load_mask(path, images.masks[index], image.size)
        if m is not None:  # the same resize, crop box and flip as the pixels
            m = m.resize(cover_size(image.size, bucket), Image.Resampling.BILINEAR)
            m = m.crop((top_left[1], top_left[0], top_left[1] + bucket[0], top_left[0] + bucket[1]))
            if flip:
                m = m.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            mask = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None]
        else:  # no alpha channel: every pixel counts
            mask = torch.ones((1, bucket[1], bucket[0]))
    return Example(to_tensor(crop), images.captions[index], original, top_left, str(path), flip, mask)


def load_mask(image_path: Path, mask_file: Path | None, size: tuple[int, int]) -> Image.Image | None:
    """The mask of an image of `size` (width, height) as 8-bit grayscale: `mask_file`, or with None the image's
    alpha channel (None when it has none). A mask of another size with the same aspect ratio is resized to the
    image; another aspect ratio is an ImageFolderError naming both files and sizes."""
    source = mask_file if mask_file is not None else image_path
    try:
        mask = open_image(source, to_mask if mask_file is not None else alpha_channel)
    except UnreadableImageError as err:
        raise ImageFolderError(f"{err}; it is the mask of {image_path}: fix or replace it") from None
    if mask is None or mask.size == size:
        return mask
    if abs(mask.width / mask.height - size[0] / size[1]) > 0.01 * size[0] / size[1]:
        raise ImageFolderError(f"the mask {source} is {mask.width}x{mask.height} but its image {image_path} is "
                               f"{size[0]}x{size[1]}; expected the same size (or aspect ratio): redraw or resize the "
                               "mask")
    return mask.resize(size, Image.Resampling.BILINEAR)
