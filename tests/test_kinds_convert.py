"""Adapter kinds out of the library: export in the kohya / LyCORIS names A1111 and ComfyUI read (round trip exact),
conversion of any kind to plain LoRA at a rank or kept energy (full rank reproduces the update), the CLI, inspect and
analyze on kinds, and the adapter server's fixed slots (Tucker LoCon served, other kinds refused by name)."""

from __future__ import annotations

import json

import pytest
import torch

from lora_vision.adapter import Adapter
from lora_vision.arithmetic import ConversionError, merge_adapters, resize
from lora_vision.cli import main
from lora_vision.formats import export, read_adapter
from lora_vision.models import build_tiny_sd
from lora_vision.serving import AdapterServer
from test_pipeline_kinds import make_kind_adapter  # noqa: E402  (tests/ is on sys.path under pytest)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_sd("sd1")


@pytest.fixture(scope="module")
def kinds() -> Adapter:
    return make_kind_adapter("sd1", 0)


def _base(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{n[:-len('.weight')]}": t.detach() for c in ("unet", "text_encoder")
            for n, t in getattr(pipe, c).state_dict().items() if n.endswith(".weight")}


def _no_bias_update(kinds: Adapter) -> Adapter:
    """The adapter without its full-diff layer (its diff_b has no plain-LoRA spelling)."""
    return Adapter({k: v for k, v in kinds.tensors.items() if not k.startswith("unet.conv_in.")}, kinds.metadata)


