"""The captured training step with each optimizer against the eager step with the package it stands for.

    python benchmarks/graph_optim_check.py [--steps 12] [--device cuda]

On the tiny SD 1.x UNet (float32, LoRA rank 4 on attention), for adamw, prodigy, schedulefree and adafactor: one
run with the package's optimizer and the eager step (clip_and_step), one with build_optimizer(capturable=True) and
the step captured as a CUDA graph (training/sd/step.py, StaticStep; on a CPU it runs uncaptured). Same inputs, same
seeds. Prints one row per optimizer: whether capture worked, the largest loss and parameter differences, and how
far the parameters moved (so a difference is read against it). Exit code 1 when a difference is over --tol.
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


def one_run(name: str, captured: bool, steps: int, device: torch.device) -> tuple[list[float], list[torch.Tensor],
                                                                                   list[torch.Tensor], str]:
    pipe = build_tiny_sd("sd1")
    unet = pipe.unet.to(device)
    torch.manual_seed(0)
    inject_lora(unet, LoRAConfig(rank=4, targets=("to_q", "to_k", "to_v", "to_out.0")))
    params = lora_parameters(unet)
    start = [p.detach().clone() for p in params]
    opt = build_optimizer([{"params": params, "lr": 1.0 if name == "prodigy" else 1e-2}], betas=(0.9, 0.999),
                          weight_decay=1e-2, eps=1e-8, name=name, capturable=captured)
    g = torch.Generator().manual_seed(1)
    cache = BucketCache((64, 64), torch.randn(5, 4, 8, 8, generator=g).to(device),
                        (0.1 * torch.rand(5, 4, 8, 8, generator=g)).to(device),
                        torch.tensor([0, 1, 0, 1, 0]).to(device), torch.zeros(5, 6, device=device))
    table = TextTable(["a", "b"], [torch.zeros(2, 77, dtype=torch.long)],
                      torch.randn(2, 77, 32, generator=g).to(device))
    settings = StepSettings("epsilon", 1000, 5.0, 0.1, 1.0, 1.0, False)
    ac = alphas_cumprod(pipe.scheduler, device)
    gen = torch.Generator(device=device).manual_seed(7)

    def loss_fn(x):
        return step_loss(unet, x, table, [], ac, settings, torch.float32)

    how = "eager (package)" if not captured else "static"
    step = None
    if captured:
        step = StaticStep(loss_fn, params, opt, 1.0, gather_inputs([(cache, torch.tensor([0, 1], device=device))],
                                                                   torch.Generator(device=device).manual_seed(99),
                                                                   settings))
        if device.type == "cuda":
            step.capture(warmup=2)
            how = "captured"
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
    return losses, [p.detach().clone() for p in params], start, f"{how}, {type(opt).__module__}.{type(opt).__name__}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest parameter difference accepted")
    ap.add_argument("--names", default=",".join(NAMES))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    print(f"command: python benchmarks/graph_optim_check.py --steps {args.steps} --device {args.device}")
    print("\n| optimizer | step | max loss diff | max param diff | max param move |")
    print("|---|---|---|---|---|")
    bad = False
    for name in args.names.split(","):
        l_ref, p_ref, start, _ = one_run(name, False, args.steps, device)
        try:
            l_ours, p_ours, _, how = one_run(name, True, args.steps, device)
        except Exception as err:  # report and go on with the other optimizers
            print(f"| {name} | failed: {type(err).__name__}: {err} | | | |")
            bad = True
            continue
        dl = max(abs(a - b) for a, b in zip(l_ref, l_ours))
        dp = max((a - b).abs().max().item() for a, b in zip(p_ref, p_ours))
        move = max((a - b).abs().max().item() for a, b in zip(p_ref, start))
        bad |= dp > args.tol
        print(f"| {name} | {how} | {dl:.2e} | {dp:.2e} | {move:.2e} |")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
