"""The diffusers/PEFT format for DiT pipelines (`transformer.<module>.lora_A.weight`): files written by peft +
diffusers' `save_lora_weights` load through our loader with the outputs of diffusers' `load_lora_weights`, our export
of a trained adapter reads back in diffusers alike, and golden key lists pin each family's export."""

from __future__ import annotations

import copy

import pytest
import torch

import lora_vision as lv
from lora_vision.adapter import Adapter
from lora_vision.formats import export, load_any
from lora_vision.models import DIT_KINDS, build_tiny_dit
from lora_vision.models.dit import transformer_inputs, transformer_output
from lora_vision.pipeline import load_adapter, unload_adapter
from lora_vision.targets import default_preset

peft = pytest.importorskip("peft")

# The modules each family's attn-ff preset adapts in the tiny layouts, one entry per module path with the block
# index as N (a golden list: a changed name in diffusers or in our presets shows up here).
GOLDEN = {
    "tiny-flux": sorted(
        [f"transformer_blocks.{i}.{m}" for i in range(2) for m in (
            "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
            "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
            "ff_context.net.2")]
        + [f"single_transformer_blocks.{i}.{m}" for i in range(2)
           for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_out", "proj_mlp")]),
    "tiny-flux2": sorted(
        [f"transformer_blocks.{i}.{m}" for i in range(2) for m in (
            "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
            "attn.add_v_proj", "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
            "ff_context.linear_out")]
        + [f"single_transformer_blocks.{i}.attn.{m}" for i in range(2) for m in ("to_qkv_mlp_proj", "to_out")]),
    "tiny-sd3": sorted(
        [f"transformer_blocks.0.{m}" for m in (
            "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
            "attn.add_v_proj", "attn.to_add_out", "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")]
        + [f"transformer_blocks.1.{m}" for m in (  # the last block is context_pre_only
            "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
            "attn.add_v_proj", "ff.net.0.proj", "ff.net.2")]),
    "tiny-qwen-image": sorted(
        f"transformer_blocks.{i}.{m}" for i in range(2) for m in (
            "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
            "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
            "txt_mlp.net.2")),
    "tiny-z-image": sorted(
        f"{block}.{m}" for block in ("layers.0", "layers.1", "noise_refiner.0", "context_refiner.0") for m in (
            "attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
            "feed_forward.w2", "feed_forward.w3")),
}


def _randomise_b(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _peft_file(pipe, tmp_path) -> str:
    """A file written by peft + diffusers: add_adapter on the transformer, random B, save_lora_weights."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = copy.deepcopy(pipe.transformer)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=True, target_modules=_preset_modules(pipe),
                                       rank_pattern={"to_q": 2}, alpha_pattern={"to_k": 3}))
    _randomise_b(transformer, 7)
    type(pipe).save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                 weight_name="peft.safetensors")
    return str(tmp_path / "peft.safetensors")


def _preset_modules(pipe) -> list[str]:
    """The full names of the modules the family's attn-ff preset adapts (peft matches them by suffix)."""
    return lv.inject_lora(copy.deepcopy(pipe.transformer),
                          lv.LoRAConfig(rank=2, targets=default_preset(pipe.transformer) + "-ff"))


def _diffusers_output(name: str, path: str, inputs) -> torch.Tensor:
    pipe = build_tiny_dit(name)
    pipe.load_lora_weights(path)
    with torch.no_grad():
        return transformer_output(pipe.transformer, inputs)


@pytest.mark.parametrize("name", list(DIT_KINDS))
def test_peft_file_loads_like_diffusers(name: str, tmp_path) -> None:
    pipe = build_tiny_dit(name)
    inputs = transformer_inputs(pipe.transformer)
    with torch.no_grad():
        base = transformer_output(pipe.transformer, inputs)
    path = _peft_file(pipe, tmp_path)
    want = _diffusers_output(name, path, inputs)
    report = load_adapter(pipe, path, name="p")
    assert report.format == "diffusers" and set(report.modules) == {"transformer"}
    with torch.no_grad():
        got = transformer_output(pipe.transformer, inputs)
    assert (want - base).abs().max() > 1e-3  # the file does something
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(DIT_KINDS))
def test_our_export_reads_back_in_diffusers(name: str, tmp_path) -> None:
    pipe = build_tiny_dit(name)
    trained = copy.deepcopy(pipe.transformer)
    lv.inject_lora(trained, lv.LoRAConfig(rank=4, alpha=2, targets=default_preset(pipe.transformer) + "-ff",
                                          rank_pattern={"re:.*to_q": 2}))
    _randomise_b(trained, 3)
    adapter = Adapter.from_models({"transformer": trained})
    path = export(adapter, "diffusers", tmp_path / "ours.safetensors")
    inputs = transformer_inputs(pipe.transformer)
    with torch.no_grad():
        ours = transformer_output(trained, inputs)
    torch.testing.assert_close(_diffusers_output(name, str(path), inputs), ours, atol=1e-4, rtol=1e-4)
    # Golden keys: exactly the preset's modules, in diffusers spelling.
    from lora_vision.io import read_safetensors

    tensors, meta = read_safetensors(path)
    modules = sorted({k[len("transformer."):].rsplit(".lora_", 1)[0] for k in tensors})
    assert modules == GOLDEN[name]
    assert set(tensors) == {f"transformer.{m}.lora_{ab}.weight" for m in GOLDEN[name] for ab in "AB"}
    # And back through our own reader, without a model: the same adapter.
    back, report = load_any(path)
    assert report.ok and back.components() == ["transformer"]
    for key, t in back.plain().tensors.items():
        torch.testing.assert_close(t, adapter.plain().tensors[key])


def test_text_encoder_in_diffusers_format(tmp_path) -> None:
    """Flux.1 with its CLIP encoder: `text_encoder.` keys, read by diffusers with the same text-encoder output."""
    pipe = build_tiny_dit("tiny-flux")
    te = copy.deepcopy(pipe.text_encoder)
    tr = copy.deepcopy(pipe.transformer)
    lv.inject_lora(te, lv.LoRAConfig(rank=2, targets="clip-attn"))
    lv.inject_lora(tr, lv.LoRAConfig(rank=2, targets="flux-attn"))
    _randomise_b(te, 1)
    _randomise_b(tr, 2)
    path = export(Adapter.from_models({"transformer": tr, "text_encoder": te}), "diffusers", tmp_path / "te.safetensors")
    ids = pipe.tokenizer(["a dog"], return_tensors="pt").input_ids
    theirs = build_tiny_dit("tiny-flux")
    theirs.load_lora_weights(str(path))
    load_adapter(pipe, path)
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state,
                                   theirs.text_encoder(ids).last_hidden_state, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state, te(ids).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)
    unload_adapter(pipe)


def test_our_diffusers_export_reads_back_with_its_alpha(tmp_path) -> None:
    """alpha != rank lives in lora_adapter_metadata (no alpha tensors): our reader takes it from there too."""
    from lora_vision.formats import read_adapter

    pipe = build_tiny_dit("tiny-flux")
    model = copy.deepcopy(pipe.transformer)
    lv.inject_lora(model, lv.LoRAConfig(rank=2, alpha=4, targets=default_preset(model)))
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.normal_(std=0.2)
    adapter = Adapter.from_models({"transformer": model})
    path = export(adapter, "diffusers", tmp_path / "a.safetensors")
    back, _report = read_adapter(str(path))
    want = {n: s.alpha for n, s in adapter.layers("transformer").items()}
    assert want and {n: s.alpha for n, s in back.layers("transformer").items()} == want == dict.fromkeys(want, 4.0)
