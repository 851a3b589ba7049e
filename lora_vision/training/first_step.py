"""The time to the first training step, as both recipes print it (issue #17): imports and setup, what was built
before the first step (a captured / compiled static step), and the first step itself, after one device sync."""

from __future__ import annotations

import time

import torch


def report_first_step(device: torch.device, t_start: float, t_step: float, compiled: bool,
                      static_s: float | None = None, prefix: str = "") -> str:
    """Print and return `first step done X s after start (imports and setup Y s, [capture Z s, ]first step W s)`.

    `t_start` is the process start (taken before the heavy imports), `t_step` when the first step began (after
    `static_s` seconds capturing the static step, None when nothing was captured). Under --compile the compile
    time is in the capture when there is one (its warm-up steps compile), otherwise in the first step (said as
    `compile included`). The one sync waits for the first step's queued device work; call it once, after that step.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    now = time.perf_counter()
    built = static_s or 0.0
    parts = [f"imports and setup {t_step - t_start - built:.1f} s"]
    if static_s is not None:
        parts.append(f"{'compile + capture' if compiled else 'capture'} {static_s:.1f} s")
    parts.append(f"first step {now - t_step:.1f} s" + (", compile included" if compiled and static_s is None else ""))
    line = f"{prefix}first step done {now - t_start:.1f} s after start ({', '.join(parts)})"
    print(line, flush=True)
    return line
