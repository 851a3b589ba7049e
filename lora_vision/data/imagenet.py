"""ImageNet subsets (or any ImageFolder tree): class selection, a seeded stratified split, transforms, datasets.

Layout: `root/<class>/<image>`, one folder per class (ImageNet's train/ uses WordNet ids such as n01440764).
Subsets: a class-list file, a list of ids, the first N classes (sorted), or a preset shipped in
configs/imagenet_subsets/ (imagenette, imagewoof, imagenet100). Images are decoded in DataLoader workers; non-RGB
images (grayscale, palette, CMYK, RGBA) are converted to RGB; a file that cannot be decoded (or is over PIL's
decompression-bomb limit) raises an error naming it, or with `skip_corrupt` is skipped with a warning naming it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import IMAGE_SUFFIXES, UnreadableImageError, name_list, open_image, read_text
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, build_transforms  # noqa: F401 (re-exported)

IMAGE_EXTENSIONS = IMAGE_SUFFIXES
SUBSET_DIR = Path(__file__).resolve().parents[2] / "configs" / "imagenet_subsets"


class DatasetError(ValueError):
    """The image folder or the class selection does not fit; the message says what to fix."""


class CorruptImageError(UnreadableImageError, DatasetError):
    """An image of the subset cannot be read; the message names it and the flag that skips such files."""


SKIP_HINT = ("delete or replace it, or add --skip_corrupt to skip unreadable images with a warning "
             "(--verify_images also lists them all before training)")


def subset_presets() -> list[str]:
    """Names of the class-list presets shipped in configs/imagenet_subsets/."""
    return sorted(p.stem for p in SUBSET_DIR.glob("*.txt"))


def read_class_list(path: str | Path) -> list[str]:
    """Class ids from a text file: the first word of each non-empty line; `#` starts a comment."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"class list {path} does not exist")
    out = []
    for line in read_text(path, "class list").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line.split()[0])
    if not out:
        raise DatasetError(f"class list {path} names no classes (one class id per line expected)")
    return out


