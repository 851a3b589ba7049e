"""CPU timing of the adapter hot paths in a tiny SD 1.x pipeline: load + apply from a file (our own file and a kohya
file of the same tensors), switch between two loaded adapters, fuse and unfuse.

Variants are code trees: this checkout, or checkouts of other commits (`git worktree add /tmp/before <commit>`).
Each tree runs in its own process, so it imports its own lora_vision, on the same adapter files; the trees alternate
round after round (the order flips every round), so machine noise hits them alike. A round reports the median of its
repeats; the table gives, per operation, the median over the rounds and the spread (min-max) of the round medians, in
wall-clock ms and in the process's CPU ms (`time.thread_time`, one torch thread; steadier on a shared machine).

    python benchmarks/bench_adapter_ops_cpu.py --rounds 5                                    # this checkout
    python benchmarks/bench_adapter_ops_cpu.py --tree before=/tmp/before --tree after=. --rounds 5
    python benchmarks/bench_adapter_ops_cpu.py --rounds 1 --repeats 2                        # smoke test

Only APIs that every tree since the pipeline package has are used in the measured process (build_tiny_sd,
pipeline.load_adapter / set_adapters / fuse / unfuse / unload_adapter).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
OPS = ("load_own_file", "load_kohya_file", "switch", "fuse", "unfuse")


def make_files(folder: Path, rank: int) -> dict[str, str]:
    """Two random rank-`rank` adapters (UNet attention + feed-forward, CLIP attention) of the tiny SD 1.x pipeline:
    adapter a as our file and as a kohya file, adapter b as our file."""
    sys.path.insert(0, str(REPO))
    import torch

    import lora_vision as lv
    from lora_vision.adapter import Adapter
    from lora_vision.formats import export
    from lora_vision.models import build_tiny_sd

    files = {}
    for key, seed in (("a", 1), ("b", 2)):
        pipe = build_tiny_sd("sd1")
        lv.inject_lora(pipe.unet, lv.LoRAConfig(rank=rank, alpha=rank, targets="unet-attn-ff"))
        lv.inject_lora(pipe.text_encoder, lv.LoRAConfig(rank=rank, alpha=rank, targets="clip-attn"))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in lv.lora_parameters(pipe.unet) + lv.lora_parameters(pipe.text_encoder):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        adapter = Adapter.from_models({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
        files[key] = str(adapter.save(folder / f"{key}.safetensors"))
        if key == "a":
            files["a_kohya"] = str(export(adapter, "kohya", folder / "a_kohya.safetensors", base="sd1",
                                          dtype=torch.float32))
    return files


def worker(files: dict[str, str], repeats: int, threads: int) -> dict[str, dict[str, list[float]]]:
    """Time every operation `repeats` times (switch 2x) in this process; {op: {"wall": [ms], "cpu": [ms]}}."""
    import torch

    from lora_vision.models import build_tiny_sd
    from lora_vision.pipeline import fuse, load_adapter, set_adapters, unfuse, unload_adapter

    torch.set_num_threads(threads)
    pipe = build_tiny_sd("sd1")
    out: dict[str, dict[str, list[float]]] = {op: {"wall": [], "cpu": []} for op in OPS}

    def timed(op: str, fn: Callable[[], object]) -> None:
        w, c = time.perf_counter(), time.thread_time()
        fn()
        out[op]["cpu"].append((time.thread_time() - c) * 1000)
        out[op]["wall"].append((time.perf_counter() - w) * 1000)

    for key in ("a", "a_kohya"):  # warm-up: imports, allocator, file cache
        load_adapter(pipe, files[key], name="a")
        unload_adapter(pipe)
    for _ in range(repeats):
        for op, key in (("load_own_file", "a"), ("load_kohya_file", "a_kohya")):
            timed(op, lambda: load_adapter(pipe, files[key], name="a"))
            unload_adapter(pipe)
    load_adapter(pipe, files["a"], name="a")
    load_adapter(pipe, files["b"], name="b")
    for i in range(2 * repeats):
        timed("switch", lambda: set_adapters(pipe, ["b" if i % 2 == 0 else "a"]))
    set_adapters(pipe, ["a"])
    for _ in range(repeats):
        timed("fuse", lambda: fuse(pipe, names=["a"]))
        timed("unfuse", lambda: unfuse(pipe))
    unload_adapter(pipe)
    return out


def run_tree(tree: Path, files: dict[str, str], repeats: int, threads: int) -> dict[str, dict[str, list[float]]]:
    """One round of one tree in a fresh process that imports that tree's lora_vision."""
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--files", json.dumps(files),
           "--repeats", str(repeats), "--threads", str(threads)]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"bench_adapter_ops_cpu: the run in {tree} failed (exit {done.returncode}): {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    """median (min-max) of round medians."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def measure(trees: dict[str, Path], files: dict[str, str], n_rounds: int, repeats: int, threads: int
            ) -> tuple[dict[str, dict[str, dict[str, list[float]]]], list[dict]]:
    """Round medians per tree, operation and clock, and every time measured; trees alternate, order flipped
    every round."""
    rounds: dict[str, dict[str, dict[str, list[float]]]] = {
        label: {op: {"wall": [], "cpu": []} for op in OPS} for label in trees}
    raw = []
    for r in range(n_rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for label in order:
            res = run_tree(trees[label], files, repeats, threads)
            raw.append({"round": r, "tree": label, "times_ms": res})
            for op in OPS:
                for clock in ("wall", "cpu"):
                    rounds[label][op][clock].append(statistics.median(res[op][clock]))
        print(f"round {r + 1}/{n_rounds} done", file=sys.stderr, flush=True)
    return rounds, raw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH",
                    help="a code tree to measure (repeatable); default: this checkout")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (one process per tree per round)")
    ap.add_argument("--repeats", type=int, default=10, help="loads and fuse/unfuse pairs per round; switches 2x")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the measured processes")
    ap.add_argument("--out", help="also write the raw numbers here as JSON")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.files), args.repeats, args.threads)))
        return 0
    if args.rounds < 1 or args.repeats < 1:
        ap.error("--rounds and --repeats must be at least 1")
    trees = {}
    for spec in args.tree or [f"this={REPO}"]:
        label, sep, path = spec.partition("=")
        if not sep or not (Path(path) / "lora_vision" / "__init__.py").is_file():
            ap.error(f"--tree {spec!r}: expected LABEL=PATH of a checkout that has lora_vision/__init__.py")
        trees[label] = Path(path).resolve()
    folder = Path(tempfile.mkdtemp(prefix="bench_adapter_ops_cpu_"))
    try:
        rounds, raw = measure(trees, make_files(folder, args.rank), args.rounds, args.repeats, args.threads)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"tiny SD 1.x, rank {args.rank} (UNet attention + feed-forward, CLIP attention), {args.threads} torch "
          f"thread(s); {args.rounds} rounds x {args.repeats} repeats; median (min-max) of the round medians, ms")
    labels = list(trees)
    print("| operation | " + " | ".join(f"{lab} wall | {lab} CPU" for lab in labels) + " |")
    print("|---|" + "---|---|" * len(labels))
    for op in OPS:
        print(f"| {op} | " + " | ".join(f"{spread(rounds[lab][op]['wall'])} | {spread(rounds[lab][op]['cpu'])}"
                                       for lab in labels) + " |")
    if args.out:
        from lora_vision.io import atomic_write_text  # this checkout's, on the path since make_files

        atomic_write_text(args.out, json.dumps({"args": vars(args), "trees": {k: str(v) for k, v in trees.items()},
                                                "round_medians": rounds, "raw": raw}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
