"""Does one training forward + backward of a real-size Flux.1-dev transformer run on this GPU, per attention backend?

Settings: default; `checkpointing` (default attention, gradient checkpointing: the memory of the backward, not its
kernels); cuDNN attention off; flash off; memory-efficient attention only. A random-weight FluxTransformer2DModel (guidance embedding on) in bf16, 1024 px (4096 image + 512 text tokens),
batch 1; every weight frozen but the patch embedding's, so the backward carries activation gradients through all 57
blocks as LoRA training does. Each backend setting runs in its own process (an illegal memory access ends a CUDA
context), and CUDA_LAUNCH_BLOCKING=1 makes a failing kernel raise at its own call. Prints one line per setting:
`CHECK <setting> ok <seconds> s peak <GiB>` or `CHECK <setting> failed: <error>` with the failing call's traceback,
then `PICK <setting>`: the first that runs, which benchmarks/sdpa_site/sitecustomize.py applies to every Python
process started with BENCH_SDPA=<setting> and benchmarks/sdpa_site on PYTHONPATH (ours and the reference alike).

    python benchmarks/flux_backward_check.py        # settings in order, one process each, up to the first that runs
    python benchmarks/flux_backward_check.py --setting no-cudnn    # one setting in this process
"""

from __future__ import annotations

import argparse
import os
import runpy
import subprocess
import sys
import time
import traceback
from pathlib import Path

SETTINGS = ("default", "checkpointing", "no-cudnn", "no-flash", "efficient-only")


def one(setting: str, tokens: int) -> int:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from diffusers import FluxTransformer2DModel

    from lora_vision.models.dit import transformer_inputs

    os.environ["BENCH_SDPA"] = setting  # the backends each setting turns off: one table, the benchmarks' site hook
    runpy.run_path(str(Path(__file__).resolve().parent / "sdpa_site" / "sitecustomize.py"))
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    model.x_embedder.weight.requires_grad_(True)
    if setting == "checkpointing":  # default attention, activations recomputed in the backward
        model.enable_gradient_checkpointing()
    side = int(tokens ** 0.5)
    inputs = transformer_inputs(model, image_tokens=(side, side), text_tokens=512)
    try:
        for step in range(2):
            start = time.perf_counter()
            out = model(**inputs, return_dict=False)[0]
            out.float().pow(2).mean().backward()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        print(f"CHECK {setting} ok {seconds:.2f} s peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
              flush=True)
        return 0
    except RuntimeError as err:  # torch.AcceleratorError is one
        try:  # an out-of-memory cuBLAS workspace shows as a peak near the card's size
            peak = f" (peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB)"
        except RuntimeError:
            peak = ""
        print(f"CHECK {setting} failed{peak}: {str(err).splitlines()[0]}", flush=True)
        traceback.print_exc(limit=-6)
        return 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", choices=SETTINGS)
    ap.add_argument("--tokens", type=int, default=4096, help="image tokens (a square); 4096 = 1024 px")
    args = ap.parse_args()
    if args.setting:
        return one(args.setting, args.tokens)
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for setting in SETTINGS:  # the first that runs is the one the benchmarks use (PICK line)
        if subprocess.run([sys.executable, __file__, "--setting", setting, "--tokens", str(args.tokens)], env=env,
                          timeout=240).returncode == 0:
            print(f"PICK {setting}", flush=True)
            return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