def list_class_folders(root: str | Path) -> list[str]:
    """Sorted names of the sub-folders of `root` (candidate classes)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a folder")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def select_classes(root: str | Path, classes: Sequence[str] | None = None, class_file: str | Path | None = None,
                   first_n: int | None = None, preset: str | None = None) -> list[str]:
    """The classes to use, in label order; at most one way of choosing may be given (none: every class folder).

    Classes that are asked for but missing from `root` are all named in one error.
    """
    ways = [w for w, v in (("classes", classes), ("class_file", class_file), ("first_n", first_n),
                           ("preset", preset)) if v]
    if len(ways) > 1:
        raise DatasetError(f"choose the subset one way, got {ways}")
    present = list_class_folders(root)
    if not present:
        raise DatasetError(f"{root} has no class sub-folders; expected {root}/<class>/<image files>")
    if preset:
        if preset not in subset_presets():
            raise DatasetError(f"unknown subset preset {preset!r}; presets: {subset_presets()}")
        wanted = read_class_list(SUBSET_DIR / f"{preset}.txt")
    elif class_file:
        wanted = read_class_list(class_file)
    elif classes:
        wanted = list(classes)
    elif first_n:
        if first_n > len(present):
            raise DatasetError(f"first_n={first_n} but {root} has only {len(present)} class folders")
        return present[:first_n]
    else:
        return present
    dupes = sorted({c for c in wanted if wanted.count(c) > 1})
    if dupes:
        raise DatasetError(f"classes listed more than once: {dupes}")
    have = set(present)
    missing = [c for c in wanted if c not in have]
    if missing:
        raise DatasetError(f"{len(missing)} of {len(wanted)} requested classes are missing from {root}: "
                           f"{', '.join(missing)}; check the folder (ImageNet layout: one folder per WordNet id)")
    return wanted


def scan_images(root: str | Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """(path, label) for every image of the chosen classes, sorted per class; empty class folders are an error."""
    root = Path(root)
    samples: list[tuple[str, int]] = []
    empty = []
    for label, cls in enumerate(classes):
        d = root / cls
        if not d.is_dir():
            raise DatasetError(f"class {cls!r} has no folder in {root}")
        files = sorted(str(p) for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            empty.append(cls)
        samples += [(f, label) for f in files]
    if empty:
        raise DatasetError(f"{len(empty)} class folder(s) in {root} hold no images ({', '.join(IMAGE_EXTENSIONS)}): "
                           f"{', '.join(empty)}; add images or leave these classes out of the subset")
    return samples


def stratified_split(samples: Sequence[tuple[str, int]], val_fraction: float, seed: int
                     ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Split per class with a seeded permutation: the same seed gives the same split on every machine.

    Each class with at least 2 images keeps at least one image on each side.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction={val_fraction}: expected a fraction in (0, 1)")
    by_class: dict[int, list[tuple[str, int]]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    train, val = [], []
    gen = torch.Generator().manual_seed(seed)
    for label in sorted(by_class):
        items = by_class[label]
        order = torch.randperm(len(items), generator=gen).tolist()
        n_val = int(round(len(items) * val_fraction))
        n_val = min(max(n_val, 1), len(items) - 1) if len(items) >= 2 else 0
        val += [items[i] for i in sorted(order[:n_val])]
        train += [items[i] for i in sorted(order[n_val:])]
    return train, val


def verify_images(samples: Sequence[tuple[str, int]]) -> list[str]:
    """Paths of the images PIL cannot open and decode (slow on big sets: every file is decoded)."""
    bad = []
    for path, _ in samples:
        try:
            load_rgb(path)
        except DatasetError:
            bad.append(path)
    return bad


def load_rgb(path: str) -> Image.Image:
    """Decode one image as RGB (grayscale, palette, CMYK, 16-bit and alpha images are converted); errors name the file
    and the flag that skips it (CorruptImageError, also when raised in a DataLoader worker)."""
    try:
        return open_image(path)
    except UnreadableImageError as err:
        raise CorruptImageError(f"{err}; {SKIP_HINT}", path=err.path, reason=err.reason) from None


class ImageListDataset(Dataset):
    """(image tensor, label) for a list of (path, label); decoding happens in __getitem__ (DataLoader workers).

    An unreadable image raises CorruptImageError naming it; with `skip_corrupt` it is skipped with a warning naming it
    and the next readable image of the list takes its place, so batches keep their size and a resumed run still sees
    the same data.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], transform: Callable,
                 skip_corrupt: bool = False) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        n = len(self.samples)
        for k in range(n if self.skip_corrupt else 1):
            path, label = self.samples[(i + k) % n]
            try:
                image = load_rgb(path)
            except CorruptImageError as err:
                if not self.skip_corrupt:
                    raise
                reason = err.reason
                warnings.warn(f"skipping image {path} (--skip_corrupt): {reason}", stacklevel=2)
                continue
            return self.transform(image), label
        raise CorruptImageError(f"none of the {n} images of this dataset can be read (last tried: {path}: "
                                f"{reason}); check the image folder")


@dataclass
class ImageSubset:
    """The chosen classes and the train/validation samples of one run."""

    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    split: str
    """"folder" when a validation folder was given, else "seeded-<fraction>-<seed>"."""


def build_subset(train_dir: str | Path, validation_dir: str | Path | None = None, classes: Sequence[str] | None = None,
                 class_file: str | Path | None = None, first_n: int | None = None, preset: str | None = None,
                 val_fraction: float = 0.2, seed: int = 0, verify: bool = False, skip_corrupt: bool = False
                 ) -> ImageSubset:
    """Select classes in `train_dir`, scan images, and split (or use `validation_dir` with the same classes)."""
    chosen = select_classes(train_dir, classes, class_file, first_n, preset)
    samples = scan_images(train_dir, chosen)
    if validation_dir:
        missing = [c for c in chosen if not (Path(validation_dir) / c).is_dir()]
        if missing:
            raise DatasetError(f"{len(missing)} training class(es) have no folder in {validation_dir}: "
                               f"{', '.join(missing)}; validation needs the same class folders as training")
        train, val, split = samples, scan_images(validation_dir, chosen), "folder"
    else:
        train, val = stratified_split(samples, val_fraction, seed)
        split = f"seeded-{val_fraction:g}-{seed}"
    if verify:
        bad = verify_images(train + val)
        if bad and not skip_corrupt:
            raise DatasetError(f"{len(bad)} image(s) cannot be decoded: {name_list(bad)}; fix them or add "
                               f"--skip_corrupt")
        if bad:
            warnings.warn(f"skipping {len(bad)} unreadable image(s) of {len(train + val)} (--skip_corrupt): "
                          f"{name_list(bad)}", stacklevel=2)
        drop = set(bad)
        train = [s for s in train if s[0] not in drop]
        val = [s for s in val if s[0] not in drop]
    return ImageSubset(list(chosen), train, val, split)
