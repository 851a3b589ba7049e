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


def test_plain_lora_under_lycoris_te_reaches_the_encoder(pipes):
    """LyCORIS' own spelling of the text encoder (`lycoris_te_<module>`) reads plain LoRA pairs too."""
    pipe = _pipe(pipes, "qwen3")
    te = pipe.text_encoder
    layers, updates = {}, {}
    for i, name in enumerate(ENCODERS["qwen3"][4]):
        lin = te.get_submodule(name)
        layers[name], updates[name] = lycoris_update(locon.LoConModule, copy.deepcopy(lin),
                                                     {"lora_dim": 2, "alpha": 1.0}, torch.Generator().manual_seed(i))
    ref = copy.deepcopy(te)
    with torch.no_grad():
        for name, dw in updates.items():
            ref.get_submodule(name).weight += dw
    report = load_adapter(pipe, _file("qwen3", pipe, layers, ("lycoris_te_", True, "other")), name="p")
    assert report.source_report.ok and set(report.modules["text_encoder"]) == set(layers), report.source_report
    torch.testing.assert_close(_hidden(te), _hidden(ref), atol=1e-5, rtol=1e-5)


# ---- export: every kind kept, in ComfyUI's spelling, read back exactly -------------------------------------------

def _te_kind_adapter(pipe, seed: int = 0) -> Adapter:
    """A transformer LoRA plus, on the text encoder, LoKr on the attention, LoHa on the MLP input, DoRA on the
    output projections, plain LoRA on the MLP output and a full diff by hand on one q projection."""
    te = copy.deepcopy(pipe.text_encoder)
    names = [n for n, m in te.named_modules()  # the language model's decoder layers
             if isinstance(m, nn.Linear) and ".layers." in f".{n}"
             and not n.startswith(("model.vision", "model.visual"))]
    inject_lora(te, LoRAConfig(rank=2, alpha=2.0, targets=tuple(n for n in names if n.endswith(("k_proj", "v_proj"))),
                               adapter_type="lokr", lokr_factor=4), name="x")
    inject_lora(te, LoRAConfig(rank=2, alpha=1.0, targets=tuple(n for n in names if n.endswith("gate_proj")),
                               adapter_type="loha"), name="x")
    inject_lora(te, LoRAConfig(rank=2, targets=tuple(n for n in names if n.endswith("o_proj")),
                               adapter_type="dora"), name="x")
    inject_lora(te, LoRAConfig(rank=2, alpha=3.0, targets=tuple(n for n in names if n.endswith("down_proj"))),
                name="x")
    model = copy.deepcopy(pipe.transformer)
    inject_lora(model, LoRAConfig(rank=2, targets=(ENCODERS_LIVE_TRANSFORMER[type(model).__name__],)), name="x")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(te, "x") + lora_parameters(model, "x"):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    adapter = Adapter.from_models({"transformer": model, "text_encoder": te}, "x")
    q = next(n for n in names if n.endswith("q_proj"))
    tensors = dict(adapter.tensors)
    w = pipe.text_encoder.get_submodule(q).weight
    tensors[f"text_encoder.{q}.full.diff"] = torch.randn(w.shape, generator=g) * 0.01
    tensors[f"text_encoder.{q}.alpha"] = torch.tensor(1.0)
    return Adapter(tensors, adapter.metadata)


ENCODERS_LIVE_TRANSFORMER = {"QwenImageTransformer2DModel": "transformer_blocks.0.attn.to_out.0",
                             "ZImageTransformer2DModel": "layers.0.attention.to_out.0",
                             "Flux2Transformer2DModel": "transformer_blocks.0.attn.to_out.0"}


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_kind_export_of_llm_text_encoder_in_comfyui_names_reads_back_exactly(pipes, encoder, tmp_path):
    pipe = _pipe(pipes, encoder)
    _, family, enc, _, _ = ENCODERS[encoder]
    adapter = _te_kind_adapter(pipe)
    want = adapter.layers("text_encoder")
    assert {spec.label for spec in want.values()} == {"LoKr", "LoHa", "LoRA+DoRA", "LoRA", "full diff"}
    path = export(adapter, "kohya", tmp_path / "k.safetensors", base=family, dtype=torch.float32)
    sd = load_file(path)
    te_mods = {k.rsplit(".", 1)[0] for k in sd if k.startswith("text_encoders.")}
    assert te_mods and all(m.startswith(f"text_encoders.{enc}.transformer.model.layers.") for m in te_mods), te_mods
    assert all(k.startswith(("lora_unet_", "text_encoders.")) for k in sd)
    models = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}
    back, report = load_any(path, models=models, strict=True)
    assert report.base == family
    got = back.layers("text_encoder")
    assert set(got) == set(want)
    for key, spec in want.items():
        other = got[key]
        assert (other.kind, other.label) == (spec.kind, spec.label), key
        assert set(other.all_factors) == set(spec.all_factors), key
        for n, t in spec.all_factors.items():
            assert torch.equal(other.all_factors[n], t), (key, n)
        if spec.kind != "full":
            assert other.alpha == spec.alpha, key
    counts: dict[str, int] = {}
    for spec in want.values():
        if not spec.is_plain:  # the DiT reader counts the other kinds, not plain LoRA
            counts[spec.label] = counts.get(spec.label, 0) + 1
    assert report.kinds == counts
    loaded = load_adapter(pipe, path, name="back")
    assert set(loaded.modules["text_encoder"]) == set(want)


