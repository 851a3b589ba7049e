"""ViT loading, new heads, adapters with their head (reload, merge, peft folder), bad input, the bf16 fast path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lora_vision import LoRAConfig, TargetError, inject_lora, lora_parameters
from lora_vision.adapter import Adapter
from lora_vision.lora.inject import lora_layers
from lora_vision.models.tiny import build_tiny_hf_vit
from lora_vision.models.vit import ModelLoadError, freeze_to, load_vit, lora_targets, merged_copy, save_model

FAMILIES = ["tiny-hf", "tiny-torchvision", "tiny-timm"]


def _trained(source: str, classes: int = 3, seed: int = 0):
    """A model with a LoRA adapter and a head that are not at their initial values (as after training)."""
    loaded = load_vit(source, classes)
    inject_lora(loaded.model, LoRAConfig(rank=4, alpha=8, targets=lora_targets(loaded)))
    head = loaded.model.get_submodule(loaded.head_name)
    head.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(loaded.model) + list(head.parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    loaded.model.eval()
    return loaded


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("source", FAMILIES)
def test_new_head_sized_to_classes(source: str) -> None:
    loaded = load_vit(source, 7)
    assert loaded.logits(_x()).shape == (4, 7)
    assert loaded.model.get_submodule(loaded.head_name).out_features == 7


def test_real_size_torchvision_and_timm_names() -> None:
    tv = load_vit("torchvision:vit_b_16", 5)
    assert tv.family == "torchvision" and tv.model.heads.head.out_features == 5
    assert tv.preprocessing.image_size == 224 and tv.preprocessing.mean[0] == pytest.approx(0.485)
    tm = load_vit("timm:vit_tiny_patch16_224", 6)
    assert tm.family == "timm" and tm.logits(torch.randn(1, 3, 224, 224)).shape == (1, 6)
    with pytest.raises(ModelLoadError, match="not a torchvision ViT"):
        load_vit("torchvision:resnet50", 5)


def test_hf_folder_gets_a_new_head(tmp_path: Path) -> None:
    build_tiny_hf_vit(num_labels=10).save_pretrained(tmp_path / "m")
    loaded = load_vit(str(tmp_path / "m"), 3, labels=["a", "b", "c"])
    assert loaded.family == "hf" and loaded.model.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert loaded.logits(_x()).shape == (4, 3) and loaded.preprocessing.image_size == 32
    with pytest.raises(ModelLoadError, match="config.json"):
        load_vit(str(tmp_path / "nothing-here"), 3)


def test_weights_only_from_safetensors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="only .safetensors"):
        load_vit("tiny-torchvision", 3, weights=tmp_path / "w.pth")
    src = load_vit("tiny-torchvision", 5, seed=1)
    save_model(src, tmp_path / "tv")
    again = load_vit("tiny-torchvision", 3, weights=tmp_path / "tv" / "model.safetensors")
    w = "encoder.layers.encoder_layer_0.mlp.0.weight"
    assert torch.equal(again.model.state_dict()[w], src.model.state_dict()[w])


def test_preset_for_another_model_is_a_clear_error() -> None:
    loaded = load_vit("tiny-hf", 3)
    with pytest.raises(TargetError, match="preset 'tv-vit-attn' is for a torchvision VisionTransformer"):
        inject_lora(loaded.model, LoRAConfig(targets="tv-vit-attn"))
    resnet_like = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(TargetError, match="is for a transformers ViT"):
        inject_lora(resnet_like, LoRAConfig(targets="hf-vit-attn"))


@pytest.mark.parametrize("source", FAMILIES)
def test_adapter_with_head_reloads_exactly(source: str, tmp_path: Path) -> None:
    loaded = _trained(source)
    want = loaded.logits(_x())
    Adapter.from_models({"model": loaded.model}, full_modules={"model": [loaded.head_name]}).save(tmp_path / "a.st")
    fresh = load_vit(source, 3, seed=9)  # another head init: the file must bring the trained head
    assert not torch.allclose(fresh.logits(_x()), want)
    Adapter.load(tmp_path / "a.st").apply_to({"model": fresh.model})
    torch.testing.assert_close(fresh.model.eval() and fresh.logits(_x()), want, rtol=0, atol=0)


def test_head_size_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    loaded = _trained("tiny-hf", classes=3)
    Adapter.from_models({"model": loaded.model}, full_modules={"model": ["classifier"]}).save(tmp_path / "a.st")
    other = load_vit("tiny-hf", 5)
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"classifier.weight: adapter has shape \(3, 32\), model has \(5, 32\)"):
        Adapter.load(tmp_path / "a.st").apply_to({"model": other.model})
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items())


@pytest.mark.parametrize("source", FAMILIES)
def test_merged_equals_unmerged(source: str) -> None:
    loaded = _trained(source)
    x = _x(8)
    want = loaded.logits(x)
    merged = merged_copy(loaded.model).eval()
    assert not list(lora_layers(merged)) and list(lora_layers(loaded.model))
    out = merged(pixel_values=x).logits if loaded.family == "hf" else merged(x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(out.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("source", ["tiny-hf", "tiny-timm", "tiny-torchvision"])
def test_peft_folder_loads_with_peft_and_gives_the_same_logits(source: str, tmp_path: Path) -> None:
    from peft import PeftModel

    from lora_vision.formats.peft import export_peft

    loaded = _trained(source)
    want = loaded.logits(_x())
    adapter = Adapter.from_models({"model": loaded.model}, full_modules={"model": [loaded.head_name]})
    export_peft(adapter, tmp_path / "peft")
    base = load_vit(source, 3, seed=0).model  # same base weights; the head comes from the folder
    pm = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    out = pm(pixel_values=_x()) if loaded.family == "hf" else pm(_x())
    out = out.logits if hasattr(out, "logits") else out
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_bf16_frozen_base_matches_the_plain_fp32_path() -> None:
    """The fast path (frozen weights stored in bf16, autocast) against fp32: same loss and LoRA grads to bf16 precision."""
    plain = _trained("tiny-hf")
    fast = _trained("tiny-hf")
    fast.model.load_state_dict(plain.model.state_dict())
    n = freeze_to(fast.model, torch.bfloat16)
    assert n > 0 and all(p.dtype == torch.float32 for p in fast.model.parameters() if p.requires_grad)
    x, y = _x(8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    plain.model.train(), fast.model.train()
    loss_p = F.cross_entropy(plain.logits(x), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_f = F.cross_entropy(fast.logits(x).float(), y)
    loss_p.backward(), loss_f.backward()
    assert abs(loss_p.item() - loss_f.item()) < 2e-2 * max(1.0, loss_p.item())
    gp = torch.cat([p.grad.flatten() for p in lora_parameters(plain.model)])
    gf = torch.cat([p.grad.flatten() for p in lora_parameters(fast.model)])
    assert F.cosine_similarity(gp, gf, dim=0) > 0.99
    # no gradient is ever made for a frozen weight (no weight-gradient GEMMs for the base)
    assert all(p.grad is None for p in fast.model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("source", FAMILIES)
def test_patch_embedding_as_matmul_equals_the_conv(source: str) -> None:
    from lora_vision.models.vit import patchify_as_linear

    loaded = load_vit(source, 3)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    want = loaded.logits(x)
    keys = set(loaded.model.state_dict())
    assert len(patchify_as_linear(loaded.model)) == 1
    assert set(loaded.model.state_dict()) == keys  # same parameters, same names
    out = loaded.logits(x)
    assert torch.linalg.norm(out - want) / torch.linalg.norm(want) < 1e-5


def test_pure_bf16_with_master_weights_follows_fp32_training() -> None:
    """Fast path of bench_vit's `ours-purebf16`: whole model in bf16, fp32 master weights; checked against fp32."""
    from lora_vision.training.vit.precision import MasterWeights

    runs = {}
    for kind in ("fp32", "bf16"):
        loaded = _trained("tiny-hf")
        model = loaded.model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        start = torch.cat([p.detach().float().flatten() for p in params])
        master = None
        if kind == "bf16":
            model.to(torch.bfloat16)
            master = MasterWeights(params)
        opt = torch.optim.AdamW(master.master if master else params, lr=1e-2)
        g = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(6):
            x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g)
            loss = F.cross_entropy(model(pixel_values=x.to(params[0].dtype)).logits.float(), y)
            loss.backward()
            if master:
                master.grads_to_master()
            opt.step()
            opt.zero_grad()
            if master:
                master.master_to_model()
                assert all(p.dtype == torch.bfloat16 and p.grad is None for p in params)
            losses.append(loss.item())
        end = torch.cat([p.detach().float().flatten() for p in (master.master if master else params)])
        runs[kind] = (torch.tensor(losses), end - start)  # what training changed
    (l32, d32), (l16, d16) = runs["fp32"], runs["bf16"]
    print(f"max loss diff {(l16 - l32).abs().max():.4f}, update rel. diff "
          f"{torch.linalg.norm(d16 - d32) / torch.linalg.norm(d32):.4f}")
    assert (l16 - l32).abs().max() < 0.05 * l32.abs().max()
    # Adam normalises each update, so bf16 rounding in the gradients shows up fully: 8.8% measured here
    assert torch.linalg.norm(d16 - d32) / torch.linalg.norm(d32) < 0.15
    assert l16[-1] < l16[0]  # it trains
