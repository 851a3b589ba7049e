"""Load Stable Diffusion 1.x / 2.x / SDXL pipelines (built-in tiny, local folder or hub id) and tell them apart."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_vision.formats.naming import sd_family
from lora_vision.models.tiny import build_tiny_sd

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# Names that load_sd_pipeline answers with a built-in tiny pipeline instead of reading files.
TINY_PIPELINES: dict[str, str] = {"tiny": "sd1", "tiny-sd1": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}

# The text-to-image pipeline classes this package drives, by the `_class_name` in model_index.json.
_SUPPORTED_PIPELINES: tuple[str, ...] = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")

# A hub id is "owner/name"; anything else that does not exist on disk is a mistyped local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

_EXPECTED = (
    "expected None or one of " + ", ".join(repr(name) for name in TINY_PIPELINES)
    + ", a local diffusers folder with model_index.json, or a hub id such as 'stabilityai/stable-diffusion-2-1'"
)


def _unet_config(unet_or_pipe: Any) -> Mapping[str, Any]:
    """The UNet config of a pipeline, a UNet2DConditionModel, or a UNet config mapping."""
    if isinstance(unet_or_pipe, Mapping):
        return unet_or_pipe
    unet = getattr(unet_or_pipe, "unet", unet_or_pipe)
    config = getattr(unet, "config", None)
    if not isinstance(config, Mapping) or "cross_attention_dim" not in config:
        raise TypeError(
            f"detect_sd_family got {type(unet_or_pipe).__name__}; expected a Stable Diffusion pipeline, "
            "its UNet2DConditionModel, or the UNet's config"
        )
    return config


def detect_sd_family(unet_or_pipe: Any) -> str:
    """Return "sd1", "sd2" or "sdxl" from the UNet config of a pipeline, a UNet, or a UNet config (the rule:
    lora_vision.formats.naming.sd_family)."""
    return sd_family(_unet_config(unet_or_pipe))


def prediction_type(pipe: Any) -> str:
    """The scheduler's prediction target: "epsilon", "v_prediction" (SD 2.x 768-v models) or "sample"."""
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or "prediction_type" not in getattr(scheduler, "config", {}):
        raise TypeError(
            f"prediction_type got {type(pipe).__name__}; expected a diffusers pipeline whose scheduler has a "
            "prediction_type in its config"
        )
    return str(scheduler.config["prediction_type"])


def _load_tiny(name: str, torch_dtype: torch.dtype | None, variant: str | None) -> DiffusionPipeline:
    """A built-in tiny pipeline, cast to torch_dtype when one is given."""
    if variant is not None:
        raise ValueError(
            f"variant={variant!r} was given for the built-in tiny pipeline {name!r}, which has no weight files; "
            "expected variant=None"
        )
    pipe = build_tiny_sd(TINY_PIPELINES[name])
    return pipe if torch_dtype is None else pipe.to(dtype=torch_dtype)


def _check_local_folder(path: Path, name_or_path: str) -> None:
    """Raise unless `path` is a diffusers pipeline folder."""
    if path.is_file():
        raise ValueError(
            f"load_sd_pipeline got the file {name_or_path!r}; expected a diffusers folder with model_index.json "
            "(single-file .safetensors/.ckpt checkpoints are not supported: convert them with diffusers' "
            "from_single_file(...).save_pretrained(folder) first)"
        )
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the folder {str(path)!r} has no model_index.json; expected a diffusers pipeline folder as written "
            "by save_pretrained (with unet/, vae/, text_encoder/, tokenizer/, scheduler/ inside)"
        )


def load_sd_pipeline(
    name_or_path: str | None,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
) -> DiffusionPipeline:
    """Load an SD 1.x/2.x pipeline (StableDiffusionPipeline) or an SDXL one (StableDiffusionXLPipeline).

    `name_or_path` is None or "tiny" (tiny SD 1.x), "tiny-sd1", "tiny-sd2", "tiny-sdxl" for the built-in random
    pipelines; a local diffusers folder; or a hub id. The pipeline class comes from the model's model_index.json.
    The safety checker is not loaded.
    """
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if name_or_path is None:
        return _load_tiny("tiny", torch_dtype, variant)
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"load_sd_pipeline got {type(name_or_path).__name__}; {_EXPECTED}")
    name_or_path = str(name_or_path)
    if name_or_path in TINY_PIPELINES:
        return _load_tiny(name_or_path, torch_dtype, variant)

    path = Path(name_or_path).expanduser()
    if path.exists():
        _check_local_folder(path, name_or_path)
        source = str(path)
    elif _HUB_ID.match(name_or_path):
        source = name_or_path
    else:
        raise FileNotFoundError(f"load_sd_pipeline got {name_or_path!r}, which does not exist; {_EXPECTED}")

    try:
        index = DiffusionPipeline.load_config(source)
    except OSError as err:
        raise OSError(f"could not read model_index.json of {name_or_path!r} ({err}); {_EXPECTED}") from err
    class_name = index.get("_class_name")
    if class_name not in _SUPPORTED_PIPELINES:
        raise ValueError(
            f"{name_or_path!r} is a {class_name} (from its model_index.json); expected one of "
            f"{', '.join(_SUPPORTED_PIPELINES)}"
        )

    kwargs: dict[str, Any] = {"torch_dtype": torch_dtype, "variant": variant}
    if class_name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
        return StableDiffusionPipeline.from_pretrained(source, **kwargs)
    return StableDiffusionXLPipeline.from_pretrained(source, **kwargs)
