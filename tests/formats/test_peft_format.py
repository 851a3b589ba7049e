"""PEFT adapter folders for ViTs: our exports load in PEFT (and transformers' load_adapter) with the same outputs,
folders written by peft's save_pretrained import exactly, transformers-4 ViT names convert, fused q/k/v (timm qkv,
torchvision MultiheadAttention) round-trip exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import randomize_lora
from lora_vision import LoRAConfig, inject_lora
from lora_vision.adapter import Adapter
from lora_vision.formats import detect_format, export, load_any, naming
from lora_vision.formats.peft import PEFT_MHA_OUT_PROJ_FACTOR
from lora_vision.models import build_tiny_hf_vit, build_tiny_timm_vit, build_tiny_torchvision_vit

TOL = 1e-5
KINDS = {"hf": (build_tiny_hf_vit, "hf-vit-attn-mlp", "classifier"),
         "timm": (build_tiny_timm_vit, "timm-vit-attn-mlp", "head"),
         "tv": (build_tiny_torchvision_vit, "tv-vit-attn-mlp", "heads.head")}
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model):
    out = model(X)
    return getattr(out, "logits", out)


def ours(kind, parts=("q", "k", "v", "o")):
    build, preset, head = KINDS[kind]
    m = build()
    inject_lora(m, LoRAConfig(rank=3, alpha=5, targets=preset, fused_parts=parts))
    randomize_lora(m, seed=1, std=0.2)
    with torch.no_grad():
        m.get_submodule(head).weight.add_(0.5)  # a "trained" head, stored in full
    return m, Adapter.from_models({"model": m}, full_modules={"model": [head]})


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_loads_in_peft_with_same_outputs(kind, tmp_path):
    from peft import PeftModel

    m, ad = ours(kind, ("q", "v", "o") if kind == "tv" else ("q", "k", "v", "o"))
    path = export(ad, "peft", tmp_path / "a")
    assert detect_format(path) == "peft"
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] == [KINDS[kind][2]]
    pm = PeftModel.from_pretrained(KINDS[kind][0](), str(path))
    assert (logits(pm) - logits(m)).abs().max() < TOL
    back, report = load_any(path, models={"model": KINDS[kind][0]()}, strict=True)
    assert back.tensors.keys() == ad.tensors.keys()
    assert all(torch.equal(back.tensors[k], ad.tensors[k]) for k in ad.tensors)  # exact, fused parts included
    again = export(back, "peft", tmp_path / "b")
    a, b = load_file(path / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_golden_keys_hf_vit(tmp_path):
    _, ad = ours("hf")
    sd = load_file(export(ad, "peft", tmp_path / "a") / "adapter_model.safetensors")
    mods = [f"vit.layers.{i}.{m}" for i in range(2) for m in ("attention.q_proj", "attention.k_proj",
                                                               "attention.v_proj", "attention.o_proj", "mlp.fc1",
                                                               "mlp.fc2")]
    want = {f"base_model.model.{m}.lora_{x}.weight" for m in mods for x in "AB"} | \
        {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert set(sd) == want


def test_timm_golden_keys_block_diagonal(tmp_path):
    _, ad = ours("timm")
    sd = load_file(export(ad, "peft", tmp_path / "a") / "adapter_model.safetensors")
    assert sd["base_model.model.blocks.0.attn.qkv.lora_A.weight"].shape == (9, 32)  # A_cat: 3 parts x rank 3
    b = sd["base_model.model.blocks.0.attn.qkv.lora_B.weight"]
    assert b.shape == (96, 9) and b[:32, 3:].abs().sum() == 0 and b[32:64, :3].abs().sum() == 0
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["alpha_pattern"]["blocks.0.attn.qkv"] == 15.0  # alpha x 3 keeps alpha / rank


def test_transformers_load_adapter(tmp_path):
    m, ad = ours("hf")
    path = export(ad, "peft", tmp_path / "a")
    vit = build_tiny_hf_vit()
    vit.load_adapter(str(path))
    assert (logits(vit) - logits(m)).abs().max() < TOL


@pytest.mark.parametrize("kind", list(KINDS))
def test_peft_save_pretrained_imports(kind, tmp_path):
    from peft import LoraConfig, get_peft_model

    targets = {"hf": ["q_proj", "v_proj", "fc1"], "timm": ["qkv", "proj"], "tv": ["self_attention"]}[kind]
    torch.manual_seed(0)
    pm = get_peft_model(KINDS[kind][0](), LoraConfig(r=4, lora_alpha=7, target_modules=targets,
                                                     modules_to_save=[KINDS[kind][2]], init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "p"))
    model = KINDS[kind][0]()
    adapter, report = load_any(tmp_path / "p", models={"model": model}, strict=True)
    assert report.format == "peft" and report.full_weights
    adapter.apply_to({"model": model})
    pm.eval()
    assert (logits(pm) - logits(model)).abs().max() < TOL


def test_transformers4_vit_names_convert(tmp_path):
    m, ad = ours("hf")
    path = export(ad, "peft", tmp_path / "v5")
    sd = load_file(path / "adapter_model.safetensors")
    v4 = {}
    for k, v in sd.items():
        mod, _, rest = k.removeprefix("base_model.model.").partition(".lora_")
        v4["base_model.model." + naming.vit_v5_to_v4(mod) + (".lora_" + rest if rest else "")] = v
    assert any("attention.attention.query" in k for k in v4)
    (tmp_path / "v4").mkdir()
    save_file(v4, str(tmp_path / "v4" / "adapter_model.safetensors"))
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["target_modules"] = sorted(naming.vit_v5_to_v4(t) for t in cfg["target_modules"])
    (tmp_path / "v4" / "adapter_config.json").write_text(json.dumps(cfg))
    model = build_tiny_hf_vit()
    adapter, _ = load_any(tmp_path / "v4", models={"model": model}, strict=True)
    adapter.apply_to({"model": model})
    assert (logits(model) - logits(m)).abs().max() < TOL


def test_peft_mha_out_proj_factor_is_what_peft_does():
    """PEFT_MHA_OUT_PROJ_FACTOR mirrors a measured peft behaviour; if peft changes it, this fails."""
    from peft import LoraConfig, get_peft_model

    base = build_tiny_torchvision_vit()
    pm = get_peft_model(build_tiny_torchvision_vit(), LoraConfig(r=2, lora_alpha=2, target_modules=["self_attention"],
                                                                 init_lora_weights=False))
    name = "encoder.layers.encoder_layer_0.self_attention"
    lin = pm.base_model.model.get_submodule(name).base_layer.out_proj
    delta = lin.lora_B["default"].weight @ lin.lora_A["default"].weight
    merged = pm.merge_and_unload().get_submodule(name).out_proj.weight
    got = merged - base.get_submodule(name).out_proj.weight
    assert torch.allclose(got, PEFT_MHA_OUT_PROJ_FACTOR * delta, atol=1e-6)


def test_sd_adapter_as_peft_folders_per_component(tmp_path):
    from peft import PeftModel

    from conftest import make_sd_adapter
    from lora_vision.models import build_tiny_sd

    ad = make_sd_adapter("sd1", unet_targets="unet-attn")
    path = export(ad, "peft", tmp_path / "sd")
    assert sorted(p.name for p in path.iterdir()) == ["text_encoder", "unet"]
    ref, ours = build_tiny_sd("sd1"), build_tiny_sd("sd1")
    te = PeftModel.from_pretrained(ref.text_encoder, str(path / "text_encoder"))
    ad.apply_to({"unet": ours.unet, "text_encoder": ours.text_encoder})
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (te(ids).last_hidden_state - ours.text_encoder(ids).last_hidden_state).abs().max() < TOL
    back, report = load_any(path)
    assert report.format == "peft" and all(torch.equal(back.tensors[k], ad.tensors[k]) for k in ad.tensors)


def _tiny_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, is_encoder_decoder=False,
                                   feed_forward_proj="gated-gelu", decoder_start_token_id=0)).eval()


@pytest.mark.parametrize("with_model", [False, True])
def test_t5_linears_named_q_k_v_o_stay_linears_in_peft(with_model, tmp_path):
    """T5's attention Linears are named q, k, v and o, the letters of fused parts: they stay four Linear targets
    (they used to be written as one MultiheadAttention adapter on `SelfAttention`, which peft cannot load)."""
    from peft import PeftModel

    from lora_vision.formats.peft import export_peft

    m = _tiny_t5()
    inject_lora(m, LoRAConfig(rank=3, alpha=5, targets=("SelfAttention.q", "SelfAttention.k", "SelfAttention.v",
                                                        "SelfAttention.o")))
    randomize_lora(m, seed=1, std=0.2)
    ad = Adapter.from_models({"text_encoder_2": m})
    path = export_peft(ad, tmp_path / "t5", model=m if with_model else None)
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(f"encoder.block.{i}.layer.0.SelfAttention.{p}"
                                                   for i in range(2) for p in "qkvo")
    ids = torch.tensor([[3, 7, 11, 2, 5]])
    theirs = PeftModel.from_pretrained(_tiny_t5(), str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).last_hidden_state, m(input_ids=ids).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def test_t5_linears_named_q_and_o_round_trip_through_the_canonical_state_dict():
    """load_lora_state_dict (checkpoint resume) and load_any with the model match `…SelfAttention.q` as written,
    not as the `q` part of a fused `SelfAttention` (they used to report every such layer both missing and
    unexpected, or the file as made for another base)."""
    from lora_vision.lora.ops import LoRAStateDictError, load_lora_state_dict, lora_state_dict

    cfg = LoRAConfig(rank=2, targets=("SelfAttention.q", "SelfAttention.o"))
    m, other = _tiny_t5(), _tiny_t5()
    for model in (m, other):
        inject_lora(model, cfg)
    randomize_lora(m, seed=3)
    sd = lora_state_dict(m)
    report = load_lora_state_dict(other, sd)
    assert report.ok and len(report.matched) == 4
    ids = torch.tensor([[3, 7, 11, 2]])
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).last_hidden_state, m(input_ids=ids).last_hidden_state)
    # read against the model (load_any with models=): the same four Linear layers, none reported missing
    _, read = load_any(Adapter.from_models({"text_encoder_2": m}).tensors, models={"text_encoder_2": _tiny_t5()},
                       strict=True)
    assert sorted(read.matched) == sorted(f"text_encoder_2.encoder.block.{i}.layer.0.SelfAttention.{p}"
                                          for i in range(2) for p in "qo")
    sd["encoder.block.0.layer.0.SelfAttention.k.lora_A.weight"] = torch.zeros(2, 32)
    sd["encoder.block.0.layer.0.SelfAttention.k.lora_B.weight"] = torch.zeros(32, 2)
    with pytest.raises(LoRAStateDictError, match=r"unexpected \(1\): encoder\.block\.0\.layer\.0\.SelfAttention\.k"):
        load_lora_state_dict(other, sd)
