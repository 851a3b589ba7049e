"""The name tables of the transformer (DiT) families: Flux.1, Flux.2, SD 3.x, Qwen-Image and Z-Image.

Canonical names are the live module paths of diffusers' FluxTransformer2DModel, Flux2Transformer2DModel,
SD3Transformer2DModel, QwenImageTransformer2DModel and ZImageTransformer2DModel, component "transformer".

Files in the wild spell a module in one of two name spaces, each behind one of several prefixes:

- native names, those of the original checkpoints that ComfyUI, Forge and kohya sd-scripts / musubi-tuner use
  (BFL `double_blocks.N.img_attn.qkv`, MMDiT `joint_blocks.N.x_block.attn.qkv`, NextDiT `layers.N.attention.qkv`;
  Qwen-Image's native names are diffusers' own), where q, k and v (Flux.1 single blocks: q, k, v and the MLP input)
  are one fused Linear;
- diffusers names, the canonical ones;
- plus two trainer-specific spellings of Flux.1: XLabs (`double_blocks.N.processor.qkv_lora1.down.weight`) and
  DiffSynth-Studio (`blocks.N.attn.a_to_qkv`).

Prefixes: `lora_unet_` (kohya / musubi, underscores), `lora_transformer_` (OneTrainer, underscores), `lycoris_`
(SimpleTuner / LyCORIS, underscores), `diffusion_model.` (ComfyUI, ai-toolkit), `transformer.` (diffusers, PEFT
via diffusers, ai-toolkit), `base_model.model.` (PEFT), or none (BFL, DiffSynth, XLabs).

The tables below are data: block rows (native suffix -> live suffixes) per family, read both ways: by
formats/dit_detect.py (file names -> live modules) and formats/dit_export.py (live modules -> native names).
"""

from __future__ import annotations

from dataclasses import dataclass

COMPONENT = "transformer"


@dataclass(frozen=True)
class Row:
    """One native module and the live module(s) it holds; `swap`: its output is (shift, scale) natively and
    (scale, shift) in diffusers (AdaLayerNormContinuous), so lora_up's two halves trade places."""

    native: str
    live: tuple[str, ...]
    swap: bool = False


@dataclass(frozen=True)
class Group:
    """Numbered blocks: native prefix, live prefix, rows (suffixes after `<prefix>.<index>.`)."""

    native: str
    live: str
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class Family:
    """One DiT family: its block groups, its top-level rows and the live modules that identify a model of it."""

    name: str
    label: str
    groups: tuple[Group, ...]
    top: tuple[Row, ...]
    markers: tuple[str, ...]  # live module names only this family has (in the first block)
    architecture: str  # modelspec.architecture we write
    base_version: str  # ss_base_model_version we write


def _rows(*spec: tuple) -> tuple[Row, ...]:
    return tuple(Row(n, tuple(live.split()), *rest) for n, live, *rest in spec)


QKV = "attn.to_q attn.to_k attn.to_v"
ADD_QKV = "attn.add_q_proj attn.add_k_proj attn.add_v_proj"

FLUX1 = Family(
    "flux1", "Flux.1",
    groups=(
        Group("double_blocks", "transformer_blocks", _rows(
            ("img_attn.qkv", QKV), ("img_attn.proj", "attn.to_out.0"),
            ("img_mlp.0", "ff.net.0.proj"), ("img_mlp.2", "ff.net.2"), ("img_mod.lin", "norm1.linear"),
            ("txt_attn.qkv", ADD_QKV), ("txt_attn.proj", "attn.to_add_out"),
            ("txt_mlp.0", "ff_context.net.0.proj"), ("txt_mlp.2", "ff_context.net.2"),
            ("txt_mod.lin", "norm1_context.linear"))),
        Group("single_blocks", "single_transformer_blocks", _rows(
            ("linear1", QKV + " proj_mlp"), ("linear2", "proj_out"), ("modulation.lin", "norm.linear"))),
    ),
    top=_rows(("img_in", "x_embedder"), ("txt_in", "context_embedder"),
              ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
              ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
              ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
              ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
              ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
              ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
              ("final_layer.linear", "proj_out"), ("final_layer.adaLN_modulation.1", "norm_out.linear", True)),
    markers=("single_transformer_blocks.0.proj_mlp",),
    architecture="flux-1-dev/lora", base_version="flux1")

