"""pipeline.load_adapter and friends on DiT pipelines (a `transformer` instead of a `unet`): strength, text-encoder
strength, block strengths by double/single index, switch, fuse/unfuse bit-exact, unload, and files that do not fit."""

from __future__ import annotations

import copy

import pytest
import torch

import lora_vision as lv
from lora_vision.adapter import Adapter
from lora_vision.lora.layers import LoRALayer
from lora_vision.models import DIT_KINDS, build_tiny_dit, build_tiny_sd
from lora_vision.models.dit import transformer_inputs, transformer_output
from lora_vision.pipeline import (AdapterMismatchError, fuse, list_adapters, load_adapter, set_adapter_strength,
                                  set_adapters, unfuse, unload_adapter)
from lora_vision.targets import default_preset

TE_COMPONENT = {"tiny-flux": "text_encoder", "tiny-flux2": "text_encoder", "tiny-sd3": "text_encoder_2",
                "tiny-qwen-image": "text_encoder", "tiny-z-image": "text_encoder"}


def trained_adapter(pipe, te: str | None = None, seed: int = 1, ff: bool = True) -> Adapter:
    """An adapter as training leaves it: the family's attn(+ff) preset with random B, plus a text encoder."""
    gen = torch.Generator().manual_seed(seed)
    models = {"transformer": copy.deepcopy(pipe.transformer)}
    preset = default_preset(pipe.transformer) + ("-ff" if ff else "")
    lv.inject_lora(models["transformer"], lv.LoRAConfig(rank=2, alpha=4, targets=preset))
    if te:
        models[te] = copy.deepcopy(getattr(pipe, te))
        lv.inject_lora(models[te], lv.LoRAConfig(rank=2, targets=default_preset(models[te])))
    with torch.no_grad():
        for model in models.values():
            for key, p in model.named_parameters():
                if "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return Adapter.from_models(models)


def out(pipe, inputs) -> torch.Tensor:
    with torch.no_grad():
        return transformer_output(pipe.transformer, inputs)


def reference(pipe, adapter: Adapter, strength: float, comp: str = "transformer"):
    """A copy of a component with the adapter injected by the core API at `strength` (no pipeline code)."""
    model = copy.deepcopy(getattr(pipe, comp))
    only = Adapter({k: v for k, v in adapter.tensors.items() if k.startswith(comp + ".")}, adapter.metadata)
    only.apply_to({comp: model}, strength=strength)
    return model


@pytest.fixture(scope="module")
def flux():
    return build_tiny_dit("tiny-flux")


@pytest.mark.parametrize("name", list(DIT_KINDS))
def test_load_strength_fuse_unfuse_unload(name: str) -> None:
    pipe = build_tiny_dit(name)
    te = TE_COMPONENT[name]
    adapter = trained_adapter(pipe, te)
    inputs = transformer_inputs(pipe.transformer)
    base = out(pipe, inputs)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with torch.no_grad():
        want = transformer_output(reference(pipe, adapter, 0.7), inputs)

    report = load_adapter(pipe, adapter, name="a", strength=0.7)
    assert set(report.modules) == {"transformer", te}
    got = out(pipe, inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - base).abs().max() > 1e-3

    fuse(pipe)
    torch.testing.assert_close(out(pipe, inputs), got, atol=1e-5, rtol=1e-5)
    unfuse(pipe)
    for k, v in pipe.transformer.state_dict().items():
        if k in before:  # the base weights, bit for bit
            assert torch.equal(v, before[k]), k
    set_adapter_strength(pipe, "a", 0.0)
    assert torch.equal(out(pipe, inputs), base)

    unload_adapter(pipe, "a")
    assert not any(isinstance(m, LoRALayer) for m in pipe.transformer.modules())
    assert pipe.transformer.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())


def test_text_encoder_strength(flux) -> None:
    pipe = copy.deepcopy(flux)
    adapter = trained_adapter(pipe, "text_encoder")
    ids = pipe.tokenizer(["a dog"], return_tensors="pt").input_ids
    with torch.no_grad():
        base = pipe.text_encoder(ids).last_hidden_state
        want = reference(pipe, adapter, 0.5, "text_encoder")(ids).last_hidden_state
        load_adapter(pipe, adapter, name="a", strength=1.0, te_strength=0.0)
        assert torch.equal(pipe.text_encoder(ids).last_hidden_state, base)
        set_adapter_strength(pipe, "a", 1.0, te_strength=0.5)
        torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state, want, atol=1e-6, rtol=1e-6)
    assert list_adapters(pipe)["a"]["te_strength"] == 0.5


