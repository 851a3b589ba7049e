#!/usr/bin/env python
"""Evaluate a ViT classifier (top-1 / top-5) with or without a LoRA adapter, merged or not.

    python scripts/eval_vit.py --adapter out/vit/adapter.safetensors              # base, classes, split from the file
    python scripts/eval_vit.py --adapter out/vit/peft --model_name_or_path M --validation_dir V
    python scripts/eval_vit.py --adapter out/vit/adapter.safetensors --merge      # merged weights: same predictions
    python scripts/eval_vit.py --model_name_or_path out/vit-full/model --train_dir D   # a saved full model

The adapter may be our .safetensors file or a peft folder (anything lora_vision.formats reads). Our files record
the base model, the classes and the preprocessing; a peft folder records the base model (adapter_config.json's
base_model_name_or_path); give the rest as flags. Without --validation_dir
the seeded split of train_dir is rebuilt with --train_val_split and --seed (the same as train_vit.py's).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lora_vision.data.imagenet import (DatasetError, ImageListDataset, build_subset, build_transforms, scan_images,
                                       select_classes)
from lora_vision.data.preprocessing import Preprocessing
from lora_vision.formats import read_adapter
from lora_vision.formats.peft import CONFIG
from lora_vision.io import AdapterFileError, atomic_write_text, read_safetensors
from lora_vision.metadata import AdapterMetadata
from lora_vision.models.vit import load_vit, merged_copy
from lora_vision.training.vit.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line flags (names as in train_vit.py)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--adapter", help="our adapter .safetensors file or a peft adapter folder")
    p.add_argument("--model_name_or_path", help="base model (default: the one recorded in our adapter file)")
    p.add_argument("--weights", help="local .safetensors weights for torchvision / timm / tiny models")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the weights before evaluating")
    p.add_argument("--train_dir", default="samples/vit/train", help="rebuild the seeded split of this folder")
    p.add_argument("--validation_dir", help="evaluate on this folder instead of a split")
    p.add_argument("--classes", help="comma-separated classes (default: from our adapter file, else all folders)")
    p.add_argument("--subset", help="class-list preset (imagenette, imagewoof, imagenet100)")
    p.add_argument("--class_list", help="class-list file")
    p.add_argument("--train_val_split", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--per_device_eval_batch_size", type=int, default=64)
    p.add_argument("--dataloader_num_workers", type=int, default=2)
    p.add_argument("--output_json", help="write the metrics here as JSON")
    return p.parse_args(argv)


def recorded(adapter: str | None) -> AdapterMetadata:
    """What our adapter file says about itself; for a peft folder, the base model its adapter_config.json names."""
    if not adapter:
        return AdapterMetadata()
    if Path(adapter).is_dir():
        config_path = Path(adapter) / CONFIG
        if not config_path.is_file():
            return AdapterMetadata()
        try:
            base = json.loads(config_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise ValueError(f"{config_path} is not a valid peft adapter_config.json ({err}); expected the JSON "
                             "written by peft's save_pretrained") from None
        return AdapterMetadata(base=base if isinstance(base, str) and base else None)
    _, meta = read_safetensors(adapter)
    return AdapterMetadata.from_strings(meta)


def main(argv: list[str] | None = None) -> int:
    """Build the data and the model, apply the adapter, evaluate, print and save the metrics."""
    args = parse_args(argv)
    info = recorded(args.adapter)
    base = args.model_name_or_path or info.base
    if not base:
        raise ValueError("give --model_name_or_path (the adapter does not record its base model: neither lora_vision "
                         "metadata nor a peft base_model_name_or_path)")
    if base.startswith("samples/") and not Path(base).exists():
        base = str(REPO / base)
    train_dir = args.train_dir
    if train_dir.startswith("samples/") and not Path(train_dir).exists():
        train_dir = str(REPO / train_dir)
    classes = args.classes.split(",") if args.classes else info.classes
    if args.validation_dir:
        classes = select_classes(args.validation_dir, classes, args.class_list, None, args.subset)
        samples = scan_images(args.validation_dir, classes)
    else:
        subset = build_subset(train_dir, None, classes, args.class_list, None, args.subset, args.train_val_split,
                              args.seed)
        classes, samples = subset.classes, subset.val
    loaded = load_vit(base, len(classes), args.weights, classes)
    if info.preprocessing is not None:  # what the adapter was trained and evaluated with
        loaded.preprocessing = Preprocessing.from_dict(info.preprocessing)
    model = loaded.model
    if args.adapter:
        adapter, report = read_adapter(args.adapter, {"model": model}, strict=True)
        adapter.apply_to({"model": model})
        print(f"applied {args.adapter}: {report}")
        if args.merge:
            model = merged_copy(model)
    model.eval()
    loader = DataLoader(ImageListDataset(samples, classes, build_transforms(loaded.preprocessing, False)),
                        batch_size=args.per_device_eval_batch_size, num_workers=args.dataloader_num_workers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    fwd = (lambda x: model(pixel_values=x).logits) if loaded.family == "hf" else model
    metrics = evaluate(fwd, loader, device)
    result = {"model": base, "adapter": args.adapter, "merged": bool(args.merge), "classes": len(classes), **metrics}
    print(f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {metrics['loss']:.4f}  "
          f"({metrics['n']} images, {len(classes)} classes)")
    if args.output_json:
        atomic_write_text(args.output_json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (DatasetError, AdapterFileError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
