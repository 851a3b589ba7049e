"""Tiny random-weight DiT (flow-matching transformer) pipelines: Flux.1, Flux.2-klein, SD 3.5, Qwen-Image, Z-Image.

Each transformer is the real diffusers class with its real block layout (double-stream `transformer_blocks`,
single-stream `single_transformer_blocks`, refiners, dual attention, ...) at tiny width and with one or two blocks
per list, so module names, and therefore LoRA key names, have the shape of the real checkpoints. The text encoders
are the classes the real pipelines use, at tiny size:

| name            | pipeline                 | transformer                  | text encoders                                         |
|-----------------|--------------------------|------------------------------|-------------------------------------------------------|
| tiny-flux       | FluxPipeline             | FluxTransformer2DModel       | CLIPTextModel (text_encoder), T5EncoderModel (text_encoder_2) |
| tiny-flux2      | Flux2KleinPipeline       | Flux2Transformer2DModel      | Qwen3ForCausalLM (text_encoder)                       |
| tiny-sd3        | StableDiffusion3Pipeline | SD3Transformer2DModel (3.5 medium layout: qk norm, dual attention in block 0) | CLIPTextModelWithProjection x2, T5EncoderModel |
| tiny-qwen-image | QwenImagePipeline        | QwenImageTransformer2DModel  | Qwen2_5_VLForConditionalGeneration (text_encoder)     |
| tiny-z-image    | ZImagePipeline           | ZImageTransformer2DModel     | Qwen3Model (text_encoder)                             |

All of them generate at TINY_RESOLUTION (64 px, 8x8 latents) with FlowMatchEulerDiscreteScheduler, a few steps on
a CPU in seconds. Tokenizers are real transformers classes built offline from a small vocabulary (CLIP: the byte
BPE of models.tiny; T5: a unigram vocabulary; Qwen: byte-level BPE with Qwen's special tokens and chat template).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .tiny import _TOKENIZER_WORDS, TINY_RESOLUTION, _bytes_to_unicode, _seeded, _text_config, build_tiny_tokenizer
from ..formats.naming import dit_family

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# Tiny name -> family (lora_vision.formats.naming.dit_family names).
DIT_KINDS: dict[str, str] = {"tiny-flux": "flux1", "tiny-flux2": "flux2", "tiny-sd3": "sd3",
                             "tiny-qwen-image": "qwen-image", "tiny-z-image": "z-image"}

_LATENT_CHANNELS = 4
_T5_DIM = 64  # SD3 pads/cuts the two CLIP embeddings (32 + 32) to the T5 width: make them equal, as in SD 3.5
_QWEN_HIDDEN = 16
# Flux.2-klein stacks hidden states 9, 18 and 27 of its Qwen3 encoder (the pipeline's default), so the tiny
# encoder keeps 27 layers (at width 16 that is still a few thousand parameters per layer).
_KLEIN_TEXT_LAYERS = 27
_KLEIN_OUT_LAYERS = 3
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<think>", "</think>")
# Qwen's chat template, reduced to what the pipelines use (user message, generation prompt, thinking switch).
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def _qwen_tokenizer() -> Any:
    """A real Qwen2Tokenizer: byte-level BPE over the bytes, whole-word merges for the tiny words, Qwen specials."""
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(_bytes_to_unicode())}
    merges: list[tuple[str, str]] = []
    space = "\u0120"  # "Ġ": byte-level BPE's stand-in for a space
    for word in _TOKENIZER_WORDS:
        for text in (word, space + word):
            left = text[0]
            for ch in text[1:]:
                if (left, ch) not in merges:
                    merges.append((left, ch))
                vocab.setdefault(left + ch, len(vocab))
                left += ch
    for tok in _QWEN_SPECIALS:
        vocab[tok] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None,
                         additional_special_tokens=list(_QWEN_SPECIALS[1:]))
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    tok.model_max_length = 1024
    return tok


def _t5_tokenizer() -> Any:
    """A real T5Tokenizer (unigram) over the tiny words and single characters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in _TOKENIZER_WORDS]
    pieces += [(c, -5.0) for c in "\u2581abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _t5(tokenizer: Any, d_model: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, is_encoder_decoder=False,
                                   feed_forward_proj="gated-gelu", pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0))


def _qwen3_config(tokenizer: Any, layers: int) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=len(tokenizer), hidden_size=_QWEN_HIDDEN, intermediate_size=24,
                       num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                       max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)


