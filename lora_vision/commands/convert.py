"""`lora-vision convert FILE --to kohya|diffusers|peft|lora_vision -o OUT`: rewrite an adapter in another format."""

from __future__ import annotations

import argparse
from typing import Any

from ._adapters import add_output_args, write

EPILOG = """\
examples:
  lora-vision convert my_lora.safetensors --to kohya -o my_lora_a1111.safetensors --family sdxl
  lora-vision convert kohya_lora.safetensors --to diffusers -o pytorch_lora_weights.safetensors
  lora-vision convert vit_adapter.safetensors --to peft -o vit_peft/
"""


def register(subparsers: Any) -> None:
    """Add the `convert` subcommand."""
    p = subparsers.add_parser("convert", help="convert an adapter between kohya, diffusers, peft and lora_vision",
                              description=__doc__.strip("`"), epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="input adapter (.safetensors) or PEFT folder, in any supported format")
    add_output_args(p, default_fmt="kohya")
    p.add_argument("--strict", action="store_true", help="fail on any tensor that cannot be converted")
    p.add_argument("--title", help="kohya: modelspec.title / ss_output_name (default: output file name)")
    p.add_argument("--trigger", help="kohya: modelspec.trigger_phrase")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..formats import read_adapter

    adapter, report = read_adapter(args.file, strict=args.strict)
    print(report)
    extra = {}
    if args.to == "kohya":
        extra = {"title": args.title, "trigger_phrase": args.trigger}
    write(adapter, args, **extra)
    return 0
