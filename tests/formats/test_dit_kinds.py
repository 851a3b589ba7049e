"""Adapter kinds (LoKr, LoHa, full diff, DoRA) in DiT files (formats/dit_keys.py): every family's tiny pipeline
reads them through the same name maps as LoRA. On a live module the kind is kept whole; on a fused native module
(BFL / MMDiT / NextDiT qkv, Flux.1's linear1) or a swapped one (final_layer.adaLN_modulation.1) the kind's update
is split by rows and kept as that kind (a LoKr part that cuts through w2's rows keeps its window of kron(w1, w2));
the swapped one is worked out over the native weight into full diffs. The oracle is lycoris-lora: a LyCORIS module on a Linear holding
the native weight, its merged weight minus the weight is the update, written into a fresh transformer by hand."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import lycoris_update
from lora_vision import LoRAConfig, inject_lora, lora_parameters
from lora_vision.adapter import Adapter
from lora_vision.formats import export, load_any
from lora_vision.formats.dit_fused import _swap_halves
from lora_vision.io import AdapterFileError
from lora_vision.models import build_tiny_dit
from lora_vision.models.dit import transformer_inputs, transformer_output
from lora_vision.pipeline import (AdapterMismatchError, fuse, list_adapters, load_adapter,
                                  set_adapter_strength, unfuse)

lycoris_modules = pytest.importorskip("lycoris.modules")
from lycoris.modules import full as ly_full, locon, loha, lokr  # noqa: E402

PIPES = {"flux1": "tiny-flux", "flux2": "tiny-flux2", "sd3": "tiny-sd3", "qwen-image": "tiny-qwen-image",
         "z-image": "tiny-z-image"}
# Native modules per family: (native name, live parts, swapped halves). Fused ones first.
QKV, ADD = ("attn.to_q", "attn.to_k", "attn.to_v"), ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
NATIVE = {
    "flux1": [("double_blocks.0.img_attn.qkv", [f"transformer_blocks.0.{x}" for x in QKV], False),
              ("single_blocks.1.linear1", [f"single_transformer_blocks.1.{x}" for x in QKV + ("proj_mlp",)], False),
              ("double_blocks.1.txt_attn.proj", ["transformer_blocks.1.attn.to_add_out"], False),
              ("final_layer.adaLN_modulation.1", ["norm_out.linear"], True)],
    "flux2": [("double_blocks.0.txt_attn.qkv", [f"transformer_blocks.0.{x}" for x in ADD], False),
              ("single_blocks.0.linear1", ["single_transformer_blocks.0.attn.to_qkv_mlp_proj"], False),
              ("final_layer.adaLN_modulation.1", ["norm_out.linear"], True)],
    "sd3": [("joint_blocks.0.x_block.attn.qkv", [f"transformer_blocks.0.{x}" for x in QKV], False),
            ("joint_blocks.0.context_block.mlp.fc1", ["transformer_blocks.0.ff_context.net.0.proj"], False),
            ("final_layer.adaLN_modulation.1", ["norm_out.linear"], True)],
    "qwen-image": [("transformer_blocks.0.attn.to_q", ["transformer_blocks.0.attn.to_q"], False),
                   ("transformer_blocks.1.img_mlp.net.0.proj", ["transformer_blocks.1.img_mlp.net.0.proj"], False)],
    "z-image": [("layers.0.attention.qkv", [f"layers.0.attention.{x}" for x in ("to_q", "to_k", "to_v")], False),
                ("noise_refiner.0.feed_forward.w1", ["noise_refiner.0.feed_forward.w1"], False)],
}
# kind -> (LyCORIS class, options, the file's prefix and separator: each kind in another dialect)
KINDS = {
    "lokr": (lokr.LokrModule, {"factor": 4, "lora_dim": 2, "alpha": 2.0}, "lora_unet_", "_"),
    # factor 3: w2 has a part's rows (qkv) or 16 (linear1 of 224 rows): whole w1 rows per part, no windows
    "lokr-rows": (lokr.LokrModule, {"factor": 3, "lora_dim": 2, "alpha": 2.0}, "lora_unet_", "_"),
    "loha": (loha.LohaModule, {"lora_dim": 2, "alpha": 2.0}, "diffusion_model.", "."),
    "full": (ly_full.FullModule, {}, "", "."),
    "dora": (locon.LoConModule, {"lora_dim": 2, "alpha": 1.0, "weight_decompose": True}, "lycoris_", "_"),
}


@pytest.fixture(scope="module")
def pipes():
    return {}


def _pipe(pipes: dict, family: str):
    if family not in pipes:
        pipes[family] = build_tiny_dit(PIPES[family])
    return copy.deepcopy(pipes[family])


def _native_linear(model: nn.Module, parts: list[str], swap: bool) -> nn.Linear:
    """A Linear holding the native weight (and bias): the parts' rows stacked, halves swapped where BFL's are."""
    mods = [model.get_submodule(p) for p in parts]
    w = torch.cat([m.weight.detach() for m in mods], 0)
    b = torch.cat([m.bias.detach() for m in mods], 0) if mods[0].bias is not None else None
    if swap:
        w, b = _swap_halves(w), (_swap_halves(b) if b is not None else None)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return lin


def _lycoris_file(kind: str, lin: nn.Linear, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor,
                                                                  torch.Tensor | None]:
    """(file tensors by LyCORIS suffix, native weight update, native bias update) of a random LyCORIS module."""
    cls, opts, _, _ = KINDS[kind]
    g = torch.Generator().manual_seed(seed)
    if kind == "full":  # FullModule's merge needs the module applied; its file is the diff itself
        diff = torch.randn(lin.weight.shape, generator=g) * 0.05
        diff_b = torch.randn(lin.weight.shape[0], generator=g) * 0.05 if lin.bias is not None else None
        return {"diff": diff} | ({"diff_b": diff_b} if diff_b is not None else {}), diff, diff_b
    tensors, dw = lycoris_update(cls, lin, opts, g)
    return tensors, dw, None


def _hand_merged(pipe, updates: list[tuple[list[str], bool, torch.Tensor, torch.Tensor | None]], strength: float):
    """A copy of the transformer with W + strength * update written into every part (native rows mapped back)."""
    model = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        for parts, swap, dw, db in updates:
            if swap:
                dw, db = _swap_halves(dw), (_swap_halves(db) if db is not None else None)
            mods = [model.get_submodule(p) for p in parts]
            rows = [m.weight.shape[0] for m in mods]
            for m, d, b in zip(mods, dw.split(rows, 0), db.split(rows, 0) if db is not None else [None] * len(mods)):
                m.weight += strength * d
                if b is not None:
                    m.bias += strength * b
    return model


def _file(family: str, kind: str, pipe) -> tuple[dict[str, torch.Tensor], list]:
    _, _, prefix, sep = KINDS[kind]
    raw, updates = {}, []
    for i, (native, parts, swap) in enumerate(NATIVE[family]):
        lin = _native_linear(pipe.transformer, parts, swap)
        tensors, dw, db = _lycoris_file(kind, lin, seed=i)
        name = prefix + (native.replace(".", "_") if sep == "_" else native)
        raw.update({f"{name}.{s}": t for s, t in tensors.items()})
        updates.append((parts, swap, dw, db))
    return raw, updates


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("family", list(PIPES))
def test_kind_in_native_names_matches_lycoris_at_strength_and_fuses_exactly(pipes, family, kind):
    pipe = _pipe(pipes, family)
    raw, updates = _file(family, kind, pipe)
    inputs = transformer_inputs(pipe.transformer)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    rows_of = {p: pipe.transformer.get_submodule(p).weight.shape[0] for _, parts, _ in NATIVE[family] for p in parts}
    with torch.no_grad():
        base = transformer_output(pipe.transformer, inputs)
        want = {s: transformer_output(_hand_merged(pipe, updates, s), inputs) for s in (0.5, 1.0)}
    report = load_adapter(pipe, raw, name="k", strength=0.5)
    src = report.source_report
    assert src.ok, src
    fused_natives = [n for n, parts, swap in NATIVE[family] if len(parts) > 1 or swap]
    assert len(src.split) == len(fused_natives)
    label = {"lokr": "LoKr", "lokr-rows": "LoKr", "loha": "LoHa", "full": "full diff", "dora": "LoRA+DoRA"}[kind]
    for native, parts, swap in NATIVE[family]:  # split by rows where the kind's algebra allows, else full diffs
        if len(parts) == 1 and not swap:
            continue
        line = [x for x in src.split if native.replace(".", "_") in x.replace(".", "_")]
        rows = [rows_of[p] for p in parts]
        w2 = next((t for k, t in raw.items() if native.replace(".", "_") in k.replace(".", "_")
                   and k.endswith(("lokr_w2", "lokr_w2_a"))), None)
        # every kind splits by rows; a LoKr part that cuts through w2's rows keeps a window of kron(w1, w2)
        windowed = not swap and w2 is not None and any(n % w2.shape[0] for n in rows)
        said = f"kept as {label}" if not swap else "applied as full diffs)"
        assert len(line) == 1 and said in line[0] and ("as a window of kron(w1, w2)" in line[0]) == windowed, line
    whole = sum(1 for _, parts, swap in NATIVE[family] if len(parts) == 1 and not swap)
    assert src.kinds.get(label, 0) >= whole
    for strength in (0.5, 1.0):
        set_adapter_strength(pipe, "k", strength)
        with torch.no_grad():
            got = transformer_output(pipe.transformer, inputs)
        torch.testing.assert_close(got, want[strength], atol=1e-5, rtol=1e-5)
        assert (got - base).abs().max() > 1e-4
    fuse(pipe)
    with torch.no_grad():
        torch.testing.assert_close(transformer_output(pipe.transformer, inputs), got, atol=1e-5, rtol=1e-5)
    unfuse(pipe)
    after = {k: v for k, v in pipe.transformer.state_dict().items() if ".base." in k}
    for k, v in after.items():
        assert torch.equal(v, before[k.replace(".base.", ".")]), k


# ---- export: the kind kept, ComfyUI's names, read back exactly -------------------------------------------------

def _kind_adapter(pipe, seed: int = 0) -> Adapter:
    """LoKr on the attention, LoHa on the feed-forward, DoRA on the output projections and a full diff by hand on
    the final norm's linear (a swapped row), random non-zero factors."""
    model = copy.deepcopy(pipe.transformer)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    attn = tuple(n for n in names if n.endswith(("to_q", "to_k", "to_v", "add_q_proj", "attn.to_qkv_mlp_proj")))
    ff = tuple(n for n in names if n.endswith(("ff.net.0.proj", "ff.linear_in", "img_mlp.net.0.proj", "proj_mlp",
                                              "feed_forward.w1", "x_block.mlp.fc1")))
    out = tuple(n for n in names if n.endswith(("to_out.0", "to_add_out", "attention.to_out.0")))
    inject_lora(model, LoRAConfig(rank=2, alpha=2.0, targets=attn, adapter_type="lokr", lokr_factor=4), name="x")
    inject_lora(model, LoRAConfig(rank=2, alpha=1.0, targets=ff, adapter_type="loha"), name="x")
    inject_lora(model, LoRAConfig(rank=2, targets=out, adapter_type="dora"), name="x")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model, "x"):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    adapter = Adapter.from_models({"transformer": model}, "x")
    tensors = dict(adapter.tensors)
    norm = [n for n in names if n == "norm_out.linear"]
    for n in norm:
        w = model.get_submodule(n).base.weight if hasattr(model.get_submodule(n), "base") else \
            model.get_submodule(n).weight
        tensors[f"transformer.{n}.full.diff"] = torch.randn(w.shape, generator=g) * 0.01
        tensors[f"transformer.{n}.full.diff_b"] = torch.randn(w.shape[0], generator=g) * 0.01
        tensors[f"transformer.{n}.alpha"] = torch.tensor(1.0)
    return Adapter(tensors, adapter.metadata)


