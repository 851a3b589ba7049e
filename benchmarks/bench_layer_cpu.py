"""CPU micro-benchmark: forward+backward of LoRALinear vs the bare nn.Linear and vs peft's LoRA Linear.

    python benchmarks/bench_layer_cpu.py [--rounds 30] [--repeats 3] [--threads 2]
    python benchmarks/bench_layer_cpu.py --rounds 1 --repeats 1 --small          # smoke test

Frozen base weight (as in LoRA training), input requires grad (as inside a network), rank r LoRA in fp32.
The three variants run interleaved, round after round in a shuffled order (benchmarks/timing.py), so machine noise
hits them alike; per shape the table gives each variant's median and spread over the rounds, lora_vision against
peft (peft against the bare Linear) as the ratio of medians and the median of per-round ratios, and lora_vision
against the bare Linear.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lora_vision as lv  # noqa: E402
import timing  # noqa: E402  (the shared rounds and report)


def _step(layer: nn.Module, x: torch.Tensor) -> None:
    y = layer(x)
    y.backward(torch.ones_like(y))


def bench(tokens: int, d_in: int, d_out: int, rank: int, rounds: int, repeats: int) -> dict[str, list[float]]:
    """Per variant, the median ms per forward+backward of each interleaved round at one shape."""
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
    return timing.interleave({k: (lambda layer=layer: timing.median_ms(lambda: _step(layer, x), repeats, "cpu"))
                              for k, layer in variants.items()}, rounds, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per variant and round (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="one small shape (smoke test)")
    args = ap.parse_args()
    if args.rounds < 1 or args.repeats < 1:
        ap.error(f"--rounds {args.rounds} --repeats {args.repeats}: both must be at least 1")
    timing.print_command()
    torch.set_num_threads(args.threads)
    shapes = [(64, 32, 32, 4)] if args.small else [(1024, 320, 320, 4), (1024, 768, 768, 16), (256, 1280, 1280, 16),
                                                    (4096, 64, 64, 8)]
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds x {args.repeats} "
          f"steps, ms per forward+backward")
    for tokens, d_in, d_out, rank in shapes:
        r = bench(tokens, d_in, d_out, rank, args.rounds, args.repeats)
        refs = {"lora_vision": "peft" if "peft" in r else "linear", "peft": "linear"}
        over = statistics.median(a / b for a, b in zip(r["lora_vision"], r["linear"]))
        extra = {"lora_vision": {"vs nn.Linear (per-round median)": f"{over:.2f}x"}}
        print(f"\n{tokens} tokens x {d_in} -> {d_out}, rank {rank}\n")
        print(timing.markdown_table(r, "ms", refs, extra, digits=3))


if __name__ == "__main__":
    main()
