"""Training with --adapter_type loha / lokr / dora in both recipes: runs, writes files that load (native, and the
kohya / LyCORIS export A1111 and ComfyUI read), resumes exactly, and refuses what it cannot do before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_vision.adapter import Adapter
from lora_vision.formats import read_adapter
from test_train_sd import base_args  # noqa: E402  (tests/recipes is on sys.path under pytest)
from test_train_vit import _run, data, train_vit  # noqa: F401  (data is a fixture)

REPO = Path(__file__).resolve().parents[2]
LABEL = {"loha": "LoHa", "lokr": "LoKr", "dora": "LoRA+DoRA"}


@pytest.fixture(scope="module")
def train_sd():
    from test_train_sd import _load_script

    return _load_script()


@pytest.fixture()
def one_image(tmp_path: Path) -> Path:
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "x.jpg").write_bytes((REPO / "samples/instance/toy_00.jpg").read_bytes())
    return folder


@pytest.mark.parametrize("adapter_type,extra", [("loha", []), ("lokr", ["--lokr_factor", "4"]), ("dora", [])])
def test_sd_kind_trains_resumes_exactly_and_exports(train_sd, one_image, tmp_path, adapter_type, extra):
    common = ["--adapter_type", adapter_type, *extra, "--rank", "4", "--learning_rate", "1e-2"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert train_sd.main(base_args("tiny-sd1", one_image, full, steps=4) + common) == 0
    assert train_sd.main(base_args("tiny-sd1", one_image, parts, steps=2) + common + ["--checkpointing_steps", "2"]) == 0
    assert train_sd.main(base_args("tiny-sd1", one_image, parts, steps=4) + common
                         + ["--resume_from_checkpoint", "latest"]) == 0
    a, b = Adapter.load(full / "adapter.safetensors"), Adapter.load(parts / "adapter.safetensors")
    assert set(a.kinds()) == {LABEL[adapter_type]}
    assert a.tensors.keys() == b.tensors.keys()
    assert max((a.tensors[k] - b.tensors[k]).abs().max().item() for k in a.tensors) <= 1e-6
    kohya, report = read_adapter(full / "adapter_kohya.safetensors")
    assert report.kinds == a.kinds()
    for key, spec in a.layers("unet").items():  # fp16 export: every factor within fp16 rounding
        got = kohya.layers("unet")[key]
        assert got.kind == spec.kind and got.all_factors.keys() == spec.all_factors.keys()
        for n, t in spec.all_factors.items():
            torch.testing.assert_close(got.all_factors[n].float().reshape(t.shape), t, atol=1e-3, rtol=1e-3)
    assert (full / "logs/loss.csv").read_text() == (parts / "logs/loss.csv").read_text()


def test_sd_kind_flags_are_checked_before_loading(train_sd, one_image, tmp_path, capsys):
    code = train_sd.main(base_args("tiny-sd1", one_image, tmp_path, steps=1)
                         + ["--adapter_type", "boft", "--lokr_factor", "0"])
    assert code != 0
    err = capsys.readouterr().err
    assert "adapter_type='boft'" in err and "lokr_factor=0" in err


@pytest.mark.parametrize("adapter_type", ["loha", "lokr", "dora"])
def test_vit_kind_trains_and_writes_its_adapter(adapter_type, data, tmp_path):  # noqa: F811
    m = _run(tmp_path, data, "--model_name_or_path", "tiny-hf", "--max_train_steps", "3", "--adapter_type",
             adapter_type, "--save_peft", "false")
    assert m["steps"] == 3
    adapter = Adapter.load(tmp_path / "adapter.safetensors")
    assert set(adapter.kinds()) == {LABEL[adapter_type]}
    assert "full.model.classifier.weight" in adapter.tensors


@pytest.mark.parametrize("adapter_type", ["loha", "lokr"])
def test_vit_kind_on_timm_fused_qkv_trains_as_one_linear(adapter_type, data, tmp_path):  # noqa: F811
    m = _run(tmp_path, data, "--model_name_or_path", "tiny-timm", "--max_train_steps", "3", "--adapter_type",
             adapter_type, "--save_peft", "false")
    assert m["steps"] == 3
    adapter = Adapter.load(tmp_path / "adapter.safetensors")
    assert set(adapter.kinds()) == {LABEL[adapter_type]}
    layers = adapter.layers("model")
    qkv = [k for k in layers if k.endswith("attn.qkv")]  # one layer over the fused (3d, d) weight, no q/k/v parts
    assert qkv and not any(k.endswith(("qkv.q", "qkv.k", "qkv.v")) for k in layers)
    assert all(layers[k].delta().abs().max() > 0 for k in qkv)  # trained away from the zero start
    # outputs == W + delta and the loss going down: tests/lora/test_kinds_core.py::test_kind_on_timm_fused_qkv_*


def test_vit_kind_on_torchvision_attention_is_refused_naming_it(data, tmp_path):  # noqa: F811
    from lora_vision.lora.config import ConfigError

    with pytest.raises(ConfigError, match=r"adapter_type='lokr' on a torchvision ViT .*MultiheadAttention.*"
                                          r"in_proj_weight and out_proj.weight.*timm ViT"):
        train_vit.main(["--train_dir", str(data), "--output_dir", str(tmp_path), "--model_name_or_path",
                        "tiny-torchvision", "--adapter_type", "lokr", "--save_peft", "false"])
    assert not any(tmp_path.iterdir())
