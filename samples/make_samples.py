"""Redraw the DreamBooth sample set: six photos of one subject, "sks toy", that the tiny model never saw.

Usage: python samples/make_samples.py [OUT_DIR]   (default: samples/, next to this file)

The subject (lora_vision.data.shapes.draw_subject) is a pink robot with a teal band, teal eyes and a teal ball on an
antenna: colours and a shape that the pretraining scenes of samples/tiny-sd never contain. Each image puts it on a
plain background the pretraining knows, at its own size, position and canvas shape (one 4:3, one 3:4), with a
caption naming the background. Green and red backgrounds are left out on purpose: the main job's validation prompts
ask for them. Draws the same bytes on every run.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout
    sys.path.insert(0, str(REPO))

from lora_vision.data.shapes import draw_subject  # noqa: E402

JPEG_QUALITY = 95

PROMPTS = [
    "a photo of sks toy",
    "a photo of sks toy on a green background",
    "a photo of sks toy on a red background",
    "a photo of sks toy on a white background",
    "a photo of a large red circle on a blue background",
]


@dataclass(frozen=True)
class Shot:
    """One instance image: canvas size, background, where the subject stands and how big it is."""

    name: str
    size: tuple[int, int]  # (width, height)
    background: str  # a name in lora_vision.data.shapes.BACKGROUNDS
    centre: tuple[float, float]  # subject centre, as a fraction of (width, height)
    scale: float  # the body's half-height, as a fraction of the shorter side


SHOTS = [
    Shot("toy_00", (128, 128), "blue", (0.50, 0.50), 0.30),
    Shot("toy_01", (112, 112), "yellow", (0.42, 0.52), 0.26),
    Shot("toy_02", (96, 96), "gray", (0.56, 0.48), 0.32),
    Shot("toy_03", (128, 96), "purple", (0.55, 0.52), 0.28),
    Shot("toy_04", (96, 128), "white", (0.48, 0.55), 0.30),
    Shot("toy_05", (120, 120), "black", (0.47, 0.50), 0.27),
]


def main(out_dir: Path) -> None:
    """Write instance/*.jpg with a .txt caption each, and prompts.txt, under out_dir."""
    instance = out_dir / "instance"
    instance.mkdir(parents=True, exist_ok=True)
    for index, shot in enumerate(SHOTS):
        rng = np.random.default_rng(1000 + index)
        image = draw_subject(*shot.size, shot.centre, shot.scale, shot.background, rng)
        Image.fromarray(image).save(instance / f"{shot.name}.jpg", quality=JPEG_QUALITY)
        (instance / f"{shot.name}.txt").write_text(f"a photo of sks toy on a {shot.background} background\n",
                                                   encoding="utf-8")
    (out_dir / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    print(f"wrote {len(SHOTS)} images to {instance} and {len(PROMPTS)} prompts to {out_dir / 'prompts.txt'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
