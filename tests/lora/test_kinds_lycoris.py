"""Every adapter kind against lycoris-lora (a test-only oracle): a LyCORIS module with random non-zero factors on a
layer of the tiny SD 1.x / SDXL models, its state dict in kohya naming, read by our kohya reader, applied by our
wrappers; the effective weight equals LyCORIS' merged weight to 1e-5 at strength 1, and W + s * Δ at strength 0.5
(the ComfyUI rule, see lora.kinds; LyCORIS interpolates DoRA / OFT / BOFT differently at other strengths)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_vision import merge_lora, set_strength, unmerge_lora
from lora_vision.adapter import Adapter
from lora_vision.formats import load_any
from lora_vision.formats.kohya import kohya_tensors
from lora_vision.models import build_tiny_sd

lycoris_modules = pytest.importorskip("lycoris.modules")
from lycoris.modules import boft, diag_oft, full, ia3, locon, loha, lokr, norms  # noqa: E402

# (id, LyCORIS class, its options, which layers: "lin", "conv" or both, expected label)
CASES = [
    ("lora", locon.LoConModule, {}, "LoRA"),
    ("locon-tucker", locon.LoConModule, {"use_tucker": True}, None),
    ("dora-out", locon.LoConModule, {"weight_decompose": True}, "LoRA+DoRA"),
    ("dora-in", locon.LoConModule, {"weight_decompose": True, "wd_on_out": False}, "LoRA+DoRA"),
    # LyCORIS' own merge multiplies LoHa and LoKr updates by the scale twice (get_weight and get_diff_weight);
    # A1111 and ComfyUI scale once. alpha = rank (scale 1) here, where all agree; see test_loha_lokr_scale_once.
    ("loha", loha.LohaModule, {"alpha": 4.0}, "LoHa"),
    ("loha-tucker", loha.LohaModule, {"use_tucker": True, "alpha": 4.0}, None),
    ("loha-dora", loha.LohaModule, {"weight_decompose": True, "alpha": 4.0}, "LoHa+DoRA"),
    ("lokr", lokr.LokrModule, {"factor": 4, "alpha": 4.0}, "LoKr"),
    ("lokr-both", lokr.LokrModule, {"factor": 2, "decompose_both": True, "lora_dim": 1, "alpha": 1.0}, "LoKr"),
    ("lokr-full", lokr.LokrModule, {"full_matrix": True, "alpha": 3.0}, "LoKr"),
    ("lokr-tucker", lokr.LokrModule, {"factor": 4, "use_tucker": True, "alpha": 4.0}, None),
    ("lokr-dora", lokr.LokrModule, {"factor": 4, "weight_decompose": True, "alpha": 4.0}, "LoKr+DoRA"),
    ("oft", diag_oft.DiagOFTModule, {"rescaled": True, "constraint": 1e-3}, "OFT"),
    ("oft-free", diag_oft.DiagOFTModule, {}, "OFT"),
    ("boft", boft.ButterflyOFTModule, {}, "BOFT"),
    ("boft-constrained", boft.ButterflyOFTModule, {"rescaled": True, "constraint": 1e-3}, "BOFT"),
    # LyCORIS before 2.1 wrote the rotation R itself as `oft_diag` (its custom_state_dict returned get_r()); the
    # same modules written that way give the same weight
    ("oft-diag", diag_oft.DiagOFTModule, {"constraint": 1e-3}, "OFT"),
    ("oft-diag-rescaled", diag_oft.DiagOFTModule, {"rescaled": True}, "OFT"),
    ("boft-diag", boft.ButterflyOFTModule, {"constraint": 1e-3}, "BOFT"),
    ("ia3-out", ia3.IA3Module, {}, "(IA)^3"),
    ("ia3-in", ia3.IA3Module, {"train_on_input": True}, "(IA)^3"),
    ("full", full.FullModule, {}, "full diff"),
    ("norm", norms.NormModule, {}, "norm"),  # w_norm / b_norm on the layers of NORM_LAYERS
]

# (component, live module name, kohya module key): a Linear and a 3x3 Conv2d of each UNet, and a text-encoder
# Linear (SDXL: the second encoder, lora_te2_).
LAYERS = {
    "sd1": [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
            ("unet", "down_blocks.0.resnets.0.conv1", "lora_unet_down_blocks_0_resnets_0_conv1"),
            ("text_encoder", "encoder.layers.0.mlp.fc1", "lora_te_text_model_encoder_layers_0_mlp_fc1")],
    "sdxl": [("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
              "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"),
             ("unet", "up_blocks.0.resnets.0.conv2", "lora_unet_up_blocks_0_resnets_0_conv2"),
             ("text_encoder_2", "text_model.encoder.layers.1.self_attn.out_proj",
              "lora_te2_text_model_encoder_layers_1_self_attn_out_proj")],
}



def _sdxl_key(live: str) -> str:  # SDXL UNet norms as kohya names them: SGM names (input_blocks_1_0_in_layers_0)
    from lora_vision.formats import naming
    return naming.kohya_key("lora_unet", naming.diffusers_to_ldm(live, naming.unet_block_map(
        dict(build_tiny_sd("sdxl").unet.config))))


# (component, live module name, kohya module key) of a GroupNorm (ResNet, transformer input) and a LayerNorm
# (transformer block, CLIP) of each model.
NORM_LAYERS = {
    "sd1": [("unet", "down_blocks.0.resnets.0.norm1", "lora_unet_down_blocks_0_resnets_0_norm1"),
            ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.norm1",
             "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_norm1"),
            ("text_encoder", "encoder.layers.0.layer_norm1", "lora_te_text_model_encoder_layers_0_layer_norm1")],
    "sdxl": [("unet", "down_blocks.0.resnets.0.norm1", None), ("unet", "down_blocks.1.attentions.0.norm", None),
             ("text_encoder_2", "text_model.final_layer_norm", "lora_te2_text_model_final_layer_norm")],
}


def _forward(base: nn.Module, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What `base` computes with weight `w` and bias `bias` instead of its own."""
    if isinstance(base, nn.GroupNorm):
        return nn.functional.group_norm(x, base.num_groups, w, bias, base.eps)
    if isinstance(base, nn.LayerNorm):
        return nn.functional.layer_norm(x, base.normalized_shape, w, bias, base.eps)
    if isinstance(base, nn.Conv2d):
        return nn.functional.conv2d(x, w, bias, base.stride, base.padding)
    return nn.functional.linear(x, w, bias)


