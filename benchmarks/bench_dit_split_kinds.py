"""Memory of an adapter kind on Flux.1's fused modules, as read for the diffusers transformer (split q / k / v /
proj_mlp): the tensors the read adapter holds against the file's, and the read time.

A LoKr / LoHa file in BFL names (kohya sd-scripts and ComfyUI write Flux.1 so) adapts the fused `img_attn.qkv`,
`txt_attn.qkv` (3 x 3072 rows) and `linear1` (3 x 3072 + 12288 rows) of the real-size Flux.1 (hidden 3072). The
reader splits each fused update by rows into the live modules: as parts of the same kind where the kind's algebra
allows (lora.kinds.split_rows: every LoKr, a part that cuts through w2's rows as a window of the kron), else as a
dense full diff per part (float32). Random factors at LyCORIS' shapes
(factor -1: qkv 96 x 96 output blocks, linear1 128 x 168; rank 16), written as bf16 safetensors, read with
`read_adapter` (no model, the parts' sizes from the names), interleaved over rounds.

    python benchmarks/bench_dit_split_kinds.py --double 19 --single 38 --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_vision.io import write_safetensors  # noqa: E402
from lora_vision.formats import read_adapter  # noqa: E402
from lora_vision.lora.kinds import factorization  # noqa: E402

HIDDEN, MLP = 3072, 12288


def _factors(kind: str, out: int, inp: int, rank: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    def r(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    if kind == "lokr":
        out_l, out_k = factorization(out, -1)
        in_m, in_n = factorization(inp, -1)
        return {"lokr_w1": r(out_l, in_m), "lokr_w2_a": r(out_k, rank), "lokr_w2_b": r(rank, in_n),
                "alpha": torch.tensor(float(rank))}
    return {"hada_w1_a": r(out, rank), "hada_w1_b": r(rank, inp), "hada_w2_a": r(out, rank),
            "hada_w2_b": r(rank, inp), "alpha": torch.tensor(float(rank))}


def build(kind: str, double: int, single: int, rank: int, path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    mods = [(f"double_blocks_{i}_{s}_attn_qkv", 3 * HIDDEN) for i in range(double) for s in ("img", "txt")]
    mods += [(f"single_blocks_{i}_linear1", 3 * HIDDEN + MLP) for i in range(single)]
    for name, out in mods:
        tensors.update({f"lora_unet_{name}.{k}": t for k, t in _factors(kind, out, HIDDEN, rank, g).items()})
    write_safetensors(path, tensors)


def _how(line: str) -> str:
    """A report.split line in short: how the fused module's parts are held."""
    if "full diffs" in line:
        return "dense full diffs"
    m = re.search(r"kept as ([\w+]+)", line)
    if not m:
        return line
    return f"kept as {m.group(1)}" + (" (parts cutting through w2's rows as windows)" if "window" in line else "")


def read_once(path: Path) -> tuple[float, int, list[str]]:
    gc.collect()
    t0 = time.perf_counter()
    adapter, report = read_adapter(path)
    seconds = time.perf_counter() - t0
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in adapter.tensors.values()}
    held = sum(storages.values())  # shared factors (the parts' common A) once
    how = sorted({_how(s) for s in report.split})
    del adapter, report
    gc.collect()
    return seconds, held, how


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--double", type=int, default=19, help="double blocks (Flux.1: 19)")
    ap.add_argument("--single", type=int, default=38, help="single blocks (Flux.1: 38)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kinds", default="lokr,loha")
    args = ap.parse_args()
    print("command: python " + " ".join(sys.argv), flush=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for kind in args.kinds.split(","):
            files[kind] = Path(tmp) / f"{kind}.safetensors"
            build(kind, args.double, args.single, args.rank, files[kind])
        times: dict[str, list[float]] = {k: [] for k in files}
        held: dict[str, int] = {}
        how: dict[str, list[str]] = {}
        for r in range(args.rounds):
            for kind in (list(files) if r % 2 == 0 else list(files)[::-1]):
                s, held[kind], how[kind] = read_once(files[kind])
                times[kind].append(s)
        print(f"\n{args.double} double + {args.single} single blocks, rank {args.rank}, {args.rounds} rounds\n")
        print("| kind | file MiB | memory of the read adapter MiB | read s, median (min-max) | how the fused modules are held |")
        print("|---|---|---|---|---|")
        for kind, path in files.items():
            t = times[kind]
            print(f"| {kind} | {path.stat().st_size / 2**20:.1f} | {held[kind] / 2**20:.1f} | "
                  f"{statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f}) | {'; '.join(how[kind])} |")
    print(f"\npeak resident memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
