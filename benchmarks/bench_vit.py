"""ViT-B/16 training throughput: our LoRA vs peft LoRA (same HF model, targets q,v + head, rank 16) vs full fine-tuning,
each compared with peft in the SAME precision mode.

    python benchmarks/bench_vit.py [--batch 128] [--steps 20] [--rounds 5] [--out DIR]   (GPU)
    python benchmarks/bench_vit.py --tiny --batch 4 --steps 2 --warmup 1 --rounds 1     (CPU smoke test)
    python benchmarks/bench_vit.py --variants peft-purebf16,ours-purebf16 --profile peft-purebf16,ours-purebf16

Every variant is built in this one process on the same random-weight ViTForImageClassification (built from a config,
seed 0), the same batch of random images and labels, fused AdamW. A variant's name gives its precision mode, and every
row is compared with the peft variant of the same mode (and compile setting) measured in the same rounds:

- `peft`, `ours-fp32`: bf16 autocast, frozen base weights in fp32 (peft's usual setting);
- `peft-bf16`, `ours-bf16`: bf16 autocast, frozen base weights stored in bf16 (no per-step weight casts);
- `peft-purebf16`, `ours-purebf16`: the whole model in bf16 without autocast, fp32 master copies of the trainable
  parameters (lora_vision.training.vit.precision.MasterWeights, the same scheme for both);
- `full`: full fine-tuning under autocast; suffixes `-compile` (torch.compile), `-patchlinear` (ours: the patch
  embedding as one matmul), `-cudnnbench` (cudnn.benchmark on).

Timing (benchmarks/timing.py): after the warm-up of every variant, rounds in a shuffled order; in a round each
variant runs --steps optimizer steps timed with CUDA events and gives its median; the table reports images/s as the
median and spread over the rounds and the ratio to same-mode peft (ratio of medians, median of per-round ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import timing  # noqa: E402  (the shared rounds and report)

LORA_GFLOP, FULL_GFLOP, PEAK_TFLOPS = 71.4, 105.1, 790.0  # per image (ViT-B/16 at 224), H200 bf16 (benchmarks.md)
MODES = {"purebf16": "pure bf16, fp32 master copies", "bf16": "autocast bf16, bf16 frozen weights",
         "fp32": "autocast bf16, fp32 frozen weights"}


def mode_of(kind: str) -> str:
    """The precision mode a variant name selects (peft and full without a mode word: autocast, fp32 weights)."""
    parts = kind.split("-")
    for word in ("purebf16", "bf16", "fp32"):
        if word in parts:
            return word
    return "fp32"


def peft_reference(kind: str, kinds: list[str]) -> str | None:
    """The peft variant of the same precision mode to compare a variant with (same compile setting if measured)."""
    mode, compiled = mode_of(kind), kind.endswith("-compile")
    same = [k for k in kinds if k.startswith("peft") and mode_of(k) == mode]
    for k in sorted(same, key=lambda k: k.endswith("-compile") != compiled):
        return None if k == kind else k
    return None


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

        from lora_vision.models.vit import freeze_to

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 modules_to_save=["classifier"]))
        if mode_of(kind) == "bf16":
            freeze_to(model, torch.bfloat16)
    elif kind.startswith("ours"):
        from lora_vision import LoRAConfig, inject_lora
        from lora_vision.models.vit import freeze_to

        inject_lora(model, LoRAConfig(rank=16, alpha=16, targets=("q_proj", "v_proj")))
        model.classifier.requires_grad_(True)
        if mode_of(kind) == "bf16":
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


class Variant:
    """One variant built and warmed up; `round_ms()` times --steps optimizer steps and returns their median."""

    def __init__(self, kind: str, batch: int, steps: int, warm: int, tiny: bool, dev: str) -> None:
        torch.backends.cudnn.benchmark = "cudnnbench" in kind
        self.kind, self.batch, self.steps, self.dev = kind, batch, steps, dev
        self.model, self.params, size, self.master = variant(kind, tiny, dev)
        g = torch.Generator(device="cpu").manual_seed(1)
        self.x = torch.randn(batch, 3, size, size, generator=g).to(dev)
        self.y = torch.randint(0, 100, (batch,), generator=g).to(dev)
        self.opt = torch.optim.AdamW(self.master.master if self.master else self.params, lr=1e-4,
                                     fused=dev == "cuda")
        self.losses: list[torch.Tensor] = []
        t0 = time.perf_counter()
        for _ in range(warm):
            self.step()
        timing.sync(dev)
        self.warmup_s = time.perf_counter() - t0

    def step(self) -> None:
        torch.backends.cudnn.benchmark = "cudnnbench" in self.kind
        if self.master is None:
            with torch.autocast(self.dev, dtype=torch.bfloat16):
                loss = F.cross_entropy(self.model(pixel_values=self.x).logits.float(), self.y)
            loss.backward()
        else:
            loss = F.cross_entropy(self.model(pixel_values=self.x.to(torch.bfloat16)).logits.float(), self.y)
            loss.backward()
            self.master.grads_to_master()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.master is not None:
            self.master.master_to_model()
        self.losses.append(loss.detach())

    def round_ms(self) -> float:
        times = []
        for _ in range(self.steps):
            if self.dev == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                self.step()
                e.record()
                torch.cuda.synchronize()
                times.append(s.elapsed_time(e))
            else:
                times.append(timing.timed_ms(self.step, "cpu"))
        return statistics.median(times)

    def profile(self, folder: str) -> None:
        """Where the time goes: the kernels of 3 more steps by category and the top ones, to profile_<kind>.md
        (the table train_sd.py's --profile_steps writes, lora_vision.training.profiling.kernel_table)."""
        from torch.profiler import ProfilerActivity, profile as prof

        from lora_vision.training.profiling import kernel_table

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.dev == "cuda" else [])
        timing.sync(self.dev)
        with prof(activities=acts) as p:
            t0 = time.perf_counter()
            for _ in range(3):
                self.step()
            timing.sync(self.dev)
            wall = time.perf_counter() - t0
        table = kernel_table(p.key_averages(), self.dev == "cuda", 3, wall)
        with open(os.path.join(folder, f"profile_{self.kind}.md"), "w") as f:
            f.write(f"# {self.kind}: where the step's time goes\n\ncommand: {timing.command_line()}\n\n{table}")

    def row(self, ms_per_round: list[float], peak_gib: float | None) -> dict:
        ms = statistics.median(ms_per_round)
        ips = self.batch / (ms / 1000)
        gflop = FULL_GFLOP if self.kind.startswith("full") else LORA_GFLOP
        return {"variant": self.kind, "mode": MODES[mode_of(self.kind)], "trainable": sum(p.numel() for p in self.params),
                "step_ms": round(ms, 2), "images_per_s": round(ips, 1),
                "images_per_s_rounds": [round(self.batch / (m / 1000), 1) for m in ms_per_round],
                "share_of_limit_pct": round(100 * ips * gflop / (PEAK_TFLOPS * 1e3), 1), "peak_gib": peak_gib,
                "warmup_s": round(self.warmup_s, 1), "first_loss": round(float(self.losses[0]), 4),
                "last_loss": round(float(self.losses[-1]), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant and round (median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (shuffled order per round, seed 0)")
    ap.add_argument("--tiny", action="store_true", help="tiny ViT (CPU smoke test)")
    ap.add_argument("--variants", default="peft,ours-fp32,peft-bf16,ours-bf16,peft-purebf16,ours-purebf16,full")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--profile", default="", help="comma-separated variants to profile (kernel table per variant)")
    args = ap.parse_args()
    kinds = [k for k in args.variants.split(",") if k]
    if not kinds or args.rounds < 1 or args.steps < 1:
        ap.error(f"--variants {args.variants!r} --rounds {args.rounds} --steps {args.steps}: expected at least one "
                 "variant, one round and one step")
    timing.print_command()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    built = {}
    for kind in kinds:
        built[kind] = Variant(kind, args.batch, args.steps, args.warmup + (3 if kind.endswith("compile") else 0),
                              args.tiny, dev)
        print(f"{kind}: built and warmed up in {built[kind].warmup_s:.1f} s", flush=True)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()  # all variants are resident: the peak is of the whole process
    ms = timing.interleave({k: v.round_ms for k, v in built.items()}, args.rounds)
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None
    rows = [built[k].row(ms[k], peak) for k in kinds]
    for k in kinds:
        if k in args.profile.split(","):
            built[k].profile(args.out)
    print(write(rows, args, dev, kinds))


def write(rows: list[dict], args: argparse.Namespace, dev: str, kinds: list[str]) -> str:
    """Write bench_vit.json and bench_vit.md to args.out; returns the Markdown table."""
    values = {r["variant"]: r["images_per_s_rounds"] for r in rows}
    refs = {k: peft_reference(k, kinds) for k in kinds}
    extra = {r["variant"]: {"precision mode": r["mode"] + (", compiled" if r["variant"].endswith("compile") else ""),
                            "trainable params": f"{r['trainable']:,}",
                            "share of limit": f"{r['share_of_limit_pct']}%"} for r in rows}
    head = (f"command: {timing.command_line()}\n\ndevice: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, "
            f"torch {torch.__version__}, batch {args.batch}, {args.rounds} interleaved rounds x {args.steps} steps; "
            f"images/s; each row against peft in the same precision mode; peak memory of the process (all variants "
            f"resident): {rows[0]['peak_gib']} GiB\n\n")
    table = head + timing.markdown_table(values, "images/s", refs, extra, digits=1)
    os.makedirs(args.out, exist_ok=True)
    from lora_vision.io import atomic_write_text

    atomic_write_text(os.path.join(args.out, "bench_vit.json"), json.dumps(rows, indent=1))
    atomic_write_text(os.path.join(args.out, "bench_vit.md"), table + "\n")
    return table


if __name__ == "__main__":
    main()
