"""ViT-B/16 LoRA training throughput on 1 or N GPUs through accelerate (DDP, or FSDP with --fsdp).

    accelerate launch --config_file configs/accelerate/multi_gpu.yaml benchmarks/bench_vit_ddp.py --batch 128
    python benchmarks/bench_vit_ddp.py --batch 128                       (one GPU)
    ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 benchmarks/bench_vit_ddp.py --tiny   (CPU smoke test)

Random-weight ViTForImageClassification (seed 0, 100 classes), LoRA rank 16 on q,v + the head trainable, frozen base
weights in bf16, bf16 autocast, AdamW; each process trains on its own random batch of --batch images (per device).
Timing: benchmarks/timing.py's timed_ms around whole optimizer steps (a device sync before and after, so the
gradient all-reduce is included; the host clock on a CPU), warm-up dropped, the median step of the slowest process.
bench_multi_gpu.sh launches it once per configuration and round, interleaved. Prints the command (rank 0) and one
JSON line (rank 0): global images/s, step time, peak memory per GPU. With --save,
rank 0 writes the LoRA + head weights (under FSDP gathered with a full state dict, only trainable keys kept).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import timing  # noqa: E402  (the shared timing method)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128, help="images per device")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--fsdp", action="store_true", help="FSDP (use_orig_params=True) instead of DDP")
    ap.add_argument("--save", default="", help="write the trained LoRA + head weights here (rank 0)")
    args = ap.parse_args()

    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import ViTConfig, ViTForImageClassification

    from lora_vision import LoRAConfig, inject_lora
    from lora_vision.io import write_safetensors
    from lora_vision.models.vit import freeze_to

    plugin = FullyShardedDataParallelPlugin(use_orig_params=True, sharding_strategy="FULL_SHARD") if args.fsdp else None
    acc = Accelerator(mixed_precision="bf16", fsdp_plugin=plugin)
    if args.tiny:
        cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=100)
    else:
        cfg = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, num_labels=100)
    torch.manual_seed(0)
    model = ViTForImageClassification(cfg)
    inject_lora(model, LoRAConfig(rank=16, alpha=16, targets=("q_proj", "v_proj")))
    model.classifier.requires_grad_(True)
    if not args.fsdp:  # FSDP flattens parameters of one dtype per unit: keep fp32 there
        freeze_to(model, torch.bfloat16)
    model = acc.prepare(model)  # FSDP wants the optimizer built on the wrapped model's parameters
    params = [p for p in model.parameters() if p.requires_grad]
    opt = acc.prepare(torch.optim.AdamW(params, lr=1e-4))
    g = torch.Generator(device="cpu").manual_seed(1 + acc.process_index)  # each process: its own images
    x = torch.randn(args.batch, 3, cfg.image_size, cfg.image_size, generator=g).to(acc.device)
    y = torch.randint(0, 100, (args.batch,), generator=g).to(acc.device)
    cuda = acc.device.type == "cuda"
    if acc.is_main_process:
        timing.print_command()
    losses, times = [], []

    def step() -> None:
        with acc.autocast():
            loss = F.cross_entropy(model(pixel_values=x).logits.float(), y)
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    for i in range(args.warmup + args.steps):
        if i == args.warmup and cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ms = timing.timed_ms(step, acc.device)
        if i >= args.warmup:
            times.append(ms / 1000)
    med = statistics.median(times) if times else float("nan")
    step_s = float(acc.reduce(torch.tensor(med, device=acc.device), "max"))  # the slowest process sets the pace
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    peaks = acc.gather(torch.tensor([peak], device=acc.device)).tolist()
    finite = all(torch.isfinite(torch.stack(losses)).tolist())
    if args.save:
        sd = acc.get_state_dict(model)  # under FSDP: a full state dict gathered to rank 0
        names = {n for n, p in acc.unwrap_model(model).named_parameters() if p.requires_grad}
        if acc.is_main_process:
            kept = {k: v.detach().float().cpu().contiguous() for k, v in sd.items() if k in names}
            write_safetensors(args.save, kept)
    if acc.is_main_process:
        n = acc.num_processes
        print("RESULT " + json.dumps({
            "processes": n, "mode": "fsdp" if args.fsdp else ("ddp" if n > 1 else "single"), "batch_per_device":
            args.batch, "step_s": round(step_s, 4), "images_per_s": round(n * args.batch / step_s, 1),
            "peak_gib_per_gpu": [round(p, 2) for p in peaks], "loss_first": round(float(losses[0]), 4),
            "loss_last": round(float(losses[-1]), 4), "finite": finite, "trainable": sum(p.numel() for p in params)}),
            flush=True)


if __name__ == "__main__":
    from lora_vision.training.checkpoint import end_process_group

    ok = False
    try:
        main()
        ok = True
    finally:
        end_process_group(clean=ok)
