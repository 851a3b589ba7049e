"""The DiT training step copies nothing from the host once it has run (what a CUDA-graph capture needs).

A copy from unpinned host memory inside a capture fails, and the static step then falls back to the eager step: a
Flux.1 run on an H100 did so, because the pipeline's position-id helpers build the ids on the host at every call.
Without a GPU this is checked on the "meta" device: the transformer and the inputs live there, so any tensor made on
the host and moved to the device shows up as an op with a host input (more than one element) and a meta output.
The step runs once first, as the capture's warm-up does, and the second run is watched.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lora_vision.models.dit import build_tiny_dit
from lora_vision.training.dit.step import FlowSettings, flow_loss, position_ids
from lora_vision.training.sd.caching import TextTable
from lora_vision.training.sd.step import Inputs


class HostToDevice(TorchDispatchMode):
    """Records every op that takes a host tensor (not a 0-dim scalar) and returns a tensor on the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if any(t.device.type == "cpu" and t.dim() > 0 for t in ins) and any(t.device.type == "meta" for t in outs):
            self.ops.append(str(func))
        return out


FAMILIES = {"flux1": "tiny-flux", "flux2": "tiny-flux2", "sd3": "tiny-sd3", "qwen-image": "tiny-qwen-image"}


def _meta_step(family: str):
    pipe = build_tiny_dit(FAMILIES[family])
    transformer = pipe.transformer.to("meta")
    cfg = transformer.config
    channels = cfg.in_channels if family in ("flux2", "sd3") else cfg.in_channels // 4
    dim = cfg.joint_attention_dim
    meta = torch.device("meta")
    x = Inputs(torch.randn(2, channels, 8, 8, device=meta), torch.randn(2, channels, 8, 8, device=meta),
               torch.rand(2, device=meta), torch.tensor([0, 0], device=meta), torch.zeros(2, 6, device=meta), 2)
    pooled = torch.randn(1, cfg.pooled_projection_dim, device=meta) if family in ("flux1", "sd3") else None
    table = TextTable([""], [], hidden=torch.randn(1, 4, dim, device=meta), pooled=pooled,
                      mask=torch.ones(1, 4, dtype=torch.bool, device=meta))
    settings = FlowSettings(family, "logit_normal", 0.0, 1.0, 1.29, 3.5 if family == "flux1" else None, None, 1.0,
                            type(pipe))

    def step():
        loss = flow_loss(transformer, x, table, settings, torch.float32)
        loss.backward()
        return loss

    return step


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_flow_step_copies_nothing_from_the_host_after_its_first_run(family):
    step = _meta_step(family)
    step()  # the warm-up: per-shape tensors (position ids, rotary tables) are made and moved here
    watch = HostToDevice()
    with watch:
        loss = step()
    assert loss.device.type == "meta"
    assert watch.ops == [], f"{family}: host-to-device copies inside the step: {watch.ops}"


def test_position_ids_are_the_pipelines_and_made_once_per_shape():
    from diffusers import Flux2Pipeline, FluxPipeline

    cpu = torch.device("cpu")
    txt, img = position_ids(FluxPipeline, "flux1", 2, 8, 12, 5, cpu, torch.float32)
    torch.testing.assert_close(img, FluxPipeline._prepare_latent_image_ids(2, 4, 6, cpu, torch.float32))
    assert txt.shape == (5, 3) and not txt.any()
    assert position_ids(FluxPipeline, "flux1", 2, 8, 12, 5, cpu, torch.float32)[1] is img  # kept, not remade
    assert position_ids(FluxPipeline, "flux1", 2, 8, 16, 5, cpu, torch.float32)[1].shape == (32, 3)
    txt2, img2 = position_ids(Flux2Pipeline, "flux2", 2, 3, 4, 5, cpu, torch.int64)
    torch.testing.assert_close(img2, Flux2Pipeline._prepare_latent_ids(torch.zeros(2, 1, 3, 4)))
    torch.testing.assert_close(txt2, Flux2Pipeline._prepare_text_ids(torch.zeros(2, 5, 1)))
    with pytest.raises(ValueError, match="flux1 and flux2"):
        position_ids(FluxPipeline, "sd3", 1, 8, 8, 4, cpu, torch.float32)
