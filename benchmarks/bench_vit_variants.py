"""LoRA, its variants (PiSSA, OLoRA, LoRA+), full fine-tuning and a linear probe on the procedural pattern task of
tests/recipes/test_train_vit.py (the tiny pretrained ViT of samples/vit, 96 new training images, 200 validation
images); prints a markdown table (recorded in docs/benchmarks.md).

    python benchmarks/bench_vit_variants.py [--steps 48] [--out outputs/vit_variants]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from lora_vision.data.synthetic import make_pattern_folder

REPO = Path(__file__).resolve().parents[1]
KINDS = ("hstripes", "vstripes", "checker", "rings")
LORA = ["--mode", "lora", "--lora_targets", "hf-vit-attn-mlp", "--lora_rank", "2", "--save_peft", "false"]
RUNS = {
    "lora": LORA + ["--learning_rate", "1e-2"],
    "lora-pissa": LORA + ["--learning_rate", "1e-2", "--init", "pissa"],
    "lora-olora": LORA + ["--learning_rate", "1e-2", "--init", "olora"],
    "lora-loraplus": LORA + ["--learning_rate", "2e-3", "--loraplus_lr_ratio", "16"],
    "full": ["--mode", "full", "--learning_rate", "1e-3"],
    "linear-probe": ["--mode", "linear-probe", "--learning_rate", "1e-2"],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--out", default="outputs/vit_variants")
    args = p.parse_args()
    out = Path(args.out)
    make_pattern_folder(out / "data" / "train", KINDS, per_class=24, seed=11)
    make_pattern_folder(out / "data" / "val", KINDS, per_class=50, seed=12)
    common = ["--model_name_or_path", str(REPO / "samples/vit/tiny-vit-patterns"), "--train_dir",
              str(out / "data" / "train"), "--validation_dir", str(out / "data" / "val"), "--max_train_steps",
              str(args.steps), "--per_device_train_batch_size", "16", "--augment", "none", "--seed", "0",
              "--dataloader_num_workers", "0", "--overwrite_output_dir"]
    rows = ["| run | trainable params | top-1 | top-5 | training time s |", "|---|---|---|---|---|"]
    for name, extra in RUNS.items():
        folder = out / name
        code = subprocess.call([sys.executable, str(REPO / "scripts" / "train_vit.py"), *common, *extra,
                                "--output_dir", str(folder)], stdout=subprocess.DEVNULL)
        if code:
            print(f"error: {name} failed with exit code {code}", file=sys.stderr)
            return 1
        m = json.loads((folder / "metrics.json").read_text())
        rows.append(f"| {name} | {m['trainable']:,} | {m['top1']:.1f} | {m['top5']:.1f} | {m['train_time_s']:.1f} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
