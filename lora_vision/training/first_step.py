"""The time to the first training step, as both recipes print it (issue #17): imports and setup, what was built
before the first step (a captured / compiled static step), and the first step itself, after one device sync."""

from __future__ import annotations

import time

import torch


_MARKS: list[tuple[str, float]] = []


def mark(phase: str) -> None:
    """Note that start-up phase `phase` (imports, model load, ...) ended now: the line after the first step's
    splits the start-up by these marks, so a slow start says where its time went."""
    _MARKS.append((phase, time.perf_counter()))


def phases_line(t_start: float, t_end: float) -> str | None:
    """`start-up: imports 6.1 s, model load 2.0 s, ..., other setup 0.4 s` from the marks between the two times
    (None without marks); the marks are used up."""
    marks = [(name, t) for name, t in _MARKS if t_start <= t <= t_end]
    _MARKS.clear()
    if not marks:
        return None
    parts, last = [], t_start
    for name, t in marks:
        parts.append(f"{name} {t - last:.1f} s")
        last = t
    parts.append(f"other setup {t_end - last:.1f} s")
    return "start-up: " + ", ".join(parts)


def report_first_step(device: torch.device, t_start: float, t_step: float, compiled: bool,
                      static_s: float | None = None, prefix: str = "", capture_failed: bool = False) -> str:
    """Print and return `first step done X s after start (imports and setup Y s, [capture Z s, ]first step W s)`.

    `t_start` is the process start (taken before the heavy imports), `t_step` when the first step began (after
    `static_s` seconds capturing the static step, None when nothing was captured). Under --compile the compile
    time is in the capture when there is one (its warm-up steps compile), otherwise in the first step (said as
    `compile included`). `capture_failed`: the capture was tried for `static_s` seconds and failed, so the run
    steps eagerly (said so, not counted as a capture). The one sync waits for the first step's queued device work;
    call it once, after that step.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    now = time.perf_counter()
    built = static_s or 0.0
    parts = [f"imports and setup {t_step - t_start - built:.1f} s"]
    if static_s is not None:
        what = "compile + capture" if compiled else "capture"
        parts.append(f"{what} failed after {static_s:.1f} s, eager step" if capture_failed
                     else f"{what} {static_s:.1f} s")
    parts.append(f"first step {now - t_step:.1f} s" + (", compile included" if compiled and static_s is None else ""))
    line = f"{prefix}first step done {now - t_start:.1f} s after start ({', '.join(parts)})"
    print(line, flush=True)
    phases = phases_line(t_start, t_step - built)
    if phases:
        print(f"{prefix}{phases}", flush=True)
    return line