@pytest.mark.parametrize("family", list(PIPES))
def test_kind_export_keeps_the_kind_in_comfyui_names_and_reads_back_exactly(pipes, family, tmp_path):
    pipe = _pipe(pipes, family)
    adapter = _kind_adapter(pipe)
    path = export(adapter, "kohya", tmp_path / "k.safetensors", base=family, dtype=torch.float32)
    sd = load_file(path)
    mods = {k.split(".", 1)[0] for k in sd}
    assert all(m.startswith(("lora_unet_", "lycoris_")) for m in mods)
    if family in ("flux1", "sd3", "z-image"):  # fused natively: the parts keep their own (diffusers) names
        assert any(m.startswith("lycoris_") and m.endswith("to_q") for m in mods)
    back, report = load_any(path, models={"transformer": pipe.transformer}, strict=True)
    assert report.base == family and not report.split
    want, got = adapter.layers("transformer"), back.layers("transformer")
    assert set(got) == set(want)
    for key, spec in want.items():
        other = got[key]
        assert (other.kind, other.label) == (spec.kind, spec.label), key
        for n, t in spec.all_factors.items():
            assert torch.equal(other.all_factors[n], t), (key, n)
        if spec.kind != "full":
            assert other.alpha == spec.alpha, key
    assert load_any(path)[1].base == family  # told from the names and widths alone


