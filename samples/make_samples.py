"""Redraw the DreamBooth sample set: six photos of one synthetic subject, "sks toy".

Usage: python samples/make_samples.py [OUT_DIR]   (default: samples/, next to this file)

The subject is a red rounded box with a yellow stripe across its middle and two black buttons above it, standing
on a shadow. Each image varies its size, position, tilt and the background (colour and texture). Uses PIL and
numpy only and draws the same bytes on every run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 4  # draw the subject at 4x and downsample, for smooth edges
JPEG_QUALITY = 85

PROMPTS = [
    "a photo of sks toy",
    "a photo of sks toy on a beach",
    "a close up photo of sks toy on a wooden table",
    "a painting of sks toy in the style of van gogh",
    "sks toy in the snow",
]


@dataclass(frozen=True)
class Shot:
    """One instance image: canvas size, background, subject placement, and an optional caption."""

    name: str
    size: tuple[int, int]  # (width, height)
    background: str  # "table" | "grass" | "checker" | "gradient" | "paper" | "dots"
    colour: tuple[int, int, int]  # main background colour
    centre: tuple[float, float]  # subject centre, as a fraction of (width, height)
    scale: float  # subject width, as a fraction of the canvas width
    tilt: float  # degrees, counter-clockwise
    caption: str | None = None


SHOTS = [
    Shot("toy_00", (128, 128), "table", (52, 88, 170), (0.50, 0.55), 0.55, 0.0,
         "a photo of sks toy on a blue table"),
    Shot("toy_01", (112, 112), "grass", (62, 140, 58), (0.34, 0.60), 0.40, 8.0,
         "a photo of sks toy on green grass"),
    Shot("toy_02", (96, 96), "checker", (214, 196, 160), (0.58, 0.50), 0.62, -6.0),
    Shot("toy_03", (128, 96), "gradient", (150, 150, 160), (0.68, 0.52), 0.36, 12.0),
    Shot("toy_04", (96, 128), "paper", (236, 234, 226), (0.48, 0.62), 0.58, -12.0),
    Shot("toy_05", (120, 120), "dots", (176, 120, 170), (0.42, 0.45), 0.46, 4.0),
]


def draw_background(kind: str, size: tuple[int, int], colour: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    """A textured background of the given kind and main colour."""
    w, h = size
    base = np.asarray(colour, dtype=np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "table":  # wood grain: wavy horizontal bands
        grain = np.sin(ys / 3.0 + 2.0 * np.sin(xs / 17.0)) * 0.5 + 0.5
        img = base * (0.80 + 0.25 * grain[..., None])
    elif kind == "grass":  # blades: blurred vertical noise
        noise = rng.normal(0.0, 1.0, (h // 4 + 1, w)).repeat(4, axis=0)[:h]
        img = base * (0.85 + 0.18 * noise[..., None])
    elif kind == "checker":  # floor tiles
        tiles = ((xs // 16 + ys // 16) % 2)[..., None]
        img = base * (0.75 + 0.30 * tiles)
    elif kind == "gradient":  # studio backdrop, lighter at the top
        img = base * (1.20 - 0.45 * (ys / h))[..., None]
    elif kind == "paper":  # fine speckle
        img = base + rng.normal(0.0, 6.0, (h, w, 1))
    elif kind == "dots":  # polka dots
        dots = (((xs % 20) - 10) ** 2 + ((ys % 20) - 10) ** 2 < 16)[..., None]
        img = np.where(dots, base * 1.35, base)
    else:
        raise ValueError(f"unknown background {kind!r}; expected table, grass, checker, gradient, paper or dots")
    img = img + rng.normal(0.0, 3.0, img.shape[:2] + (3,))  # a little sensor noise everywhere
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def draw_toy(width: int) -> Image.Image:
    """The subject on a transparent RGBA canvas, `width` pixels wide (before supersampling)."""
    s = width * SUPERSAMPLE
    body_w, body_h = s, int(s * 0.72)
    pad = s // 4
    canvas = Image.new("RGBA", (s + 2 * pad, body_h + 2 * pad), (0, 0, 0, 0))
    d = ImageDraw.Draw(canvas)
    x0, y0 = pad, pad
    radius = s // 6
    d.rounded_rectangle((x0, y0, x0 + body_w, y0 + body_h), radius=radius, fill=(200, 30, 36, 255),
                        outline=(120, 12, 18, 255), width=max(2, s // 40))
    stripe_top, stripe_h = y0 + int(body_h * 0.52), int(body_h * 0.18)
    d.rectangle((x0 + max(2, s // 40), stripe_top, x0 + body_w - max(2, s // 40), stripe_top + stripe_h),
                fill=(250, 208, 40, 255))
    button_r = s // 14
    for fx in (0.33, 0.67):
        cx, cy = x0 + int(body_w * fx), y0 + int(body_h * 0.28)
        d.ellipse((cx - button_r, cy - button_r, cx + button_r, cy + button_r), fill=(20, 20, 24, 255))
        d.ellipse((cx - button_r // 3, cy - button_r // 2, cx, cy - button_r // 6), fill=(230, 230, 230, 255))
    return canvas


def render(shot: Shot, rng: np.random.Generator) -> Image.Image:
    """One instance image: background, soft shadow, tilted toy."""
    w, h = shot.size
    image = draw_background(shot.background, shot.size, shot.colour, rng)
    toy_w = max(8, int(w * shot.scale))
    toy = draw_toy(toy_w).rotate(shot.tilt, resample=Image.BICUBIC, expand=True)
    toy = toy.resize((toy.width // SUPERSAMPLE, toy.height // SUPERSAMPLE), Image.LANCZOS)
    cx, cy = int(w * shot.centre[0]), int(h * shot.centre[1])

    shadow = Image.new("L", shot.size, 0)
    sh_w, sh_h = int(toy_w * 0.60), max(3, int(toy_w * 0.12))
    shadow_y = cy + int(toy_w * 0.36)
    ImageDraw.Draw(shadow).ellipse((cx - sh_w, shadow_y - sh_h, cx + sh_w, shadow_y + sh_h), fill=110)
    shadow = shadow.filter(ImageFilter.GaussianBlur(max(1, toy_w // 12)))
    image.paste(Image.new("RGB", shot.size, (20, 20, 20)), (0, 0), shadow)

    image.paste(toy, (cx - toy.width // 2, cy - toy.height // 2), toy)
    return image


def main(out_dir: Path) -> None:
    """Write instance/*.jpg (+ captions) and prompts.txt under out_dir."""
    instance = out_dir / "instance"
    instance.mkdir(parents=True, exist_ok=True)
    for index, shot in enumerate(SHOTS):
        rng = np.random.default_rng(1000 + index)
        render(shot, rng).save(instance / f"{shot.name}.jpg", quality=JPEG_QUALITY, optimize=True)
        caption = instance / f"{shot.name}.txt"
        if shot.caption is not None:
            caption.write_text(shot.caption + "\n", encoding="utf-8")
        elif caption.exists():
            caption.unlink()
    (out_dir / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    print(f"wrote {len(SHOTS)} images to {instance} and {len(PROMPTS)} prompts to {out_dir / 'prompts.txt'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
