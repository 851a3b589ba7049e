"""Adapter operations on a Flux.1 pipeline: lora_vision.pipeline against diffusers + peft, side by side.

A real-size Flux.1-dev transformer (19 double + 38 single blocks, width 3072, 11.9 B parameters) with random weights,
built in bf16 on the device and placed in a FluxPipeline (the other components are the tiny ones of
lora_vision.models.dit: only the transformer is measured). Two rank-16 adapters on the `flux-attn` preset (double
blocks q/k/v/out and add_q/k/v/to_add_out, single blocks q/k/v and proj_out: 304 modules), saved as a lora_vision
file and as a diffusers file (our exporter) holding the same tensors. The operations, rounds (ours, diffusers,
ours-reading-the-diffusers-file, repeated) and timing are those of bench_adapter_ops.py (imported, not copied):
load + apply (warm and cold file cache), switch, strength change, fuse, unfuse, one transformer step (1024x1024:
4096 image tokens + 512 text tokens, batch 1) base / unfused / fused, and our output against diffusers' for the
same file.

    python benchmarks/bench_dit_adapter_ops.py --model flux1 --device cuda --dtype bf16 --out $OUT   # one H200
    python benchmarks/bench_dit_adapter_ops.py --model tiny --device cpu --dtype fp32 --rounds 1 --repeats 2  # smoke
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

import bench_adapter_ops as ops  # noqa: E402  (the shared timing, rounds and library wrappers)

from lora_vision.adapter import Adapter  # noqa: E402
from lora_vision.dtypes import parse_dtype  # noqa: E402
from lora_vision.formats import export  # noqa: E402
from lora_vision.lora.config import matches  # noqa: E402
from lora_vision.metadata import FORMAT_VERSION, AdapterMetadata  # noqa: E402
from lora_vision.models.dit import build_tiny_dit, transformer_inputs, transformer_output  # noqa: E402
from lora_vision.targets import resolve_preset  # noqa: E402

PRESET = "flux-attn"


def build_pipeline(model: str, device: str, dtype: torch.dtype):
    """The tiny Flux.1 pipeline, with a full-size random Flux.1-dev transformer for --model flux1."""
    from diffusers import FluxTransformer2DModel

    pipe = build_tiny_dit("tiny-flux").to(device)
    if model == "flux1":
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build directly in bf16: 24 GB instead of 48 GB in fp32
        try:
            with torch.device(device):
                transformer = FluxTransformer2DModel(guidance_embeds=True)
        finally:
            torch.set_default_dtype(previous)
        pipe.register_modules(transformer=transformer.eval())
    return pipe.to(device=device, dtype=dtype)


def make_adapter(pipe, rank: int, seed: int) -> Adapter:
    """Random rank-`rank` LoRA (alpha = rank) on the flux-attn modules of the transformer, canonical fp32."""
    g = torch.Generator().manual_seed(seed)
    patterns = resolve_preset(PRESET, pipe.transformer)
    tensors = {}
    for name, mod in pipe.transformer.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(matches(name, p) for p in patterns):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) / 60
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) / 100
            tensors[f"transformer.{name}.alpha"] = torch.tensor(float(rank))
    return Adapter(tensors, AdapterMetadata(format=FORMAT_VERSION).to_strings())


def transformer_step(pipe, model: str):
    big = model == "flux1"
    inputs = transformer_inputs(pipe.transformer, image_tokens=(64, 64) if big else (4, 4),
                                text_tokens=512 if big else 8)

    def step():
        with torch.no_grad():
            return (transformer_output(pipe.transformer, inputs),)
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("flux1", "tiny"), default="flux1")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (ours, diffusers, ours, ...)")
    ap.add_argument("--repeats", type=int, default=4, help="loads per round; switches/strengths are 2x this")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    ops.timing.print_command()
    dtype = parse_dtype(args.dtype, "--dtype")
    torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    pipe = build_pipeline(args.model, args.device, dtype)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"built {args.model} transformer ({n_params / 1e9:.2f} B parameters) on {args.device} in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_dit_adapters_"))
    ours_files, diff_files = {}, {}
    for key, seed in (("a", 1), ("b", 2)):
        ad = make_adapter(pipe, args.rank, seed)
        ours_files[key] = ad.save(tmp / f"{key}.safetensors")
        diff_files[key] = export(ad, "diffusers", tmp / f"{key}_diffusers.safetensors", dtype=torch.float32)
    sizes = {k: os.path.getsize(v) for k, v in {**ours_files, **{k + "_diffusers": v for k, v in
                                                                 diff_files.items()}}.items()}
    print("files:", json.dumps(sizes), flush=True)
    step = transformer_step(pipe, args.model)
    base = ops._median_step(step, args.device)
    base_out = [o.float().cpu() for o in step()]
    libs = [ops.Ours(pipe, ours_files), ops.Diffusers(pipe, diff_files), ops.Ours(pipe, diff_files)]
    libs[2].label = "lora_vision (diffusers file)"
    first = {}
    for lib in libs:  # the very first load in the process, per library (allocator and import warm-up included)
        first[lib.label] = ops.timed(lambda: lib.load("a", "a"), args.device)
        lib.unload()
    outputs: dict = {}
    res = ops.run_rounds(libs, args.device, dtype, step, args.rounds, args.repeats, outputs)
    summary = {lab: {op: statistics.median(v) for op, v in o.items()} for lab, o in res.items()}
    ref = outputs["diffusers+peft"][0]
    diffs = {lab: {"max_abs_diff_vs_diffusers": float((o[0] - ref).abs().max()),
                   "max_abs_change_vs_base": float((o[0] - base_out[0]).abs().max())} for lab, o in outputs.items()}
    result = {"args": vars(args), "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "transformer_parameters": n_params, "file_bytes": sizes,
              "step_base_ms": base, "summary": summary, "first_load_ms": first, "round_medians": res,
              "output_diffs": diffs}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_dit_adapter_ops.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(diffs, indent=1))
    print(f"transformer step base: {base:.2f} ms")
    ops.print_table(res, first)


if __name__ == "__main__":
    main()
