"""Stable Diffusion, DiT and ViT models: loading, family detection, and tiny random models for tests."""

import logging


class _TorchaoSafeGlobalsNote(logging.Filter):
    """Drops diffusers 0.42's warning that torchao (0.16 and later moved the classes it looks for) cannot register
    its tensor classes for torch.load: printed once per process whenever torchao is installed (our `lowmem` extra),
    it concerns only loading torchao-serialized checkpoints, which nothing here does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unable to import `torchao` Tensor objects")


logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").addFilter(_TorchaoSafeGlobalsNote())

from lora_vision.models.dit import DIT_KINDS, build_tiny_dit
from lora_vision.models.sd import (DIT_PIPELINES, TINY_PIPELINES, base_tag, detect_family, detect_sd_family,
                                   detect_variant, load_sd_pipeline, pipeline_base, prediction_type)
from lora_vision.models.tiny import (
    SD_KINDS,
    TINY_LATENT_SIZE,
    TINY_RESOLUTION,
    build_tiny_hf_vit,
    build_tiny_sd,
    build_tiny_timm_vit,
    build_tiny_tokenizer,
    build_tiny_torchvision_vit,
    save_tiny_sd,
)

__all__ = [
    "DIT_KINDS",
    "DIT_PIPELINES",
    "SD_KINDS",
    "TINY_LATENT_SIZE",
    "TINY_PIPELINES",
    "TINY_RESOLUTION",
    "base_tag",
    "build_tiny_dit",
    "build_tiny_hf_vit",
    "build_tiny_sd",
    "build_tiny_timm_vit",
    "build_tiny_tokenizer",
    "build_tiny_torchvision_vit",
    "detect_family",
    "detect_sd_family",
    "detect_variant",
    "load_sd_pipeline",
    "pipeline_base",
    "prediction_type",
    "save_tiny_sd",
]
