"""Run a reference training script with its optimizer steps timed, for bench_train_sd.sh's ref_* runs.

    python benchmarks/step_timer.py LABEL SCRIPT [SCRIPT ARGS...]

Every optimizer step (torch's global step hook: diffusers' example scripts step through accelerate's wrapper of a
torch optimizer) ends with a device synchronisation and a host clock reading. At exit it prints the lines
bench_train_sd.sh reads, in the format of scripts/train_sd.py --time_steps:

    first step done X s after start (reference: setup and first step together)
    STEPS LABEL n=.. median_s=.. p10_s=.. p90_s=.. steps_per_s=.. peak_alloc_gib=..

The step time is the wall time between consecutive optimizer steps after WARMUP (10) steps, so it holds the data
loading, the forward, the backward and the update: what a user waits for. "start" is this process's start.
"""

from __future__ import annotations

import atexit
import os
import runpy
import statistics
import sys
import time

WARMUP = 10


def _process_start() -> float:
    """Seconds on time.time()'s clock when this process started (Linux /proc; this module's import elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not os.path.isfile(argv[1]):
        print("usage: python benchmarks/step_timer.py LABEL SCRIPT [ARGS...] (SCRIPT: an existing training script; "
              f"got {argv[1:2] or 'none'})", file=sys.stderr)
        return 2
    label, script, rest = argv[0], argv[1], argv[2:]
    start = _process_start()
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stamps: list[float] = []

    def after_step(optimizer, args, kwargs) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.time())
        if len(stamps) == 1:
            print(f"first step done {stamps[0] - start:.1f} s after start (reference: setup and first step together)",
                  flush=True)

    def report() -> None:
        steps = [b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1:])]
        if len(steps) < 3:
            print(f"STEPS too few steps: {len(stamps)} optimizer steps, {WARMUP} of them warm-up", flush=True)
            return
        d = sorted(steps)
        med = statistics.median(d)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        print(f"STEPS {label} n={len(d)} median_s={med:.4f} p10_s={d[len(d) // 10]:.4f} "
              f"p90_s={d[(9 * len(d)) // 10]:.4f} steps_per_s={1 / med:.3f} peak_alloc_gib={peak:.2f}", flush=True)

    register_optimizer_step_post_hook(after_step)
    atexit.register(report)
    sys.argv = [script, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
