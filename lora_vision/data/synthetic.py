"""Procedural image classes (stripes, checkerboards, rings, ...) written as an ImageFolder tree.

The class is the geometry of the pattern; colours, frequency, phase and noise vary per image, so a model has to
learn the shape, not a colour. Used by samples/vit/make_samples.py and by the tests (learnable, not random labels).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

PATTERNS = ("hstripes", "vstripes", "checker", "rings", "diagonal", "antidiagonal", "dots", "cross")


def pattern_image(kind: str, size: int, rng: np.random.Generator, noise: float = 0.1) -> np.ndarray:
    """One (size, size, 3) uint8 image of pattern `kind` with random colours, frequency, phase and noise."""
    if kind not in PATTERNS:
        raise ValueError(f"unknown pattern {kind!r}; choose from {PATTERNS}")
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    freq = rng.uniform(2.5, 4.5)
    phase = rng.uniform(0, 2 * np.pi)
    cy, cx = rng.uniform(0.3, 0.7, size=2)
    if kind == "hstripes":
        v = np.sin(2 * np.pi * freq * y + phase)
    elif kind == "vstripes":
        v = np.sin(2 * np.pi * freq * x + phase)
    elif kind == "checker":
        v = np.sin(2 * np.pi * freq * x + phase) * np.sin(2 * np.pi * freq * y + phase)
    elif kind == "rings":
        v = np.sin(2 * np.pi * freq * np.hypot(x - cx, y - cy) * 1.5 + phase)
    elif kind == "diagonal":
        v = np.sin(2 * np.pi * freq * (x + y) / 1.4 + phase)
    elif kind == "antidiagonal":
        v = np.sin(2 * np.pi * freq * (x - y) / 1.4 + phase)
    elif kind == "dots":
        v = np.cos(2 * np.pi * freq * x + phase) + np.cos(2 * np.pi * freq * y + phase) - 1.0
    else:  # cross: one bright horizontal and one vertical bar
        w = rng.uniform(0.06, 0.12)
        v = np.where((np.abs(x - cx) < w) | (np.abs(y - cy) < w), 1.0, -1.0)
    mask = (np.tanh(3 * v) + 1) / 2  # soft two-tone pattern in [0, 1]
    fg = rng.uniform(0, 1, size=3)
    bg = (fg + rng.uniform(0.35, 0.65, size=3)) % 1.0  # always a clear contrast between the two tones
    img = mask[..., None] * fg + (1 - mask[..., None]) * bg
    img = img + rng.normal(0, noise, size=img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def make_pattern_folder(root: str | Path, classes: tuple[str, ...] = PATTERNS[:4], per_class: int = 40,
                        size: int = 32, seed: int = 0, fmt: str = "png") -> Path:
    """Write `root/<class>/<class>_<i>.<fmt>` for each pattern class; returns `root`. Deterministic in `seed`."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for kind in classes:
        d = root / kind
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.fromarray(pattern_image(kind, size, rng))
            path = d / f"{kind}_{i:03d}.{fmt}"
            if fmt == "jpg":
                img.save(path, quality=90)
            else:
                img.save(path, optimize=True)
    return root


def write_blank_png(path: str | Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit PNG of any size, written without building it in memory: 20000x20000 is about 50 KB.

    For decompression-bomb tests (PIL refuses more than 2 * Image.MAX_IMAGE_PIXELS pixels).
    """
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits of one row
    packer = zlib.compressobj(9)
    rows = 256
    data = b"".join(packer.compress(row * min(rows, height - y)) for y in range(0, height, rows)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale, no interlace
    path = Path(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path
