"""The VTAB-1k layout (Zhai et al. 2019, https://arxiv.org/abs/1910.04867), as released with NOAH and used by the
published PEFT tables (ViT-B/16: LoRA, adapters, VPT, ...):

    <root>/<task>/train800.txt          800 training images     "<path relative to <root>/<task>> <label>" per line
    <root>/<task>/val200.txt            200 validation images
    <root>/<task>/train800val200.txt    both (the final runs train on all 1000)
    <root>/<task>/test.txt              the test set
    <root>/<task>/images/...            the images the lists name

Split "tune" trains on train800 and evaluates on val200 (choosing hyper-parameters); "final" trains on
train800val200 and evaluates on test (the numbers the tables report).
"""

from __future__ import annotations

from pathlib import Path

from .imagenet import DatasetError, ImageSubset
from .images import name_list, read_text

# The 19 tasks and their numbers of classes, in the order of the published tables.
VTAB_TASKS = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
    "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5, "clevr_count": 8,
    "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18,
    "smallnorb_ele": 9,
}
VTAB_SPLITS = {"tune": ("train800.txt", "val200.txt"), "final": ("train800val200.txt", "test.txt")}


def read_vtab_list(path: Path, task_dir: Path, num_classes: int) -> list[tuple[str, int]]:
    """(image path, label) per line of a VTAB split file; every problem (bad line, label out of range, missing image)
    is reported in one error naming the file."""
    if not path.is_file():
        raise DatasetError(f"VTAB split file {path} does not exist; expected the VTAB-1k layout "
                           "(<root>/<task>/train800.txt, val200.txt, train800val200.txt, test.txt)")
    samples, bad, missing = [], [], []
    for no, line in enumerate(read_text(path, "VTAB split file").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            bad.append(f"line {no}: {line.strip()[:60]!r} (expected '<image path> <label>')")
            continue
        label = int(parts[1])
        if not 0 <= label < num_classes:
            bad.append(f"line {no}: label {label} outside 0..{num_classes - 1}")
            continue
        image = task_dir / parts[0]
        if not image.is_file():
            missing.append(str(image))
            continue
        samples.append((str(image), label))
    if bad or missing:
        what = ([f"{len(bad)} bad line(s): {'; '.join(bad[:3])}"] if bad else []) + \
            ([f"{len(missing)} listed image(s) missing: {name_list(missing)}"] if missing else [])
        raise DatasetError(f"{path}: {', '.join(what)}; fix the file or copy the images into {task_dir}")
    if not samples:
        raise DatasetError(f"{path} lists no images")
    return samples


def build_vtab_subset(root: str | Path, task: str, split: str = "final") -> ImageSubset:
    """The train / evaluation samples of one VTAB-1k task under `root` (split "tune": train800 / val200, "final":
    train800val200 / test); classes are the label numbers "0" .. "n-1"."""
    if task not in VTAB_TASKS:
        raise DatasetError(f"unknown VTAB task {task!r}; tasks: {', '.join(VTAB_TASKS)}")
    if split not in VTAB_SPLITS:
        raise DatasetError(f"VTAB split {split!r}: expected one of {tuple(VTAB_SPLITS)}")
    task_dir = Path(root) / task
    if not task_dir.is_dir():
        raise DatasetError(f"{task_dir} does not exist; give the vtab-1k folder that holds one folder per task")
    n = VTAB_TASKS[task]
    train_file, eval_file = VTAB_SPLITS[split]
    train = read_vtab_list(task_dir / train_file, task_dir, n)
    val = read_vtab_list(task_dir / eval_file, task_dir, n)
    return ImageSubset([str(i) for i in range(n)], train, val, f"vtab-{task}-{split}")
