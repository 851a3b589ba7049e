"""peft as the second oracle of the adapter kinds it has (LoHa, LoKr, DoRA): folders peft's save_pretrained writes
(random non-zero factors) read through read_adapter and applied (Adapter.apply_to on a tiny ViT, the pipeline loader
on the tiny SD 1.x UNet) give peft's outputs to 1e-5; our layers of those kinds exported as peft folders load in
PeftModel.from_pretrained with our outputs; inconsistent or broken folders are named in the load report."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_vision as lv
from lora_vision.adapter import Adapter
from lora_vision.formats import AdapterMismatchError, export, read_adapter
from lora_vision.formats.peft_kinds import PeftExportError
from lora_vision.io import AdapterFileError
from lora_vision.models import build_tiny_hf_vit, build_tiny_sd

TOL = 1e-5
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
VIT_TARGETS = ["q_proj", "v_proj", "o_proj", "fc1", "fc2"]
# attention, feed-forward, 1x1 proj_in and 3x3 resnet convs of the tiny UNet
UNET_TARGETS = ["to_q", "to_v", "to_out.0", "ff.net.2", "proj_in", "conv1", "conv2"]


def peft_configs(targets: list[str]) -> dict:
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    return {
        "loha": LoHaConfig(r=2, alpha=3, target_modules=targets, init_weights=False),
        "loha-tucker": LoHaConfig(r=2, alpha=3, target_modules=targets, use_effective_conv2d=True,
                                  init_weights=False, rank_pattern={"fc1": 3}, alpha_pattern={"fc1": 1.5}),
        "lokr": LoKrConfig(r=2, alpha=3, target_modules=targets, init_weights=False),
        "lokr-both-factor": LoKrConfig(r=1, alpha=3, target_modules=targets, decompose_both=True, decompose_factor=4,
                                       use_effective_conv2d=True, init_weights=False),
        "lokr-whole": LoKrConfig(r=64, alpha=5, target_modules=targets, init_weights=False),  # alpha / r, nothing split
        "dora": LoraConfig(r=2, lora_alpha=3, target_modules=targets, use_dora=True, init_lora_weights=False),
        "dora-rslora": LoraConfig(r=4, lora_alpha=3, target_modules=targets, use_dora=True, use_rslora=True,
                                  init_lora_weights=False),
    }


LABELS = {"loha": "LoHa", "lokr": "LoKr", "dora": "LoRA+DoRA"}


def _peft_folder(model, config, path, seed: int = 0):
    from peft import get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(model, config)
    pm.eval()
    pm.save_pretrained(str(path))
    return pm


@torch.no_grad()
def vit_logits(model) -> torch.Tensor:
    return model(X).logits


@pytest.mark.parametrize("which", list(peft_configs(VIT_TARGETS)))
def test_peft_folder_of_kind_gives_peft_outputs_on_vit(which, tmp_path):
    pm = _peft_folder(build_tiny_hf_vit(), peft_configs(VIT_TARGETS)[which], tmp_path / "p")
    want = vit_logits(pm)
    assert (want - vit_logits(build_tiny_hf_vit())).abs().max() > 1e-2  # the factors do something
    model = build_tiny_hf_vit()
    adapter, report = read_adapter(tmp_path / "p", models={"model": model}, strict=True)
    assert report.format == "peft" and set(report.kinds) == {LABELS[which.split("-")[0]]}
    assert sum(report.kinds.values()) == 10
    adapter.apply_to({"model": model})
    assert (vit_logits(model) - want).abs().max() < TOL


def _sd_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 7, 32, generator=g)


@torch.no_grad()
def unet_out(unet) -> torch.Tensor:
    sample, t, ehs = _sd_inputs()
    return unet(sample, t, encoder_hidden_states=ehs[..., : unet.config.cross_attention_dim]).sample


@pytest.mark.parametrize("which", ["loha-tucker", "lokr-both-factor", "dora"])
def test_peft_folder_of_kind_through_the_pipeline_loader_on_sd_unet(which, tmp_path):
    from lora_vision.pipeline import load_adapter

    pm = _peft_folder(build_tiny_sd("sd1").unet, peft_configs(UNET_TARGETS)[which], tmp_path / "p")
    want = unet_out(pm.base_model.model)
    pipe = build_tiny_sd("sd1")
    assert (want - unet_out(pipe.unet)).abs().max() > 1e-3
    report = load_adapter(pipe, tmp_path / "p", strict=True)
    src = report.source_report
    assert src.format == "peft" and src.ok and not src.invalid
    assert (unet_out(pipe.unet) - want).abs().max() < TOL


def _our_kind(model, adapter_type: str, targets, seed: int = 0, **kind) -> Adapter:
    lv.inject_lora(model, lv.LoRAConfig(rank=2, alpha=3.0, targets=targets, adapter_type=adapter_type, **kind))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lv.lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return Adapter.from_models({"model": model})


@pytest.mark.parametrize("adapter_type,kind", [
    ("loha", {}), ("lokr", {}), ("lokr", {"lokr_factor": 4, "decompose_both": True}), ("lokr", {"full_rank": True}),
    ("dora", {})])
def test_our_kinds_exported_to_peft_load_in_peft_on_vit(adapter_type, kind, tmp_path):
    from peft import PeftModel

    model = build_tiny_hf_vit()
    adapter = _our_kind(model, adapter_type, "hf-vit-attn-mlp", **kind)
    model.eval()
    path = export(adapter, "peft", tmp_path / "p")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == {"loha": "LOHA", "lokr": "LOKR", "dora": "LORA"}[adapter_type]
    assert cfg.get("use_dora", False) == (adapter_type == "dora")
    pm = PeftModel.from_pretrained(build_tiny_hf_vit(), str(path))
    pm.eval()
    assert (vit_logits(pm) - vit_logits(model)).abs().max() < TOL
    back, report = read_adapter(path, models={"model": build_tiny_hf_vit()}, strict=True)
    assert report.kinds == adapter.kinds()
    for key, spec in adapter.layers("model").items():  # the same updates (exact up to a rescale of alpha)
        got = back.layers("model")[key]
        w = model.get_submodule(key).base.weight
        torch.testing.assert_close(got.delta(w), spec.delta(w), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("adapter_type", ["loha", "lokr", "dora"])
def test_our_kinds_on_sd_unet_exported_to_peft_load_in_peft(adapter_type, tmp_path):
    from peft import PeftModel

    unet = build_tiny_sd("sd1").unet
    targets = tuple(UNET_TARGETS) if adapter_type != "lokr" else ("to_q", "to_out.0", "ff.net.2", "proj_in")
    lv.inject_lora(unet, lv.LoRAConfig(rank=2, alpha=3.0, targets=targets, adapter_type=adapter_type))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lv.lora_parameters(unet):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    adapter = Adapter.from_models({"unet": unet})
    path = export(adapter, "peft", tmp_path / "p")
    pm = PeftModel.from_pretrained(build_tiny_sd("sd1").unet, str(path))
    pm.eval()
    assert (unet_out(pm.base_model.model) - unet_out(unet)).abs().max() < TOL


def test_tucker_locon_exports_as_peft_lora_with_its_core_folded(tmp_path):
    from peft import PeftModel

    conv = "up_blocks.1.resnets.0.conv2"
    w = build_tiny_sd("sd1").unet.get_submodule(conv).weight
    g = torch.Generator().manual_seed(0)
    adapter = Adapter({f"unet.{conv}.lora_A.weight": torch.randn(2, w.shape[1], 1, 1, generator=g) * 0.1,
                       f"unet.{conv}.lora_B.weight": torch.randn(w.shape[0], 2, 1, 1, generator=g) * 0.1,
                       f"unet.{conv}.lora.lora_mid": torch.randn(2, 2, 3, 3, generator=g),
                       f"unet.{conv}.alpha": torch.tensor(1.0)})
    path = export(adapter, "peft", tmp_path / "p")
    assert json.loads((path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    pm = PeftModel.from_pretrained(build_tiny_sd("sd1").unet, str(path)).eval()
    ours = build_tiny_sd("sd1").unet
    adapter.apply_to({"unet": ours})
    assert (unet_out(ours) - unet_out(build_tiny_sd("sd1").unet)).abs().max() > 1e-3
    assert (unet_out(pm.base_model.model) - unet_out(ours)).abs().max() < TOL


# ---- bad input ---------------------------------------------------------------------------------------------------

def _vit_folder(tmp_path, which: str):
    path = tmp_path / which
    _peft_folder(build_tiny_hf_vit(), peft_configs(VIT_TARGETS)[which], path)
    return path, load_file(path / "adapter_model.safetensors"), json.loads((path / "adapter_config.json").read_text())


MOD = "vit.layers.0.attention.q_proj"


def _expect_named(path, expect: str) -> None:
    adapter, report = read_adapter(path, models={"model": build_tiny_hf_vit()})
    assert any(MOD in line and expect in line for line in report.invalid), report.invalid
    assert f"model.{MOD}" not in report.matched and len(report.matched) == 9  # the broken module alone is skipped
    with pytest.raises(AdapterMismatchError, match=re.escape(expect)):
        read_adapter(path, models={"model": build_tiny_hf_vit()}, strict=True)


def test_peft_type_that_does_not_match_the_keys_is_named(tmp_path):
    path, sd, cfg = _vit_folder(tmp_path, "loha")
    lora_a, lora_b = torch.randn(2, 32), torch.randn(32, 2)
    sd = {k: v for k, v in sd.items() if MOD not in k} | {f"base_model.model.{MOD}.lora_A.weight": lora_a,
                                                          f"base_model.model.{MOD}.lora_B.weight": lora_b}
    save_file(sd, str(path / "adapter_model.safetensors"))
    _expect_named(path, "has LoRA tensors (lora_A.weight, lora_B.weight) but adapter_config.json declares LoHa")
    cfg["peft_type"] = "LORA"  # now every other module disagrees with the config: nothing but q_proj fits
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    _, report = read_adapter(path, models={"model": build_tiny_hf_vit()})
    assert len(report.invalid) == 9 and report.matched == [f"model.{MOD}"]


def test_lokr_with_half_its_tensors_is_named(tmp_path):
    path, sd, _ = _vit_folder(tmp_path, "lokr")
    assert f"base_model.model.{MOD}.lokr_w2_b" in sd
    del sd[f"base_model.model.{MOD}.lokr_w2_b"]
    save_file(sd, str(path / "adapter_model.safetensors"))
    _expect_named(path, "lacks lokr_w2 (or lokr_w2_a and lokr_w2_b)")


def test_dora_magnitude_of_the_wrong_length_is_named(tmp_path):
    path, sd, _ = _vit_folder(tmp_path, "dora")
    sd[f"base_model.model.{MOD}.lora_magnitude_vector"] = torch.ones(33)
    save_file(sd, str(path / "adapter_model.safetensors"))
    _expect_named(path, "lora_magnitude_vector has shape (33,) (33 values) but lora_B has 32 output rows")


def test_use_dora_without_magnitude_is_named(tmp_path):
    path, sd, _ = _vit_folder(tmp_path, "dora")
    del sd[f"base_model.model.{MOD}.lora_magnitude_vector"]
    save_file(sd, str(path / "adapter_model.safetensors"))
    _expect_named(path, "declares LoRA+DoRA (peft_type LORA, use_dora true)")


def test_peft_type_we_do_not_read_is_refused(tmp_path):
    path, _, cfg = _vit_folder(tmp_path, "loha")
    cfg["peft_type"] = "OFT"
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match="peft_type 'OFT' is not supported; lora_vision reads peft's LORA, "
                                               "LOHA, LOKR"):
        read_adapter(path)


def test_kinds_peft_lacks_and_mixtures_are_refused_and_nothing_is_written(tmp_path):
    model = build_tiny_hf_vit()
    lv.inject_lora(model, lv.LoRAConfig(rank=2, targets=("q_proj",), adapter_type="loha"))
    lv.inject_lora(model, lv.LoRAConfig(rank=2, targets=("v_proj",), adapter_type="lokr"))
    mixed = Adapter.from_models({"model": model})
    with pytest.raises(PeftExportError, match=r"model mixes LoHa \(model\.vit\.layers\.0\.attention\.q_proj\) and "
                                              r"LoKr .*one kind .*--to lora_vision"):
        export(mixed, "peft", tmp_path / "mixed")
    oft = Adapter({"model.vit.layers.0.attention.q_proj.oft.oft_blocks": torch.zeros(4, 8, 8),
                   "model.vit.layers.0.attention.q_proj.alpha": torch.tensor(0.0)})
    with pytest.raises(PeftExportError, match=r"model\.vit\.layers\.0\.attention\.q_proj: OFT layers have no peft "
                                              r"form; peft folders hold LoRA, LoRA\+DoRA, LoHa and LoKr"):
        export(oft, "peft", tmp_path / "oft")
    key = "model.vit.layers.0.attention.q_proj"
    on_input = Adapter({f"{key}.lora_A.weight": torch.randn(2, 32), f"{key}.lora_B.weight": torch.randn(32, 2),
                        f"{key}.lora.dora_scale": torch.ones(1, 32), f"{key}.alpha": torch.tensor(2.0)})
    with pytest.raises(PeftExportError, match=r"dora_scale \(1, 32\) is one value per input column"):
        export(on_input, "peft", tmp_path / "in")
    assert not any(tmp_path.iterdir())


def test_convert_to_peft_of_a_mixture_is_one_line_and_exit_1(tmp_path, capsys):
    from lora_vision.cli import main

    model = build_tiny_hf_vit()
    lv.inject_lora(model, lv.LoRAConfig(rank=2, targets=("q_proj",), adapter_type="loha"))
    lv.inject_lora(model, lv.LoRAConfig(rank=2, targets=("v_proj",), adapter_type="dora"))
    src = Adapter.from_models({"model": model}).save(tmp_path / "mixed.safetensors")
    assert main(["convert", str(src), "--to", "peft", "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "model mixes" in err and "LoHa (" in err and "LoRA+DoRA (" in err
    assert not (tmp_path / "out").exists()
