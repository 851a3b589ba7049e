"""`lora-vision convert FILE --to kohya|diffusers|peft|lora_vision -o OUT [--rank R | --energy E [--base MODEL]]`:
rewrite an adapter in another format. LoHa, LoKr, DoRA, OFT, ... layers are written in their own kind (kohya /
LyCORIS names) unless --rank or --energy turns every layer into plain LoRA (SVD of its update, kept share reported
per layer) for tools that read only LoRA."""

from __future__ import annotations

import argparse
from typing import Any

from ._adapters import add_output_args, write

EPILOG = """\
examples:
  lora-vision convert my_lora.safetensors --to kohya -o my_lora_a1111.safetensors --family sdxl
  lora-vision convert kohya_lora.safetensors --to diffusers -o pytorch_lora_weights.safetensors
  lora-vision convert vit_adapter.safetensors --to peft -o vit_peft/
  lora-vision convert lokr.safetensors --to kohya --energy 0.99 -o lokr_as_lora.safetensors
  lora-vision convert dora.safetensors --to kohya --rank 16 --base sd15/ -o dora_as_lora.safetensors
"""


def register(subparsers: Any) -> None:
    """Add the `convert` subcommand."""
    p = subparsers.add_parser("convert", help="convert an adapter between kohya, diffusers, peft and lora_vision",
                              description=__doc__.split("\n\n")[0].strip("`"), epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="input adapter (.safetensors) or PEFT folder, in any supported format")
    add_output_args(p, default_fmt="kohya")
    p.add_argument("--strict", action="store_true", help="fail on any tensor that cannot be converted")
    p.add_argument("--title", help="kohya: modelspec.title / ss_output_name (default: output file name)")
    p.add_argument("--trigger", help="kohya: modelspec.trigger_phrase")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rank", type=int, help="write plain LoRA of this rank (SVD of each layer's update, any kind)")
    g.add_argument("--energy", type=float, help="write plain LoRA keeping this share of each update's ||delta||_F^2")
    p.add_argument("--base", dest="base_model", metavar="MODEL",
                   help="base model (pipeline folder or .safetensors) for --rank/--energy on kinds whose update "
                        "depends on the weight (DoRA, OFT, (IA)^3) or flat LoHa/LoKr convolutions")
    p.add_argument("--component", default="model", choices=("model", "unet", "text_encoder", "text_encoder_2"),
                   help="component name of a single .safetensors --base (default model)")
    p.add_argument("--layers", type=int, default=40, help="layers listed in the --rank/--energy report (0 = all)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..formats import read_adapter

    adapter, report = read_adapter(args.file, strict=args.strict)
    print(report)
    if args.base_model and args.rank is None and args.energy is None:
        raise ValueError("--base is used with --rank or --energy (conversion to plain LoRA); add one of them")
    if args.rank is not None or args.energy is not None:
        from ..arithmetic import layer_weights, print_rows, resize

        base = layer_weights(args.base_model, args.component) if args.base_model else None
        adapter, rows = resize(adapter, rank=args.rank, energy=args.energy, base=base)
        print(print_rows(rows, limit=args.layers or None))
    extra = {}
    if args.to == "kohya":
        extra = {"title": args.title, "trigger_phrase": args.trigger}
    write(adapter, args, **extra)
    return 0
