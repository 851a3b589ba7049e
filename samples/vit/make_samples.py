"""Regenerate samples/vit: the training images of the offline demo and the small pretrained ViT it starts from.

    python samples/vit/make_samples.py

- train/: 4 classes of procedural patterns (hstripes, vstripes, checker, rings), 32 images each, 32x32 JPEG.
  There is no validation folder: train_vit.py holds out a seeded stratified split.
- tiny-vit-patterns/: a transformers ViTForImageClassification (patch 8, hidden 32, 2 layers; the architecture of
  lora_vision.models.tiny.build_tiny_hf_vit) pretrained from scratch on all 8 pattern kinds of
  lora_vision.data.synthetic (other images, seed 100), the way ImageNet pretraining precedes an Imagenette
  fine-tune. Fine-tuning replaces its 8-way head by a new one sized to the chosen classes.
"""

from pathlib import Path
import shutil

import numpy as np
import torch
import torch.nn.functional as F

from lora_vision.data.synthetic import PATTERNS, make_pattern_folder, pattern_image
from lora_vision.models.tiny import build_tiny_hf_vit

HERE = Path(__file__).resolve().parent


def pretrain(steps: int = 400, per_class: int = 64, seed: int = 100) -> torch.nn.Module:
    """Train the tiny ViT on all pattern kinds (full training from random weights); prints held-out accuracy."""
    rng = np.random.default_rng(seed)
    x = np.stack([pattern_image(k, 32, rng) for k in PATTERNS for _ in range(per_class)])
    x = torch.tensor(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # the model's normalisation (mean = std = 0.5)
    y = torch.arange(len(PATTERNS)).repeat_interleave(per_class)
    torch.manual_seed(seed)
    model = build_tiny_hf_vit(num_labels=len(PATTERNS), seed=seed).train()
    model.config.id2label = dict(enumerate(PATTERNS))
    model.config.label2id = {k: i for i, k in enumerate(PATTERNS)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        F.cross_entropy(model(pixel_values=x[idx]).logits, y[idx]).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    rng = np.random.default_rng(seed + 1)
    xt = torch.tensor(np.stack([pattern_image(k, 32, rng) for k in PATTERNS for _ in range(20)]))
    xt = xt.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        acc = (model(pixel_values=xt).logits.argmax(-1) == torch.arange(len(PATTERNS)).repeat_interleave(20)).float()
    print(f"pretrained tiny ViT: held-out top-1 {100 * acc.mean():.1f}% on {len(PATTERNS)} pattern kinds")
    return model


if __name__ == "__main__":
    out = HERE / "train"
    shutil.rmtree(out, ignore_errors=True)
    make_pattern_folder(out, classes=("hstripes", "vstripes", "checker", "rings"), per_class=32, size=32, seed=0,
                        fmt="jpg")
    print(f"wrote {sum(1 for _ in out.rglob('*.jpg'))} images to {out}")
    base = HERE / "tiny-vit-patterns"
    shutil.rmtree(base, ignore_errors=True)
    pretrain().save_pretrained(base, safe_serialization=True)
    print(f"wrote {base}")