def _input(base: nn.Module, w: torch.Tensor) -> torch.Tensor:
    if isinstance(base, nn.GroupNorm):
        return torch.randn(2, base.num_channels, 5, 5)
    if isinstance(base, nn.LayerNorm):
        return torch.randn(2, 3, *base.normalized_shape)
    return torch.randn(2, w.shape[1], *([5, 5] if w.dim() == 4 else []))


@pytest.fixture(scope="module")
def pipes():
    return {k: build_tiny_sd(k) for k in LAYERS}


def _components(pipe) -> dict[str, nn.Module]:
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        comps["text_encoder_2"] = pipe.text_encoder_2
    return comps


def _lycoris(cls, org: nn.Module, opts: dict, seed: int):
    opts = dict(opts)
    dim, alpha = opts.pop("lora_dim", 4), opts.pop("alpha", 2.0)
    mod = cls("x", org, 1.0) if cls is norms.NormModule else cls("x", org, 1.0, dim, alpha, **opts)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if name.startswith("org_module"):
                continue
            noise = torch.randn(p.shape, generator=g)
            if name == "dora_scale":
                p.mul_(1 + 0.2 * noise.abs())  # a magnitude near the weight's own norm
            elif name == "rescale":
                p.copy_(1 + 0.1 * noise)
            elif name == "oft_blocks":
                p.copy_(0.05 * noise)
            else:
                p.copy_(0.2 * noise)
    return mod


def _file_tensors(mod, as_rotation: bool = False) -> dict[str, torch.Tensor]:
    if as_rotation:  # old LyCORIS: R = get_r() as `oft_diag`, no alpha (the constraint is inside R)
        out = {"oft_diag": mod.get_r().detach().clone()}
        return out | ({"rescale": mod.rescale.detach().clone()} if mod.rescaled else {})
    if isinstance(mod, full.FullModule):  # before apply_to its weight is the diff (custom_state_dict assumes after)
        out = {"diff": mod.weight.detach().clone()}
        return out | ({"diff_b": mod.bias.detach().clone()} if mod.bias is not None else {})
    sd = mod.custom_state_dict() if hasattr(mod, "custom_state_dict") else {}
    return {k: v.detach().clone() for k, v in (sd or mod.state_dict()).items() if not k.startswith("org_")}


