"""Where a training step's time goes (--profile_steps, issue #17): torch.profiler over a few steps after a warm-up,
written as a table of kernel categories and the top kernels per step, with the share of the step's wall time the
device was busy, and a Chrome trace. Both recipes of train_sd.py call it from their step hooks; benchmarks/bench_vit.py
writes its kernel tables with the same `kernel_table`."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_path, atomic_write_text

# First match wins: convolution before GEMM (implicit-GEMM convolution kernels say both), attention before both.
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attention", r"flash|fmha|attention|attn|sdpa|mha_|_efficient_"),
    ("convolution", r"conv|implicit_gemm|winograd|cudnn::(?!.*gemm)"),
    ("GEMM", r"gemm|cutlass|cublas|nvjet|xmma|matmul|^aten::(mm|addmm|bmm|baddbmm|linear)$|sm\d+_.*_tn|sm\d+_.*_nt"),
    ("normalization", r"norm"),
    ("optimizer", r"adam|multi_tensor_apply|foreach|_fused_sgd|lerp"),
    ("copies and layout", r"memcpy|memset|copy|cat_|catarray|contiguous|transpose|permute|^aten::(cat|to|_to_copy)$"),
    ("reductions", r"reduce|sum_|mean|softmax|max_"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise|triton_poi|gelu|silu|sigmoid|tanh|"
                    r"^aten::(add|mul|sub|div|where|fill)_?$"),
)


def kernel_category(name: str) -> str:
    """The category of a kernel (or, on a CPU, an aten op) by its name; `other` when none matches."""
    low = name.lower()
    for label, pattern in CATEGORIES:
        if re.search(pattern, low):
            return label
    return "other"


def kernel_rows(averages: Any, on_device: bool) -> list[tuple[str, int, float]]:
    """(name, calls, self microseconds) of every device kernel (on_device) or every CPU op of a profile's
    `key_averages()`; CPU ops' self times partition their total, device kernels are counted once (not again under
    the CPU op that launched them)."""
    rows = []
    for e in averages:
        if on_device:
            if e.device_type != torch.autograd.DeviceType.CPU and e.self_device_time_total > 0:
                rows.append((e.key, e.count, float(e.self_device_time_total)))
        elif e.self_cpu_time_total > 0 and not e.key.startswith("ProfilerStep"):
            rows.append((e.key, e.count, float(e.self_cpu_time_total)))
    return sorted(rows, key=lambda r: -r[2])


def kernel_table(averages: Any, on_device: bool, steps: int, wall_s: float | None = None, top: int = 25) -> str:
    """Markdown: per step, the wall time, the busy time (sum of kernel / op self times), the categories and the top
    kernels. With `wall_s` the busy share says how much of the step the device (or, on a CPU, the ops) filled; the
    rest is launch overhead, Python and host work between kernels."""
    rows = kernel_rows(averages, on_device)
    busy_us = sum(r[2] for r in rows)
    what = "device kernels" if on_device else "CPU ops (self time)"
    lines = []
    if wall_s is not None:
        wall_ms = 1000 * wall_s / steps
        busy_ms = busy_us / 1000 / steps
        share = 100 * busy_ms / wall_ms if wall_ms > 0 else 0.0
        lines += [f"{steps} steps: wall {wall_ms:.2f} ms per step, {what} busy {busy_ms:.2f} ms per step "
                  f"({share:.0f}% of the wall time; the rest is launches, Python and host work between them).", ""]
    by_cat: dict[str, list[float]] = {}
    for name, calls, us in rows:
        c = by_cat.setdefault(kernel_category(name), [0.0, 0.0])
        c[0] += us
        c[1] += calls
    lines += ["| category | ms per step | calls per step | share of busy time |", "|---|---|---|---|"]
    for cat, (us, calls) in sorted(by_cat.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {cat} | {us / 1000 / steps:.3f} | {calls / steps:.0f} | {100 * us / max(busy_us, 1e-9):.1f}% |")
    lines += ["", f"Top {min(top, len(rows))} of {len(rows)} {what}:", "",
              "| kernel | category | calls per step | ms per step | share of busy time |", "|---|---|---|---|---|"]
    for name, calls, us in rows[:top]:
        short = name if len(name) <= 90 else name[:87] + "..."
        short = short.replace("|", "\\|")
        lines.append(f"| `{short}` | {kernel_category(name)} | {calls / steps:g} | {us / 1000 / steps:.3f} | "
                     f"{100 * us / max(busy_us, 1e-9):.1f}% |")
    return "\n".join(lines) + "\n"


class StepProfiler:
    """Profiles steps `start + warmup` to `start + warmup + steps - 1` of a run: `after_step(step)` after every
    step starts the profiler once the warm-up is done and stops it after the last profiled step, then writes
    `folder/kernels.md` (kernel_table, the command on top) and `folder/trace.json.gz` (chrome://tracing,
    Perfetto). `finish()` writes what was profiled when the run ends early."""

    def __init__(self, steps: int, start: int, device: torch.device, folder: Path, warmup: int = 5,
                 header: str = "") -> None:
        if steps < 1:
            raise ValueError(f"profile steps: {steps}; expected at least 1")
        self.steps, self.first, self.device, self.folder = steps, start + warmup, device, Path(folder)
        self.header = header
        self._prof: Any = None
        self._t0 = 0.0
        self._done = 0
        self.written: Path | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def after_step(self, step: int) -> None:
        if self._prof is None and self.written is None and step + 1 == self.first:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self._sync()
            self._prof = profile(activities=acts, acc_events=True)
            self._prof.__enter__()
            self._t0 = time.perf_counter()
        elif self._prof is not None and step >= self.first:
            self._done += 1
            if self._done == self.steps:
                self.finish()

    def finish(self) -> Path | None:
        """Stop the profiler (if it runs) and write the table and trace; returns the table's path."""
        if self._prof is None:
            return self.written
        self._sync()
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        if self._done == 0:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.folder / "trace.json.gz") as tmp:
            gz = tmp.with_name(tmp.name + ".json.gz")  # torch compresses by the name's suffix
            try:
                prof.export_chrome_trace(str(gz))
                gz.replace(tmp)
            finally:
                gz.unlink(missing_ok=True)
        on_device = self.device.type == "cuda"
        table = kernel_table(prof.key_averages(), on_device, self._done, wall)
        head = f"# Where the training step's time goes\n\n{self.header}\n\n" if self.header else ""
        first = self.first
        text = (f"{head}Steps {first + 1}-{first + self._done} of the run (after {first} steps of warm-up), "
                f"{'device: ' + torch.cuda.get_device_name(self.device) if on_device else 'CPU'}.\n\n{table}")
        path = self.folder / "kernels.md"
        atomic_write_text(path, text)
        self.written = path
        print(f"wrote {path} ({self._done} profiled steps) and {self.folder / 'trace.json.gz'}", flush=True)
        return path
