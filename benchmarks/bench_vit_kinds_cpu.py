"""What each adapter kind costs on torchvision's ViT attention (nn.MultiheadAttention, the kinds part by part), on
the CPU: one training step (forward + backward of the adapter's factors) and one inference forward, unfused.

    PYTHONPATH=. python benchmarks/bench_vit_kinds_cpu.py --model vit_b_16 --batch 4 --rounds 5 --threads 2

The model is torchvision's architecture with random weights (`--model vit_b_16` is ViT-B/16 at 224 px), the
adapters rank 8 on every attention's q, k, v and o (preset tv-vit-attn), the factors moved off their zero start so
that every kind runs its whole update. Variants run in interleaved rounds (benchmarks/timing.py): the table gives
per variant the median and spread over the rounds of the per-round median of `--repeats` steps, and the ratio
against plain LoRA measured in the same rounds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleave, markdown_table, median_ms, print_command  # noqa: E402

from lora_vision import LoRAConfig, inject_lora, lora_parameters  # noqa: E402

KINDS = {"lora": {}, "loha": {}, "lokr": {"lokr_factor": 4}, "dora": {}}


def build(model: str, kind: str | None, rank: int) -> torch.nn.Module:
    from torchvision.models import get_model

    from lora_vision.models.tiny import build_tiny_torchvision_vit

    torch.manual_seed(0)
    net = build_tiny_torchvision_vit(10, 32, 0) if model == "tiny-torchvision" else \
        get_model(model, weights=None, num_classes=10)
    if kind is not None:
        inject_lora(net, LoRAConfig(rank=rank, targets="tv-vit-attn", adapter_type=kind, **KINDS[kind]))
        with torch.no_grad():
            for p in lora_parameters(net):
                p.add_(torch.randn_like(p) * 0.01)
    return net


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_b_16",
                    help="a torchvision ViT (vit_b_16, vit_b_32, vit_l_16, ...) or tiny-torchvision (the smoke test)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2, help="timed calls per variant and round (their median counts)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if min(args.batch, args.rank, args.rounds, args.repeats, args.threads) < 1:
        ap.error("--batch, --rank, --rounds, --repeats and --threads must be at least 1")
    print_command(argv if argv is None else [sys.argv[0], *argv])
    torch.set_num_threads(args.threads)
    nets = {"base": build(args.model, None, args.rank).eval()}
    nets.update({k: build(args.model, k, args.rank).eval() for k in KINDS})
    size = nets["base"].image_size
    x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(1))

    def forward(net):
        def run():
            with torch.no_grad():
                net(x)
        return lambda: median_ms(run, args.repeats, warmup=1)

    def step(net):
        params = lora_parameters(net)

        def run():
            net(x).sum().backward()
            for p in params:
                p.grad = None
        return lambda: median_ms(run, args.repeats, warmup=1)

    variants = {f"{k} forward": forward(n) for k, n in nets.items()}
    variants.update({f"{k} train step": step(n) for k, n in nets.items() if k != "base"})
    values = interleave(variants, args.rounds)
    refs = {label: ("base forward" if label.endswith("forward") else "lora train step") for label in values}
    print(f"\n{args.model}, batch {args.batch} at {size} px, rank {args.rank} on q, k, v, o of every attention, "
          f"{args.threads} thread(s), unfused:\n")
    print(markdown_table(values, "ms", refs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
