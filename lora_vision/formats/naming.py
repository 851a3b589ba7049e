"""Module names: live (installed libraries) <-> the names LoRA files use.

- CLIP text encoders: files keep transformers-4 names (`text_model.encoder.layers.N...`); transformers 5 flattened
  `CLIPTextModel` (no `text_model.`), while `CLIPTextModelWithProjection` keeps it.
- HF ViT: transformers 4 (`vit.encoder.layer.N.attention.attention.query`) <-> 5 (`vit.layers.N.attention.q_proj`).
- UNet: diffusers names <-> LDM/SGM names, computed from the UNet config (the mapping of ComfyUI's
  `comfy.utils.unet_to_diffusers`; tests/formats/test_naming.py checks it table row by table row).
- kohya keys: `prefix + "_" + name.replace(".", "_")`; the inverse is a lookup over known names, never a string
  replacement (module names contain underscores themselves).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterable, Mapping

import torch
import transformers
from torch import nn

from ..lora.inject import adapter_slot, adapter_slots
from ..lora.layers import LoRALayer

# ---- CLIP text encoders -------------------------------------------------------------------------------------

TEXT_MODEL = "text_model."


# What transformers 4 keeps under `text_model.` (the projection of CLIPTextModelWithProjection sits outside it).
_INSIDE_TEXT_MODEL = ("encoder.layers.", "embeddings.", "final_layer_norm")  # not T5's encoder.block.


def te_to_file(name: str) -> str:
    """A live CLIP text-encoder module name -> the transformers-4 name files use (`text_model.` inserted)."""
    return TEXT_MODEL + name if name.startswith(_INSIDE_TEXT_MODEL) else name


def te_to_live(name: str, has_text_model: bool) -> str:
    """A file (transformers-4) CLIP name -> the live name (`text_model.` stripped when the model has none)."""
    if has_text_model:
        return te_to_file(name)
    return name.removeprefix(TEXT_MODEL)


def default_has_text_model(component: str) -> bool:
    """Whether the installed transformers' CLIP class for `component` has a `.text_model` child.

    transformers 5 flattened CLIPTextModel (SD text_encoder); CLIPTextModelWithProjection (SDXL text_encoder_2)
    keeps `text_model`. In transformers 4 both have it.
    """
    return transformers_major() < 5 or component == "text_encoder_2"


def transformers_major() -> int:
    """Major version of the installed transformers (module names changed in 5)."""
    return int(transformers.__version__.split(".")[0])


# ---- LLM text encoders of the DiT pipelines (Qwen2.5-VL, Mistral 3, Qwen3) --------------------------------------

# One module, several spellings: transformers 5 (and 4.52+) nest the language model of Qwen2.5-VL / Mistral 3 as
# `model.language_model.layers.N`, older transformers as `model.layers.N` (Qwen2.5-VL) or
# `language_model.model.layers.N` (Mistral 3); Qwen3ForCausalLM has `model.layers.N`, Qwen3Model `layers.N`. The
# vision towers moved the same way (`visual.` -> `model.visual.`, ...).
_LLM_SPELLINGS = ("model.language_model.", "language_model.model.", "model.", "")
_VISION_SPELLINGS = (("model.visual.", "visual."), ("model.vision_tower.", "vision_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector."))


def llm_aliases(name: str) -> list[str]:
    """Every spelling files use for the live module `name` of an LLM text encoder (itself first); [name] for
    modules of other models (CLIP, T5)."""
    for p in _LLM_SPELLINGS:
        if name.startswith(p + "layers."):
            return [name] + [q + name[len(p):] for q in _LLM_SPELLINGS if q != p]
    for spellings in _VISION_SPELLINGS:
        for p in spellings:
            if name.startswith(p):
                return [name] + [q + name[len(p):] for q in spellings if q != p]
    return [name]


def comfy_llm_name(name: str) -> str:
    """ComfyUI's spelling of the module `name` of an LLM text encoder: its own models keep the older transformers
    paths (language layers under `model.layers.N`, the vision tower under `visual.` / `vision_tower.`); other
    modules (T5's, `lm_head`) as they are."""
    comfy = ("model.layers.", "visual.", "vision_tower.", "multi_modal_projector.")
    return next((a for a in llm_aliases(name) if a.startswith(comfy)), name)


# ---- HF ViT v4 <-> v5 ------------------------------------------------------------------------------------------

_VIT_V4_TO_V5 = (
    (r"encoder\.layer\.(\d+)\.attention\.attention\.query", r"layers.\1.attention.q_proj"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.key", r"layers.\1.attention.k_proj"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.value", r"layers.\1.attention.v_proj"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense", r"layers.\1.attention.o_proj"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense", r"layers.\1.mlp.fc1"),
    (r"encoder\.layer\.(\d+)\.output\.dense", r"layers.\1.mlp.fc2"),
)


def _vit_rules(to_v5: bool) -> list[tuple[re.Pattern, str]]:
    out = []
    for v4, v5 in _VIT_V4_TO_V5:
        if to_v5:
            out.append((re.compile(r"(^|.*\.)" + v4 + r"$"), r"\g<1>" + v5.replace(r"\1", r"\g<2>")))
        else:
            pat = re.escape(v5.replace(r"\1", "@")).replace("@", r"(\d+)")
            rep = v4.replace(r"(\d+)", r"\g<2>").replace("\\.", ".")
            out.append((re.compile(r"(^|.*\.)" + pat + r"$"), r"\g<1>" + rep))
    return out


def _vit_convert(name: str, to_v5: bool) -> str:
    for pat, rep in _vit_rules(to_v5):
        if pat.match(name):
            return pat.sub(rep, name)
    return name


def vit_v4_to_v5(name: str) -> str:
    """HF ViT transformers-4 module name -> transformers-5 name (other names unchanged)."""
    return _vit_convert(name, True)


def vit_v5_to_v4(name: str) -> str:
    """HF ViT transformers-5 module name -> transformers-4 name (other names unchanged)."""
    return _vit_convert(name, False)


# ---- UNet: diffusers <-> LDM/SGM -----------------------------------------------------------------------------

_RESNET_CHILDREN = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_STEM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
         "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
         "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _cfg(config: Any) -> Mapping[str, Any]:
    if isinstance(config, Mapping):
        return config
    config = getattr(getattr(config, "unet", config), "config", config)
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a UNet config mapping, a UNet2DConditionModel or a pipeline, got {type(config)}")
    return config


def unet_block_map(config: Any) -> dict[str, str]:
    """diffusers block prefix -> LDM/SGM block prefix, from the UNet config (`down_blocks.i.*s.j` ->
    `input_blocks.(1+3i+j)`, `up_blocks.i.*s.j` -> `output_blocks.(3i+j)`, samplers and mid block apart)."""
    cfg = _cfg(config)
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    lpb = cfg.get("layers_per_block", 2)
    lpbs = list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * len(down)
    if len(set(lpbs)) != 1:
        raise ValueError(f"per-block layers_per_block {lpbs} has no LDM equivalent")
    n = lpbs[0]
    out: dict[str, str] = dict(_STEM)
    for i, t in enumerate(down):
        for j in range(n):
            out[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{1 + (n + 1) * i + j}.0"
            if "CrossAttn" in t:
                out[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{1 + (n + 1) * i + j}.1"
        if i < len(down) - 1:
            out[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(n + 1) * (i + 1)}.0.op"
    out["mid_block.resnets.0"] = "middle_block.0"
    out["mid_block.attentions.0"] = "middle_block.1"
    out["mid_block.resnets.1"] = "middle_block.2"
    for i, t in enumerate(up):
        for j in range(n + 1):
            out[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{(n + 1) * i + j}.0"
            if "CrossAttn" in t:
                out[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{(n + 1) * i + j}.1"
        if i < len(up) - 1:
            out[f"up_blocks.{i}.upsamplers.0.conv"] = \
                f"output_blocks.{(n + 1) * i + n}.{2 if 'CrossAttn' in t else 1}.conv"
    return out


def diffusers_to_ldm(name: str, block_map: Mapping[str, str]) -> str:
    """One diffusers UNet module name -> its LDM/SGM name (KeyError if the name is not in any known block)."""
    best = max((p for p in block_map if name == p or name.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise KeyError(f"UNet module {name!r} has no LDM/SGM equivalent")
    rest = name[len(best) + 1:]
    if ".resnets." in best + "." and rest:
        head, _, tail = rest.partition(".")
        if head not in _RESNET_CHILDREN:
            raise KeyError(f"UNet module {name!r}: unknown ResNet child {head!r}")
        rest = _RESNET_CHILDREN[head] + (f".{tail}" if tail else "")
    return block_map[best] + (f".{rest}" if rest else "")


# Standard layouts (block topology only; widths do not change names). SD 2.x has the names of SD 1.x.
STANDARD_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd1": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8),
    "sd2": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=(5, 10, 20, 20),
                use_linear_projection=True),
    "sdxl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}


def sd_family(unet_config: Mapping[str, Any]) -> str:
    """"sd1", "sd2" or "sdxl" from a UNet config.

    The rule, in order:
    - "sdxl" when addition_embed_type == "text_time" (SDXL's pooled-text + size/crop conditioning);
    - "sd2" when cross_attention_dim == 1024 (OpenCLIP ViT-H) or use_linear_projection is set (SD 2.x replaced
      SD 1.x's 1x1-conv proj_in/proj_out of each transformer with Linear layers);
    - "sd1" otherwise (CLIP ViT-L, 768-wide cross-attention, conv projections).
    """
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    cross_dim = unet_config.get("cross_attention_dim")
    cross_dims = tuple(cross_dim) if isinstance(cross_dim, (list, tuple)) else (cross_dim,)
    if 1024 in cross_dims or unet_config.get("use_linear_projection", False):
        return "sd2"
    return "sd1"


# ---- DiT (flow-matching transformer) families -------------------------------------------------------------------

# diffusers transformer class -> family. Module names inside each class are the canonical names of that family.
DIT_CLASSES: dict[str, str] = {
    "FluxTransformer2DModel": "flux1",
    "Flux2Transformer2DModel": "flux2",
    "SD3Transformer2DModel": "sd3",
    "QwenImageTransformer2DModel": "qwen-image",
    "ZImageTransformer2DModel": "z-image",
}

# (family, size facts of the real checkpoints' configs) -> variant. Files of two variants of one family do not fit
# each other (other widths or block counts); Flux.1 dev and schnell share every shape (schnell only drops the
# guidance embedding) and so are one variant.
# Released configs. Flux.2 (dev, klein 4B, klein 9B): checked against the configs in diffusers'
# scripts/convert_flux2_to_diffusers.py (num_layers / num_single_layers / num_attention_heads = 8/48/48, 5/20/24,
# 8/24/32; head size 128, so hidden 6144 / 3072 / 4096 as dit_tables.FLUX2_SIZES says).
_DIT_VARIANTS: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("flux1", {"num_layers": 19, "num_single_layers": 38, "num_attention_heads": 24}, "flux1"),
    ("flux2", {"num_layers": 8, "num_single_layers": 48, "num_attention_heads": 48}, "flux2-dev"),
    ("flux2", {"num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24}, "flux2-klein-4b"),
    ("flux2", {"num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32}, "flux2-klein-9b"),
    ("sd3", {"num_layers": 24, "qk_norm": None}, "sd3-medium"),
    ("sd3", {"num_layers": 24, "qk_norm": "rms_norm"}, "sd35-medium"),
    ("sd3", {"num_layers": 38, "qk_norm": "rms_norm"}, "sd35-large"),
    ("qwen-image", {"num_layers": 60, "num_attention_heads": 24}, "qwen-image"),
    ("z-image", {"n_layers": 30, "dim": 3840}, "z-image"),
)


def dit_family(class_name: str) -> str | None:
    """"flux1", "flux2", "sd3", "qwen-image" or "z-image" for a diffusers transformer class name, else None."""
    return DIT_CLASSES.get(class_name)


def dit_variant(class_name: str, config: Mapping[str, Any]) -> str | None:
    """The released model size a transformer config has (flux1, flux2-dev, flux2-klein-4b, flux2-klein-9b,
    sd3-medium, sd35-medium, sd35-large, qwen-image, z-image), or None for other sizes (tiny test models).

    The rule: the family from the class, then the block counts and head counts of the released configs
    (SD 3.5 medium differs from SD 3 medium by its RMS qk-norm, Flux.2-klein 4B from 9B by depth and width).
    """
    family = dit_family(class_name)
    for fam, facts, variant in _DIT_VARIANTS:
        if fam == family and all(config.get(k) == v for k, v in facts.items()):
            return variant
    return None


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear / Conv2d / MultiheadAttention modules of `model` by name (LoRA wrappers count as their base)."""
    return _described_all(model, norms=False)


def norm_modules(model: nn.Module) -> dict[str, nn.Module]:
    """LayerNorm / GroupNorm modules with a weight (what norm-layer updates, w_norm / b_norm, go on) by name
    (a wrapper counts as its base)."""
    return _described_all(model, norms=True)


def live_module(model: nn.Module, name: str, norms: bool = False) -> nn.Module | None:
    """The module adaptable_modules(model) (with `norms`: norm_modules(model)) holds under `name`, or None: found
    along the children, without walking the model."""
    found = adapter_slot(model, name)
    return None if found is None else _described(found[0], found[2], norms)


def _described_all(model: nn.Module, norms: bool) -> dict[str, nn.Module]:
    return {n: m for n, mod, kind in adapter_slots(model) if (m := _described(mod, kind, norms)) is not None}


def _described(mod: nn.Module, kind: str, norms: bool) -> nn.Module | None:
    """The module a description lists for adapter slot `mod` (lora.inject.adapter_slot): its base, when it is of
    the kind asked for (a norm layer only with a weight: the description carries the weight's shape)."""
    base = mod.base if isinstance(mod, LoRALayer) else mod
    if norms:
        return base if kind == "norm" and base.weight is not None else None
    return base if kind == "lora" else None


@functools.lru_cache(maxsize=8)
def _meta_unet_modules(key: str, norms: bool = False) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**STANDARD_UNET_CONFIGS[key])
    mods = norm_modules(unet) if norms else adaptable_modules(unet)
    return tuple((n, type(m).__name__, tuple(m.weight.shape)) for n, m in mods.items())


def standard_unet_modules(layout: str, norms: bool = False) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Module name -> (class name, weight shape) of a standard full-size UNet (built on the meta device): its
    adaptable modules, or with `norms` its LayerNorm / GroupNorm modules."""
    return {n: (k, s) for n, k, s in _meta_unet_modules(layout, norms)}


# ---- kohya keys ------------------------------------------------------------------------------------------------

def kohya_key(prefix: str, name: str) -> str:
    """`lora_unet` + `down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    return f"{prefix}_{name.replace('.', '_')}"


def kohya_lookup(prefix: str, names: Iterable[str]) -> dict[str, str]:
    """kohya key -> name, for a set of known names (the only safe inverse of `kohya_key`)."""
    table: dict[str, str] = {}
    for n in names:
        k = kohya_key(prefix, n)
        if k in table and table[k] != n:
            raise ValueError(f"kohya key {k!r} is ambiguous: {table[k]!r} and {n!r}")
        table[k] = n
    return table


CLIP_SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                 "mlp.fc2")


def clip_norm_names(num_layers: int) -> list[str]:
    """transformers-4 names of the LayerNorms of a CLIP text encoder with `num_layers` layers."""
    return [f"text_model.encoder.layers.{i}.layer_norm{j}" for i in range(num_layers) for j in (1, 2)] + [
        "text_model.final_layer_norm"]


def clip_file_names(num_layers: int) -> list[str]:
    """transformers-4 names of the Linear layers kohya adapts in a CLIP text encoder with `num_layers` layers."""
    return [f"text_model.encoder.layers.{i}.{s}" for i in range(num_layers) for s in CLIP_SUFFIXES]
