"""Adapter kinds on the q / k / v / o parts of nn.MultiheadAttention (torchvision's ViT attention), against
lycoris-lora (a test-only oracle): a LyCORIS module with random non-zero factors on a Linear holding each part's
(d, d) weight gives that part's merged weight; the attention run with those weights (torch's functional
MultiheadAttention) must equal our wrapper's output, unfused, fused, at half strength and after a save and reload."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_vision import merge_lora, set_strength, unmerge_lora
from lora_vision.adapter import Adapter
from lora_vision.formats import load_any
from lora_vision.formats.peft import PeftExportError, export_peft
from lora_vision.lora.config import LoRAConfig, TargetError
from lora_vision.lora.inject import inject_lora
from lora_vision.lora.layers import LoRAMultiheadAttention, part_weight
from lora_vision.lora.ops import LoRAStateDictError, load_lora_state_dict, lora_parameters, lora_state_dict
from lora_vision.models.tiny import build_tiny_torchvision_vit

pytest.importorskip("lycoris.modules")
from lycoris.modules import locon, loha, lokr  # noqa: E402
from test_kinds_lycoris import _lycoris  # noqa: E402  (random non-zero factors, as there)

ATTN = "encoder.layers.encoder_layer_0.self_attention"
PARTS = ("q", "k", "v", "o")
# (id, LyCORIS class, options, our kind folder in the state dict, label)
CASES = [
    ("loha", loha.LohaModule, {"alpha": 4.0}, "loha", "LoHa"),
    ("lokr", lokr.LokrModule, {"factor": 4, "alpha": 4.0}, "lokr", "LoKr"),
    ("dora", locon.LoConModule, {"weight_decompose": True, "alpha": 2.0}, "lora", "LoRA+DoRA"),
]
# LyCORIS names -> our canonical names where they differ (LoCon's pair)
_RENAME = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


def _vit() -> nn.Module:
    return build_tiny_torchvision_vit(num_classes=5, seed=0).eval()


def _lycoris_parts(mha: nn.MultiheadAttention, cls, opts: dict, kind: str):
    """{part: merged (d, d) weight} and our canonical state dict of the same factors."""
    merged, sd = {}, {}
    for i, part in enumerate(PARTS):
        w = part_weight(mha, part).detach().clone()
        org = nn.Linear(w.shape[1], w.shape[0], bias=False)
        org.weight.data.copy_(w)
        mod = _lycoris(cls, org, opts, seed=i)
        merged[part] = mod.get_merged_weight(multiplier=1.0, shape=w.shape, device=w.device)[0].detach().float()
        for n, t in mod.state_dict().items():
            if n.startswith("org_"):
                continue
            if n == "alpha":
                sd[f"{ATTN}.{part}.alpha"] = t.detach().clone().float()
            elif n in _RENAME:
                sd[f"{ATTN}.{part}.{_RENAME[n]}"] = t.detach().clone()
            else:
                sd[f"{ATTN}.{part}.{kind}.{n}"] = t.detach().clone()
    return merged, sd


def _attention(mha: nn.MultiheadAttention, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """torch's functional attention with the given part weights (batch first)."""
    q = x.transpose(0, 1)
    out, _ = nn.functional.multi_head_attention_forward(
        q, q, q, mha.embed_dim, mha.num_heads, torch.cat([w["q"], w["k"], w["v"]]), mha.in_proj_bias, None, None,
        False, 0.0, w["o"], mha.out_proj.bias, training=False, need_weights=False)
    return out.transpose(0, 1)


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    m = model.get_submodule(ATTN)
    return m(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kind_on_attention_parts_matches_lycoris(case, tmp_path):
    cid, cls, opts, kind, label = case
    model = _vit()
    mha = model.get_submodule(ATTN)
    base_w = {p: part_weight(mha, p).detach().clone().float() for p in PARTS}
    merged, sd = _lycoris_parts(mha, cls, opts, kind)
    assert all((merged[p] - base_w[p]).abs().max() > 1e-3 for p in PARTS)  # every part really changes
    x = torch.randn(3, 17, mha.embed_dim, generator=torch.Generator().manual_seed(5))
    adapter = Adapter({f"model.{k}": t for k, t in sd.items()})
    assert adapter.kinds() == {label: 4}
    adapter.apply_to({"model": model}, name="k")
    layer = model.get_submodule(ATTN)
    assert isinstance(layer, LoRAMultiheadAttention) and layer.kind_parts("k") == PARTS
    with torch.no_grad():
        want = _attention(mha, x, merged)
        torch.testing.assert_close(_run(model, x), want, atol=1e-5, rtol=1e-5)
        set_strength(model, 0.5, name="k")  # W + s * delta (the ComfyUI rule)
        half = {p: base_w[p] + 0.5 * (merged[p] - base_w[p]) for p in PARTS}
        torch.testing.assert_close(_run(model, x), _attention(mha, x, half), atol=1e-5, rtol=1e-5)
        set_strength(model, 1.0, name="k")
        merge_lora(model)
        torch.testing.assert_close(_run(model, x), want, atol=1e-5, rtol=1e-5)
        unmerge_lora(model)
        assert torch.equal(mha.in_proj_weight, torch.cat([base_w[p] for p in "qkv"]))
        assert torch.equal(mha.out_proj.weight, base_w["o"])
    # saved by us, read back into a fresh model: the same outputs
    path = Adapter.from_models({"model": model}, name="k").save(tmp_path / "a.safetensors")
    fresh = _vit()
    Adapter.load(path).apply_to({"model": fresh})
    with torch.no_grad():
        torch.testing.assert_close(_run(fresh, x), want, atol=1e-5, rtol=1e-5)
    # read against the model: each part checked against its (d, d) block; peft has no such layer and says so
    _, report = load_any(path, models={"model": _vit()}, strict=True)
    assert len(report.matched) == 4 and report.kinds == {label: 4}
    with pytest.raises(PeftExportError, match=r"self_attention\.[qkvo]: a .* nn\.MultiheadAttention"):
        export_peft(Adapter.load(path), tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_a_kind_on_an_attention_part_that_does_not_fit_is_named_with_its_part(tmp_path):
    model = _vit()
    sd = _lycoris_parts(model.get_submodule(ATTN), loha.LohaModule, {"alpha": 4.0}, "loha")[1]
    Adapter({f"model.{k}": t for k, t in sd.items()}).apply_to({"model": model})
    saved = Adapter.from_models({"model": model})
    for f in ("hada_w1_b", "hada_w2_b"):  # a (32, 16) update for a (32, 32) part
        saved.tensors[f"model.{ATTN}.v.loha.{f}"] = torch.zeros(4, 16)
    path = saved.save(tmp_path / "bad.safetensors")
    _, report = load_any(path, models={"model": _vit()})
    assert len(report.invalid) == 1 and report.invalid[0].startswith(f"model.{ATTN}.v: ")
    assert "(32, 32)" in report.invalid[0]


@pytest.mark.parametrize("adapter_type", ["loha", "lokr", "dora"])
def test_fresh_kind_on_attention_trains_every_part_and_its_state_dict_round_trips(adapter_type):
    model = _vit()
    extra = {"lokr_factor": 4} if adapter_type == "lokr" else {}
    cfg = LoRAConfig(targets=("self_attention",), rank=2, adapter_type=adapter_type, fused_parts=("q", "v", "o"),
                     **extra)
    inject_lora(model, cfg)
    layers = [m for _, m in model.named_modules() if isinstance(m, LoRAMultiheadAttention)]
    assert len(layers) == 2 and all(m.kind_parts("default") == ("q", "v", "o") for m in layers)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = model(x)
    torch.testing.assert_close(start, _vit()(x))  # a fresh adapter starts as the identity
    opt = torch.optim.SGD(lora_parameters(model), lr=0.5)
    target = torch.randn_like(start)
    losses = []
    for _ in range(8):
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    sd = lora_state_dict(model)
    assert {k.split(".")[len(ATTN.split("."))] for k in sd if k.startswith(ATTN + ".")} == {"q", "v", "o"}
    assert not any(f"{ATTN}.k." in k for k in sd)  # only the parts asked for
    other = _vit()
    inject_lora(other, cfg)
    assert load_lora_state_dict(other, sd).ok
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), atol=0, rtol=0)
    # a factor of the wrong shape is named with its part
    bad = dict(sd)
    key = next(k for k in bad if k.startswith(f"{ATTN}.o.") and not k.endswith("alpha"))
    bad[key] = torch.zeros(3, 3)
    with pytest.raises(LoRAStateDictError, match=rf"{ATTN}\.o\b"):
        load_lora_state_dict(_with(cfg), bad)


