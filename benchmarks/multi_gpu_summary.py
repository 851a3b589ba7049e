"""Summarise benchmarks/bench_multi_gpu.sh: a markdown table of throughput, scaling, peak memory, loss curves.

    python benchmarks/multi_gpu_summary.py OUT_DIR      (reads OUT_DIR/multi_gpu.log and OUT_DIR/loss_*.csv)
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path


def sections(log: str) -> dict[str, tuple[int, list[str]]]:
    """label -> (processes, lines) of each '== label (n process(es))' block."""
    out, label = {}, None
    for line in log.splitlines():
        m = re.match(r"== (\S+) \((\d+) process", line)
        if m:
            label = m.group(1)
            out[label] = (int(m.group(2)), [])
        elif label:
            out[label][1].append(line)
    return out


def losses(path: Path) -> list[float]:
    return [float(r.split(",")[1]) for r in path.read_text().splitlines()[1:]] if path.is_file() else []


def main(out_dir: str) -> None:
    out = Path(out_dir)
    runs = sections((out / "multi_gpu.log").read_text())
    print("| run | processes | step s (median) | steps/s | images/s (all GPUs) | peak GiB per GPU |")
    print("|---|---|---|---|---|---|")
    ips = {}
    for label, (n, lines) in runs.items():
        steps = [dict(kv.split("=") for kv in ln.split()[2:] if "=" in kv) for ln in lines if ln.startswith("STEPS ours")]
        res = [json.loads(ln.split("RESULT ", 1)[1]) for ln in lines if "RESULT " in ln]
        if steps:
            med = max(float(s["median_s"]) for s in steps)  # the slowest process sets the pace
            batch = float(steps[0]["images_per_s"]) * float(steps[0]["median_s"])
            ips[label] = n * batch / med
            peaks = ", ".join(s["peak_alloc_gib"] for s in steps)
            print(f"| {label} | {n} | {med:.4f} | {1 / med:.2f} | {ips[label]:.1f} | {peaks} |")
        elif res:
            r = res[-1]
            ips[label] = r["images_per_s"]
            print(f"| {label} | {n} | {r['step_s']:.4f} | {1 / r['step_s']:.2f} | {r['images_per_s']:.1f} | "
                  f"{', '.join(str(p) for p in r['peak_gib_per_gpu'])} |")
        else:
            print(f"| {label} | {n} | failed or skipped: {' '.join(lines)[-120:]} | | | |")
    print()
    for two, one in (("sd_2gpu_b4", "sd_1gpu_b4"), ("sd_2gpu_b4", "sd_1gpu_b4_graph"), ("vit_2gpu", "vit_1gpu")):
        if two in ips and one in ips:
            print(f"- scaling {two} / {one}: {ips[two] / ips[one]:.2f}x")
    a, b = losses(out / "loss_sd_1gpu_b8.csv"), losses(out / "loss_sd_2gpu_b4.csv")
    if a and b and len(a) == len(b):
        diff = [abs(x - y) for x, y in zip(a, b)]
        corr = statistics.correlation(a, b) if len(a) > 2 else float("nan")
        print(f"- loss curve, 1 GPU batch 8 vs 2 GPUs x batch 4 ({len(a)} steps): max |diff| {max(diff):.2e}, "
              f"mean |diff| {statistics.fmean(diff):.2e}, mean loss {statistics.fmean(a):.4f}, correlation {corr:.6f}")
    else:
        print(f"- loss curves missing or of different lengths ({len(a)} vs {len(b)} steps)")


if __name__ == "__main__":
    main(sys.argv[1])
