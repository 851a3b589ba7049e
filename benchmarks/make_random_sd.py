"""A random-weight SD 1.5 pipeline folder (real architecture, so compute and memory are real) and N instance images,
for the training benchmarks (bench_train_sd.sh, bench_multi_gpu.sh); `tiny` is the small test layout, for CPU smoke
runs. The pipeline is bench_adapter_ops.py's (one builder), saved with save_pretrained; both folders are written
under temporary names and renamed when complete, so a killed build never leaves a folder that looks finished.

    python benchmarks/make_random_sd.py /tmp/bench_sd15 sd15 8 /tmp/bench_imgs_sd15 [RESOLUTION]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_adapter_ops import build_pipeline  # noqa: E402  (the SD 1.5 / tiny random-weight builder)
from lora_vision.io import replace_dir  # noqa: E402

USAGE = "usage: python benchmarks/make_random_sd.py MODEL_DIR sd15|tiny N_IMAGES IMAGE_DIR [RESOLUTION]"


def write_images(folder: Path, n: int, resolution: int, seed: int = 0) -> None:
    """`n` smooth random RGB images (low-frequency noise, upsampled) of resolution x resolution, as JPEG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((resolution, resolution), Image.BICUBIC).save(folder / f"img_{i:02d}.jpg",
                                                                                    quality=95)


def main(argv: list[str]) -> int:
    if len(argv) not in (4, 5) or argv[1] not in ("sd15", "tiny") or not argv[2].isdigit():
        print(f"error: {' '.join(argv) or 'no arguments'}: expected MODEL_DIR sd15|tiny N_IMAGES IMAGE_DIR "
              f"[RESOLUTION]\n{USAGE}", file=sys.stderr)
        return 2
    model_dir, size, n, image_dir = Path(argv[0]), argv[1], int(argv[2]), Path(argv[3])
    resolution = int(argv[4]) if len(argv) == 5 else (512 if size == "sd15" else 64)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for final in (model_dir, image_dir):
        final.parent.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(size, device, torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}-", dir=model_dir.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    replace_dir(tmp, model_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{image_dir.name}-", dir=image_dir.parent))
    write_images(tmp, n, resolution)
    replace_dir(tmp, image_dir)
    print(f"wrote {model_dir} (random-weight {size}) and {n} images of {resolution} px in {image_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
