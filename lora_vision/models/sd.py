"""Load Stable Diffusion 1.x / 2.x / SDXL and DiT (Flux.1, Flux.2-klein, SD 3.5, Qwen-Image, Z-Image) pipelines
(built-in tiny, local folder or hub id) and tell their families apart."""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lora_vision.formats.naming import dit_family, dit_variant, sd_family
from lora_vision.models.dit import DIT_KINDS, build_tiny_dit
from lora_vision.models.tiny import build_tiny_sd
from lora_vision.io import AdapterFileError, read_header

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# Names that load_sd_pipeline answers with a built-in tiny pipeline. "tiny" is the pretrained SD 1.x pipeline
# shipped in samples/tiny-sd (64 px, made by scripts/pretrain_tiny_sd.py); the others are random-weight test models.
TINY_PIPELINES: dict[str, str] = {"tiny": "sd1", "tiny-sd1": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
TINY_PRETRAINED: Path = Path(__file__).resolve().parents[2] / "samples" / "tiny-sd"

# The text-to-image pipeline classes this package drives, by the `_class_name` in model_index.json.
_SUPPORTED_PIPELINES: tuple[str, ...] = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
# DiT pipelines, loaded with DiffusionPipeline.from_pretrained (components as in their model_index.json).
DIT_PIPELINES: tuple[str, ...] = ("FluxPipeline", "Flux2Pipeline", "Flux2KleinPipeline", "StableDiffusion3Pipeline",
                                  "QwenImagePipeline", "ZImagePipeline")

# A hub id is "owner/name"; anything else that does not exist on disk is a mistyped local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

_EXPECTED = (
    "expected None or one of " + ", ".join(repr(name) for name in (*TINY_PIPELINES, *DIT_KINDS))
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


def detect_family(model_or_pipe: Any) -> str:
    """The family of a pipeline, or of its UNet / transformer: "sd1", "sd2", "sdxl" (detect_sd_family), or a DiT
    family "flux1", "flux2", "sd3", "qwen-image", "z-image" (from the transformer class: naming.dit_family)."""
    transformer = getattr(model_or_pipe, "transformer", model_or_pipe)
    family = dit_family(type(transformer).__name__)
    return family if family is not None else detect_sd_family(model_or_pipe)


def detect_variant(model_or_pipe: Any) -> str | None:
    """The released size of a DiT pipeline or transformer (e.g. "flux2-klein-4b", "sd35-large"; naming.dit_variant),
    or None for SD pipelines and sizes no released model has (the tiny test models)."""
    transformer = getattr(model_or_pipe, "transformer", model_or_pipe)
    config = getattr(transformer, "config", None)
    if not isinstance(config, Mapping):
        return None
    return dit_variant(type(transformer).__name__, config)


def prediction_type(pipe: Any) -> str:
    """The scheduler's prediction target: "epsilon", "v_prediction" (SD 2.x 768-v models) or "sample"."""
    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None or "prediction_type" not in getattr(scheduler, "config", {}):
        raise TypeError(
            f"prediction_type got {type(pipe).__name__}; expected a diffusers pipeline whose scheduler has a "
            "prediction_type in its config"
        )
    return str(scheduler.config["prediction_type"])


def base_tag(family: str, prediction: str | None) -> str:
    """The base an adapter records and a kohya file declares: the family (sd1, sd2, sdxl), or "sd2-v" for SD 2.x
    that predicts v (the 768-v models)."""
    return "sd2-v" if family == "sd2" and prediction == "v_prediction" else family


def pipeline_base(pipe: Any) -> str:
    """`base_tag` of a pipeline, from its UNet config and its scheduler's prediction type: what to pass as the
    kohya exporter's `base` (with `unet_config=dict(pipe.unet.config)`)."""
    return base_tag(detect_sd_family(pipe), prediction_type(pipe))


def _load_tiny(name: str, torch_dtype: torch.dtype | None, variant: str | None) -> DiffusionPipeline:
    """A built-in tiny pipeline, cast to torch_dtype when one is given."""
    if variant is not None:
        raise ValueError(
            f"variant={variant!r} was given for the built-in tiny pipeline {name!r}, which has no weight files; "
            "expected variant=None"
        )
    if name == "tiny":
        if not (TINY_PRETRAINED / "model_index.json").is_file():
            raise FileNotFoundError(
                f"the pretrained tiny pipeline is not in {str(TINY_PRETRAINED)!r}; it ships in samples/tiny-sd of a "
                "lora_vision checkout (run from one, or pass that folder as the model); 'tiny-sd1' is a random one")
        # Stored in fp16 to stay small; run in float32 unless asked otherwise.
        return load_sd_pipeline(str(TINY_PRETRAINED), torch_dtype=torch_dtype or torch.float32)
    pipe = build_tiny_dit(name) if name in DIT_KINDS else build_tiny_sd(TINY_PIPELINES[name])
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


def _hub_failure(name: str, err: BaseException) -> str | None:
    """A one-line reason when reading `name` from the hub failed for a known cause (no network, no such repo)."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    if any(isinstance(e, GatedRepoError) for e in chain):
        return (f"{name!r} is a gated repository on the Hugging Face hub; accept its licence on the model page and "
                "log in (`hf auth login`), or pass a local diffusers folder")
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return (f"{name!r} is not a local folder and the Hugging Face hub has no such model; check the id "
                "(owner/name) or pass a local diffusers folder")
    if any(isinstance(e, (LocalEntryNotFoundError, ConnectionError)) for e in chain):
        return (f"{name!r} is not a local folder and the Hugging Face hub could not be reached (offline or no "
                "network), and it is not in the Hugging Face cache; download it where there is network (`hf download "
                f"{name}`) or pass a local diffusers folder")
    return None


def _weight_problems(folder: Path) -> list[str]:
    """Truncated or corrupt .safetensors files in the component folders of a local pipeline (headers only)."""

    out = []
    for file in sorted(folder.glob("*/*.safetensors")):
        try:
            read_header(file)
        except AdapterFileError as err:
            out.append(str(err))
    return out


def load_sd_pipeline(
    name_or_path: str | None,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
) -> DiffusionPipeline:
    """Load an SD 1.x/2.x pipeline (StableDiffusionPipeline), an SDXL one (StableDiffusionXLPipeline) or a DiT one
    (DIT_PIPELINES: Flux.1, Flux.2, SD 3.x, Qwen-Image, Z-Image).

    `name_or_path` is None or "tiny" for the pretrained tiny SD 1.x pipeline of samples/tiny-sd (64 px);
    "tiny-sd1", "tiny-sd2", "tiny-sdxl", "tiny-flux", "tiny-flux2", "tiny-sd3", "tiny-qwen-image", "tiny-z-image"
    for the built-in random pipelines (models.tiny, models.dit); a local diffusers folder; or a hub id. The pipeline class comes from the model's model_index.json.
    The safety checker is not loaded.
    """
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if name_or_path is None:
        return _load_tiny("tiny", torch_dtype, variant)
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"load_sd_pipeline got {type(name_or_path).__name__}; {_EXPECTED}")
    name_or_path = str(name_or_path)
    if name_or_path in TINY_PIPELINES or name_or_path in DIT_KINDS:
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
        with warnings.catch_warnings():  # diffusers passes huggingface_hub a deprecated argument: not the user's concern
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            index = DiffusionPipeline.load_config(source)
    except OSError as err:
        known = _hub_failure(name_or_path, err)
        if known:
            raise OSError(known) from err
        raise OSError(f"could not read model_index.json of {name_or_path!r} ({err}); {_EXPECTED}") from err
    class_name = index.get("_class_name")
    if class_name not in _SUPPORTED_PIPELINES + DIT_PIPELINES:
        raise ValueError(
            f"{name_or_path!r} is a {class_name} (from its model_index.json); expected one of "
            f"{', '.join(_SUPPORTED_PIPELINES + DIT_PIPELINES)}"
        )

    bad = _weight_problems(path) if path.exists() else []
    if bad:
        raise ValueError(f"the weights of {name_or_path!r} cannot be loaded: {bad[0]}"
                         + (f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else "")
                         + "; re-download or re-save the model")
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "variant": variant}  # diffusers 0.42 deprecates torch_dtype
    cls = {"StableDiffusionPipeline": StableDiffusionPipeline,
           "StableDiffusionXLPipeline": StableDiffusionXLPipeline}.get(class_name, DiffusionPipeline)
    if class_name == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:  # missing or unreadable files, shape mismatches, no network
        known = _hub_failure(name_or_path, err)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(known or f"the weights of {name_or_path!r} cannot be loaded ({first}); expected a complete "
                         "diffusers folder or hub id: re-download or re-save the model") from err
