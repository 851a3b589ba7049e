"""Images made with the pipeline during training: class images for prior preservation, validation grids, and the
final strength sweep. Grids are PNGs (rows = seeds, columns = strengths or one column per seed), made and written
by lora_vision.generation.images.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from ...data.images import IMAGE_SUFFIXES
from ...generation.images import make_grid, save_png
from ...lora.ops import set_strength


def generate_images(pipe, prompts: list[str], seeds: Sequence[int], steps: int, resolution: int,
                    guidance_scale: float = 7.5) -> list[Image.Image]:
    """One image per (prompt, seed) pair, square at `resolution`, each from its own CPU generator seeded with its
    seed (so an image depends only on its prompt and seed, not on the batch it is in)."""
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    with torch.no_grad():
        out = pipe(prompts, num_inference_steps=steps, height=resolution, width=resolution, generator=generators,
                   guidance_scale=guidance_scale, output_type="pil")
    return list(out.images)


def generate_class_images(pipe, prompt: str, folder: str | Path, wanted: int, batch_size: int, steps: int,
                          resolution: int, seed: int = 0, rank: int = 0, world: int = 1) -> int:
    """Top the class folder up to `wanted` images with the base pipeline (batched, with a progress bar).

    Images are kept in the folder for the next run. Returns how many were missing (all processes together).
    Split across processes: process `rank` of `world` makes missing images rank, rank + world, ...; each image's
    name and seed depend only on its number, so the result does not depend on the number of processes. Every
    process must see the same folder when it counts (wait for all before calling) and wait for all afterwards.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    missing = missing_class_images(folder, wanted)
    if not missing:
        return 0
    have = wanted - missing
    tag = hashlib.sha1(prompt.encode()).hexdigest()[:8]
    mine = [have + i for i in range(rank, missing, world)]
    with tqdm(total=len(mine), desc="generating class images", unit="image", disable=rank != 0) as bar:
        for first in range(0, len(mine), batch_size):
            numbers = mine[first:first + batch_size]
            seeds = [seed * 100_003 + k for k in numbers]
            for k, image in zip(numbers, generate_images(pipe, [prompt] * len(numbers), seeds, steps, resolution)):
                save_png(image, folder / f"class_{k:05d}_{tag}.png")
            bar.update(len(numbers))
    return missing


def missing_class_images(folder: str | Path, wanted: int) -> int:
    """How many images `folder` lacks to hold `wanted` (all of them when it does not exist)."""
    folder = Path(folder)
    have = sum(1 for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else 0
    return max(0, wanted - have)


def validation_grid(pipe, prompt: str, num_images: int, steps: int, resolution: int) -> Image.Image:
    """One row of images for `prompt` at seeds 0..num_images-1 (the same seeds every time)."""
    return make_grid([generate_images(pipe, [prompt] * num_images, range(num_images), steps, resolution)])


def strength_sweep(pipe, models: list[torch.nn.Module], prompt: str, strengths: Sequence[float], num_seeds: int,
                   steps: int, resolution: int) -> Image.Image:
    """Rows = seeds, columns = LoRA strengths (0 is the base model); strengths are set back to 1 afterwards."""
    columns = []
    try:
        for s in tqdm(strengths, desc="strength sweep", unit="strength", leave=False):
            for m in models:
                set_strength(m, float(s))
            columns.append(generate_images(pipe, [prompt] * num_seeds, range(num_seeds), steps, resolution))
    finally:
        for m in models:
            set_strength(m, 1.0)
    rows = [[col[r] for col in columns] for r in range(num_seeds)]
    return make_grid(rows, col_labels=[f"strength {s:g}" for s in strengths])
