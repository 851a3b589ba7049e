"""`lora-vision inspect FILE`: format, base architecture, modules, kinds (counts per kind), ranks, alphas, size,
metadata, trigger phrase."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

EPILOG = """\
examples:
  lora-vision inspect my_lora.safetensors
  lora-vision inspect peft_adapter_folder/ --json
"""


def register(subparsers: Any) -> None:
    """Add the `inspect` subcommand."""
    p = subparsers.add_parser("inspect", help="show format, base model, modules, ranks, alphas and metadata of a file",
                              description=__doc__.replace("\n", " ").strip("`"), epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="adapter file (.safetensors) or PEFT folder, in any supported format")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--all-metadata", action="store_true", help="print long metadata values in full")
    p.set_defaults(func=run)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def summary(path: str) -> dict[str, Any]:
    """Everything `inspect` shows, as a dict."""
    from ..formats import adapter_summary, detect_format, read_adapter
    from ..metadata import MODEL_SOURCE_KEY

    fmt = detect_format(path)
    adapter, report = read_adapter(path)
    meta = adapter.metadata
    params = sum(t.numel() for k, t in adapter.tensors.items() if not k.endswith(".alpha"))
    trigger = meta.get("modelspec.trigger_phrase") or adapter.info.trigger_phrase
    return {
        "file": str(path), "format": fmt, "base": report.base, "variant": report.variant,
        "size_bytes": _size(Path(path)),
        "parameters": params, "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in adapter.tensors.values()}),
        "components": adapter_summary(adapter), "kinds": adapter.kinds(), "trigger_phrase": trigger,
        "full_modules": sorted({k.rsplit(".", 1)[0] for k in adapter.tensors if k.startswith("full.")}),
        "report": str(report),  # .source and .source_format say where the file was read from, not what it holds
        "metadata": {k: v for k, v in meta.items() if not k.startswith(MODEL_SOURCE_KEY)},
    }


def run(args: argparse.Namespace) -> int:
    from ..terminal import printable as esc  # every string that comes from the file is escaped

    if not os.path.exists(args.file):
        raise FileNotFoundError(f"{args.file}: no such file or folder")
    info = summary(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"file:       {esc(info['file'])} ({info['size_bytes']:,} bytes)")
    print(f"format:     {info['format']}")
    print(f"base:       {esc(info['base'])}" + (f" ({info['variant']})" if info["variant"] else ""))
    print(f"parameters: {info['parameters']:,} ({', '.join(info['dtypes'])})")
    print(f"kinds:      {', '.join(f'{k}: {n}' for k, n in info['kinds'].items()) or '-'}")
    for comp, c in info["components"].items():
        print(f"  {esc(comp)}: {c['modules']} modules, ranks {c['ranks']}, alphas {[round(a, 4) for a in c['alphas']]}")
    if info["full_modules"]:
        print(f"  stored in full: {esc(', '.join(info['full_modules']))}")
    print(f"trigger:    {esc(info['trigger_phrase'] or '-')}")
    # The report's own lines are joined by newlines; the names inside it are escaped by ImportReport.
    print(f"import:     {info['report'].replace(chr(10), chr(10) + '            ')}")
    if info["metadata"]:
        print("metadata:")
        for k in sorted(info["metadata"]):
            v = esc(info["metadata"][k])
            if len(v) > 100 and not args.all_metadata:
                v = v[:97] + f"... ({len(v):,} chars)"
            print(f"  {esc(k)} = {v}")
    return 0
