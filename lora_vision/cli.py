"""`lora-vision` command line: inspect | convert | merge | resize | extract | generate | analyze.

Each subcommand lives in `lora_vision/commands/<name>.py` and defines `register(subparsers)`, which adds its
parser and sets `func` (a callable taking the parsed args and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("inspect", "convert", "merge", "resize", "extract", "generate", "analyze")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(prog="lora-vision", description="LoRA tools for image models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"lora_vision.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"lora_vision.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lora-vision` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        # Expected problems (bad files, bad arguments) are reported as one clear line, not a traceback.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"lora-vision {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
