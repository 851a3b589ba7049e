"""Training features of both recipes: EMA, optimizers, LoRA+ and per-block learning rates (and their exact resume)."""

from __future__ import annotations

import builtins
import sys
from pathlib import Path

import pytest
import torch

from lora_vision.adapter import Adapter
from lora_vision.io import read_safetensors
from lora_vision.lora import LoRAConfig, inject_lora
from lora_vision.models import build_tiny_sd
from lora_vision.training.ema import EMA
from lora_vision.training.optim import build_optimizer, eval_mode, loraplus_param_groups
from lora_vision.training.sd.config import SDTrainConfig
from lora_vision.training.sd.lora import param_groups

from test_train_sd import base_args, instance_dir, train_sd  # noqa: E402,F401  (fixtures; tests/recipes is on sys.path)


def test_ema_follows_the_recurrence():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    ema = EMA(params, decay=0.9)
    expected = [p.detach().clone() for p in params]
    for _ in range(4):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ema.update()
        expected = [0.9 * e + 0.1 * p.detach() for e, p in zip(expected, params)]
    for s, e, p in zip(ema.shadow, expected, params):
        torch.testing.assert_close(s, e, rtol=0, atol=1e-6)
        assert (s - p).abs().max() > 1e-3  # the average lags behind the weights
    trained = [p.detach().clone() for p in params]
    with ema.swapped_in():
        assert all(torch.equal(p, e) for p, e in zip(params, ema.shadow))
    assert all(torch.equal(p, t) for p, t in zip(params, trained))  # put back bit for bit
    restored = EMA(params, decay=0.9)
    restored.load_state_tensors(ema.state_tensors())
    assert all(torch.equal(a, b) for a, b in zip(restored.shadow, ema.shadow))


def _unet_models():
    unet = build_tiny_sd("sd1").unet
    torch.manual_seed(0)
    inject_lora(unet, LoRAConfig(rank=2, targets=("to_q", "to_v")))
    return {"unet": unet}


def _cfg(**kw) -> SDTrainConfig:
    return SDTrainConfig(pretrained_model_name_or_path="tiny-sd1", instance_data_dir="x", instance_prompt="sks", **kw)


def test_loraplus_gives_b_the_ratio_learning_rate():
    models = _unet_models()
    groups = param_groups(_cfg(learning_rate=1e-3, loraplus_lr_ratio=16), models, 1)
    assert [g["name"] for g in groups] == ["unet.lora_A", "unet.lora_B"]
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    names = {id(p): n for n, p in models["unet"].named_parameters()}
    assert all(".lora_B." in names[id(p)] for p in groups[1]["params"])
    assert all(".lora_A." in names[id(p)] for p in groups[0]["params"])
    # One AdamW step moves every weight by about its group's lr (the first Adam step is lr x sign(grad)).
    opt = build_optimizer(groups, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-12)
    before = {id(p): p.detach().clone() for g in groups for p in g["params"]}
    for g in groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    opt.step()
    moved = [max((p.detach() - before[id(p)]).abs().max().item() for p in g["params"]) for g in groups]
    assert moved == pytest.approx([1e-3, 16e-3], rel=1e-4)
    # The shared helper takes a module as well (the ViT recipe uses it so).
    from_module = loraplus_param_groups(models["unet"], 1e-3, 4.0, weight_decay=0.0)
    assert [len(g["params"]) for g in from_module] == [len(g["params"]) for g in groups]
    assert from_module[1]["lr"] == 4e-3 and from_module[0]["weight_decay"] == 0.0


def test_learning_rates_per_unet_block_and_component():
    models = _unet_models()
    cfg = _cfg(learning_rate=1e-4, lr_per_component={"unet.up": 3e-4, "unet.down": 2e-4})
    lrs = {g["name"]: g["lr"] for g in param_groups(cfg, models, 1)}
    assert lrs == {"unet.down": 2e-4, "unet.mid": 1e-4, "unet.up": 3e-4}
    names = {id(p): n for n, p in models["unet"].named_parameters()}
    for g in param_groups(cfg, models, 1):
        prefix = {"unet.down": "down_blocks", "unet.mid": "mid_block", "unet.up": "up_blocks"}[g["name"]]
        assert all(names[id(p)].startswith(prefix) for p in g["params"])


