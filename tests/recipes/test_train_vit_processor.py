"""What train_vit.py writes works through transformers alone: the peft folder and the merged model, with the saved
preprocessor_config.json, give the recipe's own predictions and top-1 (issue 19)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_vision.data.synthetic import make_pattern_folder
from lora_vision.models.vit import PROCESSOR_FILE

from test_train_vit import BASE, _run  # noqa: E402  (tests/recipes is on sys.path under pytest)

CLASSES = ("hstripes", "vstripes", "checker", "rings")


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> tuple[Path, Path]:
    """Train and validation folders of 48x36 images: a centre crop and a squash to 32x32 see different pixels."""
    root = tmp_path_factory.mktemp("wide")
    for split, seed, n in (("train", 3, 12), ("val", 4, 8)):
        make_pattern_folder(root / split, CLASSES, per_class=n, size=48, seed=seed)
        for p in (root / split).rglob("*.png"):
            Image.open(p).convert("RGB").resize((48, 36), Image.BICUBIC).save(p)
    return root / "train", root / "val"


def _images(val: Path) -> tuple[list[Path], list[int]]:
    paths, order = sorted(val.rglob("*.png")), sorted(CLASSES)  # labels follow the sorted class folders
    return paths, [order.index(p.parent.name) for p in paths]


def _recipe_logits(out: Path, paths: list[Path]) -> torch.Tensor:
    """Logits the way the recipe evaluates: our loader, our adapter file, the recorded preprocessing."""
    from lora_vision.adapter import Adapter
    from lora_vision.data.preprocessing import Preprocessing, build_transforms
    from lora_vision.models.vit import load_vit

    adapter = Adapter.load(out / "adapter.safetensors")
    classes = json.loads(adapter.metadata["lora_vision.classes"])
    loaded = load_vit(BASE, len(classes), None, classes)
    adapter.apply_to({"model": loaded.model})
    pre = Preprocessing.from_dict(adapter.info.preprocessing)
    tf = build_transforms(pre, False)
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return loaded.model.eval()(pixel_values=x).logits


def test_peft_folder_and_processor_give_the_recipes_predictions(wide, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoImageProcessor, ViTForImageClassification, pipeline

    train, val = wide
    m = _run(tmp_path, train, "--model_name_or_path", BASE, "--validation_dir", str(val), "--max_train_steps", "6",
             "--save_merged", "true")
    assert json.loads((tmp_path / "peft" / PROCESSOR_FILE).read_text())["do_center_crop"] is False  # as ViT's
    paths, labels = _images(val)
    ours = _recipe_logits(tmp_path, paths)
    top1 = 100.0 * float((ours.argmax(-1) == torch.tensor(labels)).float().mean())
    assert top1 == pytest.approx(m["top1"])  # the per-image logits above are the recipe's evaluation

    processor = AutoImageProcessor.from_pretrained(tmp_path / "peft")
    base = ViTForImageClassification.from_pretrained(BASE, num_labels=len(CLASSES), ignore_mismatched_sizes=True)
    model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
        theirs = model(pixel_values=processor(images, return_tensors="pt").pixel_values).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)

    for folder in (tmp_path / "merged",):  # the merged model folder alone, through pipeline()
        classify = pipeline("image-classification", model=str(folder), image_processor=str(folder), device="cpu")
        predicted = [r[0]["label"] for r in classify([str(p) for p in paths], top_k=1)]
        names = json.loads((folder / "config.json").read_text())["id2label"]
        assert predicted == [names[str(int(i))] for i in ours.argmax(-1)]
        truth = [names[str(y)] for y in labels]
        assert 100.0 * sum(p == t for p, t in zip(predicted, truth)) / len(labels) == pytest.approx(top1)


def test_vtab_task_trains_on_its_split_files(tmp_path: Path) -> None:
    from test_vtab import make_vtab_copy  # noqa: E402  (tests is on sys.path under pytest)

    root = make_vtab_copy(tmp_path / "vtab-1k")
    m = _run(tmp_path / "out", root, "--model_name_or_path", "tiny-hf", "--vtab_task", "kitti", "--vtab_split", "tune",
             "--max_train_steps", "1", "--save_peft", "false")
    assert (m["train_images"], m["val_images"], m["classes"], m["split"]) == (12, 8, 4, "vtab-kitti-tune")
