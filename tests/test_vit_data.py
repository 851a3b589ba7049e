"""ImageNet-subset data: class selection, presets, seeded stratified split, image modes, corrupt and empty inputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_vision.data.imagenet import (DatasetError, ImageListDataset, Preprocessing, build_subset, build_transforms,
                                       load_rgb, read_class_list, scan_images, select_classes, stratified_split,
                                       subset_presets)
from lora_vision.data.synthetic import make_pattern_folder, write_blank_png
from lora_vision.training.vit.data import EpochSampler, SeededAugment


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


def test_decompression_bomb_is_named_and_left_out(tmp_path: Path) -> None:
    make_pattern_folder(tmp_path, classes=("hstripes", "rings"), per_class=3, size=8)
    bomb = write_blank_png(tmp_path / "rings" / "bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 100_000  # 400 million pixels in a few KB
    with pytest.raises(DatasetError, match=r"bomb.png: too large to decode safely.*decompression bomb.*--skip_corrupt"):
        load_rgb(str(bomb))
    with pytest.raises(DatasetError, match="1 image.*bomb.png.*--skip_corrupt"):
        build_subset(tmp_path, verify=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sub = build_subset(tmp_path, verify=True, skip_corrupt=True)
    listed = [str(w.message) for w in caught if "bomb.png" in str(w.message)]
    assert len(listed) == 1 and "skipping 1 unreadable image(s) of 7 (--skip_corrupt)" in listed[0]
    assert str(bomb) not in [p for p, _ in sub.train + sub.val] and len(sub.train + sub.val) == 6


def test_image_between_the_bomb_limits_is_read_with_a_warning_naming_it(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (30, 20), "red").save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # PIL warns above 500 pixels and refuses above 1000
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_rgb(str(path)).size == (30, 20)
    assert [type(w.message).__name__ for w in caught] == ["UserWarning"]  # PIL's own (no file name) is replaced
    assert "big.png is 30x20 (600 pixels)" in str(caught[0].message)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 250)
    with pytest.raises(DatasetError, match="big.png: too large"):
        load_rgb(str(path))


def test_skip_corrupt_alone_skips_at_load_time(tmp_path: Path) -> None:
    make_pattern_folder(tmp_path, classes=("hstripes", "rings"), per_class=1, size=8)
    bad = tmp_path / "rings" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    samples = [(str(tmp_path / "hstripes" / "hstripes_000.png"), 0), (str(bad), 1),
               (str(tmp_path / "rings" / "rings_000.png"), 1)]
    transform = build_transforms(Preprocessing(8), False)
    with pytest.raises(DatasetError, match="broken.jpg.*--skip_corrupt"):
        ImageListDataset(samples, ["hstripes", "rings"], transform)[1]
    ds = ImageListDataset(samples, ["hstripes", "rings"], transform, skip_corrupt=True)
    with pytest.warns(UserWarning, match=r"skipping image .*broken.jpg \(--skip_corrupt\): not a readable image"):
        x, y = ds[1]
    assert torch.equal(x, ds[2][0]) and y == 1  # the next image takes its place: batches keep their size
    with pytest.warns(UserWarning), pytest.raises(DatasetError, match="none of the 1 images.*broken.jpg"):
        ImageListDataset([(str(bad), 1)], ["hstripes", "rings"], transform, skip_corrupt=True)[0]


def test_unreadable_image_in_a_dataloader_worker_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    loader = torch.utils.data.DataLoader(ImageListDataset([(str(bad), 0)], ["a"], build_transforms(Preprocessing(8),
                                                                                                   False)),
                                         num_workers=1)
    with pytest.raises(DatasetError) as err:
        next(iter(loader))
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"cannot read image {bad}: not a readable image") and "--skip_corrupt" in message


def test_class_list_that_is_not_utf8_is_named(tree: Path, tmp_path: Path) -> None:
    f = tmp_path / "classes.txt"
    f.write_bytes("rings  # anneaux\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"class list .*classes.txt is not UTF-8 text: byte 0xe9 .*save it as UTF-8"):
        read_class_list(f)
    f.write_bytes("\ufeffrings\nhstripes\n".encode("utf-8"))  # a byte-order mark is fine
    assert select_classes(tree, class_file=f) == ["rings", "hstripes"]


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
