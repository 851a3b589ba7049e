"""The one timing method of the benchmarks (issue #17): the variants a script compares run interleaved over several
rounds, in a shuffled order per round (fixed seed; every other round reverses the one before, so each variant runs
first as often as last), and each variant gets one value per round (the median of that round's repeats). The report
gives per variant the median over the rounds and its spread (min-max and the interquartile range), and per variant
against its reference both the ratio of the medians and the median (min-max) of the ratios taken inside each round,
where machine drift hits both alike.

Every script prints the exact command it was run with first (`print_command`), so a table can be re-measured.

    python benchmarks/timing.py train-log LOG LIMIT     # the table of bench_train_sd.sh's log (rounds of runs)
    python benchmarks/timing.py order ROUNDS LABEL...   # round_orders for the shell scripts: one round a line
"""

from __future__ import annotations

import random
import re
import shlex
import statistics
import sys
import time
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

if TYPE_CHECKING:
    import torch


def command_line(argv: list[str] | None = None) -> str:
    """The command this process was started with, quoted so it can be pasted back into a shell."""
    return shlex.join(["python", *(sys.argv if argv is None else argv)])


def print_command(argv: list[str] | None = None) -> str:
    """Print `command: python benchmarks/...` as the first line of a benchmark's output; returns the command."""
    cmd = command_line(argv)
    print(f"command: {cmd}", flush=True)
    return cmd


def round_orders(labels: Iterable[str], rounds: int, seed: int = 0) -> list[list[str]]:
    """The order of the variants in each round: shuffled with `seed` on even rounds, the previous order reversed on
    odd rounds (so with two variants the rounds run AB, BA, ... in a seeded phase)."""
    labels = list(labels)
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: expected at least 1 round; pass --rounds 1 or more")
    rng = random.Random(seed)
    orders: list[list[str]] = []
    for r in range(rounds):
        if r % 2 == 0:
            order = labels[:]
            rng.shuffle(order)
        else:
            order = orders[-1][::-1]
        orders.append(order)
    return orders


def interleave(variants: Mapping[str, Callable[[], float]], rounds: int, seed: int = 0,
               progress: bool = True) -> dict[str, list[float]]:
    """Call every variant once per round in the order of `round_orders`; what a call returns (e.g. the median ms
    of that round's repeats) is the variant's value for the round. Returns {label: [value per round]}, in round
    order, so values at the same index were measured in the same round."""
    values: dict[str, list[float]] = {label: [] for label in variants}
    for r, order in enumerate(round_orders(variants, rounds, seed)):
        for label in order:
            values[label].append(float(variants[label]()))
        if progress:
            print(f"round {r + 1}/{rounds} done ({', '.join(order)})", file=sys.stderr, flush=True)
    return values


