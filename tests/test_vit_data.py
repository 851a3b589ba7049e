"""ImageNet-subset data: class selection, presets, seeded stratified split, image modes, corrupt and empty inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_vision.data.imagenet import (DatasetError, ImageListDataset, Preprocessing, build_subset, build_transforms,
                                       load_rgb, read_class_list, scan_images, select_classes, stratified_split,
                                       subset_presets)
from lora_vision.data.synthetic import make_pattern_folder
from lora_vision.training.classification import EpochSampler, SeededAugment


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imgs")
    make_pattern_folder(root, classes=("hstripes", "vstripes", "checker", "rings", "dots"), per_class=10, size=16)
    return root


def test_presets_shipped_with_their_wordnet_ids() -> None:
    assert {"imagenette", "imagewoof", "imagenet100"} <= set(subset_presets())
    nette = read_class_list(Path(__file__).parents[1] / "configs/imagenet_subsets/imagenette.txt")
    assert len(nette) == 10 and nette[0] == "n01440764" and all(c.startswith("n") and len(c) == 9 for c in nette)
    from lora_vision.data.imagenet import SUBSET_DIR

    assert len(set(read_class_list(SUBSET_DIR / "imagenet100.txt"))) == 100
    assert len(read_class_list(SUBSET_DIR / "imagewoof.txt")) == 10


def test_select_classes_every_way(tree: Path, tmp_path: Path) -> None:
    assert select_classes(tree) == ["checker", "dots", "hstripes", "rings", "vstripes"]
    assert select_classes(tree, first_n=2) == ["checker", "dots"]
    assert select_classes(tree, classes=["rings", "checker"]) == ["rings", "checker"]  # order = label order
    f = tmp_path / "list.txt"
    f.write_text("# my subset\nvstripes  vertical stripes\n\nhstripes\n")
    assert select_classes(tree, class_file=f) == ["vstripes", "hstripes"]
    with pytest.raises(DatasetError, match="one way"):
        select_classes(tree, classes=["rings"], first_n=2)


def test_missing_classes_are_all_named(tree: Path) -> None:
    with pytest.raises(DatasetError) as err:
        select_classes(tree, classes=["rings", "n01440764", "zebra"])
    assert "2 of 3" in str(err.value) and "n01440764" in str(err.value) and "zebra" in str(err.value)
    with pytest.raises(DatasetError, match="10 requested classes are missing"):
        select_classes(tree, preset="imagenette")
    with pytest.raises(DatasetError, match="unknown subset preset"):
        select_classes(tree, preset="imagenet-7")


def test_empty_class_folder_is_an_error(tmp_path: Path) -> None:
    make_pattern_folder(tmp_path, classes=("hstripes",), per_class=2, size=8)
    (tmp_path / "empty_a").mkdir()
    (tmp_path / "empty_b").mkdir()
    (tmp_path / "empty_b" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="2 class folder.*empty_a, empty_b"):
        scan_images(tmp_path, select_classes(tmp_path))


def test_split_is_stratified_and_deterministic(tree: Path) -> None:
    samples = scan_images(tree, select_classes(tree))
    a_train, a_val = stratified_split(samples, 0.3, seed=7)
    b_train, b_val = stratified_split(list(reversed(samples))[::-1], 0.3, seed=7)
    assert (a_train, a_val) == (b_train, b_val)
    assert set(a_train).isdisjoint(a_val) and len(a_train) + len(a_val) == len(samples)
    per_class = [sum(1 for _, y in a_val if y == c) for c in range(5)]
    assert per_class == [3] * 5
    _, c_val = stratified_split(samples, 0.3, seed=8)
    assert c_val != a_val
    # build_subset gives the same split, and a validation folder replaces it
    sub = build_subset(tree, seed=7, val_fraction=0.3)
    assert sub.val == a_val and sub.split == "seeded-0.3-7"
    sub2 = build_subset(tree, validation_dir=tree, first_n=2)
    assert sub2.split == "folder" and len(sub2.val) == 20


def test_non_rgb_modes_become_rgb(tmp_path: Path) -> None:
    rgb = (np.arange(16 * 16 * 3) % 255).astype(np.uint8).reshape(16, 16, 3)
    im = Image.fromarray(rgb)
    paths = {"gray.png": im.convert("L"), "palette.png": im.convert("P"), "rgba.png": im.convert("RGBA"),
             "cmyk.jpg": im.convert("CMYK"), "sixteen.png": Image.fromarray((rgb[..., 0].astype(np.uint16) * 257))}
    for name, img in paths.items():
        img.save(tmp_path / name)
        out = load_rgb(str(tmp_path / name))
        assert out.mode == "RGB" and out.size == (16, 16), name


def test_corrupt_image_error_names_the_file(tmp_path: Path) -> None:
    make_pattern_folder(tmp_path, classes=("hstripes", "rings"), per_class=3, size=8)
    bad = tmp_path / "rings" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DatasetError, match="broken.jpg"):
        load_rgb(str(bad))
    with pytest.raises(DatasetError, match="1 image.*broken.jpg.*--skip_corrupt"):
        build_subset(tmp_path, verify=True)
    sub = build_subset(tmp_path, verify=True, skip_corrupt=True)
    assert str(bad) not in [p for p, _ in sub.train + sub.val] and len(sub.train + sub.val) == 6


def test_seeded_augmentation_depends_only_on_seed_epoch_index(tree: Path) -> None:
    samples = scan_images(tree, select_classes(tree))
    ds = SeededAugment(ImageListDataset(samples, list("abcde"), build_transforms(Preprocessing(12), True)), seed=3)
    torch.manual_seed(0)
    first = ds[(4, 1)][0]
    torch.manual_seed(123)  # the global RNG does not matter ...
    assert torch.equal(ds[(4, 1)][0], first)
    assert not torch.equal(ds[(4, 2)][0], first)  # ... the epoch does
    s = EpochSampler(len(ds), seed=3)
    s.set_epoch(1)
    order1 = list(s)
    s.set_epoch(2)
    assert list(s) != order1 and sorted(i for i, _ in order1) == list(range(len(ds)))
    s.set_epoch(1)
    assert list(s) == order1
