"""Tiny DiT pipelines (Flux.1, Flux.2-klein, SD 3.5, Qwen-Image, Z-Image): they build, run, are told apart, and the
target presets adapt the modules of the real block layouts."""

from __future__ import annotations

import copy

import pytest
import torch

import lora_vision as lv
from lora_vision.formats.naming import dit_family, dit_variant
from lora_vision.lora.config import TargetError
from lora_vision.models import DIT_KINDS, TINY_RESOLUTION, build_tiny_dit, detect_family, detect_variant, \
    load_sd_pipeline
from lora_vision.models.dit import transformer_inputs, transformer_output
from lora_vision.targets import default_preset, resolve_preset

FAMILY_PRESET = {"flux1": "flux", "flux2": "flux2", "sd3": "sd3", "qwen-image": "qwen-image", "z-image": "z-image"}
# Adapted modules of the tiny layouts (2 double + 2 single blocks; SD3 block 0 has attn2, block 1 is
# context_pre_only; Z-Image 2 layers + 1 noise and 1 context refiner): attn, attn-ff, all.
TINY_COUNTS = {"tiny-flux": (24, 34, 40), "tiny-flux2": (20, 28, 31), "tiny-sd3": (19, 25, 29),
               "tiny-qwen-image": (16, 24, 28), "tiny-z-image": (16, 28, 31)}


@pytest.fixture(scope="module")
def dit_pipes() -> dict:
    return {name: build_tiny_dit(name) for name in DIT_KINDS}


@pytest.mark.parametrize("name", list(DIT_KINDS))
def test_tiny_dit_generates(dit_pipes: dict, name: str) -> None:
    pipe = dit_pipes[name]
    out = pipe(prompt="a photo of a dog", height=TINY_RESOLUTION, width=TINY_RESOLUTION, num_inference_steps=2,
               max_sequence_length=32, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, TINY_RESOLUTION, TINY_RESOLUTION)
    assert torch.isfinite(out).all() and out.std() > 0.01
    assert detect_family(pipe) == DIT_KINDS[name] == detect_family(pipe.transformer)
    assert detect_variant(pipe) is None  # no released model has these widths


def test_build_is_deterministic_and_by_name() -> None:
    a, b = build_tiny_dit("tiny-z-image", seed=3), build_tiny_dit("tiny-z-image", seed=3)
    for (k, x), (_, y) in zip(a.transformer.state_dict().items(), b.transformer.state_dict().items()):
        assert torch.equal(x, y), k
    assert type(load_sd_pipeline("tiny-qwen-image")).__name__ == "QwenImagePipeline"
    with pytest.raises(ValueError, match="tiny-flux, tiny-flux2"):
        build_tiny_dit("tiny-flux3")
    with pytest.raises(FileNotFoundError, match="'tiny-flux'"):
        load_sd_pipeline("tiny-flx")


def test_family_and_variant_of_released_configs() -> None:
    """The rule of naming.dit_variant on the configs of the released checkpoints."""
    flux = {"num_layers": 19, "num_single_layers": 38, "num_attention_heads": 24}
    assert dit_variant("FluxTransformer2DModel", dict(flux, guidance_embeds=True)) == "flux1"  # dev
    assert dit_variant("FluxTransformer2DModel", dict(flux, guidance_embeds=False)) == "flux1"  # schnell: same
    assert dit_variant("Flux2Transformer2DModel", {"num_layers": 5, "num_single_layers": 20,
                                                   "num_attention_heads": 24}) == "flux2-klein-4b"
    assert dit_variant("Flux2Transformer2DModel", {"num_layers": 8, "num_single_layers": 24,
                                                   "num_attention_heads": 32}) == "flux2-klein-9b"
    assert dit_variant("SD3Transformer2DModel", {"num_layers": 24, "qk_norm": "rms_norm"}) == "sd35-medium"
    assert dit_variant("SD3Transformer2DModel", {"num_layers": 24, "qk_norm": None}) == "sd3-medium"
    assert dit_variant("SD3Transformer2DModel", {"num_layers": 38, "qk_norm": "rms_norm"}) == "sd35-large"
    assert dit_variant("FluxTransformer2DModel", {"num_layers": 2}) is None
    assert dit_family("UNet2DConditionModel") is None
    assert detect_family(load_sd_pipeline("tiny-sd1")) == "sd1"


