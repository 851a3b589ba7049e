"""Summarise benchmarks/bench_multi_gpu.sh: per configuration the median and min-max of images/s (all GPUs) over the
interleaved rounds (benchmarks/timing.py's table), the scaling 1 -> 2 GPUs as the median (min-max) of per-round
ratios, peak memory, and the loss curves of the same global batch on 1 and 2 GPUs.

    python benchmarks/multi_gpu_summary.py OUT_DIR      (reads OUT_DIR/multi_gpu.log and OUT_DIR/loss_*.csv)
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import timing  # noqa: E402  (the shared report)

# 2-GPU configurations against the 1-GPU one they scale (the first is the table's reference column)
SCALING = (("sd_2gpu_b4_graph", "sd_1gpu_b4_graph"), ("sd_2gpu_b4", "sd_1gpu_b4"), ("sd_2gpu_b4", "sd_1gpu_b4_graph"),
           ("vit_2gpu", "vit_1gpu"), ("vit_2gpu_fsdp", "vit_2gpu"))
# the same global batch: 1 GPU at batch 8 against 2 GPUs at batch 4 each, eager and captured
SAME_BATCH = (("sd_1gpu_b8", "sd_2gpu_b4"), ("sd_1gpu_b8", "sd_2gpu_b4_graph"))


def sections(log: str) -> list[tuple[str, int, int, list[str]]]:
    """(label, round, processes, lines) of each '== label@rN (n process(es))' block, in log order (a block
    without @rN counts as round 1)."""
    out: list[tuple[str, int, int, list[str]]] = []
    for line in log.splitlines():
        m = re.match(r"== ([^\s@]+)(?:@r(\d+))? \((\d+) process", line)
        if m:
            out.append((m.group(1), int(m.group(2) or 1), int(m.group(3)), []))
        elif out and not line.startswith("round "):
            out[-1][3].append(line)
    return out


def throughput(n: int, lines: list[str]) -> tuple[float, str] | None:
    """(images/s over all processes, peak GiB per process) of one run, or None when it gave no number."""
    found = [re.search(r"STEPS ours (.*)", ln) for ln in lines]  # a progress bar may sit before it on the line
    steps = [dict(kv.split("=") for kv in m.group(1).split() if "=" in kv) for m in found if m]
    if steps:
        med = max(float(s["median_s"]) for s in steps)  # the slowest process sets the pace
        batch = float(steps[0]["images_per_s"]) * float(steps[0]["median_s"])
        return n * batch / med, ", ".join(s["peak_alloc_gib"] for s in steps)
    res = [json.loads(ln.split("RESULT ", 1)[1]) for ln in lines if "RESULT " in ln]
    if res and res[-1]["images_per_s"] == res[-1]["images_per_s"]:  # not NaN
        return float(res[-1]["images_per_s"]), ", ".join(str(p) for p in res[-1]["peak_gib_per_gpu"])
    return None


def losses(path: Path) -> list[float]:
    return [float(r.split(",")[1]) for r in path.read_text().splitlines()[1:]] if path.is_file() else []


def summary(out_dir: str) -> str:
    """The markdown report of one bench_multi_gpu.sh output folder."""
    out = Path(out_dir)
    rates: dict[str, list[float]] = {}
    extra: dict[str, dict[str, str]] = {}
    failed: list[str] = []
    for label, rnd, n, lines in sections((out / "multi_gpu.log").read_text()):
        got = throughput(n, lines)
        if got is None:
            failed.append(f"- {label} round {rnd}: failed or skipped: {' '.join(lines)[-160:] or 'no output'}")
            continue
        rates.setdefault(label, []).append(got[0])
        extra[label] = {"processes": str(n), "peak GiB per process": got[1]}
    lines = []
    if rates:
        refs = {two: one for two, one in reversed(SCALING) if two in rates and one in rates}
        lines.append(timing.markdown_table(rates, "images/s (all GPUs)", refs, extra, digits=1))
    else:
        lines.append(f"no configuration of {out / 'multi_gpu.log'} gave a number")
    lines.append("")
    for two, one in SCALING:
        if rates.get(two) and rates.get(one) and len(rates[two]) == len(rates[one]):
            s = timing.summarize({two: rates[two], one: rates[one]}, {two: one})[two]
            lines.append(f"- scaling {two} / {one}: {s['median_ratio']:.2f}x ({s['ratio_min']:.2f}-"
                         f"{s['ratio_max']:.2f}) over {s['n']} round(s)")
    for one, two in SAME_BATCH:
        a, b = losses(out / f"loss_{one}.csv"), losses(out / f"loss_{two}.csv")
        if a and b and len(a) == len(b):
            diff = [abs(x - y) for x, y in zip(a, b)]
            corr = (statistics.correlation(a, b) if len(a) > 2 and len(set(a)) > 1 and len(set(b)) > 1
                    else float("nan"))
            lines.append(f"- loss curve, {one} vs {two} ({len(a)} steps, round 1): max |diff| "
                         f"{max(diff):.2e}, mean |diff| {statistics.fmean(diff):.2e}, mean loss "
                         f"{statistics.fmean(a):.4f}, correlation {corr:.6f}")
        elif a or b:
            lines.append(f"- loss curves {one} vs {two} missing or of different lengths ({len(a)} vs {len(b)} steps)")
    lines += failed
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/multi_gpu_summary.py OUT_DIR", file=sys.stderr)
        return 2
    try:
        print(summary(argv[0]))
    except OSError as err:
        print(f"error: multi_gpu_summary.py {argv[0]}: {err.strerror or err} ({err.filename}); expected the output "
              "folder of bench_multi_gpu.sh, with multi_gpu.log in it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
