"""Adapter operations in a diffusers pipeline: lora_vision.pipeline against diffusers + peft, side by side.

SD 1.5 architecture with random weights (UNet, CLIP text encoder and VAE built from configs on the device), two
adapters of rank 16 on UNet attention (to_q/k/v/out.0 of attn1 and attn2) and text-encoder attention
(q/k/v/out_proj), saved to disk as a lora_vision file and as a diffusers file (our exporter) holding the same
tensors. Measured, alternating in rounds, median over repeats with torch.cuda.synchronize around each operation:

- load + apply from disk (file -> pipeline), warm file cache and cold (file pages dropped with posix_fadvise);
- switch between two loaded adapters; change the strength of one; fuse and unfuse;
- one UNet step (batch 2, 64x64 latent) base / adapter unfused / fused, and the difference between our output and
  diffusers' output for the same file (same adapter, so it should be bf16 noise).

The libraries run in a shuffled order per round (benchmarks/timing.py); each round gives one median per operation
and library, and the table reports the median and spread over the rounds and ours / diffusers per round.

    python benchmarks/bench_adapter_ops.py --model sd15 --device cuda --dtype bf16 --out $OUT
    python benchmarks/bench_adapter_ops.py --model tiny --device cpu --dtype fp32 --rounds 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import timing  # noqa: E402  (the shared rounds and report)
from lora_vision.adapter import Adapter  # noqa: E402
from lora_vision.dtypes import parse_dtype  # noqa: E402
from lora_vision.formats import export  # noqa: E402
from lora_vision.metadata import FORMAT_VERSION, AdapterMetadata  # noqa: E402
from lora_vision.pipeline import (fuse, load_adapter, set_adapter_strength, set_adapters, unfuse,  # noqa: E402
                                  unload_adapter)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def build_pipeline(model: str, device: str, dtype: torch.dtype):
    """SD 1.5 (or a tiny stand-in) with random weights, built directly on the device."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_vision.models import build_tiny_tokenizer

    big = model == "sd15"
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64 if big else 8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280) if big else (32, 64, 64, 64),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768 if big else 32, attention_head_dim=8, norm_num_groups=32 if big else 8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2 if big else 1,
            block_out_channels=(128, 256, 512, 512) if big else (16, 16, 16, 16), norm_num_groups=32 if big else 8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        tok = build_tiny_tokenizer()
        te = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=768 if big else 32, intermediate_size=3072 if big else 37,
            num_hidden_layers=12 if big else 2, num_attention_heads=12 if big else 4, max_position_embeddings=77,
            hidden_act="quick_gelu", projection_dim=768 if big else 32))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=DDPMScheduler(steps_offset=1, clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(dtype=dtype)
    for m in (unet, vae, te):
        m.eval().requires_grad_(False)
    return pipe


def make_adapter(pipe, rank: int, seed: int) -> Adapter:
    """Random rank-`rank` LoRA (alpha = rank) on UNet and text-encoder attention, as canonical fp32 tensors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for comp, targets in (("unet", UNET_TARGETS), ("text_encoder", TE_TARGETS)):
        for name, mod in getattr(pipe, comp).named_modules():
            if isinstance(mod, torch.nn.Linear) and any(name.endswith("." + t) for t in targets):
                tensors[f"{comp}.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) / 30
                tensors[f"{comp}.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) / 100
                tensors[f"{comp}.{name}.alpha"] = torch.tensor(float(rank))
    return Adapter(tensors, AdapterMetadata(format=FORMAT_VERSION).to_strings())


timed = timing.timed_ms


def drop_cache(path: Path) -> None:
    """Evict a file's pages from the page cache (no root needed for clean pages)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_ms(path: Path) -> float:
    t = time.perf_counter()
    Path(path).read_bytes()
    return (time.perf_counter() - t) * 1000


def unet_step(pipe, device: str, dtype: torch.dtype):
    size = 64 if pipe.unet.config.sample_size == 64 else 8
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 4, size, size, generator=g).to(device, dtype)
    emb = torch.randn(2, 77, pipe.text_encoder.config.hidden_size, generator=g).to(device, dtype)
    ids = torch.randint(0, len(pipe.tokenizer), (2, 77), generator=g).to(device)
    t = torch.tensor([500, 500], device=device)

    def step():
        with torch.no_grad():
            return pipe.unet(lat, t, encoder_hidden_states=emb).sample, pipe.text_encoder(ids)[0]
    return step