def test_lr_per_component_flag_syntax_and_bad_keys(train_sd, tmp_path, capsys):
    from lora_vision.training.config import load_config

    cfg = load_config(SDTrainConfig, ["--lr_per_component", "unet=1e-4,text_encoder=5e-5", "--instance_data_dir",
                                      "x"])
    assert cfg.lr_per_component == {"unet": 1e-4, "text_encoder": 5e-5}
    assert train_sd.main(["--lr_per_component", "unet.upp=1e-4", "--optimizer", "prodigi",
                          "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'unet.up'" in err and "did you mean 'prodigy'" in err


def test_prodigy_with_unequal_learning_rates_is_refused(train_sd, tmp_path, capsys):
    """Prodigy estimates one step size for all groups; prodigyopt raises at its first step when their rates
    differ, so the config says so before anything loads, naming each option that makes them differ."""
    assert train_sd.main(["--optimizer", "prodigy", "--learning_rate", "1.0", "--loraplus_lr_ratio", "16",
                          "--lr_per_component", "unet.up=0.5", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "optimizer='prodigy' with loraplus_lr_ratio, lr_per_component:" in err
    from lora_vision.training.config import load_config

    load_config(SDTrainConfig, ["--optimizer", "prodigy", "--learning_rate", "1.0", "--lr_per_component",
                                "unet.up=1.0", "--instance_data_dir", "x"])  # the same rate everywhere: fine


@pytest.mark.parametrize("name", ["prodigy", "schedulefree", "adafactor"])
def test_each_optimizer_trains(name):
    models = _unet_models()
    groups = param_groups(_cfg(learning_rate=1.0 if name == "prodigy" else 1e-2), models, 1)
    params = [p for g in groups for p in g["params"]]
    opt = build_optimizer(groups, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, name=name)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    with eval_mode(opt):
        moved = max(p.abs().max().item() for n, p in models["unet"].named_parameters() if "lora_B" in n)
    assert moved > 0


def test_missing_optimizer_package_is_named(monkeypatch):
    real_import = builtins.__import__

    def no_prodigy(name, *args, **kwargs):
        if name == "prodigyopt":
            raise ImportError("No module named 'prodigyopt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "prodigyopt", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_prodigy)
    with pytest.raises(ImportError, match=r"--optimizer prodigy needs the package prodigyopt.*lora_vision\[prodigy\]"):
        build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0}], betas=(0.9, 0.999),
                        weight_decay=0.0, eps=1e-8, name="prodigy")


@pytest.mark.parametrize("features", [
    ["--use_ema", "--ema_decay", "0.5", "--loraplus_lr_ratio", "4", "--lr_per_component", "unet.up=3e-3",
     "--optimizer", "schedulefree"],
    ["--optimizer", "prodigy", "--learning_rate", "1.0", "--use_ema", "--ema_cpu"],
    ["--optimizer", "adafactor"],
    ["--loss_type", "huber", "--huber_schedule", "snr", "--multires_noise_iterations", "4",
     "--debiased_estimation_loss", "--snr_gamma", "5", "--noise_offset", "0.05"],
], ids=["ema-loraplus-blocks-schedulefree", "prodigy-ema_cpu", "adafactor", "huber-multires-debiased"])
def test_resume_stays_exact_with_each_feature(train_sd, instance_dir, tmp_path, features):
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert train_sd.main(base_args("tiny-sd1", instance_dir, full, steps=4) + features) == 0
    assert train_sd.main(base_args("tiny-sd1", instance_dir, parts, steps=2) + features) == 0
    assert train_sd.main(base_args("tiny-sd1", instance_dir, parts, steps=4) + features
                         + ["--resume_from_checkpoint", "latest"]) == 0
    names = ["adapter.safetensors"] + (["adapter_ema.safetensors"] if "--use_ema" in features else [])
    for name in names:
        a, b = Adapter.load(full / name), Adapter.load(parts / name)
        worst = max((a.tensors[k] - b.tensors[k]).abs().max().item() for k in a.tensors)
        assert worst <= 1e-6, (name, worst)
    assert (full / "logs" / "loss.csv").read_text() == (parts / "logs" / "loss.csv").read_text()
    if "--use_ema" in features:
        plain, ema = Adapter.load(full / "adapter.safetensors"), Adapter.load(full / "adapter_ema.safetensors")
        assert max((plain.tensors[k] - ema.tensors[k]).abs().max().item() for k in plain.tensors) > 1e-6
        assert (full / "checkpoint-4" / "ema.safetensors").is_file()
        if (full / "adapter_kohya.safetensors").is_file():
            tensors, _ = read_safetensors(full / "adapter_ema_kohya.safetensors")
            assert any(k.startswith("lora_unet_") for k in tensors)


def test_resume_without_the_ema_of_the_checkpoint_is_refused(train_sd, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert train_sd.main(base_args("tiny-sd1", instance_dir, out, steps=2)) == 0
    resume = ["--use_ema", "--resume_from_checkpoint", "latest"]
    assert train_sd.main(base_args("tiny-sd1", instance_dir, out, steps=3) + resume) == 1
    assert "use_ema: checkpoint has False, this run has True" in capsys.readouterr().err


def _val_rows(out: Path) -> list[list[str]]:
    lines = (out / "logs" / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,lr,val_loss"
    return [line.split(",") for line in lines[1:]]


def test_validation_loss_on_held_out_images_is_logged_and_resumes_exactly(train_sd, instance_dir, tmp_path, capsys):
    args = ["--validation_split", "0.34", "--validation_steps", "2"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert train_sd.main(base_args("tiny-sd1", instance_dir, full, steps=5) + args) == 0
    assert "2 instance images" in capsys.readouterr().out  # one of the three is held out
    rows = _val_rows(full)
    measured = {int(r[0]): float(r[3]) for r in rows if r[3]}
    assert sorted(measured) == [2, 4, 5]  # every validation_steps, and at the end
    assert len(set(measured.values())) == 3  # it follows the weights
    assert train_sd.main(base_args("tiny-sd1", instance_dir, parts, steps=2) + args) == 0
    assert train_sd.main(base_args("tiny-sd1", instance_dir, parts, steps=5) + args
                         + ["--resume_from_checkpoint", "latest"]) == 0
    assert (full / "logs" / "loss.csv").read_text() == (parts / "logs" / "loss.csv").read_text()


def test_validation_loss_uses_fixed_timesteps_and_noise():
    from lora_vision.training.sd.caching import BucketCache, TextTable
    from lora_vision.training.sd.losses import alphas_cumprod
    from lora_vision.training.sd.step import StepSettings
    from lora_vision.training.sd.validation_loss import ValidationLoss

    pipe = build_tiny_sd("sd1")
    torch.manual_seed(0)
    inject_lora(pipe.unet, LoRAConfig(rank=2, targets=("to_q", "to_v"), dropout=0.5))
    g = torch.Generator().manual_seed(1)
    cache = BucketCache((64, 64), torch.randn(3, 4, 8, 8, generator=g), torch.ones(3, 4, 8, 8),
                        torch.tensor([0, 1, 0]), torch.zeros(3, 6))
    table = TextTable(["a", "b"], [torch.zeros(2, 77, dtype=torch.long)], torch.randn(2, 77, 32, generator=g))
    settings = StepSettings("epsilon", 1000, 5.0, 0.1, 1.0, 1.0, False)
    pipe.unet.train()
    val = ValidationLoss(pipe.unet, {(64, 64): cache}, table, [], alphas_cumprod(pipe.scheduler, "cpu"), settings,
                         torch.float32, batch_size=4, seed=3)
    assert val.count == 3 * 5  # every image at every fixed timestep
    first = val()
    assert torch.equal(first, val()) and pipe.unet.training  # same weights, same number; train mode put back
    with torch.no_grad():
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    assert not torch.equal(first, val())


def test_validation_split_that_leaves_nothing_to_train_is_refused(train_sd, instance_dir, tmp_path, capsys):
    assert train_sd.main(base_args("tiny-sd1", instance_dir, tmp_path / "o") + ["--validation_split", "0.9"]) == 1
    err = capsys.readouterr().err
    assert "validation_split=0.9 holds out 3 of the 3 instance image(s)" in err and "Traceback" not in err
