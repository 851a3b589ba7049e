"""Helpers shared by the adapter subcommands (inspect, convert, merge, fuse, resize, extract): output arguments, writing
any format, per-file weights. Files are read with lora_vision.formats.read_adapter."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..dtypes import SHORT_NAMES, parse_dtype
from ..formats.dit_tables import FAMILIES as DIT_FAMILIES

OUT_FORMATS = ("lora_vision", "kohya", "diffusers", "peft")


def add_output_args(p: argparse.ArgumentParser, default_fmt: str = "lora_vision") -> None:
    """-o/--output, --to, --family, --dtype (the arguments every writing command shares)."""
    p.add_argument("-o", "--output", required=True, help="output file (a folder for --to peft)")
    p.add_argument("--to", choices=OUT_FORMATS, default=default_fmt,
                   help=f"output format (default {default_fmt}): kohya for A1111/ComfyUI/kohya, diffusers for "
                        "pipe.load_lora_weights, peft for a PEFT folder (ViT), lora_vision for our own files")
    p.add_argument("--family", choices=("sd1", "sd2", "sd2-v", "sdxl", *DIT_FAMILIES),
                   help="base model family for kohya metadata, SDXL naming and a DiT adapter's native names "
                        "(default: from the file)")
    p.add_argument("--dtype", choices=SHORT_NAMES,
                   help="tensor dtype of the output (others keep the input dtype). kohya default: fp16, or fp32 "
                        "with a warning when a value exceeds fp16's range (65504); an explicit fp16 that would "
                        "overflow is an error")


def write(adapter: Any, args: argparse.Namespace, **kwargs: Any) -> Path:
    """Write `adapter` as args.to to args.output; prints one line and returns the path."""
    from ..formats import export

    extra = dict(kwargs)
    if args.dtype:
        extra["dtype"] = parse_dtype(args.dtype, "--dtype")
    if args.to == "kohya":
        out = export(adapter, "kohya", args.output, base=args.family, **extra)
    elif args.to == "lora_vision":
        out = export(adapter, "lora_vision", args.output, dtype=extra.get("dtype"))
    else:
        out = export(adapter, args.to, args.output, **{k: v for k, v in extra.items() if k == "dtype"})
    print(f"wrote {args.to} adapter: {out}")
    return Path(out)


def weight_arg(text: str) -> float:
    """argparse type of a --weights value: a finite number (the one strength parser)."""
    from ..generation.prompts import parse_strength

    try:
        return parse_strength(text, "--weights value")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_weighted_files_args(p: argparse.ArgumentParser) -> None:
    """The adapter files and one --weights value per file (merge and fuse)."""
    p.add_argument("files", nargs="+", help="adapters (any supported format)")
    p.add_argument("--weights", type=weight_arg, nargs="+", help="one weight (strength) per adapter (default 1.0 each)")


def weights_for(files: list[str], weights: list[float] | None) -> list[float]:
    """One weight per adapter file: the given --weights, or 1.0 each; a count mismatch is an error."""
    weights = weights or [1.0] * len(files)
    if len(weights) != len(files):
        raise ValueError(f"--weights has {len(weights)} values for {len(files)} adapters; give one per adapter")
    return weights
