"""`lora-vision extract --base A --tuned B --rank R -o OUT`: an adapter from the difference of two models.

A and B are diffusers pipeline folders (UNet or DiT transformer and text encoders are compared) or two .safetensors state dicts of
the same model. Every Linear/Conv2d weight that changed gets the best rank-R (or --energy) approximation of
tuned - base by SVD; the report says per layer how much of the difference's Frobenius norm was kept.
"""

from __future__ import annotations

import argparse
from typing import Any

from ._adapters import add_output_args, write

EPILOG = """\
examples:
  lora-vision extract --base sd15/ --tuned sd15-dreambooth/ --rank 32 -o extracted.safetensors --to kohya
  lora-vision extract --base vit_base.safetensors --tuned vit_ft.safetensors --energy 0.95 -o vit_lora.safetensors
"""


def register(subparsers: Any) -> None:
    """Add the `extract` subcommand."""
    p = subparsers.add_parser("extract", help="extract a LoRA from the difference of two models by SVD",
                              description=__doc__.split("\n\n")[1].replace("\n", " "), epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", dest="base_model", required=True, help="base model: pipeline folder or .safetensors")
    p.add_argument("--tuned", required=True, help="fine-tuned model of the same kind")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--rank", type=int, help="rank of every extracted layer")
    g.add_argument("--energy", type=float, help="share of ||dW||_F^2 each layer keeps")
    p.add_argument("--component", default="model", choices=("model", "unet", "transformer", "text_encoder", "text_encoder_2"),
                   help="component name for single .safetensors inputs (default model)")
    p.add_argument("--min-change", type=float, default=1e-6,
                   help="skip layers whose relative change ||dW|| / ||W|| is below this (default 1e-6)")
    add_output_args(p)
    p.add_argument("--layers", type=int, default=40, help="layers listed in the report (default 40; 0 = all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..arithmetic import extract, load_weights, print_rows

    base = load_weights(args.base_model, args.component)
    tuned = load_weights(args.tuned, args.component)
    adapter, rows = extract(base, tuned, rank=args.rank, energy=args.energy, min_change=args.min_change)
    print(print_rows(rows, limit=args.layers or None))
    write(adapter, args)
    return 0