# ---- bad input ----------------------------------------------------------------------------------------------------

def test_lokr_on_a_qkv_that_does_not_split_and_half_a_kind_are_named_and_refused_under_strict(pipes):
    pipe = _pipe(pipes, "flux1")
    g = torch.Generator().manual_seed(0)
    width = pipe.transformer.transformer_blocks[0].attn.to_q.weight.shape[1]
    raw = {  # 5 x 10 = 50 rows over a qkv of 3 x 32 rows: not the model's heads
        "lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": torch.randn(5, 4, generator=g),
        "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": torch.randn(10, width // 4, generator=g),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(1.0),
        # LoHa with one of its two Hadamard halves: on a fused module and on a plain one
        "lora_unet_double_blocks_1_img_attn_qkv.hada_w1_a": torch.randn(3 * width, 2, generator=g),
        "lora_unet_double_blocks_1_img_attn_qkv.hada_w1_b": torch.randn(2, width, generator=g),
        "lora_unet_double_blocks_1_img_attn_proj.hada_w1_a": torch.randn(width, 2, generator=g),
        "lora_unet_double_blocks_1_img_attn_proj.hada_w1_b": torch.randn(2, width, generator=g),
        # one good layer
        "lora_unet_double_blocks_0_img_attn_proj.lokr_w1": torch.randn(4, 4, generator=g),
        "lora_unet_double_blocks_0_img_attn_proj.lokr_w2": torch.randn(width // 4, width // 4, generator=g),
    }
    adapter, report = load_any(dict(raw), models={"transformer": pipe.transformer})
    assert list(adapter.layers("transformer")) == ["transformer_blocks.0.attn.to_out.0"]
    assert report.invalid == [
        f"lora_unet_double_blocks_0_img_attn_qkv: LoKr update (50, {width}): 50 rows do not split into "
        f"{width} + {width} + {width} (to_q, to_k, to_v)",
        f"lora_unet_double_blocks_1_img_attn_qkv: LoHa layer has hada_w1_a ({3 * width}, 2), hada_w1_b (2, {width}) "
        "but lacks hada_w2_a, hada_w2_b",
        f"lora_unet_double_blocks_1_img_attn_proj: LoHa layer has hada_w1_a ({width}, 2), hada_w1_b (2, {width}) "
        "but lacks hada_w2_a, hada_w2_b"]
    with pytest.raises(AdapterFileError, match="(?s)strict load failed.*50 rows do not split.*lacks hada_w2_a"):
        load_any(dict(raw), models={"transformer": pipe.transformer}, strict=True)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match="(?s)broken layers.*50 rows do not split"):
        load_adapter(pipe, dict(raw), name="bad")
    assert list_adapters(pipe) == {}
    assert pipe.transformer.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())
    loaded = load_adapter(pipe, dict(raw), name="bad", strict=False)  # what fits, the rest named
    assert loaded.modules == {"transformer": ["transformer_blocks.0.attn.to_out.0"]}
    assert any("50 rows do not split" in s for s in loaded.skipped)


