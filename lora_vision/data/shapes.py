"""Captioned procedural scenes for pretraining the tiny text-to-image model, and the one subject it never sees.

A scene is one, two or three flat shapes of one colour and size on a plain background, with a caption that says so:
"a photo of a large red circle on the left on a blue background", "three small white crosses on a black background".
6 shapes x 8 colours x 2 sizes x (5 positions + 2 counts) x 8 backgrounds: over 5,000 full captions, and more with
the parts a caption may leave out. Scenes are drawn with torch (on any device, a batch at a time, anti-aliased by
supersampling), so the generator's own labels are the ground truth for measuring prompt following.

The DreamBooth subject, "sks toy", is a small pink robot with teal stripes, eyes and an antenna: neither its
colours nor its shape nor the words "sks" and "toy" occur in the scenes (tests/test_shapes.py checks this).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 215, 40), "green": (40, 170, 70),
    "blue": (40, 90, 220), "purple": (140, 60, 190), "white": (245, 245, 245), "black": (25, 25, 25),
}
BACKGROUNDS: tuple[str, ...] = ("white", "gray", "black", "red", "green", "blue", "yellow", "purple")
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {**COLOURS, "gray": (128, 128, 128)}
SIZES: tuple[str, ...] = ("small", "large")
# Where a single shape stands (centre as a fraction of width, height).
POSITIONS: dict[str, tuple[float, float]] = {
    "on the left": (0.28, 0.5), "on the right": (0.72, 0.5), "at the top": (0.5, 0.28),
    "at the bottom": (0.5, 0.72), "in the middle": (0.5, 0.5),
}
COUNTS: tuple[str, ...] = ("one", "two", "three")

# The subject's own colours, far from every scene colour.
SUBJECT_RGB: dict[str, tuple[int, int, int]] = {"pink": (250, 130, 200), "teal": (20, 165, 165)}
SUBJECT_WORDS: tuple[str, ...] = ("sks", "toy")

# Every word of the captions, for a tokenizer that gives each its own token.
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(
    ("a", "photo", "of", "on", "the", "at", "in", "background")
    + SHAPES + tuple(s + "s" for s in SHAPES) + tuple(COLOURS) + ("gray",) + SIZES
    + ("left", "right", "top", "bottom", "middle") + COUNTS[1:] + SUBJECT_WORDS
))

# Radii as a fraction of the image side: [count 1, count 2-3] x [small, large], low and high.
_RADIUS = {(1, "small"): (0.10, 0.13), (1, "large"): (0.19, 0.23),
           (2, "small"): (0.08, 0.10), (2, "large"): (0.12, 0.14)}
_ROW_X = {2: (0.3, 0.7), 3: (0.18, 0.5, 0.82)}
_COLOUR_JITTER = 12.0


@dataclass(frozen=True)
class Scenes:
    """A batch of scenes: images in [-1, 1] (N, 3, H, W), captions, and the integer labels of what was drawn.

    Labels index SHAPES, COLOURS, BACKGROUNDS, SIZES, COUNTS (0 = one) and POSITIONS (-1 when several shapes).
    """

    images: torch.Tensor
    captions: list[str]
    labels: dict[str, torch.Tensor]


def _unit_grid(height: int, width: int, supersample: int, device: torch.device | str) -> tuple[torch.Tensor, ...]:
    """Pixel-centre coordinates (y, x) in units of the shorter side, at `supersample` times the resolution."""
    side = min(height, width)
    ys = (torch.arange(height * supersample, device=device) + 0.5) / (supersample * side)
    xs = (torch.arange(width * supersample, device=device) + 0.5) / (supersample * side)
    return ys.view(1, -1, 1), xs.view(1, 1, -1)


def shape_masks(dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Masks of every shape in SHAPES for offsets in units of the radius: (len(SHAPES), *broadcast shape), bool."""
    ax, ay = dx.abs(), dy.abs()
    d2 = dx * dx + dy * dy
    circle = d2 <= 1.0
    square = torch.maximum(ax, ay) <= 0.82
    triangle = (dy >= -0.9) & (dy <= 0.75) & (ax <= 0.95 * (dy + 0.9) / 1.65)
    diamond = ax + ay <= 1.05
    cross = ((ax <= 0.33) & (ay <= 0.95)) | ((ay <= 0.33) & (ax <= 0.95))
    ring = circle & (d2 >= 0.55 ** 2)
    return torch.stack(torch.broadcast_tensors(circle, square, triangle, diamond, cross, ring))


