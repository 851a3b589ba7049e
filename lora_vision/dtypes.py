"""The one map from dtype names on the command line and in configs to torch dtypes.

Short names (fp32, fp16, bf16) are what --dtype takes; torch's names (float32, float16, bfloat16) are what
train_vit's --base_dtype takes; "no" is accelerate's --mixed_precision for no mixed precision (float32).
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "no": torch.float32,
    "fp16": torch.float16, "float16": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
SHORT_NAMES = ("fp32", "fp16", "bf16")  # the choices of --dtype flags


def parse_dtype(name: str, flag: str = "dtype") -> torch.dtype:
    """The torch dtype for `name` (any spelling in DTYPES); ValueError naming `flag` and the accepted names."""
    try:
        return DTYPES[str(name).strip().lower()]
    except KeyError:
        raise ValueError(f"{flag} {name!r} is not a dtype name; expected one of {', '.join(DTYPES)} "
                         "(fp32/float32/no, fp16/float16, bf16/bfloat16)") from None
