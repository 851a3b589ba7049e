"""scripts/train_sd.py flags, configs and start-up failures: checked before any model loads, one clear line each."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from test_train_sd import _load_script  # noqa: E402  (tests/recipes is on sys.path under pytest)
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples" / "instance"


@pytest.fixture(scope="module")
def train_sd():
    return _load_script()


def _args(model: str, out: Path, *extra: str, instance: Path = SAMPLES) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", str(instance), "--instance_prompt",
            "a photo of sks toy", "--output_dir", str(out), "--max_train_steps", "1", "--train_batch_size", "1",
            "--report_to", "none", "--strength_sweep=", *extra]


def _run(train_sd, capsys, argv: list[str]) -> tuple[int, str]:
    code = train_sd.main(argv)
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def test_bad_flags_are_reported_together_before_loading(train_sd, capsys, tmp_path):
    out = tmp_path / "o"
    # A model path that does not exist: had anything been loaded first, that would be the error instead.
    code, err = _run(train_sd, capsys, _args(str(tmp_path / "no-model"), out, "--lr_scheduler", "cosin",
                                             "--bucket_step", "7", "--unet_targets", "nonexistent", "--seed", "-5",
                                             "--lr_warmup_steps", "-3", "--rank_pattern", "notjson"))
    assert code == 2 and not out.exists()
    assert "lr_scheduler='cosin'" in err and "did you mean 'cosine'" in err
    assert "bucket_step=7: expected a multiple of 8" in err
    assert "unet_targets: 'nonexistent' names no Linear/Conv2d layer" in err
    assert "seed=-5" in err and "lr_warmup_steps=-3" in err
    assert "rank_pattern='notjson': not valid JSON" in err and "expected a JSON object" in err
    assert "Traceback" not in err and "no-model" not in err


def test_unknown_preset_and_preset_for_another_model(train_sd, capsys, tmp_path):
    code, err = _run(train_sd, capsys, _args("tiny-sd1", tmp_path / "o", "--unet_targets", "unet-atn"))
    assert code == 2 and "'unet-atn' is not a known preset (did you mean 'unet-attn'?)" in err
    code, err = _run(train_sd, capsys, _args("tiny-sd1", tmp_path / "o", "--unet_targets", "clip-attn"))
    assert code == 2 and "'clip-attn' is a preset for a CLIPTextModel" in err
    code, err = _run(train_sd, capsys, _args("tiny-sd1", tmp_path / "o", "--train_text_encoder",
                                             "--text_encoder_targets", "clip-atn"))
    assert code == 2 and "text_encoder_targets: 'clip-atn'" in err and "did you mean 'clip-attn'" in err


def test_malformed_yaml_config_is_one_line(train_sd, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rank: 4\n  learning_rate: [\n")
    code, err = _run(train_sd, capsys, ["--config", str(bad), "--output_dir", str(tmp_path / "o")])
    assert code == 2 and "not valid YAML at line 2" in err and str(bad) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    bad.write_bytes(b"rank: \xff\xfe\n")
    code, err = _run(train_sd, capsys, ["--config", str(bad)])
    assert code == 2 and "could not be read as a UTF-8 text file" in err


def test_unwritable_output_dir_is_refused_before_loading(train_sd, capsys, tmp_path):
    (tmp_path / "a_file").write_text("x")
    code, err = _run(train_sd, capsys, _args(str(tmp_path / "no-model"), tmp_path / "a_file" / "out"))
    assert code == 2 and "--output_dir" in err and "is a file, not a folder" in err
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            code, err = _run(train_sd, capsys, _args("tiny-sd1", ro / "out"))
        finally:
            ro.chmod(0o755)
        assert code == 2 and "not writable" in err and not (ro / "out").exists()


def test_hub_id_without_network_says_not_found_locally(train_sd, capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network, instantly
    out = tmp_path / "o"
    code, err = _run(train_sd, capsys, _args("someone/not-downloaded-model", out))
    assert code == 1 and not out.exists() and "Traceback" not in err
    assert "'someone/not-downloaded-model' is not a local folder" in err and "hub could not be reached" in err
    assert "does not appear to have a file named" not in err


def test_corrupt_base_weights_are_named(train_sd, capsys, tmp_path):
    from lora_vision.models.tiny import build_tiny_sd

    model = tmp_path / "model"
    build_tiny_sd("sd1").save_pretrained(model)
    weights = next((model / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut off halfway
    out = tmp_path / "o"
    code, err = _run(train_sd, capsys, _args(str(model), out))
    assert code == 1 and not out.exists() and "Traceback" not in err
    assert f"the weights of '{model}' cannot be loaded" in err and "diffusion_pytorch_model.safetensors" in err
    assert "truncated" in err and "re-download" in err


def test_help_shows_the_defaults_of_the_no_model_run(train_sd, capsys):
    with pytest.raises(SystemExit) as stop:
        train_sd.parse(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    tiny_steps = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())["max_train_steps"]
    assert f"(default: 400; with no model (configs/tiny.yaml): {tiny_steps})" in text  # max_train_steps
    assert "(default: 4; with no model (configs/tiny.yaml): 8)" in text  # rank
    assert "(default: 'outputs/train_sd'; with no model (configs/tiny.yaml): 'outputs/tiny')" in text
    assert "the run is --config configs/tiny.yaml" in text


def test_kohya_flags_are_aliases_or_say_what_to_use(train_sd, capsys, tmp_path):
    cfg = train_sd.parse(_args("tiny-sd1", tmp_path / "o", "--network_dim", "16", "--network_alpha", "8"))
    assert cfg.rank == 16 and cfg.lora_alpha == 8.0
    yaml_cfg = tmp_path / "k.yaml"
    yaml_cfg.write_text("network_dim: 12\n")
    assert train_sd.parse(["--config", str(yaml_cfg)]).rank == 12
    code, err = _run(train_sd, capsys, _args("tiny-sd1", tmp_path / "o", "--num_train_epochs", "10",
                                             "--network_dim", "8", "--rank", "4"))
    assert code == 2
    assert "--num_train_epochs: this script counts optimizer steps, not epochs: use --max_train_steps" in err
    assert "network_dim and rank are the same setting" in err


def test_kohya_repeat_folders(train_sd, capsys, tmp_path):
    folder = tmp_path / "10_sks toy"
    folder.mkdir()
    shutil.copy(SAMPLES / "toy_00.jpg", folder)
    train_sd.parse(_args("tiny-sd1", tmp_path / "o", instance=folder))
    assert "'10_sks toy' is named in kohya's <repeats>_<name> style; the 10 repeats are not used" in \
        capsys.readouterr().out
    code, err = _run(train_sd, capsys, _args("tiny-sd1", tmp_path / "o", instance=tmp_path))
    assert code == 2 and "kohya-style <repeats>_<name> folders ('10_sks toy')" in err and str(folder) in err


def test_threads_for_the_tiny_model_on_cpu(train_sd, monkeypatch):
    cpu = torch.device("cpu")
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        assert "1 CPU thread" in train_sd.choose_threads(train_sd.parse([]), cpu)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        train_sd.choose_threads(train_sd.parse(["--num_threads", "3"]), cpu)
        assert torch.get_num_threads() == 3
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert "OMP_NUM_THREADS" in train_sd.choose_threads(train_sd.parse([]), cpu)
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        train_sd.choose_threads(train_sd.parse(["--pretrained_model_name_or_path", "some/model",
                                                "--instance_data_dir", str(SAMPLES), "--instance_prompt", "p"]), cpu)
        assert torch.get_num_threads() == 2  # a real model keeps torch's choice
    finally:
        torch.set_num_threads(before)


def test_a_run_in_process_leaves_torch_threads_as_it_found_them(train_sd, capsys, tmp_path, monkeypatch):
    # The tiny model trains on one thread; a caller of main() (a notebook, these tests) keeps its own setting.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        code, err = _run(train_sd, capsys, _args("tiny-sd1", tmp_path / "o"))
        assert code == 0, err
        assert "1 CPU thread" in err
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_one_bucket_and_long_captions_are_said_once(train_sd, capsys, tmp_path):
    folder = tmp_path / "instance"
    folder.mkdir()
    for name in ("toy_00", "toy_01"):
        shutil.copy(SAMPLES / f"{name}.jpg", folder)
    (folder / "toy_00.txt").write_text("a photo of sks toy, " + "very detailed red plastic, " * 20)
    code, err = _run(train_sd, capsys, _args("tiny-sd1", tmp_path / "o", "--bucketing", "--resolution", "64",
                                             instance=folder))
    assert code == 0
    assert len(re.findall("makes one bucket", err)) == 1 and "use a smaller --bucket_step" in err
    long = re.findall(r"caption\(s\) are longer than the text encoder's 77 tokens.*", err)
    assert len(long) == 1 and "toy_00.txt (" in long[0] and "toy_01" not in long[0]
