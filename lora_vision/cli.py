"""`lora-vision` command line: inspect | convert | merge | fuse | resize | extract | generate | analyze.

Each subcommand lives in `lora_vision/commands/<name>.py` and defines `register(subparsers)`, which adds its
parser and sets `func` (a callable taking the parsed args and returning an exit code).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from typing import Callable

from .terminal import printable

COMMANDS = ("inspect", "convert", "merge", "fuse", "resize", "extract", "generate", "analyze")


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


def run_command(prog: str, func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command function; expected problems (bad files, bad arguments, a full disk) become one clear line on
    stderr and exit code 1 instead of a traceback."""
    try:
        return int(func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        # Messages can quote file contents (key names, metadata): escape terminal control characters.
        print(f"{prog}: error: {printable(error_message(e), keep_newlines=True)}", file=sys.stderr)
        return 1


def error_message(e: BaseException) -> str:
    """The text shown for an expected error (KeyError without its quotes, a full disk said in words)."""
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" while writing {e.filename}" if e.filename else ""
        return (f"no space left on the device{where} ({e.strerror or e}); free some space or write the output "
                "somewhere else")
    return str(e)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lora-vision` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(f"lora-vision {args.command}", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