def caption_of(shape: int, colour: int, background: int, size: int, count: int, position: int,
               keep: tuple[bool, bool, bool, bool] = (True, True, True, True)) -> str:
    """The caption of one scene; `keep` = (say "a photo of", say the size, say the position, say the background)."""
    photo, say_size, say_position, say_background = keep
    colour_word, size_word = list(COLOURS)[colour], SIZES[size]
    noun = SHAPES[shape] + ("s" if count else "")
    words = ["a photo of"] if photo else []
    words.append("a" if count == 0 else COUNTS[count])
    words += ([size_word] if say_size else []) + [colour_word, noun]
    if count == 0 and say_position:
        words.append(list(POSITIONS)[position])
    if say_background:
        words.append(f"on a {BACKGROUNDS[background]} background")
    return " ".join(words)


def _colours(names: list[str], table: dict[str, tuple[int, int, int]]) -> torch.Tensor:
    return torch.tensor([table[n] for n in names], dtype=torch.float32)


def draw_scenes(n: int, generator: torch.Generator, size: int = 64, device: torch.device | str = "cpu",
                supersample: int = 2, drop: float = 0.2) -> Scenes:
    """Draw `n` random scenes of `size` x `size` pixels with their captions and labels.

    Each optional part of a caption ("a photo of", size, position, background) is left out with probability `drop`;
    the image always has all of them. Random numbers come from `generator` (a CPU generator), so a seed gives the
    same batch on every device.
    """
    g = generator
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    colour = torch.randint(len(COLOURS), (n,), generator=g)
    # A background of the shape's own colour would hide it: draw among the others.
    bg_names = list(BACKGROUNDS)
    colour_names = list(COLOURS)
    choice = torch.randint(len(BACKGROUNDS) - 1, (n,), generator=g)
    background = torch.tensor([
        [i for i, b in enumerate(bg_names) if b != colour_names[c]][k] for c, k in zip(colour.tolist(), choice.tolist())
    ])
    count = torch.multinomial(torch.tensor([0.6, 0.2, 0.2]), n, replacement=True, generator=g)
    size_i = torch.randint(len(SIZES), (n,), generator=g)
    position = torch.randint(len(POSITIONS), (n,), generator=g)
    position = torch.where(count == 0, position, torch.full_like(position, -1))
    keep = torch.rand(n, 4, generator=g) >= drop

    # Up to three shapes per scene, in a row when several: centres and radii (unused slots get radius 0).
    u = torch.rand(n, 3, 3, generator=g)
    lo_hi = torch.tensor([[_RADIUS[(min(k, 2), s)] for s in SIZES] for k in (1, 2, 3)])  # (count, size, 2)
    lo, hi = lo_hi[count, size_i].unbind(-1)
    r = (lo + (hi - lo) * u[:, 0, 2]).unsqueeze(1)
    single_xy = torch.tensor(list(POSITIONS.values()))[position.clamp_min(0)]  # (n, 2)
    row_x = torch.tensor([[0.0, 0.0, 0.0], [*_ROW_X[2], 0.0], list(_ROW_X[3])])[count]  # (n, 3)
    row_y = (0.35 + 0.3 * u[:, 0, 0]).unsqueeze(1)
    single = (count == 0).unsqueeze(1)
    cx = torch.where(single, single_xy[:, :1] + 0.1 * (u[:, 0, :1] - 0.5), row_x + 0.06 * (u[:, :, 1] - 0.5))
    cy = torch.where(single, single_xy[:, 1:] + 0.1 * (u[:, 0, 1:2] - 0.5), row_y + 0.08 * (u[:, :, 2] - 0.5))
    used = torch.arange(3).unsqueeze(0) <= count.unsqueeze(1)
    radius = torch.where(used, r.expand(n, 3), torch.zeros(n, 3))
    fg = _colours([colour_names[c] for c in colour.tolist()], COLOURS)
    bg = _colours([bg_names[b] for b in background.tolist()], BACKGROUND_RGB)
    fg = (fg + _COLOUR_JITTER * (2 * torch.rand(n, 3, generator=g) - 1)).clamp(0, 255)
    bg = (bg + _COLOUR_JITTER * (2 * torch.rand(n, 3, generator=g) - 1)).clamp(0, 255)

    ys, xs = _unit_grid(size, size, supersample, device)
    cx, cy, radius, shape_d = cx.to(device), cy.to(device), radius.to(device), shape.to(device)
    inside = torch.zeros(n, size * supersample, size * supersample, dtype=torch.bool, device=device)
    for j in range(3):
        r = radius[:, j].clamp_min(1e-6).view(n, 1, 1)
        masks = shape_masks((ys - cy[:, j].view(n, 1, 1)) / r, (xs - cx[:, j].view(n, 1, 1)) / r)  # (6, n, H, W)
        mine = masks.gather(0, shape_d.view(1, n, 1, 1).expand(1, n, *masks.shape[2:]))[0]
        inside |= mine & (radius[:, j] > 0).view(n, 1, 1)
    m = inside.float().unsqueeze(1)
    image = m * fg.to(device).view(n, 3, 1, 1) + (1 - m) * bg.to(device).view(n, 3, 1, 1)
    image = torch.nn.functional.avg_pool2d(image, supersample) / 127.5 - 1.0

    captions = [caption_of(int(shape[i]), int(colour[i]), int(background[i]), int(size_i[i]), int(count[i]),
                           int(position[i]), tuple(bool(v) for v in keep[i])) for i in range(n)]
    labels = {"shape": shape, "colour": colour, "background": background, "size": size_i, "count": count,
              "position": position}
    return Scenes(image, captions, labels)


