"""Adapter kinds (LoHa, LoKr, DoRA, Tucker LoCon, OFT, (IA)^3, full diff, norm) in tiny diffusers pipelines: load_adapter at
strength, text-encoder and block strengths against hand-merged weights (W + s * delta), runtime == fused, several
adapters and set_adapters, fuse / unfuse bit-exact, merge_into_pipeline, and bad kind layers named and skipped."""

from __future__ import annotations

import pytest
import torch

from lora_vision import LoRAConfig, inject_lora, lora_layers, lora_parameters
from lora_vision.adapter import Adapter
from lora_vision.models import TINY_RESOLUTION, build_tiny_sd, load_sd_pipeline
from lora_vision.pipeline import (AdapterMismatchError, fuse, load_adapter, merge_into_pipeline, set_adapters,
                                  unfuse, unload_adapter)
from lora_vision.pipeline.blocks import block_of, multiplier, parse_block_strengths

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _noise(model: torch.nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in lora_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def make_kind_adapter(model_kind: str, seed: int, norms: bool = False) -> Adapter:
    """One adapter mixing kinds: LoHa on attention, LoKr on the feed-forward and the text encoder, DoRA on resnet
    convs, and, written in the native layout by hand, a Tucker LoCon conv, an OFT, an (IA)^3, a full diff and, with
    `norms`, norm-layer updates (a ResNet GroupNorm, a transformer-block LayerNorm and a CLIP LayerNorm)."""
    pipe = build_tiny_sd(model_kind)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet, te = pipe.unet, pipe.text_encoder
    inject_lora(unet, LoRAConfig(rank=2, alpha=1.0, targets=("attn1.to_q", "attn2.to_k", "attn1.to_out.0"),
                                 adapter_type="loha"), name="x")
    inject_lora(unet, LoRAConfig(rank=2, alpha=2.0, targets=("ff.net.2",), adapter_type="lokr", lokr_factor=4),
                name="x")
    inject_lora(unet, LoRAConfig(rank=2, targets=("resnets.0.conv1",), adapter_type="dora"), name="x")
    inject_lora(te, LoRAConfig(rank=2, targets=("self_attn.v_proj",), adapter_type="lokr", decompose_both=True),
                name="x")
    _noise(unet, g)
    _noise(te, g)
    adapter = Adapter.from_models({"unet": unet, "text_encoder": te}, "x")
    t = dict(adapter.tensors)
    conv = "unet.up_blocks.1.resnets.0.conv2"  # Tucker LoCon
    w = unet.get_submodule(conv[5:]).weight
    t |= {f"{conv}.lora_A.weight": torch.randn(2, w.shape[1], 1, 1, generator=g) * 0.1,
          f"{conv}.lora_B.weight": torch.randn(w.shape[0], 2, 1, 1, generator=g) * 0.1,
          f"{conv}.lora.lora_mid": torch.randn(2, 2, 3, 3, generator=g), f"{conv}.alpha": torch.tensor(1.0)}
    proj_in = next(n for n, _ in unet.named_modules() if n.endswith("attentions.0.proj_in"))
    block_norm = next(n for n, _ in unet.named_modules() if n.endswith("transformer_blocks.0.norm3"))
    te_norm = next(n for n, _ in te.named_modules() if n.endswith("layers.1.layer_norm1"))
    norm_layers = (("down_blocks.0.resnets.1.norm2", "norm"), (block_norm, "norm"), ("te:" + te_norm, "norm"))
    for mod, kind in ((proj_in, "oft"), ("mid_block.attentions.0.proj_out", "ia3"), ("conv_in", "full"),
                      *(norm_layers if norms else ())):
        comp, mod = ("text_encoder", mod[3:]) if mod.startswith("te:") else ("unet", mod)
        w = getattr(pipe, comp).get_submodule(mod).weight
        key = f"{comp}.{mod}"
        if kind == "norm":  # no alpha: LyCORIS writes none for norms
            t[f"{key}.norm.w_norm"] = torch.randn(w.shape, generator=g) * 0.2
            t[f"{key}.norm.b_norm"] = torch.randn(w.shape, generator=g) * 0.2
            continue
        if kind == "oft":
            t[f"{key}.oft.oft_blocks"] = torch.randn(w.shape[0] // 4, 4, 4, generator=g) * 0.05
        elif kind == "ia3":
            t[f"{key}.ia3.weight"] = torch.randn(w.shape[0], generator=g) * 0.2
        else:
            t[f"{key}.full.diff"] = torch.randn(w.shape, generator=g) * 0.01
            t[f"{key}.full.diff_b"] = torch.randn(w.shape[0], generator=g) * 0.01
        t[f"{key}.alpha"] = torch.tensor(0.0)
    return Adapter(t, adapter.metadata)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def model_kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def adapters(model_kind) -> tuple[Adapter, Adapter]:
    return make_kind_adapter(model_kind, 0, norms=True), make_kind_adapter(model_kind, 1, norms=True)


def _pipe(model_kind: str):
    pipe = build_tiny_sd(model_kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_out(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    unet = pipe.unet
    x = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 4, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pipe.text_encoder_2.config.projection_dim,
                                                              generator=g), "time_ids": torch.zeros(1, 6)}
    with torch.no_grad():
        return unet(x, 10, ctx, **kw).sample


def _te_out(pipe) -> torch.Tensor:
    with torch.no_grad():
        return pipe.text_encoder(torch.arange(8)[None]).last_hidden_state


def _hand_merged(model_kind: str, adapter: Adapter, strength: float, te: float, blocks: dict[str, float]):
    """A fresh pipeline with W + s * delta written into its weights (bias: + s * diff_b), s per component / block."""
    ref = _pipe(model_kind)
    with torch.no_grad():
        for comp in adapter.components():
            model = getattr(ref, comp)
            for key, spec in adapter.layers(comp).items():
                mod = model.get_submodule(key)
                s = strength * multiplier(block_of(key), blocks) if comp == "unet" else te
                mod.weight += s * spec.delta(mod.weight).reshape(mod.weight.shape)
                if spec.bias_delta() is not None:
                    mod.bias += s * spec.bias_delta()
    return ref


def test_kinds_at_strength_te_strength_and_blocks_match_hand_merged_weights(model_kind, adapters):
    pipe = _pipe(model_kind)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    report = load_adapter(pipe, adapters[0], name="a", strength=0.7, te_strength=0.3,
                          block_strengths="down=0.5, mid=2, up.1=0, other=1.5")
    assert report.num_modules == sum(1 for c in adapters[0].components() for _ in adapters[0].layers(c))
    unet = pipe.unet
    blocks = parse_block_strengths("down=0.5, mid=2, up.1=0, other=1.5", len(unet.down_blocks), len(unet.up_blocks))
    ref = _hand_merged(model_kind, adapters[0], 0.7, 0.3, blocks)
    runtime, te_runtime = _unet_out(pipe), _te_out(pipe)
    torch.testing.assert_close(runtime, _unet_out(ref), atol=TOL, rtol=TOL)
    torch.testing.assert_close(te_runtime, _te_out(ref), atol=TOL, rtol=TOL)
    assert (runtime - _unet_out(_pipe(model_kind))).abs().max() > 1e-3  # the adapter really changes the output
    fuse(pipe)
    torch.testing.assert_close(_unet_out(pipe), runtime, atol=TOL, rtol=TOL)
    torch.testing.assert_close(_te_out(pipe), te_runtime, atol=TOL, rtol=TOL)
    unfuse(pipe)
    unload_adapter(pipe)
    after = dict(pipe.unet.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_two_kind_adapters_switch_and_fuse_unfuse_cycles_are_bit_exact(model_kind, adapters):
    pipe = _pipe(model_kind)
    load_adapter(pipe, adapters[0], name="a")
    load_adapter(pipe, adapters[1], name="b", strength=-0.8)
    both = _unet_out(pipe)
    set_adapters(pipe, ["b"])
    alone = _pipe(model_kind)
    load_adapter(alone, adapters[1], name="b", strength=-0.8)
    torch.testing.assert_close(_unet_out(pipe), _unet_out(alone), atol=1e-6, rtol=0)
    set_adapters(pipe, ["a", "b"])
    torch.testing.assert_close(_unet_out(pipe), both, atol=1e-6, rtol=0)
    weights = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if ".base." in n}
    for _ in range(50):
        fuse(pipe, strength=1.3)
        unfuse(pipe)
    assert all(torch.equal(weights[n], p) for n, p in pipe.unet.named_parameters() if ".base." in n)
    fuse(pipe)
    torch.testing.assert_close(_unet_out(pipe), both, atol=TOL, rtol=TOL)


def test_merge_into_pipeline_writes_the_kinds_update(tmp_path, adapters, model_kind):
    if model_kind != "sd1":
        pytest.skip("one architecture is enough for the folder round trip")
    path = adapters[0].save(tmp_path / "kinds.safetensors")
    pipe = _pipe(model_kind)
    merge_into_pipeline(pipe, [(path, 0.6, 0.2)], tmp_path / "merged")
    assert not any(True for _ in lora_layers(pipe.unet))
    merged = load_sd_pipeline(str(tmp_path / "merged"))
    ref = _hand_merged(model_kind, adapters[0], 0.6, 0.2, {})
    for comp in ("unet", "text_encoder"):
        got, want = getattr(merged, comp).state_dict(), getattr(ref, comp).state_dict()
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6)


def test_bad_kind_layer_is_named_refused_strict_and_skipped_otherwise(adapters, model_kind):
    if model_kind != "sd1":
        pytest.skip("one architecture is enough")
    t = dict(adapters[0].tensors)
    key = next(k for k in t if k.endswith(".loha.hada_w2_b"))
    for half in ("w1", "w2"):  # factors that fit together but make a wider update than the layer's weight
        k = key.replace("w2_b", f"{half}_b")
        t[k] = torch.randn(t[k].shape[0], t[k].shape[1] + 3)
    bad = Adapter(t, adapters[0].metadata)
    pipe = _pipe(model_kind)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    layer = key[len("unet."):-len(".loha.hada_w2_b")]
    with pytest.raises(AdapterMismatchError, match=rf"{layer}.*hada_w2_b \(2, {t[key].shape[1]}\)"):
        load_adapter(pipe, bad, name="a")
    assert not any(True for _ in lora_layers(pipe.unet))
    assert all(torch.equal(before[n], p) for n, p in pipe.unet.named_parameters())
    report = load_adapter(pipe, bad, name="a", strict=False)
    assert f"unet.{layer}" in " ".join(report.skipped)
    assert layer not in report.modules["unet"] and report.modules["unet"]
