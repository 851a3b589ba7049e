"""The result of `train_vit.py --compare`: LoRA, full fine-tuning and linear probe side by side (table, JSON, plot)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from ...io import atomic_write_text


def write_comparison(results: Mapping[str, Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """compare.md, compare.json and compare.png (top-1 per epoch) for the runs of --compare."""
    out = Path(out_dir)
    rows = ["| mode | trainable params | trainable % | top-1 | top-5 | training time s | images/s | adapter size |",
            "|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        size = r["artifact_bytes"]
        rows.append(f"| {mode} | {r['trainable']:,} | {r['trainable_pct']:.2f}% | {r['top1']:.1f} | {r['top5']:.1f} | "
                    f"{r['train_time_s']:.1f} | {r['images_per_s']:.1f} | {size / 1024:.1f} KiB ({r['artifact']}) |")
    atomic_write_text(out / "compare.md", "\n".join(rows) + "\n")
    atomic_write_text(out / "compare.json", json.dumps(results, indent=1) + "\n")
    paths = [out / "compare.md", out / "compare.json"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the table is the result; the plot is optional (pip install matplotlib)
        return paths
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for mode, r in results.items():
        hist = r["history"]
        ax.plot([h["epoch"] for h in hist], [h["top1"] for h in hist], marker="o", label=mode)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("LoRA vs full fine-tuning vs linear probe")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out / ".compare.png.tmp"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, out / "compare.png")
    return paths + [out / "compare.png"]