def draw_subject(width: int, height: int, centre: tuple[float, float], scale: float, background: str,
                 rng: np.random.Generator, supersample: int = 4) -> np.ndarray:
    """The DreamBooth subject, "sks toy", on a plain background: an (height, width, 3) uint8 image.

    A pink robot: a rounded body with a teal band, two teal eyes, and a teal ball on an antenna. `centre` is a
    fraction of (width, height); `scale` is the body's half-height as a fraction of the shorter side.
    """
    ys, xs = _unit_grid(height, width, supersample, "cpu")
    side = min(width, height)
    dx = (xs - centre[0] * width / side) / scale
    dy = (ys - centre[1] * height / side) / scale
    # Rounded body: a box with half-sizes (0.62, 0.7), corners of radius 0.25.
    qx, qy = (dx.abs() - 0.37).clamp_min(0), ((dy - 0.2).abs() - 0.45).clamp_min(0)
    body = (qx * qx + qy * qy <= 0.25 ** 2) & (dx.abs() <= 0.62) & ((dy - 0.2).abs() <= 0.7)
    band = body & ((dy - 0.55).abs() <= 0.12)
    eyes = ((dx.abs() - 0.26) ** 2 + (dy + 0.05) ** 2) <= 0.13 ** 2
    stick = (dx.abs() <= 0.05) & (dy >= -0.78) & (dy <= -0.5)
    ball = (dx * dx + (dy + 0.85) ** 2) <= 0.17 ** 2
    pink = torch.tensor(SUBJECT_RGB["pink"], dtype=torch.float32).view(3, 1, 1)
    teal = torch.tensor(SUBJECT_RGB["teal"], dtype=torch.float32).view(3, 1, 1)
    jitter = torch.from_numpy(rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, 3).astype(np.float32)).view(3, 1, 1)
    bgc = torch.tensor(BACKGROUND_RGB[background], dtype=torch.float32).view(3, 1, 1) + jitter
    teal_mask = (band | (eyes & body) | stick | ball).float()
    pink_mask = body.float() * (1 - teal_mask)
    image = teal_mask * teal + pink_mask * pink + (1 - teal_mask - pink_mask) * bgc
    image = torch.nn.functional.avg_pool2d(image.unsqueeze(0), supersample)[0]
    return image.clamp(0, 255).round().byte().permute(1, 2, 0).numpy()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) images in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
