"""Presets adapt the expected modules on tiny models and on real SD 1.5 / SDXL layouts; peft equivalence."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import lora_vision as lv
from lora_vision.lora import resolve_targets
from lora_vision.models import (build_tiny_hf_vit, build_tiny_sd, build_tiny_timm_vit,
                                build_tiny_torchvision_vit)
from lora_vision.targets import PRESETS


def _count(model: nn.Module, preset: str) -> int:
    return len(resolve_targets(model, lv.LoRAConfig(targets=preset))[1])


def sd15_layout_unet() -> UNet2DConditionModel:
    """SD 1.5's exact block topology at tiny width (widths keep 1.5's pattern: distinct, last two equal)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(8, 16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)


def sdxl_layout_unet() -> UNet2DConditionModel:
    """SDXL's exact block topology (transformer depths 1, 2, 10) at tiny width."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=(8, 16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(1, 2, 4), cross_attention_dim=16,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4, norm_num_groups=4)


# kohya's module counts on the real layouts (its LoRANetwork picks every Linear/Conv2d in Transformer2DModel,
# plus ResNet and sampler convs for LoCon).
@pytest.mark.parametrize("build, expected", [
    (sd15_layout_unet, {"unet-cross-attn": 64, "unet-attn": 128, "unet-attn-ff": 192, "unet-locon": 192 + 86}),
    (sdxl_layout_unet, {"unet-cross-attn": 280, "unet-attn": 560, "unet-attn-ff": 722, "unet-locon": 722 + 66}),
])
def test_unet_presets_on_real_layouts(build, expected: dict[str, int]) -> None:
    unet = build()
    assert {p: _count(unet, p) for p in expected} == expected


@pytest.mark.parametrize("layers, cls, expected", [
    (12, CLIPTextModel, (48, 72)),  # SD 1.x text encoder (and SDXL TE1)
    (23, CLIPTextModel, (92, 138)),  # SD 2.x as kohya converts it (23 layers)
    (32, CLIPTextModelWithProjection, (128, 192)),  # SDXL TE2 (keeps the text_model. prefix in transformers 5)
])
def test_clip_presets_on_real_layouts(layers: int, cls, expected: tuple[int, int]) -> None:
    te = cls(CLIPTextConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=layers,
                            num_attention_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    assert (_count(te, "clip-attn"), _count(te, "clip-attn-mlp")) == expected


def test_presets_on_tiny_pipelines() -> None:
    counts = {}
    for kind in ("sd1", "sd2", "sdxl"):
        pipe = build_tiny_sd(kind)
        counts[kind] = {p: _count(pipe.unet, p) for p in ("unet-cross-attn", "unet-attn", "unet-attn-ff",
                                                          "unet-locon")}
        counts[kind]["te"] = _count(pipe.text_encoder, "clip-attn-mlp")
        if kind == "sdxl":
            counts[kind]["te2"] = _count(pipe.text_encoder_2, "clip-attn-mlp")
    # tiny sd1/sd2: 6 transformer blocks (2 down, 1 mid, 3 up), 6 Transformer2DModels; 2 text-encoder layers.
    # unet-locon adds 12 resnets (4 down, 2 mid, 6 up) x conv1/conv2/time_emb_proj, the 7 resnets whose input
    # width differs from their output (1 down, 6 up: skip connections) have a conv_shortcut, 1 down- and 1 upsampler.
    assert counts["sd1"] == {"unet-cross-attn": 24, "unet-attn": 48, "unet-attn-ff": 72,
                             "unet-locon": 72 + 36 + 7 + 2, "te": 12}
    assert counts["sd2"] == counts["sd1"]
    # tiny sdxl: transformer depth 2 in its cross-attention level -> 12 transformer blocks.
    assert counts["sdxl"] == {"unet-cross-attn": 48, "unet-attn": 96, "unet-attn-ff": 132,
                              "unet-locon": 132 + 36 + 7 + 2, "te": 12, "te2": 12}


def test_vit_presets() -> None:
    hf = build_tiny_hf_vit()
    assert (_count(hf, "hf-vit-attn"), _count(hf, "hf-vit-attn-mlp")) == (8, 12)
    tv = build_tiny_torchvision_vit()
    assert (_count(tv, "tv-vit-attn"), _count(tv, "tv-vit-attn-mlp")) == (2, 6)
    tm = build_tiny_timm_vit()
    assert (_count(tm, "timm-vit-attn"), _count(tm, "timm-vit-attn-mlp")) == (4, 8)
    for wrong, model in (("tv-vit-attn", hf), ("hf-vit-attn", tv), ("timm-vit-attn", tv), ("unet-attn", hf)):
        with pytest.raises(lv.TargetError, match="is for a"):
            _count(model, wrong)


def test_hf_vit_transformers4_names_match() -> None:
    """Adapters and presets must also fit transformers 4.x module names (files in the wild keep them)."""
    def lin() -> nn.Linear:
        return nn.Linear(4, 4)

    root = nn.Module()
    root.vit = nn.Module()
    root.vit.encoder = nn.Module()
    root.vit.encoder.layer = nn.ModuleList()
    for _ in range(2):
        layer = nn.Module()
        layer.attention = nn.Module()
        layer.attention.attention = nn.Module()
        for n in ("query", "key", "value"):
            setattr(layer.attention.attention, n, lin())
        layer.attention.output = nn.Module()
        layer.attention.output.dense = lin()
        layer.intermediate = nn.Module()
        layer.intermediate.dense = lin()
        layer.output = nn.Module()
        layer.output.dense = lin()
        root.vit.encoder.layer.append(layer)
    root.classifier = lin()
    attn = resolve_targets(root, lv.LoRAConfig(targets=PRESETS["hf-vit-attn"].patterns))[1]
    assert sorted(attn) == sorted(f"vit.encoder.layer.{i}.attention.{s}" for i in range(2) for s in
                                  ("attention.query", "attention.key", "attention.value", "output.dense"))
    mlp = resolve_targets(root, lv.LoRAConfig(targets=PRESETS["hf-vit-attn-mlp"].patterns))[1]
    assert len(mlp) == 12 and "classifier" not in mlp


def _copy_into_peft(ours: nn.Module, theirs: nn.Module) -> int:
    """Copy our A/B into peft's lora_A/lora_B modules of the same names; returns how many modules were copied."""
    n = 0
    peft_mods = dict(theirs.named_modules())
    for name, layer in lv.lora_layers(ours):
        p = peft_mods["base_model.model." + name]
        with torch.no_grad():
            p.lora_A["default"].weight.copy_(layer.lora_A["default"])
            p.lora_B["default"].weight.copy_(layer.lora_B["default"])
        n += 1
    return n


