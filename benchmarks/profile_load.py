"""Where the time of `lora_vision.pipeline.load_adapter` goes: a loop of load and unload of one adapter file on the
SD 1.5 layout (random weights, benchmarks/bench_adapter_ops.py's pipeline and adapter), each load split into the
functions it calls (read, plan, move, finite check, wrappers), with the garbage collector's runs during the load.

    python benchmarks/profile_load.py --device cuda --rank 16 --loads 4 --peft_cycles 2
    python benchmarks/profile_load.py --model tiny --device cpu --loads 2            # smoke test

--peft_cycles N first loads and unloads the same adapter N times through diffusers + peft on the same pipeline
(as bench_adapter_ops.py's process does before our loads), then the loop runs again: the two blocks of lines
show what the process's other objects cost a load (the collector walks all of them).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_adapter_ops as ops  # noqa: E402  (the pipeline and adapter of the ops benchmark)
import timing  # noqa: E402
import lora_vision.pipeline.adapters as adapters  # noqa: E402
from lora_vision.dtypes import parse_dtype  # noqa: E402
from lora_vision.formats import export  # noqa: E402

PARTS = ("read_adapter", "_plan", "_move_factors", "_check_finite", "inject_lora", "_apply_strength")


def timed_parts(acc: dict) -> None:
    """Wrap the functions load_adapter calls so each adds its seconds to acc[name]."""
    for name in PARTS:
        fn = getattr(adapters, name)

        def wrapper(*a, _fn=fn, _name=name, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                acc[_name] = acc.get(_name, 0.0) + time.perf_counter() - t
        setattr(adapters, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ops.model_arguments(ap)
    ap.add_argument("--loads", type=int, default=4, help="timed loads per block")
    ap.add_argument("--peft_cycles", type=int, default=0, help="diffusers + peft loads before the second block")
    args = ap.parse_args()
    if args.loads < 1 or args.peft_cycles < 0:
        ap.error(f"--loads {args.loads} --peft_cycles {args.peft_cycles}: at least 1 load, cycles not negative")
    timing.print_command()
    dtype = parse_dtype(args.dtype, "--dtype")
    pipe = ops.build_pipeline(args.model, args.device, dtype)
    adapter = ops.make_adapter(pipe, args.rank, 1)
    tmp = Path(tempfile.mkdtemp(prefix="profile_load_"))
    ours = adapter.save(tmp / "a.safetensors")
    acc: dict = {}
    gcs = {"runs": 0, "s": 0.0, "t0": 0.0}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gcs["t0"] = time.perf_counter()
            gcs["runs"] += 1
        else:
            gcs["s"] += time.perf_counter() - gcs["t0"]
    gc.callbacks.append(on_gc)
    timed_parts(acc)
    sync = (lambda: torch.cuda.synchronize()) if args.device.startswith("cuda") else (lambda: None)

    def block(label: str) -> None:
        for i in range(args.loads + 1):  # the first load of a block warms up and is printed apart
            acc.clear()
            gcs.update(runs=0, s=0.0)
            sync()
            t = time.perf_counter()
            adapters.load_adapter(pipe, ours, name="a")
            sync()
            total = (time.perf_counter() - t) * 1e3
            parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in acc.items())
            print(f"{label} load {i}{' (warm-up)' if i == 0 else ''}: {total:.1f} ms (garbage collector: "
                  f"{gcs['runs']} runs, {gcs['s'] * 1e3:.1f} ms); {parts}", flush=True)
            adapters.unload_adapter(pipe)

    block(f"rank {args.rank}, alone")
    if args.peft_cycles:
        theirs = export(adapter, "diffusers", tmp / "a_diffusers.safetensors", dtype=torch.float32)
        for _ in range(args.peft_cycles):
            pipe.load_lora_weights(str(theirs), adapter_name="p")
            pipe.unload_lora_weights()
        block(f"rank {args.rank}, after {args.peft_cycles} diffusers + peft loads")
    print(f"UNet modules {sum(1 for _ in pipe.unet.modules())}, objects the collector tracks {len(gc.get_objects())}")


if __name__ == "__main__":
    main()
