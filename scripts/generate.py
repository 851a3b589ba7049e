"""Generate images with adapters: the same flags as `lora-vision generate`.

    python scripts/generate.py --model tiny --prompt "a red box <lora:style:0.8>" --lora_dir loras/ --seeds 1,2
    python scripts/generate.py --prompt "a photo of a dog" --lora dog.safetensors --sweep strength=0,0.5,1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout
    sys.path.insert(0, str(REPO))

from lora_vision.cli import run_command  # noqa: E402
from lora_vision.commands.generate import add_arguments, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run_command(parser.prog, run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
