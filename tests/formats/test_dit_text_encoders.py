"""Text-encoder keys of the DiT families whose encoders are LLMs (formats/dit_text.py): Qwen-Image's Qwen2.5-VL,
Flux.2-klein's Qwen3ForCausalLM and Flux.2-dev's Mistral 3, Z-Image's Qwen3, in kohya (`lora_te_` / `lora_te1_`),
diffusers / PEFT (`text_encoder.`) and ComfyUI (`text_encoders.<encoder>.transformer.`) spellings, with the module
paths of transformers 5 and of older transformers (Qwen2.5-VL / Mistral 3 nest the language model differently)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lora_vision.adapter import Adapter
from lora_vision.formats import load_any
from lora_vision.models import build_tiny_dit
from lora_vision.pipeline import load_adapter, unload_adapter

QWEN_PROJ = ("lora_unet_transformer_blocks_0_attn_to_out_0", "transformer_blocks.0.attn.to_out.0")
FLUX2_PROJ = ("lora_unet_double_blocks_0_img_attn_proj", "transformer_blocks.0.attn.to_out.0")
# pipeline -> (ComfyUI encoder name, a transformer module (kohya, live), {live module: its other spelling})
CASES = {
    "tiny-qwen-image": ("qwen25_7b", QWEN_PROJ, {
        "model.language_model.layers.0.self_attn.q_proj": "model.layers.0.self_attn.q_proj",  # transformers < 4.52
        "model.language_model.layers.1.mlp.down_proj": "model.layers.1.mlp.down_proj"}),
    "tiny-flux2": ("qwen3_4b", FLUX2_PROJ, {  # klein: Qwen3ForCausalLM
        "model.layers.0.self_attn.q_proj": "layers.0.self_attn.q_proj",  # the bare Qwen3Model's path
        "model.layers.1.mlp.down_proj": "layers.1.mlp.down_proj"}),
    "tiny-z-image": ("qwen3_4b", ("lora_unet_layers_0_attention_out", "layers.0.attention.to_out.0"), {  # Qwen3Model
        "layers.0.self_attn.q_proj": "model.layers.0.self_attn.q_proj",  # Qwen3ForCausalLM's path (ComfyUI's)
        "layers.1.mlp.down_proj": "model.layers.1.mlp.down_proj"}),
}
# (prefix, underscored, down, up, which spelling of the module: "live" or "other")
DIALECTS = [("lora_te_", True, "lora_down.weight", "lora_up.weight", "other"),
            ("lora_te1_", True, "lora_down.weight", "lora_up.weight", "live"),
            ("text_encoder.", False, "lora_A.weight", "lora_B.weight", "other"),
            ("text_encoder.", False, "lora_A.weight", "lora_B.weight", "live"),
            ("text_encoders.{enc}.transformer.", False, "lora_down.weight", "lora_up.weight", "other")]


def _factors(te: torch.nn.Module, names, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in names:
        w = te.get_submodule(n).weight
        out[n] = (torch.randn(2, w.shape[1], generator=g), torch.randn(w.shape[0], 2, generator=g) * 0.5)
    return out


def _hidden(te: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return te(input_ids=torch.tensor([[1, 2, 3, 4, 5]]), output_hidden_states=True).hidden_states[-1]


def _reference(te: torch.nn.Module, factors, strength: float, alpha: float) -> torch.Tensor:
    """The encoder with the factors applied by the core API under its live names (no file, no mapping)."""
    ref = copy.deepcopy(te)
    tensors = {}
    for n, (a, b) in factors.items():
        tensors |= {f"text_encoder.{n}.lora_A.weight": a, f"text_encoder.{n}.lora_B.weight": b,
                    f"text_encoder.{n}.alpha": torch.tensor(alpha)}
    Adapter(tensors).apply_to({"text_encoder": ref}, strength=strength)
    return _hidden(ref)


def _file(enc: str, transformer_module: tuple[str, str], transformer, factors, spelling: dict[str, str], dialect,
          alpha_tensor: bool) -> dict[str, torch.Tensor]:
    """A DiT file (one transformer module, so that it is told to be one) with the encoder's factors in `dialect`."""
    prefix, underscored, down, up, which = dialect
    key, live = transformer_module
    w = transformer.get_submodule(live).weight
    g = torch.Generator().manual_seed(9)
    sd = {f"{key}.lora_down.weight": torch.randn(2, w.shape[1], generator=g),
          f"{key}.lora_up.weight": torch.randn(w.shape[0], 2, generator=g)}
    for live, (a, b) in factors.items():
        name = live if which == "live" else spelling[live]
        mod = prefix.format(enc=enc) + (name.replace(".", "_") if underscored else name)
        sd[f"{mod}.{down}"], sd[f"{mod}.{up}"] = a, b
        if alpha_tensor:
            sd[f"{mod}.alpha"] = torch.tensor(3.0)
    return sd


