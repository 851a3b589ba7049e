"""`lora-vision fuse`: fold adapters into a base model's weights and write the model as a diffusers folder.

Each adapter is loaded into the base pipeline at its --weights strength, fused into the weights (float32 math,
NaN/Inf refused), and the pipeline is saved to -o as a diffusers folder (optionally also one .safetensors file).
The folder appears atomically; an existing one is replaced only with --overwrite, and only if it holds an earlier
pipeline output.
"""

from __future__ import annotations

import argparse
from typing import Any

from ._adapters import add_weighted_files_args, weights_for

EPILOG = """\
examples:
  lora-vision fuse style.safetensors --base path/to/sd15-pipeline --weights 0.8 -o fused_sd15/
  lora-vision fuse style.safetensors subject.safetensors --base runwayml/stable-diffusion-v1-5 -o fused/ --single-file
"""


def add_fuse_output_args(p: argparse.ArgumentParser) -> None:
    """--single-file and --overwrite (shared with `merge --into`)."""
    p.add_argument("--single-file", action="store_true", help="also write one .safetensors checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder that holds an earlier fused pipeline "
                        "(model_index.json); any other folder is refused")


def register(subparsers: Any) -> None:
    """Add the `fuse` subcommand."""
    p = subparsers.add_parser("fuse", help="fold adapters into a base model and write it as a diffusers folder",
                              description=__doc__.split("\n\n")[1].replace("\n", " "), epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_weighted_files_args(p)
    p.add_argument("--base", required=True,
                   help="base pipeline: a diffusers folder, a hub id or a built-in tiny name (tiny-sd1, ...)")
    p.add_argument("-o", "--output", required=True, help="output folder (a diffusers pipeline)")
    add_fuse_output_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return fuse_into_base(args.base, args.files, args.weights, args.output, args.single_file, args.overwrite)


def fuse_into_base(base: str, files: list[str], weights: list[float] | None, output: str, single_file: bool,
                   overwrite: bool) -> int:
    """Fuse `files` at `weights` into `base` and write the pipeline to `output`; prints what was written."""
    from ..pipeline import merge_into_pipeline  # the pipeline side owns fusing into base weights

    result = merge_into_pipeline(base, list(zip(files, weights_for(files, weights))), output,
                                 single_file=single_file, overwrite=overwrite)
    print(result)
    return 0
