"""The adapter server and `lora-vision generate` on DiT pipelines (every family; the server also under
`torch.compile` on a Flux.1 transformer)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import lora_vision as lv
from lora_vision.adapter import Adapter
from lora_vision.cli import main
from lora_vision.models import DIT_KINDS, build_tiny_dit
from lora_vision.models.dit import transformer_inputs, transformer_output
from lora_vision.pipeline import load_adapter, unload_adapter
from lora_vision.serving import AdapterServer
from lora_vision.targets import default_preset


def _adapter(pipe, seed: int, rank: int = 2) -> Adapter:
    model = copy.deepcopy(pipe.transformer)
    lv.inject_lora(model, lv.LoRAConfig(rank=rank, targets=default_preset(model)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return Adapter.from_models({"transformer": model})


@pytest.mark.parametrize("name", list(DIT_KINDS))
def test_server_switches_like_the_pipeline_loader(name: str) -> None:
    pipe = build_tiny_dit(name)
    a, b = _adapter(pipe, 1), _adapter(pipe, 2, rank=3)
    inputs = transformer_inputs(pipe.transformer)
    blocks = "single.0=0.5" if name == "tiny-z-image" else "double.0=0.5"  # Z-Image has single-stream layers only
    want = {}
    for label, adapter in (("a", a), ("b", b)):
        load_adapter(pipe, adapter, name=label, strength=0.6, block_strengths=blocks)
        with torch.no_grad():
            want[label] = transformer_output(pipe.transformer, inputs)
        unload_adapter(pipe, label)
    server = AdapterServer(pipe)
    server.add("a", a)
    server.add("b", b)
    server.prepare()
    for label in ("a", "b", "a"):
        server.activate(label, strength=0.6, block_strengths=blocks)
        with torch.no_grad():
            torch.testing.assert_close(transformer_output(pipe.transformer, inputs), want[label], atol=1e-5,
                                       rtol=1e-5)


@pytest.mark.parametrize("name", list(DIT_KINDS))
def test_generate_with_an_adapter(name: str, tmp_path) -> None:
    pipe = build_tiny_dit(name)
    _adapter(pipe, 5).save(tmp_path / "style.safetensors")
    out = tmp_path / "out"
    rc = main(["generate", "--model", name, "--prompt", "a red box <lora:style:1>", "--lora_dir", str(tmp_path),
               "--steps", "2", "--sweep", "strength=0,1", "--output_dir", str(out), "--no_progress"])
    assert rc == 0
    off, on = (np.asarray(Image.open(out / f"0000{i}-0.png"), dtype=np.float32) for i in (0, 1))
    assert off.shape == on.shape == (64, 64, 3)
    # the adapter changes the picture: random tiny VAEs map the transformer's change to a few grey levels on average
    # (0.07 for Qwen-Image, 0.47 for Flux.2 in one run; strength 0 and 1 of the same seed are otherwise identical)
    assert np.abs(off - on).mean() > 0.03
    assert (out / "grid-00002-0.png").is_file()


def test_server_under_torch_compile_on_a_flux_transformer_does_not_recompile() -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    pipe = build_tiny_dit("tiny-flux")
    a, b = _adapter(pipe, 1), _adapter(pipe, 2, rank=3)
    inputs = transformer_inputs(pipe.transformer)
    load_adapter(pipe, b, name="b", strength=0.5)
    with torch.no_grad():
        want_b = transformer_output(pipe.transformer, inputs)
    unload_adapter(pipe, "b")
    server = AdapterServer(pipe)
    server.add("a", a)
    server.add("b", b)
    server.prepare()
    counter = CompileCounter()
    pipe.transformer = torch.compile(pipe.transformer, backend=counter, dynamic=False)
    try:
        server.activate("a", strength=1.0)
        with torch.no_grad():
            out_a = transformer_output(pipe.transformer, inputs)
            frames = counter.frame_count
            assert frames >= 1
            outs = []
            for step in (lambda: server.activate("b", 0.5), lambda: server.set_strength(1.2),
                         lambda: server.activate(None), lambda: server.activate("a", 1.0)):
                step()
                outs.append(transformer_output(pipe.transformer, inputs))
        assert counter.frame_count == frames, "switching adapters or strength recompiled the transformer"
        torch.testing.assert_close(outs[0], want_b, atol=1e-5, rtol=1e-5)
        assert not torch.equal(outs[0], outs[1])
        assert torch.equal(outs[-1], out_a)
    finally:
        torch._dynamo.reset()


def test_generate_refuses_an_sd_adapter_on_flux_under_strict(tmp_path, capsys) -> None:
    from lora_vision.models import build_tiny_sd

    unet = copy.deepcopy(build_tiny_sd("sd1").unet)
    lv.inject_lora(unet, lv.LoRAConfig(rank=2, targets="unet-attn"))
    Adapter.from_models({"unet": unet}).save(tmp_path / "sd.safetensors")
    rc = main(["generate", "--model", "tiny-flux", "--prompt", "a box", "--lora", str(tmp_path / "sd.safetensors"),
               "--steps", "1", "--output_dir", str(tmp_path / "out"), "--no_progress", "--strict"])
    err = capsys.readouterr().err
    assert rc in (1, 2) and "Traceback" not in err
    assert "unet" in err and "FluxPipeline" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))


def test_server_serves_t5_linears_named_q_and_o() -> None:
    """T5's attention Linears are named q / k / v / o, the letters of fused parts: the server takes them as Linear
    layers (it used to refuse the adapter as holding "fused-part entries") and matches the pipeline loader."""
    pipe = build_tiny_dit("tiny-flux")
    t5 = copy.deepcopy(pipe.text_encoder_2)
    lv.inject_lora(t5, lv.LoRAConfig(rank=2, targets=("SelfAttention.q", "SelfAttention.o")))
    with torch.no_grad():
        for key, p in t5.named_parameters():
            if "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    adapter = Adapter.from_models({"text_encoder_2": t5})
    ids = torch.tensor([[3, 7, 11, 2, 5]])
    load_adapter(pipe, adapter, name="t", strength=0.7)
    with torch.no_grad():
        want = pipe.text_encoder_2(input_ids=ids).last_hidden_state
    unload_adapter(pipe, "t")
    server = AdapterServer(pipe)
    server.add("t", adapter)
    server.prepare()
    server.activate("t", strength=0.7)
    with torch.no_grad():
        got = pipe.text_encoder_2(input_ids=ids).last_hidden_state
        server.activate(None)
        off = pipe.text_encoder_2(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - off).abs().max() > 1e-3  # the adapter does something
