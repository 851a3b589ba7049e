"""Flux.1 control LoRAs (BFL's FLUX.1-Canny-dev-lora / FLUX.1-Depth-dev-lora layout): a widened img_in (image +
control latents), lora_B biases and full norm scales, in BFL names and in diffusers names. Checked against diffusers'
own loader (FluxControlPipeline.load_lora_weights) on the tiny Flux.1, and for what happens to a pipeline that
cannot take them."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxControlPipeline
from safetensors.torch import save_file
from torch import nn

from lora_vision.cli import main
from lora_vision.formats import AdapterMismatchError, BaseMismatchError, export, read_adapter
from lora_vision.io import AdapterFileError
from lora_vision.lora.layers import LoRALayer, lora_layers
from lora_vision.models import build_tiny_dit
from lora_vision.models.dit import transformer_inputs, transformer_output
from lora_vision.pipeline import (fuse, list_adapters, load_adapter, set_adapter_strength, set_adapters, unfuse,
                                  unload_adapter)

from test_dit_pipeline import trained_adapter

RANK = 4


def _rows(tr: nn.Module) -> tuple[list[tuple[str, list[str], bool]], list[tuple[str, str]]]:
    """The BFL layout of a control LoRA for the tiny Flux.1, written out by hand: (native Linear, live modules,
    output halves swapped) and (native norm scale, live parameter)."""
    rows = [("img_in", ["x_embedder"], False), ("txt_in", ["context_embedder"], False),
            ("time_in.in_layer", ["time_text_embed.timestep_embedder.linear_1"], False),
            ("time_in.out_layer", ["time_text_embed.timestep_embedder.linear_2"], False),
            ("vector_in.in_layer", ["time_text_embed.text_embedder.linear_1"], False),
            ("vector_in.out_layer", ["time_text_embed.text_embedder.linear_2"], False),
            ("guidance_in.in_layer", ["time_text_embed.guidance_embedder.linear_1"], False),
            ("guidance_in.out_layer", ["time_text_embed.guidance_embedder.linear_2"], False),
            ("final_layer.linear", ["proj_out"], False),
            ("final_layer.adaLN_modulation.1", ["norm_out.linear"], True)]
    norms = []
    for i in range(tr.config.num_layers):
        d, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        rows += [(d + "img_attn.qkv", [t + "attn.to_q", t + "attn.to_k", t + "attn.to_v"], False),
                 (d + "img_attn.proj", [t + "attn.to_out.0"], False),
                 (d + "img_mlp.0", [t + "ff.net.0.proj"], False), (d + "img_mlp.2", [t + "ff.net.2"], False),
                 (d + "img_mod.lin", [t + "norm1.linear"], False),
                 (d + "txt_attn.qkv", [t + "attn.add_q_proj", t + "attn.add_k_proj", t + "attn.add_v_proj"], False),
                 (d + "txt_attn.proj", [t + "attn.to_add_out"], False),
                 (d + "txt_mlp.0", [t + "ff_context.net.0.proj"], False),
                 (d + "txt_mlp.2", [t + "ff_context.net.2"], False),
                 (d + "txt_mod.lin", [t + "norm1_context.linear"], False)]
        norms += [(d + "img_attn.norm.query_norm.scale", t + "attn.norm_q.weight"),
                  (d + "img_attn.norm.key_norm.scale", t + "attn.norm_k.weight"),
                  (d + "txt_attn.norm.query_norm.scale", t + "attn.norm_added_q.weight"),
                  (d + "txt_attn.norm.key_norm.scale", t + "attn.norm_added_k.weight")]
    for i in range(tr.config.num_single_layers):
        d, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        rows += [(d + "linear1", [t + "attn.to_q", t + "attn.to_k", t + "attn.to_v", t + "proj_mlp"], False),
                 (d + "linear2", [t + "proj_out"], False), (d + "modulation.lin", [t + "norm.linear"], False)]
        norms += [(d + "norm.query_norm.scale", t + "attn.norm_q.weight"),
                  (d + "norm.key_norm.scale", t + "attn.norm_k.weight")]
    return rows, norms


def control_tensors(tr: nn.Module, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(BFL-named, diffusers-named) tensors of one random control LoRA for the tiny Flux.1 transformer `tr`: every
    Linear adapted with a lora_B bias (img_in at twice the model's inputs), every q/k norm scale set."""
    gen = torch.Generator().manual_seed(seed)
    linears = {n: m for n, m in tr.named_modules() if isinstance(m, nn.Linear)}
    rows, norms = _rows(tr)
    assert {x for _, live, _ in rows for x in live} == set(linears)  # every Linear, as in BFL's files
    bfl, dif = {}, {}
    for native, live, swap in rows:
        inputs = linears[live[0]].in_features * (2 if native == "img_in" else 1)
        sizes = [linears[x].out_features for x in live]
        a = torch.randn(RANK, inputs, generator=gen) * 0.2
        b = torch.randn(sum(sizes), RANK, generator=gen) * 0.2
        bias = torch.randn(sum(sizes), generator=gen) * 0.1
        bfl |= {f"{native}.lora_A.weight": a, f"{native}.lora_B.weight": b, f"{native}.lora_B.bias": bias}
        if swap:  # BFL (shift, scale) -> diffusers (scale, shift)
            b, bias = torch.cat(b.chunk(2)[::-1]), torch.cat(bias.chunk(2)[::-1])
        for x, part_b, part_bias in zip(live, b.split(sizes), bias.split(sizes)):
            dif |= {f"transformer.{x}.lora_A.weight": a.clone(), f"transformer.{x}.lora_B.weight": part_b.clone(),
                    f"transformer.{x}.lora_B.bias": part_bias.clone()}
    for native, live in norms:
        value = 1 + torch.randn(tr.get_parameter(live).shape[0], generator=gen) * 0.3
        bfl[native], dif[f"transformer.{live}"] = value, value.clone()
    return bfl, dif


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """{"bfl": path, "diffusers": path} of one control LoRA for the tiny Flux.1."""
    bfl, dif = control_tensors(build_tiny_dit("tiny-flux").transformer)
    folder = tmp_path_factory.mktemp("control")
    save_file(bfl, folder / "bfl.safetensors")
    save_file(dif, folder / "diffusers.safetensors")
    return {"bfl": str(folder / "bfl.safetensors"), "diffusers": str(folder / "diffusers.safetensors")}


