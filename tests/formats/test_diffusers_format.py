"""diffusers format and compatibility with diffusers itself: golden keys, alpha through lora_adapter_metadata,
`pipe.load_lora_weights` of our diffusers and kohya exports equal to our runtime path (UNet and text encoders,
strengths 0 / 0.5 / 1 / 1.3), files written by diffusers' own `save_lora_weights`, and the older spellings."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import make_sd_adapter, sd_components
from lora_vision import set_strength
from lora_vision.formats import detect_format, export, load_any
from lora_vision.models import TINY_LATENT_SIZE, build_tiny_sd

STRENGTHS = (0.0, 0.5, 1.0, 1.3)
TOL = 1e-4


def _inputs(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    cross = pipe.unet.config.cross_attention_dim
    x = {"sample": torch.randn(1, 4, TINY_LATENT_SIZE, TINY_LATENT_SIZE, generator=g), "timestep": torch.tensor(500),
         "encoder_hidden_states": torch.randn(1, 7, cross, generator=g)}
    if pipe.unet.config.addition_embed_type == "text_time":
        x["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g),
                                  "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    ids = torch.randint(0, 300, (1, 9), generator=g)
    return x, ids


@torch.no_grad()
def _outputs(pipe, x, ids):
    out = {"unet": pipe.unet(**x).sample}
    for c in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, c, None) is not None:
            out[c] = getattr(pipe, c)(ids).last_hidden_state
    return out


def _maxdiff(a, b):
    return {k: (a[k] - b[k]).abs().max().item() for k in a}


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def setup(request, tmp_path_factory):
    kind = request.param
    d = tmp_path_factory.mktemp(f"diffusers_{kind}")
    ad = make_sd_adapter(kind, locon=True, alpha=2.0, te_alpha=6.0)  # alpha != rank everywhere
    files = {"diffusers": export(ad, "diffusers", d / "pytorch_lora_weights.safetensors"),
             "kohya": export(ad, "kohya", d / "kohya.safetensors", base=kind)}
    return kind, ad, files


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_load_lora_weights_equals_our_runtime(setup, fmt):
    kind, _, files = setup
    ref = build_tiny_sd(kind)
    ref.load_lora_weights(str(files[fmt]), adapter_name="x")
    ours = build_tiny_sd(kind)
    adapter, report = load_any(files[fmt], models=sd_components(ours), strict=True)
    adapter.apply_to(sd_components(ours))
    x, ids = _inputs(ours)
    base = _outputs(build_tiny_sd(kind), x, ids)
    for s in STRENGTHS:
        ref.set_adapters(["x"], adapter_weights=[s])
        for m in sd_components(ours).values():
            set_strength(m, s)
        a, b = _outputs(ref, x, ids), _outputs(ours, x, ids)
        diff = _maxdiff(a, b)
        assert max(diff.values()) < TOL, (fmt, s, diff)
        moved = _maxdiff(b, base)
        assert (max(moved.values()) == 0.0) if s == 0 else all(v > 1e-3 for v in moved.values()), (s, moved)


def test_short_pipeline_call_matches(tmp_path):
    """One short end-to-end call (SD 1.x, 2 steps) on top of the forward-level checks above."""
    path = export(make_sd_adapter("sd1", locon=True, te_alpha=6.0), "diffusers", tmp_path / "a.safetensors")
    ref, ours = build_tiny_sd("sd1"), build_tiny_sd("sd1")
    ref.load_lora_weights(str(path), adapter_name="x")
    ref.set_adapters(["x"], adapter_weights=[0.5])
    load_any(path, models=sd_components(ours))[0].apply_to(sd_components(ours), strength=0.5)
    kw = dict(prompt="a photo of sks toy", num_inference_steps=2, height=64, width=64, output_type="np")
    a = ref(generator=torch.Generator().manual_seed(0), **kw).images
    b = ours(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(a - b).max() < TOL


def test_golden_keys_and_metadata(setup):
    kind, ad, files = setup
    sd = load_file(files["diffusers"])
    n_unet = {"sd1": 117, "sdxl": 177}[kind]
    assert len(sd) == 2 * (n_unet + 12 * (2 if kind == "sdxl" else 1))
    assert "unet.down_blocks.0.resnets.0.conv1.lora_A.weight" in sd if kind == "sd1" else \
        "unet.down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_out.0.lora_B.weight" in sd
    assert "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_A.weight" in sd
    assert ("text_encoder_2.text_model.encoder.layers.0.mlp.fc2.lora_B.weight" in sd) == (kind == "sdxl")
    assert not any(k.endswith(".alpha") for k in sd)
    with safe_open(str(files["diffusers"]), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 2.0 and meta["text_encoder.lora_alpha"] == 6.0
    assert set(meta["unet.rank_pattern"].values()) == {2}  # the 3x3 convs (conv_rank 2, conv_alpha 1)
    assert detect_format(files["diffusers"]) == "diffusers"


def test_round_trip_byte_stable(setup, tmp_path):
    kind, ad, files = setup
    back, report = load_any(files["diffusers"], strict=True)
    assert report.format == "diffusers" and report.base == kind
    assert all(torch.equal(back.tensors[k], ad.tensors[k]) for k in ad.tensors if not k.startswith("full."))
    again = export(back, "diffusers", tmp_path / "again.safetensors")
    a, b = load_file(files["diffusers"]), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with safe_open(str(files["diffusers"]), "pt") as f1, safe_open(str(again), "pt") as f2:
        assert f1.metadata()["lora_adapter_metadata"] == f2.metadata()["lora_adapter_metadata"]


def test_file_from_diffusers_save_lora_weights(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ref = build_tiny_sd("sd1")
    ucfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"],
                      init_lora_weights=False)
    tcfg = LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False)
    torch.manual_seed(0)
    ref.unet.add_adapter(ucfg)
    ref.text_encoder.add_adapter(tcfg)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(ref.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    ours = build_tiny_sd("sd1")
    adapter, report = load_any(path, models=sd_components(ours), strict=True)
    assert report.format == "diffusers" and len(report.matched) == len(load_file(path)) // 2
    adapter.apply_to(sd_components(ours))
    x, ids = _inputs(ours)
    diff = _maxdiff(_outputs(ref, x, ids), _outputs(ours, x, ids))
    assert max(diff.values()) < TOL, diff
    # The same file through diffusers' own loader agrees too.
    again = build_tiny_sd("sd1")
    again.load_lora_weights(str(path))
    assert max(_maxdiff(_outputs(again, x, ids), _outputs(ours, x, ids)).values()) < TOL


def test_older_spellings(setup, tmp_path):
    kind, ad, files = setup
    if kind != "sd1":
        pytest.skip("one architecture is enough for the spellings")
    sd = load_file(files["diffusers"])
    alphas = {k.replace(".lora_A.weight", ".alpha"): torch.tensor(2.0 if k.startswith("unet") else 6.0)
              for k in sd if k.endswith(".lora_A.weight")}

    def old(k: str) -> str:
        k = k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
        for p in ("to_q", "to_k", "to_v"):
            k = k.replace(f".{p}.lora.", f".processor.{p}_lora.")
        k = k.replace(".to_out.0.lora.", ".processor.to_out_lora.")
        if k.startswith("text_encoder."):
            k = k.replace(".lora.down.", ".lora_linear_layer.down.").replace(".lora.up.", ".lora_linear_layer.up.")
        return k

    conv = {old(k): v for k, v in sd.items()}
    assert any(".processor.to_out_lora.down.weight" in k for k in conv)
    conv.update(alphas)  # network alphas, as older conversions stored them
    # rank-2 conv entries carry alpha 1 in the adapter
    for k in list(conv):
        if k.endswith(".alpha") and "conv1" in k or k.endswith(".alpha") and "conv2" in k or \
                k.endswith(".alpha") and "samplers" in k:
            conv[k] = torch.tensor(1.0)
    path = tmp_path / "old.safetensors"
    save_file(conv, str(path))
    back, report = load_any(path, models=sd_components(build_tiny_sd("sd1")), strict=True)
    assert report.ok and back.tensors.keys() == ad.tensors.keys()
    assert all(torch.equal(back.tensors[k], ad.tensors[k]) for k in ad.tensors)


_TB = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
       "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"]
_CLIP = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]
_SD_BLOCKS = ["down_blocks.0.attentions.0", "down_blocks.0.attentions.1", "mid_block.attentions.0",
              "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"]
_XL_BLOCKS = ["down_blocks.1.attentions.0", "down_blocks.1.attentions.1", "mid_block.attentions.0",
              "up_blocks.0.attentions.0", "up_blocks.0.attentions.1", "up_blocks.0.attentions.2"]


def _golden(blocks, depth, encoders):
    mods = [f"unet.{b}.{m}" for b in blocks for m in ["proj_in", "proj_out"]
            + [f"transformer_blocks.{d}.{t}" for d in range(depth) for t in _TB]]
    mods += [f"{e}.text_model.encoder.layers.{i}.{c}" for e in encoders for i in range(2) for c in _CLIP]
    return {f"{m}.lora_{x}.weight" for m in mods for x in "AB"}


@pytest.mark.parametrize("kind,golden", [
    ("sd1", _golden(_SD_BLOCKS, 1, ["text_encoder"])), ("sd2", _golden(_SD_BLOCKS, 1, ["text_encoder"])),
    ("sdxl", _golden(_XL_BLOCKS, 2, ["text_encoder", "text_encoder_2"]))])
def test_golden_key_lists(kind, golden, tmp_path):
    path = export(make_sd_adapter(kind), "diffusers", tmp_path / "a.safetensors")
    sd = load_file(path)
    assert set(sd) == golden and len(golden) == {"sd1": 168, "sd2": 168, "sdxl": 312}[kind]
    assert (sd["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"].dim() == 4) == (kind == "sd1") \
        if kind != "sdxl" else sd["unet.mid_block.attentions.0.proj_in.lora_A.weight"].dim() == 2


def test_unprefixed_unet_file_and_json_inspect(setup, tmp_path, capsys):
    kind, ad, files = setup
    sd = {k.removeprefix("unet."): v for k, v in load_file(files["diffusers"]).items() if k.startswith("unet.")}
    save_file(sd, str(tmp_path / "unet_only.safetensors"))
    back, report = load_any(tmp_path / "unet_only.safetensors")
    assert back.components() == ["unet"] and report.format == "diffusers"
    assert any("alpha = rank" in n for n in report.notes)  # no metadata left: said, not silently assumed
    from lora_vision.cli import main

    assert main(["inspect", str(files["diffusers"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "diffusers" and info["base"] == kind and info["trigger_phrase"] == "sks toy"
    assert info["components"]["text_encoder"]["alphas"] == [6.0]
