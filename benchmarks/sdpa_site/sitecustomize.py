"""Benchmarks only: with this folder on PYTHONPATH and BENCH_SDPA set (a setting of flux_backward_check.py), every
Python process of a benchmark turns off the same attention backends at start, ours and the reference alike."""

import os

_SETTING = os.environ.get("BENCH_SDPA", "default")
if _SETTING != "default":
    import torch

    _OFF = {"no-cudnn": ("cudnn",), "no-flash": ("flash",), "efficient-only": ("cudnn", "flash", "math")}.get(
        _SETTING, ())  # checkpointing: default attention (gpu_dit_parts.sh adds --gradient_checkpointing)
    for _name in _OFF:
        getattr(torch.backends.cuda, f"enable_{_name}_sdp")(False)