def _vae_kl(scaling: float, shift: float | None) -> Any:
    """A four-level AutoencoderKL (8x like the real ones) with _LATENT_CHANNELS latent channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=_LATENT_CHANNELS,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                         sample_size=TINY_RESOLUTION, scaling_factor=scaling, shift_factor=shift,
                         use_quant_conv=False, use_post_quant_conv=False)


def _build_flux(seed: int) -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer, tokenizer_2 = build_tiny_tokenizer(), _t5_tokenizer()
    with _seeded(seed):
        # Flux.1 dev layout (guidance embedding); schnell differs only by guidance_embeds=False.
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * _LATENT_CHANNELS, num_layers=2,
                                             num_single_layers=2, attention_head_dim=8, num_attention_heads=4,
                                             joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                                             axes_dims_rope=(2, 2, 4))
        text_encoder = CLIPTextModel(_text_config(tokenizer, "quick_gelu"))
        text_encoder_2 = _t5(tokenizer_2, 32)
        vae = _vae_kl(0.3611, 0.1159)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True,
                                                                  base_shift=0.5, max_shift=1.15),
                        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)


def _build_flux2(seed: int) -> DiffusionPipeline:
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, \
        Flux2Transformer2DModel
    from transformers import Qwen3ForCausalLM

    tokenizer = _qwen_tokenizer()
    with _seeded(seed):
        # Flux.2-klein layout: no guidance embedding, text = three stacked Qwen3 hidden states.
        transformer = Flux2Transformer2DModel(patch_size=1, in_channels=4 * _LATENT_CHANNELS, num_layers=2,
                                              num_single_layers=2, attention_head_dim=8, num_attention_heads=4,
                                              joint_attention_dim=_KLEIN_OUT_LAYERS * _QWEN_HIDDEN,
                                              timestep_guidance_channels=32, axes_dims_rope=(2, 2, 2, 2),
                                              guidance_embeds=False)
        text_encoder = Qwen3ForCausalLM(_qwen3_config(tokenizer, _KLEIN_TEXT_LAYERS))
        vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32),
                                 layers_per_block=1, latent_channels=_LATENT_CHANNELS, norm_num_groups=8,
                                 sample_size=TINY_RESOLUTION, use_quant_conv=False, use_post_quant_conv=False)
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                              vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                              is_distilled=True)


def _build_sd3(seed: int) -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer, tokenizer_2, tokenizer_3 = build_tiny_tokenizer(), build_tiny_tokenizer(pad_token="!"), _t5_tokenizer()
    with _seeded(seed):
        # SD 3.5 medium layout: RMS qk-norm and a second (self-)attention `attn2` in the first blocks.
        transformer = SD3Transformer2DModel(sample_size=TINY_RESOLUTION // 8, patch_size=2,
                                            in_channels=_LATENT_CHANNELS, num_layers=2, attention_head_dim=8,
                                            num_attention_heads=4, joint_attention_dim=_T5_DIM,
                                            caption_projection_dim=32, pooled_projection_dim=64,
                                            out_channels=_LATENT_CHANNELS, pos_embed_max_size=16,
                                            dual_attention_layers=(0,), qk_norm="rms_norm")
        text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, "gelu"))
        text_encoder_3 = _t5(tokenizer_3, _T5_DIM)
        vae = _vae_kl(1.5305, 0.0609)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def _build_qwen_image(seed: int) -> DiffusionPipeline:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, \
        QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": _QWEN_HIDDEN, "intermediate_size": 24, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": len(tokenizer),
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "rope_theta": 1000000.0, "max_position_embeddings": 1024,
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": _QWEN_HIDDEN, "fullatt_block_indexes": [0]},
        hidden_size=_QWEN_HIDDEN, vocab_size=len(tokenizer), vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], vision_token_id=ids["<|vision_pad|>"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"])
    with _seeded(seed):
        transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=4 * _LATENT_CHANNELS,
                                                  out_channels=_LATENT_CHANNELS, num_layers=2, attention_head_dim=8,
                                                  num_attention_heads=4, joint_attention_dim=_QWEN_HIDDEN,
                                                  guidance_embeds=False, axes_dims_rope=(2, 2, 4))
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=_LATENT_CHANNELS, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=[0.0] * _LATENT_CHANNELS,
                                     latents_std=[1.0] * _LATENT_CHANNELS)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                             vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)


def _build_z_image(seed: int) -> DiffusionPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Model

    tokenizer = _qwen_tokenizer()
    with _seeded(seed):
        transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,),
                                               in_channels=_LATENT_CHANNELS, dim=32, n_layers=2, n_refiner_layers=1,
                                               n_heads=4, n_kv_heads=4, qk_norm=True, cap_feat_dim=_QWEN_HIDDEN,
                                               axes_dims=[2, 2, 4], axes_lens=[1024, 32, 32])
        with torch.no_grad():  # created with torch.empty: give them values
            transformer.x_pad_token.normal_(std=0.02)
            transformer.cap_pad_token.normal_(std=0.02)
        text_encoder = Qwen3Model(_qwen3_config(tokenizer, 2))
        vae = _vae_kl(0.3611, 0.1159)
    return ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)


_BUILDERS = {"tiny-flux": _build_flux, "tiny-flux2": _build_flux2, "tiny-sd3": _build_sd3,
             "tiny-qwen-image": _build_qwen_image, "tiny-z-image": _build_z_image}


def build_tiny_dit(name: str = "tiny-flux", seed: int = 0) -> DiffusionPipeline:
    """Build a random-weight tiny DiT pipeline by name (DIT_KINDS: tiny-flux, tiny-flux2, tiny-sd3,
    tiny-qwen-image, tiny-z-image), every model in eval mode.

    Generate at TINY_RESOLUTION with a short prompt budget, e.g.
    `pipe("a dog", height=64, width=64, num_inference_steps=2, max_sequence_length=32)`.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown tiny DiT pipeline {name!r}; expected one of {', '.join(_BUILDERS)}")
    pipe = _BUILDERS[name](seed)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    pipe.default_sample_size = TINY_RESOLUTION // pipe.vae_scale_factor  # what `generate` uses with no size given
    return pipe


