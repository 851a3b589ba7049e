"""Bundled text embeddings (pivotal tuning): the kohya `bundle_emb` spelling A1111 reads, our own keys, the A1111
embedding file, read back by our reader, and placed in the tokenizer(s) by load_adapter (and taken out again)."""

from __future__ import annotations

import pytest
import torch

from lora_vision import LoRAConfig, inject_lora
from lora_vision.adapter import Adapter, embedding_tensors
from lora_vision.formats import export, read_adapter
from lora_vision.formats.kohya import a1111_embedding_tensors
from lora_vision.io import AdapterFileError, read_safetensors, write_safetensors
from lora_vision.models import build_tiny_sd
from lora_vision.pipeline import expand_tokens, load_adapter, unload_adapter


def adapter_with_tokens(kind: str, n: int = 2, seed: int = 0) -> tuple[Adapter, dict[str, torch.Tensor]]:
    """A small UNet LoRA of a tiny `kind` pipeline with token TOK of `n` random vectors per text encoder."""
    pipe = build_tiny_sd(kind)
    inject_lora(pipe.unet, LoRAConfig(rank=2, targets="unet-cross-attn"), name="x")
    g = torch.Generator().manual_seed(seed)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.1
    comps = ["text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
    vectors = {c: torch.randn(n, getattr(pipe, c).get_input_embeddings().weight.shape[1], generator=g)
               for c in comps}
    adapter = Adapter.from_models({"unet": pipe.unet}, "x")
    adapter.tensors.update(embedding_tensors({"TOK": vectors}))
    return adapter, vectors


def test_kohya_file_bundles_embeddings_in_a1111_spelling_sd1(tmp_path):
    adapter, vectors = adapter_with_tokens("sd1")
    path = export(adapter, "kohya", tmp_path / "k.safetensors", base="sd1")
    tensors, _ = read_safetensors(path)
    assert sorted(k for k in tensors if k.startswith("bundle_emb.")) == ["bundle_emb.TOK.string_to_param.*"]
    torch.testing.assert_close(tensors["bundle_emb.TOK.string_to_param.*"].float(), vectors["text_encoder"],
                               rtol=1e-3, atol=1e-3)  # the file's dtype (float16)
    back = read_adapter(path)[0].embeddings()
    assert list(back) == ["TOK"] and set(back["TOK"]) == {"text_encoder"}
    torch.testing.assert_close(back["TOK"]["text_encoder"].float(), vectors["text_encoder"], rtol=1e-3, atol=1e-3)


def test_kohya_file_bundles_embeddings_in_a1111_spelling_sdxl(tmp_path):
    adapter, vectors = adapter_with_tokens("sdxl")
    path = export(adapter, "kohya", tmp_path / "k.safetensors", base="sdxl")
    tensors, _ = read_safetensors(path)
    assert sorted(k for k in tensors if k.startswith("bundle_emb.")) == ["bundle_emb.TOK.clip_g",
                                                                        "bundle_emb.TOK.clip_l"]
    back = read_adapter(path)[0].embeddings()["TOK"]
    for comp, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        assert tensors[f"bundle_emb.TOK.{name}"].shape == vectors[comp].shape
        torch.testing.assert_close(back[comp].float(), vectors[comp], rtol=1e-3, atol=1e-3)


def test_native_file_keeps_embeddings_and_a1111_file_keys(tmp_path):
    adapter, vectors = adapter_with_tokens("sdxl")
    back = Adapter.load(adapter.save(tmp_path / "a.safetensors")).embeddings()["TOK"]
    assert all(torch.equal(back[c], vectors[c]) for c in vectors)
    assert sorted(a1111_embedding_tensors(vectors, sdxl=True)) == ["clip_g", "clip_l"]
    assert sorted(a1111_embedding_tensors({"text_encoder": vectors["text_encoder"]}, sdxl=False)) == ["emb_params"]


def test_broken_bundle_key_is_a_clear_error(tmp_path):
    adapter, _ = adapter_with_tokens("sd1")
    path = export(adapter, "kohya", tmp_path / "k.safetensors", base="sd1")
    tensors, meta = read_safetensors(path)
    tensors["bundle_emb.TOK.string_to_param.*"] = tensors["bundle_emb.TOK.string_to_param.*"][0]  # 1-D
    write_safetensors(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(AdapterFileError, match=r"bundled embedding key 'bundle_emb.TOK.string_to_param.\*': shape"):
        read_adapter(tmp_path / "bad.safetensors")


def prompt_embeds(pipe, prompt: str) -> torch.Tensor:
    return pipe.encode_prompt(expand_tokens(pipe, prompt), "cpu", 1, False)[0]


@pytest.mark.parametrize("fmt", ["kohya", "lora_vision"])
def test_load_adapter_places_the_tokens_and_unload_restores_the_tokenizer(tmp_path, fmt):
    pipe = build_tiny_sd("sd1")
    adapter, vectors = adapter_with_tokens("sd1", n=3)
    path = export(adapter, fmt, tmp_path / "tok.safetensors", base="sd1") if fmt == "kohya" \
        else adapter.save(tmp_path / "tok.safetensors")
    tokenizer, embedding = pipe.tokenizer, pipe.text_encoder.get_input_embeddings()
    size, rows = len(tokenizer), embedding.weight.detach().clone()
    before = prompt_embeds(pipe, "a photo of TOK")
    report = load_adapter(pipe, path, name="tok")
    assert report.tokens == ["TOK"] and "embedding token(s) TOK added" in str(report)
    assert len(pipe.tokenizer) == size + 3
    assert expand_tokens(pipe, "a photo of TOK, TOKEN") == "a photo of TOK TOK_1 TOK_2, TOKEN"
    ids = pipe.tokenizer(expand_tokens(pipe, "a photo of TOK")).input_ids
    assert [i for i in ids if i >= size] == [size, size + 1, size + 2]
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[:size], rows)
    torch.testing.assert_close(table[size:], vectors["text_encoder"], rtol=1e-3, atol=1e-3)
    assert not torch.allclose(prompt_embeds(pipe, "a photo of TOK"), before)  # the trigger changes the embedding
    unload_adapter(pipe, "tok")
    assert pipe.tokenizer is tokenizer and len(pipe.tokenizer) == size
    assert pipe.text_encoder.get_input_embeddings() is embedding and torch.equal(embedding.weight, rows)
    assert torch.equal(prompt_embeds(pipe, "a photo of TOK"), before)


def test_sdxl_tokens_go_into_both_tokenizers(tmp_path):
    pipe = build_tiny_sd("sdxl")
    adapter, vectors = adapter_with_tokens("sdxl")
    sizes = len(pipe.tokenizer), len(pipe.tokenizer_2)
    load_adapter(pipe, export(adapter, "kohya", tmp_path / "k.safetensors", base="sdxl"), name="tok")
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == (sizes[0] + 2, sizes[1] + 2)
    for comp, size in zip(("text_encoder", "text_encoder_2"), sizes):
        torch.testing.assert_close(getattr(pipe, comp).get_input_embeddings().weight[size:], vectors[comp],
                                   rtol=1e-3, atol=1e-3)
    unload_adapter(pipe)
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == sizes


def test_embeddings_for_another_width_change_nothing(tmp_path):
    pipe = build_tiny_sd("sd1")
    adapter, _ = adapter_with_tokens("sd1")
    adapter.tensors["embeddings.TOK.text_encoder"] = torch.zeros(2, 7)
    size = len(pipe.tokenizer)
    with pytest.raises(Exception, match="do not fit text_encoder, whose tokens are .* wide"):
        load_adapter(pipe, adapter, name="tok")
    assert len(pipe.tokenizer) == size and not getattr(pipe, "_lora_vision").adapters


def test_generate_uses_the_bundled_token_of_a_lora_tag(tmp_path):
    import numpy as np
    from PIL import Image

    from lora_vision.generation.run import GenerateConfig, generate, load_pipeline

    adapter, _ = adapter_with_tokens("sd1")
    folder = tmp_path / "loras"
    folder.mkdir()
    export(adapter, "kohya", folder / "tok.safetensors", base="sd1")
    plain = Adapter({k: v for k, v in adapter.tensors.items() if not k.startswith("embeddings.")}, adapter.metadata)
    export(plain, "kohya", folder / "plain.safetensors", base="sd1")

    pipe = load_pipeline(GenerateConfig(device="cpu", model="tiny-sd1"))

    def image(tag: str) -> np.ndarray:
        cfg = GenerateConfig(model="tiny-sd1", steps=1, output_dir=str(tmp_path / tag), progress=False,
                             prompts=[f"a photo of TOK <lora:{tag}:1>"], seeds=[0], lora_dir=str(folder))
        unload_adapter(pipe)
        return np.asarray(Image.open(generate(cfg, pipe=pipe)[0]).convert("RGB"))

    assert not np.array_equal(image("tok"), image("plain"))  # the same LoRA: only the trigger's vectors differ
