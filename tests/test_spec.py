"""The adapter model: LayerSpec and its one scale, the typed metadata and the scaling rule it records per layer,
the one injection entry point (config or given factors), `fold_lora`, and the core's import boundary."""

from __future__ import annotations

import ast
import sys
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import lora_vision as lv
from lora_vision.adapter import Adapter
from lora_vision.lora import LayerSpec, LoRAStateDictError, fold_lora, lora_specs, plain_alpha
from lora_vision.metadata import AdapterMetadata

from test_lora_core import KINDS, Toy, _inputs, _randomize


def _toy(**cfg) -> Toy:
    torch.manual_seed(0)
    m = Toy()
    lv.inject_lora(m, lv.LoRAConfig(**{"rank": 4, "alpha": 6.0, "targets": KINDS, **cfg}))
    _randomize(m)
    return m


def test_layer_spec_scale_and_plain_alpha() -> None:
    a, b = torch.randn(4, 6), torch.randn(5, 4)
    rs = LayerSpec(a, b, 6.0, "rslora")
    assert rs.rank == 4 and rs.scaling == pytest.approx(6.0 / 2) and LayerSpec(a, b, 6.0).scaling == 1.5
    plain = rs.plain()
    assert plain.rule == "lora" and plain.alpha == pytest.approx(plain_alpha(6.0, 4, "rslora")) == pytest.approx(12)
    torch.testing.assert_close(plain.delta(), rs.delta())
    with pytest.raises(ValueError, match="unknown scaling rule 'sqrt'"):
        LayerSpec(a, b, 1.0, "sqrt")
    with pytest.raises(ValueError, match="adapter kind 'glora' is not supported"):  # loha is a kind since issue 13
        LayerSpec(a, b, 1.0, kind="glora")


def test_every_layer_kind_reports_its_rule_and_injects_from_given_factors() -> None:
    m = _toy(rslora=True)
    specs = lora_specs(m)
    assert {s.rule for s in specs.values()} == {"rslora"} and "attn.o" in specs and "blk.qkv.q" in specs
    torch.manual_seed(0)
    other = Toy()
    names = lv.inject_lora(other, layers=specs)
    assert sorted(names) == sorted(KINDS)
    x, img = _inputs()
    a, b = m(x, img), other(x, img)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert all(p.requires_grad for p in lv.lora_parameters(other))  # given factors train like fresh ones
    assert not any(p.data_ptr() == s.A.data_ptr() for p in lv.lora_parameters(other) for s in specs.values())


def test_given_factors_that_do_not_fit_change_nothing() -> None:
    specs = lora_specs(_toy())
    bad = dict(specs, fc=specs["fc"].with_factors(torch.zeros(4, 11), specs["fc"].B),
               conv1x1=specs["conv1x1"].with_factors(specs["conv1x1"].A, torch.full_like(specs["conv1x1"].B, math.nan)))
    torch.manual_seed(0)
    other = Toy()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(LoRAStateDictError) as e:
        lv.inject_lora(other, layers=bad)
    assert "fc: lora_A (4, 11) / lora_B (20, 4), expected (4, 12) / (20, 4)" in str(e.value)
    assert "conv1x1: lora_B contains NaN/Inf" in str(e.value)
    assert not list(lv.lora_layers(other)) and other.state_dict().keys() == before.keys()
    with pytest.raises(ValueError, match="exactly one of config"):
        lv.inject_lora(other)


def test_fold_lora_keeps_outputs_and_leaves_plain_modules() -> None:
    m = _toy(rslora=True)
    x, img = _inputs()
    want = m(x, img)
    assert sorted(fold_lora(m)) == sorted(KINDS)
    assert not list(lv.lora_layers(m)) and type(m.fc) is nn.Linear and type(m.attn) is nn.MultiheadAttention
    got = m(x, img)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)


def test_metadata_round_trip_and_rules() -> None:
    info = AdapterMetadata(format="1", components=("unet", "text_encoder"), base="sd1",
                           configs={"unet": {"rank": 4}}, scaling={"unet": "rslora", "text_encoder.x.q": "rslora"},
                           extra={"ss_output_name": "toy"})
    again = AdapterMetadata.from_strings(info.to_strings())
    assert again == info
    assert again.rule("unet", "a.b") == "rslora" and again.rule("text_encoder", "x.q") == "rslora"
    assert again.rule("text_encoder", "y") == "lora"
    # Files from before the rule was recorded per layer: the training config says it.
    old = AdapterMetadata.from_strings({"lora_vision.config.unet": json.dumps({"rslora": True})})
    assert old.rule("unet", "a") == "rslora" and old.rule("text_encoder", "a") == "lora"
    # A recorded (even empty) rule table wins over the config: derived adapters carry plain alphas.
    derived = AdapterMetadata.from_strings({"lora_vision.config.unet": json.dumps({"rslora": True}),
                                            "lora_vision.scaling": "{}"})
    assert derived.rule("unet", "a") == "lora"


def test_a_file_that_records_rslora_only_in_its_config_still_loads_with_rslora(tmp_path: Path) -> None:
    m = _toy(rslora=True)
    x, img = _inputs()
    want = m(x, img)
    ad = Adapter.from_models({"model": m}, configs={"model": lv.LoRAConfig(rank=4, rslora=True, targets=KINDS)})
    old_style = {k: v for k, v in ad.metadata.items() if k != "lora_vision.scaling"}
    torch.manual_seed(0)
    other = Toy()
    Adapter(ad.tensors, old_style).apply_to({"model": other})
    got = other(x, img)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)


CORE = Path(lv.__file__).parent / "lora"


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append("." * node.level + (node.module or ""))
    return out


@pytest.mark.parametrize("path", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_the_core_imports_only_itself_torch_and_the_standard_library(path: Path) -> None:
    allowed = {"torch"} | set(sys.stdlib_module_names)
    files = {"io", "os", "pathlib", "shutil", "tempfile", "pickle", "json"}  # the core reads and writes no files
    bad = [m for m in _imports(path) if not (m.startswith(".") and not m.startswith("..")) and
           (m.split(".")[0] not in allowed or m.split(".")[0] in files)]
    assert not bad, f"{path.name} imports {bad}: the core knows no presets, files, diffusers or transformers"
