"""Regenerate samples/vit/train: 4 classes of procedural patterns (40 images each, 32x32 JPEG).

    python samples/vit/make_samples.py

The offline default of scripts/train_vit.py trains on this folder (no validation folder: a seeded split is used).
"""

from pathlib import Path
import shutil

from lora_vision.data.synthetic import make_pattern_folder

if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "train"
    shutil.rmtree(out, ignore_errors=True)
    make_pattern_folder(out, classes=("hstripes", "vstripes", "checker", "rings"), per_class=40, size=32, seed=0,
                        fmt="jpg")
    print(f"wrote {sum(1 for _ in out.rglob('*.jpg'))} images to {out}")
