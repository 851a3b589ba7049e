"""`lora-vision generate`: text-to-image with any number of adapters, A1111 prompt tags and strength grids."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..dtypes import SHORT_NAMES

EPILOG = """\
adapters:
  --lora FILE[:STRENGTH[:TE_STRENGTH]]   for every prompt (TE_STRENGTH defaults to STRENGTH); repeatable
  <lora:NAME:TE[:UNET]> in the prompt     A1111 syntax, also te=/unet= (<lora:ink:1:unet=0.6>); NAME is a file stem
                                         or ss_output_name alias under --lora_dir; tags are removed from the prompt
outputs (in --output_dir): NNNNN-SEED.png with A1111's "parameters" text (PNG Info reads it back, Lora hashes
  included) and NNNNN-SEED.json; with --sweep also grid-NNNNN-SEED.png, a labelled grid per seed.

examples:
  lora-vision generate --model runwayml/stable-diffusion-v1-5 --prompt "a photo of sks dog <lora:dog:0.8>" \\
      --lora_dir loras/ --seeds 1,2,3 --scheduler dpmpp_2m_karras --steps 25
  lora-vision generate --model tiny --prompt "a red box" --lora style.safetensors --sweep strength=0,0.25,0.5,0.75,1
  lora-vision generate --prompt_file prompts.txt --lora a.safetensors --lora b.safetensors \\
      --sweep a=0,0.5,1 --sweep b=0,0.5,1
"""


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds {text!r}: expected integers separated by commas") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The generation flags (shared by the CLI and scripts/generate.py)."""
    from lora_vision.generation.run import SCHEDULERS

    p.add_argument("--model", default="tiny", help="diffusers folder, hub id, or tiny / tiny-sd2 / tiny-sdxl / "
                                                   "tiny-flux / tiny-flux2 / tiny-sd3 / tiny-qwen-image / tiny-z-image "
                                                   "(default: the built-in tiny SD 1.x)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt_file", help="a text file with one prompt per line (blank lines and # comments skipped)")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:S[:TE]]", help="an adapter for all prompts")
    p.add_argument("--lora_dir", help="folder where <lora:NAME:...> tags are looked up (recursively)")
    p.add_argument("--seeds", type=_seeds, help="comma-separated seeds (default: --seed, --seed+1, ...)")
    p.add_argument("--seed", type=int, default=0, help="first seed when --seeds is not given (default 0)")
    p.add_argument("--num_images", type=int, default=1, help="images per prompt when --seeds is not given")
    p.add_argument("--batch_size", type=int, default=1, help="seeds generated together (default 1)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--width", type=int, help="default: the model's native size")
    p.add_argument("--height", type=int)
    p.add_argument("--scheduler", default="default", choices=["default", *SCHEDULERS])
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="strength grid axis; KEY is strength, te, unet or an adapter name (at most two axes)")
    p.add_argument("--output_dir", "-o", default="outputs")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=SHORT_NAMES, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--strict", action="store_true",
                   help="an adapter made for another SD family (from its metadata) or with modules the model does "
                        "not have is an error (default: a warning)")


def config_from_args(args: argparse.Namespace) -> Any:
    """A GenerateConfig from parsed flags."""
    from lora_vision.generation.run import GenerateConfig

    prompts = list(args.prompt)
    if args.prompt_file:
        lines = Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
        prompts += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    seeds = args.seeds or [args.seed + i for i in range(args.num_images)]
    return GenerateConfig(model=args.model, prompts=prompts, negative_prompt=args.negative_prompt, loras=args.lora,
                          lora_dir=args.lora_dir, seeds=seeds, steps=args.steps, guidance_scale=args.guidance_scale,
                          width=args.width, height=args.height, scheduler=args.scheduler, batch_size=args.batch_size,
                          sweeps=args.sweep, output_dir=args.output_dir, device=args.device, dtype=args.dtype,
                          progress=not args.no_progress, strict=args.strict)


def run(args: argparse.Namespace) -> int:
    """Generate and print where the images went."""
    from lora_vision.generation.run import generate

    written = generate(config_from_args(args))
    grids = [p for p in written if p.name.startswith("grid-")]
    print(f"wrote {len(written) - len(grids)} image(s)" + (f" and {len(grids)} grid(s)" if grids else "")
          + f" to {Path(args.output_dir)}")
    for p in grids:
        print(f"  grid: {p}")
    return 0


def register(subparsers: Any) -> None:
    """Add the `generate` subcommand."""
    p = subparsers.add_parser("generate", help="text-to-image with adapters, A1111 <lora:...> tags, strength grids",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
