"""`lora-vision analyze FILE [FILE2] -o DIR`: what did the adapter learn? (Hu et al. 2021, section 7).

Writes DIR/report.json and PNG plots: update size by block and layer kind, singular value spectra and effective
ranks, with FILE2 the subspace similarity phi(i, j) of both adapters, with --base the amplification comparison;
with --suggest-rank DIR/suggested_ranks.json ({layer: rank}, the input of `lora-vision resize --ranks`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

EPILOG = """\
outputs (in DIR):
  report.json              every number below, per adapter and layer (singular values, effective ranks, norms, phi)
  update_norm.png          update size by block and layer kind (relative to the base weight with --base)
  spectra.png              singular values sigma_i / sigma_1 and effective ranks of every layer
  similarity.png           phi(i, j) of the layers with the largest updates (two adapters)
  similarity_layers.png    phi(i, i) of every shared layer (two adapters)
  amplification.png        ||U^T W V||_F for the update's, W's top and random directions (with --base)
  suggested_ranks.json     {component.module[.part]: rank} keeping --energy of each update (with --suggest-rank)
  files for FILE2 end in _2 (update_norm_2.png, spectra_2.png, amplification_2.png, suggested_ranks_2.json)

examples:
  lora-vision analyze run_r8.safetensors run_r64.safetensors -o analysis/ --base path/to/sd15-pipeline
  lora-vision analyze my_lora.safetensors -o analysis/ --suggest-rank --energy 0.99
"""


def register(subparsers: Any) -> None:
    """Add the `analyze` subcommand."""
    p = subparsers.add_parser(
        "analyze", help="spectra, effective ranks, subspace similarity and update size of adapters (PNG + JSON)",
        description=__doc__.split("\n\n")[1].replace("\n", " "), epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="adapter: a lora_vision, kohya or diffusers .safetensors file, or a PEFT folder")
    p.add_argument("file2", nargs="?", help="a second adapter for the same model, to compare subspaces with FILE")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for report.json and the PNGs")
    p.add_argument("--base", metavar="MODEL",
                   help="base weights: a diffusers pipeline folder, tiny / tiny-sd1 / tiny-sd2 / tiny-sdxl, a model "
                        "folder or a .safetensors state dict; enables relative norms and the amplification analysis")
    p.add_argument("--suggest-rank", action="store_true",
                   help="write suggested_ranks.json: per layer the smallest rank keeping --energy of the update")
    p.add_argument("--energy", type=float, default=0.99,
                   help="share of ||dW||_F^2 the suggested rank keeps (default 0.99)")
    p.add_argument("--subspace", choices=("A", "update"), default="A",
                   help="directions compared between two adapters: right-singular vectors of A (the paper's "
                        "choice, default) or of the update scale * B A")
    p.add_argument("--max-layers", type=int, default=6, help="layers drawn in similarity.png (default 6)")
    p.add_argument("--labels", nargs="+", metavar="NAME", help="names of the adapters in plots and the report "
                   "(default: the file names)")
    p.add_argument("--no-plots", action="store_true", help="write only the JSON files (no matplotlib needed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _labels(paths: list[str], given: list[str] | None) -> list[str]:
    if given:
        if len(given) != len(paths):
            raise ValueError(f"--labels got {len(given)} name(s) for {len(paths)} adapter(s); give one per file")
        return given
    stems = [Path(p).stem for p in paths]
    if len(stems) == 2 and stems[0] == stems[1]:  # run_a/adapter.safetensors vs run_b/adapter.safetensors
        stems = [f"{Path(p).parent.name}/{Path(p).stem}" for p in paths]
        if stems[0] == stems[1]:
            stems = [f"{stems[0]} (1)", f"{stems[1]} (2)"]
    return stems


def run(args: argparse.Namespace) -> int:
    """Analyse, write report.json, plots and suggested ranks; print a short summary."""
    from ..analysis import AnalysisOptions, BaseWeights, analyze, suggested_ranks
    from ..formats import read_adapter
    from ..io import atomic_write_text

    if args.max_layers < 1:
        raise ValueError(f"--max-layers must be >= 1, got {args.max_layers}")
    options = AnalysisOptions(energy=args.energy, subspace=args.subspace)
    if not args.no_plots:
        from ..analysis import plots

        plots._pyplot_free_figure()  # fail now, before the work, when matplotlib is missing
    paths = [args.file] + ([args.file2] if args.file2 else [])
    adapters = [(label, read_adapter(p)[0]) for label, p in zip(_labels(paths, args.labels), paths)]
    comps = sorted({c for _, a in adapters for c in a.components()})
    base = BaseWeights.open(args.base, comps) if args.base else None
    report = analyze(adapters, base, options, progress=False if args.quiet else None, paths=paths)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json"]
    atomic_write_text(written[0], json.dumps(report, indent=1) + "\n")
    if args.suggest_rank:
        for i in range(len(adapters)):
            p = out / f"suggested_ranks{'_2' if i else ''}.json"
            atomic_write_text(p, json.dumps(suggested_ranks(report, i), indent=1) + "\n")
            written.append(p)
    if not args.no_plots:
        written += _draw(report, out, args.max_layers, base is not None)

    for ad in report["adapters"]:
        s = ad["summary"]
        line = (f"{ad['label']}: {s['layers']} layers, median effective rank {s['median_effective_rank']}, "
                f"median rank at 90%/99% energy {s['median_rank_90']:g}/{s['median_rank_99']:g}")
        if s.get("median_relative_norm") is not None:
            line += (f", median ||dW||/||W|| {s['median_relative_norm']:.3g}, "
                     f"median amplification {s['median_amplification']:.3g}")
        print(line)
        if ad.get("base_missing"):
            print(f"  --base lacks {len(ad['base_missing'])} adapted weight(s) (first: {ad['base_missing'][0]})")
    sim = report["similarity"]
    if sim is not None and sim["layers"]:
        phis = [v["phi_diag"][0] for v in sim["layers"].values()]
        print(f"similarity ({sim['space']}): {len(sim['layers'])} shared layers, median phi(1, 1) "
              f"{statistics.median(phis):.3g}; {len(sim['only_first'])} layers only in the first adapter, "
              f"{len(sim['only_second'])} only in the second")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def _draw(report: dict, out: Path, max_layers: int, with_base: bool) -> list[Path]:
    from ..analysis import plots

    written = []
    for i in range(len(report["adapters"])):
        suffix = "_2" if i else ""
        written.append(plots.plot_update_heatmap(report, out / f"update_norm{suffix}.png", i))
        written.append(plots.plot_spectra(report, out / f"spectra{suffix}.png", i))
        if with_base:
            written.append(plots.plot_amplification(report, out / f"amplification{suffix}.png", i))
    if report["similarity"] is not None and report["similarity"]["layers"]:
        written.append(plots.plot_similarity_grid(report, out / "similarity.png", max_layers))
        written.append(plots.plot_similarity_layers(report, out / "similarity_layers.png"))
    return written