def control_pipe() -> FluxControlPipeline:
    return FluxControlPipeline.from_pipe(build_tiny_dit("tiny-flux"))


def _out(pipe, inputs=None) -> torch.Tensor:
    with torch.no_grad():
        return transformer_output(pipe.transformer, inputs or transformer_inputs(pipe.transformer))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("naming", ["bfl", "diffusers"])
def test_control_lora_gives_diffusers_outputs_at_every_strength(files, naming: str) -> None:
    ours, ref = control_pipe(), control_pipe()
    original = ours.transformer.x_embedder.weight.detach().clone()
    report = load_adapter(ours, files[naming], name="canny")
    ref.load_lora_weights(files["diffusers"], adapter_name="canny")  # diffusers reads its own spelling only
    assert report.source_report.variant == "Flux.1 control LoRA"
    wide = ours.transformer.x_embedder.base
    assert ours.transformer.config.in_channels == ref.transformer.config.in_channels == 32
    assert torch.equal(wide.weight[:, :16], original) and not wide.weight[:, 16:].any()  # zero-padded, as diffusers
    inputs = transformer_inputs(ours.transformer)  # 32 channels: image + control latents
    for strength in (1.0, 0.5, 0.0):
        set_adapter_strength(ours, "canny", strength)
        ref.set_adapters(["canny"], [strength])
        torch.testing.assert_close(_out(ours, inputs), _out(ref, inputs), atol=1e-4, rtol=1e-4)
    # strength 0 silences the LoRA part only: the norm scales stay set (off, the output is the base model's)
    at_zero = _out(ours, inputs)
    set_adapters(ours, [])
    assert not torch.allclose(at_zero, _out(ours, inputs), atol=1e-3)


def test_unfuse_and_unload_restore_the_transformer_exactly(files) -> None:
    pipe = control_pipe()
    before, x_embedder = _state(pipe.transformer), pipe.transformer.x_embedder
    load_adapter(pipe, files["bfl"], name="canny", strength=0.7)
    inputs = transformer_inputs(pipe.transformer)
    loaded, want = _state(pipe.transformer), _out(pipe, inputs)
    assert fuse(pipe) > 0
    torch.testing.assert_close(_out(pipe, inputs), want, atol=1e-5, rtol=1e-5)
    unfuse(pipe)
    assert _same(_state(pipe.transformer), loaded)  # bit for bit, widened x_embedder included
    assert unload_adapter(pipe, "canny") == ["canny"]
    assert pipe.transformer.x_embedder is x_embedder and pipe.transformer.config.in_channels == 16
    assert _same(_state(pipe.transformer), before)  # shapes and values, norm scales included
    assert not list(lora_layers(pipe.transformer))