FLUX2 = Family(
    "flux2", "Flux.2",
    groups=(
        Group("double_blocks", "transformer_blocks", _rows(
            ("img_attn.qkv", QKV), ("img_attn.proj", "attn.to_out.0"),
            ("img_mlp.0", "ff.linear_in"), ("img_mlp.2", "ff.linear_out"),
            ("txt_attn.qkv", ADD_QKV), ("txt_attn.proj", "attn.to_add_out"),
            ("txt_mlp.0", "ff_context.linear_in"), ("txt_mlp.2", "ff_context.linear_out"))),
        Group("single_blocks", "single_transformer_blocks", _rows(
            ("linear1", "attn.to_qkv_mlp_proj"), ("linear2", "attn.to_out"))),
    ),
    top=_rows(("img_in", "x_embedder"), ("txt_in", "context_embedder"),
              ("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
              ("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
              ("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
              ("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
              ("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
              ("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
              ("single_stream_modulation.lin", "single_stream_modulation.linear"),
              ("final_layer.linear", "proj_out"), ("final_layer.adaLN_modulation.1", "norm_out.linear", True)),
    markers=("single_transformer_blocks.0.attn.to_qkv_mlp_proj",),
    architecture="flux-2/lora", base_version="flux2")

SD3 = Family(
    "sd3", "SD 3.x",
    groups=(
        Group("joint_blocks", "transformer_blocks", _rows(
            ("x_block.attn.qkv", QKV), ("x_block.attn.proj", "attn.to_out.0"),
            ("x_block.attn2.qkv", "attn2.to_q attn2.to_k attn2.to_v"), ("x_block.attn2.proj", "attn2.to_out.0"),
            ("x_block.mlp.fc1", "ff.net.0.proj"), ("x_block.mlp.fc2", "ff.net.2"),
            ("x_block.adaLN_modulation.1", "norm1.linear"),
            ("context_block.attn.qkv", ADD_QKV), ("context_block.attn.proj", "attn.to_add_out"),
            ("context_block.mlp.fc1", "ff_context.net.0.proj"), ("context_block.mlp.fc2", "ff_context.net.2"),
            # The last block's context modulation is (shift, scale) -> AdaLayerNormContinuous: swapped there only
            # (applied when the layer has exactly two chunks, see _swaps).
            ("context_block.adaLN_modulation.1", "norm1_context.linear", True))),
    ),
    top=_rows(("x_embedder.proj", "pos_embed.proj"), ("context_embedder", "context_embedder"),
              ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
              ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
              ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
              ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
              ("final_layer.linear", "proj_out"), ("final_layer.adaLN_modulation.1", "norm_out.linear", True)),
    markers=("pos_embed.proj",),
    architecture="stable-diffusion-v3/lora", base_version="sd3")

_QWEN_BLOCK = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "img_mod.1", "txt_mod.1", "img_mlp.net.0.proj",
               "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
QWEN = Family(
    "qwen-image", "Qwen-Image",
    groups=(Group("transformer_blocks", "transformer_blocks", tuple(Row(n, (n,)) for n in _QWEN_BLOCK)),),
    top=tuple(Row(n, (n,)) for n in ("img_in", "txt_in", "proj_out", "norm_out.linear",
                                     "time_text_embed.timestep_embedder.linear_1",
                                     "time_text_embed.timestep_embedder.linear_2")),
    markers=("transformer_blocks.0.img_mlp.net.0.proj",),
    architecture="qwen-image/lora", base_version="qwen_image")

_ZIMAGE_BLOCK = _rows(("attention.qkv", "attention.to_q attention.to_k attention.to_v"),
                      ("attention.out", "attention.to_out.0"), ("feed_forward.w1", "feed_forward.w1"),
                      ("feed_forward.w2", "feed_forward.w2"), ("feed_forward.w3", "feed_forward.w3"),
                      ("adaLN_modulation.0", "adaLN_modulation.0"))
ZIMAGE = Family(
    "z-image", "Z-Image",
    groups=tuple(Group(g, g, _ZIMAGE_BLOCK) for g in ("layers", "noise_refiner", "context_refiner")),
    top=_rows(("x_embedder", "all_x_embedder.2-1"), ("final_layer.linear", "all_final_layer.2-1.linear"),
              ("final_layer.adaLN_modulation.1", "all_final_layer.2-1.adaLN_modulation.1"),
              ("cap_embedder.1", "cap_embedder.1"), ("t_embedder.mlp.0", "t_embedder.mlp.0"),
              ("t_embedder.mlp.2", "t_embedder.mlp.2")),
    markers=("layers.0.attention.to_q", "noise_refiner.0.attention.to_q"),
    architecture="z-image/lora", base_version="z_image")

FAMILIES: dict[str, Family] = {f.name: f for f in (FLUX1, FLUX2, SD3, QWEN, ZIMAGE)}

# Trainer-specific Flux.1 spellings (read only).
XLABS = (  # double_blocks.N.processor.<name>.down/up.weight, single_blocks.N.processor.<name>...
    Group("double_blocks", "transformer_blocks", _rows(
        ("processor.qkv_lora1", QKV), ("processor.qkv_lora2", ADD_QKV), ("processor.proj_lora1", "attn.to_out.0"),
        ("processor.proj_lora2", "attn.to_add_out"))),
    Group("single_blocks", "single_transformer_blocks", _rows(
        ("processor.qkv_lora", QKV), ("processor.proj_lora", "proj_out"))),
)
DIFFSYNTH = (  # DiffSynth-Studio's own Flux.1 DiT module names
    Group("blocks", "transformer_blocks", _rows(
        ("attn.a_to_qkv", QKV), ("attn.b_to_qkv", ADD_QKV), ("attn.a_to_out", "attn.to_out.0"),
        ("attn.b_to_out", "attn.to_add_out"), ("ff_a.0", "ff.net.0.proj"), ("ff_a.2", "ff.net.2"),
        ("ff_b.0", "ff_context.net.0.proj"), ("ff_b.2", "ff_context.net.2"), ("norm1_a.linear", "norm1.linear"),
        ("norm1_b.linear", "norm1_context.linear"))),
    Group("single_blocks", "single_transformer_blocks", _rows(
        ("to_qkv_mlp", QKV + " proj_mlp"), ("proj_out", "proj_out"), ("norm.linear", "norm.linear"))),
)
EXTRA_DIALECTS = {"flux1": (("xlabs", XLABS), ("diffsynth", DIFFSYNTH))}

# Prefix -> (dialect label, separator). Longest first when stripping.
PREFIXES = {
    "lora_unet_": ("kohya", "_"), "lora_transformer_": ("onetrainer", "_"), "lycoris_": ("lycoris", "_"),
    "model.diffusion_model.": ("comfyui", "."), "diffusion_model.": ("comfyui", "."),
    "base_model.model.": ("peft", "."), "transformer.": ("diffusers", "."), "": ("bare", "."),
}

# Text encoders besides CLIP, per family: ComfyUI's encoder name (`text_encoders.<name>.transformer.<hf name>`),
# kohya's prefix (`lora_te[N]_`; LyCORIS' `lycoris_te_`) and, for the pipelines without CLIP, diffusers' component
# prefix (`text_encoder.`) -> the pipeline component. CLIP (clip_l / clip_g, lora_te1_ next to a T5) is read by the
# SD importers.
# Encoders of the pinned diffusers pipelines: QwenImagePipeline Qwen2_5_VLForConditionalGeneration (ComfyUI
# qwen25_7b); Flux2Pipeline Mistral3ForConditionalGeneration (mistral3_24b), Flux2KleinPipeline Qwen3ForCausalLM
# (qwen3_4b for klein 4B, qwen3_8b for 9B); ZImagePipeline Qwen3 (qwen3_4b). Module names in any of their
# transformers spellings (naming.llm_aliases).
_LLM_ONLY = {"lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lycoris_te_": "text_encoder",
             "text_encoder.": "text_encoder"}
TEXT_ENCODERS = {
    "flux1": {"t5xxl": "text_encoder_2", "lora_te2_": "text_encoder_2"},
    "sd3": {"t5xxl": "text_encoder_3", "lora_te3_": "text_encoder_3"},
    "qwen-image": {"qwen25_7b": "text_encoder", **_LLM_ONLY},
    "flux2": {"mistral3_24b": "text_encoder", "qwen3_4b": "text_encoder", "qwen3_8b": "text_encoder", **_LLM_ONLY},
    "z-image": {"qwen3_4b": "text_encoder", **_LLM_ONLY},
}

# Flux.2-klein's Qwen3 encoders in ComfyUI by their hidden width (Flux.2-dev's Mistral 3 is told by its module names).
FLUX2_QWEN3 = {2560: "qwen3_4b", 4096: "qwen3_8b"}

# Flux.2 widths (hidden size = heads x 128) -> released model, for messages.
FLUX2_SIZES = {3072: "Flux.2-klein 4B", 4096: "Flux.2-klein 9B", 6144: "Flux.2-dev"}

# Flux.1 control LoRAs (BFL's FLUX.1-Canny-dev-lora and FLUX.1-Depth-dev-lora, and files trained the same way with
# diffusers): their img_in (x_embedder) takes the packed image latents and the control latents side by side, twice
# the model's input channels; their Linear layers carry lora_B biases; and they set the q/k RMSNorm scales in full.
# The rows map the full tensors' native names to the live parameters (diffusers names are the live ones).
CONTROL_INPUT = "x_embedder"  # the live module a control LoRA widens
CONTROL_CONFIG = "in_channels"  # the transformer config entry that follows its input width
FLUX1_IN_CHANNELS = 64  # Flux.1's packed latents (16 channels x 2 x 2); a control LoRA's img_in takes twice that
FLUX1_NORMS = (
    Group("double_blocks", "transformer_blocks", _rows(
        ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
        ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
        ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
        ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"))),
    Group("single_blocks", "single_transformer_blocks", _rows(
        ("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight"))),
)
CONTROL_PIPELINES = ("FluxControlPipeline", "FluxControlImg2ImgPipeline", "FluxControlInpaintPipeline")
"""The diffusers pipelines that feed a Flux.1 transformer image and control latents side by side."""
