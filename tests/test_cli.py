"""The `lora-vision` command line against hostile files and failing disks: one clear line, exit code 1, nothing
half-written, nothing of the user's replaced."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lora_vision.cli import main

sys.path.insert(0, str(Path(__file__).parent / "formats"))
from conftest import make_sd_adapter  # noqa: E402


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adapters") / "a.safetensors"
    make_sd_adapter("sd1", unet_targets="unet-cross-attn").save(path)
    return path


def test_inspect_escapes_control_characters_from_the_file(tmp_path, capsys):
    adapter = make_sd_adapter("sd1", unet_targets="unet-cross-attn")
    adapter.metadata["evil\x1b[31m"] = "x\x1b[2J\x1b]0;pwned\x07\nformat:     forged\u202e"
    adapter.metadata["modelspec.trigger_phrase"] = "sks\r\x1b[1A toy"
    path = tmp_path / "evil.safetensors"
    adapter.save(path)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out and "\u202e" not in out
    assert [ln for ln in out.splitlines() if ln.startswith("format:")] == ["format:     lora_vision"]
    assert "evil\\x1b[31m = x\\x1b[2J\\x1b]0;pwned\\x07\\nformat:     forged\\u202e" in out
    assert "trigger:    sks\\r\\x1b[1A toy" in out


def test_merge_into_replaces_only_an_earlier_pipeline_output_with_normal_permissions(sd1_file, tmp_path, capsys):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        out = tmp_path / "merged"
        assert main(["merge", str(sd1_file), "--into", "tiny-sd1", "-o", str(out), "--single-file"]) == 0
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
        assert stat.S_IMODE((out / "merged.safetensors").stat().st_mode) == 0o644
        assert stat.S_IMODE((out / "model_index.json").stat().st_mode) == 0o644
        capsys.readouterr()

        assert main(["merge", str(sd1_file), "--into", "tiny-sd1", "-o", str(out)]) == 1
        err = capsys.readouterr().err
        assert "already exists" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1

        docs = tmp_path / "documents"
        docs.mkdir()
        (docs / "thesis.txt").write_text("years of work")
        assert main(["merge", str(sd1_file), "--into", "tiny-sd1", "-o", str(docs), "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert "not a diffusers pipeline folder" in err and "Traceback" not in err
        assert (docs / "thesis.txt").read_text() == "years of work"

        assert main(["merge", str(sd1_file), "--into", "tiny-sd1", "-o", str(out), "--overwrite"]) == 0
        assert (out / "model_index.json").is_file() and not (out / "merged.safetensors").exists()
        assert stat.S_IMODE(out.stat().st_mode) == 0o755
    finally:
        os.umask(umask)


@pytest.mark.parametrize("to, out_name", [("peft", "out_peft"), ("kohya", "out.safetensors")])
def test_convert_on_a_full_disk_is_one_line_and_leaves_nothing(sd1_file, to, out_name, tmp_path, capsys,
                                                               monkeypatch):
    import errno

    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out_dir = tmp_path / "converted"
    out_dir.mkdir()
    assert main(["convert", str(sd1_file), "--to", to, "-o", str(out_dir / out_name)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"lora-vision convert: error: no space left on the device") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert list(out_dir.iterdir()) == []  # no empty folder, no temporary file


def test_fuse_writes_the_same_pipeline_as_merge_into_which_points_to_it(sd1_file, tmp_path, capsys):
    from safetensors.torch import load_file

    fused, merged = tmp_path / "fused", tmp_path / "merged"
    assert main(["fuse", str(sd1_file), "--base", "tiny-sd1", "--weights", "0.7", "-o", str(fused),
                 "--single-file"]) == 0
    out = capsys.readouterr().out
    assert "lora-vision fuse" not in out and str(fused) in out
    assert main(["merge", str(sd1_file), "--into", "tiny-sd1", "--weights", "0.7", "-o", str(merged),
                 "--single-file"]) == 0
    note = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("note:")]
    assert len(note) == 1 and "lora-vision fuse" in note[0] and "--base" in note[0]

    files = sorted(p.relative_to(fused) for p in fused.rglob("*.safetensors"))
    assert Path("unet/diffusion_pytorch_model.safetensors") in files and Path("fused.safetensors") in files
    assert sorted(p.relative_to(merged) for p in merged.rglob("*.safetensors")) == [
        Path("merged.safetensors") if f == Path("fused.safetensors") else f for f in files]
    for f in files:
        a = load_file(fused / f)
        b = load_file(merged / (Path("merged.safetensors") if f == Path("fused.safetensors") else f))
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), f
    base = load_file(fused / "unet/diffusion_pytorch_model.safetensors")
    from lora_vision.models import build_tiny_sd

    plain = build_tiny_sd("sd1").unet.state_dict()
    assert any(not base[k].equal(plain[k]) for k in base if "attn2.to_q.weight" in k)  # the adapter is in there


def test_fuse_with_a_wrong_number_of_weights_is_one_line(sd1_file, tmp_path, capsys):
    out = tmp_path / "fused"
    assert main(["fuse", str(sd1_file), "--base", "tiny-sd1", "--weights", "0.5", "1", "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--weights has 2 values for 1 adapters" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
