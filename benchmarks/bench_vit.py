"""ViT-B/16 training throughput: our LoRA vs peft LoRA (same HF model, targets q,v + head, rank 16) vs full fine-tuning.

    python benchmarks/bench_vit.py [--batch 128] [--steps 20] [--out DIR]     (GPU; --tiny for a CPU smoke test)
    python benchmarks/bench_vit.py --variants peft,ours-purebf16,ours-purebf16-compile,ours-bf16-patchlinear \
        --profile peft,ours-purebf16                                             (follow-up: where the time goes)

Every variant runs in this one process on the same random-weight ViTForImageClassification (built from a config,
seed 0), the same batch of random images and labels, bf16 autocast and fused AdamW (the setting of the peft ViT-B/16
reference numbers, which were measured outside this repository). Timing: CUDA events around whole optimizer steps,
warm-up dropped, median. Ours differs from peft in: frozen base weights stored in bf16 (no per-step weight casts,
half the weight memory), the LoRA path of lora_vision's LoRALinear, and optionally torch.compile. `ours-purebf16`
runs the whole model in bf16 without autocast (bf16 activations and residual stream, no per-op casts), with fp32
master copies of the trainable parameters (lora_vision.training.vit.precision.MasterWeights).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

LORA_GFLOP, FULL_GFLOP, PEAK_TFLOPS = 71.4, 105.1, 790.0  # per image (ViT-B/16 at 224), H200 bf16 (benchmarks.md)


def build(tiny: bool, num_labels: int = 100):
    from transformers import ViTConfig, ViTForImageClassification

    if tiny:
        cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=num_labels)
    else:
        cfg = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, num_labels=num_labels)
    torch.manual_seed(0)
    return ViTForImageClassification(cfg), cfg.image_size


def variant(kind: str, tiny: bool, dev: str):
    """(model, trainable parameters) for one variant."""
    model, size = build(tiny)
    if kind.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 modules_to_save=["classifier"]))
    elif kind.startswith("ours"):
        from lora_vision import LoRAConfig, inject_lora
        from lora_vision.models.vit import freeze_to

        inject_lora(model, LoRAConfig(rank=16, alpha=16, targets=("q_proj", "v_proj")))
        model.classifier.requires_grad_(True)
        if "bf16" in kind:
            freeze_to(model, torch.bfloat16)
        if "patchlinear" in kind:  # patch embedding as one matmul instead of a cuDNN conv (same function)
            from lora_vision.models.vit import patchify_as_linear

            patchify_as_linear(model)
    model.to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    master = None
    if "purebf16" in kind:  # everything in bf16 (no autocast), fp32 master copies of the trainable parameters
        from lora_vision.training.vit.precision import MasterWeights

        model.to(torch.bfloat16)
        master = MasterWeights(params)
    if kind.endswith("compile"):
        model = torch.compile(model)
    return model, params, size, master


def measure(kind: str, batch: int, steps: int, warm: int, tiny: bool, dev: str, profile: str | None = None) -> dict:
    torch.cuda.empty_cache() if dev == "cuda" else None
    torch.backends.cudnn.benchmark = "cudnnbench" in kind
    model, params, size, master = variant(kind, tiny, dev)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=g).to(dev)
    y = torch.randint(0, 100, (batch,), generator=g).to(dev)
    opt = torch.optim.AdamW(master.master if master else params, lr=1e-4, fused=dev == "cuda")
    losses = []

    def step() -> None:
        if master is None:
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(pixel_values=x).logits.float(), y)
            loss.backward()
        else:
            loss = F.cross_entropy(model(pixel_values=x.to(torch.bfloat16)).logits.float(), y)
            loss.backward()
            master.grads_to_master()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if master is not None:
            master.master_to_model()
        losses.append(loss.detach())

    t0 = time.perf_counter()
    for _ in range(warm):
        step()
    if dev == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        if dev == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1000)
    ms = statistics.median(times)
    if profile:  # where the time goes: device kernels of 3 more steps, by total time
        from torch.profiler import ProfilerActivity, profile as prof

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with prof(activities=acts) as p:
            for _ in range(3):
                step()
            torch.cuda.synchronize() if dev == "cuda" else None
        key = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
        with open(os.path.join(profile, f"profile_{kind}.txt"), "w") as f:
            f.write(p.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))
    ips = batch / (ms / 1000)
    gflop = FULL_GFLOP if kind.startswith("full") else LORA_GFLOP
    out = {"variant": kind, "trainable": sum(p.numel() for p in params), "step_ms": round(ms, 2),
           "images_per_s": round(ips, 1), "share_of_limit_pct": round(100 * ips * gflop / (PEAK_TFLOPS * 1e3), 1),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None,
           "warmup_s": round(warm_s, 1), "first_loss": round(float(losses[0]), 4), "last_loss": round(float(losses[-1]), 4)}
    del model, opt, params
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="tiny ViT (CPU smoke test)")
    ap.add_argument("--variants", default="peft,ours-bf16,full,ours-fp32,ours-bf16-compile,peft-compile")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--profile", default="", help="comma-separated variants to profile (kernel table per variant)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    for kind in args.variants.split(","):
        r = measure(kind, args.batch, args.steps, args.warmup + (3 if kind.endswith("compile") else 0), args.tiny, dev,
                    args.out if kind in args.profile.split(",") else None)
        rows.append(r)
        print(json.dumps(r), flush=True)
        table = write(rows, args, dev)  # after every variant, so a timeout keeps what was measured
    print(table)


def write(rows: list[dict], args: argparse.Namespace, dev: str) -> str:
    """Write bench_vit.json and bench_vit.md to args.out; returns the Markdown table."""
    ref = next((r for r in rows if r["variant"] == "peft"), rows[0])
    lines = [f"device: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, torch {torch.__version__}, "
             f"batch {args.batch}, bf16 autocast, median of {args.steps} steps", "",
             "| variant | trainable params | step ms | images/s | vs peft | share of limit | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['trainable']:,} | {r['step_ms']} | {r['images_per_s']:,.0f} | "
                     f"{r['images_per_s'] / ref['images_per_s']:.2f}x | {r['share_of_limit_pct']}% | {r['peak_gib']} |")
    table = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_vit.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(args.out, "bench_vit.md"), "w") as f:
        f.write(table + "\n")
    return table


if __name__ == "__main__":
    main()
