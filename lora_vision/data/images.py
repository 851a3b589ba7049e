"""Reading training images safely: EXIF rotation, any PIL mode to RGB, corrupt files named and skipped.

Policy (documented in the README):
- a file that is not an image or cannot be decoded is named in a warning and skipped; when no usable image is left,
  the folder is rejected with an error that lists what was found;
- an image smaller than the training resolution (its shorter side) is upscaled with a warning, unless
  `min_side_policy="error"`, which rejects it with a message naming the file and both sizes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class ImageFolderError(ValueError):
    """An image folder is missing, empty or holds no usable image."""


def list_images(folder: str | Path, what: str = "instance") -> list[Path]:
    """The image files of `folder` (by suffix, sorted); raises ImageFolderError when there are none."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ImageFolderError(
            f"the {what} folder {str(path)!r} does not exist or is not a folder; expected a folder of images "
            f"({', '.join(IMAGE_SUFFIXES)})")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        others = sorted(p.name for p in path.iterdir())[:5]
        raise ImageFolderError(
            f"the {what} folder {str(path)!r} has no images; expected files ending in {', '.join(IMAGE_SUFFIXES)}"
            + (f" (found: {', '.join(others)})" if others else " (it is empty)"))
    return files


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha composited on white, L/P/CMYK converted, 16-bit scaled down."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def load_image(path: str | Path) -> Image.Image | None:
    """Open an image, apply its EXIF orientation and convert it to RGB; None (with a warning) if it is unreadable."""
    try:
        with Image.open(path) as im:
            im.load()
            image = ImageOps.exif_transpose(im)
            return to_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        warnings.warn(f"skipping {path}: not a readable image ({type(err).__name__}: {err})", stacklevel=2)
        return None


def check_size(image: Image.Image, path: Path, resolution: int, policy: str) -> None:
    """Warn (policy "upscale") or raise (policy "error") when the shorter side is below `resolution`."""
    short = min(image.size)
    if short >= resolution:
        return
    msg = (f"{path} is {image.size[0]}x{image.size[1]}, smaller than the training resolution {resolution} "
           f"(shorter side {short} < {resolution})")
    if policy == "error":
        raise ImageFolderError(msg + "; use larger images, lower --resolution, or pass --small_images upscale")
    warnings.warn(msg + "; it is upscaled, which may blur it", stacklevel=2)
