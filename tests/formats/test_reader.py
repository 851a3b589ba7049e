"""One reader (`lora_vision.formats.read_adapter`) behind every way an adapter is read: `Adapter.load`, `load_any`,
the pipeline loader, `analyze`, the adapter commands and checkpoints; same checks and same error types for all."""

from __future__ import annotations

import pytest
import torch

from lora_vision import LoRAConfig, inject_lora
from lora_vision.adapter import Adapter
from lora_vision.formats import AdapterMismatchError, BaseMismatchError, export, load_any, read_adapter
from lora_vision.io import AdapterFileError, read_safetensors, write_safetensors
from lora_vision.models import build_tiny_sd
from lora_vision.pipeline import list_adapters, load_adapter, unload_adapter
from lora_vision.pipeline import AdapterMismatchError as PipelineMismatchError

from conftest import make_sd_adapter, randomize_lora, sd_components


@pytest.fixture(scope="module")
def rslora_file(tmp_path_factory):
    """A native file of an rsLoRA adapter (rank 4, alpha 2) on a tiny SD 1.x UNet."""
    pipe = build_tiny_sd("sd1")
    inject_lora(pipe.unet, LoRAConfig(rank=4, alpha=2.0, rslora=True, targets="unet-attn"))
    randomize_lora(pipe.unet, 1)
    return Adapter.from_models({"unet": pipe.unet}).save(tmp_path_factory.mktemp("r") / "rs.safetensors")


def test_every_name_reads_a_native_file_the_same_way_keeping_alphas_and_rules(rslora_file):
    adapter, report = read_adapter(rslora_file)
    assert report.format == "lora_vision" and load_any is read_adapter
    specs = adapter.layers("unet")
    assert {s.rule for s in specs.values()} == {"rslora"} and {s.alpha for s in specs.values()} == {2.0}
    again = Adapter.load(rslora_file)
    assert again.metadata == adapter.metadata and again.tensors.keys() == adapter.tensors.keys()
    assert all(torch.equal(again.tensors[k], v) for k, v in adapter.tensors.items())
    # The same update as the file's own numbers, and as any other format read back.
    raw, _ = read_safetensors(rslora_file)
    for key, spec in specs.items():
        assert torch.equal(spec.A, raw[f"unet.{key}.lora_A.weight"])
    kohya = export(adapter, "kohya", rslora_file.with_name("k.safetensors"), base="sd1", dtype=torch.float32)
    for key, spec in read_adapter(kohya)[0].layers("unet").items():
        torch.testing.assert_close(spec.delta(), specs[key].delta(), rtol=1e-6, atol=1e-7)