def test_block_strengths_by_double_and_single_index(flux) -> None:
    pipe = copy.deepcopy(flux)
    adapter = trained_adapter(pipe)
    inputs = transformer_inputs(pipe.transformer)
    load_adapter(pipe, adapter, name="a", block_strengths="double.1=0, single=0.5")
    # The same adapter without double block 1, and single blocks at half strength, built with the core API.
    want = copy.deepcopy(flux.transformer)
    keep = {k: v for k, v in adapter.tensors.items() if not k.startswith("transformer.transformer_blocks.1.")}
    Adapter(keep, adapter.metadata).apply_to({"transformer": want})
    assert lv.set_strength(want, 0.5, pattern=r"re:single_transformer_blocks\..*") == 2 * 5  # attention q/k/v, proj_out, proj_mlp
    with torch.no_grad():
        torch.testing.assert_close(out(pipe, inputs), transformer_output(want, inputs), atol=1e-5, rtol=1e-5)
    assert list_adapters(pipe)["a"]["block_strengths"] == {"double.1": 0.0, "single": 0.5}


def test_switch_between_two_adapters(flux) -> None:
    pipe = copy.deepcopy(flux)
    a, b = trained_adapter(pipe, seed=1), trained_adapter(pipe, seed=2, ff=False)
    inputs = transformer_inputs(pipe.transformer)
    load_adapter(pipe, a, name="a")
    only_a = out(pipe, inputs)
    load_adapter(pipe, b, name="b")
    set_adapters(pipe, ["b"])
    with torch.no_grad():
        torch.testing.assert_close(out(pipe, inputs), transformer_output(reference(flux, b, 1.0), inputs),
                                   atol=1e-5, rtol=1e-5)
    set_adapters(pipe, ["a"])
    assert torch.equal(out(pipe, inputs), only_a)


def test_bad_block_keys_name_the_sections(flux) -> None:
    pipe = copy.deepcopy(flux)
    adapter = trained_adapter(pipe)
    with pytest.raises(ValueError, match=r"unknown block 'down' \(this model's sections: double, single, other\)"):
        load_adapter(pipe, adapter, block_strengths="down=1")
    with pytest.raises(ValueError, match=r"block 'single.5' does not exist: this transformer has 2 single blocks"):
        load_adapter(pipe, adapter, block_strengths={"single.5": 0})
    assert list_adapters(pipe) == {}


def test_adapter_of_another_family_leaves_the_pipeline_as_it_was(flux) -> None:
    pipe = copy.deepcopy(flux)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    sd3 = build_tiny_dit("tiny-sd3")
    with pytest.raises(AdapterMismatchError, match="transformer modules"):
        load_adapter(pipe, trained_adapter(sd3))
    sd_unet = build_tiny_sd("sd1")
    model = copy.deepcopy(sd_unet.unet)
    lv.inject_lora(model, lv.LoRAConfig(rank=2, targets="unet-attn"))
    with pytest.raises(AdapterMismatchError, match=r"weights for \['unet'\], which FluxPipeline does not have"):
        load_adapter(pipe, Adapter.from_models({"unet": model}))
    assert pipe.transformer.state_dict().keys() == before.keys() and list_adapters(pipe) == {}


def test_file_for_a_deeper_model_counts_its_missing_modules_in_the_transformer(flux) -> None:
    pipe = copy.deepcopy(flux)
    w = pipe.transformer.transformer_blocks[0].attn.to_out[0].weight
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(6):  # the tiny model has 2 double blocks: blocks 2..5 are not there
        sd[f"lora_unet_double_blocks_{i}_img_attn_proj.lora_down.weight"] = torch.randn(2, w.shape[1], generator=gen)
        sd[f"lora_unet_double_blocks_{i}_img_attn_proj.lora_up.weight"] = torch.randn(w.shape[0], 2, generator=gen)
    with pytest.raises(AdapterMismatchError, match=r"4 modules the model does not have \(4 in the transformer;") as e:
        load_adapter(pipe, sd, name="deep")
    assert "UNet" not in str(e.value)
    assert list_adapters(pipe) == {} and not any(isinstance(m, LoRALayer) for m in pipe.transformer.modules())
