"""Bad input to scripts/train_sd.py and the image reader: each gets a clear message."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from test_train_sd import _load_script  # noqa: E402  (tests/recipes is on sys.path under pytest)
from PIL import Image

from lora_vision.data.dreambooth import make_buckets, nearest_bucket, scan_folder
from lora_vision.data.images import ImageFolderError, load_image
from lora_vision.data.synthetic import write_blank_png

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "samples" / "instance" / "toy_00.jpg"


@pytest.fixture(scope="module")
def train_sd():
    return _load_script()


def _args(instance: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", "tiny-sd1", "--instance_data_dir", str(instance), "--instance_prompt",
            "a photo of sks toy", "--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "1",
            "--report_to", "none", "--strength_sweep=", *extra]


def _run(train_sd, capsys, argv: list[str]) -> tuple[int, str]:
    code = train_sd.main(argv)
    return code, capsys.readouterr().err


def test_missing_and_empty_instance_folder(train_sd, capsys, tmp_path):
    code, err = _run(train_sd, capsys, _args(tmp_path / "nope", tmp_path / "o"))
    assert code == 1 and "does not exist" in err and "nope" in err
    (tmp_path / "empty").mkdir()
    code, err = _run(train_sd, capsys, _args(tmp_path / "empty", tmp_path / "o"))
    assert code == 1 and "has no images" in err and "empty" in err


def test_config_problems_reported_together(train_sd, capsys, tmp_path):
    code, err = _run(train_sd, capsys, _args(SAMPLE.parent, tmp_path / "o", "--class_data_dir", str(tmp_path),
                                             "--train_batch_sise", "2", "--rank", "0"))
    assert code == 2
    assert "without class_prompt" in err and "did you mean --train_batch_size" in err and "rank=0" in err
    code, err = _run(train_sd, capsys, _args(SAMPLE.parent, tmp_path / "o", "--with_prior_preservation"))
    assert code == 2 and "needs class_data_dir" in err and "needs class_prompt" in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rat: 0.1\nrank: 4\n")
    code, err = _run(train_sd, capsys, _args(SAMPLE.parent, tmp_path / "o", "--config", str(cfg)))
    assert code == 2 and "unknown key 'learning_rat' (did you mean 'learning_rate'?)" in err


def test_corrupt_files_are_named_and_skipped(tmp_path):
    shutil.copy(SAMPLE, tmp_path / "good.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="broken.png"):
        images = scan_folder(tmp_path, "p", 64)
    assert [p.name for p in images.paths] == ["good.jpg"]
    (tmp_path / "good.jpg").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageFolderError, match="none of the 1 image file"):
            scan_folder(tmp_path, "p", 64)


def test_decompression_bomb_is_named_and_skipped(tmp_path):
    shutil.copy(SAMPLE, tmp_path / "good.jpg")
    write_blank_png(tmp_path / "bomb.png", 20000, 20000)  # 400 million pixels in about 50 KB
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = scan_folder(tmp_path, "p", 64)
    assert [p.name for p in images.paths] == ["good.jpg"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1  # every skipped file listed once, in one warning
    assert "skipping 2 of 3 image file(s) in the instance folder" in messages[0]
    assert "bomb.png (too large to decode safely, a possible decompression bomb" in messages[0]
    assert "broken.jpg (not a readable image" in messages[0]


def test_caption_that_is_not_utf8_is_named(train_sd, capsys, tmp_path):
    shutil.copy(SAMPLE, tmp_path / "toy.jpg")
    (tmp_path / "toy.txt").write_bytes("a photo of sks toy on a caf\u00e9 table".encode("latin-1"))
    with pytest.raises(ValueError, match=r"caption file .*toy.txt is not UTF-8 text: byte 0xe9 .*save it as UTF-8"):
        scan_folder(tmp_path, "p", 64)
    code, err = _run(train_sd, capsys, _args(tmp_path, tmp_path / "o"))
    assert code == 1 and "toy.txt is not UTF-8" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "toy.txt").write_bytes("a photo of sks toy".encode("utf-16"))
    with pytest.raises(ValueError, match=r"toy.txt is not UTF-8 text \(it looks like UTF-16\)"):
        scan_folder(tmp_path, "p", 64)
    (tmp_path / "toy.txt").write_bytes("\ufeffa photo of sks toy, caf\u00e9".encode("utf-8"))  # a BOM is dropped
    assert scan_folder(tmp_path, "p", 64).captions == ("a photo of sks toy, caf\u00e9",)


def test_small_images_upscaled_with_warning_or_rejected(tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "tiny.png")
    with pytest.warns(UserWarning, match=r"tiny.png is 40x30, smaller than the training resolution 64"):
        scan_folder(tmp_path, "p", 64)
    with pytest.raises(ImageFolderError, match=r"tiny.png is 40x30.*--small_images upscale"):
        scan_folder(tmp_path, "p", 64, small_images="error")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "I"])
def test_image_modes_become_rgb(tmp_path, mode):
    rgb = Image.new("RGB", (20, 10), (200, 40, 10))
    image = rgb.convert("L").convert(mode) if mode in ("I;16", "I") else rgb.convert(mode)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
        assert image.mode.startswith("I;16")
    path = tmp_path / ("x.tif" if mode.startswith("I") or mode == "CMYK" else "x.png")
    image.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (20, 10)
    if mode in ("RGBA", "CMYK"):
        assert abs(int(out.getpixel((5, 5))[0]) - 200) <= 3
    if mode in ("L", "LA", "I;16", "I"):
        gray = rgb.convert("L").getpixel((5, 5))
        assert abs(int(out.getpixel((5, 5))[0]) - gray) <= 1


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "blue")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def test_buckets_cover_aspect_ratios():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and all(w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert all(w * h <= 512 * 512 for w, h in buckets)
    assert nearest_bucket((1600, 900), buckets)[0] > nearest_bucket((1600, 900), buckets)[1]
    assert nearest_bucket((900, 1600), buckets)[0] < nearest_bucket((900, 1600), buckets)[1]


def test_resume_with_other_settings_is_refused(train_sd, capsys, tmp_path):
    out = tmp_path / "o"
    assert train_sd.main(_args(SAMPLE.parent, out, "--checkpointing_steps", "1")) == 0
    code, err = _run(train_sd, capsys, _args(SAMPLE.parent, out, "--rank", "8", "--max_train_steps", "3",
                                             "--resume_from_checkpoint", "latest"))
    assert code == 1 and "different configuration" in err and "rank: checkpoint has 4, this run has 8" in err
    code, err = _run(train_sd, capsys, _args(SAMPLE.parent, out, "--resume_from_checkpoint", "checkpoint-77"))
    assert code == 1 and "not a checkpoint folder" in err


def test_nan_loss_stops_naming_the_step_and_keeps_last_checkpoint(train_sd, capsys, tmp_path):
    out = tmp_path / "o"
    code, err = _run(train_sd, capsys, _args(SAMPLE.parent, out, "--learning_rate", "1e30", "--max_grad_norm", "0",
                                             "--max_train_steps", "6", "--checkpointing_steps", "1",
                                             "--logging_steps", "1"))
    assert code == 1 and "the loss became" in err and "at step" in err
    assert not (out / "adapter.safetensors").exists()
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert kept and "last good checkpoint" in err and kept[-1] in err


def test_8bit_adam_without_bitsandbytes_says_what_to_install(train_sd, capsys, tmp_path):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("bitsandbytes is installed")
    code, err = _run(train_sd, capsys, _args(SAMPLE.parent, tmp_path / "o", "--use_8bit_adam"))
    assert code == 1 and "pip install bitsandbytes" in err