def _with(cfg: LoRAConfig) -> nn.Module:
    m = _vit()
    inject_lora(m, cfg)
    return m


def test_kinds_on_attention_are_refused_where_they_cannot_go():
    model = _vit()
    sd = _lycoris_parts(model.get_submodule(ATTN), loha.LohaModule, {"alpha": 4.0}, "loha")[1]
    # mixed kinds on one module, and a kind on the attention module as a whole
    mixed = {k: v for k, v in sd.items() if f"{ATTN}.q." not in k}
    mixed |= {f"{ATTN}.q.lora_A.weight": torch.zeros(4, 32), f"{ATTN}.q.lora_B.weight": torch.zeros(32, 4)}
    with pytest.raises(LoRAStateDictError, match="different kinds"):
        Adapter({f"model.{k}": t for k, t in mixed.items()}).apply_to({"model": model})
    whole = {k.replace(f"{ATTN}.q.", f"{ATTN}."): v for k, v in sd.items() if f"{ATTN}.q." in k}
    with pytest.raises(LoRAStateDictError, match="go on its parts"):
        Adapter({f"model.{k}": t for k, t in whole.items()}).apply_to({"model": model})
    assert not any(isinstance(m, LoRAMultiheadAttention) for m in model.modules())  # nothing changed


def test_an_attention_without_a_packed_weight_is_refused_by_name_before_anything_changes():
    """nn.MultiheadAttention with kdim / vdim other than embed_dim keeps q, k and v in separate weights: no adapter
    goes on it, and the error names it before any module of the model is wrapped."""
    model = nn.ModuleDict({"fc": nn.Linear(16, 16), "attn": nn.MultiheadAttention(16, 2, kdim=8, vdim=8)})
    for adapter_type in ("lora", "loha"):
        with pytest.raises(TargetError, match=r"^attn: a MultiheadAttention with kdim / vdim other than embed_dim"):
            inject_lora(model, LoRAConfig(targets=("fc", "attn"), rank=2, adapter_type=adapter_type))
        assert isinstance(model["fc"], nn.Linear) and isinstance(model["attn"], nn.MultiheadAttention)