def sync(device: str | torch.device | None = None) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    import torch  # here, not at the top: the shell scripts' `timing.py order` needs no torch

    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def timed_ms(fn: Callable[[], object], device: str | torch.device | None = None) -> float:
    """Milliseconds of one call, with a device sync before and after."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t) * 1000


def median_ms(fn: Callable[[], object], repeats: int, device: str | torch.device | None = None,
              warmup: int = 0) -> float:
    """The median of `repeats` timed calls after `warmup` untimed ones (one round's value of a variant)."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed_ms(fn, device) for _ in range(max(1, repeats)))


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartile (both the value itself for a single round)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarize(values: Mapping[str, list[float]], refs: Mapping[str, str | None] | None = None) -> dict[str, dict]:
    """Per variant: n, median, min, max, q1, q3 of its round values; with a reference (refs[label], measured in the
    same rounds) also ratio_of_medians = median / ref median and the per-round ratios with their median, min, max."""
    out: dict[str, dict] = {}
    for label, vals in values.items():
        if not vals:
            continue
        q1, q3 = quartiles(vals)
        row = {"n": len(vals), "median": statistics.median(vals), "min": min(vals), "max": max(vals), "q1": q1,
               "q3": q3, "values": list(vals)}
        ref = (refs or {}).get(label)
        if ref and ref != label and values.get(ref):
            per_round = [v / r for v, r in zip(vals, values[ref]) if r]
            row.update(ref=ref, ratio_of_medians=row["median"] / statistics.median(values[ref]),
                       ratios=per_round, median_ratio=statistics.median(per_round) if per_round else float("nan"),
                       ratio_min=min(per_round, default=float("nan")), ratio_max=max(per_round, default=float("nan")))
        out[label] = row
    return out


def spread(values: list[float], digits: int = 2) -> str:
    """`median (min-max)` of round values."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def markdown_table(values: Mapping[str, list[float]], unit: str, refs: Mapping[str, str | None] | None = None,
                   extra: Mapping[str, Mapping[str, str]] | None = None, digits: int = 2) -> str:
    """The report of interleaved rounds as a markdown table: per variant the median, min-max and IQR of its round
    values in `unit`, and against its reference the ratio of medians and the median (min-max) of per-round ratios.
    `extra` adds columns (e.g. the precision mode) before the numbers, {label: {column: text}}."""
    stats = summarize(values, refs)
    cols = list(dict.fromkeys(c for cells in (extra or {}).values() for c in cells))
    head = ["variant", *cols, f"median {unit}", "min-max", "IQR", "reference", "ratio of medians",
            "per-round ratio: median (min-max)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    f = f"{{:.{digits}f}}"
    for label, s in stats.items():
        cells = [label, *((extra or {}).get(label, {}).get(c, "") for c in cols), f.format(s["median"]),
                 f"{f.format(s['min'])}-{f.format(s['max'])}", f"{f.format(s['q1'])}-{f.format(s['q3'])}"]
        if "ref" in s:
            cells += [s["ref"], f"{s['ratio_of_medians']:.3f}x",
                      f"{s['median_ratio']:.3f}x ({s['ratio_min']:.3f}-{s['ratio_max']:.3f})"]
        else:
            cells += ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    n = max((s["n"] for s in stats.values()), default=0)
    lines.append(f"\n{n} interleaved round(s); ratio = variant / reference, measured in the same rounds")
    return "\n".join(lines)


# ---- bench_train_sd.sh: runs repeated in rounds, one `== label@rN` header and one STEPS line per run -------------

def read_train_log(path: str) -> tuple[dict[str, list[float]], dict[str, float]]:
    """{label: [images/s per round]} and {label: largest peak GiB} from bench_train_sd.sh's log."""
    rates: dict[str, list[float]] = {}
    peaks: dict[str, float] = {}
    label = None
    with open(path) as f:
        for line in f:
            if line.startswith("== "):
                label = line[3:].split()[0].split("@")[0]
            m = re.search(r"steps_per_s=([\d.]+).*peak_alloc_gib=([\d.]+)", line)
            if m and label:
                batch = int(re.search(r"bs(\d+)", label).group(1))
                rates.setdefault(label, []).append(float(m.group(1)) * batch)
                peaks[label] = max(peaks.get(label, 0.0), float(m.group(2)))
    return rates, peaks


_FIRST = re.compile(r"first step done ([\d.]+) s after start(?: \(imports and setup ([\d.]+) s, "
                    r"(?:[a-z +]+?( failed after)? ([\d.]+) s(?:, eager step)?, )?first step ([\d.]+) s)?")
# the reference's line: start only; a capture that failed: "capture failed after X s, eager step"


def read_first_steps(path: str) -> dict[str, dict[str, list[float]]]:
    """{label: {"start": [s], "capture": [s], "failed": [n]}} per round from the recipes' `first step done ...` lines
    (the time to the first step and the static step's capture, which holds the compile under --compile with a CUDA
    graph; "failed" counts the rounds whose capture failed, so that run stepped eagerly)."""
    out: dict[str, dict[str, list[float]]] = {}
    label = None
    with open(path) as f:
        for line in f:
            if line.startswith("== "):
                label = line[3:].split()[0].split("@")[0]
            m = _FIRST.search(line)
            if m and label:
                row = out.setdefault(label, {"start": [], "capture": [], "failed": []})
                row["start"].append(float(m.group(1)))
                if m.group(4) is not None:
                    row["capture"].append(float(m.group(4)))
                if m.group(3) is not None:
                    row["failed"].append(1.0)
    return out


def capture_cell(first: dict[str, list[float]]) -> str:
    """The capture (+ compile) seconds over the rounds, and how many rounds' capture failed (stepped eagerly)."""
    if not first.get("capture"):
        return ""
    failed = len(first.get("failed", []))
    note = f"; FAILED in {failed} of {len(first['capture'])} round(s): eager step" if failed else ""
    return spread(first["capture"], 1) + note


def train_log_table(path: str, limit: float) -> str:
    """The markdown table of bench_train_sd.sh: images/s per run label over the rounds, ours against the reference
    at the same batch (ref_bsN), the share of the throughput limit, and the time to the first step and the
    capture (+ compile) before it, median (min-max) over the rounds."""
    rates, peaks = read_train_log(path)
    if not rates:
        return f"no STEPS lines in {path}: every run failed or timed out; see the logs next to it"
    firsts = read_first_steps(path)
    refs = {label: re.sub(r"^ours(_xl)?_bs(\d+).*$", r"ref_bs\2", label) if label.startswith("ours") else None
            for label in rates}
    extra = {label: {"peak alloc GiB": f"{peaks[label]:.2f}",
                     f"share of limit ({limit:g} img/s)": f"{100 * statistics.median(rates[label]) / limit:.1f}%",
                     "first step after start s": spread(firsts[label]["start"], 1) if firsts.get(label, {}).get(
                         "start") else "",
                     "capture (+ compile) s": capture_cell(firsts.get(label, {}))}
             for label in rates}
    return markdown_table(rates, "images/s", refs, extra, digits=1)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["order"]:
        if len(args) < 3 or not args[1].isdigit() or int(args[1]) < 1:
            print(f"error: timing.py {' '.join(args)}: expected `order ROUNDS LABEL...` with ROUNDS a whole number "
                  ">= 1 and at least one label; set ROUNDS=1 or more", file=sys.stderr)
            return 2
        for order in round_orders(args[2:], int(args[1])):
            print(" ".join(order))
        return 0
    if len(args) != 3 or args[0] != "train-log":
        print("usage: python benchmarks/timing.py train-log LOG LIMIT_IMAGES_PER_S\n"
              "       python benchmarks/timing.py order ROUNDS LABEL...", file=sys.stderr)
        return 2
    try:
        limit = float(args[2])
        print(train_log_table(args[1], limit))
    except (OSError, ValueError) as err:
        print(f"error: timing.py train-log {args[1]} {args[2]}: {err}; expected a bench_train_sd.sh log and a "
              f"number (images/s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
