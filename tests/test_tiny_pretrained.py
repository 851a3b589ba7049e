""""tiny" is the pretrained pipeline of samples/tiny-sd; "tiny-sd1" stays the random test model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_vision.models import detect_sd_family, load_sd_pipeline
from lora_vision.models import sd as sd_module

REPO = Path(__file__).resolve().parents[1]


def test_tiny_is_the_pretrained_sd1_pipeline():
    pipe = load_sd_pipeline("tiny")
    assert detect_sd_family(pipe) == "sd1"
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size * pipe.vae_scale_factor == 64
    assert pipe.unet.dtype == torch.float32  # stored in fp16, run in float32
    assert load_sd_pipeline(None).unet.config == pipe.unet.config
    size = sum(p.stat().st_size for p in (REPO / "samples" / "tiny-sd").rglob("*") if p.is_file())
    assert size < 8 * 2**20
    # The random test model is untouched.
    assert load_sd_pipeline("tiny-sd1").unet.config.sample_size == 8


def test_tiny_pipeline_knows_the_caption_words():
    from lora_vision.data.shapes import VOCABULARY

    tok = load_sd_pipeline("tiny").tokenizer
    for word in VOCABULARY:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word


def test_missing_pretrained_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sd_module, "TINY_PRETRAINED", tmp_path / "tiny-sd")
    with pytest.raises(FileNotFoundError, match="samples/tiny-sd.*tiny-sd1"):
        load_sd_pipeline("tiny")
