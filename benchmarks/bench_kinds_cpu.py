"""Unfused inference cost of each adapter kind vs fused (zero) on the CPU tiny SD 1.x UNet.

    PYTHONPATH=. python benchmarks/bench_kinds_cpu.py --rounds 7 --threads 1

One adapter per kind (rank 4) on the attention projections (to_q, to_k, to_v, to_out.0) of the tiny UNet, loaded
with lora_vision.pipeline.load_adapter. Each round times one UNet forward for base, then every kind unfused and
fused, in turn (interleaved, so a busy machine slows all alike); the table gives the median over rounds and the
overhead over the base. Fused adds nothing (same modules' weights, the wrappers skip merged adapters).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lora_vision import LoRAConfig, inject_lora, lora_parameters
from lora_vision.adapter import Adapter
from lora_vision.models import build_tiny_sd
from lora_vision.pipeline import fuse, load_adapter, set_adapters, unfuse

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
KINDS = {"lora": {}, "loha": {}, "lokr": {"lokr_factor": 4}, "dora": {}}


def make(kind: str, opts: dict) -> Adapter:
    pipe = build_tiny_sd("sd1")
    inject_lora(pipe.unet, LoRAConfig(rank=4, targets=TARGETS, adapter_type=kind, **opts), name="x")
    with torch.no_grad():
        for p in lora_parameters(pipe.unet):
            p.add_(torch.randn_like(p) * 0.05)
    return Adapter.from_models({"unet": pipe.unet}, "x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pipe = build_tiny_sd("sd1")
    for k, opts in KINDS.items():
        load_adapter(pipe, make(k, opts), name=k)
    unet = pipe.unet
    x = torch.randn(2, unet.config.in_channels, 8, 8)
    ctx = torch.randn(2, 8, unet.config.cross_attention_dim)

    def run() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(args.iters):
                unet(x, 10, ctx)
        return (time.perf_counter() - t0) / args.iters * 1e3

    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        set_adapters(pipe, [])
        times.setdefault("base", []).append(run())
        for k in KINDS:
            set_adapters(pipe, [k])
            times.setdefault(f"{k} unfused", []).append(run())
            fuse(pipe)
            times.setdefault(f"{k} fused", []).append(run())
            unfuse(pipe)
    base = statistics.median(times["base"])
    print(f"| run | ms / UNet forward (median of {args.rounds}) | overhead vs base |")
    print("|---|---|---|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {m:.2f} | {100 * (m / base - 1):+.0f}% |")


if __name__ == "__main__":
    main()
