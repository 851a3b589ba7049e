"""`lora-vision merge`: several adapters into one adapter (exact, or SVD-compressed).

Into one adapter, the update of each layer is sum_i w_i * delta_i: exact with concatenated ranks, or compressed
to --rank / --energy by SVD, printing per layer how much of the Frobenius norm was kept. Folding adapters into a
base model is `lora-vision fuse`; `merge --into BASE` still does it, with a note.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..dtypes import SHORT_NAMES
from ._adapters import OUT_FORMATS, add_weighted_files_args, weights_for, write
from .fuse import add_fuse_output_args, fuse_into_base

EPILOG = """\
examples:
  lora-vision merge style.safetensors subject.safetensors --weights 0.7 1.0 -o both.safetensors
  lora-vision merge a.safetensors b.safetensors --rank 16 -o ab_r16.safetensors --to kohya --family sd1
  (into a base model: lora-vision fuse style.safetensors --base path/to/sd15-pipeline -o fused_pipeline/)
"""
INTO_NOTE = ("note: folding adapters into a base model is now `lora-vision fuse ADAPTER... --base BASE -o DIR`; "
             "`merge --into` still works and does the same")


def register(subparsers: Any) -> None:
    """Add the `merge` subcommand."""
    p = subparsers.add_parser("merge", help="merge adapters into one adapter (exact or SVD)",
                              description=__doc__.split("\n\n")[1].replace("\n", " "), epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_weighted_files_args(p)
    p.add_argument("-o", "--output", required=True, help="output adapter file, or folder with --into")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rank", type=int, help="compress the merged update of every layer to this rank by SVD")
    g.add_argument("--energy", type=float, help="keep the fewest singular values holding this share of ||delta||^2")
    p.add_argument("--to", choices=OUT_FORMATS, default="lora_vision", help="output format (default lora_vision)")
    p.add_argument("--family", choices=("sd1", "sd2", "sd2-v", "sdxl"), help="kohya: base family (default: guessed)")
    p.add_argument("--dtype", choices=SHORT_NAMES, help="output tensor dtype")
    p.add_argument("--into", metavar="BASE", help="the same as `lora-vision fuse ... --base BASE`: fold into this "
                                                   "base pipeline and write a diffusers folder to -o")
    add_fuse_output_args(p)
    p.add_argument("--layers", type=int, default=40, help="layers listed in the report (default 40; 0 = all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.into:
        print(INTO_NOTE)
        return fuse_into_base(args.into, args.files, args.weights, args.output, args.single_file, args.overwrite)
    weights = weights_for(args.files, args.weights)
    from ..arithmetic import merge_adapters, print_rows
    from ..formats import read_adapter

    adapters = []
    for f in args.files:
        adapter, report = read_adapter(f)
        print(f"{f}: {report}".splitlines()[0])
        adapters.append(adapter)
    merged, rows = merge_adapters(adapters, weights, rank=args.rank, energy=args.energy)
    print(print_rows(rows, limit=args.layers or None))
    write(merged, args)
    return 0
