"""Adapter kinds (LoKr, LoHa, full diff, DoRA) on the LLM text encoders of the DiT families (formats/dit_text.py):
Qwen-Image's Qwen2.5-VL, Z-Image's Qwen3Model, Flux.2-klein's Qwen3ForCausalLM and Flux.2-dev's Mistral 3, read in
every spelling plain LoRA is read in (kohya `lora_te_` / `lora_te1_`, LyCORIS `lycoris_te_`, diffusers
`text_encoder.`, ComfyUI `text_encoders.<encoder>.transformer.`), with transformers 5 and older module paths.

The oracle is lycoris-lora: a LyCORIS module on the encoder's own Linear, its merged weight minus the weight is the
update (full diff: the diff itself), written into a copy of the encoder by hand; our loaded encoder at text-encoder
strength s gives the hidden states of W + s * update."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import lycoris_update
from lora_vision import LoRAConfig, inject_lora, lora_parameters
from lora_vision.adapter import Adapter
from lora_vision.formats import export, load_any
from lora_vision.models import build_tiny_dit
from lora_vision.pipeline import (AdapterMismatchError, list_adapters, load_adapter, set_adapter_strength,
                                  unload_adapter)

pytest.importorskip("lycoris.modules")
from lycoris.modules import full as ly_full, locon, loha, lokr  # noqa: E402


def _mistral3() -> nn.Module:
    """Flux2Pipeline's (Flux.2-dev) encoder, Mistral3ForConditionalGeneration, at tiny size."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    return Mistral3ForConditionalGeneration(Mistral3Config(
        text_config={"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": 8, "vocab_size": 64},
        vision_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 16, "patch_size": 4})).eval()


# encoder -> (tiny pipeline, family, ComfyUI encoder name, a transformer module (kohya, live),
#             {live module: its spelling in older transformers / the other Qwen3 class})
ENCODERS = {
    "qwen2.5-vl": ("tiny-qwen-image", "qwen-image", "qwen25_7b",
                   ("lora_unet_transformer_blocks_0_attn_to_out_0", "transformer_blocks.0.attn.to_out.0"), {
                       "model.language_model.layers.0.self_attn.q_proj": "model.layers.0.self_attn.q_proj",
                       "model.language_model.layers.1.mlp.down_proj": "model.layers.1.mlp.down_proj"}),
    "qwen3": ("tiny-z-image", "z-image", "qwen3_4b",
              ("lora_unet_layers_0_attention_out", "layers.0.attention.to_out.0"), {
                  "layers.0.self_attn.q_proj": "model.layers.0.self_attn.q_proj",
                  "layers.1.mlp.down_proj": "model.layers.1.mlp.down_proj"}),
    "qwen3-causal": ("tiny-flux2", "flux2", "qwen3_4b",
                     ("lora_unet_double_blocks_0_img_attn_proj", "transformer_blocks.0.attn.to_out.0"), {
                         "model.layers.0.self_attn.q_proj": "layers.0.self_attn.q_proj",
                         "model.layers.1.mlp.down_proj": "layers.1.mlp.down_proj"}),
    "mistral3": ("tiny-flux2", "flux2", "mistral3_24b",
                 ("lora_unet_double_blocks_0_img_attn_proj", "transformer_blocks.0.attn.to_out.0"), {
                     "model.language_model.layers.0.self_attn.q_proj":
                         "language_model.model.layers.0.self_attn.q_proj",
                     "model.language_model.layers.1.mlp.down_proj": "language_model.model.layers.1.mlp.down_proj"}),
}
# kind -> (LyCORIS class, options; alpha = rank where LyCORIS' merge scales twice, see test_kinds_lycoris)
KINDS = {
    "lokr": (lokr.LokrModule, {"factor": 4, "lora_dim": 2, "alpha": 2.0}),
    "loha": (loha.LohaModule, {"lora_dim": 2, "alpha": 2.0}),
    "full": (ly_full.FullModule, {}),
    "dora": (locon.LoConModule, {"lora_dim": 2, "alpha": 1.0, "weight_decompose": True}),
}
LABELS = {"lokr": "LoKr", "loha": "LoHa", "full": "full diff", "dora": "LoRA+DoRA"}
# (prefix, underscored, which spelling of the module: "live" or "other")
DIALECTS = [("lora_te_", True, "other"), ("lora_te1_", True, "live"), ("lycoris_te_", True, "other"),
            ("text_encoder.", False, "live"), ("text_encoder.", False, "other"),
            ("text_encoders.{enc}.transformer.", False, "other")]


