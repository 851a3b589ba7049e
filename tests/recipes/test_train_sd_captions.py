"""Caption handling of scripts/train_sd.py: kohya's tag shuffle with keep_tokens, caption dropout, caption files
with another extension; with cached text embeddings, shuffled variants are encoded on the fly."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_vision.models import build_tiny_sd
from lora_vision.training.sd.caching import build_text_table, encode_text, tokenize
from lora_vision.training.sd.captions import CaptionVariants, shuffle_tags

from resume_checks import check_resume_exact, largest_difference
from test_train_sd import REPO, base_args, train_sd  # noqa: E402,F401  (fixtures; tests/recipes is on sys.path)


def test_keep_tokens_keeps_the_first_n_tags_and_shuffles_the_rest():
    rng = np.random.default_rng(0)
    caption = "sks toy, red, on a table, photo,  studio light"
    tags = ["sks toy", "red", "on a table", "photo", "studio light"]
    seen = set()
    for _ in range(200):
        out = shuffle_tags(caption, 2, rng).split(", ")
        assert out[:2] == tags[:2] and sorted(out[2:]) == sorted(tags[2:])
        seen.add(tuple(out[2:]))
    assert len(seen) == 6  # every order of the 3 other tags occurs
    assert {shuffle_tags(caption, 0, rng).split(", ")[0] for _ in range(100)} == set(tags)


def _table(prompts: list[str]):
    pipe = build_tiny_sd("sd1")
    table = build_text_table(prompts, [pipe.tokenizer], [pipe.text_encoder], False, cache=True, dtype=torch.float32)
    return pipe, table


def test_caption_dropout_yields_the_empty_prompt_embedding_at_the_rate():
    pipe, table = _table(["", "a photo of sks toy"])
    variants = CaptionVariants(table, [pipe.tokenizer], [pipe.text_encoder], False, torch.float32, shuffle=False,
                               keep_tokens=0, dropout_rate=0.25, batch=8)
    rng = np.random.default_rng(0)
    rows = np.concatenate([variants.rows(np.full(8, 1), rng) for _ in range(500)])
    assert set(rows.tolist()) == {0, 1}
    assert abs((rows == 0).mean() - 0.25) < 0.02
    empty, _ = pipe.encode_prompt("", "cpu", 1, False)  # the pipeline's own empty-prompt embedding
    torch.testing.assert_close(table.hidden[variants.empty_row], empty[0])
    assert variants.encoded == 0  # the empty prompt is cached, nothing is encoded per step


def test_shuffled_captions_are_encoded_into_scratch_rows():
    caption = "sks toy, red, blue, green"
    pipe, table = _table([caption])
    variants = CaptionVariants(table, [pipe.tokenizer], [pipe.text_encoder], False, torch.float32, shuffle=True,
                               keep_tokens=1, dropout_rate=0.0, batch=4)
    assert table.hidden.shape[0] == 1 + 4 and table.ids[0].shape[0] == 1 + 4
    rng, check = np.random.default_rng(3), np.random.default_rng(3)
    rows = variants.rows(np.zeros(4, dtype=np.int64), rng)
    expected = [shuffle_tags(caption, 1, check) for _ in range(4)]
    with torch.no_grad():
        want, _ = encode_text([pipe.text_encoder], tokenize([pipe.tokenizer], expected), False)
    for i, (row, text) in enumerate(zip(rows, expected)):
        assert row == 0 if text == caption else row >= 1
        torch.testing.assert_close(table.hidden[row], want[i])
    assert any(row >= 1 for row in rows) and variants.encoded == sum(t != caption for t in expected)


@pytest.fixture()
def tagged_dir(tmp_path: Path) -> Path:
    """Three sample images with comma-separated tag captions in .caption files (kohya's extension)."""
    folder = tmp_path / "tagged"
    folder.mkdir()
    for i, name in enumerate(("toy_00", "toy_01", "toy_03")):
        shutil.copy(REPO / "samples" / "instance" / f"{name}.jpg", folder)
        (folder / f"{name}.caption").write_text(f"sks toy, pink, robot, background {i}, photo\n", encoding="utf-8")
    return folder


def test_caption_options_resume_exactly_and_change_the_training(train_sd, tagged_dir, tmp_path, capsys):
    flags = ["--caption_extension", ".caption", "--shuffle_caption", "--keep_tokens", "1",
             "--caption_dropout_rate", "0.3"]
    full = check_resume_exact(train_sd, tagged_dir, tmp_path, flags)
    out = capsys.readouterr().out
    assert "4 distinct prompt(s)" in out and "shuffled captions are encoded on the fly" in out  # 3 captions + ""
    plain = tmp_path / "plain"
    assert train_sd.main(base_args("tiny-sd1", tagged_dir, plain, steps=4) + flags[:2]) == 0
    assert largest_difference(full / "adapter.safetensors", plain / "adapter.safetensors") > 1e-6


def test_keep_tokens_without_shuffle_is_refused(train_sd, tagged_dir, tmp_path, capsys):
    assert train_sd.main(base_args("tiny-sd1", tagged_dir, tmp_path / "o") + ["--keep_tokens", "1"]) == 2
    assert "keep_tokens=1 without shuffle_caption does nothing; add --shuffle_caption" in capsys.readouterr().err
