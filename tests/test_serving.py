"""AdapterServer: slots give the plain LoRA path's outputs, swaps are exact, nothing recompiles."""

from __future__ import annotations

import pytest
import torch

from lora_vision import LoRAConfig, inject_lora, set_strength
from lora_vision.adapter import Adapter
from lora_vision.models.tiny import build_tiny_sd
from lora_vision.serving import AdapterServer, SlotConv2d, SlotLinear

torch.set_num_threads(2)


def make_adapter(unet_targets: str, te_targets: str | None, rank: int, alpha: float, seed: int) -> Adapter:
    """A random adapter (non-zero B) for the tiny SD 1.x pipeline."""
    pipe = build_tiny_sd("sd1")
    models = {"unet": pipe.unet}
    inject_lora(pipe.unet, LoRAConfig(rank=rank, alpha=alpha, targets=unet_targets), name="x")
    if te_targets:
        inject_lora(pipe.text_encoder, LoRAConfig(rank=rank, alpha=alpha, targets=te_targets), name="x")
        models["text_encoder"] = pipe.text_encoder
    g = torch.Generator().manual_seed(seed)
    for m in models.values():
        for n, p in m.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.data = torch.randn(p.shape, generator=g) * 0.3
    return Adapter.from_models(models, name="x")


@pytest.fixture(scope="module")
def adapters() -> dict[str, Adapter]:
    # A: LoCon (resnet convs too), rank 4, UNet only. B: attention + text encoder, rank 8.
    return {"A": make_adapter("unet-locon", None, 4, 2.0, 1), "B": make_adapter("unet-attn", "clip-attn-mlp", 8, 8.0, 2)}


def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor(500), torch.randn(2, 77, 32, generator=g)


def run_unet(pipe) -> torch.Tensor:
    x, t, e = unet_inputs()
    with torch.no_grad():
        return pipe.unet(x, t, e).sample


