"""CPU micro-benchmark: forward+backward of LoRALinear vs the bare nn.Linear and vs peft's LoRA Linear.

    python benchmarks/bench_layer_cpu.py [--reps 30] [--threads 2]

Frozen base weight (as in LoRA training), input requires grad (as inside a network), rank r LoRA in fp32.
The three variants run interleaved, round after round, so machine noise hits them alike; medians are reported,
and the overhead columns are ratios against the bare Linear measured in the same rounds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import lora_vision as lv


def _step(layer: nn.Module, x: torch.Tensor) -> None:
    y = layer(x)
    y.backward(torch.ones_like(y))


def _time(layer: nn.Module, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    _step(layer, x)
    return time.perf_counter() - t0


def bench(tokens: int, d_in: int, d_out: int, rank: int, reps: int) -> dict[str, float]:
    """Median seconds per forward+backward for the three variants at one shape."""
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    ours = nn.Sequential(copy.deepcopy(base))
    lv.inject_lora(ours, lv.LoRAConfig(rank=rank, targets=("0",)))
    variants = {"linear": base, "lora_vision": ours}
    try:
        import peft

        wrapped = nn.Sequential(copy.deepcopy(base))
        variants["peft"] = peft.get_peft_model(wrapped, peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"]))
    except ImportError:
        pass
    x = torch.randn(tokens, d_in, requires_grad=True)
    for layer in variants.values():
        for _ in range(3):
            _step(layer, x)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for k, layer in variants.items():
            times[k].append(_time(layer, x))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [(1024, 320, 320, 4), (1024, 768, 768, 16), (256, 1280, 1280, 16), (4096, 64, 64, 8)]
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.reps} interleaved rounds\n")
    print("| tokens x in -> out | rank | nn.Linear ms | lora_vision ms | peft ms | lora_vision / Linear | "
          "peft / Linear | lora_vision / peft |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens, d_in, d_out, rank in shapes:
        r = bench(tokens, d_in, d_out, rank, args.reps)
        peft_ms = f"{r['peft'] * 1e3:.3f}" if "peft" in r else "n/a"
        peft_ratio = f"{r['peft'] / r['linear']:.2f}" if "peft" in r else "n/a"
        ours_vs_peft = f"{r['lora_vision'] / r['peft']:.2f}" if "peft" in r else "n/a"
        print(f"| {tokens} x {d_in} -> {d_out} | {rank} | {r['linear'] * 1e3:.3f} | {r['lora_vision'] * 1e3:.3f} | "
              f"{peft_ms} | {r['lora_vision'] / r['linear']:.2f} | {peft_ratio} | {ours_vs_peft} |")


if __name__ == "__main__":
    main()