@pytest.mark.parametrize("rank, alpha, rslora", [(4, 4.0, False), (4, 8.0, False), (8, 4.0, True)])
def test_equivalent_to_peft_on_tiny_unet(rank: int, alpha: float, rslora: bool) -> None:
    peft = pytest.importorskip("peft")
    unet = build_tiny_sd("sd1").unet
    ours = copy.deepcopy(unet)
    names = lv.inject_lora(ours, lv.LoRAConfig(rank=rank, alpha=alpha, rslora=rslora, targets="unet-locon"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lv.lora_parameters(ours):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=names)
    theirs = peft.get_peft_model(copy.deepcopy(unet), cfg)
    assert _copy_into_peft(ours, theirs) == len(names) == 117
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    ctx = torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        a = ours(x, t, encoder_hidden_states=ctx).sample
        b = theirs(x, t, encoder_hidden_states=ctx).sample
        base = unet(x, t, encoder_hidden_states=ctx).sample
    assert (a - base).abs().max() > 1e-3  # the adapter does something
    assert (a - b).abs().max().item() < 1e-6 * max(1.0, b.abs().max().item())


def test_equivalent_to_peft_on_tiny_hf_vit() -> None:
    peft = pytest.importorskip("peft")
    vit = build_tiny_hf_vit()
    ours = copy.deepcopy(vit)
    names = lv.inject_lora(ours, lv.LoRAConfig(rank=4, alpha=16, targets="hf-vit-attn-mlp"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lv.lora_parameters(ours):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    theirs = peft.get_peft_model(copy.deepcopy(vit), peft.LoraConfig(r=4, lora_alpha=16, target_modules=names))
    _copy_into_peft(ours, theirs)
    x = torch.randn(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        a, b = ours(pixel_values=x).logits, theirs(pixel_values=x).logits
    assert (a - b).abs().max().item() < 1e-6


def _leaf(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def test_layer_name_lists_cover_the_real_layouts() -> None:
    """UNET_LAYER_NAMES / CLIP_LAYER_NAMES (the pre-load target check) name every Linear/Conv2d of the layouts."""
    from lora_vision.targets import CLIP_LAYER_NAMES, UNET_LAYER_NAMES, target_problems

    unets = [sd15_layout_unet(), sdxl_layout_unet()] + [build_tiny_sd(f).unet for f in ("sd1", "sd2")]
    leaves = {_leaf(n) for u in unets for n, m in u.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert leaves == UNET_LAYER_NAMES
    te = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=64, hidden_size=8, intermediate_size=16,
                                                    num_hidden_layers=1, num_attention_heads=2))
    assert {_leaf(n) for n, m in te.named_modules() if isinstance(m, nn.Linear)} == CLIP_LAYER_NAMES
    unet_presets = [n for n in PRESETS if n.startswith("unet-")]
    ok = ("to_q", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "re:.*whatever", "unet-attn-ff")
    assert all(target_problems("t", (p,), unet_presets, UNET_LAYER_NAMES) == [] for p in ok)
    assert target_problems("t", ("to_out",), unet_presets, UNET_LAYER_NAMES)  # a ModuleList, not a layer
