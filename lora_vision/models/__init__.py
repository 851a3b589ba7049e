"""Stable Diffusion, DiT and ViT models: loading, family detection, and tiny random models for tests."""

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
