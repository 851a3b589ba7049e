"""`lora-vision resize FILE --rank R | --energy E | --ranks JSON -o OUT`: SVD rank reduction of every layer.

Each layer's update (alpha / r) * B @ A is replaced by its best approximation of the new rank (Eckart-Young);
the report says per layer how much of the Frobenius norm was kept. --energy picks per layer the fewest singular
values holding that share of ||delta||_F^2; --ranks takes {layer: rank} (e.g. `analyze --suggest-rank` output).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._adapters import add_output_args, write

EPILOG = """\
examples:
  lora-vision resize my_lora.safetensors --rank 8 -o my_lora_r8.safetensors
  lora-vision resize my_lora.safetensors --energy 0.99 -o my_lora_dyn.safetensors --to kohya
  lora-vision resize my_lora.safetensors --ranks analysis/suggested_ranks.json -o my_lora_suggested.safetensors
"""


def register(subparsers: Any) -> None:
    """Add the `resize` subcommand."""
    p = subparsers.add_parser("resize", help="reduce the rank of an adapter by SVD, reporting what was kept",
                              description=__doc__.split("\n\n")[1].replace("\n", " "), epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="adapter in any supported format")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, help="new rank of every layer")
    g.add_argument("--energy", type=float, help="share of ||delta||_F^2 each layer keeps, e.g. 0.99")
    g.add_argument("--ranks", metavar="JSON", help="file with {component.module[.part]: rank}")
    add_output_args(p)
    p.add_argument("--layers", type=int, default=40, help="layers listed in the report (default 40; 0 = all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..arithmetic import print_rows, resize
    from ..formats import read_adapter

    adapter, report = read_adapter(args.file)
    ranks = None
    if args.ranks:
        with open(args.ranks) as f:
            ranks = json.load(f)
        if not isinstance(ranks, dict):
            raise ValueError(f"{args.ranks}: expected a JSON object {{layer: rank}}")
    resized, rows = resize(adapter, rank=args.rank, energy=args.energy, ranks=ranks)
    print(print_rows(rows, limit=args.layers or None))
    write(resized, args)
    return 0
