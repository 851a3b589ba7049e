"""The tiny test models build fast and deterministically, run, keep the real SD block layouts, and reload."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lora_vision.models import (
    SD_KINDS,
    TINY_LATENT_SIZE,
    TINY_RESOLUTION,
    build_tiny_hf_vit,
    build_tiny_sd,
    build_tiny_timm_vit,
    build_tiny_tokenizer,
    build_tiny_torchvision_vit,
    detect_sd_family,
    load_sd_pipeline,
    prediction_type,
    save_tiny_sd,
)

BUILD_SECONDS = 5.0  # generous: a build takes well under a second on a laptop, CI has 2 slow cores


def timed(build: Callable[[], Any]) -> Any:
    """Call `build` and fail when it takes longer than BUILD_SECONDS."""
    start = time.perf_counter()
    result = build()
    elapsed = time.perf_counter() - start
    assert elapsed < BUILD_SECONDS, f"build took {elapsed:.2f} s, expected under {BUILD_SECONDS} s"
    return result


@pytest.fixture(scope="module")
def pipes() -> dict[str, Any]:
    """One tiny pipeline per kind, each build timed."""
    return {kind: timed(lambda kind=kind: build_tiny_sd(kind)) for kind in SD_KINDS}


def unet_inputs(pipe: Any, batch: int = 2) -> dict[str, Any]:
    """Seeded UNet inputs of the right shapes for `pipe` (with SDXL's added conditioning)."""
    gen = torch.Generator().manual_seed(0)
    config = pipe.unet.config
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, 4, TINY_LATENT_SIZE, TINY_LATENT_SIZE, generator=gen),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, generator=gen),
    }
    if config.addition_embed_type == "text_time":
        pooled_dim = pipe.text_encoder_2.config.projection_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled_dim, generator=gen),
            "time_ids": torch.tensor([[TINY_RESOLUTION, TINY_RESOLUTION, 0, 0, TINY_RESOLUTION, TINY_RESOLUTION]] * batch,
                                     dtype=torch.float32),
        }
    return inputs


