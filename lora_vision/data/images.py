"""Reading training images and captions safely: EXIF rotation, any PIL mode to RGB, unreadable files named.

`open_image` is the one way both recipes open an image. Policy (documented in the README):
- a file that is not an image, cannot be decoded, or is larger than PIL's decompression-bomb limit
  (`PIL.Image.MAX_IMAGE_PIXELS`, twice it for an outright refusal) is unreadable: the DreamBooth folder scan names it
  in a warning and skips it (when no usable image is left, the folder is rejected with an error that lists what was
  found); the ViT recipe stops naming it unless --skip_corrupt is given;
- a caption or list file must be UTF-8 text (a byte-order mark is allowed); otherwise the error names the file;
- an image smaller than the training resolution (its shorter side) is upscaled with a warning, unless
  `min_side_policy="error"`, which rejects it with a message naming the file and both sizes.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class ImageFolderError(ValueError):
    """An image folder is missing, empty or holds no usable image."""


class UnreadableImageError(ValueError):
    """One image file cannot be opened or decoded; the message names the file and says why."""

    def __init__(self, message: str, *, path: str | Path | None = None, reason: str = "") -> None:
        # A DataLoader worker's exception reaches the main process as `type(text of the worker's whole traceback)`
        # (torch/_utils.py, ExceptionWrapper.reraise): keep only our own line, the last one of that text.
        if message.startswith("Caught ") and "Original Traceback" in message:
            message = message.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1]
        super().__init__(message)
        self.path, self.reason = path, reason


class TextFileError(ValueError):
    """A caption or list file cannot be read as UTF-8 text."""


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


def alpha_channel(image: Image.Image) -> Image.Image | None:
    """The alpha channel of an image as 8-bit grayscale (255 = opaque), or None when it has none."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return image.getchannel("A")
    return None


def to_mask(image: Image.Image) -> Image.Image:
    """A mask file as 8-bit grayscale (white = 255): any mode converted, alpha ignored, 16-bit scaled down."""
    return to_rgb(image).convert("L")


def open_image(path: str | Path, convert: Callable[[Image.Image], Image.Image | None] = to_rgb) -> Image.Image:
    """Open an image, apply its EXIF orientation and convert it to RGB; raises UnreadableImageError naming the file.

    An image over PIL's decompression-bomb limit is refused before it is decoded (a few KB of PNG can hold
    20000x20000 pixels); one between the warning and the refusal levels is read, with a warning naming it.
    `convert` replaces the conversion to RGB (`to_mask` for a mask file, `alpha_channel` for an image's alpha,
    which gives None when there is none).
    """
    try:
        with warnings.catch_warnings():
            # PIL's own warning names no file: it is replaced by the one below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                pixels = im.width * im.height
                im.load()
                image = convert(ImageOps.exif_transpose(im))
    except Image.DecompressionBombError as err:
        reason = f"too large to decode safely, a possible decompression bomb ({err})"
        raise UnreadableImageError(f"cannot read image {path}: {reason}", path=path, reason=reason) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error) as err:
        reason = f"not a readable image ({type(err).__name__}: {err})"
        raise UnreadableImageError(f"cannot read image {path}: {reason}", path=path, reason=reason) from None
    if image is not None and Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
        warnings.warn(f"{path} is {image.width}x{image.height} ({pixels:,} pixels), over PIL's decompression-bomb "
                      f"warning limit of {Image.MAX_IMAGE_PIXELS:,}; it is read, but a smaller copy saves memory",
                      stacklevel=2)
    return image


def load_image(path: str | Path) -> Image.Image | None:
    """`open_image`, but None (with a warning naming the file and why) if it is unreadable."""
    try:
        return open_image(path)
    except UnreadableImageError as err:
        warnings.warn(f"skipping: {err}", stacklevel=2)
        return None


def name_list(names: Sequence[str], limit: int = 20) -> str:
    """`a, b, c` for messages that list files: at most `limit` names, then how many more."""
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def read_text(path: str | Path, what: str = "text file") -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped); the error names the file and what to do."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TextFileError(f"cannot read {what} {path}: {err.strerror or err}; check that it is a readable "
                            f"file") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        utf16 = " (it looks like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise TextFileError(f"{what} {path} is not UTF-8 text{utf16}: byte 0x{data[err.start]:02x} at offset "
                            f"{err.start} ({err.reason}); save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


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