@pytest.fixture(scope="module")
def pipes():
    return {}


def _pipe(pipes: dict, encoder: str):
    if encoder not in pipes:
        pipe = build_tiny_dit(ENCODERS[encoder][0])
        if encoder == "mistral3":  # Flux2Pipeline proper (dev) encodes with Mistral 3
            pipe.text_encoder = _mistral3()
        if encoder == "qwen3-causal":  # the tiny klein encoder has 27 layers; 2 are enough here
            pipe.text_encoder.model.layers = pipe.text_encoder.model.layers[:2]
        pipes[encoder] = pipe
    return copy.deepcopy(pipes[encoder])


def _hidden(te: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return te(input_ids=torch.tensor([[1, 2, 3, 4, 5]]), output_hidden_states=True).hidden_states[-1]


def _lycoris(kind: str, lin: nn.Linear, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(file tensors by LyCORIS suffix, weight update) of a LyCORIS module with random non-zero factors."""
    cls, opts = KINDS[kind]
    g = torch.Generator().manual_seed(seed)
    if kind == "full":  # FullModule's merge needs the module applied; its file is the diff itself
        diff = torch.randn(lin.weight.shape, generator=g) * 0.05
        return {"diff": diff}, diff
    return lycoris_update(cls, copy.deepcopy(lin), opts, g)


def _file(encoder: str, pipe, layers: dict[str, dict[str, torch.Tensor]], dialect) -> dict[str, torch.Tensor]:
    """A DiT file (one transformer LoRA module, so that it is told to be one) with `layers` ({live module: tensors
    by suffix}) on the encoder in `dialect`."""
    _, _, enc, (key, live), spelling = ENCODERS[encoder]
    prefix, underscored, which = dialect
    w = pipe.transformer.get_submodule(live).weight
    g = torch.Generator().manual_seed(9)
    sd = {f"{key}.lora_down.weight": torch.randn(2, w.shape[1], generator=g),
          f"{key}.lora_up.weight": torch.randn(w.shape[0], 2, generator=g)}
    for name, tensors in layers.items():
        name = name if which == "live" else spelling.get(name, name)
        mod = prefix.format(enc=enc) + (name.replace(".", "_") if underscored else name)
        sd.update({f"{mod}.{s}": t for s, t in tensors.items()})
    return sd


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_kind_on_llm_text_encoder_in_every_spelling_matches_lycoris(pipes, encoder, kind):
    pipe = _pipe(pipes, encoder)
    te = pipe.text_encoder
    layers, updates = {}, {}
    for i, name in enumerate(ENCODERS[encoder][4]):
        layers[name], updates[name] = _lycoris(kind, te.get_submodule(name), seed=i)
    base = _hidden(te)
    want = {}
    for s in (0.5, 1.0):
        ref = copy.deepcopy(te)
        with torch.no_grad():
            for name, dw in updates.items():
                ref.get_submodule(name).weight += s * dw
        want[s] = _hidden(ref)
    assert (want[1.0] - base).abs().max() > 1e-3
    for dialect in DIALECTS:
        report = load_adapter(pipe, _file(encoder, pipe, layers, dialect), name="k", te_strength=0.5)
        src = report.source_report
        assert src.ok, (dialect, src)
        assert set(report.modules["text_encoder"]) == set(layers), (dialect, report)
        assert src.kinds == {LABELS[kind]: len(layers)}, (dialect, src.kinds)
        torch.testing.assert_close(_hidden(te), want[0.5], atol=1e-5, rtol=1e-5, msg=str(dialect))
        set_adapter_strength(pipe, "k", 1.0, te_strength=1.0)
        torch.testing.assert_close(_hidden(te), want[1.0], atol=1e-5, rtol=1e-5, msg=str(dialect))
        unload_adapter(pipe, "k")
    assert torch.equal(_hidden(te), base)