def transformer_counts(unet: nn.Module) -> dict[str, int]:
    """Linear/Conv2d modules inside the UNet's Transformer2DModel blocks, and the self/cross-attention query count."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    blocks = [m for m in unet.modules() if isinstance(m, Transformer2DModel)]
    names = [name for name, _ in unet.named_modules()]
    return {
        "transformers": len(blocks),
        "linear": sum(isinstance(m, nn.Linear) for block in blocks for m in block.modules()),
        "conv": sum(isinstance(m, nn.Conv2d) for block in blocks for m in block.modules()),
        "attn1.to_q": sum(name.endswith("attn1.to_q") for name in names),
        "attn2.to_q": sum(name.endswith("attn2.to_q") for name in names),
    }


# ---- ViTs


@pytest.mark.parametrize(
    "build",
    [build_tiny_hf_vit, build_tiny_torchvision_vit, build_tiny_timm_vit],
    ids=["hf", "torchvision", "timm"],
)
def test_vit_forward(build: Callable[..., nn.Module]) -> None:
    model = timed(lambda: build(10, 32, seed=0))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(images)
    logits = getattr(out, "logits", out)
    assert logits.shape == (3, 10)
    assert torch.isfinite(logits).all()
    assert logits.abs().max() > 0, "a zero head would block every gradient into the encoder"
    with torch.no_grad():
        again = build(10, 32, seed=0)(images)
    assert torch.equal(getattr(again, "logits", again), logits)


def test_vit_sizes() -> None:
    hf = build_tiny_hf_vit(num_labels=5, image_size=16)
    assert (hf.config.patch_size, hf.config.hidden_size, hf.config.num_hidden_layers) == (8, 32, 2)
    assert hf(torch.zeros(1, 3, 16, 16)).logits.shape == (1, 5)
    tv = build_tiny_torchvision_vit(num_classes=5, image_size=16)
    assert tv.encoder.layers[0].mlp[0].out_features == 37
    timm_vit = build_tiny_timm_vit(num_classes=5, image_size=16)
    assert timm_vit.blocks[0].mlp.fc1.out_features == 37
    assert len(timm_vit.blocks) == 2 and timm_vit.embed_dim == 32


# ---- Stable Diffusion


@pytest.mark.parametrize("kind", SD_KINDS)
def test_unet_forward(pipes: dict[str, Any], kind: str) -> None:
    pipe = pipes[kind]
    with torch.no_grad():
        out = pipe.unet(**unet_inputs(pipe)).sample
    assert out.shape == (2, 4, TINY_LATENT_SIZE, TINY_LATENT_SIZE)
    assert torch.isfinite(out).all()


def test_build_is_deterministic() -> None:
    a, b, c = build_tiny_sd("sdxl", seed=0), build_tiny_sd("sdxl", seed=0), build_tiny_sd("sdxl", seed=1)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[key], sb[key]) for key in sa), name
        assert any(not torch.equal(sa[key], sc[key]) for key in sa), name
    # building must not disturb the caller's RNG
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_sd("sd1")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_pipeline_generates(pipes: dict[str, Any], kind: str) -> None:
    pipe = pipes[kind]
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        "a photo of sks toy",
        num_inference_steps=2,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert (images >= 0).all() and (images <= 1).all()


# Pinned topology, so LoRA target and key-name tests can rely on it. Per transformer block: attn1 and attn2
# (to_q, to_k, to_v, to_out.0) and ff (GEGLU proj, out) = 10 Linear; plus proj_in/proj_out per Transformer2DModel.
EXPECTED_TOPOLOGY = {
    "sd1": {"transformers": 6, "linear": 60, "conv": 12, "attn1.to_q": 6, "attn2.to_q": 6},
    "sd2": {"transformers": 6, "linear": 72, "conv": 0, "attn1.to_q": 6, "attn2.to_q": 6},
    "sdxl": {"transformers": 6, "linear": 132, "conv": 0, "attn1.to_q": 12, "attn2.to_q": 12},
}


@pytest.mark.parametrize("kind", SD_KINDS)
def test_unet_topology(pipes: dict[str, Any], kind: str) -> None:
    unet = pipes[kind].unet
    assert transformer_counts(unet) == EXPECTED_TOPOLOGY[kind]
    names = {name for name, _ in unet.named_modules()}
    if kind == "sdxl":
        # the first level has no attention; the second has two transformer layers per Transformer2DModel
        assert "down_blocks.0.attentions" not in names
        assert "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k" in names
        assert unet.add_embedding.linear_1.in_features == 32 + 6 * 8
    else:
        assert "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k" in names
        assert "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2" in names
        assert "down_blocks.1.attentions" not in names
    proj_in = unet.down_blocks[-1 if kind == "sdxl" else 0].attentions[0].proj_in
    assert isinstance(proj_in, nn.Conv2d if kind == "sd1" else nn.Linear)


def test_text_encoders(pipes: dict[str, Any]) -> None:
    assert pipes["sd1"].text_encoder.config.hidden_act == "quick_gelu"
    assert pipes["sd2"].text_encoder.config.hidden_act == "gelu"
    xl = pipes["sdxl"]
    hidden = xl.text_encoder.config.hidden_size + xl.text_encoder_2.config.hidden_size
    assert hidden == xl.unet.config.cross_attention_dim == 64
    assert xl.tokenizer_2.pad_token == "!"
    assert xl.text_encoder.config.eos_token_id == xl.tokenizer.eos_token_id


def test_tokenizer_words() -> None:
    tok = build_tiny_tokenizer()
    tokens = tok.convert_ids_to_tokens(tok("a photo of sks toy on a blue table").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "sks</w>", "toy</w>", "on</w>", "a</w>",
                      "blue</w>", "table</w>", "<|endoftext|>"]
    assert tok.model_max_length == 77


@pytest.mark.parametrize("kind", SD_KINDS)
def test_detect_sd_family(pipes: dict[str, Any], kind: str) -> None:
    pipe = pipes[kind]
    assert detect_sd_family(pipe) == kind
    assert detect_sd_family(pipe.unet) == kind
    assert detect_sd_family(dict(pipe.unet.config)) == kind
    assert prediction_type(pipe) == ("v_prediction" if kind == "sd2" else "epsilon")


def test_detect_sd_family_real_configs() -> None:
    assert detect_sd_family({"cross_attention_dim": 768, "use_linear_projection": False}) == "sd1"
    assert detect_sd_family({"cross_attention_dim": 1024, "use_linear_projection": True}) == "sd2"
    assert detect_sd_family({"cross_attention_dim": 1024}) == "sd2"
    assert detect_sd_family({"cross_attention_dim": 2048, "use_linear_projection": True,
                             "addition_embed_type": "text_time"}) == "sdxl"
    with pytest.raises(TypeError, match="Linear"):
        detect_sd_family(nn.Linear(2, 2))


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_save_and_reload(pipes: dict[str, Any], kind: str, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    folder = save_tiny_sd(tmp_path / kind, kind=kind)
    assert (folder / "model_index.json").is_file()
    assert list((folder / "unet").glob("*.safetensors"))
    reloaded = DiffusionPipeline.from_pretrained(folder)
    assert type(reloaded) is type(pipes[kind])
    inputs = unet_inputs(pipes[kind])
    with torch.no_grad():
        assert torch.equal(reloaded.unet(**inputs).sample, pipes[kind].unet(**inputs).sample)
    loaded = load_sd_pipeline(str(folder))
    assert type(loaded) is type(pipes[kind]) and detect_sd_family(loaded) == kind


def test_load_tiny_by_name() -> None:
    assert detect_sd_family(load_sd_pipeline(None)) == "sd1"
    assert detect_sd_family(load_sd_pipeline("tiny-sd2")) == "sd2"
    xl = load_sd_pipeline("tiny-sdxl", torch_dtype=torch.float16)
    assert detect_sd_family(xl) == "sdxl" and xl.unet.dtype == torch.float16
    with pytest.raises(ValueError, match="variant"):
        load_sd_pipeline("tiny", variant="fp16")


def test_load_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_sd_pipeline(str(missing))
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty)) + ".*model_index.json"):
        load_sd_pipeline(str(empty))
    with pytest.raises(ValueError, match="tiny"):
        build_tiny_sd("sd3")
