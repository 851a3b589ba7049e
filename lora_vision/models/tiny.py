"""Tiny random-weight models for tests: SD 1.x / 2.x / SDXL pipelines and three ViT flavours.

Everything here builds offline in well under a second on CPU and is deterministic for a given seed. The Stable
Diffusion UNets keep the real block layout (which blocks have attention, how many transformer layers, conv or
linear proj_in/proj_out, text_time conditioning) at tiny width, so module names, and therefore LoRA key names,
have the same shape as in the real checkpoints.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from transformers import CLIPTokenizer, ViTForImageClassification

SD_KINDS: tuple[str, ...] = ("sd1", "sd2", "sdxl")

# Native pixel size of the tiny pipelines. The VAE has four levels like the real one (8x downsampling), so a
# 64 px image is an 8x8 latent, which is the UNet's sample_size; the two UNet levels then work at 8x8 and 4x4.
TINY_RESOLUTION: int = 64
TINY_VAE_SCALE_FACTOR: int = 8
TINY_LATENT_SIZE: int = TINY_RESOLUTION // TINY_VAE_SCALE_FACTOR

# Text encoders: CLIP-shaped, 2 layers of width 32. Each SDXL encoder is 32 wide, so the UNet sees 32 + 32 = 64.
_TEXT_HIDDEN = 32
_TEXT_LAYERS = 2
_TEXT_HEADS = 4
_TEXT_INTERMEDIATE = 37
_MAX_TOKENS = 77

# Words that get a whole-word token, as in the real CLIP vocabulary; everything else falls back to bytes.
_TOKENIZER_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "painting", "style", "sks", "toy",
    "box", "red", "yellow", "blue", "green", "white", "black", "table", "floor", "grass", "beach", "dog", "cat",
    "stripe", "wooden", "background", "close", "up",
)

# SDXL micro-conditioning: (original_size, crops_coords_top_left, target_size) = 6 numbers, each embedded with
# addition_time_embed_dim channels and concatenated with the pooled text embedding of text_encoder_2.
_SDXL_TIME_EMBED_DIM = 8
_SDXL_NUM_TIME_IDS = 6


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside the block and restore the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters that stand for bytes in GPT-2/CLIP byte-level BPE, in CLIP's vocab order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encode one word: repeatedly merge the adjacent pair with the lowest rank."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i, pair) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i, pair = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [pair[0] + pair[1]] + symbols[i + 2 :]
    return symbols


def _tiny_vocab(words: tuple[str, ...] = _TOKENIZER_WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style vocabulary: every byte, every byte + '</w>', merges for `words`, then the specials."""
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    # Each new merge goes last (lowest priority), so it never changes how an earlier word is split.
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            ranks[(symbols[0], symbols[1])] = len(ranks)
            vocab.setdefault(symbols[0] + symbols[1], len(vocab))
            symbols = _apply_merges(symbols, ranks)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, [f"{a} {b}" for a, b in ranks]


def build_tiny_tokenizer(pad_token: str = "<|endoftext|>", words: tuple[str, ...] = _TOKENIZER_WORDS) -> CLIPTokenizer:
    """A real CLIPTokenizer loaded from a small vocab.json/merges.txt written to a temporary folder.

    SDXL's second tokenizer pads with "!" instead of the end token; pass pad_token="!" to mirror it. `words` get a
    whole-word token each; anything else is split into bytes.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _tiny_vocab(words)
    with tempfile.TemporaryDirectory(prefix="lora_vision_tok_") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=_MAX_TOKENS)


def _text_config(tokenizer: CLIPTokenizer, hidden_act: str) -> Any:
    """CLIPTextConfig of the tiny encoders, with the special-token ids of `tokenizer` (pooling uses eos_token_id)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=_TEXT_INTERMEDIATE,
        num_hidden_layers=_TEXT_LAYERS,
        num_attention_heads=_TEXT_HEADS,
        max_position_embeddings=_MAX_TOKENS,
        hidden_act=hidden_act,
        projection_dim=_TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _unet_config(kind: str) -> dict[str, Any]:
    """UNet2DConditionModel kwargs: the real block layout of `kind` at width (32, 64), two resnets per block."""
    common: dict[str, Any] = dict(
        sample_size=TINY_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        attention_head_dim=(2, 4),  # the legacy name: these are head counts, as in the real SD configs
        norm_num_groups=8,
    )
    if kind in ("sd1", "sd2"):
        return dict(
            common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=_TEXT_HIDDEN,
            # SD 1.x projects in and out of the transformer with 1x1 convs; SD 2.x with Linear layers.
            use_linear_projection=kind == "sd2",
        )
    return dict(
        common,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * _TEXT_HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=_TEXT_HIDDEN + _SDXL_NUM_TIME_IDS * _SDXL_TIME_EMBED_DIM,
    )