def test_t5_kinds_of_flux1_export_in_comfyui_names_and_read_back(tmp_path):
    """The same export writes Flux.1's T5 (text_encoder_2, ComfyUI `t5xxl`): `SelfAttention.q` is T5's module,
    not a part of a fused one."""
    pipe = build_tiny_dit("tiny-flux")
    t5, model = copy.deepcopy(pipe.text_encoder_2), copy.deepcopy(pipe.transformer)
    inject_lora(t5, LoRAConfig(rank=2, targets=("SelfAttention.q", "SelfAttention.o"), adapter_type="lokr",
                               lokr_factor=4), name="x")
    inject_lora(model, LoRAConfig(rank=2, targets=("transformer_blocks.0.attn.to_out.0",)), name="x")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(t5, "x") + lora_parameters(model, "x"):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    adapter = Adapter.from_models({"transformer": model, "text_encoder_2": t5}, "x")
    path = export(adapter, "kohya", tmp_path / "t5.safetensors", base="flux1", dtype=torch.float32)
    assert any(k.startswith("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lokr_")
               for k in load_file(path))
    back, report = load_any(path, models={"transformer": pipe.transformer, "text_encoder_2": pipe.text_encoder_2},
                            strict=True)
    want, got = adapter.layers("text_encoder_2"), back.layers("text_encoder_2")
    assert set(got) == set(want) and report.kinds == {"LoKr": len(want)}
    for key, spec in want.items():
        assert all(torch.equal(got[key].all_factors[n], t) for n, t in spec.all_factors.items()), key


# ---- bad input ----------------------------------------------------------------------------------------------------