def test_a_native_file_keeps_its_parsed_layers_as_the_adapter_gives_them(tmp_path):
    pipe = build_tiny_sd("sd1")
    inject_lora(pipe.unet, LoRAConfig(rank=4, alpha=2.0, rslora=True, targets="unet-attn"))
    inject_lora(pipe.text_encoder, LoRAConfig(rank=2, adapter_type="loha", targets="clip-attn"))
    randomize_lora(pipe.unet, 1)
    adapter = Adapter.from_models({"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    key = next(k for k in adapter.tensors if k.startswith("unet.") and k.endswith(".alpha"))
    adapter.tensors[key] = torch.tensor(0.1, dtype=torch.float64)  # read back as a float32 alpha
    path = adapter.save(tmp_path / "mixed.safetensors")
    for models in (sd_components(build_tiny_sd("sd1")), None):
        got, report = read_adapter(path, models=models)
        assert set(report.layers) == set(got.components()) == {"unet", "text_encoder"}
        for comp in got.components():
            again = got.layers(comp)
            assert report.layers[comp].keys() == again.keys()
            for k, spec in report.layers[comp].items():
                assert (spec.alpha, spec.rule, spec.kind) == (again[k].alpha, again[k].rule, again[k].kind), k
                assert spec.all_factors.keys() == again[k].all_factors.keys()
                assert all(t is again[k].all_factors[n] for n, t in spec.all_factors.items()), k
        assert {s.rule for s in report.layers["unet"].values()} == {"rslora"}
        assert {s.kind for s in report.layers["text_encoder"].values()} == {"loha"}
    kohya = export(adapter, "kohya", tmp_path / "k.safetensors", base="sd1", dtype=torch.float32)
    assert read_adapter(kohya)[1].layers is None  # readers that do not keep them say so


def test_adapter_load_reads_every_format(tmp_path):
    native = make_sd_adapter("sd1", unet_targets="unet-cross-attn")
    kohya = export(native, "kohya", tmp_path / "k.safetensors", base="sd1", dtype=torch.float32)
    got = Adapter.load(kohya)
    assert got.info.source_format == "kohya" and got.ranks() == native.ranks()
    for comp in native.components():
        for key, spec in native.layers(comp).items():
            torch.testing.assert_close(got.layers(comp)[key].delta(), spec.delta(), rtol=1e-6, atol=1e-7)


def test_another_base_is_one_error_type_for_the_reader_and_the_pipeline(tmp_path):
    sd1 = build_tiny_sd("sd1")
    wrong = make_sd_adapter("sdxl", unet_targets="unet-cross-attn").save(tmp_path / "xl.safetensors")
    for read in (lambda: read_adapter(wrong, models=sd_components(sd1)),
                 lambda: load_adapter(sd1, wrong, name="xl")):
        with pytest.raises(PipelineMismatchError, match="made for another base model") as err:
            read()
        assert isinstance(err.value, BaseMismatchError) and isinstance(err.value, AdapterFileError)
    assert PipelineMismatchError is AdapterMismatchError and not list_adapters(sd1)


def test_a_module_the_pipeline_lacks_is_left_out_and_reported_alike_for_every_format(tmp_path):
    native = make_sd_adapter("sd1", unet_targets="unet-cross-attn")
    stray = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_nowhere"
    ours = Adapter({**native.tensors, f"{stray}.lora_A.weight": torch.zeros(4, 32),
                    f"{stray}.lora_B.weight": torch.zeros(32, 4), f"{stray}.alpha": torch.tensor(2.0)},
                   native.metadata).save(tmp_path / "ours.safetensors")
    tensors, meta = read_safetensors(export(native, "kohya", tmp_path / "k.safetensors", base="sd1",
                                            dtype=torch.float32))
    extra = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_nowhere"
    tensors.update({f"{extra}.lora_down.weight": torch.zeros(4, 32), f"{extra}.lora_up.weight": torch.zeros(32, 4),
                    f"{extra}.alpha": torch.tensor(2.0)})
    kohya = write_safetensors(tmp_path / "kohya.safetensors", tensors, meta)
    pipe = build_tiny_sd("sd1")
    for path, fmt in ((ours, "lora_vision"), (kohya, "kohya")):
        report = load_adapter(pipe, path, name="a")  # strict by default, as for generate's files
        assert report.format == fmt and report.num_modules == len(native.ranks())
        assert [m.endswith("to_nowhere") for m in report.source_report.not_found] == [True], fmt
        unload_adapter(pipe)
        with pytest.raises(AdapterMismatchError, match="(?s)strict load failed.*to_nowhere"):
            read_adapter(path, models=sd_components(pipe), strict=True)


def test_read_adapter_names_what_it_got_when_it_is_not_an_adapter():
    with pytest.raises(TypeError, match="expected an adapter file path, a PEFT folder, a dict of tensors or an "
                                        "Adapter, got int"):
        read_adapter(42)


def test_checkpoint_weights_of_an_rslora_run_resume_with_the_same_outputs(tmp_path):
    from lora_vision.training.checkpoint import LoRAWeights

    cfg = LoRAConfig(rank=4, alpha=2.0, rslora=True, targets="unet-attn")
    pipe, fresh = build_tiny_sd("sd1"), build_tiny_sd("sd1")
    inject_lora(pipe.unet, cfg)
    randomize_lora(pipe.unet, 2)
    inject_lora(fresh.unet, cfg)
    LoRAWeights({"unet": pipe.unet}).write(tmp_path)
    LoRAWeights({"unet": fresh.unet}).load(tmp_path)
    x, e = torch.randn(1, 4, 8, 8), torch.randn(1, 7, pipe.unet.config.cross_attention_dim)
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(x, 500, e).sample, pipe.unet(x, 500, e).sample, rtol=0, atol=0)
