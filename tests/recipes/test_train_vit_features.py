"""Training features of scripts/train_vit.py: EMA, the optimizers, the validation loss (and their exact resume)."""

from __future__ import annotations

import builtins
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lora_vision.io import read_safetensors
from lora_vision.lora.config import ConfigError
from lora_vision.training.config import load_config
from lora_vision.training.vit.config import ViTTrainConfig
from test_train_vit import BASE, _run, data, eval_vit, train_vit  # noqa: F401  (data is a fixture)


def _trained_names(cfg: ViTTrainConfig, classes: list[str]) -> list[str]:
    """The trained parameters in the order the EMA keeps them (ema.<index>)."""
    loaded, _, _ = train_vit.build_model(cfg, "lora", classes)
    return [n for n, p in loaded.model.named_parameters() if p.requires_grad]


def _adapter_key(name: str) -> str:
    """The adapter-file key of trained parameter `name` (LoRA factors as <module>.lora_A.weight, the head whole)."""
    return "model." + re.sub(r"\.(lora_[AB])\.default$", r".\1.weight", name) if ".lora_" in name \
        else f"full.model.{name}"


def test_ema_follows_the_recurrence_and_is_what_evaluation_uses(data: Path, tmp_path: Path, capsys) -> None:
    m = _run(tmp_path, data, "--model_name_or_path", "tiny-hf", "--max_train_steps", "4", "--use_ema",
             "--ema_decay", "0.5", "--checkpointing_steps", "1", "--checkpoints_total_limit", "10")
    assert "(EMA weights)" in capsys.readouterr().out
    names = _trained_names(ViTTrainConfig(model_name_or_path="tiny-hf"), sorted(p.name for p in data.iterdir()))
    ema = {k: read_safetensors(tmp_path / f"checkpoint-{k}" / "ema.safetensors")[0] for k in (1, 2, 3)}
    weights = {k: read_safetensors(tmp_path / f"checkpoint-{k}" / "trainable.safetensors")[0] for k in (1, 2, 3)}
    for k in (2, 3):  # after each optimizer step: ema = 0.5 ema + 0.5 weights
        for i, n in enumerate(names):
            torch.testing.assert_close(ema[k][f"ema.{i}"], 0.5 * ema[k - 1][f"ema.{i}"] + 0.5 * weights[k][n],
                                       rtol=0, atol=1e-6)
    final, _ = read_safetensors(tmp_path / "adapter.safetensors")
    final_ema, _ = read_safetensors(tmp_path / "adapter_ema.safetensors")
    for i, n in enumerate(names):
        torch.testing.assert_close(final_ema[_adapter_key(n)], 0.5 * ema[3][f"ema.{i}"] + 0.5 * final[_adapter_key(n)],
                                   rtol=0, atol=1e-6)
    assert (tmp_path / "peft_ema" / "adapter_config.json").is_file() and m["ema_artifact"] == "adapter_ema.safetensors"
    # The epoch's evaluation (top-1 and validation loss) is the EMA adapter's, not the plain one's.
    scores = {}
    for name in ("adapter_ema", "adapter"):
        assert eval_vit.main(["--adapter", str(tmp_path / f"{name}.safetensors"), "--train_dir", str(data),
                              "--dataloader_num_workers", "0", "--output_json", str(tmp_path / "e.json")]) == 0
        scores[name] = json.loads((tmp_path / "e.json").read_text())
    assert scores["adapter_ema"]["top1"] == pytest.approx(m["top1"])
    assert scores["adapter_ema"]["loss"] == pytest.approx(m["val_loss"], abs=1e-4)
    assert abs(scores["adapter"]["loss"] - m["val_loss"]) > 1e-3


