"""The LoRA core: configs, layers, injection and operations. Knows nothing about diffusers, ViTs, presets or files."""

from .config import ConfigError, LoRAConfig, TargetError, matches, scaling
from .inject import (candidate_modules, expected_shapes, fold_lora, inject_lora, inject_lora_from_state_dict,
                     remove_lora, replace_module, resolve_targets, use_named_targets)
from .layers import (LoRAConv2d, LoRAFusedLinear, LoRALayer, LoRALinear, LoRAMultiheadAttention,
                     StrengthTable, lora_layers)
from .ops import (LoadReport, LoRAStateDictError, adapter_names, canonical_layers, count_parameters, disable_lora,
                  get_strength, is_lora_layer, load_lora_state_dict, lora_parameters, lora_report, lora_specs,
                  lora_state_dict, merge_lora, parse_canonical, set_active_adapters, set_strength, unmerge_lora)
from .spec import SCALING_RULES, LayerSpec, plain_alpha
