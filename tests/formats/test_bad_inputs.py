"""Hostile or broken files: each is a clear error (what came in, what was expected), never a crash or a silent
no-op; the CLI turns them into one line and exit code 1."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from conftest import make_sd_adapter, sd_components
from lora_vision.cli import main
from lora_vision.formats import detect_format, export, load_any
from lora_vision.io import AdapterFileError
from lora_vision.models import build_tiny_sd

K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    return export(make_sd_adapter("sd1", unet_targets="unet-cross-attn"), "kohya", d / "good.safetensors", base="sd1")


def _save(path, tensors):
    save_file(tensors, str(path))
    return path


def _cases(good, tmp_path):
    raw = good.read_bytes()
    ok = {f"{K}.lora_down.weight": torch.ones(4, 32), f"{K}.lora_up.weight": torch.ones(32, 4),
          f"{K}.alpha": torch.tensor(4.0)}
    (tmp_path / "truncated.safetensors").write_bytes(raw[: len(raw) - 100])
    (tmp_path / "notjson.safetensors").write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 16)
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 2 ** 40) + b"{}")
    (tmp_path / "pickle.safetensors").write_bytes(pickle.dumps({"a": 1}))
    torch.save({K: torch.ones(2)}, tmp_path / "zip.pt")
    return {
        "truncated": (tmp_path / "truncated.safetensors", "truncated"),
        "header not JSON": (tmp_path / "notjson.safetensors", "not valid JSON"),
        "huge header": (tmp_path / "huge.safetensors", "exceeds"),
        "pickle": (tmp_path / "pickle.safetensors", "pickle"),
        "torch.save zip": (tmp_path / "zip.pt", "pickle"),
        "wrong shape": (_save(tmp_path / "shape.safetensors", {**ok, f"{K}.lora_up.weight": torch.ones(32, 3)}),
                        "rank 4"),
        "NaN": (_save(tmp_path / "nan.safetensors", {**ok, f"{K}.lora_down.weight": torch.full((4, 32), float("nan"))}),
                "NaN"),
        "orphan alpha": (_save(tmp_path / "orphan.safetensors", {**ok, "lora_unet_mid_block_attentions_0_proj_in.alpha":
                                                                 torch.tensor(1.0)}), "orphan"),
        "unknown keys only": (_save(tmp_path / "unknown.safetensors", {"model.diffusion.weight": torch.ones(2)}),
                              "no known LoRA key"),
        "empty": (_save(tmp_path / "empty.safetensors", {}), "no tensors"),
        "missing file": (tmp_path / "nope.safetensors", "no such file"),
    }


def test_each_bad_input_is_a_clear_error(good, tmp_path, capsys):
    for name, (path, words) in _cases(good, tmp_path).items():
        with pytest.raises(AdapterFileError, match=words):
            load_any(path)
        assert main(["inspect", str(path)]) == 1, name
        err = capsys.readouterr().err
        assert err.startswith("lora-vision inspect: error:") and "Traceback" not in err, (name, err)


def test_wrong_width_for_the_model(tmp_path):
    comps = sd_components(build_tiny_sd("sd1"))
    path = _save(tmp_path / "w.safetensors", {f"{K}.lora_down.weight": torch.ones(4, 48),
                                               f"{K}.lora_up.weight": torch.ones(32, 4)})
    with pytest.raises(AdapterFileError, match=r"\(4, 48\).*another base"):
        load_any(path, models=comps)


def test_unknown_keys_next_to_good_ones_are_reported_then_strict_fails(good, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(good)
    sd["some_other_tool.weight"] = torch.ones(3)
    path = _save(tmp_path / "mixed.safetensors", sd)
    adapter, report = load_any(path)
    assert report.unused == ["some_other_tool.weight"] and len(report.matched) == 24 + 12
    with pytest.raises(AdapterFileError, match="some_other_tool.weight"):
        load_any(path, strict=True)


def test_bad_peft_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        load_any(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    torch.save({}, tmp_path / "b" / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="pickled"):
        load_any(tmp_path / "b")
    (tmp_path / "c").mkdir()
    with pytest.raises(AdapterFileError, match="adapter_config"):
        detect_format(tmp_path / "c")


def _raw_file(path, entries, data: bytes):
    """A safetensors file written by hand: `entries` {name: (dtype, shape, start, end)} over `data`."""
    header = {k: {"dtype": d, "shape": s, "data_offsets": [a, b]} for k, (d, s, a, b) in entries.items()}
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_one_read_of_the_data_gives_what_safetensors_gives_for_every_dtype(tmp_path):
    from safetensors.torch import load_file

    from lora_vision.io import read_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{dt}".replace("torch.", ""): (torch.randn(3, 5, generator=g) * 20).to(dt)
               for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                          torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2)}
    tensors |= {"scalar": torch.tensor(4.0), "empty": torch.zeros(0, 7), "odd": torch.ones(3, dtype=torch.int8)}
    path = _save(tmp_path / "all.safetensors", tensors)
    ours, _ = read_safetensors(path, check_finite=False)
    ref = load_file(str(path))
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
        assert torch.equal(ours[k].reshape(-1).view(torch.uint8), ref[k].reshape(-1).view(torch.uint8)), k


def test_hand_written_files_whose_tensors_do_not_tile_the_data_are_refused(tmp_path):
    from lora_vision.io import read_safetensors

    data = torch.arange(8, dtype=torch.float32).numpy().tobytes()  # 32 bytes
    cases = {
        "overlap": ({"a": ("F32", [4], 0, 16), "b": ("F32", [4], 8, 24)}, "starts at byte 8"),
        "gap": ({"a": ("F32", [2], 0, 8), "b": ("F32", [4], 16, 32)}, "starts at byte 16"),
        "short": ({"a": ("F32", [4], 0, 16)}, "end at byte 16 but the data region has 32"),
        "size": ({"a": ("F32", [3], 0, 16), "b": ("F32", [4], 16, 32)}, "needs 12 bytes, the file gives it 16"),
        "shape": ({"a": ("F32", "4", 0, 16), "b": ("F32", [4], 16, 32)}, "no valid shape"),
    }
    for name, (entries, words) in cases.items():
        with pytest.raises(AdapterFileError, match=words):
            read_safetensors(_raw_file(tmp_path / f"{name}.safetensors", entries, data))
    # an F32 tensor at an offset that is not a multiple of 4 (old writers) is read from its own aligned copy
    data = bytes([7]) + torch.tensor([1.5, -2.0]).numpy().tobytes()
    t, _ = read_safetensors(_raw_file(tmp_path / "odd.safetensors", {"u": ("U8", [1], 0, 1),
                                                                      "f": ("F32", [2], 1, 9)}, data))
    assert t["f"].tolist() == [1.5, -2.0] and t["u"].tolist() == [7] and t["f"].data_ptr() % 4 == 0
