"""Pivotal tuning (--train_text_encoder_ti): only the new token rows train, a resumed run is exact, and the vectors
land in our adapter, the kohya file (bundle_emb, A1111's spelling) and the A1111 embedding file."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_vision.adapter import Adapter
from lora_vision.io import read_safetensors
from lora_vision.models import build_tiny_sd
from lora_vision.pipeline import expand_tokens, load_adapter
from lora_vision.training.sd.caching import encode_text, tokenize
from lora_vision.training.sd.config import SDTrainConfig
from lora_vision.training.sd.pivotal import NewTokens

from resume_checks import check_resume_exact
from test_train_sd import base_args, instance_dir, train_sd  # noqa: F401  (fixtures; tests/recipes is on sys.path)

FLAGS = ["--train_text_encoder_ti", "--token_abstraction", "sks"]


def test_only_the_new_token_rows_train():
    pipe = build_tiny_sd("sd1")
    te = pipe.text_encoder.requires_grad_(False)
    before = {k: v.clone() for k, v in te.state_dict().items()}
    tokens = NewTokens(SDTrainConfig(train_text_encoder_ti=True, token_abstraction="sks"), [pipe.tokenizer],
                       {"text_encoder": te})
    start = tokens.vectors()["text_encoder"]
    opt = torch.optim.AdamW(tokens.parameters(), lr=1e-2)
    ids = tokenize([pipe.tokenizer], [tokens.rewrite("a photo of sks toy"), "a photo of a toy"])
    for _ in range(3):
        hidden, _ = encode_text([te], ids, sdxl=False)
        hidden.square().mean().backward()
        opt.step()
        opt.zero_grad()
    vocab = next(v for k, v in before.items() if k.endswith("token_embedding.weight")).shape[0]
    assert [i for i in ids[0][0].tolist() if i >= vocab] == [vocab, vocab + 1]
    trained = tokens.vectors()["text_encoder"]
    assert (trained - start).abs().min() > 0  # every new vector moved
    after = te.state_dict()  # the wrapped embedding keeps the original table as `base`
    after = {k.replace(".token_embedding.base.", ".token_embedding."): v for k, v in after.items()
             if not k.endswith("token_embedding.vectors")}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_pivotal_run_resumes_exactly_and_writes_the_vectors(train_sd, instance_dir, tmp_path):
    full = check_resume_exact(train_sd, instance_dir, tmp_path, FLAGS)
    vectors = Adapter.load(full / "adapter.safetensors").embeddings()["sks"]["text_encoder"]
    assert vectors.shape == (2, build_tiny_sd("sd1").text_encoder.get_input_embeddings().embedding_dim)
    kohya, _ = read_safetensors(full / "adapter_kohya.safetensors")
    assert [k for k in kohya if k.startswith("bundle_emb.")] == ["bundle_emb.sks.string_to_param.*"]
    a1111, _ = read_safetensors(full / "embeddings.safetensors")
    assert list(a1111) == ["emb_params"] and torch.equal(a1111["emb_params"], vectors)
    ckpt, _ = read_safetensors(tmp_path / "parts" / "checkpoint-2" / "token_embeddings.safetensors")
    assert list(ckpt) == ["text_encoder"]

    # our loader reads the kohya file back and the trigger word now reaches the new rows
    pipe = build_tiny_sd("sd1")
    size = len(pipe.tokenizer)
    plain = pipe.encode_prompt("a photo of sks toy", "cpu", 1, False)[0]
    load_adapter(pipe, full / "adapter_kohya.safetensors", name="toy")
    assert len(pipe.tokenizer) == size + 2
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[size:], vectors, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(pipe.encode_prompt(expand_tokens(pipe, "a photo of sks toy"), "cpu", 1, False)[0],
                              plain)


def test_sdxl_pivotal_run_bundles_clip_l_and_clip_g(train_sd, instance_dir, tmp_path):
    out = tmp_path / "out"
    assert train_sd.main(base_args("tiny-sdxl", instance_dir, out, steps=1) + FLAGS) == 0
    kohya, _ = read_safetensors(out / "adapter_kohya.safetensors")
    assert sorted(k for k in kohya if k.startswith("bundle_emb.")) == ["bundle_emb.sks.clip_g", "bundle_emb.sks.clip_l"]
    assert sorted(read_safetensors(out / "embeddings.safetensors")[0]) == ["clip_g", "clip_l"]
    assert set(Adapter.load(out / "adapter.safetensors").embeddings()["sks"]) == {"text_encoder", "text_encoder_2"}


def test_missing_token_abstraction_is_a_clear_error(train_sd, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = train_sd.main(base_args("tiny-sd1", instance_dir, out, steps=1) + ["--train_text_encoder_ti"])
    err = capsys.readouterr().err
    assert code == 1
    assert "none of the 3 instance caption(s) contains the token abstraction 'TOK'" in err
    assert "Traceback" not in err and not (out / "adapter.safetensors").exists()


def test_bad_pivotal_settings_are_reported_together(train_sd, instance_dir, tmp_path, capsys):
    code = train_sd.main(base_args("tiny-sd1", instance_dir, tmp_path / "out", steps=1)
                         + ["--train_text_encoder_ti", "--token_abstraction", "my tok",
                            "--num_new_tokens_per_abstraction", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "num_new_tokens_per_abstraction=0: expected an integer >= 1" in err
    assert "token_abstraction='my tok': expected one word without spaces or dots" in err


def test_new_tokens_train_together_with_the_text_encoder_lora(train_sd, instance_dir, tmp_path):
    out = tmp_path / "out"
    assert train_sd.main(base_args("tiny-sd1", instance_dir, out, steps=2) + FLAGS + ["--train_text_encoder"]) == 0
    pipe = build_tiny_sd("sd1")
    start = NewTokens(SDTrainConfig(train_text_encoder_ti=True, token_abstraction="sks"), [pipe.tokenizer],
                      {"text_encoder": pipe.text_encoder}).vectors()["text_encoder"]
    adapter = Adapter.load(out / "adapter.safetensors")
    assert float((adapter.embeddings()["sks"]["text_encoder"] - start).abs().min()) > 0, "the new vectors never moved"
    assert any(k.startswith("text_encoder.") for k in adapter.tensors)  # and the text encoder's LoRA was trained