def test_kind_that_does_not_fit_an_llm_encoder_is_named_and_refused_under_strict(pipes):
    """A LoKr of one part's rows on Qwen2.5-VL's fused vision qkv, half a LoHa, a LoKr of Qwen2.5-VL-7B's width
    (another model size): each named in the report; strict loads raise and leave the pipeline as it was."""
    pipe = _pipe(pipes, "qwen2.5-vl")
    te = pipe.text_encoder
    g = torch.Generator().manual_seed(0)
    d = te.get_submodule("model.visual.blocks.0.attn.qkv").weight.shape[1]
    good = "lora_te_model_layers_0_self_attn_o_proj"
    raw = _file("qwen2.5-vl", pipe, {}, DIALECTS[0]) | {
        # (d, d): the rows of q alone, on the fused (3d, d) qkv (old name `visual.`)
        "lora_te_visual_blocks_0_attn_qkv.lokr_w1": torch.randn(4, 4, generator=g),
        "lora_te_visual_blocks_0_attn_qkv.lokr_w2": torch.randn(d // 4, d // 4, generator=g),
        # LoHa with one of its two Hadamard halves (ComfyUI spelling)
        "text_encoders.qwen25_7b.transformer.model.layers.0.self_attn.q_proj.hada_w1_a": torch.randn(d, 2,
                                                                                                     generator=g),
        "text_encoders.qwen25_7b.transformer.model.layers.0.self_attn.q_proj.hada_w1_b": torch.randn(2, d,
                                                                                                     generator=g),
        # Qwen2.5-VL-7B's down_proj (3584 x 18944) on the tiny one (diffusers spelling)
        "text_encoder.model.language_model.layers.1.mlp.down_proj.lokr_w1": torch.randn(8, 8, generator=g),
        "text_encoder.model.language_model.layers.1.mlp.down_proj.lokr_w2_a": torch.randn(448, 1, generator=g),
        "text_encoder.model.language_model.layers.1.mlp.down_proj.lokr_w2_b": torch.randn(1, 2368, generator=g),
        f"{good}.lokr_w1": torch.randn(4, 4, generator=g),
        f"{good}.lokr_w2": torch.randn(d // 4, d // 4, generator=g),
    }
    models = {"transformer": pipe.transformer, "text_encoder": te}
    adapter, report = load_any(dict(raw), models=models)
    assert list(adapter.layers("text_encoder")) == ["model.language_model.layers.0.self_attn.o_proj"]
    assert report.invalid == [
        f"lora_te_visual_blocks_0_attn_qkv: LoKr factors lokr_w1 (4, 4), lokr_w2 ({d // 4}, {d // 4}) make a "
        f"({d}, {d}) update but the layer's Linear weight is ({3 * d}, {d})",
        "text_encoders.qwen25_7b.transformer.model.layers.0.self_attn.q_proj: LoHa layer has hada_w1_a "
        f"({d}, 2), hada_w1_b (2, {d}) but lacks hada_w2_a, hada_w2_b",
        "text_encoder.model.language_model.layers.1.mlp.down_proj: LoKr factors lokr_w1 (8, 8), lokr_w2_a (448, 1), "
        "lokr_w2_b (1, 2368) make a (3584, 18944) update but the layer's Linear weight is (16, 24)"]
    with pytest.raises(AdapterMismatchError, match="(?s)strict load failed.*attn_qkv: LoKr.*lacks hada_w2_a"):
        load_any(dict(raw), models=models, strict=True)
    before = {k: v.clone() for k, v in te.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match="3 broken layers in the file, nothing was loaded"):
        load_adapter(pipe, dict(raw), name="bad")
    assert list_adapters(pipe) == {}
    assert te.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in te.state_dict().items())
    loaded = load_adapter(pipe, dict(raw), name="bad", strict=False)  # what fits, the rest named
    assert loaded.modules["text_encoder"] == ["model.language_model.layers.0.self_attn.o_proj"]
    assert sum("make a (3584, 18944) update" in s for s in loaded.skipped) == 1


def test_export_refuses_what_comfyui_cannot_read_of_an_llm_encoder(pipes, tmp_path):
    """A part of the fused vision qkv, an encoder name the family does not have, a CLIP encoder beside a DiT
    transformer: one clear error each, and no file."""
    pipe = _pipe(pipes, "qwen2.5-vl")
    lin = pipe.text_encoder.get_submodule("model.visual.blocks.0.attn.qkv")
    out = pipe.transformer.get_submodule("transformer_blocks.0.attn.to_out.0")
    base = {"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": torch.ones(1, out.weight.shape[1]),
            "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": torch.ones(out.weight.shape[0], 1)}
    qkv = "text_encoder.model.visual.blocks.0.attn.qkv.q"
    part = Adapter(base | {f"{qkv}.lora_A.weight": torch.ones(1, lin.in_features),
                           f"{qkv}.lora_B.weight": torch.ones(lin.in_features, 1)})
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=r"text_encoder.model.visual.blocks.0.attn.qkv \(q part\): a part of a fused "
                                         r"projection has no ComfyUI spelling"):
        export(part, "kohya", path, base="qwen-image")
    whole = Adapter(base | {"text_encoder.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(1, 16),
                            "text_encoder.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(16, 1)})
    with pytest.raises(ValueError, match=r"text_encoder='qwen3_4b': ComfyUI's text_encoder of this family is one of "
                                         r"\['qwen25_7b'\]"):
        export(whole, "kohya", path, base="qwen-image", text_encoder="qwen3_4b")
    clip = Adapter(base | {"text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.ones(1, 16),
                           "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": torch.ones(16, 1)})
    with pytest.raises(ValueError, match=r"\['text_encoder'\]: export them separately"):
        export(clip, "kohya", path, base="flux1")
    assert not path.exists()


def test_flux2_export_names_the_encoder_comfyui_has():
    """Flux.2: Mistral 3 (dev) told by its module names, Qwen3 by its hidden width (klein 9B: 4096 -> qwen3_8b)."""
    from lora_vision.formats.dit_export import dit_kohya_tensors

    base = {"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": torch.ones(1, 16),
            "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": torch.ones(16, 1)}
    for name, width, enc in (("model.layers.0.self_attn.q_proj", 4096, "qwen3_8b"),
                             ("model.layers.0.self_attn.q_proj", 2560, "qwen3_4b"),
                             ("model.language_model.layers.0.self_attn.q_proj", 5120, "mistral3_24b")):
        adapter = Adapter(base | {f"text_encoder.{name}.lora_A.weight": torch.ones(1, width),
                                  f"text_encoder.{name}.lora_B.weight": torch.ones(8, 1)})
        tensors, _ = dit_kohya_tensors(adapter, "flux2")
        assert f"text_encoders.{enc}.transformer.model.layers.0.self_attn.q_proj.lora_down.weight" in tensors
