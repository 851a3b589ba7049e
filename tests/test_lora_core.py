"""The LoRA core on small hand-built modules: identity at init, merge == runtime, exact unmerge, strength, grads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_vision as lv
from lora_vision.lora import StrengthTable


class Toy(nn.Module):
    """One of every layer kind the core supports."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 20)
        self.conv1x1 = nn.Conv2d(3, 6, 1)
        self.conv3x3 = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.attn = nn.MultiheadAttention(12, 3, batch_first=True)
        self.blk = nn.Module()
        self.blk.qkv = nn.Linear(12, 36)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> dict[str, torch.Tensor]:
        a, _ = self.attn(x, x, x, need_weights=False)
        return {"fc": self.fc(x), "conv1x1": self.conv1x1(img), "conv3x3": self.conv3x3(img),
                "attn": a, "qkv": self.blk.qkv(x)}


KINDS = ("fc", "conv1x1", "conv3x3", "attn", "blk.qkv")


def _inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 7, 12, generator=g).to(dtype), torch.randn(2, 3, 9, 9, generator=g).to(dtype)


def _toy(**cfg) -> Toy:
    torch.manual_seed(0)
    m = Toy()
    lv.inject_lora(m, lv.LoRAConfig(**{"rank": 3, "alpha": 6.0, "targets": KINDS, **cfg}))
    return m