def transformer_inputs(transformer: torch.nn.Module, batch: int = 1, image_tokens: tuple[int, int] = (4, 4),
                       text_tokens: int = 8, seed: int = 0, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> dict[str, Any]:
    """Random keyword arguments for one forward call of a diffusers DiT transformer (any size), as its pipeline
    makes them: `image_tokens` = (h, w) patches, `text_tokens` text positions, timestep in [0, 1] (SD3: x1000).

    `transformer(**inputs, return_dict=False)[0]` is the prediction (Z-Image: a list, one tensor per image).
    """

    cfg = transformer.config
    family = dit_family(type(transformer).__name__)
    param = next(transformer.parameters())
    dtype = dtype or param.dtype
    device = device or param.device
    h, w = image_tokens
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    t = torch.full((batch,), 0.5)
    if family in ("flux1", "flux2"):
        axes = 3 if family == "flux1" else 4
        img_ids = torch.zeros(h * w, axes)
        img_ids[:, axes - 2] = torch.arange(h).repeat_interleave(w)
        img_ids[:, axes - 1] = torch.arange(w).repeat(h)
        out: dict[str, Any] = {"hidden_states": rand(batch, h * w, cfg.in_channels),
                               "encoder_hidden_states": rand(batch, text_tokens, cfg.joint_attention_dim),
                               "timestep": t.to(device=device, dtype=dtype),
                               "img_ids": img_ids.to(device), "txt_ids": torch.zeros(text_tokens, axes).to(device)}
        if family == "flux1":
            out["pooled_projections"] = rand(batch, cfg.pooled_projection_dim)
        if cfg.guidance_embeds:
            out["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
        return out
    if family == "sd3":
        p = cfg.patch_size
        return {"hidden_states": rand(batch, cfg.in_channels, h * p, w * p),
                "encoder_hidden_states": rand(batch, text_tokens, cfg.joint_attention_dim),
                "pooled_projections": rand(batch, cfg.pooled_projection_dim),
                "timestep": (t * 1000).to(device=device, dtype=dtype)}
    if family == "qwen-image":
        return {"hidden_states": rand(batch, h * w, cfg.in_channels),
                "encoder_hidden_states": rand(batch, text_tokens, cfg.joint_attention_dim),
                "encoder_hidden_states_mask": torch.ones(batch, text_tokens, dtype=torch.long, device=device),
                "timestep": t.to(device=device, dtype=dtype), "img_shapes": [[(1, h, w)]] * batch}
    if family == "z-image":
        p = cfg.all_patch_size[0]
        return {"x": [rand(cfg.in_channels, 1, h * p, w * p) for _ in range(batch)],
                "t": t.to(device=device, dtype=dtype),
                "cap_feats": [rand(text_tokens, cfg.cap_feat_dim) for _ in range(batch)]}
    raise TypeError(f"transformer_inputs got a {type(transformer).__name__}; expected a diffusers DiT transformer "
                    "(FluxTransformer2DModel, Flux2Transformer2DModel, SD3Transformer2DModel, "
                    "QwenImageTransformer2DModel, ZImageTransformer2DModel)")


def transformer_output(transformer: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The prediction of `transformer` for `inputs` (transformer_inputs) as one tensor (Z-Image's list stacked)."""
    out = transformer(**inputs, return_dict=False)[0]
    return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out
