"""lora_vision: LoRA for image models (Stable Diffusion UNets and text encoders, vision transformers)."""

from .lora import (ConfigError, LayerSpec, LoadReport, LoRAConfig, LoRAConv2d, LoRAFusedLinear, LoRALayer,
                   LoRALinear, LoRAMultiheadAttention, LoRAStateDictError, TargetError, adapter_names,
                   count_parameters, disable_lora, fold_lora, get_strength, inject_lora, inject_lora_from_state_dict,
                   load_lora_state_dict, lora_layers, lora_parameters, lora_report, lora_state_dict, merge_lora,
                   remove_lora, set_active_adapters, set_strength, unmerge_lora)
from .targets import PRESETS, default_preset

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "LayerSpec", "LoadReport", "LoRAConfig", "LoRAConv2d", "LoRAFusedLinear", "LoRALayer", "LoRALinear",
    "LoRAMultiheadAttention", "LoRAStateDictError", "PRESETS", "TargetError", "adapter_names", "count_parameters",
    "default_preset", "disable_lora", "fold_lora", "get_strength", "inject_lora", "inject_lora_from_state_dict",
    "load_lora_state_dict", "lora_layers", "lora_parameters", "lora_report", "lora_state_dict", "merge_lora",
    "remove_lora", "set_active_adapters", "set_strength", "unmerge_lora", "__version__",
]