def test_switching_the_adapter_off_puts_back_the_norm_scales(files) -> None:
    pipe = control_pipe()
    norm = pipe.transformer.transformer_blocks[0].attn.norm_q.weight
    original = norm.detach().clone()
    load_adapter(pipe, files["diffusers"], name="canny")
    file_value = norm.detach().clone()
    assert not torch.equal(file_value, original)
    set_adapters(pipe, [])
    assert torch.equal(norm, original)
    set_adapters(pipe, ["canny"])
    assert torch.equal(norm, file_value)


@pytest.mark.parametrize("strict", [True, False])
def test_plain_flux_pipeline_refuses_the_file_whole(files, strict: bool) -> None:
    pipe = build_tiny_dit("tiny-flux")
    before = _state(pipe.transformer)
    with pytest.raises(AdapterMismatchError, match=r"Flux\.1 control LoRA: transformer\.x_embedder takes 32 input "
                                                   r"channels .* FluxPipeline does not feed control latents.* "
                                                   r"FluxControlPipeline\.from_pipe\(pipe\)"):
        load_adapter(pipe, files["bfl"], strict=strict)
    assert _same(_state(pipe.transformer), before) and pipe.transformer.config.in_channels == 16
    assert not list(lora_layers(pipe.transformer)) and not list_adapters(pipe)


def test_read_adapter_names_the_widened_input_and_strict_raises(files) -> None:
    plain = build_tiny_dit("tiny-flux").transformer
    adapter, report = read_adapter(files["bfl"], models={"transformer": plain})
    assert report.widened == {"transformer.x_embedder": (16, 32)} and not report.ok
    assert "FluxControlPipeline" in str(report) and "12 norm scales set in full" in str(report)
    assert len(report.full_weights) == 12 and not report.unsupported and not report.unused
    assert adapter.layers("transformer")["x_embedder"].label == "LoRA+bias"
    with pytest.raises(AdapterMismatchError, match="widened inputs, for a FluxControlPipeline only"):
        read_adapter(files["bfl"], models={"transformer": plain}, strict=True)


@pytest.mark.parametrize("naming", ["bfl", "diffusers"])
def test_inspect_names_a_flux1_control_lora(files, naming: str, capsys) -> None:
    assert main(["inspect", files[naming]]) == 0
    text = capsys.readouterr().out
    assert "base:       flux1 (Flux.1 control LoRA)" in text and "LoRA+bias: 50" in text
    assert "12 norm scales set in full" in text


def test_inspect_does_not_call_an_ordinary_flux_lora_a_control_lora(tmp_path, capsys) -> None:
    path = export(trained_adapter(build_tiny_dit("tiny-flux")), "kohya", tmp_path / "plain.safetensors")
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["base"] == "flux1" and info["variant"] is None


def _broken(files, tmp_path, change) -> str:
    from safetensors.torch import load_file
    tensors = load_file(files["bfl"])
    change(tensors)
    save_file(tensors, tmp_path / "broken.safetensors")
    return str(tmp_path / "broken.safetensors")


def test_a_bias_of_the_wrong_length_is_one_line_and_changes_nothing(files, tmp_path) -> None:
    path = _broken(files, tmp_path, lambda t: t.update({"img_in.lora_B.bias": t["img_in.lora_B.bias"][:5]}))
    pipe = control_pipe()
    before = _state(pipe.transformer)
    with pytest.raises(AdapterFileError, match=r"img_in: lora_B\.bias has shape \(5,\) but lora_B has 32 output "
                                               r"rows; the file is broken"):
        load_adapter(pipe, path)
    assert _same(_state(pipe.transformer), before) and pipe.transformer.config.in_channels == 16


def test_a_norm_scale_of_another_size_leaves_the_pipeline_as_it_was(files, tmp_path) -> None:
    key = "single_blocks.1.norm.key_norm.scale"
    path = _broken(files, tmp_path, lambda t: t.update({key: torch.ones(16)}))
    pipe = control_pipe()
    before, x_embedder = _state(pipe.transformer), pipe.transformer.x_embedder
    for strict in (True, False):
        with pytest.raises(AdapterMismatchError, match=r"transformer\.single_transformer_blocks\.1\.attn\.norm_k\."
                                                       r"weight: the file has shape \(16,\), the model \(8,\)"):
            load_adapter(pipe, path, strict=strict)
    assert pipe.transformer.x_embedder is x_embedder and pipe.transformer.config.in_channels == 16
    assert _same(_state(pipe.transformer), before)