def run_te(pipe) -> torch.Tensor:
    ids = pipe.tokenizer(["a photo of a red dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def plain(adapter: Adapter, strength: float, te_strength: float):
    pipe = build_tiny_sd("sd1")
    adapter.apply_to({c: getattr(pipe, c) for c in adapter.components()}, name="p")
    set_strength(pipe.unet, strength, "p")
    if "text_encoder" in adapter.components():
        set_strength(pipe.text_encoder, te_strength, "p")
    return pipe


@pytest.mark.parametrize("fuse_qkv", [False, True])
def test_slots_match_plain_lora_path(adapters, fuse_qkv):
    pipe = build_tiny_sd("sd1")
    server = AdapterServer(pipe, fuse_qkv=fuse_qkv)
    for k, a in adapters.items():
        server.add(k, a)
    assert server.prepare() > 0
    for name, s, te in (("A", 0.7, 1.0), ("B", 1.3, 0.5), ("B", -0.6, -1.0)):
        server.activate(name, strength=s, te_strength=te)
        ref = plain(adapters[name], s, te)
        torch.testing.assert_close(run_unet(pipe), run_unet(ref), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(run_te(pipe), run_te(ref), atol=1e-4, rtol=1e-4)
    if fuse_qkv:
        names = [n for n, m in pipe.unet.named_modules() if isinstance(m, SlotLinear)]
        assert any(n.endswith("attn1.to_qkv") for n in names) and any(n.endswith("attn2.to_kv") for n in names)
        assert not any(n.endswith("attn1.to_q") for n in names)


def test_base_and_strength_zero_equal_base_model(adapters):
    base = build_tiny_sd("sd1")
    want_unet, want_te = run_unet(base), run_te(base)
    pipe = build_tiny_sd("sd1")
    server = AdapterServer(pipe)
    server.add("A", adapters["A"])
    server.add("B", adapters["B"])
    server.activate("B", strength=0.0, te_strength=0.0)
    assert torch.equal(run_unet(pipe), want_unet) and torch.equal(run_te(pipe), want_te)
    server.activate(None)
    assert torch.equal(run_unet(pipe), want_unet) and torch.equal(run_te(pipe), want_te)
    assert any(isinstance(m, SlotConv2d) for m in pipe.unet.modules())


def test_swap_gives_exactly_what_loading_b_alone_gives(adapters):
    pipe = build_tiny_sd("sd1")
    pipe.set_progress_bar_config(disable=True)
    server = AdapterServer(pipe)
    server.add("A", adapters["A"])
    server.add("B", adapters["B"])
    server.activate("A", strength=1.0)
    _ = run_unet(pipe)
    server.activate("B", strength=0.8, te_strength=0.6)
    swapped = pipe("a red dog", num_inference_steps=2, output_type="pt",
                   generator=torch.Generator().manual_seed(3)).images

    alone = build_tiny_sd("sd1")
    alone.set_progress_bar_config(disable=True)
    only_b = AdapterServer(alone)
    only_b.add("B", adapters["B"])
    only_b.activate("B", strength=0.8, te_strength=0.6)
    want = alone("a red dog", num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(3)).images
    assert torch.equal(swapped, want)


def test_block_strengths_match_plain_per_block_strength(adapters):
    pipe = build_tiny_sd("sd1")
    server = AdapterServer(pipe)
    server.add("B", adapters["B"])
    server.activate("B", strength=0.9, block_strengths={"up": 0.0, "mid": 0.5})
    ref = plain(adapters["B"], 0.9, 0.9)
    set_strength(ref.unet, 0.0, "p", pattern=r"re:up_blocks\..*")
    set_strength(ref.unet, 0.45, "p", pattern=r"re:mid_block\..*")
    torch.testing.assert_close(run_unet(pipe), run_unet(ref), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="middle"):
        server.set_strength(1.0, block_strengths={"middle": 1.0})


def test_no_recompile_on_switch_or_strength_change(adapters):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    pipe = build_tiny_sd("sd1")
    server = AdapterServer(pipe, fuse_qkv=True)
    server.add("A", adapters["A"])
    server.add("B", adapters["B"])
    server.prepare()
    counter = CompileCounter()
    pipe.unet = torch.compile(pipe.unet, backend=counter, dynamic=False)
    server.activate("A", strength=1.0)
    out_a = run_unet(pipe)
    frames = counter.frame_count
    assert frames >= 1
    outs = []
    for step in (lambda: server.activate("B", 0.5), lambda: server.set_strength(1.2),
                 lambda: server.activate(None), lambda: server.activate("A", 1.0)):
        step()
        outs.append(run_unet(pipe))
    assert counter.frame_count == frames, "switching adapters or strength recompiled the UNet"
    assert torch.equal(outs[-1], out_a)
    assert not torch.equal(outs[0], outs[1])
    torch._dynamo.reset()


def test_adapters_added_after_prepare_must_fit(adapters):
    pipe = build_tiny_sd("sd1")
    server = AdapterServer(pipe)
    server.add("B", adapters["B"])
    server.prepare()
    with pytest.raises(ValueError, match="no slot"):
        server.add("A", adapters["A"])   # resnet convs have no slots
    small = make_adapter("unet-cross-attn", None, 16, 16.0, 5)
    with pytest.raises(ValueError, match="max_rank"):
        server.add("big", small)
    fits = make_adapter("unet-cross-attn", None, 2, 1.0, 6)
    server.add("fits", fits)
    server.activate("fits", 1.0)
    torch.testing.assert_close(run_unet(pipe), run_unet(plain(fits, 1.0, 1.0)), atol=1e-4, rtol=1e-4)
    with pytest.raises(KeyError, match="no adapter named"):
        server.activate("nope")
    with pytest.raises(RuntimeError, match="already"):
        server.prepare()


def test_remove_active_runs_base(adapters):
    pipe = build_tiny_sd("sd1")
    server = AdapterServer(pipe)
    server.add("B", adapters["B"])
    server.activate("B")
    server.remove("B")
    assert server.active is None and server.names() == []
    assert torch.equal(run_unet(pipe), run_unet(build_tiny_sd("sd1")))


def test_moving_the_pipeline_after_prepare_is_refused(adapters):
    pipe = build_tiny_sd("sd1")
    server = AdapterServer(pipe)
    server.add("B", adapters["B"])
    server.prepare()
    pipe.unet.to(torch.float64)
    pipe.text_encoder.to(torch.float64)
    with pytest.raises(RuntimeError, match="after pipe.to"):
        server.activate("B")
