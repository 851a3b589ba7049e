"""The one PNG writer and the one grid maker: images from `lora-vision generate` and from training (class images,
validation grids, strength sweeps)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..io import atomic_path, atomic_write_text


def save_png(image: Any, path: str | Path, infotext: str | None = None, sidecar: dict | None = None) -> Path:
    """Write `image` as a PNG atomically; with `infotext`, as A1111's "parameters" text chunk (what its PNG Info
    reads); with `sidecar`, also a JSON file next to it (same name, .json), written atomically too."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    info = None
    if infotext is not None:
        info = PngInfo()
        info.add_text("parameters", infotext)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    if sidecar is not None:
        atomic_write_text(path.with_suffix(".json"), json.dumps(sidecar, indent=2, ensure_ascii=False) + "\n")
    return path


def make_grid(images: Sequence[Sequence[Any]], row_labels: Sequence[str] = (), col_labels: Sequence[str] = (),
              title: str = "") -> Any:
    """Rows of equally sized images pasted into one image; optional column labels on top, row labels on the left
    and a title line above everything (no strip is added for what is not given)."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = images[0][0].size
    size = max(10, min(24, w // 12))
    font = ImageFont.load_default(size=size)
    pad = size + 8
    left = max((int(font.getlength(t)) for t in row_labels), default=0) + 12 if any(row_labels) else 0
    top = pad * (bool(title) + bool(col_labels))
    grid = Image.new("RGB", (left + w * len(images[0]), top + h * len(images)), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((4, 4), title, fill="black", font=font)
    for j, t in enumerate(col_labels):
        draw.text((left + j * w + (w - font.getlength(t)) / 2, top - pad + 4), t, fill="black", font=font)
    for i, row in enumerate(images):
        if row_labels and row_labels[i]:
            draw.text((4, top + i * h + h / 2 - size / 2), row_labels[i], fill="black", font=font)
        for j, im in enumerate(row):
            grid.paste(im, (left + j * w, top + i * h))
    return grid