def test_dora_over_a_fused_qkv_splits_without_the_model_and_a_swapped_module_needs_it(pipes):
    # LyCORIS' DoRA magnitude is per output row: each q / k / v part takes its rows and runs on its own weight rows,
    # so no model is needed; the swapped final modulation is worked out over the native weight, which needs it
    pipe = _pipe(pipes, "flux1")
    raw, _ = _file("flux1", "dora", pipe)
    _, report = load_any(dict(raw))
    assert len(report.unsupported) == 1 and "final_layer_adaLN_modulation_1" in report.unsupported[0]
    assert "depends on the base weights; give the model" in report.unsupported[0]
    fused = [s for s in report.split if "kept as LoRA+DoRA" in s]
    assert len(fused) == 2 and any("to_q, to_k, to_v, proj_mlp" in s for s in fused), report.split
    _, report = load_any(dict(raw), models={"transformer": pipe.transformer}, strict=True)
    assert any("computed with the model's weights" in s for s in report.split)


def test_lokr_windows_write_back_the_fused_file_exactly_and_other_formats_refuse_them(pipes, tmp_path):
    """A BFL LoKr whose w2 rows cut through the parts (factor 4: 24 rows over q / k / v of 32, 56 over linear1)
    reads as LoKr windows, which hold the file's factors; the kohya export puts each fused LoKr back bit for bit,
    our own format keeps the windows, and peft (which cannot hold one) refuses naming the layer."""
    pipe = _pipe(pipes, "flux1")
    raw, _ = _file("flux1", "lokr", pipe)
    adapter, report = load_any(dict(raw), models={"transformer": pipe.transformer}, strict=True)
    windows = [k for k, sp in adapter.layers("transformer").items() if "lokr_rows" in sp.factors]
    assert len(windows) == 7, windows  # q, k, v of double block 0 and q, k, v, proj_mlp of single block 1
    # held as the file's factors (views of them), no dense diff per part (32 x 32 here)
    layers = adapter.layers("transformer")
    assert max(t.numel() for k in windows for t in layers[k].factors.values()) <= max(t.numel() for t in raw.values())
    path = export(adapter, "kohya", tmp_path / "k.safetensors", base="flux1", dtype=torch.float32)
    written = load_file(path)
    for native in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1"):
        for suffix in ("lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"):
            assert torch.equal(written[f"{native}.{suffix}"], raw[f"{native}.{suffix}"].float()), (native, suffix)
    assert not any("lokr_rows" in k or (k.startswith("lycoris_") and "transformer_blocks" in k) for k in written)
    inputs = transformer_inputs(pipe.transformer)
    outs = []
    for source in (dict(raw), path, export(adapter, "lora_vision", tmp_path / "own.safetensors")):
        p = _pipe(pipes, "flux1")
        load_adapter(p, source, name="k", strength=1.0)
        with torch.no_grad():
            outs.append(transformer_output(p.transformer, inputs))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outs[2], outs[0], atol=0, rtol=0)
    with pytest.raises(Exception, match="a window of a LoKr on a fused module"):
        export(adapter, "peft", tmp_path / "peft")
