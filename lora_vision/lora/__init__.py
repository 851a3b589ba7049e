"""The LoRA core: configs, layers, injection and operations. Knows nothing about diffusers, ViTs or files."""

from .config import ConfigError, LoRAConfig, matches, scaling
from .inject import (TargetError, candidate_modules, inject_lora, inject_lora_from_state_dict, lora_layers,
                     remove_lora, resolve_targets)
from .layers import (LoRAConv2d, LoRAFusedLinear, LoRALayer, LoRALinear, LoRAMultiheadAttention,
                     StrengthTable)
from .ops import (LoadReport, LoRAStateDictError, adapter_names, count_parameters, disable_lora, get_strength,
                  is_lora_layer, load_lora_state_dict, lora_parameters, lora_report, lora_state_dict, merge_lora,
                  parse_canonical, set_active_adapters, set_strength, unmerge_lora)
