"""One scale for every path: an rsLoRA adapter (scaling alpha / sqrt(rank)) gives the trained model's outputs through
`Adapter.apply_to`, the pipeline loader, the adapter server, kohya / diffusers / peft exports read back, `resize` at
full rank and `merge_adapters` at weights 1 and 0; the kohya and diffusers files give the same outputs in diffusers'
own `load_lora_weights`."""

from __future__ import annotations

import pytest
import torch

from lora_vision import LoRAConfig, inject_lora, lora_layers
from lora_vision.adapter import Adapter
from lora_vision.analysis import adapter_layers
from lora_vision.formats import export, load_any
from lora_vision.models import TINY_LATENT_SIZE, build_tiny_sd
from lora_vision.pipeline import load_adapter
from lora_vision.serving import AdapterServer
from lora_vision.arithmetic import merge_adapters, resize

TOL = 1e-5
CONFIGS = {"unet": LoRAConfig(rank=8, alpha=8, rslora=True, targets="unet-locon", conv_rank=4, conv_alpha=2.0),
           "text_encoder": LoRAConfig(rank=4, alpha=2.0, rslora=True, targets="clip-attn-mlp")}


def _components(pipe) -> dict[str, torch.nn.Module]:
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


@torch.no_grad()
def _outputs(pipe) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, TINY_LATENT_SIZE, TINY_LATENT_SIZE, generator=g)
    e = torch.randn(1, 7, pipe.unet.config.cross_attention_dim, generator=g)
    ids = torch.randint(0, 300, (1, 9), generator=g)
    return {"unet": pipe.unet(x, torch.tensor(500), e).sample, "text_encoder": pipe.text_encoder(ids)[0]}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    diff = {k: float((got[k] - want[k]).abs().max()) for k in want}
    assert max(diff.values()) < TOL, (what, diff)


@pytest.fixture(scope="module")
def trained():
    """A tiny SD 1.x pipeline trained (randomised) with rsLoRA, its outputs, and the adapter saved from it."""
    torch.set_num_threads(2)
    pipe = build_tiny_sd("sd1")
    g = torch.Generator().manual_seed(3)
    for comp, model in _components(pipe).items():
        inject_lora(model, CONFIGS[comp])
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "lora_A" in n else 0.1))
    want = _outputs(pipe)
    base = _outputs(build_tiny_sd("sd1"))
    assert all(float((want[k] - base[k]).abs().max()) > 1e-2 for k in want)  # the adapter matters
    return pipe, want, Adapter.from_models(_components(pipe))


def _applied(adapter: Adapter) -> dict[str, torch.Tensor]:
    pipe = build_tiny_sd("sd1")
    adapter.apply_to(_components(pipe))
    return _outputs(pipe)


def test_apply_to_and_a_saved_file_give_the_trained_outputs(trained, tmp_path):
    _, want, adapter = trained
    _assert_same(_applied(adapter), want, "apply_to")
    _assert_same(_applied(Adapter.load(adapter.save(tmp_path / "a.safetensors"))), want, "saved file")


def test_pipeline_loader_and_server_give_the_trained_outputs(trained, tmp_path):
    _, want, adapter = trained
    path = adapter.save(tmp_path / "a.safetensors")
    for source in (adapter, path):
        pipe = build_tiny_sd("sd1")
        load_adapter(pipe, source, name="a")
        _assert_same(_outputs(pipe), want, f"load_adapter({type(source).__name__})")
    pipe = build_tiny_sd("sd1")
    server = AdapterServer(pipe)
    server.add("a", path)
    server.activate("a")
    _assert_same(_outputs(pipe), want, "AdapterServer")


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "peft"])
def test_exports_read_back_give_the_trained_outputs(trained, tmp_path, fmt):
    _, want, adapter = trained
    kw = {"base": "sd1", "dtype": torch.float32} if fmt == "kohya" else {}
    path = export(adapter, fmt, tmp_path / ("out" if fmt == "peft" else "out.safetensors"), **kw)
    pipe = build_tiny_sd("sd1")
    read, _ = load_any(path, models=_components(pipe), strict=True)
    read.apply_to(_components(pipe))
    _assert_same(_outputs(pipe), want, fmt)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_exports_give_the_trained_outputs_in_diffusers(trained, tmp_path, fmt):
    _, want, adapter = trained
    kw = {"base": "sd1", "dtype": torch.float32} if fmt == "kohya" else {}
    path = export(adapter, fmt, tmp_path / "out.safetensors", **kw)
    ref = build_tiny_sd("sd1")
    ref.load_lora_weights(str(path), adapter_name="x")
    _assert_same(_outputs(ref), want, f"diffusers load_lora_weights of the {fmt} file")


def test_resize_at_full_rank_and_merge_at_weights_1_and_0_keep_the_outputs(trained):
    pipe, want, adapter = trained
    full, _ = resize(adapter, ranks={}, progress=False)
    _assert_same(_applied(full), want, "resize at full rank")
    other = Adapter.from_models(_components(pipe))
    other.tensors = {k: (v.flip(0) if k.endswith("lora_B.weight") else v) for k, v in other.tensors.items()}
    merged, _ = merge_adapters([adapter, other], weights=[1.0, 0.0], progress=False)
    _assert_same(_applied(merged), want, "merge at weights 1 and 0")


def test_analysis_uses_the_layers_scale(trained):
    pipe, _, adapter = trained
    layers = adapter_layers(adapter)
    for comp, model in _components(pipe).items():
        for name, layer in lora_layers(model):
            got = layers[f"{comp}.{name}"]
            assert got.scaling == pytest.approx(layer.scaling("default"), rel=1e-6), name