class Ours:
    label = "lora_vision"

    def __init__(self, pipe, files):
        self.pipe, self.files = pipe, files

    def load(self, key, name):
        load_adapter(self.pipe, self.files[key], name=name)

    def switch(self, name):
        set_adapters(self.pipe, [name])

    def strength(self, name, s):
        set_adapter_strength(self.pipe, name, s)

    def fuse(self, name):
        fuse(self.pipe, names=[name])

    def unfuse(self):
        unfuse(self.pipe)

    def unload(self):
        unload_adapter(self.pipe)


class Diffusers:
    label = "diffusers+peft"

    def __init__(self, pipe, files):
        self.pipe, self.files = pipe, files

    def load(self, key, name):
        self.pipe.load_lora_weights(str(self.files[key]), adapter_name=name)

    def switch(self, name):
        self.pipe.set_adapters([name])

    def strength(self, name, s):
        self.pipe.set_adapters([name], adapter_weights=[s])

    def fuse(self, name):
        self.pipe.fuse_lora(adapter_names=[name], lora_scale=1.0)

    def unfuse(self):
        self.pipe.unfuse_lora()

    def unload(self):
        self.pipe.unload_lora_weights()


def one_round(lib, device, dtype, step, res, repeats, outputs):
    """Every operation once per round (loads `repeats` times), results appended to res[label][op]."""
    r = res.setdefault(lib.label, {})
    add = lambda op, v: r.setdefault(op, []).append(v)  # noqa: E731
    for i in range(repeats):
        drop_cache(lib.files["a"])
        add("load_cold_ms", timed(lambda: lib.load("a", "a"), device))
        lib.unload()
        add("load_warm_ms", timed(lambda: lib.load("a", "a"), device))
        lib.unload()
    lib.load("a", "a")
    lib.load("b", "b")
    lib.switch("a")
    for i in range(repeats * 2):
        add("switch_ms", timed(lambda: lib.switch("b" if i % 2 == 0 else "a"), device))
    lib.switch("a")
    for i in range(repeats * 2):
        add("strength_ms", timed(lambda: lib.strength("a", 0.5 + 0.01 * i), device))
    lib.strength("a", 1.0)
    step()
    add("step_unfused_ms", _median_step(step, device))
    outputs[lib.label] = [o.float().cpu() for o in step()]
    for i in range(max(3, repeats // 2)):
        add("fuse_ms", timed(lambda: lib.fuse("a"), device))
        if i == 0:
            add("step_fused_ms", _median_step(step, device))
            outputs[lib.label + " fused"] = [o.float().cpu() for o in step()]
        add("unfuse_ms", timed(lib.unfuse, device))
    lib.unload()


def _median_step(step, device, n=10):
    return timing.median_ms(step, n, device, warmup=1)


def run_rounds(libs, device, dtype, step, rounds: int, repeats: int, outputs: dict, seed: int = 0) -> dict:
    """`one_round` of every library per round, in timing.round_orders' order; {label: {op: [median per round]}}."""
    res: dict = {}
    per_round: dict = {}
    by_label = {lib.label: lib for lib in libs}
    for rnd, order in enumerate(timing.round_orders(by_label, rounds, seed)):
        for label in order:
            seen = {op: len(v) for op, v in res.get(label, {}).items()}
            one_round(by_label[label], device, dtype, step, res, repeats, outputs)
            for op, v in res[label].items():
                per_round.setdefault(label, {}).setdefault(op, []).append(statistics.median(v[seen.get(op, 0):]))
        print(f"round {rnd + 1}/{rounds} done ({', '.join(order)})", flush=True)
    return per_round


def model_arguments(ap: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --rank: the pipeline and adapters of this benchmark (profile_load.py too)."""
    ap.add_argument("--model", choices=("sd15", "tiny"), default="sd15")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--rank", type=int, default=16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_arguments(ap)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (ours, diffusers, ours, ...)")
    ap.add_argument("--repeats", type=int, default=6, help="loads per round; switches/strengths are 2x this")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.rounds < 1 or args.repeats < 1:
        ap.error(f"--rounds {args.rounds} --repeats {args.repeats}: both must be at least 1")
    timing.print_command()
    dtype = parse_dtype(args.dtype, "--dtype")
    torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    pipe = build_pipeline(args.model, args.device, dtype)
    print(f"built {args.model} on {args.device} in {time.perf_counter() - t0:.1f} s", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_adapters_"))
    ours_files, diff_files = {}, {}
    for key, seed in (("a", 1), ("b", 2)):
        ad = make_adapter(pipe, args.rank, seed)
        ours_files[key] = ad.save(tmp / f"{key}.safetensors")  # fp32, like the reference's files
        diff_files[key] = export(ad, "diffusers", tmp / f"{key}_diffusers.safetensors", dtype=torch.float32)
    files = {**ours_files, **{k + "_diffusers": v for k, v in diff_files.items()}}
    sizes = {k: os.path.getsize(v) for k, v in files.items()}
    print("files:", json.dumps(sizes), flush=True)
    step = unet_step(pipe, args.device, dtype)
    outputs: dict = {}
    base = _median_step(step, args.device)
    base_out = [o.float().cpu() for o in step()]
    libs = [Ours(pipe, ours_files), Diffusers(pipe, diff_files), Ours(pipe, diff_files)]
    libs[2].label = "lora_vision (diffusers file)"
    first = {}
    for lib in libs:  # the very first load in the process, per library (allocator and import warm-up included)
        first[lib.label] = timed(lambda: lib.load("a", "a"), args.device)
        lib.unload()
    res = run_rounds(libs, args.device, dtype, step, args.rounds, args.repeats, outputs)
    cold_read = []
    for _ in range(3):
        drop_cache(ours_files["a"])
        cold_read.append(read_ms(ours_files["a"]))
    warm_read = [read_ms(ours_files["a"]) for _ in range(3)]
    summary = {lab: {op: statistics.median(v) for op, v in ops.items()} for lab, ops in res.items()}
    diffs = {}
    ref = outputs["diffusers+peft"]
    for lab, outs in outputs.items():
        diffs[lab] = {"unet_max_abs_diff_vs_diffusers": float((outs[0] - ref[0]).abs().max()),
                      "te_max_abs_diff_vs_diffusers": float((outs[1] - ref[1]).abs().max()),
                      "unet_max_abs_change_vs_base": float((outs[0] - base_out[0]).abs().max())}
    result = {"args": vars(args), "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "file_bytes": sizes, "step_base_ms": base, "summary": summary,
              "first_load_ms": first, "round_medians": res, "output_diffs": diffs, "file_read_ms": {"cold": cold_read, "warm": warm_read}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_adapter_ops.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(diffs, indent=1))
    print(f"raw file read of one adapter ({sizes['a'] / 2**20:.1f} MiB): cold {statistics.median(cold_read):.2f} ms, "
          f"warm {statistics.median(warm_read):.2f} ms")
    print(f"UNet+TE step (batch 2) base: {base:.2f} ms")
    print_table(res, first)


OPS = ("load_warm_ms", "load_cold_ms", "switch_ms", "strength_ms", "fuse_ms", "unfuse_ms", "step_unfused_ms",
       "step_fused_ms")


def print_table(per_round: dict, first: dict) -> None:
    """The markdown table of ms per operation and library over the rounds (timing.markdown_table), each of ours
    against diffusers + peft measured in the same rounds; then the first load of each library in the process."""
    values, refs = {}, {}
    for op in OPS:
        for lab, ops in per_round.items():
            if op in ops:
                values[f"{op}: {lab}"] = ops[op]
                refs[f"{op}: {lab}"] = f"{op}: diffusers+peft" if lab != "diffusers+peft" else None
    print(timing.markdown_table(values, "ms", refs, digits=3))
    print("first load in the process (ms, once): " + ", ".join(f"{k} {v:.1f}" for k, v in first.items()))


if __name__ == "__main__":
    main()
