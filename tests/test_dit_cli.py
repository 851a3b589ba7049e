"""The adapter verbs of `lora-vision` on DiT adapters (kohya/BFL and diffusers files of the tiny families): inspect,
convert, merge, resize, extract, analyze and fuse. Each result is checked by what it does to the transformer."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

from lora_vision.adapter import Adapter
from lora_vision.cli import main
from lora_vision.formats import export, read_adapter
from lora_vision.models import build_tiny_dit
from lora_vision.models.dit import transformer_inputs
from lora_vision.pipeline import load_adapter, unload_adapter

from test_dit_pipeline import out, trained_adapter


def _files(name: str, tmp_path, seed: int = 1) -> tuple[object, Adapter, dict[str, str]]:
    """(tiny pipeline, adapter, {"kohya": path, "diffusers": path}) for one family."""
    pipe = build_tiny_dit(name)
    adapter = trained_adapter(pipe, seed=seed)
    paths = {}
    for fmt in ("kohya", "diffusers"):  # float32 both (kohya's default fp16 would round the comparisons)
        paths[fmt] = str(export(adapter, fmt, tmp_path / f"{name}-{seed}-{fmt}.safetensors", dtype=torch.float32))
    return pipe, adapter, paths


def _with(pipe, source, strength: float = 1.0) -> torch.Tensor:
    """The transformer output with `source` loaded at `strength` (unloaded again afterwards)."""
    load_adapter(pipe, source, name="probe", strength=strength)
    try:
        return out(pipe, transformer_inputs(pipe.transformer))
    finally:
        unload_adapter(pipe, "probe")


def test_inspect_reads_kohya_and_diffusers_files_of_two_families(tmp_path, capsys) -> None:
    for name, family, fmt in (("tiny-flux", "flux1", "kohya"), ("tiny-qwen-image", "qwen-image", "diffusers")):
        _pipe, adapter, paths = _files(name, tmp_path)
        capsys.readouterr()
        assert main(["inspect", paths[fmt], "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["format"] == fmt and info["base"] == family
        n = len(adapter.layers("transformer"))
        assert info["components"]["transformer"]["modules"] == n
        assert f"matched {n} modules" in info["report"]


def test_convert_between_kohya_and_diffusers_keeps_the_update(tmp_path, capsys) -> None:
    pipe, adapter, paths = _files("tiny-sd3", tmp_path)
    want = _with(pipe, adapter)
    to_diff = tmp_path / "sd3-diffusers.safetensors"
    assert main(["convert", paths["kohya"], "--to", "diffusers", "-o", str(to_diff)]) == 0
    torch.testing.assert_close(_with(pipe, str(to_diff)), want, atol=1e-5, rtol=1e-5)
    pipe, adapter, paths = _files("tiny-z-image", tmp_path)
    to_kohya = tmp_path / "z-kohya.safetensors"
    assert main(["convert", paths["diffusers"], "--to", "kohya", "--family", "z-image", "--title", "boxes",
                 "--trigger", "zqx box", "--dtype", "fp32", "-o", str(to_kohya)]) == 0
    torch.testing.assert_close(_with(pipe, str(to_kohya)), _with(pipe, adapter), atol=1e-5, rtol=1e-5)
    with safe_open(str(to_kohya), "pt") as f:
        meta = f.metadata()
        assert any(k.startswith("lora_unet_layers_0_attention_qkv.") for k in f.keys())
    assert meta["modelspec.title"] == "boxes" and meta["modelspec.trigger_phrase"] == "zqx box"
    assert meta["modelspec.architecture"] == "z-image/lora"


def test_merge_two_flux2_files_equals_loading_both(tmp_path) -> None:
    pipe, a, paths_a = _files("tiny-flux2", tmp_path, seed=1)
    _pipe, b, paths_b = _files("tiny-flux2", tmp_path, seed=2)
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", paths_a["kohya"], paths_b["diffusers"], "--weights", "0.7", "0.4", "--to", "kohya",
                 "--dtype", "fp32", "-o", str(merged)]) == 0
    load_adapter(pipe, a, name="a", strength=0.7)
    load_adapter(pipe, b, name="b", strength=0.4)
    both = out(pipe, transformer_inputs(pipe.transformer))
    unload_adapter(pipe, "a")
    unload_adapter(pipe, "b")
    torch.testing.assert_close(_with(pipe, str(merged)), both, atol=1e-5, rtol=1e-5)


def test_resize_a_flux_kohya_file_keeps_the_best_rank_one_update(tmp_path) -> None:
    pipe, adapter, paths = _files("tiny-flux", tmp_path)
    small = tmp_path / "r1.safetensors"
    assert main(["resize", paths["kohya"], "--rank", "1", "--to", "diffusers", "-o", str(small)]) == 0
    resized, _ = read_adapter(str(small))
    assert set(resized.ranks().values()) == {1}
    layer = "transformer_blocks.0.attn.to_out.0"
    spec = adapter.layers("transformer")[layer]
    delta = spec.scaling * (spec.B.float() @ spec.A.float())
    u, s, vh = torch.linalg.svd(delta)
    best = s[0] * torch.outer(u[:, 0], vh[0])
    r = resized.layers("transformer")[layer]
    torch.testing.assert_close(r.scaling * (r.B.float() @ r.A.float()), best, atol=1e-5, rtol=1e-4)


def test_extract_from_two_sd3_pipeline_folders_gives_back_the_adapter(tmp_path) -> None:
    pipe, adapter, paths = _files("tiny-sd3", tmp_path)
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    assert main(["fuse", paths["kohya"], "--weights", "0", "--base", "tiny-sd3", "-o", str(base)]) == 0
    assert main(["fuse", paths["kohya"], "--base", "tiny-sd3", "-o", str(tuned)]) == 0
    got = tmp_path / "extracted.safetensors"
    assert main(["extract", "--base", str(base), "--tuned", str(tuned), "--rank", "2", "--to", "kohya",
                 "--dtype", "fp32", "-o", str(got)]) == 0
    torch.testing.assert_close(_with(pipe, str(got)), _with(pipe, adapter), atol=1e-4, rtol=1e-4)


def test_analyze_a_qwen_image_diffusers_file(tmp_path) -> None:
    _pipe, adapter, paths = _files("tiny-qwen-image", tmp_path)
    assert main(["analyze", paths["diffusers"], "-o", str(tmp_path / "an"), "--no-plots", "--quiet"]) == 0
    report = json.loads((tmp_path / "an" / "report.json").read_text())
    text = json.dumps(report)
    for layer in adapter.layers("transformer"):
        assert layer in text


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-z-image"])
def test_fuse_a_dit_pipeline_writes_the_transformer_into_the_folder_and_the_single_file(name, tmp_path) -> None:
    pipe, adapter, paths = _files(name, tmp_path)
    want = _with(pipe, adapter)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    dest = tmp_path / "fused"
    assert main(["fuse", paths["kohya"], "--base", name, "-o", str(dest), "--single-file"]) == 0
    fused = type(pipe).from_pretrained(str(dest))
    torch.testing.assert_close(out(fused, transformer_inputs(fused.transformer)), want, atol=1e-5, rtol=1e-5)
    with safe_open(str(dest / "fused.safetensors"), "pt") as f:
        keys = set(f.keys())
        for k, v in fused.transformer.state_dict().items():
            assert torch.equal(f.get_tensor(f"transformer.{k}"), v), k
    assert {k.split(".", 1)[0] for k in keys} >= {"transformer", "text_encoder", "vae"}
    plain = copy.deepcopy(pipe)
    assert all(torch.equal(plain.transformer.state_dict()[k], v) for k, v in before.items())
