"""Masked loss in scripts/train_sd.py: mask files beside the images or in a folder, or the alpha channel; masks
follow crops, buckets and flips into the latent cache; a fully masked image gives zero loss."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_vision.adapter import Adapter
from lora_vision.data.dreambooth import scan_folder
from lora_vision.models import build_tiny_sd
from lora_vision.training.sd.caching import cache_latents

from resume_checks import check_resume_exact, logged_losses
from test_train_sd import base_args, instance_dir, train_sd  # noqa: E402,F401  (fixtures; tests/recipes is on sys.path)


def _half_mask(size: tuple[int, int], path: Path) -> None:
    """White left half, black right half."""
    arr = np.zeros((size[1], size[0]), dtype=np.uint8)
    arr[:, : size[0] // 2] = 255
    Image.fromarray(arr, "L").save(path)


def test_masks_follow_crop_bucket_and_flip_into_the_latent_cache(tmp_path):
    folder = tmp_path / "inst"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(folder / "wide.png")
    _half_mask((128, 96), folder / "wide_mask.png")
    images = scan_folder(folder, "sks", 64, masks="files", bucketing=True, bucket_step=16)
    assert [p.name for p in images.paths] == ["wide.png"]  # the mask file is not a training image
    vae = build_tiny_sd("sd1").vae
    caches = cache_latents(images, vae, {"sks": 0}, center_crop=True, flip=True, seed=0, dtype=torch.float32,
                           desc="test")
    (size, cache), = caches.items()
    assert size[0] > size[1]  # a landscape bucket
    mask = cache.mask
    assert mask.shape == (2, 1, *cache.mean.shape[2:])
    w = mask.shape[-1]
    plain, mirrored = mask[0, 0], mask[1, 0]
    assert torch.all(plain[:, : w // 2 - 1] == 1) and torch.all(plain[:, w // 2 + 1:] == 0)
    torch.testing.assert_close(mirrored, plain.flip(-1))  # flipped with the pixels
    torch.testing.assert_close(plain.mean(), torch.tensor(0.5))  # half the latent pixels weigh


def test_missing_masks_are_listed_and_alpha_mask_reads_the_alpha_channel(tmp_path):
    folder = tmp_path / "inst"
    folder.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / f"{name}.png")
    _half_mask((64, 64), folder / "a_mask.png")
    with pytest.raises(ValueError, match=r"1 instance image\(s\) have no mask file beside it.*: b\.png"):
        scan_folder(folder, "sks", 64, masks="files")
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[..., 0], rgba[:32, :, 3] = 255, 255  # top half opaque, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(folder / "b.png")
    images = scan_folder(folder, "sks", 64, masks="alpha")
    cache = cache_latents(images, build_tiny_sd("sd1").vae, {"sks": 0}, center_crop=True, flip=False, seed=0,
                          dtype=torch.float32, desc="test")[(64, 64)]
    # a.png has no alpha: every pixel counts; b.png: the top half
    by_name = {Path(p).name: m for p, m in zip(cache.paths, cache.mask)}
    assert torch.all(by_name["a.png"] == 1)
    h = by_name["b.png"].shape[1]
    assert torch.all(by_name["b.png"][0, : h // 2] == 1) and torch.all(by_name["b.png"][0, h // 2:] == 0)


def test_fully_masked_images_give_zero_loss_and_leave_the_adapter_unchanged(train_sd, instance_dir, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    for img in instance_dir.glob("*.jpg"):
        Image.new("L", Image.open(img).size, 0).save(masks / f"{img.stem}.png")
    out = tmp_path / "out"
    args = base_args("tiny-sd1", instance_dir, out, steps=2) + ["--masked_loss", "--conditioning_data_dir",
                                                               str(masks), "--adam_weight_decay", "0"]
    assert train_sd.main(args) == 0
    assert logged_losses(out) == [0.0, 0.0]
    adapter = Adapter.load(out / "adapter.safetensors")
    assert all(torch.count_nonzero(v) == 0 for k, v in adapter.tensors.items() if "lora_B" in k)  # no gradient


def test_masked_loss_resumes_exactly_and_mask_weights_the_loss(train_sd, instance_dir, tmp_path):
    for img in instance_dir.glob("*.jpg"):
        _half_mask(Image.open(img).size, instance_dir / f"{img.stem}_mask.png")
    flags = ["--masked_loss", "--random_flip", "--bucketing", "--bucket_step", "16"]
    full = check_resume_exact(train_sd, instance_dir, tmp_path, flags)
    plain = tmp_path / "plain"
    for p in instance_dir.glob("*_mask.png"):
        p.unlink()
    assert train_sd.main(base_args("tiny-sd1", instance_dir, plain, steps=4) + flags[1:]) == 0
    first_masked, first_plain = logged_losses(full)[0], logged_losses(plain)[0]
    assert first_masked < 0.75 * first_plain  # same noise and rows, half of every image weighs


@pytest.mark.parametrize("fault, message", [
    ("corrupt", r"cannot read image .*toy_00_mask\.png: not a readable image .*it is the mask of .*toy_00\.jpg"),
    ("other_aspect", r"the mask .*toy_00_mask\.png is 64x32 but its image .*toy_00\.jpg is 128x128; expected the "
                     r"same size"),
    ("missing_folder", r"the mask folder '.*nowhere' does not exist or is not a folder"),
])
def test_bad_masks_are_one_line_errors(train_sd, instance_dir, tmp_path, capsys, fault, message):
    import re

    for img in instance_dir.glob("*.jpg"):
        _half_mask(Image.open(img).size, instance_dir / f"{img.stem}_mask.png")
    flags = ["--masked_loss"]
    if fault == "corrupt":
        (instance_dir / "toy_00_mask.png").write_bytes(b"not a png")
    elif fault == "other_aspect":
        _half_mask((64, 32), instance_dir / "toy_00_mask.png")
    else:
        flags += ["--mask_data_dir", str(tmp_path / "nowhere")]
    out = tmp_path / "out"
    assert train_sd.main(base_args("tiny-sd1", instance_dir, out, steps=1) + flags) == 1
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err
    assert not (out / "adapter.safetensors").exists()