def test_flux_presets_on_the_real_layout() -> None:
    """Flux.1 dev at full size (meta device): 19 double blocks x 8 attention projections + 38 single x 4."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    assert detect_variant(model) == "flux1"
    names = lv.inject_lora(model, lv.LoRAConfig(rank=4, targets="flux-attn"))
    assert len(names) == 19 * 8 + 38 * 4
    assert "transformer_blocks.18.attn.to_add_out" in names and "single_transformer_blocks.37.proj_out" in names


@pytest.mark.parametrize("name", list(DIT_KINDS))
def test_presets_adapt_each_transformer(dit_pipes: dict, name: str) -> None:
    pipe = dit_pipes[name]
    fam = FAMILY_PRESET[DIT_KINDS[name]]
    assert default_preset(pipe.transformer) == f"{fam}-attn"
    counts = []
    for suffix in ("attn", "attn-ff", "all"):
        model = copy.deepcopy(pipe.transformer)
        names = lv.inject_lora(model, lv.LoRAConfig(rank=2, targets=f"{fam}-{suffix}"))
        counts.append(len(names))
    assert tuple(counts) == TINY_COUNTS[name]
    # A fresh adapter (B = 0) changes nothing; a random B changes the output.
    model = copy.deepcopy(pipe.transformer)
    lv.inject_lora(model, lv.LoRAConfig(rank=2, targets=f"{fam}-attn"))
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.normal_()
    inputs = transformer_inputs(pipe.transformer)
    with torch.no_grad():
        base = transformer_output(pipe.transformer, inputs)
        fresh = copy.deepcopy(pipe.transformer)
        lv.inject_lora(fresh, lv.LoRAConfig(rank=2, targets=f"{fam}-attn"))
        assert torch.equal(transformer_output(fresh, inputs), base)
        assert (transformer_output(model, inputs) - base).abs().max() > 1e-3


def test_text_encoder_presets(dit_pipes: dict) -> None:
    """CLIP (Flux.1, SD 3.5), T5 (Flux.1, SD 3.5), Qwen3 (Flux.2-klein, Z-Image) and Qwen2.5-VL's language model
    (Qwen-Image, not its vision tower)."""
    expect = {("tiny-flux", "text_encoder"): "clip-attn", ("tiny-flux", "text_encoder_2"): "t5-attn",
              ("tiny-sd3", "text_encoder_2"): "clip-attn", ("tiny-sd3", "text_encoder_3"): "t5-attn",
              ("tiny-flux2", "text_encoder"): "qwen-attn", ("tiny-z-image", "text_encoder"): "qwen-attn",
              ("tiny-qwen-image", "text_encoder"): "qwen-attn"}
    for (name, comp), preset in expect.items():
        te = copy.deepcopy(getattr(dit_pipes[name], comp))
        assert default_preset(te) == preset
        names = lv.inject_lora(te, lv.LoRAConfig(rank=2, targets=preset + "-mlp"))
        assert names and not any("visual" in n for n in names)


def test_preset_for_another_family_is_refused(dit_pipes: dict) -> None:
    with pytest.raises(TargetError, match="preset 'sd3-attn' is for a diffusers SD3Transformer2DModel, but the "
                                          "model is a .*FluxTransformer2DModel"):
        resolve_preset("sd3-attn", dit_pipes["tiny-flux"].transformer)


def test_t5_names_keep_their_spelling_in_files() -> None:
    """Only CLIP modules get transformers 4's `text_model.` in files; T5 (Flux.1 text_encoder_2, SD 3.5
    text_encoder_3) has no such prefix."""
    from lora_vision.formats.diffusers import file_module

    assert file_module("text_encoder_2", "encoder.block.0.layer.0.SelfAttention.q") == \
        "encoder.block.0.layer.0.SelfAttention.q"
    assert file_module("text_encoder", "encoder.layers.0.self_attn.q_proj") == \
        "text_model.encoder.layers.0.self_attn.q_proj"
