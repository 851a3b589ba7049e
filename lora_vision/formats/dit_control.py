"""Flux.1 control LoRAs (BFL's FLUX.1-Canny-dev-lora and FLUX.1-Depth-dev-lora, and files trained the same way with
diffusers' train_control_lora_flux.py): the parts of such a file that are not LoRA pairs.

- Full tensors: the q/k RMSNorm scales (`double_blocks.N.img_attn.norm.query_norm.scale`, diffusers
  `transformer_blocks.N.attn.norm_q.weight`), set as they are, whatever the strength (`full_tensor_name`).
- Bias updates: BFL's LoRA layers keep the base layer's bias on lora_B (`<module>.lora_B.bias`; peft's
  `lora_bias`), scaled like the pair: they become the `diff_b` of the LoRA layer (lora.kinds), split like lora_B on
  fused modules (`split_biases`).
- The widened input: img_in (x_embedder) takes the image latents and the control latents side by side, twice the
  model's input channels; only a FluxControlPipeline feeds that, and pipeline.load_adapter widens x_embedder for it
  (zero weight columns for the control channels, as diffusers does). `control_note` says what the file is.

The names come from the tables of formats/dit_tables.py (FLUX1_NORMS, CONTROL_INPUT).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from .dit_tables import CONTROL_INPUT, FLUX1_IN_CHANNELS, FLUX1_NORMS, PREFIXES

BIAS_SUFFIX = ".lora_B.bias"
VARIANT = "Flux.1 control LoRA"
_BLOCK = re.compile(r"(?P<group>[a-z_]+)\.(?P<idx>\d+)\.(?P<rest>.+)$")


def _full_table() -> dict[tuple[str, str], str]:
    """{(block prefix, suffix): live parameter template} for both name spaces (native and diffusers)."""
    out = {}
    for g in FLUX1_NORMS:
        for r in g.rows:
            for live in r.live:
                out[(g.native, r.native)] = out[(g.live, live)] = f"{g.live}.{{}}.{live}"
    return out


_FULL = _full_table()


def full_tensor_name(key: str) -> str | None:
    """The live transformer parameter a full tensor of a Flux.1 control LoRA sets (native or diffusers name, behind
    any dotted prefix), or None for other keys."""
    body = key
    for prefix in PREFIXES:
        if prefix.endswith(".") and key.startswith(prefix):
            body = key[len(prefix):]
            break
    m = _BLOCK.match(body)
    template = _FULL.get((m["group"], m["rest"])) if m else None
    return template.format(m["idx"]) if template else None


def lora_biases(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{file module: lora_B bias} of the keys ending in `.lora_B.bias`."""
    return {k[: -len(BIAS_SUFFIX)]: t for k, t in raw.items() if k.endswith(BIAS_SUFFIX)}


def check_bias(label: str, bias: torch.Tensor, rows: int) -> None:
    """A lora_B bias must have one value per output row of its lora_B; raise ValueError naming both otherwise."""
    if bias.dim() != 1 or bias.shape[0] != rows:
        raise ValueError(f"{label}: lora_B.bias has shape {tuple(bias.shape)} but lora_B has {rows} output rows; "
                         "the file is broken")


def split_biases(bias: torch.Tensor | None, sizes: list[int]) -> list[torch.Tensor | None]:
    """A fused module's bias split by rows like its lora_B (None parts when it has none)."""
    return list(bias.split(sizes, 0)) if bias is not None else [None] * len(sizes)


def widened_inputs(family: str, name: str, down: torch.Tensor, wshape: tuple[int, ...] | None) -> bool:
    """True when the file's x_embedder takes twice the model's inputs: image + control latents (Flux.1 only)."""
    return (family == "flux1" and name == CONTROL_INPUT and wshape is not None and len(wshape) == 2
            and down.dim() == 2 and down.shape[1] == 2 * wshape[1])


def control_note(inputs: int | None, model_inputs: int | None, norms: int, biases: int) -> str | None:
    """What a Flux.1 file is when it is a control LoRA (None otherwise): img_in at twice the model's (or Flux.1's)
    input channels, or full norm scales."""
    wide = inputs is not None and inputs == 2 * (model_inputs or FLUX1_IN_CHANNELS)
    if not wide and not norms:
        return None
    width = f"img_in (x_embedder) takes {inputs} input channels (image + control latents)" if inputs else \
        "no img_in layer"
    model = f", the model's x_embedder {model_inputs}" if model_inputs else ""
    return (f"{VARIANT} (the layout of BFL's FLUX.1-Canny-dev-lora / FLUX.1-Depth-dev-lora): {width}{model}; "
            f"{norms} norm scales set in full, {biases} LoRA layers with a bias update. It needs a "
            "FluxControlPipeline (load_adapter widens x_embedder there, as diffusers does)")
