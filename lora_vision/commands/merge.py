"""`lora-vision merge`: several adapters into one adapter (exact, or SVD-compressed), or adapters into a base model.

Into one adapter, the update of each layer is sum_i w_i * delta_i: exact with concatenated ranks, or compressed
to --rank / --energy by SVD, printing per layer how much of the Frobenius norm was kept. With --into BASE the
adapters are fused into the base pipeline at --weights and written as a diffusers folder (optionally one file).
"""

from __future__ import annotations

import argparse
from typing import Any

from ._adapters import OUT_FORMATS, read, write

EPILOG = """\
examples:
  lora-vision merge style.safetensors subject.safetensors --weights 0.7 1.0 -o both.safetensors
  lora-vision merge a.safetensors b.safetensors --rank 16 -o ab_r16.safetensors --to kohya --family sd1
  lora-vision merge style.safetensors --into path/to/sd15-pipeline --weights 0.8 -o merged_pipeline/ --single-file
"""


def _weight(text: str) -> float:
    from ..prompt_syntax import parse_strength  # the one strength parser (finite numbers only)

    try:
        return parse_strength(text, "--weights value")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register(subparsers: Any) -> None:
    """Add the `merge` subcommand."""
    p = subparsers.add_parser("merge", help="merge adapters into one adapter (exact or SVD) or into a base model",
                              description=__doc__.split("\n\n")[1].replace("\n", " "), epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="adapters (any supported format)")
    p.add_argument("--weights", type=_weight, nargs="+", help="one weight (strength) per adapter (default 1.0 each)")
    p.add_argument("-o", "--output", required=True, help="output adapter file, or folder with --into")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rank", type=int, help="compress the merged update of every layer to this rank by SVD")
    g.add_argument("--energy", type=float, help="keep the fewest singular values holding this share of ||delta||^2")
    p.add_argument("--to", choices=OUT_FORMATS, default="lora_vision", help="output format (default lora_vision)")
    p.add_argument("--family", choices=("sd1", "sd2", "sd2-v", "sdxl"), help="kohya: base family (default: guessed)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="output tensor dtype")
    p.add_argument("--into", metavar="BASE", help="fuse into this base pipeline (folder, hub id or tiny-sd1/...) "
                                                   "and write a merged diffusers folder to -o")
    p.add_argument("--single-file", action="store_true", help="with --into: also write one .safetensors checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="with --into: replace an existing output folder that holds an earlier merged pipeline "
                        "(model_index.json); any other folder is refused")
    p.add_argument("--layers", type=int, default=40, help="layers listed in the report (default 40; 0 = all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    weights = args.weights or [1.0] * len(args.files)
    if len(weights) != len(args.files):
        raise ValueError(f"--weights has {len(weights)} values for {len(args.files)} adapters; give one per adapter")
    if args.into:
        from ..pipeline import merge_into_pipeline  # the pipeline side owns fusing into base weights

        result = merge_into_pipeline(args.into, list(zip(args.files, weights)), args.output,
                                     single_file=args.single_file, overwrite=args.overwrite)
        print(result)
        return 0
    from ..tools import merge_adapters, print_rows

    adapters = []
    for f in args.files:
        adapter, report = read(f)
        print(f"{f}: {report}".splitlines()[0])
        adapters.append(adapter)
    merged, rows = merge_adapters(adapters, weights, rank=args.rank, energy=args.energy)
    print(print_rows(rows, limit=args.layers or None))
    write(merged, args)
    return 0