@pytest.mark.parametrize("features", [
    ["--optimizer", "prodigy"],
    ["--optimizer", "schedulefree", "--use_ema", "--ema_decay", "0.7"],
    ["--optimizer", "adafactor", "--pure_bf16", "true", "--use_ema", "--ema_decay", "0.5", "--ema_cpu"],
], ids=["prodigy", "schedulefree-ema", "adafactor-pure_bf16-ema_cpu"])
def test_each_optimizer_trains_and_resumes_exactly(features: list[str], data: Path, tmp_path: Path) -> None:
    common = ["--model_name_or_path", BASE, "--max_train_steps", "8", "--checkpointing_steps", "2",
              "--checkpoints_total_limit", "10", "--save_peft", "false", "--lr_scheduler_type", "constant", *features]
    full = _run(tmp_path / "a", data, *common)
    assert full["history"][-1]["val_loss"] < full["history"][0]["val_loss"]  # it learns
    (tmp_path / "b").mkdir()  # resume in the middle of the second epoch
    shutil.copytree(tmp_path / "a" / "checkpoint-6", tmp_path / "b" / "checkpoint-6")
    resumed = _run(tmp_path / "b", data, *common, "--resume_from_checkpoint", "latest")
    names = ["adapter.safetensors"] + (["adapter_ema.safetensors"] if "--use_ema" in features else [])
    for name in names:
        a, _ = read_safetensors(tmp_path / "a" / name)
        b, _ = read_safetensors(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed["history"] == full["history"]  # the validation losses and top-1 of every epoch included
    assert resumed["val_loss"] == full["val_loss"]


def test_resume_without_the_ema_of_an_ema_run_is_refused(data: Path, tmp_path: Path) -> None:
    common = ["--model_name_or_path", "tiny-hf", "--max_train_steps", "4", "--checkpointing_steps", "2",
              "--save_peft", "false"]
    _run(tmp_path, data, *common)
    with pytest.raises(ValueError, match="has no ema.safetensors, which --use_ema needs"):
        _run(tmp_path, data, *common, "--use_ema", "--resume_from_checkpoint", "latest")


def test_missing_optimizer_package_is_named(data: Path, tmp_path: Path, monkeypatch) -> None:
    real_import = builtins.__import__

    def no_schedulefree(name, *args, **kwargs):
        if name == "schedulefree":
            raise ImportError("No module named 'schedulefree'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "schedulefree", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_schedulefree)
    with pytest.raises(ImportError, match=r"--optimizer schedulefree needs the package schedulefree.*"
                                          r"lora_vision\[schedulefree\]"):
        _run(tmp_path, data, "--model_name_or_path", "tiny-hf", "--max_train_steps", "2", "--optimizer",
             "schedulefree")
    assert not list(tmp_path.glob("checkpoint-*")) and not (tmp_path / "adapter.safetensors").exists()


def test_feature_flags_are_shared_and_checked() -> None:
    cfg = load_config(ViTTrainConfig, ["--optimizer", "adafactor", "--use_ema", "--ema_decay", "0.9", "--ema_cpu"])
    assert (cfg.optimizer, cfg.use_ema, cfg.ema_decay, cfg.ema_cpu) == ("adafactor", True, 0.9, True)
    assert load_config(ViTTrainConfig, ["--optimizer", "prodigy"]).lr() == 1.0  # Prodigy's own scale
    with pytest.raises(ConfigError) as err:
        load_config(ViTTrainConfig, ["--optimizer", "prodigi", "--ema_decay", "1.5", "--use_ema", "--init", "pissa"])
    text = str(err.value)
    assert "did you mean 'prodigy'" in text and "ema_decay=1.5" in text and "use_ema with init=pissa" in text


def test_prodigy_with_loraplus_is_refused_before_anything_loads() -> None:
    """Prodigy estimates one step size: the package stops at its first step when groups' rates differ."""
    with pytest.raises(ConfigError, match="optimizer='prodigy' with LoRA\\+"):
        load_config(ViTTrainConfig, ["--optimizer", "prodigy", "--loraplus_lr_ratio", "16"])
    load_config(ViTTrainConfig, ["--optimizer", "prodigy", "--loraplus_lr_ratio", "1"])  # one rate: fine
