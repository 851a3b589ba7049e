"""Adapter kinds without an oracle: bad input named with the layer and the shapes, LoRA-only paths refusing other
kinds, and trainable LoHa / LoKr / DoRA layers from LoRAConfig(adapter_type=...)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_vision as lv
from lora_vision.adapter import Adapter
from lora_vision.formats import load_any
from lora_vision.io import AdapterFileError
from lora_vision.lora.kinds import KindError, factorization
from lora_vision.lora.ops import LoRAStateDictError
from lora_vision.models import build_tiny_sd

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
K = "lora_unet_" + Q.replace(".", "_")


@pytest.fixture(scope="module")
def comps():
    pipe = build_tiny_sd("sd1")
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


K_OK = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"


def _loha(out: int, inp: int, r: int = 2) -> dict[str, torch.Tensor]:
    # with one good plain LoRA module next to it, so that a non-strict load has something to return
    return {f"{K_OK}.lora_down.weight": torch.randn(r, inp), f"{K_OK}.lora_up.weight": torch.randn(out, r),
            f"{K}.hada_w1_a": torch.randn(out, r), f"{K}.hada_w1_b": torch.randn(r, inp),
            f"{K}.hada_w2_a": torch.randn(out, r), f"{K}.hada_w2_b": torch.randn(r, inp),
            f"{K}.alpha": torch.tensor(2.0)}


@pytest.mark.parametrize("what", ["shapes", "half", "dora_len", "unknown"])
def test_bad_kind_layers_are_named_and_strict_refuses(comps, what):
    w = comps["unet"].get_submodule(Q).weight
    out, inp = w.shape
    sd = _loha(out, inp)
    if what == "shapes":
        sd[f"{K}.hada_w2_b"] = torch.randn(2, inp + 3)
        expect = "hada_w2_b (2, " + str(inp + 3) + ")"
    elif what == "half":
        del sd[f"{K}.hada_w2_a"], sd[f"{K}.hada_w2_b"]
        expect = "lacks hada_w2_a, hada_w2_b"
    elif what == "dora_len":
        sd[f"{K}.dora_scale"] = torch.ones(out + 1, 1)
        expect = f"dora_scale has shape ({out + 1}, 1)"
    else:
        sd = {k: v for k, v in sd.items() if k.startswith(K_OK)} | {f"{K}.glora_w1": torch.ones(2, 2),
                                                                    f"{K}.alpha": torch.tensor(1.0)}
        expect = "unknown adapter kind"
    adapter, report = load_any(sd, models=comps)
    lines = report.invalid + report.unsupported
    assert any(expect in line and (K in line) for line in lines), lines
    assert report.matched == [f"unet.{Q.replace('to_q', 'to_k')}"]  # the broken layer is skipped whole
    assert not any(Q in k for k in adapter.tensors)
    with pytest.raises(AdapterFileError, match="strict load failed"):
        load_any(sd, models=comps, strict=True)


def test_factor_shapes_that_do_not_make_the_weight_name_both(comps):
    w = comps["unet"].get_submodule(Q).weight
    out, inp = w.shape
    sd = {k: v for k, v in _loha(out, inp).items() if k.startswith(K_OK)}
    sd |= {f"{K}.lokr_w1": torch.randn(2, 2), f"{K}.lokr_w2": torch.randn(out // 2, inp), f"{K}.alpha": torch.tensor(1.)}
    _, report = load_any(sd, models=comps)
    assert any(f"make a ({out}, {2 * inp}) update but the layer's Linear weight is ({out}, {inp})" in line
               for line in report.invalid), report.invalid


def test_lora_only_paths_refuse_other_kinds(comps, tmp_path):
    w = comps["unet"].get_submodule(Q).weight
    adapter, _ = load_any(_loha(*w.shape), models=comps, strict=True)
    assert adapter.kinds() == {"LoHa": 1, "LoRA": 1}
    unet = build_tiny_sd("sd1").unet
    adapter.apply_to({"unet": unet})
    assert f"{Q}.loha.hada_w1_a" in lv.lora_state_dict(unet)  # every kind has a state dict now (test below)
    tensors, _ = lv.formats.kohya.kohya_tensors(adapter, "sd1")  # kinds export in LyCORIS names now
    assert f"{K}.hada_w1_a" in tensors
    pipe = build_tiny_sd("sd1")
    from lora_vision.pipeline import load_adapter
    report = load_adapter(pipe, adapter)  # the pipeline loader applies every kind (tests/test_pipeline_kinds.py)
    assert sorted(report.modules["unet"]) == sorted([Q, Q.replace("to_q", "to_k")])


NORM = "lora_unet_down_blocks_0_resnets_0_norm1"  # GroupNorm(32 channels)


@pytest.mark.parametrize("what", ["norm_len", "norm_bias_len", "oft_blocks", "oft_diag"])
def test_norm_and_oft_layers_that_do_not_fit_are_named_and_strict_refuses(comps, what):
    out = comps["unet"].get_submodule(Q).weight.shape[0]
    sd = {k: v for k, v in _loha(out, comps["unet"].get_submodule(Q).weight.shape[1]).items() if k.startswith(K_OK)}
    if what == "norm_len":
        sd |= {f"{NORM}.w_norm": torch.randn(33), f"{NORM}.b_norm": torch.randn(33)}
        bad, expect = NORM, "w_norm (33,), b_norm (33,) make a (33,) update but the layer's GroupNorm weight is (32,)"
    elif what == "norm_bias_len":
        sd |= {f"{NORM}.w_norm": torch.randn(32), f"{NORM}.b_norm": torch.randn(31)}
        bad, expect = NORM, "b_norm (when present) one of the same length"
    else:  # 3 blocks of 5 rows for a layer of `out` rows: the block size does not divide the layer
        sd |= {f"{K}.{what}": torch.randn(3, 5, 5), f"{K}.alpha": torch.tensor(0.0)}
        bad, expect = K, f"{what} (3, 5, 5)"
    adapter, report = load_any(sd, models=comps)
    assert any(line.startswith(bad) and expect in line for line in report.invalid), report.invalid
    if what.startswith("oft"):
        assert any(f"the blocks cover 15 output rows but the layer has {out}" in line for line in report.invalid)
    assert report.matched == [f"unet.{Q.replace('to_q', 'to_k')}"]
    with pytest.raises(AdapterFileError, match="strict load failed"):
        load_any(sd, models=comps, strict=True)


def test_norm_updates_go_on_norm_layers_only_and_fit_their_length():
    unet = build_tiny_sd("sd1").unet
    norm = "down_blocks.0.resnets.0.norm1"
    with pytest.raises(LoRAStateDictError, match=r"norm1: norm factors w_norm \(33,\) make a \(33,\) update but "
                                                 r"the layer's weight is \(32,\)"):
        lv.inject_lora(unet, layers={norm: lv.LayerSpec(None, None, 1.0, kind="norm",
                                                         factors={"w_norm": torch.ones(33)})})
    with pytest.raises(LoRAStateDictError, match="norm layers .w_norm / b_norm. go on LayerNorm and GroupNorm "
                                                 "modules only, not on a Linear"):
        lv.inject_lora(unet, layers={Q: lv.LayerSpec(None, None, 1.0, kind="norm",
                                                      factors={"w_norm": torch.ones(32)})})
    with pytest.raises(LoRAStateDictError, match="LoHa layers go on Linear and Conv2d modules only, not on a "
                                                 "GroupNorm"):
        lv.inject_lora(unet, layers={norm: lv.LayerSpec(None, None, 1.0, kind="loha", factors={
            "hada_w1_a": torch.ones(32, 1), "hada_w1_b": torch.ones(1, 1), "hada_w2_a": torch.ones(32, 1),
            "hada_w2_b": torch.ones(1, 1)})})
    assert not any(isinstance(m, lv.LoRALayer) for m in unet.modules())  # nothing changed


@pytest.mark.parametrize("adapter_type,extra", [("lora", {}), ("loha", {}), ("lokr", {"lokr_factor": 4}),
                                                ("lokr", {"full_rank": True}), ("lokr", {"decompose_both": True}),
                                                ("dora", {})])
def test_trainable_kinds_start_at_zero_and_learn(adapter_type, extra):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(16, 32))
    model.add_module("conv", nn.Conv2d(4, 8, 3, padding=1))
    x, xc = torch.randn(8, 16), torch.randn(2, 4, 6, 6)
    before = model.fc(x).detach(), model.conv(xc).detach()
    lv.inject_lora(model, lv.LoRAConfig(rank=2, targets=("fc", "conv"), adapter_type=adapter_type, **extra))
    torch.testing.assert_close(model.fc(x), before[0], atol=1e-6, rtol=0)  # one factor zero: no change at start
    torch.testing.assert_close(model.conv(xc), before[1], atol=1e-6, rtol=0)
    params = lv.lora_parameters(model)
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".base." in n)
    opt = torch.optim.Adam(params, lr=1e-2)
    target = torch.randn(8, 32)
    losses = []
    for _ in range(15):
        loss = ((model.fc(x) - target) ** 2).mean() + model.conv(xc).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]
    w0 = model.fc.base.weight.clone()
    y = model.fc(x).detach()
    lv.merge_lora(model)
    torch.testing.assert_close(model.fc(x), y, atol=1e-5, rtol=1e-5)
    lv.unmerge_lora(model)
    assert torch.equal(model.fc.base.weight, w0)


def test_trained_kind_round_trips_through_the_adapter_file(tmp_path):
    torch.manual_seed(1)
    unet = build_tiny_sd("sd1").unet
    lv.inject_lora(unet, lv.LoRAConfig(rank=2, targets=("attn1.to_q",), adapter_type="lokr"))
    with torch.no_grad():
        for p in lv.lora_parameters(unet):
            p.add_(torch.randn_like(p) * 0.1)
    adapter = Adapter.from_models({"unet": unet})
    path = adapter.save(tmp_path / "k.safetensors")
    back = Adapter.load(path)
    assert set(back.kinds()) == {"LoKr"} and all(torch.equal(back.tensors[k], adapter.tensors[k]) for k in adapter.tensors)


def test_config_rejects_bad_kind_settings():
    with pytest.raises(lv.ConfigError, match="adapter_type='boft'") as e:
        lv.LoRAConfig(adapter_type="boft", lokr_factor=0)
    assert "lokr_factor=0" in str(e.value)
    with pytest.raises(lv.ConfigError, match="LoKr settings"):
        lv.LoRAConfig(adapter_type="loha", full_rank=True)


def test_factorization():
    assert factorization(320, 4) == (4, 80) and factorization(64) == (8, 8) and factorization(37) == (1, 37)
    assert factorization(96, 5) == (4, 24)


KIND_KEYS = {"loha": ("loha.hada_w1_a", "loha.hada_w2_b"), "lokr": ("lokr.lokr_w1", "lokr.lokr_w2_a", "lokr.lokr_w2_b"),
             "dora": ("lora_A.weight", "lora_B.weight", "lora.dora_scale")}


@pytest.mark.parametrize("adapter_type", list(KIND_KEYS))
def test_lora_state_dict_of_every_trainable_kind_round_trips_exactly(adapter_type, tmp_path):
    def unet_with(seed):
        torch.manual_seed(seed)
        unet = build_tiny_sd("sd1").unet
        extra = {"lokr_factor": 4} if adapter_type == "lokr" else {}
        lv.inject_lora(unet, lv.LoRAConfig(rank=2, targets=(Q, CONV),
                                           adapter_type=adapter_type, **extra))
        with torch.no_grad():
            for p in lv.lora_parameters(unet):
                p.add_(torch.randn_like(p) * 0.1)
        return unet

    trained = unet_with(0)
    sd = lv.lora_state_dict(trained)
    for mod in (Q, CONV):
        assert all(f"{mod}.{k}" in sd for k in KIND_KEYS[adapter_type]) and f"{mod}.alpha" in sd
    x = (torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32))
    want = trained(*x).sample
    other = unet_with(1)  # same layers, other values: load_lora_state_dict copies every factor
    assert not torch.equal(other(*x).sample, want)
    report = lv.load_lora_state_dict(other, sd, strict=True)
    assert sorted(report.matched) == sorted([Q, CONV])
    assert torch.equal(other(*x).sample, want)
    fresh = build_tiny_sd("sd1").unet  # a plain model: the state dict alone says what to build
    lv.inject_lora_from_state_dict(fresh, sd)
    assert torch.equal(fresh(*x).sample, want)
    path = Adapter.from_models({"unet": trained}).save(tmp_path / "a.safetensors")
    back = Adapter.load(path)
    assert set(back.kinds()) == {LABELS[adapter_type]}
    applied = build_tiny_sd("sd1").unet
    back.apply_to({"unet": applied})
    assert torch.equal(applied(*x).sample, want)
    assert all(torch.equal(lv.lora_state_dict(applied)[k], t) for k, t in sd.items())


CONV = "down_blocks.0.resnets.0.conv1"
LABELS = {"loha": "LoHa", "lokr": "LoKr", "dora": "LoRA+DoRA"}


@pytest.mark.parametrize("adapter_type", ["loha", "lokr", "dora"])
def test_kind_on_timm_fused_qkv_is_one_linear_and_trains(adapter_type):
    from lora_vision.models.tiny import build_tiny_timm_vit

    torch.manual_seed(0)
    vit = build_tiny_timm_vit(4, 32, 0)
    qkv = "blocks.0.attn.qkv"
    w, bias = vit.get_submodule(qkv).weight.detach().clone(), vit.get_submodule(qkv).bias.detach().clone()
    names = lv.inject_lora(vit, lv.LoRAConfig(rank=2, targets="timm-vit-attn", adapter_type=adapter_type))
    layer = vit.get_submodule(qkv)
    assert qkv in names and type(layer) is lv.LoRALinear  # the whole (3d, d) weight, not split into q / k / v
    with torch.no_grad():
        for p in lv.lora_parameters(vit):
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 5, w.shape[1])
    spec = layer.kind_spec("default")
    want = nn.functional.linear(x, w + spec.delta(w).reshape(w.shape), bias)
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    opt = torch.optim.Adam(lv.lora_parameters(vit), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(vit(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.97 * losses[0]  # only the attention adapters train (the head is frozen)
    vit.eval()
    applied = build_tiny_timm_vit(4, 32, 0).eval()  # the trained file applied to a fresh model: same outputs
    Adapter.from_models({"model": vit}).apply_to({"model": applied})
    with torch.no_grad():
        torch.testing.assert_close(applied(images), vit(images), atol=1e-5, rtol=1e-5)


def test_lora_with_a_bias_update_runs_merges_and_unmerges_exactly():
    """A LoRA pair with `diff_b` (a biased lora_up, as in BFL's Flux.1 control LoRAs): h = W x + b + s (scaling B A x
    + diff_b), the same merged, and unmerge gives back the exact weight and bias."""
    from lora_vision.lora.spec import LayerSpec
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(6, 5)
    x = torch.randn(3, 6, generator=g)
    a, b, diff_b = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), torch.randn(5, generator=g)
    spec = LayerSpec(a, b, 4.0, "lora", "lora", {"diff_b": diff_b})
    assert spec.label == "LoRA+bias" and torch.equal(spec.bias_delta(), diff_b)
    model = nn.Sequential(lin)
    weight, bias = lin.weight.detach().clone(), lin.bias.detach().clone()
    lv.inject_lora(model, layers={"0": spec}, strength=0.5)
    want = x @ weight.T + bias + 0.5 * (2.0 * x @ (b @ a).T + diff_b)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        lv.merge_lora(model)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
        lv.unmerge_lora(model)
    assert torch.equal(model[0].base.weight, weight) and torch.equal(model[0].base.bias, bias)
    with pytest.raises(Exception, match=r"diff_b has shape \(4,\) but the layer's bias is \(5,\)"):
        lv.inject_lora(nn.Sequential(nn.Linear(6, 5)), layers={"0": LayerSpec(a, b, 4.0, "lora", "lora",
                                                                              {"diff_b": torch.zeros(4)})})


# ---- one kind split by output rows (a fused file module onto the model's parts) --------------------------------

def _split_cases() -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    out, inp = 24, 10
    return {
        "lora": ("lora", {"A": r(3, inp), "B": r(out, 3), "diff_b": r(out)}),
        "lora+dora": ("lora", {"A": r(3, inp), "B": r(out, 3), "dora_scale": r(out, 1).abs() + 0.5}),
        "loha": ("loha", {"hada_w1_a": r(out, 2), "hada_w1_b": r(2, inp), "hada_w2_a": r(out, 2),
                          "hada_w2_b": r(2, inp)}),
        "lokr full w1": ("lokr", {"lokr_w1": r(4, 2), "lokr_w2": r(6, 5)}),
        "lokr w1_a/w1_b, w2_a/w2_b": ("lokr", {"lokr_w1_a": r(4, 2), "lokr_w1_b": r(2, 2), "lokr_w2_a": r(6, 2),
                                              "lokr_w2_b": r(2, 5)}),
        "lokr+dora": ("lokr", {"lokr_w1": r(4, 2), "lokr_w2": r(6, 5), "dora_scale": r(out).abs() + 0.5}),
        # w2 has 8 rows: the blocks of 6, 12, 6 cut through them, so parts keep a window of their kron
        "lokr windows": ("lokr", {"lokr_w1": r(3, 2), "lokr_w2_a": r(8, 2), "lokr_w2_b": r(2, 5)}),
        "lokr windows+dora": ("lokr", {"lokr_w1_a": r(3, 2), "lokr_w1_b": r(2, 2), "lokr_w2": r(8, 5),
                                       "dora_scale": r(out).abs() + 0.5}),
        "full": ("full", {"diff": r(out, inp), "diff_b": r(out)}),
        "ia3 per row": ("ia3", {"weight": r(out)}),
        "ia3 per column": ("ia3", {"weight": r(inp), "on_input": torch.tensor(True)}),
    }


@pytest.mark.parametrize("case", list(_split_cases()))
def test_a_kind_split_by_rows_makes_the_same_update_part_by_part(case, tmp_path):
    from lora_vision.lora.spec import LayerSpec

    kind, f = _split_cases()[case]
    f = dict(f)
    a, b = (f.pop("A"), f.pop("B")) if kind == "lora" else (None, None)
    spec = LayerSpec(a, b, 2.0, "lora", kind, f)
    weight = torch.randn(24, 10, generator=torch.Generator().manual_seed(1))
    sizes = [6, 12, 6]  # LoKr: whole rows of w1 where w2 has 6 rows, windows where it has 8
    parts = spec.split_rows(sizes)
    assert parts is not None and len(parts) == 3
    assert ("windows" in case) == any("lokr_rows" in p.factors for p in parts)
    assert all(p.kind == spec.kind and p.label == spec.label and p.scaling == spec.scaling for p in parts)
    w_parts = weight.split(sizes, 0)
    for p, w in zip(parts, w_parts):
        assert not p.check(tuple(w.shape)), p.check(tuple(w.shape))
    got = torch.cat([p.delta(w if p.weight_dependent else None) for p, w in zip(parts, w_parts)], 0)
    torch.testing.assert_close(got, spec.delta(weight if spec.weight_dependent else None), atol=1e-5, rtol=1e-5)
    if spec.bias_delta() is not None:
        torch.testing.assert_close(torch.cat([p.bias_delta() for p in parts]), spec.bias_delta())
    # the parts share the unsplit factors and view the split ones; they are saved side by side all the same
    from lora_vision.io import read_safetensors, write_safetensors
    from lora_vision.lora.ops import layer_tensors

    flat = {f"p{i}.{k}": t for i, p in enumerate(parts) for k, t in layer_tensors(f"p{i}", p).items()}
    back, _ = read_safetensors(write_safetensors(tmp_path / "parts.safetensors", flat))
    assert back.keys() == flat.keys() and all(torch.equal(back[k], flat[k]) for k in flat)


def test_kinds_that_do_not_split_at_the_rows_say_so():
    from lora_vision.lora.spec import LayerSpec

    g = torch.Generator().manual_seed(0)
    lokr = LayerSpec(None, None, 1.0, "lora", "lokr", {"lokr_w1": torch.randn(4, 2, generator=g),
                                                      "lokr_w2": torch.randn(6, 5, generator=g)})
    assert lokr.split_rows([8, 8, 7]) is None  # 23 rows of a 24-row update
    window = lokr.split_rows([8, 8, 8])[1]
    assert window.split_rows([4, 4]) is None  # a window is not split again
    oft = LayerSpec(None, None, 1.0, "lora", "oft", {"oft_blocks": torch.zeros(4, 6, 6)})
    assert oft.split_rows([12, 12]) is None  # rotations mix the rows of a block
    dora_in = LayerSpec(torch.randn(2, 10, generator=g), torch.randn(24, 2, generator=g), 2.0, "lora", "lora",
                        {"dora_scale": torch.rand(1, 10, generator=g) + 0.5})
    assert dora_in.split_rows([12, 12]) is None  # a per-column magnitude's norm runs over all rows
    lora = LayerSpec(torch.randn(2, 10, generator=g), torch.randn(24, 2, generator=g), 2.0)
    assert lora.split_rows([12, 10]) is None and lora.split_rows([24, 0]) is None


@pytest.mark.parametrize("rows, says", [(torch.tensor([20, 30]), "is not a window of the 24 rows"),
                                        (torch.tensor([5, 5]), "is not a window of the 24 rows"),
                                        (torch.tensor([0.0, 8.0]), "lokr_rows must be two integers"),
                                        (torch.tensor([0, 8, 16]), "lokr_rows must be two integers")])
def test_a_bad_lokr_window_is_named(rows, says):
    from lora_vision.lora.spec import LayerSpec

    spec = LayerSpec(None, None, 1.0, "lora", "lokr", {"lokr_w1": torch.ones(4, 2), "lokr_w2": torch.ones(6, 5),
                                                       "lokr_rows": rows})
    problems = spec.check((8, 10))
    assert len(problems) == 1 and says in problems[0], problems
