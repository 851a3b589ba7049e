"""Stable Diffusion and ViT models: loading, family detection, and tiny random models for tests."""

from lora_vision.models.sd import (TINY_PIPELINES, base_tag, detect_sd_family, load_sd_pipeline, pipeline_base,
                                   prediction_type)
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
    "SD_KINDS",
    "TINY_LATENT_SIZE",
    "TINY_PIPELINES",
    "TINY_RESOLUTION",
    "base_tag",
    "build_tiny_hf_vit",
    "build_tiny_sd",
    "build_tiny_timm_vit",
    "build_tiny_tokenizer",
    "build_tiny_torchvision_vit",
    "detect_sd_family",
    "load_sd_pipeline",
    "pipeline_base",
    "prediction_type",
    "save_tiny_sd",
]