@pytest.mark.parametrize("model", list(LAYERS))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kind_matches_lycoris(pipes, model, case):
    cid, cls, opts, label = case
    pipe = pipes[model]
    comps = _components(pipe)
    file, refs, bias_refs = {}, {}, {}
    for i, (comp, live, key) in enumerate((NORM_LAYERS if cid == "norm" else LAYERS)[model]):
        key = key or _sdxl_key(live)
        org = comps[comp].get_submodule(live)
        if "tucker" in cid and not isinstance(org, nn.Conv2d):
            continue  # Tucker cores exist for k x k convolutions only
        try:
            mod = _lycoris(cls, org, opts, seed=i)
        except ValueError:  # BOFT needs an output size it can split into butterfly blocks (CLIP fc1 has 37)
            assert cls is boft.ButterflyOFTModule
            continue
        w = org.weight.detach().clone()
        merged, merged_bias = mod.get_merged_weight(multiplier=1.0, shape=w.shape, device=w.device)
        refs[(comp, live)] = (w, merged.detach().float().reshape(w.shape))
        if merged_bias is not None:  # full diff_b, norm b_norm
            bias_refs[(comp, live)] = (org.bias.detach().clone(), merged_bias.detach().float())
        file.update({f"{key}.{s}": t for s, t in _file_tensors(mod, cid.endswith("-diag")).items()})
        if "constraint" in opts and mod.oft_blocks.shape[-1] > 1:  # the constraint is active: the skew part is
            q = (mod.oft_blocks - mod.oft_blocks.transpose(-1, -2)).detach()  # larger than it allows
            assert float(q.norm()) > mod.constraint > 0
    adapter, report = load_any(file, models=comps, strict=True)
    assert sum(report.kinds.values()) == len(refs)
    if label:
        assert set(report.kinds) == {label}
    for (comp, live), (w, merged) in refs.items():
        spec = adapter.layers(comp)[live]
        delta = spec.delta(w).reshape(w.shape)
        torch.testing.assert_close(w.float() + delta, merged, atol=1e-5, rtol=1e-5)
    # applied by the wrappers: the effective weight at strength 1 and 0.5, fuse/unfuse exact
    for comp in {c for c, _ in refs}:
        adapter_c = Adapter({k: v for k, v in adapter.tensors.items() if k.startswith(comp + ".")}, adapter.metadata)
        adapter_c.apply_to({comp: comps[comp]}, name="k")
    try:
        for strength in (1.0, 0.5):
            for comp in {c for c, _ in refs}:
                set_strength(comps[comp], strength, name="k")
            for (comp, live), (w, merged) in refs.items():
                layer = comps[comp].get_submodule(live)
                base = layer.base
                x = _input(base, w)
                want_w = w.float() + strength * (merged - w.float())
                bias = base.bias
                if (comp, live) in bias_refs:
                    b0, b1 = bias_refs[(comp, live)]
                    bias = b0 + strength * (b1 - b0)
                want = _forward(base, x, want_w, bias)
                torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
        for comp in {c for c, _ in refs}:
            merge_lora(comps[comp])
        for (comp, live), (w, merged) in refs.items():
            layer = comps[comp].get_submodule(live)
            torch.testing.assert_close(layer.base.weight.float(), w.float() + 0.5 * (merged - w.float()),
                                       atol=1e-5, rtol=1e-5)
        for comp in {c for c, _ in refs}:
            unmerge_lora(comps[comp])
        for (comp, live), (w, _) in refs.items():
            assert torch.equal(comps[comp].get_submodule(live).base.weight, w)
        for (comp, live), (b0, _) in bias_refs.items():
            assert torch.equal(comps[comp].get_submodule(live).base.bias, b0)
    finally:
        from lora_vision import remove_lora
        for comp in {c for c, _ in refs}:
            remove_lora(comps[comp], "k")


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("loha", "lokr-tucker", "dora-in", "oft", "full",
                                                               "oft-diag", "norm")], ids=lambda c: c[0])
def test_kind_save_load_roundtrip_is_exact(pipes, tmp_path, case):
    cid, cls, opts, _ = case
    comps = _components(pipes["sd1"])
    file = {}
    for i, (comp, live, key) in enumerate((NORM_LAYERS if cid == "norm" else LAYERS)["sd1"][:2]):
        mod = _lycoris(cls, comps[comp].get_submodule(live), opts, seed=i)
        file.update({f"{key}.{s}": t for s, t in _file_tensors(mod, cid.endswith("-diag")).items()})
    adapter, _ = load_any(file, models=comps, strict=True)
    exported, _ = kohya_tensors(adapter, "sd1", torch.float32)  # the names A1111 / ComfyUI read, and back
    assert {k for k in exported if not k.endswith(".alpha")} == {k for k in file if not k.endswith(".alpha")}
    again, _ = load_any(exported, models=comps, strict=True)
    assert again.tensors.keys() == adapter.tensors.keys()
    assert all(torch.equal(again.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    adapter.save(tmp_path / "a.safetensors")
    back = Adapter.load(tmp_path / "a.safetensors")
    assert back.tensors.keys() == adapter.tensors.keys()
    assert all(torch.equal(back.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    for key, spec in adapter.layers("unet").items():
        other = back.layers("unet")[key]
        assert other.kind == spec.kind and other.alpha == spec.alpha and other.factors.keys() == spec.factors.keys()


@pytest.mark.parametrize("cls,opts", [(loha.LohaModule, {"lora_dim": 4}), (lokr.LokrModule, {"factor": 4, "lora_dim": 2})],
                         ids=["loha", "lokr"])
def test_loha_lokr_scale_once(pipes, cls, opts):
    """alpha != rank: the update is (alpha / rank) times the alpha = rank update (A1111 / ComfyUI), not the square
    LyCORIS' own merge uses."""
    comps = _components(pipes["sd1"])
    comp, live, key = LAYERS["sd1"][0]
    org = comps[comp].get_submodule(live)
    w = org.weight.detach().clone()
    rank = opts["lora_dim"]
    ref = _lycoris(cls, org, {**opts, "alpha": float(rank)}, seed=3)
    unit = ref.get_merged_weight(multiplier=1.0, shape=w.shape, device=w.device)[0].detach() - w
    file = {f"{key}.{s}": t for s, t in _file_tensors(ref).items() if s != "alpha"}
    file[f"{key}.alpha"] = torch.tensor(1.0)
    adapter, _ = load_any(file, models=comps, strict=True)
    torch.testing.assert_close(adapter.layers(comp)[live].delta(w).reshape(w.shape), unit * (1.0 / rank), atol=1e-6,
                               rtol=1e-5)