def test_kohya_export_writes_lycoris_names_and_reads_back_exactly(kinds, tmp_path):
    path = export(kinds, "kohya", tmp_path / "k.safetensors", base="sd1", dtype=torch.float32)
    from lora_vision.io import read_safetensors
    tensors, meta = read_safetensors(path)
    suffixes = {k.split(".", 1)[1] for k in tensors}
    assert {"hada_w1_a", "hada_w2_b", "lokr_w1", "dora_scale", "lora_mid.weight", "oft_blocks", "weight", "diff",
            "diff_b", "lora_down.weight", "alpha"} <= suffixes
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert "loha" in json.loads(meta["ss_network_args"])["algo"]
    pipe = build_tiny_sd("sd1")
    back, report = read_adapter(path, {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, strict=True)
    assert report.kinds == kinds.kinds()
    for comp in kinds.components():
        want, got = kinds.layers(comp), back.layers(comp)
        assert want.keys() == got.keys()
        for key, spec in want.items():
            other = got[key]
            assert other.kind == spec.kind and other.scaling == spec.scaling, key
            assert other.alpha == spec.alpha or spec.kind in ("ia3", "full"), key  # those have no alpha
            assert other.all_factors.keys() == spec.all_factors.keys(), key
            assert all(torch.equal(other.all_factors[n].reshape(t.shape), t) for n, t in spec.all_factors.items()), key


def test_conversion_to_lora_refuses_norm_layers_naming_them(pipe):
    norms = make_kind_adapter("sd1", 0, norms=True)
    with pytest.raises(ConversionError, match=r"(unet|text_encoder)\.\S+norm\d? is a norm-layer update "
                                              r"\(w_norm / b_norm\) of a LayerNorm / GroupNorm"):
        resize(_no_bias_update(norms), rank=10_000, base=_base(pipe), progress=False)


def test_conversion_to_lora_at_full_rank_reproduces_every_update(kinds, pipe):
    base = _base(pipe)
    with pytest.raises(ConversionError, match=r"unet.conv_in is a full diff layer with a bias update \(diff_b\)"):
        resize(kinds, rank=10_000, base=base, progress=False)
    kinds = _no_bias_update(kinds)
    plain, rows = resize(kinds, rank=10_000, base=base, progress=False)
    assert all(spec.is_plain for c in plain.components() for spec in plain.layers(c).values())
    notes = {r.note for r in rows}
    assert {"from LoHa", "from LoKr", "from LoRA+DoRA", "from OFT", "from (IA)^3", "from LoRA (Tucker)"} <= notes
    for comp in kinds.components():
        got = plain.layers(comp)
        for key, spec in kinds.layers(comp).items():
            if spec.bias_delta() is not None:
                continue
            w = base[f"{comp}.{key}"]
            torch.testing.assert_close(got[key].delta(), spec.delta(w), atol=1e-5, rtol=1e-5)
    assert all(r.kept > 1 - 1e-9 for r in rows)


def test_conversion_by_energy_reports_the_kept_share(kinds, pipe):
    only = Adapter({k: v for k, v in kinds.tensors.items() if ".loha." in k or ".lokr." in k
                    or (k.endswith(".alpha") and any(k[:-6] + s in kinds.tensors for s in (".loha.hada_w1_a",
                                                                                            ".lokr.lokr_w1")))},
                   kinds.metadata)
    plain, rows = resize(only, energy=0.9, base=_base(pipe), progress=False)
    assert all(0.9 ** 0.5 - 1e-9 <= r.kept <= 1 for r in rows) and any(r.rank_out < r.rank_in for r in rows)
    for r in rows:
        spec = plain.layers("unet").get(r.module.split(".", 1)[1]) or plain.layers("text_encoder")[
            r.module.split(".", 1)[1]]
        assert spec.rank == r.rank_out


def test_weight_dependent_kind_needs_the_base_and_says_so(kinds):
    with pytest.raises(ConversionError, match=r"LoRA\+DoRA layer: its update depends on the base weight; give the "
                                              r"base model \(--base MODEL"):
        resize(kinds, rank=4, progress=False)


def test_merging_kinds_sums_their_updates(kinds, pipe):
    base = _base(pipe)
    other = make_kind_adapter("sd1", 1)
    merged, _ = merge_adapters([_no_bias_update(kinds), _no_bias_update(other)], [1.0, -0.5], base=base,
                               progress=False)
    key = next(k for k, s in kinds.layers("unet").items() if s.kind == "lokr")
    w = base[f"unet.{key}"]
    want = kinds.layers("unet")[key].delta(w) - 0.5 * other.layers("unet")[key].delta(w)
    torch.testing.assert_close(merged.layers("unet")[key].delta(), want, atol=1e-5, rtol=1e-5)


def test_cli_convert_to_lora_inspect_and_analyze(kinds, pipe, tmp_path, capsys):
    src = kinds.save(tmp_path / "kinds.safetensors")
    base_dir = tmp_path / "base"
    pipe.save_pretrained(base_dir, safe_serialization=True)
    assert main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    counts = kinds.kinds()
    assert {"LoHa", "LoKr", "LoRA+DoRA", "LoRA (Tucker)", "OFT", "(IA)^3", "full diff"} <= set(counts)
    assert all(f"{k}: {n}" in out.split("kinds:")[1].splitlines()[0] for k, n in counts.items()), out
    # a DoRA layer without the base: one clear line, exit 1, nothing written
    dst = tmp_path / "as_lora.safetensors"
    assert main(["convert", str(src), "--to", "kohya", "--rank", "4", "-o", str(dst)]) == 1
    assert "depends on the base weight" in capsys.readouterr().err and not dst.exists()
    src2 = _no_bias_update(kinds).save(tmp_path / "kinds2.safetensors")
    assert main(["convert", str(src2), "--to", "kohya", "--energy", "0.99", "--base", str(base_dir),
                 "-o", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "from LoKr" in out and "mean kept" in out
    back, _ = read_adapter(dst)
    assert set(back.kinds()) == {"LoRA"}
    # analyze: the spectra of each kind's update (DoRA / OFT / (IA)^3 need the base)
    assert main(["analyze", str(src2), "-o", str(tmp_path / "an0"), "--no-plots", "--quiet"]) == 1
    assert "depends on the base weight; give the base model with --base" in capsys.readouterr().err
    assert main(["analyze", str(src2), "-o", str(tmp_path / "an"), "--no-plots", "--quiet", "--base",
                 str(base_dir)]) == 0
    report = json.loads((tmp_path / "an" / "report.json").read_text())
    layers = report["adapters"][0]["layers"]
    key = next(k for k, s in kinds.layers("unet").items() if s.kind == "loha")
    spec = kinds.layers("unet")[key]
    want = torch.linalg.svdvals(spec.delta().double())
    got = layers[f"unet.{key}"]
    assert got["rank"] == int((want > want[0] * 1e-12).sum()) and got["shape"] == list(spec.delta().shape)
    n = len(got["singular_values"])
    torch.testing.assert_close(torch.tensor(got["singular_values"], dtype=torch.float64), want[:n], atol=1e-5,
                               rtol=1e-4)


def test_server_serves_tucker_locon_and_refuses_other_kinds_by_name(kinds):
    pipe = build_tiny_sd("sd1")
    tucker = {k: v for k, v in kinds.tensors.items() if k.startswith("unet.up_blocks.1.resnets.0.conv2.")}
    server = AdapterServer(pipe)
    server.add("t", Adapter(tucker, kinds.metadata))
    server.prepare()
    server.activate("t", strength=0.5)
    conv = pipe.unet.up_blocks[1].resnets[0].conv2
    x = torch.randn(1, conv.base.in_channels, 6, 6)
    spec = kinds.layers("unet")["up_blocks.1.resnets.0.conv2"]
    w = conv.base.weight + 0.5 * spec.delta().reshape(conv.base.weight.shape)
    want = torch.nn.functional.conv2d(x, w, conv.base.bias, conv.base.stride, conv.base.padding)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), want, atol=1e-5, rtol=1e-5)
    for kind, why in (("loha", "Hadamard product"), ("lokr", "Kronecker product"), ("oft", "rotates the base"),
                      ("ia3", "rescales the base"), ("full", "full-rank weight difference")):
        one = {k: v for k, v in kinds.tensors.items() if f".{kind}." in k}
        one |= {k.rsplit(f".{kind}.", 1)[0] + ".alpha": kinds.tensors[k.rsplit(f".{kind}.", 1)[0] + ".alpha"]
                for k in list(one)}
        with pytest.raises(ValueError, match=rf"is a .* layer, which AdapterServer cannot hold .*{why}.*"
                                             r"lora-vision convert"):
            AdapterServer(build_tiny_sd("sd1")).add(kind, Adapter(one, kinds.metadata))