def _vae(kind: str) -> Any:
    """A four-level AutoencoderKL (8x downsampling like the real one) with 16-32 channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.13025 if kind == "sdxl" else 0.18215,
    )


def _scheduler(kind: str) -> Any:
    """DDPMScheduler with SD's scaled-linear betas; SD 2.x (768-v) predicts v instead of the noise."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="v_prediction" if kind == "sd2" else "epsilon",
    )


def build_tiny_sd(kind: str = "sd1", seed: int = 0) -> DiffusionPipeline:
    """Build a random-weight tiny StableDiffusionPipeline ("sd1", "sd2") or StableDiffusionXLPipeline ("sdxl").

    Generate at TINY_RESOLUTION: `pipe(prompt, height=TINY_RESOLUTION, width=TINY_RESOLUTION, ...)`.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind not in SD_KINDS:
        raise ValueError(f"unknown tiny SD kind {kind!r}; expected one of {', '.join(SD_KINDS)}")

    tokenizer = build_tiny_tokenizer()
    with _seeded(seed):
        unet = UNet2DConditionModel(**_unet_config(kind))
        vae = _vae(kind)
        # SD 1.x uses OpenAI CLIP (quick_gelu); SD 2.x and SDXL's second encoder use OpenCLIP (gelu).
        text_encoder = CLIPTextModel(_text_config(tokenizer, "gelu" if kind == "sd2" else "quick_gelu"))
        if kind == "sdxl":
            tokenizer_2 = build_tiny_tokenizer(pad_token="!")
            text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, "gelu"))
    for model in (unet, vae, text_encoder):
        model.eval()

    if kind == "sdxl":
        text_encoder_2.eval()
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=_scheduler(kind),
            add_watermarker=False,
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(kind),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_sd(path: str | Path, kind: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny pipeline as a diffusers folder (safetensors) that `DiffusionPipeline.from_pretrained` reloads."""
    out = Path(path)
    build_tiny_sd(kind, seed=seed).save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_hf_vit(num_labels: int = 10, image_size: int = 32, seed: int = 0) -> ViTForImageClassification:
    """A random transformers ViTForImageClassification: patch 8, hidden 32, 2 layers, 4 heads, MLP 37."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        num_labels=num_labels,
    )
    with _seeded(seed):
        model = ViTForImageClassification(config)
    return model.eval()


def build_tiny_torchvision_vit(num_classes: int = 10, image_size: int = 32, seed: int = 0) -> nn.Module:
    """A random torchvision VisionTransformer: patch 8, hidden 32, 2 layers, 4 heads, MLP 37."""
    from torchvision.models import VisionTransformer

    with _seeded(seed):
        model = VisionTransformer(
            image_size=image_size,
            patch_size=8,
            num_layers=2,
            num_heads=4,
            hidden_dim=32,
            mlp_dim=37,
            num_classes=num_classes,
        )
        # torchvision zero-initialises the head, which makes every logit 0 and blocks all gradients into the
        # encoder; a small random head keeps tiny-model tests informative.
        nn.init.trunc_normal_(model.heads.head.weight, std=0.02)
    return model.eval()


def build_tiny_timm_vit(num_classes: int = 10, image_size: int = 32, seed: int = 0) -> nn.Module:
    """A random timm VisionTransformer: patch 8, embed_dim 32, depth 2, 4 heads, MLP 37 (mlp_ratio 37/32)."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as err:
        raise ImportError(
            "build_tiny_timm_vit needs timm, which is not installed; install it with `pip install timm` "
            "or `pip install lora_vision[test]`"
        ) from err

    with _seeded(seed):
        model = VisionTransformer(
            img_size=image_size,
            patch_size=8,
            num_classes=num_classes,
            embed_dim=32,
            depth=2,
            num_heads=4,
            mlp_ratio=37 / 32,
        )
    return model.eval()
