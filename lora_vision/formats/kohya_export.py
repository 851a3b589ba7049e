"""Kept so that `from lora_vision.formats.kohya_export import export_kohya` still works: the kohya exporter now lives
in `lora_vision.formats.kohya` next to the importer (one file per format)."""

from .kohya import BASES, data_region_sha256, export_kohya, kohya_tensors

__all__ = ["BASES", "data_region_sha256", "export_kohya", "kohya_tensors"]