def _randomize(m: nn.Module, std: float = 0.3, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lv.lora_parameters(m):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_fresh_adapter_is_identity() -> None:
    torch.manual_seed(0)
    ref = Toy()
    x, img = _inputs()
    before = ref(x, img)
    m = _toy()
    m.load_state_dict({k: v for k, v in ref.state_dict().items()}, strict=False)  # same base weights
    after = m(x, img)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    # and A is non-zero (kaiming) so training can start
    assert all(p.abs().sum() > 0 for n, p in m.named_parameters() if "lora_A" in n)


@pytest.mark.parametrize("parts", [("q", "k", "v", "o"), ("q", "v"), ("k",), ("o",)])
def test_merged_equals_unmerged_every_kind(parts: tuple[str, ...]) -> None:
    kinds = KINDS if set(parts) & {"q", "k", "v"} else KINDS[:-1]  # a qkv Linear needs one of q/k/v
    m = _toy(fused_parts=parts, targets=kinds)
    _randomize(m)
    x, img = _inputs()
    runtime = m(x, img)
    assert lv.merge_lora(m) == len(kinds)
    merged = m(x, img)
    for k in runtime:
        assert _rel(merged[k], runtime[k]) < 1e-5, k
    # merged weights really changed, and the LoRA path no longer runs
    assert m.fc.merged == {"default": 1.0}
    lv.unmerge_lora(m)
    again = m(x, img)
    for k in runtime:
        assert torch.equal(again[k], runtime[k]), k


def test_runtime_matches_explicit_formula() -> None:
    m = _toy()
    _randomize(m)
    x, img = _inputs()
    out = m(x, img)
    s = 6.0 / 3
    fc = m.fc
    expect = F.linear(x, fc.base.weight + s * fc.lora_B["default"] @ fc.lora_A["default"], fc.base.bias)
    assert _rel(out["fc"], expect) < 1e-6
    c = m.conv3x3
    w = c.base.weight + s * (c.lora_B["default"].flatten(1) @ c.lora_A["default"].flatten(1)).reshape(c.base.weight.shape)
    expect = F.conv2d(img, w, c.base.bias, stride=2, padding=1)
    assert _rel(out["conv3x3"], expect) < 1e-6
    q = m.blk.qkv
    a, b = q.lora_A["default"], q.lora_B["default"]
    w = q.base.weight + s * torch.cat([b[i] @ a[i] for i in range(3)])
    assert _rel(out["qkv"], F.linear(x, w, q.base.bias)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unmerge_is_bit_exact_after_1000_cycles(dtype: torch.dtype) -> None:
    m = _toy().to(dtype)
    for p in lv.lora_parameters(m):
        p.data = p.data.float()
    _randomize(m, std=0.5)
    originals = {k: v.clone() for k, v in m.state_dict().items() if ".base." in k}
    for i in range(1000):
        lv.merge_lora(m, strength=0.37 + i % 3)
        lv.unmerge_lora(m)
    for k, v in m.state_dict().items():
        if k in originals:
            assert torch.equal(v, originals[k]), k
    # the merge did change the weights while merged
    lv.merge_lora(m)
    assert not torch.equal(m.fc.base.weight, originals["fc.base.weight"])


def test_output_is_linear_in_strength() -> None:
    m = _toy()
    _randomize(m)
    x, img = _inputs()
    lv.set_strength(m, 0.0)
    base = m(x, img)
    lv.set_strength(m, 1.0)
    one = m(x, img)
    for s in (-1.0, 0.5, 1.3, 2.0):
        lv.set_strength(m, s)
        out = m(x, img)
        for k in ("fc", "conv1x1", "conv3x3", "qkv"):
            assert _rel(out[k], base[k] + s * (one[k] - base[k])) < 1e-5, (k, s)
    # attention output is not linear in its weights, but strength 0 must be the base model exactly
    with lv.disable_lora(m):
        off = m(x, img)
    for k in base:
        assert _rel(base[k], off[k]) < 1e-6, k


def test_strength_per_pattern_and_merge_uses_current_strength() -> None:
    m = _toy()
    _randomize(m)
    x, img = _inputs()
    assert lv.set_strength(m, 0.0, pattern="re:conv.*") == 2
    strengths = lv.get_strength(m, "default")
    assert strengths["conv1x1"] == 0.0 and strengths["fc"] == 1.0
    runtime = m(x, img)
    lv.merge_lora(m)
    merged = m(x, img)
    for k in runtime:
        assert _rel(merged[k], runtime[k]) < 1e-5


def test_gradients_reach_only_lora_parameters() -> None:
    m = _toy()
    _randomize(m)
    x, img = _inputs()
    out = m(x, img)
    sum(v.square().mean() for v in out.values()).backward()
    for n, p in m.named_parameters():
        if "lora_" in n:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert not p.requires_grad and p.grad is None, n


def test_trainable_parameter_count_matches_formula() -> None:
    m = _toy(rank=4, alpha=4.0)
    trainable, total = lv.count_parameters(m)
    r = 4
    expect = r * (12 + 20)  # Linear: r * (in + out)
    expect += r * 3 * 1 * 1 + 6 * r  # conv 1x1: A (r, in, 1, 1), B (out, r, 1, 1)
    expect += r * 3 * 3 * 3 + 5 * r  # conv 3x3: kernel on A
    expect += 4 * r * (12 + 12)  # MHA q, k, v, o: each a (12 -> 12) projection
    expect += 3 * r * (12 + 12)  # timm-style qkv split into q, k, v
    assert trainable == expect
    assert sum(p.numel() for p in lv.lora_parameters(m)) == expect
    assert "adapted 5 modules in Toy" in lv.lora_report(m)
    assert f"{expect:,} trainable parameters" in lv.lora_report(m)


def test_several_named_adapters_and_activation() -> None:
    m = _toy()
    lv.inject_lora(m, lv.LoRAConfig(rank=2, targets=("fc",)), name="second")
    _randomize(m)
    x, img = _inputs()
    assert lv.adapter_names(m) == ["default", "second"]
    both = m(x, img)["fc"]
    lv.set_active_adapters(m, ["default"])
    only_default = m(x, img)["fc"]
    lv.set_active_adapters(m, ["second"])
    only_second = m(x, img)["fc"]
    lv.set_active_adapters(m, [])
    base = m(x, img)["fc"]
    assert _rel(both - base, (only_default - base) + (only_second - base)) < 1e-5
    assert not torch.allclose(only_default, only_second)
    with pytest.raises(KeyError, match="unknown adapter"):
        lv.set_active_adapters(m, ["nope"])


def test_remove_lora_restores_original_modules() -> None:
    torch.manual_seed(0)
    ref = Toy()
    m = _toy()
    m.load_state_dict(ref.state_dict(), strict=False)
    _randomize(m)
    lv.merge_lora(m)
    restored = lv.remove_lora(m)
    assert sorted(restored) == sorted(KINDS)
    assert type(m.fc) is nn.Linear and type(m.attn) is nn.MultiheadAttention
    for k, v in ref.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_merge_with_nan_raises_and_leaves_weights_untouched() -> None:
    m = _toy()
    _randomize(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m.conv3x3.lora_B["default"][0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="conv3x3"):
        lv.merge_lora(m)
    for k, v in m.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, before[k]), k
    assert not any(layer.merged for _, layer in lv.lora_layers(m))


def test_merge_overflow_in_fp16_raises() -> None:
    m = _toy().half()
    for p in lv.lora_parameters(m):
        p.data = p.data.float()
    with torch.no_grad():
        m.fc.lora_A["default"].fill_(300.0)
        m.fc.lora_B["default"].fill_(300.0)
    w = m.fc.base.weight.clone()
    with pytest.raises(FloatingPointError, match="fc"):
        lv.merge_lora(m)
    assert torch.equal(m.fc.base.weight, w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_with_fp32_lora(dtype: torch.dtype) -> None:
    m32 = _toy()
    _randomize(m32)
    x, img = _inputs()
    ref = m32(x, img)
    m = _toy()
    m.load_state_dict(m32.state_dict())
    for n, mod in m.named_modules():
        if isinstance(mod, lv.LoRALayer):
            mod.base.to(dtype)
    assert all(p.dtype == torch.float32 for p in lv.lora_parameters(m))
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    # without autocast: inputs in the base dtype (MHA and conv in fp16 on CPU are covered where supported)
    out = m.fc(x.to(dtype))
    assert out.dtype == dtype and _rel(out.float(), ref["fc"]) < tol
    out = m.blk.qkv(x.to(dtype))
    assert out.dtype == dtype and _rel(out.float(), ref["qkv"]) < tol
    # with autocast (bf16 is what CPU autocast supports)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.fc(x)
    assert _rel(out.float(), ref["fc"]) < 2e-2
    # gradients still reach the fp32 LoRA weights
    m.fc(x.to(dtype)).float().square().mean().backward()
    assert m.fc.lora_A["default"].grad is not None and m.fc.lora_A["default"].grad.dtype == torch.float32


def test_state_dict_round_trip_and_strict_errors() -> None:
    m = _toy()
    _randomize(m)
    sd = {k: v.clone() for k, v in lv.lora_state_dict(m).items()}
    assert "attn.q.lora_A.weight" in sd and "blk.qkv.v.lora_B.weight" in sd and sd["fc.alpha"].item() == 6.0
    fresh = _toy()
    rep = lv.load_lora_state_dict(fresh, sd)
    assert rep.ok and len(rep.matched) == 1 + 2 + 4 + 3
    x, img = _inputs()
    a, b = m(x, img), fresh(x, img)
    for k in a:
        assert torch.equal(a[k], b[k])

    missing = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    with pytest.raises(lv.LoRAStateDictError, match=r"missing \(1\): fc"):
        lv.load_lora_state_dict(fresh, missing)
    extra = dict(sd, **{"nothere.lora_A.weight": torch.zeros(3, 12), "nothere.lora_B.weight": torch.zeros(20, 3)})
    with pytest.raises(lv.LoRAStateDictError, match=r"unexpected \(1\): nothere"):
        lv.load_lora_state_dict(fresh, extra)
    wrong = dict(sd, **{"fc.lora_A.weight": torch.zeros(3, 13)})
    with pytest.raises(lv.LoRAStateDictError, match=r"fc \(lora_A \(3, 13\) vs expected \(3, 12\)"):
        lv.load_lora_state_dict(fresh, wrong)
    with pytest.raises(lv.LoRAStateDictError, match="needs both lora_A.weight and lora_B.weight"):
        lv.load_lora_state_dict(fresh, {k: v for k, v in sd.items() if k != "fc.lora_B.weight"})
    # non-strict: loads what fits and reports the rest
    before = fresh.conv1x1.lora_A["default"].clone()
    wrong2 = dict(wrong, **{"conv1x1.lora_A.weight": torch.ones_like(before)})
    rep = lv.load_lora_state_dict(fresh, wrong2, strict=False)
    assert not rep.ok and rep.mismatched and rep.mismatched[0].startswith("fc")
    assert torch.equal(fresh.conv1x1.lora_A["default"], torch.ones_like(before))


def test_inject_from_state_dict_reproduces_model() -> None:
    m = _toy(rank_pattern={"fc": 5}, alpha_pattern={"re:conv.*": 1.5})
    _randomize(m)
    sd = lv.lora_state_dict(m)
    torch.manual_seed(0)
    other = Toy()
    names = lv.inject_lora_from_state_dict(other, sd)
    assert sorted(names) == sorted(KINDS)
    assert other.fc.ranks["default"] == 5 and other.conv1x1.alphas["default"] == 1.5
    x, img = _inputs()
    a, b = m(x, img), other(x, img)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_rank_alpha_patterns_and_rslora() -> None:
    cfg = lv.LoRAConfig(rank=8, alpha=16, rank_pattern={"conv3x3": 2}, alpha_pattern={"fc": 1.0}, conv_rank=4,
                        targets=KINDS)
    torch.manual_seed(0)
    m = Toy()
    lv.inject_lora(m, cfg)
    assert m.conv3x3.ranks["default"] == 2 and m.conv1x1.ranks["default"] == 8
    assert m.fc.alphas["default"] == 1.0 and m.fc.scaling("default") == 1.0 / 8
    assert cfg.rank_for("x.conv", kernel_size=3) == 4 and cfg.alpha_for("x.conv", kernel_size=3) == 4.0
    m2 = Toy()
    lv.inject_lora(m2, lv.LoRAConfig(rank=16, alpha=8, rslora=True, targets=("fc",)))
    assert math.isclose(m2.fc.scaling("default"), 8 / 4)


@pytest.mark.parametrize("bad, match", [
    ({"rank": 0}, "rank=0"), ({"rank": -2}, "rank=-2"), ({"rank": 2.5}, "rank=2.5"),
    ({"alpha": 0}, "alpha=0"), ({"alpha": -1.0}, "alpha=-1.0"), ({"alpha": float("nan")}, "alpha=nan"),
    ({"alpha": float("inf")}, "alpha=inf"), ({"dropout": 1.0}, "dropout=1.0"), ({"dropout": -0.1}, "dropout"),
    ({"init": "xavier"}, "init='xavier'"), ({"targets": ()}, "targets is empty"),
    ({"targets": ("re:([",)}, "invalid regex"), ({"rank_pattern": {"fc": 0}}, r"rank_pattern\['fc'\]"),
    ({"fused_parts": ("x",)}, "fused_parts"),
])
def test_bad_config_raises(bad: dict, match: str) -> None:
    with pytest.raises(lv.ConfigError, match=match):
        lv.LoRAConfig(**bad)


def test_bad_config_lists_every_problem_and_unknown_keys_hint() -> None:
    with pytest.raises(lv.ConfigError) as e:
        lv.LoRAConfig(rank=0, alpha=-1, dropout=2)
    assert "rank=0" in str(e.value) and "alpha=-1" in str(e.value) and "dropout=2" in str(e.value)
    with pytest.raises(lv.ConfigError, match="did you mean 'rank'"):
        lv.LoRAConfig.from_dict({"rnak": 4})


def test_target_matching_nothing_names_candidates() -> None:
    torch.manual_seed(0)
    with pytest.raises(lv.TargetError) as e:
        lv.inject_lora(Toy(), lv.LoRAConfig(targets=("fcc",)))
    msg = str(e.value)
    assert "matched 0 of 5" in msg and "closest: fc" in msg


def test_preset_on_wrong_model_and_unknown_preset() -> None:
    with pytest.raises(lv.TargetError, match="preset 'unet-attn' is for a diffusers UNet2DConditionModel"):
        lv.inject_lora(Toy(), lv.LoRAConfig(targets="unet-attn"))
    with pytest.raises(lv.TargetError, match="did you mean 'unet-attn'"):
        lv.inject_lora(Toy(), lv.LoRAConfig(targets="unet-atn"))


def test_out_proj_of_multihead_attention_is_not_adapted_alone() -> None:
    # MultiheadAttention reads out_proj.weight directly: wrapping the child Linear would be a silent no-op.
    with pytest.raises(lv.TargetError, match="matched 0"):
        lv.inject_lora(Toy(), lv.LoRAConfig(targets=("attn.out_proj",)))


def test_dropout_is_applied_only_in_training() -> None:
    m = _toy(dropout=0.5)
    _randomize(m)
    x, img = _inputs()
    m.eval()
    a, b = m(x, img)["fc"], m(x, img)["fc"]
    assert torch.equal(a, b)
    m.train()
    torch.manual_seed(3)
    c = m(x, img)["fc"]
    assert not torch.allclose(a, c)


def test_strength_change_does_not_recompile() -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    m = _toy()
    _randomize(m)
    x, img = _inputs()
    counter = CompileCounter()
    fn = torch.compile(m, backend=counter, fullgraph=True)
    ref = {}
    for i, s in enumerate((1.0, 0.5, 0.0, 1.7, -0.3)):
        lv.set_strength(m, s)
        out = fn(x, img)
        lv.set_strength(m, s)
        ref = m(x, img)
        for k in out:
            assert torch.allclose(out[k], ref[k], atol=1e-6), (k, s)
    assert counter.frame_count == 1, f"recompiled {counter.frame_count - 1} times on strength changes"


def test_strength_table_is_one_tensor_per_adapter() -> None:
    m = _toy()
    tables = {id(layer.tables["default"][0]) for _, layer in lv.lora_layers(m)}
    assert len(tables) == 1
    t: StrengthTable = next(lv.lora_layers(m))[1].tables["default"][0]
    assert t.values.shape == (len(KINDS),)
    lv.set_strength(m, 0.5)
    assert torch.allclose(t.values, (t.scaling * 0.5).float())


class _CountTorchCalls(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.calls += 1
        return func(*args, **(kwargs or {}))


def test_strength_table_registers_the_slots_of_one_load_in_one_build() -> None:
    t = StrengthTable("a")
    t.add_slot("first", 0.5)
    t.set_strength(2.0)  # a strength set before more slots come keeps its value
    with _CountTorchCalls() as counted:
        slots = [t.add_slot(f"layer{i}", 0.25 * (i + 1)) for i in range(200)]
    assert counted.calls == 0  # nothing per slot: the tensors are built on the next read
    assert slots == list(range(1, 201)) and len(t.layer_names) == 201
    with _CountTorchCalls() as counted:
        values = t.values
    assert counted.calls < 20  # one build for the 200 slots
    want_scaling = torch.tensor([0.5] + [0.25 * (i + 1) for i in range(200)], dtype=torch.float64)
    want_strength = torch.tensor([2.0] + [1.0] * 200, dtype=torch.float64)
    assert torch.equal(t.scaling, want_scaling) and torch.equal(t.strength, want_strength)
    assert torch.equal(values, (want_scaling * want_strength).float())
    t.set_strength(0.5, slots=[3])
    assert float(t.values[3]) == 0.25 * 3 * 0.5 and float(t.values[4]) == 0.25 * 4


def test_inject_checked_layers_gives_the_same_model_as_checked_here() -> None:
    from lora_vision.lora.ops import lora_specs
    from lora_vision.lora.spec import LayerSpec

    trained = _toy()
    _randomize(trained)
    specs = {k: s for k, s in lora_specs(trained, "default").items() if k in ("fc", "conv1x1", "conv3x3")}
    specs["fc"] = LayerSpec(specs["fc"].A, specs["fc"].B, specs["fc"].alpha, "rslora")
    x, img = _inputs()
    outs = []
    for checked in (False, True):
        torch.manual_seed(0)
        m = Toy()
        names = lv.inject_lora(m, name="given", layers=specs, freeze_base=False, trainable=False, checked=checked)
        assert names == ["fc", "conv1x1", "conv3x3"]
        assert m.fc.lora_A["given"].data_ptr() == specs["fc"].A.data_ptr()  # used as given, no copy
        assert m.fc.scaling("given") == specs["fc"].scaling
        outs.append(m(x, img))
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k
    with pytest.raises(ValueError, match="trainable=False"):
        lv.inject_lora(Toy(), name="given", layers=specs, checked=True)
    with pytest.raises(KeyError, match="nope.fc"):
        lv.inject_lora(Toy(), name="given", layers={"nope.fc": specs["fc"]}, trainable=False, checked=True)


def test_failed_merge_undoes_earlier_layers_and_keeps_prior_merges() -> None:
    m = _toy()
    lv.inject_lora(m, lv.LoRAConfig(rank=2, targets=KINDS), name="second")
    _randomize(m)
    lv.merge_lora(m, adapters=["default"])  # a first, good merge
    assert all(layer._undo is None for _, layer in lv.lora_layers(m))  # no weight copies kept after success
    merged_state = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m.blk.qkv.lora_B["second"][0, 0, 0] = float("inf")  # the last layer of the plan goes bad
    with pytest.raises(FloatingPointError, match="blk.qkv"):
        lv.merge_lora(m, adapters=["second"])
    for k, v in m.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, merged_state[k]), k
    assert all(layer.merged == {"default": 1.0} for _, layer in lv.lora_layers(m))
    lv.unmerge_lora(m)  # and the original weights still come back exactly
    torch.manual_seed(0)
    ref = Toy()
    now = m.state_dict()
    for k, v in ref.state_dict().items():
        prefix = next(p for p in KINDS if k.startswith(p + "."))
        assert torch.equal(now[f"{prefix}.base.{k[len(prefix) + 1:]}"], v), k


def test_atomic_write_leaves_no_temp_and_normal_permissions(tmp_path) -> None:
    import os

    from lora_vision.io import atomic_path, atomic_write_text

    target = tmp_path / "out.txt"
    atomic_write_text(target, "hello")
    assert target.read_text() == "hello"
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~mask)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "hello"  # the old file survives a crash
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temporary left behind


def test_target_matching_nothing_alike_suggests_no_unrelated_name() -> None:
    from lora_vision.models import build_tiny_sd

    unet = build_tiny_sd("sd1").unet
    with pytest.raises(lv.TargetError) as e:
        lv.inject_lora(unet, lv.LoRAConfig(targets=("qqqqqqq",)))
    msg = str(e.value)
    assert "closest" not in msg and "0.conv" not in msg
    assert "no module name resembles them; module names end in: " in msg and "to_q" in msg


def test_find_module_and_module_names_agree_with_named_modules():
    """The by-name lookups the loaders use instead of walking the model give what named_modules gives, wrappers
    included, and nothing for names the model does not have."""
    from lora_vision.lora.inject import ModuleNames, find_module, replace_module

    model = Toy()
    lv.inject_lora(model, lv.LoRAConfig(rank=2, targets=("fc", "conv1x1")))
    walked = dict(model.named_modules())
    names = ModuleNames(model)
    assert list(names) == list(walked) and len(names) == len(walked)
    for n, m in walked.items():
        assert find_module(model, n) is m and names[n] is m and n in names
    for missing in ("nope", "fc.nope", "blk.qkv.weight", "fc.base.bias", "attn.out_proj.x"):
        assert find_module(model, missing) is None and missing not in names
    with pytest.raises(KeyError):
        names["blk.nope"]
    with pytest.raises(AttributeError, match="no module 'blk.nope'"):
        replace_module(model, "blk.nope.fc", nn.Linear(1, 1))


def test_plain_wrappers_carry_no_kind_module_until_a_kind_adapter_comes():
    """A plain LoRA wrapper without dropout has only base, A and B as children (fewer modules to build on every load
    and to walk on every fuse); an adapter with dropout brings lora_dropout, the first LoHa adapter kind_factors, and
    the adapters save, merge and go."""
    model = Toy()
    lv.inject_lora(model, lv.LoRAConfig(rank=2, targets=("fc",)))
    assert [n for n, _ in model.fc.named_children()] == ["base", "lora_A", "lora_B"]
    lv.inject_lora(model, lv.LoRAConfig(rank=2, targets=("fc",), dropout=0.5), name="d")
    assert list(model.fc.lora_dropout) == ["d"] and isinstance(model.fc.lora_dropout["d"], nn.Dropout)
    lv.remove_lora(model, "d")
    assert "d" not in model.fc.lora_dropout and "d" not in model.fc.lora_A
    lv.inject_lora(model, lv.LoRAConfig(rank=2, targets=("fc",), adapter_type="loha"), name="h")
    assert "kind_factors" in dict(model.fc.named_children())
    assert any(k.startswith("fc.kind_factors.h.") for k in model.state_dict())
    x, img = _inputs()
    with torch.no_grad():
        for p in lv.lora_parameters(model):
            p.normal_(0, 0.1)
        ref = model(x, img)["fc"]
        lv.merge_lora(model)
        torch.testing.assert_close(model(x, img)["fc"], ref, atol=1e-5, rtol=1e-5)
    assert lv.remove_lora(model) == ["fc"] and isinstance(model.fc, nn.Linear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_merge_with_factors_in_the_weight_dtype_is_the_fp32_sum_rounded_once(dtype: torch.dtype) -> None:
    # A pipeline's adapters hold A and B in the weight's dtype: the merge adds B @ A into W in one product whose
    # sum is formed in fp32 and rounded once, as the fp32-copy path does; it must agree with that to one rounding.
    base = nn.Linear(96, 80).to(dtype)
    m = nn.Sequential(base)
    lv.inject_lora(m, lv.LoRAConfig(rank=8, alpha=4, targets=["0"]))
    layer = m[0]
    torch.manual_seed(5)
    with torch.no_grad():
        layer.lora_A["default"].data = torch.randn(8, 96).to(dtype)
        layer.lora_B["default"].data = torch.randn(80, 8).to(dtype)
    w0 = layer.base.weight.detach().clone()
    a, b = layer.lora_A["default"].detach().float(), layer.lora_B["default"].detach().float()
    expect = (w0.float() + 1.7 * 0.5 * (b @ a)).to(dtype)
    # one rounding of the result (half types) or the fp32 accumulation error over the rank (fp32): eps x the
    # terms' magnitude
    k = 8 if dtype == torch.float32 else 1
    bound = k * torch.finfo(dtype).eps * (w0.float().abs() + 1.7 * 0.5 * (b.abs() @ a.abs()))
    for cycle in range(3):
        lv.merge_lora(m, strength=1.7)
        got = layer.base.weight.detach()
        assert ((got.float() - expect.float()).abs() <= bound).all(), cycle
        assert not torch.equal(got, w0)
        lv.unmerge_lora(m)
        assert torch.equal(layer.base.weight, w0), cycle  # bit-exact back
    with torch.no_grad():
        layer.lora_B["default"][3, 2] = float("inf")
    with pytest.raises(FloatingPointError, match="0"):
        lv.merge_lora(m)
    assert torch.equal(layer.base.weight, w0) and not layer.merged


@pytest.mark.parametrize("conv", [dict(groups=2), dict(padding=1, padding_mode="reflect")], ids=["groups", "padding"])
def test_a_module_no_wrapper_takes_is_named_before_the_model_changes(conv):
    """A grouped or reflect-padded convolution among the targets: a TargetError naming it, raised before any other
    target is wrapped or the base frozen (it used to wrap the modules before it, then fail without the name)."""
    model = nn.ModuleDict({"fc": nn.Linear(16, 16), "conv": nn.Conv2d(4, 4, 3, **conv)})
    with pytest.raises(lv.TargetError, match=r"^conv: LoRAConv2d supports"):
        lv.inject_lora(model, lv.LoRAConfig(targets=("fc", "conv"), rank=2))
    assert type(model["fc"]) is nn.Linear and type(model["conv"]) is nn.Conv2d
    assert all(p.requires_grad for p in model.parameters())
