"""DiT low-memory mode (issue #16): peak memory and loss curve of scripts/train_sd.py on a real-size random-weight
Flux.1-dev transformer at 1024 px, bf16 base against each --quantize_base, same data, seed and steps.

`build` writes the pipeline folder once: the tiny Flux.1 pipeline of lora_vision.models.dit with a full-size
FluxTransformer2DModel (19 double + 38 single blocks, 11.9 B parameters, guidance embedding) in bf16 and text
encoders widened to the transformer's inputs (CLIP 768, T5 4096; one layer each: their embeddings are cached
before the first step and they leave the GPU) and the tiny VAE with the real one's 16 latent channels. `compare` runs one training process per mode (a fresh CUDA
allocator each), reads each run's loss.csv and prints one table row per mode: peak allocated GiB, time, the mean
loss of the first and last 10 steps, and the mean absolute per-step loss difference from the bf16 base.

    python benchmarks/bench_dit_lowmem.py build --out /tmp/bench_flux1                          # ~24 GB on disk
    python benchmarks/bench_dit_lowmem.py compare --model /tmp/bench_flux1 --out $OUT --modes none int8 fp8 nf4
    python benchmarks/bench_dit_lowmem.py build --out /tmp/tiny_flux --size tiny && python \\
        benchmarks/bench_dit_lowmem.py compare --model /tmp/tiny_flux --out /tmp/o --modes none int8 --steps 3 \\
        --resolution 64                                                                          # CPU smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(out: Path, size: str) -> None:
    """Write the benchmark pipeline folder (see the module docstring)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from lora_vision.models.dit import build_tiny_dit

    pipe = build_tiny_dit("tiny-flux")
    if size == "full":
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built in bf16: 24 GB instead of 48 GB in fp32
        try:  # random init of 11.9 B parameters: on the GPU when there is one
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                transformer = FluxTransformer2DModel(guidance_embeds=True)
        finally:
            torch.set_default_dtype(previous)
        clip = pipe.text_encoder.config
        clip.hidden_size = clip.projection_dim = transformer.config.pooled_projection_dim
        clip.num_attention_heads, clip.num_hidden_layers = 12, 1
        t5 = pipe.text_encoder_2.config
        t5.d_model, t5.num_layers = transformer.config.joint_attention_dim, 1
        vae = dict(pipe.vae.config, latent_channels=transformer.config.in_channels // 4)  # 16, as the real VAE
        pipe.register_modules(transformer=transformer, text_encoder=CLIPTextModel(clip),
                              text_encoder_2=T5EncoderModel(t5), vae=AutoencoderKL.from_config(vae))
    pipe.to(torch.bfloat16).save_pretrained(out)
    print(f"wrote {out} ({sum(p.numel() for p in pipe.transformer.parameters()) / 1e9:.2f} B transformer parameters)")


def images(folder: Path, n: int, resolution: int) -> Path:
    """n random-noise instance images (the same for every mode: seeded)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        pixels = (torch.rand(resolution, resolution, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"img_{i:02d}.png")
    return folder


def one(model: str, data: Path, out: Path, mode: str, steps: int, resolution: int) -> None:
    """One training run in this process; prints `RESULT {json}` with its peak memory and time."""
    sys.path.insert(0, str(REPO / "scripts"))
    import train_sd

    args = ["--pretrained_model_name_or_path", model, "--instance_data_dir", str(data), "--instance_prompt",
            "a photo of sks dog", "--output_dir", str(out), "--resolution", str(resolution), "--train_batch_size",
            "1", "--rank", "16", "--unet_targets", "flux-attn-ff", "--mixed_precision", "bf16",
            "--guidance_scale", "1", "--max_train_steps", str(steps), "--checkpointing_steps", "100000",
            "--strength_sweep=", "--report_to", "none", "--logging_steps", "1", "--gradient_checkpointing",
            "--max_sequence_length", "512", "--quantize_base", mode, "--seed", "0"]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    code = train_sd.main(args)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    print("RESULT " + json.dumps({"mode": mode, "code": code, "seconds": seconds, "peak_gib": peak}), flush=True)


def losses(out: Path) -> list[float]:
    rows = (out / "logs" / "loss.csv").read_text().splitlines()[1:]
    return [float(r.split(",")[1]) for r in rows]


def compare(model: str, out: Path, modes: list[str], steps: int, resolution: int) -> None:
    """Run every mode in its own process and print the table."""
    data = images(out / "images", 8, resolution)
    results = {}
    for mode in modes:
        run = subprocess.run([sys.executable, __file__, "one", "--model", model, "--data", str(data), "--out",
                              str(out / mode), "--mode", mode, "--steps", str(steps), "--resolution",
                              str(resolution)], capture_output=True, text=True)
        found = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        results[mode] = json.loads(found[-1][7:]) if found else {"mode": mode, "code": run.returncode}
        if results[mode]["code"] != 0:
            print(f"{mode}: exit {results[mode]['code']}: {run.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
    base = losses(out / "none") if "none" in modes and results["none"]["code"] == 0 else None
    print("| --quantize_base | peak allocated GiB | run s | loss first 10 | loss last 10 | mean abs diff vs bf16 |")
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        if r["code"] != 0:
            print(f"| {mode} | failed (exit {r['code']}) | | | | |")
            continue
        values = losses(out / mode)
        diff = (sum(abs(a - b) for a, b in zip(values, base)) / len(values)) if base else float("nan")
        print(f"| {mode} | {r['peak_gib']:.2f} | {r['seconds']:.0f} | {sum(values[:10]) / len(values[:10]):.4f} | "
              f"{sum(values[-10:]) / len(values[-10:]):.4f} | {diff:.4f} |")
    (out / "results.json").write_text(json.dumps(results, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--size", choices=("full", "tiny"), default="full")
    b.add_argument("--images", type=Path, help="also write the 8 seeded instance images here (bench_train_sd.sh)")
    b.add_argument("--resolution", type=int, default=1024, help="of --images")
    for name in ("compare", "one"):
        c = sub.add_parser(name)
        c.add_argument("--model", required=True)
        c.add_argument("--out", type=Path, required=True)
        c.add_argument("--steps", type=int, default=100)
        c.add_argument("--resolution", type=int, default=1024)
        if name == "compare":
            c.add_argument("--modes", nargs="+", default=["none", "int8", "fp8", "nf4"])
        else:
            c.add_argument("--data", type=Path, required=True)
            c.add_argument("--mode", required=True)
    args = parser.parse_args()
    if args.command == "build":
        build(args.out, args.size)
        if args.images:
            images(args.images, 8, args.resolution)
    elif args.command == "compare":
        compare(args.model, args.out, args.modes, args.steps, args.resolution)
    else:
        one(args.model, args.data, args.out, args.mode, args.steps, args.resolution)
    return 0


if __name__ == "__main__":
    sys.exit(main())
