"""CPU cost of `lora-vision analyze` on a real-size SD 1.5 UNet adapter, and its fast paths against the plain ones.

    python benchmarks/analyze_cpu.py [--rank 64] [--check-layers 24]

Builds the SD 1.5 UNet architecture with random weights (diffusers' UNet2DConditionModel defaults with
cross_attention_dim=768; nothing is downloaded), a rank-r adapter on `unet-attn-ff` (192 modules) with random A and
B, and times `analyze` without and with the base weights and the plots. On `--check-layers` evenly spaced layers it
compares the singular values from the factors with torch.linalg.svdvals of the full product, and the top singular
values of W from the Gram matrix with svdvals of W, and prints the largest relative differences and both timings.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lora_vision as lv  # noqa: E402
from lora_vision.adapter import Adapter  # noqa: E402
from lora_vision.analysis import AnalysisOptions, BaseWeights, adapter_layers, analyze, lowrank_svd  # noqa: E402
from lora_vision.analysis import plots, top_singular_values  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--check-layers", type=int, default=24)
    args = ap.parse_args()
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    t = time.perf_counter()
    unet = UNet2DConditionModel(cross_attention_dim=768).eval()
    print(f"built the SD 1.5 UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M parameters) "
          f"in {time.perf_counter() - t:.1f} s")
    base_sd = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    lv.inject_lora(unet, lv.LoRAConfig(rank=args.rank, targets="unet-attn-ff"))
    for p in lv.lora_parameters(unet):
        if p.abs().sum() == 0:  # B starts at zero; give it a trained-looking size
            p.data.normal_(std=1e-3)
    adapter = Adapter.from_models({"unet": unet})
    del unet
    base = BaseWeights("random SD 1.5 UNet", {"unet": base_sd.get})
    rows = []

    def timed(label: str, fn):
        t0 = time.perf_counter()
        out = fn()
        rows.append((label, time.perf_counter() - t0))
        return out

    report = timed("analyze, no base", lambda: analyze([("a", adapter)], None, AnalysisOptions(), progress=False))
    report = timed("analyze, with --base", lambda: analyze([("a", adapter)], base, AnalysisOptions(), progress=False))
    with tempfile.TemporaryDirectory() as d:
        timed("3 plots (update_norm, spectra, amplification)", lambda: [
            plots.plot_update_heatmap(report, Path(d) / "u.png"), plots.plot_spectra(report, Path(d) / "s.png"),
            plots.plot_amplification(report, Path(d) / "a.png")])
    n_layers = len(report["adapters"][0]["layers"])

    factors = list(adapter_layers(adapter).values())
    pick = factors[:: max(1, len(factors) // args.check_layers)][: args.check_layers]
    t_fast = t_plain = t_gram = t_svd = 0.0
    err_update = err_base = 0.0
    for f in pick:
        t0 = time.perf_counter()
        s_fast = lowrank_svd(f.B, f.A, f.scaling).S
        t_fast += time.perf_counter() - t0
        t0 = time.perf_counter()
        s_plain = torch.linalg.svdvals((f.B.double() @ f.A.double()) * f.scaling)[: s_fast.numel()]
        t_plain += time.perf_counter() - t0
        err_update = max(err_update, float(((s_fast - s_plain).abs() / s_plain[0]).max()))
        w = base.weight(f.key, f.shape[0])
        t0 = time.perf_counter()
        g = top_singular_values(w, args.rank)
        t_gram += time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = torch.linalg.svdvals(w.double())[: args.rank]
        t_svd += time.perf_counter() - t0
        err_base = max(err_base, float(((g - ref).abs() / ref[0]).max()))

    print(f"\nrank {args.rank}, {n_layers} adapted weights (unet-attn-ff), {torch.get_num_threads()} CPU threads")
    print(f"{'step':<48} {'seconds':>8}")
    for label, sec in rows:
        print(f"{label:<48} {sec:8.2f}")
    print(f"\non {len(pick)} layers: spectrum from the factors {t_fast:.2f} s vs svdvals of B A {t_plain:.2f} s, "
          f"max |diff| / sigma_1 = {err_update:.1e}")
    print(f"on {len(pick)} layers: top-{args.rank} sigma of W from the Gram matrix {t_gram:.2f} s vs svdvals(W) "
          f"{t_svd:.2f} s, max |diff| / sigma_1 = {err_base:.1e}")


if __name__ == "__main__":
    main()
