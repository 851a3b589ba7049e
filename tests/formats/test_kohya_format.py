"""kohya format (lora_vision/formats/kohya.py): golden keys, tensor layout, metadata and hash, round trips, every
import spelling, reports, strict mode and files for another base."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_sd_adapter, sd_components
from lora_vision.adapter import Adapter
from lora_vision.formats import BaseMismatchError, detect_format, export, load_any, naming
from lora_vision.io import AdapterFileError
from lora_vision.lora.ops import parse_canonical
from lora_vision.models import build_tiny_sd, pipeline_base

TB = ["attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k", "attn2_to_v",
      "attn2_to_out_0", "ff_net_0_proj", "ff_net_2"]
CLIP = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]


def _attn(blocks, depth):
    return [f"lora_unet_{b}_{x}" for b in blocks for x in ["proj_in", "proj_out"]
            + [f"transformer_blocks_{d}_{m}" for d in range(depth) for m in TB]]


def _res(blocks, shortcut, names=("conv1", "conv2", "time_emb_proj", "conv_shortcut")):
    return [f"lora_unet_{b}_{n}" for b in blocks for n in names[:3] + ((names[3],) if b in shortcut else ())]


def _te(prefix):
    return [f"{prefix}_text_model_encoder_layers_{i}_{m}" for i in range(2) for m in CLIP]


SD_RES = ["down_blocks_0_resnets_0", "down_blocks_0_resnets_1", "down_blocks_1_resnets_0", "down_blocks_1_resnets_1",
          "mid_block_resnets_0", "mid_block_resnets_1"]
SD_RES += [f"up_blocks_{i}_resnets_{j}" for i in (0, 1) for j in range(3)]
SD_SHORT = {"down_blocks_1_resnets_0"} | {f"up_blocks_{i}_resnets_{j}" for i in (0, 1) for j in range(3)}
GOLDEN_SD = set(
    _attn(["down_blocks_0_attentions_0", "down_blocks_0_attentions_1", "mid_block_attentions_0",
           "up_blocks_1_attentions_0", "up_blocks_1_attentions_1", "up_blocks_1_attentions_2"], 1)
    + _res(SD_RES, SD_SHORT)
    + ["lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_up_blocks_0_upsamplers_0_conv"]
    + _te("lora_te"))
XL_RES = ["input_blocks_1_0", "input_blocks_2_0", "input_blocks_4_0", "input_blocks_5_0", "middle_block_0",
          "middle_block_2"] + [f"output_blocks_{i}_0" for i in range(6)]
XL_SHORT = {"input_blocks_4_0"} | {f"output_blocks_{i}_0" for i in range(6)}
GOLDEN_XL = set(
    _attn(["input_blocks_4_1", "input_blocks_5_1", "middle_block_1", "output_blocks_0_1", "output_blocks_1_1",
           "output_blocks_2_1"], 2)
    + _res(XL_RES, XL_SHORT, ("in_layers_2", "out_layers_3", "emb_layers_1", "skip_connection"))
    + ["lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_2_conv"] + _te("lora_te1") + _te("lora_te2"))


@pytest.fixture(scope="module")
def files(tmp_path_factory, sd1_adapter, sd2_adapter, sdxl_adapter):
    d = tmp_path_factory.mktemp("kohya")
    out = {}
    for kind, ad in (("sd1", sd1_adapter), ("sd2", sd2_adapter), ("sdxl", sdxl_adapter)):
        out[kind] = export(ad, "kohya", d / f"{kind}.safetensors", base=kind, title=f"tiny {kind}")
    return out


@pytest.mark.parametrize("kind,golden,n_tensors", [("sd1", GOLDEN_SD, 387), ("sd2", GOLDEN_SD, 387),
                                                   ("sdxl", GOLDEN_XL, 603)])
def test_golden_keys(files, kind, golden, n_tensors):
    sd = load_file(files[kind])
    assert len(golden) * 3 == n_tensors == len(sd)
    assert {k.split(".", 1)[0] for k in sd} == golden
    assert {k.split(".", 1)[1] for k in sd} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert detect_format(files[kind]) == "kohya"


def test_tensor_layout(files):
    sd1, sd2 = load_file(files["sd1"]), load_file(files["sd2"])
    assert {t.dtype for t in sd1.values()} == {torch.float16}
    assert all(t.dim() == 0 and t.item() > 0 for k, t in sd1.items() if k.endswith(".alpha"))
    conv1 = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert sd1[f"{conv1}.lora_down.weight"].shape[2:] == (3, 3)  # kernel on down
    assert sd1[f"{conv1}.lora_up.weight"].shape[2:] == (1, 1)
    p_in = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert sd1[f"{p_in}.lora_down.weight"].dim() == 4 and sd2[f"{p_in}.lora_down.weight"].dim() == 2
    assert sd1[f"{conv1}.alpha"].item() == 1.0 and sd1[f"{p_in}.alpha"].item() == 2.0


@pytest.mark.parametrize("kind,version,v2,arch,impl", [
    ("sd1", "sd_v1", "False", "stable-diffusion-v1/lora", "diffusers"),
    ("sd2", "sd_v2", "True", "stable-diffusion-v2-512/lora", "diffusers"),
    ("sdxl", "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora",
     "https://github.com/Stability-AI/generative-models")])
def test_metadata_and_hash(files, kind, version, v2, arch, impl):
    raw = files[kind].read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert raw[8:10] == b'{"'  # A1111 asserts this
    meta = json.loads(raw[8:8 + n])["__metadata__"]
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["modelspec.architecture"],
            meta["modelspec.implementation"]) == (version, v2, arch, impl)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert meta["modelspec.trigger_phrase"] == "sks toy" and meta["ss_output_name"] == f"tiny {kind}"
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and "lora_vision.base" in meta


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_round_trip_byte_stable(files, tmp_path, kind):
    pipe = build_tiny_sd(kind)
    adapter, report = load_any(files[kind], models=sd_components(pipe), strict=True)
    assert report.ok and report.format == "kohya" and report.base == kind
    again = export(adapter, "kohya", tmp_path / "again.safetensors")
    a, b = load_file(files[kind]), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m1, m2 = load_any(files[kind])[0].metadata, load_any(again)[0].metadata
    for k in ("modelspec.trigger_phrase", "ss_output_name", "modelspec.title", "sshs_model_hash", "ss_network_dim",
              "ss_network_alpha", "ss_network_args", "ss_base_model_version"):
        assert m1[k] == m2[k], k


def _deltas(adapter: Adapter) -> dict[str, torch.Tensor]:
    out = {}
    for comp in adapter.components():
        for (m, p), e in parse_canonical(adapter.state_dict_for(comp)).items():
            out[f"{comp}.{m}"] = (e["B"].double().flatten(1) @ e["A"].double().flatten(1)) * e["alpha"] / e["rank"]
    return out


def test_alpha_normalisation_keeps_updates(tmp_path):
    ad = make_sd_adapter("sd1", unet_targets="unet-attn", alpha=2.0, te_alpha=8.0)
    path = export(ad, "kohya", tmp_path / "a.safetensors", dtype=torch.float32)
    alphas = {t.item() for k, t in load_file(path).items() if k.endswith(".alpha")}
    assert alphas == {2.0}  # one alpha for the whole file
    back, _ = load_any(path)
    d0, d1 = _deltas(ad), _deltas(back)
    assert d0.keys() == d1.keys()
    assert max((d0[k] - d1[k]).abs().max().item() for k in d0) < 1e-6


def _rename(sd: dict, fn) -> dict:
    return {fn(k.split(".", 1)[0]) + "." + k.split(".", 1)[1]: v for k, v in sd.items()}


def test_import_spellings_give_the_same_adapter(files, tmp_path):
    pipe = build_tiny_sd("sd1")
    comps = sd_components(pipe)
    ref, _ = load_any(files["sd1"], models=comps)
    sd = load_file(files["sd1"])
    mods = list(naming.adaptable_modules(pipe.unet))
    bmap = naming.unet_block_map(pipe.unet.config)
    to_ldm = {naming.kohya_key("lora_unet", m): naming.diffusers_to_ldm(m, bmap) for m in mods}
    variants = {
        "ldm": _rename(sd, lambda k: "lora_unet_" + to_ldm[k].replace(".", "_") if k in to_ldm else k),
        "lycoris": _rename(sd, lambda k: k.replace("lora_unet_", "lycoris_")),
        "te1": _rename(sd, lambda k: k.replace("lora_te_", "lora_te1_")),
        "comfy": _rename(sd, lambda k: "diffusion_model." + to_ldm[k] if k in to_ldm else
                         "text_encoders.clip_l.transformer." + naming.kohya_lookup(
                             "lora_te", naming.clip_file_names(2))[k]),
    }
    for name, v in variants.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(v, str(path))
        got, report = load_any(path, models=comps, strict=True)
        assert report.ok and len(report.matched) == 129, name
        assert got.tensors.keys() == ref.tensors.keys(), name
        assert all(torch.equal(got.tensors[k], ref.tensors[k]) for k in ref.tensors), name
        nomodel, _ = load_any(path)  # standard layouts when no model is given
        assert nomodel.tensors.keys() == ref.tensors.keys(), name


def test_sdxl_diffusers_named_kohya_file(files, tmp_path):
    sd = load_file(files["sdxl"])
    pipe = build_tiny_sd("sdxl")
    bmap = naming.unet_block_map(pipe.unet.config)
    back = {naming.kohya_key("lora_unet", naming.diffusers_to_ldm(m, bmap)): naming.kohya_key("lora_unet", m)
            for m in naming.adaptable_modules(pipe.unet)}
    save_file(_rename(sd, lambda k: back.get(k, k)), str(tmp_path / "d.safetensors"))
    a, _ = load_any(tmp_path / "d.safetensors", models=sd_components(pipe), strict=True)
    b, _ = load_any(files["sdxl"], models=sd_components(pipe), strict=True)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in b.tensors)


K_SCALE_LIVE = "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"
K_SCALE = "lora_unet_" + K_SCALE_LIVE.replace(".", "_")


def test_report_unknown_unsupported_and_strict(files, tmp_path):
    sd = load_file(files["sd1"])
    sd["lora_unet_down_blocks_0_attentions_0_proj_in.dora_scale"] = torch.ones(32, 1)
    sd["lora_unet_mid_block_resnets_0_conv1.hada_w1_a"] = torch.ones(2, 2)
    sd["lora_unet_not_a_module_anywhere.lora_down.weight"] = torch.ones(4, 8)
    sd["lora_unet_not_a_module_anywhere.lora_up.weight"] = torch.ones(8, 4)
    sd["bundle_emb.sks.string_to_param.*"] = torch.ones(1, 32)
    sd[f"{K_SCALE}.scale"] = torch.tensor(0.25, dtype=torch.float16)  # A1111: overrides alpha / r
    path = tmp_path / "extra.safetensors"
    save_file(sd, str(path))
    comps = sd_components(build_tiny_sd("sd1"))
    adapter, report = load_any(path, models=comps)
    assert "lora_unet_not_a_module_anywhere" in report.not_found
    # Adapter kinds (issue 13): the DoRA module is applied as LoRA+DoRA; the LoHa module has a quarter of its
    # factors, so it is named as broken and skipped whole, never half-applied.
    assert any("hada_w1_a" in u and "lacks" in u for u in report.invalid)
    assert report.kinds == {"LoRA": 127, "LoRA+DoRA": 1}
    # Bundled text embeddings (pivotal tuning, issue 18) are read as embeddings, not left unused.
    assert "bundle_emb.sks.string_to_param.*" not in report.unused and "sks" in adapter.embeddings()
    assert len(report.matched) == 128
    assert adapter.tensors[f"unet.{K_SCALE_LIVE}.alpha"].item() == 0.25 * 4
    with pytest.raises(AdapterFileError, match="strict"):
        load_any(path, models=comps, strict=True)


def test_file_for_another_base_is_an_error(files):
    sd1 = sd_components(build_tiny_sd("sd1"))
    with pytest.raises(BaseMismatchError, match="looks like a sdxl LoRA but the target is sd1"):
        load_any(files["sdxl"], models=sd1)
    with pytest.raises(BaseMismatchError, match="looks like a sd1 LoRA but the target is sdxl"):
        load_any(files["sd1"], models=sd_components(build_tiny_sd("sdxl")), strict=False)
    unet_only = {k: v for k, v in load_file(files["sdxl"]).items() if k.startswith("lora_unet_input_blocks_4_1_")}
    with pytest.raises(BaseMismatchError, match="looks like a sdxl LoRA"):  # depth-2 blocks SD 1.x does not have
        load_any(unet_only, models=sd1)
    from transformers import CLIPTextConfig, CLIPTextModel

    wide = CLIPTextModel(CLIPTextConfig(hidden_size=48, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, vocab_size=300))
    with pytest.raises(BaseMismatchError, match="another base"):
        load_any(files["sd1"], models={"unet": sd1["unet"], "text_encoder": wide})


def test_base_from_a_pipeline_sets_family_and_v_prediction(sd2_adapter, tmp_path):
    pipe = build_tiny_sd("sd2")  # the tiny SD 2.x pipeline predicts v, like SD 2.1 768
    path = export(sd2_adapter, "kohya", tmp_path / "v.safetensors", base=pipeline_base(pipe),
                  unet_config=dict(pipe.unet.config))
    meta = load_any(path)[0].metadata
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["modelspec.prediction_type"],
            meta["modelspec.resolution"]) == ("sd_v2_v", "True", "v", "768x768")
    assert load_any(path)[1].base == "sd2-v"


def test_a_pipeline_as_base_is_a_type_error_that_says_what_to_pass(sd2_adapter, tmp_path):
    pipe = build_tiny_sd("sd2")
    for base in (pipe, pipe.unet):
        with pytest.raises(TypeError, match=r"base is a \w+; expected a family name.*pipeline_base\(pipe\), "
                                            r"unet_config=dict\(pipe.unet.config\)"):
            export(sd2_adapter, "kohya", tmp_path / "p.safetensors", base=base)
    assert not list(tmp_path.iterdir())  # nothing written


def test_components_not_given_are_an_error_that_says_so(files):
    pipe = build_tiny_sd("sdxl")
    with pytest.raises(AdapterFileError, match=r"\['text_encoder_2'\], which were not given"):
        load_any(files["sdxl"], models={"unet": pipe.unet, "text_encoder": pipe.text_encoder})


def _header_meta(path) -> dict:
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])["__metadata__"]


def test_values_beyond_fp16_fall_back_to_fp32_with_a_warning_or_fail_when_fp16_was_asked(tmp_path):
    ad = make_sd_adapter("sd1", unet_targets="unet-cross-attn")
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.lora_B.weight"
    ad = Adapter(dict(ad.tensors), dict(ad.metadata))
    ad.tensors[key] = ad.tensors[key].clone()
    ad.tensors[key][0, 0] = 1e5  # finite in fp32, Inf in fp16 (max 65504)
    with pytest.warns(UserWarning, match=r"exceed float16's largest value 65504 .*attn2_to_q\.lora_up\.weight = "
                                         r"100000.*float32 instead"):
        path = export(ad, "kohya", tmp_path / "big.safetensors")
    sd = load_file(path)
    assert {t.dtype for t in sd.values()} == {torch.float32}
    back, _ = load_any(path)  # our loader refuses Inf: the file must load, with the value intact
    assert back.tensors[key].max().item() == 1e5
    with pytest.raises(ValueError, match="would be written as Inf"):
        export(ad, "kohya", tmp_path / "fp16.safetensors", dtype=torch.float16)
    assert not (tmp_path / "fp16.safetensors").exists()
    # Within range the default stays fp16, without a warning.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = export(make_sd_adapter("sd1", unet_targets="unet-cross-attn"), "kohya", tmp_path / "s.safetensors")
    assert {t.dtype for t in load_file(small).values()} == {torch.float16}


def test_shared_file_has_no_local_paths_the_real_resolution_and_a1111_model_and_tags(tmp_path):
    ad = make_sd_adapter("sd1", unet_targets="unet-cross-attn")
    config = {"instance_data_dir": "/home/alice/private/dog photos/", "output_dir": "/home/alice/runs/dog",
              "class_data_dir": "C:\\Users\\alice\\class", "pretrained_model_name_or_path": "/models/sd15-local",
              "resolution": 64, "instance_prompt": "a photo of sks dog", "logging_dir": "logs"}
    ad.metadata.update({"lora_vision.training_config": json.dumps(config),
                        "lora_vision.base_model": "/models/sd15-local", "lora_vision.base": "sd1"})
    path = export(ad, "kohya", tmp_path / "share.safetensors", trigger_phrase="a photo of sks dog")
    meta = _header_meta(path)
    assert not [k for k, v in meta.items() if "alice" in v or "/models" in v]
    shared = json.loads(meta["lora_vision.training_config"])
    assert (shared["instance_data_dir"], shared["output_dir"], shared["class_data_dir"]) == ("dog photos", "dog",
                                                                                          "class")
    assert shared["instance_prompt"] == "a photo of sks dog" and shared["resolution"] == 64
    assert meta["modelspec.resolution"] == "64x64"
    assert meta["ss_sd_model_name"] == "sd15-local"
    assert json.loads(meta["ss_tag_frequency"]) == {"dog photos": {"a photo of sks dog": 1}}
    # Captions the trainer recorded win over the trigger phrase.
    from lora_vision.formats.kohya import tag_frequency

    ad.metadata["ss_tag_frequency"] = tag_frequency(["sks dog, on grass", "sks dog, in snow, on grass"],
                                                    "/data/10_sks dog")
    meta = _header_meta(export(ad, "kohya", tmp_path / "tags.safetensors"))
    assert json.loads(meta["ss_tag_frequency"]) == {"10_sks dog": {"sks dog": 2, "on grass": 2, "in snow": 1}}
