"""diffusers integration: adapters in SD 1.x / 2.x / SDXL pipelines (unet, text_encoder, text_encoder_2).

    from lora_vision.pipeline import load_adapter, set_adapters, set_adapter_strength, fuse, unfuse
    load_adapter(pipe, "style.safetensors", name="style", strength=0.8, te_strength=0.5, block_strengths="up=0.5")
    load_adapter(pipe, "subject.safetensors", name="subject")
    set_adapters(pipe, ["subject"])            # switch: no reload
    set_adapter_strength(pipe, "subject", 1.2)  # one small copy
    fuse(pipe); ...; unfuse(pipe)               # bit-exact
    unload_adapter(pipe, "style")               # original modules and weights
    pipe(expand_tokens(pipe, "a photo of TOK")) # a bundled embedding's token (pivotal tuning) as all its vectors
"""

from .adapters import (PIPELINE_COMPONENTS, AdapterLoadReport, AdapterMismatchError, active_adapters,
                       list_adapters, load_adapter, pipeline_components, set_adapter_strength, set_adapters,
                       unload_adapter)
from .embeddings import expand_tokens
from .blocks import SYNTAX as BLOCK_STRENGTH_SYNTAX
from .blocks import block_of, parse_block_strengths
from .fuse import MergeResult, fuse, merge_into_pipeline, plain_modules, unfuse

__all__ = [
    "BLOCK_STRENGTH_SYNTAX", "PIPELINE_COMPONENTS", "AdapterLoadReport", "AdapterMismatchError", "MergeResult",
    "active_adapters", "block_of", "expand_tokens", "fuse", "list_adapters", "load_adapter", "merge_into_pipeline",
    "parse_block_strengths", "pipeline_components", "plain_modules", "set_adapter_strength",
    "set_adapters", "unfuse", "unload_adapter",
]
