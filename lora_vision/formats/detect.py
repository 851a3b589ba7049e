"""The one place that tells formats apart (from keys and metadata)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from ..adapter import COMPONENTS, EMBEDDINGS
from ..io import AdapterFileError, read_header
from ..lora.kinds import KINDS
from ..metadata import FORMAT_KEY
from .diffusers import is_diffusers_key
from .dit_detect import dit_format, is_dit_keys
from .kohya import is_kohya_key

FORMATS = ("lora_vision", "kohya", "diffusers", "peft")
_CANONICAL = (".lora_A.weight", ".lora_B.weight", ".alpha")
_OUR_COMPONENTS = tuple(c + "." for c in COMPONENTS)


def _is_native_tensor(key: str) -> bool:
    """A LoRA tensor or alpha (`.lora_A.weight`, `.alpha`), or a factor of another kind (`<module>.<kind>.<factor>`,
    lora.kinds) in our own layout."""
    return key.endswith(_CANONICAL) or key.rsplit(".", 2)[-2] in KINDS


def classify_keys(keys: list[str], metadata: Mapping[str, str] | None = None, source: str = "<tensors>") -> str:
    """Format name for a set of tensor keys (and metadata); AdapterFileError when it is none we know."""
    metadata = metadata or {}
    if not keys:
        raise AdapterFileError(f"{source}: the file holds no tensors; expected LoRA weights")
    if FORMAT_KEY in metadata and "lora_adapter_metadata" not in metadata and all(
            (k.startswith(_OUR_COMPONENTS) and _is_native_tensor(k)) or k.startswith(("full.", EMBEDDINGS + "."))
            for k in keys):
        return "lora_vision"
    if is_dit_keys(keys):  # Flux / SD3 / Qwen-Image / Z-Image: formats/dit_keys.py reads every spelling
        return dit_format(keys)
    if any(is_kohya_key(k) for k in keys):
        return "kohya"
    if all(k.startswith("base_model.model.") for k in keys):
        return "peft"
    if any(is_diffusers_key(k) for k in keys):
        return "diffusers"
    raise AdapterFileError(
        f"{source}: no known LoRA key spelling among {len(keys)} keys (first: {sorted(keys)[:3]}); expected kohya "
        "(lora_unet_*/lora_te*_*.lora_down.weight), diffusers/PEFT (unet.*.lora_A.weight), a PEFT folder "
        "(adapter_config.json) or a lora_vision adapter")


def detect_format(path_or_tensors: str | os.PathLike | Mapping[str, torch.Tensor]) -> str:
    """"lora_vision", "kohya", "diffusers" or "peft" for a file, a PEFT folder, or a dict of tensors; DiT files
    in XLabs' or DiffSynth's own spelling give "xlabs" / "diffsynth".

    Reads only the header of a file; pickles, truncated files and bad headers raise AdapterFileError.
    """
    if isinstance(path_or_tensors, Mapping):
        return classify_keys(list(path_or_tensors), None)
    path = Path(path_or_tensors)
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return "peft"
        raise AdapterFileError(f"{path} is a folder without adapter_config.json; expected a PEFT adapter folder or a "
                               ".safetensors file")
    header, _ = read_header(path)
    meta = header.get("__metadata__", {})
    return classify_keys([k for k in header if k != "__metadata__"], meta, str(path))
