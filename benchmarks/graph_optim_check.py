"""The captured training step with each optimizer against the eager step with the package it stands for.

    python benchmarks/graph_optim_check.py [--steps 12] [--device cuda] [--dtypes float64,float32]

On the tiny SD 1.x UNet (LoRA rank 4 on attention), for adamw, prodigy, schedulefree and adafactor, three runs from
the same inputs and seeds: the package's optimizer with the eager step (clip_and_step); build_optimizer(capturable=
True) in the static step, uncaptured; the same, captured as a CUDA graph (training/sd/step.py, StaticStep; on a CPU
the third run is skipped). Two differences per optimizer, each read against how far the weights moved:

- math: ours (uncaptured) against the package: the optimizer's arithmetic;
- capture: ours captured against ours uncaptured: what the graph changes.

CUDA runs with deterministic kernels (cuDNN deterministic, no TF32). float32 is not enough for a tight check: an
Adam-like update divides the gradient by its own running size, so rounding noise in a gradient entry that is nearly
zero but above eps moves that weight by up to the learning rate, whatever the code (on an H100, torch's own AdamW
captured against eager differed by 1.6e-2 in float32). float64 puts that noise far below eps, so its
rows are the test: exit code 1 when a float64 difference is over --tol; float32 rows are printed for reading.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_vision.lora import LoRAConfig, inject_lora, lora_parameters  # noqa: E402
from lora_vision.models.tiny import build_tiny_sd  # noqa: E402
from lora_vision.training.optim import build_optimizer  # noqa: E402
from lora_vision.training.sd.caching import BucketCache, TextTable  # noqa: E402
from lora_vision.training.sd.losses import alphas_cumprod  # noqa: E402
from lora_vision.training.sd.step import StaticStep, StepSettings, clip_and_step, gather_inputs, step_loss  # noqa: E402

NAMES = ("adamw", "prodigy", "schedulefree", "adafactor")


MODES = ("package", "static", "captured")


def deterministic_kernels() -> None:
    """The same kernels on every run: cuDNN deterministic and without benchmarking, no TF32 anywhere."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def one_run(name: str, mode: str, steps: int, device: torch.device, dtype: torch.dtype = torch.float32
            ) -> tuple[list[float], list[torch.Tensor], list[torch.Tensor], str]:
    """`steps` training steps; mode "package" (the package's optimizer, eager step), "static" (ours in the static
    step, uncaptured) or "captured" (ours, captured: CUDA only). Returns the losses, the final and the first LoRA
    weights, and what ran."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if mode == "captured" and device.type != "cuda":
        raise ValueError("a captured step needs a CUDA device")
    pipe = build_tiny_sd("sd1")
    unet = pipe.unet.to(device, dtype)
    torch.manual_seed(0)
    inject_lora(unet, LoRAConfig(rank=4, targets=("to_q", "to_k", "to_v", "to_out.0")))
    params = lora_parameters(unet)
    with torch.no_grad():
        for p in params:
            p.data = p.data.to(dtype)
    start = [p.detach().clone() for p in params]
    ours = mode != "package"
    opt = build_optimizer([{"params": params, "lr": 1.0 if name == "prodigy" else 1e-2}], betas=(0.9, 0.999),
                          weight_decay=1e-2, eps=1e-8, name=name, capturable=ours)
    g = torch.Generator().manual_seed(1)
    cache = BucketCache((64, 64), torch.randn(5, 4, 8, 8, generator=g).to(device, dtype),
                        (0.1 * torch.rand(5, 4, 8, 8, generator=g)).to(device, dtype),
                        torch.tensor([0, 1, 0, 1, 0]).to(device), torch.zeros(5, 6, device=device, dtype=dtype))
    table = TextTable(["a", "b"], [torch.zeros(2, 77, dtype=torch.long)],
                      torch.randn(2, 77, 32, generator=g).to(device, dtype))
    settings = StepSettings("epsilon", 1000, 5.0, 0.1, 1.0, 1.0, False)
    ac = alphas_cumprod(pipe.scheduler, device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(7)

    def loss_fn(x):
        return step_loss(unet, x, table, [], ac, settings, dtype)

    step = None
    if ours:
        step = StaticStep(loss_fn, params, opt, 1.0, gather_inputs([(cache, torch.tensor([0, 1], device=device))],
                                                                   torch.Generator(device=device).manual_seed(99),
                                                                   settings))
        if mode == "captured":
            step.capture(warmup=2)
    losses = []
    rows = [torch.tensor(r, device=device) for r in ([0, 2], [1, 4], [3, 0], [2, 1])]
    for i in range(steps):
        x = gather_inputs([(cache, rows[i % len(rows)])], gen, settings)
        if step is not None:
            step.load(x)
            losses.append(float(step.run()))
        else:
            loss = loss_fn(x)
            loss.backward()
            clip_and_step(params, opt, 1.0)
            losses.append(float(loss.detach()))
    how = {"package": "eager", "static": "static, uncaptured", "captured": "captured"}[mode]
    return losses, [p.detach().clone() for p in params], start, f"{how}, {type(opt).__module__}.{type(opt).__name__}"


def largest_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="float64,float32", help="float64 rows decide the exit code")
    ap.add_argument("--tol", type=float, default=1e-6, help="largest float64 weight difference accepted")
    ap.add_argument("--names", default=",".join(NAMES))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    try:  # the float64 cast of the tiny UNet is on purpose: no note about it per run
        from diffusers.utils import logging as diffusers_logging
        diffusers_logging.set_verbosity_error()
    except ImportError:
        pass
    if device.type == "cuda":
        deterministic_kernels()
    print(f"command: python benchmarks/graph_optim_check.py --steps {args.steps} --device {args.device} "
          f"--dtypes {args.dtypes}")
    print("\n| dtype | optimizer | ours | math: ours vs package, weights (loss) | capture: captured vs uncaptured, "
          "weights (loss) | largest weight move |")
    print("|---|---|---|---|---|---|")
    bad = False
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for name in args.names.split(","):
            try:
                l_pkg, p_pkg, start, _ = one_run(name, "package", args.steps, device, dtype)
                l_st, p_st, _, how = one_run(name, "static", args.steps, device, dtype)
                math = f"{largest_difference(p_st, p_pkg):.2e} ({max(abs(a - b) for a, b in zip(l_st, l_pkg)):.2e})"
                bad |= dtype == torch.float64 and largest_difference(p_st, p_pkg) > args.tol
                capture = "not run (CPU)"
                if device.type == "cuda":
                    l_cap, p_cap, _, how = one_run(name, "captured", args.steps, device, dtype)
                    dc = largest_difference(p_cap, p_st)
                    capture = f"{dc:.2e} ({max(abs(a - b) for a, b in zip(l_cap, l_st)):.2e})"
                    bad |= dtype == torch.float64 and dc > args.tol
            except Exception as err:  # report and go on with the other optimizers
                print(f"| {dtype_name} | {name} | failed: {type(err).__name__}: {err} | | | |", flush=True)
                bad = True
                continue
            print(f"| {dtype_name} | {name} | {how.split(', ')[1]} | {math} | {capture} | "
                  f"{largest_difference(p_pkg, start):.2e} |", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
