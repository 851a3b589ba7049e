"""Named target presets: which modules of UNets, CLIP text encoders and ViTs get LoRA.

Patterns cover both transformers 4.x and 5.x module names (5.x flattened CLIPTextModel and renamed HF ViT).

| preset              | model                      | modules                                                         |
|---------------------|----------------------------|-----------------------------------------------------------------|
| unet-cross-attn     | diffusers UNet2DCondition  | attn2.{to_q,to_k,to_v,to_out.0}                                 |
| unet-attn           | diffusers UNet2DCondition  | attn1 and attn2 {to_q,to_k,to_v,to_out.0}                       |
| unet-attn-ff        | diffusers UNet2DCondition  | every Linear/Conv2d of the transformer blocks (kohya's default): |
|                     |                            | attn1, attn2, ff.net.0.proj, ff.net.2, proj_in, proj_out        |
| unet-locon          | diffusers UNet2DCondition  | unet-attn-ff + ResNet conv1/conv2/time_emb_proj/conv_shortcut   |
|                     |                            | + down/upsampler convs (kohya LoCon)                            |
| clip-attn           | CLIPTextModel(+Projection) | self_attn.{q,k,v,out}_proj                                      |
| clip-attn-mlp       | CLIPTextModel(+Projection) | clip-attn + mlp.fc1, mlp.fc2                                    |
| hf-vit-attn         | transformers ViT           | q/k/v/o (v5) or attention.attention.{query,key,value},          |
|                     |                            | attention.output.dense (v4)                                     |
| hf-vit-attn-mlp     | transformers ViT           | hf-vit-attn + mlp.fc1/fc2 (v5) or intermediate/output.dense (v4) |
| tv-vit-attn         | torchvision ViT            | self_attention (nn.MultiheadAttention: q, k, v, o)              |
| tv-vit-attn-mlp     | torchvision ViT            | tv-vit-attn + mlp.0, mlp.3                                      |
| timm-vit-attn       | timm VisionTransformer     | attn.qkv (split into q, k, v) and attn.proj                     |
| timm-vit-attn-mlp   | timm VisionTransformer     | timm-vit-attn + mlp.fc1, mlp.fc2                                |
| t5-attn / -attn-mlp | transformers T5EncoderModel | SelfAttention.{q,k,v,o} (+ DenseReluDense.wi_0, wi_1, wo)      |
| qwen-attn / -attn-mlp | Qwen3 / Qwen2.5-VL text  | language layers self_attn.{q,k,v,o}_proj (+ mlp gate/up/down)   |

DiT transformers (diffusers module names; `<family>-attn` is the default, `-attn-ff` adds the feed-forwards, `-all`
also the modulation layers), family in DIT_PRESET_FAMILIES:

| family     | attn                                                                  | ff                          | modulation (-all) |
|------------|-----------------------------------------------------------------------|-----------------------------|-------------------|
| flux       | double: attn.{to_q,to_k,to_v,to_out.0,add_q/k/v_proj,to_add_out}; single: attn.{to_q,to_k,to_v}, proj_out | ff/ff_context.net.{0.proj,2}, single proj_mlp | norm1(_context).linear, single norm.linear |
| flux2      | double as flux; single: attn.to_qkv_mlp_proj, attn.to_out             | ff/ff_context.linear_in/out | *_modulation*.linear (shared) |
| sd3        | double as flux (no single blocks) + attn2.{to_q,to_k,to_v,to_out.0}   | ff/ff_context.net.{0.proj,2}| norm1(_context).linear |
| qwen-image | double as flux                                                        | img_mlp/txt_mlp.net.{0.proj,2} | img_mod.1, txt_mod.1 |
| z-image    | layers, noise_refiner, context_refiner: attention.{to_q,to_k,to_v,to_out.0} | feed_forward.w1/w2/w3 | adaLN_modulation.0 |
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from .lora.config import TargetError
from .lora.inject import use_named_targets

_QKVO = r"(to_q|to_k|to_v|to_out\.0)"
_UNET_ATTN_FF = (
    rf"re:.*transformer_blocks\.\d+\.(attn[12]\.{_QKVO}|ff\.net\.(0\.proj|2))",
    r"re:.*attentions\.\d+\.(proj_in|proj_out)",
)
_UNET_CONV = (
    r"re:.*resnets\.\d+\.(conv1|conv2|time_emb_proj|conv_shortcut)",
    r"re:.*(downsamplers|upsamplers)\.0\.conv",
)
_CLIP_ATTN = (r"re:(.*\.)?encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",)
_CLIP_MLP = (r"re:(.*\.)?encoder\.layers\.\d+\.mlp\.(fc1|fc2)",)
_HF_VIT_ATTN = (
    r"re:(.*\.)?layers\.\d+\.attention\.(q_proj|k_proj|v_proj|o_proj)",  # transformers 5
    r"re:(.*\.)?layer\.\d+\.attention\.(attention\.(query|key|value)|output\.dense)",  # transformers 4
)
_HF_VIT_MLP = (
    r"re:(.*\.)?layers\.\d+\.mlp\.(fc1|fc2)",  # transformers 5
    r"re:(.*\.)?layer\.\d+\.(intermediate\.dense|output\.dense)",  # transformers 4
)
_TV_ATTN = (r"re:encoder\.layers\.encoder_layer_\d+\.self_attention",)
_TV_MLP = (r"re:encoder\.layers\.encoder_layer_\d+\.mlp\.(0|3)",)
_TIMM_ATTN = (r"re:blocks\.\d+\.attn\.(qkv|proj)",)
_TIMM_MLP = (r"re:blocks\.\d+\.mlp\.(fc1|fc2)",)
_T5_ATTN = (r"re:(.*\.)?block\.\d+\.layer\.0\.SelfAttention\.(q|k|v|o)",)
_T5_MLP = (r"re:(.*\.)?block\.\d+\.layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)",)
# Qwen3 (Z-Image, Flux.2-klein) and the language model of Qwen2.5-VL (Qwen-Image); its vision tower (`visual.`)
# is not matched.
_QWEN_ATTN = (r"re:(model\.)?(language_model\.)?layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",)
_QWEN_MLP = (r"re:(model\.)?(language_model\.)?layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)",)

# DiT transformers: the double-stream attention (image stream to_*, text stream add_*_proj / to_add_out).
_DOUBLE = r"re:transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_DIT_PARTS: dict[str, dict[str, tuple[str, ...]]] = {
    "flux": {
        "attn": (_DOUBLE, r"re:single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_out)"),
        "ff": (r"re:transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)",
               r"re:single_transformer_blocks\.\d+\.proj_mlp"),
        "mod": (r"re:transformer_blocks\.\d+\.(norm1|norm1_context)\.linear",
                r"re:single_transformer_blocks\.\d+\.norm\.linear"),
    },
    "flux2": {
        "attn": (_DOUBLE, r"re:single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"),
        "ff": (r"re:transformer_blocks\.\d+\.(ff|ff_context)\.(linear_in|linear_out)",),
        "mod": (r"re:(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear",),
    },
    "sd3": {
        "attn": (_DOUBLE, r"re:transformer_blocks\.\d+\.attn2\.(to_q|to_k|to_v|to_out\.0)"),
        "ff": (r"re:transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)",),
        "mod": (r"re:transformer_blocks\.\d+\.(norm1|norm1_context)\.linear",),
    },
    "qwen-image": {
        "attn": (_DOUBLE,),
        "ff": (r"re:transformer_blocks\.\d+\.(img_mlp|txt_mlp)\.net\.(0\.proj|2)",),
        "mod": (r"re:transformer_blocks\.\d+\.(img_mod|txt_mod)\.1",),
    },
    "z-image": {
        "attn": (r"re:(layers|noise_refiner|context_refiner)\.\d+\.attention\.(to_q|to_k|to_v|to_out\.0)",),
        "ff": (r"re:(layers|noise_refiner|context_refiner)\.\d+\.feed_forward\.(w1|w2|w3)",),
        "mod": (r"re:(layers|noise_refiner)\.\d+\.adaLN_modulation\.0",),
    },
}
# Preset family -> the diffusers transformer class it is for.
DIT_PRESET_FAMILIES: dict[str, str] = {"flux": "FluxTransformer2DModel", "flux2": "Flux2Transformer2DModel",
                                       "sd3": "SD3Transformer2DModel", "qwen-image": "QwenImageTransformer2DModel",
                                       "z-image": "ZImageTransformer2DModel"}


def _cls(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__name__}"


def _is_unet(m: nn.Module) -> bool:
    return type(m).__name__ == "UNet2DConditionModel"


def _is_clip_text(m: nn.Module) -> bool:
    return type(m).__name__ in ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTextTransformer")


def _is_hf_vit(m: nn.Module) -> bool:
    return _cls(m).startswith("transformers.") and "ViT" in type(m).__name__


def _is_tv_vit(m: nn.Module) -> bool:
    return _cls(m) == "torchvision.models.vision_transformer.VisionTransformer"


def _is_timm_vit(m: nn.Module) -> bool:
    return _cls(m).startswith("timm.") and type(m).__name__ == "VisionTransformer"


def _is_t5(m: nn.Module) -> bool:
    return type(m).__name__ in ("T5EncoderModel", "UMT5EncoderModel")


def _is_qwen_text(m: nn.Module) -> bool:
    return type(m).__name__ in ("Qwen3Model", "Qwen3ForCausalLM", "Qwen2_5_VLForConditionalGeneration",
                                "Qwen2_5_VLModel", "Qwen2_5_VLTextModel")


def _is_class(name: str) -> Callable[[nn.Module], bool]:
    return lambda m: type(m).__name__ == name


def _dit_presets() -> list[Preset]:
    """<family>-attn, <family>-attn-ff and <family>-all for each DiT family."""
    out = []
    for fam, parts in _DIT_PARTS.items():
        cls = DIT_PRESET_FAMILIES[fam]
        out += [Preset(f"{fam}-attn", f"diffusers {cls}", parts["attn"], _is_class(cls)),
                Preset(f"{fam}-attn-ff", f"diffusers {cls}", parts["attn"] + parts["ff"], _is_class(cls)),
                Preset(f"{fam}-all", f"diffusers {cls}", parts["attn"] + parts["ff"] + parts["mod"], _is_class(cls))]
    return out


@dataclass(frozen=True)
class Preset:
    """A named set of target patterns and the kind of model it is meant for."""

    name: str
    model_kind: str
    patterns: tuple[str, ...]
    fits: Callable[[nn.Module], bool]


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("unet-cross-attn", "diffusers UNet2DConditionModel", (rf"re:.*attn2\.{_QKVO}",), _is_unet),
    Preset("unet-attn", "diffusers UNet2DConditionModel", (rf"re:.*attn[12]\.{_QKVO}",), _is_unet),
    Preset("unet-attn-ff", "diffusers UNet2DConditionModel", _UNET_ATTN_FF, _is_unet),
    Preset("unet-locon", "diffusers UNet2DConditionModel", _UNET_ATTN_FF + _UNET_CONV, _is_unet),
    Preset("clip-attn", "CLIPTextModel / CLIPTextModelWithProjection", _CLIP_ATTN, _is_clip_text),
    Preset("clip-attn-mlp", "CLIPTextModel / CLIPTextModelWithProjection", _CLIP_ATTN + _CLIP_MLP, _is_clip_text),
    Preset("hf-vit-attn", "transformers ViT", _HF_VIT_ATTN, _is_hf_vit),
    Preset("hf-vit-attn-mlp", "transformers ViT", _HF_VIT_ATTN + _HF_VIT_MLP, _is_hf_vit),
    Preset("tv-vit-attn", "torchvision VisionTransformer", _TV_ATTN, _is_tv_vit),
    Preset("tv-vit-attn-mlp", "torchvision VisionTransformer", _TV_ATTN + _TV_MLP, _is_tv_vit),
    Preset("timm-vit-attn", "timm VisionTransformer", _TIMM_ATTN, _is_timm_vit),
    Preset("timm-vit-attn-mlp", "timm VisionTransformer", _TIMM_ATTN + _TIMM_MLP, _is_timm_vit),
    Preset("t5-attn", "T5EncoderModel", _T5_ATTN, _is_t5),
    Preset("t5-attn-mlp", "T5EncoderModel", _T5_ATTN + _T5_MLP, _is_t5),
    Preset("qwen-attn", "Qwen3 / Qwen2.5-VL text encoder", _QWEN_ATTN, _is_qwen_text),
    Preset("qwen-attn-mlp", "Qwen3 / Qwen2.5-VL text encoder", _QWEN_ATTN + _QWEN_MLP, _is_qwen_text),
    *_dit_presets(),
)}


def resolve_preset(name: str, model: nn.Module | None = None) -> tuple[str, ...]:
    """The patterns of preset `name`; with `model`, checks that the preset is meant for that kind of model."""
    preset = PRESETS.get(name)
    if preset is None:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise TargetError(f"unknown target preset {name!r}{hint}; presets: {', '.join(PRESETS)}")
    if model is not None and not preset.fits(model):
        raise TargetError(f"preset {name!r} is for a {preset.model_kind}, but the model is a {_cls(model)}; "
                          f"choose a preset for this model or give explicit target patterns")
    return preset.patterns


# The last part of the name of every Linear/Conv2d in diffusers' UNet2DConditionModel (SD 1.x, 2.x, SDXL) and in
# CLIP text encoders ("to_out.0" and "net.2" keep their index). A one-word target that is none of these, and no
# preset, can match nothing; tests/test_presets.py checks the lists against the tiny UNets and text encoders.
UNET_LAYER_NAMES: frozenset[str] = frozenset({
    "conv", "conv1", "conv2", "conv_in", "conv_out", "conv_shortcut", "linear_1", "linear_2", "net.2", "proj",
    "proj_in", "proj_out", "time_emb_proj", "to_k", "to_out.0", "to_q", "to_v"})
CLIP_LAYER_NAMES: frozenset[str] = frozenset({"fc1", "fc2", "k_proj", "out_proj", "q_proj", "text_projection",
                                              "v_proj"})


def target_problems(what: str, targets: Sequence[str], presets: Sequence[str],
                    layer_names: frozenset[str] | None = None) -> list[str]:
    """What can be said about target patterns before any model is loaded, one line per problem.

    `presets` are the preset names meant for this kind of model. A word with a dash must be one of them (and
    alone); with `layer_names`, a plain dotted pattern must end in one of those names. `re:` patterns are
    left to inject_lora, which checks them against the real model.
    """
    out: list[str] = []
    for pat in targets:
        if not pat or pat.startswith("re:"):
            continue
        if pat in PRESETS or ("-" in pat and "." not in pat):
            if pat not in presets:
                close = difflib.get_close_matches(pat, list(presets), n=1)
                kind = f"is a preset for a {PRESETS[pat].model_kind}" if pat in PRESETS else "is not a known preset"
                out.append(f"{what}: {pat!r} {kind}" + (f" (did you mean {close[0]!r}?)" if close else "")
                           + f"; expected one of {', '.join(presets)} or module-name patterns")
            elif len(targets) > 1:
                out.append(f"{what}: the preset {pat!r} must be given alone, not with other targets {list(targets)}")
            continue
        if layer_names is None:
            continue
        parts = pat.split(".")
        tail = ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]
        if tail not in layer_names:
            close = difflib.get_close_matches(tail, sorted(layer_names), n=1)
            kind = PRESETS[presets[0]].model_kind if presets else "this kind of model"
            out.append(f"{what}: {pat!r} names no Linear/Conv2d layer of a {kind}"
                       + (f" (did you mean {close[0]!r}?)" if close else "")
                       + f"; expected a preset ({', '.join(presets)}), a name ending in one of "
                       f"{', '.join(sorted(layer_names))}, or a 're:' regex")
    return out


use_named_targets(resolve_preset)  # LoRAConfig(targets="unet-attn") resolves through this table


def default_preset(model: nn.Module) -> str:
    """A sensible default preset for `model` (attention of UNets, DiT transformers, CLIP, T5, Qwen and ViTs)."""
    for fam, cls in DIT_PRESET_FAMILIES.items():
        if type(model).__name__ == cls:
            return f"{fam}-attn"
    for test, name in ((_is_unet, "unet-attn"), (_is_clip_text, "clip-attn"), (_is_hf_vit, "hf-vit-attn"),
                       (_is_tv_vit, "tv-vit-attn"), (_is_timm_vit, "timm-vit-attn"), (_is_t5, "t5-attn"),
                       (_is_qwen_text, "qwen-attn")):
        if test(model):
            return name
    raise ValueError(f"no default preset for {_cls(model)}; give explicit target patterns")
