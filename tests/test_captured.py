"""lora_vision.captured.CapturedModel: a denoiser replayed from CUDA graphs. On the CPU it is the model itself
(delegation, same images); the layout counter that makes stale graphs re-record moves with every change of the
modules that run and not with in-place changes; on a GPU (tests marked cuda, run on the device machine) the replayed
steps equal the eager ones through adapter switches, strength changes and re-captures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_vision.captured import CapturedModel
from lora_vision.lora.layers import layout_generation
from lora_vision.models.tiny import build_tiny_sd
from lora_vision.pipeline import fuse, load_adapter, set_adapter_strength, set_adapters, unfuse, unload_adapter
from lora_vision.serving import AdapterServer
from test_serving import make_adapter

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def adapters():
    return {"A": make_adapter("unet-attn", "clip-attn", 4, 4.0, 1), "B": make_adapter("unet-attn", None, 8, 4.0, 2)}


def _images(pipe) -> np.ndarray:
    return pipe("a red dog", num_inference_steps=3, height=64, width=64, guidance_scale=5.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_on_the_cpu_the_captured_model_is_the_model_itself(adapters):
    pipe = build_tiny_sd("sd1")
    pipe.set_progress_bar_config(disable=True)
    load_adapter(pipe, adapters["A"], name="a")
    ref = _images(pipe)
    unet = pipe.unet
    pipe.unet = CapturedModel(unet)
    assert pipe.unet.config is unet.config and pipe.unet.dtype == unet.dtype and pipe.device == unet.device
    assert pipe.unet.model is unet
    np.testing.assert_array_equal(_images(pipe), ref)
    assert pipe.unet.captures == 0  # nothing to capture without CUDA
    pipe.unet._graphs["recorded before"] = object()  # as a GPU run leaves it
    pipe.unet.to(torch.float64)  # new memory for every weight: what was recorded is dropped
    assert not pipe.unet._graphs and unet.dtype == torch.float64
    with pytest.raises(ValueError, match="warmup=0"):
        CapturedModel(unet, warmup=0)


def test_the_layout_moves_with_the_modules_that_run_not_with_in_place_changes(adapters):
    pipe = build_tiny_sd("sd1")
    seen = [layout_generation()]

    def moved() -> bool:
        seen.append(layout_generation())
        return seen[-1] != seen[-2]

    load_adapter(pipe, adapters["A"], name="a")
    assert moved()
    load_adapter(pipe, adapters["B"], name="b")
    assert moved()
    set_adapters(pipe, ["b"])
    assert moved()
    set_adapter_strength(pipe, "b", 0.3)  # one table copy in place: a captured graph stays valid
    assert not moved()
    fuse(pipe)
    assert moved()
    unfuse(pipe)
    assert moved()
    unload_adapter(pipe, "a")
    assert moved()
    server_pipe = build_tiny_sd("sd1")
    server = AdapterServer(server_pipe)
    server.add("A", adapters["A"])
    server.add("B", adapters["B"])
    server.prepare()
    assert moved()
    server.activate("A", 0.5)
    server.activate("B", 1.2)
    server.set_strength(0.7)
    server.activate(None)
    assert not moved()


def _unet_call(unet, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g, device="cuda")
    e = torch.randn(2, 77, 32, generator=g, device="cuda")
    with torch.no_grad():
        return unet(x, torch.tensor(500 + seed, device="cuda"), encoder_hidden_states=e, return_dict=False)[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_replayed_steps_equal_eager_ones_through_switches_and_recaptures(adapters):
    pipe = build_tiny_sd("sd1").to("cuda")
    server = AdapterServer(pipe)
    server.add("A", adapters["A"])
    server.add("B", adapters["B"])
    server.prepare()
    eager = pipe.unet
    captured = CapturedModel(eager)
    for step, change in enumerate((lambda: server.activate("A"), lambda: server.set_strength(0.4),
                                   lambda: server.activate("B", 1.5), lambda: server.activate(None))):
        change()
        torch.testing.assert_close(_unet_call(captured, step), _unet_call(eager, step), atol=1e-5, rtol=1e-5)
    assert captured.captures == 1, "an in-place switch re-recorded the graph"
    out = _unet_call(captured, 0)
    again = _unet_call(captured, 1)  # a second replay must not overwrite what the first returned
    torch.testing.assert_close(out, _unet_call(eager, 0), atol=1e-5, rtol=1e-5)
    assert not torch.equal(out, again)
    # plain adapters: a switch changes the modules that run, so the next call records again
    plain = build_tiny_sd("sd1").to("cuda")
    load_adapter(plain, adapters["A"], name="a")
    load_adapter(plain, adapters["B"], name="b")
    captured = CapturedModel(plain.unet)
    for names in (["a"], ["b"], ["a", "b"]):
        set_adapters(plain, names)
        torch.testing.assert_close(_unet_call(captured, 3), _unet_call(plain.unet, 3), atol=1e-5, rtol=1e-5)
    assert captured.captures == 3
    # a whole generation through the captured UNet gives the eager images
    plain.set_progress_bar_config(disable=True)
    ref = plain("a red dog", num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator("cuda").manual_seed(0)).images
    plain.unet = captured
    got = plain("a red dog", num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator("cuda").manual_seed(0)).images
    np.testing.assert_allclose(got, ref, atol=1e-4)