@pytest.mark.parametrize("name", list(CASES))
def test_llm_text_encoder_keys_in_every_dialect_reach_the_encoder(name):
    pipe = build_tiny_dit(name)
    enc, transformer_module, spelling = CASES[name]
    te = pipe.text_encoder
    factors = _factors(te, list(spelling))
    base = _hidden(te)
    want = _reference(te, factors, 0.5, 3.0)
    assert (want - base).abs().max() > 1e-3
    for dialect in DIALECTS:
        sd = _file(enc, transformer_module, pipe.transformer, factors, spelling, dialect, alpha_tensor=True)
        report = load_adapter(pipe, sd, name="te", te_strength=0.5)
        assert set(report.modules["text_encoder"]) == set(spelling), (dialect, report)
        assert report.source_report.ok, (dialect, report.source_report)
        torch.testing.assert_close(_hidden(te), want, atol=1e-5, rtol=1e-5, msg=str(dialect))
        unload_adapter(pipe, "te")
    assert torch.equal(_hidden(te), base)


def test_peft_alpha_of_the_text_encoder_comes_from_lora_adapter_metadata():
    """diffusers files carry no alpha tensors: the text encoder's alpha is read from lora_adapter_metadata."""
    pipe = build_tiny_dit("tiny-qwen-image")
    enc, transformer_module, spelling = CASES["tiny-qwen-image"]
    factors = _factors(pipe.text_encoder, list(spelling), seed=1)
    sd = _file(enc, transformer_module, pipe.transformer, factors, spelling, DIALECTS[2], alpha_tensor=False)
    meta = {"lora_adapter_metadata": json.dumps({"text_encoder.r": 2, "text_encoder.lora_alpha": 1.0})}
    adapter, report = load_any(sd, models={"transformer": pipe.transformer, "text_encoder": pipe.text_encoder},
                               metadata=meta, strict=True)
    assert {spec.alpha for spec in adapter.layers("text_encoder").values()} == {1.0}


def test_mistral3_text_encoder_of_flux2_dev_in_old_and_new_names():
    """Flux2Pipeline (Flux.2-dev) encodes with Mistral3ForConditionalGeneration: transformers 5 nests its language
    model as model.language_model.layers, transformers < 4.52 as language_model.model.layers."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    te = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config={"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 64},
        vision_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 4})).eval()
    flux2 = build_tiny_dit("tiny-flux2").transformer
    spelling = {"model.language_model.layers.0.self_attn.q_proj": "language_model.model.layers.0.self_attn.q_proj",
                "model.language_model.layers.1.mlp.down_proj": "language_model.model.layers.1.mlp.down_proj"}
    factors = _factors(te, list(spelling), seed=2)
    want = _reference(te, factors, 1.0, 3.0)
    for dialect in (DIALECTS[0], DIALECTS[2], DIALECTS[4]):
        sd = _file("mistral3_24b", FLUX2_PROJ, flux2, factors, spelling, dialect, alpha_tensor=True)
        adapter, report = load_any(sd, models={"transformer": flux2, "text_encoder": te}, strict=True)
        assert report.base == "flux2" and set(adapter.layers("text_encoder")) == set(spelling), report
        model = copy.deepcopy(te)
        Adapter({k: v for k, v in adapter.tensors.items() if k.startswith("text_encoder.")}).apply_to(
            {"text_encoder": model})
        torch.testing.assert_close(_hidden(model), want, atol=1e-5, rtol=1e-5, msg=str(dialect))
