"""Preprocessing derived from each family's own processor, the augmentation presets and flags, PiSSA / OLoRA
initialisation and its export, LoRA+ parameter groups (issue 19)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_vision.data.preprocessing import Augmentation, Preprocessing, build_transforms
from lora_vision.models.vit import PROCESSOR_FILE, derive_preprocessing, load_vit

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "samples" / "vit" / "tiny-vit-patterns"


def _image(w: int = 61, h: int = 45, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


def test_transformers_folder_without_processor_gets_the_class_defaults_at_its_size() -> None:
    from transformers import ViTImageProcessor

    pre = load_vit(str(BASE), 4).preprocessing
    assert (pre.image_size, pre.resize_to, pre.keep_aspect, pre.crops) == (32, 32, False, False)  # no crop
    im = _image()
    theirs = ViTImageProcessor(size={"height": 32, "width": 32})(im, return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(build_transforms(pre, False)(im), theirs, atol=1e-6, rtol=0)


def test_transformers_processor_file_with_crop_is_followed(tmp_path: Path) -> None:
    from transformers import AutoImageProcessor

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((BASE / "config.json").read_text())
    (folder / "model.safetensors").symlink_to(BASE / "model.safetensors")
    (folder / PROCESSOR_FILE).write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "size": {"shortest_edge": 37}, "do_center_crop": True,
        "crop_size": {"height": 32, "width": 32}, "resample": 3, "image_mean": [0.4, 0.5, 0.6],
        "image_std": [0.2, 0.3, 0.4]}))
    pre = load_vit(str(folder), 4).preprocessing
    assert (pre.resize_to, pre.image_size, pre.keep_aspect, pre.interpolation) == (37, 32, True, "bicubic")
    im = _image(50, 41)  # odd margins: transformers' crop offsets are floored
    theirs = AutoImageProcessor.from_pretrained(folder)(im, return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(build_transforms(pre, False)(im), theirs, atol=1e-5, rtol=0)
    # and the file the recipe writes from it preprocesses the same way again
    (folder / PROCESSOR_FILE).write_text(json.dumps(pre.processor_config()))
    again = AutoImageProcessor.from_pretrained(folder)(im, return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(again, theirs, atol=0, rtol=0)


def test_timm_and_torchvision_follow_their_own_eval_transforms() -> None:
    timm = pytest.importorskip("timm")
    import torchvision

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)
    pre = derive_preprocessing(model, "timm", "timm:vit_tiny_patch16_224")
    assert (pre.resize_to, pre.interpolation) == (248, "bicubic")  # floor(224 / 0.9), as timm
    im = _image(300, 260)
    theirs = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))(im)
    torch.testing.assert_close(build_transforms(pre, False)(im), theirs, atol=0, rtol=0)
    pre = derive_preprocessing(None, "torchvision", "torchvision:vit_b_16")
    assert (pre.resize_to, pre.image_size) == (256, 224)
    theirs = torchvision.models.ViT_B_16_Weights.DEFAULT.transforms()(im)
    torch.testing.assert_close(build_transforms(pre, False)(im), theirs, atol=1e-6, rtol=0)


def test_older_records_keep_their_centre_crop() -> None:
    old = Preprocessing.from_dict({"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875})
    assert (old.resize_to, old.crops, old.backend) == (37, True, "pil")
    assert Preprocessing.from_dict(old.to_dict()) == Preprocessing.from_dict(json.loads(json.dumps(old.to_dict())))
    with pytest.raises(ValueError, match="unknown keys \\['size'\\]"):
        Preprocessing.from_dict({"size": 3})


def test_augmentation_presets_flags_and_aliases() -> None:
    from lora_vision.training.vit.config import ViTTrainConfig

    assert ViTTrainConfig(augment="true").augmentation() == Augmentation((0.35, 1.0), True)
    assert ViTTrainConfig(augment=False).augmentation() == Augmentation(None, False)  # YAML false
    assert ViTTrainConfig(augment="light", hflip=False).augmentation() == Augmentation((0.8, 1.0), False)
    assert ViTTrainConfig(crop_scale=(0.5, 0.9)).augmentation() == Augmentation((0.5, 0.9), True)
    problems = ViTTrainConfig(augment="heavy", crop_scale=(0.9, 0.2)).problems()
    assert any("augment='heavy': expected one of ('none', 'light', 'imagenet')" in p for p in problems)
    assert any("crop_scale=[0.9, 0.2]: expected 0 < MIN <= MAX <= 1" in p for p in problems)
    pre, im = load_vit(str(BASE), 4).preprocessing, _image()
    torch.manual_seed(0)  # no augmentation: the training transform is the evaluation transform
    assert torch.equal(build_transforms(pre, True, Augmentation.preset("none"))(im), build_transforms(pre, False)(im))
    flip_only = build_transforms(pre, True, Augmentation(None, True))
    outs = {bool(torch.equal(flip_only(im), build_transforms(pre, False)(im))) for _ in range(12)}
    assert outs == {True, False}  # sometimes flipped, sometimes not


def test_crop_scale_flag_takes_two_numbers(tmp_path: Path) -> None:
    from lora_vision.training.config import load_config
    from lora_vision.training.vit.config import ViTTrainConfig

    cfg = load_config(ViTTrainConfig, ["--crop_scale", "0.5", "1", "--augment", "false", "--hflip", "false"])
    assert cfg.crop_scale == (0.5, 1.0) and cfg.augment == "none" and cfg.augmentation() == Augmentation((0.5, 1.0),
                                                                                                         False)


def _weight_init_model(family: str):
    from lora_vision.models.tiny import build_tiny_hf_vit, build_tiny_timm_vit, build_tiny_torchvision_vit

    build, preset, probe = {"hf": (build_tiny_hf_vit, "hf-vit-attn-mlp", "vit.layers.0.attention.q_proj"),
                            "timm": (build_tiny_timm_vit, "timm-vit-attn-mlp", "blocks.0.attn.qkv"),
                            "tv": (build_tiny_torchvision_vit, "tv-vit-attn-mlp",
                                   "encoder.layers.encoder_layer_0.self_attention")}[family]
    return lambda: build(4, 32, 0).eval(), preset, probe


def _logits(model, x):
    out = model(x) if not hasattr(model, "vit") else model(pixel_values=x)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("family", ["hf", "timm", "tv"])
@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_weight_init_keeps_the_start_and_exports_a_delta_for_the_original_base(method: str, family: str) -> None:
    """PiSSA / OLoRA on plain Linear layers and, part by part, on fused projections (timm's qkv Linear, torchvision's
    nn.MultiheadAttention): the same output at the start, and the exported rank-2r adapter on the ORIGINAL base
    gives the trained model."""
    import lora_vision as lv
    from lora_vision.adapter import Adapter
    from lora_vision.lora.layers import part_weight
    from lora_vision.lora.weight_init import init_from_weights_, to_plain_delta_

    build, preset, probe = _weight_init_model(family)
    x = torch.randn(3, 3, 32, 32)
    model, original = build(), build()
    with torch.no_grad():
        before = _logits(model, x)
    lv.inject_lora(model, lv.LoRAConfig(rank=2, alpha=4, targets=preset))
    starts = init_from_weights_(model, method)
    layer = model.get_submodule(probe)
    parts = list(layer.lora_pairs("default"))
    assert {k for k in starts if k.startswith(probe)} == {f"{probe}.{p}" if p else probe for p in parts}
    for p in parts:
        assert not torch.equal(part_weight(layer, p), part_weight(original.get_submodule(probe), p))  # residual
        assert layer.lora_pairs("default")[p][1].abs().sum() > 0  # B does not start at zero
    with torch.no_grad():
        torch.testing.assert_close(_logits(model, x), before, atol=1e-5, rtol=1e-5)  # same start
        for prm in lv.lora_parameters(model):  # "training"
            prm.add_(torch.randn_like(prm) * 0.05)
        trained = _logits(model, x)
    assert (trained - before).abs().max() > 1e-3
    assert to_plain_delta_(model, starts) == len(starts)
    restored = model.get_submodule(probe).base
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(),
                                                 original.get_submodule(probe).state_dict().values()))  # bit for bit
    adapter = Adapter.from_models({"model": model})
    assert set(adapter.ranks().values()) == {4}  # rank 2r
    adapter.apply_to({"model": original})  # the ORIGINAL base + the exported adapter = the trained model
    with torch.no_grad():
        torch.testing.assert_close(_logits(original, x), trained, atol=1e-5, rtol=1e-5)


def test_weight_init_refuses_convolutions_and_too_large_ranks_before_changing_anything() -> None:
    import lora_vision as lv
    from lora_vision.lora.weight_init import init_from_weights_
    from lora_vision.models.tiny import build_tiny_torchvision_vit

    model = build_tiny_torchvision_vit(4, 32, 0)
    lv.inject_lora(model, lv.LoRAConfig(rank=2, targets=("conv_proj", "self_attention")))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"pissa initialisation needs Linear layers.*not plain LoRA on a Linear: "
                                         r"\['conv_proj'\]"):
        init_from_weights_(model, "pissa")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    wide = build_tiny_torchvision_vit(4, 32, 0)
    lv.inject_lora(wide, lv.LoRAConfig(rank=33, targets=("self_attention",)))
    with pytest.raises(ValueError, match=r"too large rank: \['encoder\.layers\.encoder_layer_0\.self_attention\.q "
                                         r"\(rank 33 > 32\)'"):
        init_from_weights_(wide, "olora")


def test_loraplus_param_groups_give_B_ratio_times_the_rate() -> None:
    import lora_vision as lv
    from lora_vision.models.tiny import build_tiny_hf_vit
    from lora_vision.training.optim import LRSchedule, build_optimizer, loraplus_param_groups

    model = build_tiny_hf_vit(4, 32, 0)
    lv.inject_lora(model, lv.LoRAConfig(rank=2, targets="hf-vit-attn"))
    model.classifier.requires_grad_(True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = loraplus_param_groups(named, 1e-3, 16)
    assert [len(g["params"]) for g in groups] == [8 + 2, 8] and groups[1]["lr"] == pytest.approx(16e-3)
    opt = build_optimizer(groups, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    LRSchedule("cosine", 2, 10).apply(opt, [g["lr"] for g in groups], 5)
    assert opt.param_groups[1]["lr"] == pytest.approx(16 * opt.param_groups[0]["lr"])
    assert len(loraplus_param_groups(named, 1e-3, None)) == 1
    with pytest.raises(ValueError, match="no trainable parameter is a LoRA B matrix"):
        loraplus_param_groups([("classifier.weight", model.classifier.weight)], 1e-3, 16)