def test_a_nan_norm_scale_is_refused_before_anything_changes(files, tmp_path) -> None:
    key = "double_blocks.0.img_attn.norm.query_norm.scale"
    path = _broken(files, tmp_path, lambda t: t[key].__setitem__(0, float("nan")))
    pipe = control_pipe()
    before = _state(pipe.transformer)
    with pytest.raises(AdapterFileError, match="NaN/Inf"):
        load_adapter(pipe, path)
    assert _same(_state(pipe.transformer), before) and pipe.transformer.config.in_channels == 16


def test_img_in_of_another_width_is_a_base_mismatch(files, tmp_path) -> None:
    path = _broken(files, tmp_path, lambda t: t.update({"img_in.lora_A.weight": t["img_in.lora_A.weight"][:, :24].contiguous()}))
    pipe = control_pipe()
    before = _state(pipe.transformer)
    with pytest.raises(BaseMismatchError, match=r"img_in: the file has lora_down \(4, 24\)"):
        load_adapter(pipe, path)
    assert _same(_state(pipe.transformer), before)


def test_control_lora_over_an_adapter_on_x_embedder_is_refused(files) -> None:
    pipe = control_pipe()
    small = {"transformer.x_embedder.lora_A.weight": torch.randn(2, 16),
             "transformer.x_embedder.lora_B.weight": torch.randn(32, 2)}
    load_adapter(pipe, small, name="small")
    loaded = _state(pipe.transformer)
    with pytest.raises(AdapterMismatchError, match=r"x_embedder carries adapter\(s\) \['small'\] made for 16 "
                                                   r"inputs; unload them first"):
        load_adapter(pipe, files["bfl"], name="canny")
    assert _same(_state(pipe.transformer), loaded) and list(list_adapters(pipe)) == ["small"]


def test_the_widened_input_stays_until_its_last_adapter_is_unloaded(files) -> None:
    pipe = control_pipe()
    x_embedder = pipe.transformer.x_embedder
    load_adapter(pipe, files["bfl"], name="canny")
    with pytest.raises(AdapterMismatchError, match=r"already set by adapter 'canny'"):  # two values for one norm
        load_adapter(pipe, files["diffusers"], name="depth")
    lora_only = {k: v * 0.5 for k, v in read_adapter(files["diffusers"])[0].tensors.items()
                 if k.startswith("transformer.x_embedder.")}  # a second adapter on the widened input
    load_adapter(pipe, lora_only, name="extra")
    unload_adapter(pipe, "canny")
    assert isinstance(pipe.transformer.x_embedder, LoRALayer) and pipe.transformer.config.in_channels == 32
    unload_adapter(pipe, "extra")
    assert pipe.transformer.x_embedder is x_embedder and pipe.transformer.config.in_channels == 16


def test_our_own_file_of_a_control_lora_loads_like_the_original(files, tmp_path, capsys) -> None:
    own = tmp_path / "own.safetensors"
    assert main(["convert", files["bfl"], "--to", "lora_vision", "-o", str(own)]) == 0
    a, b = control_pipe(), control_pipe()
    load_adapter(a, files["bfl"], strength=0.8)
    load_adapter(b, str(own), strength=0.8)
    inputs = transformer_inputs(a.transformer)
    torch.testing.assert_close(_out(b, inputs), _out(a, inputs), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("fmt, why", [("kohya", "sets 12 tensors in full"),
                                      ("peft", "a LoRA layer with a bias update")])
def test_converting_a_control_lora_to_a_format_that_cannot_hold_it_is_one_line(files, tmp_path, capsys, fmt,
                                                                              why) -> None:
    out = tmp_path / f"out-{fmt}"
    assert main(["convert", files["bfl"], "--to", fmt, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert why in err and "Traceback" not in err and not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("fmt", ["peft", "lora_vision"])
def test_bfl_names_with_fused_qkv_convert_to_peft_and_our_format(files, tmp_path, capsys, fmt) -> None:
    """The q, k and v split from one fused module share lora_down: each is written in full (safetensors refuses
    shared memory)."""
    from safetensors.torch import load_file
    plain = {k: v for k, v in load_file(files["bfl"]).items()
             if k.endswith(("lora_A.weight", "lora_B.weight")) and not k.startswith("img_in")}
    save_file(plain, tmp_path / "plain.safetensors")
    out = tmp_path / f"out-{fmt}"
    assert main(["convert", str(tmp_path / "plain.safetensors"), "--to", fmt, "-o", str(out)]) == 0
    want = read_adapter(str(tmp_path / "plain.safetensors"))[0]
    got = read_adapter(str(out))[0]
    got_layers = got.layers(got.components()[0])  # a peft folder read without a model: component "model"
    for key, spec in want.layers("transformer").items():
        torch.testing.assert_close(got_layers[key].delta(), spec.delta())
