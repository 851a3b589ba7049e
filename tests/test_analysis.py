"""lora-vision analyze: spectra, effective ranks, subspace similarity and amplification checked against adapters
built with known structure; the CLI writes its JSON and PNG files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import lora_vision as lv
from lora_vision.adapter import Adapter
from lora_vision.analysis import (AnalysisOptions, BaseWeights, amplification, analyze, effective_rank,
                                  energy_rank, lowrank_svd, random_projection_norm, subspace_similarity,
                                  top_singular_values)
from lora_vision.analysis.plots import split_block_kind
from lora_vision.cli import main
from lora_vision.io import write_safetensors

N_IN, N_OUT, RANK = 24, 20, 8


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_IN, N_OUT), nn.ReLU(), nn.Conv2d(6, 10, 3, padding=1))


def _adapter(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int = RANK,
             alpha: float = RANK) -> Adapter:
    """Inject rank-`rank` LoRA into layers "0" (Linear) and "2" (Conv2d) and set A, B (2-D; conv A is reshaped)."""
    lv.inject_lora(model, lv.LoRAConfig(rank=rank, alpha=alpha, targets=("0", "2")))
    layers = dict(lv.lora_layers(model))
    with torch.no_grad():
        for name, (a, b) in factors.items():
            la, lb = layers[name].lora_A["default"], layers[name].lora_B["default"]
            la.copy_(a.reshape(la.shape))
            lb.copy_(b.reshape(lb.shape))
    return Adapter.from_models({"model": model})


def _planted(m: int, n: int, sigma: tuple[float, ...], rank: int, seed: int, noise: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factors of a rank-`rank` adapter whose product is U diag(sigma) V^T (+ noise): returns A, B, U, V."""
    k = len(sigma)
    u, v = _orthonormal(m, k, seed), _orthonormal(n, k, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    a = torch.cat([v.T, noise * torch.randn(rank - k, n, generator=g, dtype=torch.float64)])
    b = torch.cat([u * torch.tensor(sigma, dtype=torch.float64), noise * torch.randn(m, rank - k, generator=g,
                                                                                     dtype=torch.float64)], 1)
    return a.float(), b.float(), u, v


# ---- the linear algebra against the plain computation ------------------------------------------------------------
@pytest.mark.parametrize("m,n,r,scale", [(40, 30, 8, 0.5), (7, 50, 8, -2.0), (64, 64, 4, 1.0), (5, 3, 6, 1.0)])
def test_lowrank_svd_matches_svd_of_the_full_product(m: int, n: int, r: int, scale: float) -> None:
    g = torch.Generator().manual_seed(m * n + r)
    b, a = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    full = scale * (b.double() @ a.double())
    svd = lowrank_svd(b, a, scale)
    ref = torch.linalg.svdvals(full)
    k = min(r, m, n)
    torch.testing.assert_close(svd.S[:k], ref[:k], rtol=1e-10, atol=1e-10 * float(ref[0]))
    assert svd.S.numel() == k  # min(m, n, r) values, also when r > min(m, n)
    torch.testing.assert_close(svd.U @ torch.diag(svd.S) @ svd.V.T, full, rtol=0, atol=1e-10 * float(ref[0]))
    torch.testing.assert_close(svd.U.T @ svd.U, torch.eye(svd.S.numel(), dtype=torch.float64), rtol=0, atol=1e-12)


def test_top_singular_values_match_svdvals() -> None:
    for shape in ((30, 90), (90, 30), (40, 40)):
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
        ref = torch.linalg.svdvals(w.double())
        torch.testing.assert_close(top_singular_values(w, 5), ref[:5], rtol=0, atol=1e-6 * float(ref[0]))


def test_effective_and_energy_ranks_on_known_spectra() -> None:
    assert effective_rank(torch.tensor([3.0, 3.0, 3.0, 0.0])) == pytest.approx(3.0)
    p = torch.tensor([0.6, 0.4], dtype=torch.float64)
    assert effective_rank(torch.tensor([3.0, 2.0])) == pytest.approx(math.exp(-(p * p.log()).sum().item()))
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert [energy_rank(s, e) for e in (0.5, 9 / 14, 0.9, 0.99, 1.0)] == [1, 1, 2, 3, 3]
    assert effective_rank(torch.zeros(4)) == 0.0 and energy_rank(torch.zeros(4), 0.9) == 0


# ---- a planted rank-2 update in a rank-8 adapter -----------------------------------------------------------------
def test_planted_rank_two_update_in_rank_eight_adapter() -> None:
    sigma = (2.0, 1.0)
    a0, b0, _, _ = _planted(N_OUT, N_IN, sigma, RANK, seed=1, noise=1e-4)
    a2, b2, _, _ = _planted(10, 6 * 9, sigma, RANK, seed=5, noise=1e-4)
    report = analyze([("planted", _adapter(_model(), {"0": (a0, b0), "2": (a2, b2)}))], progress=False)
    layers = report["adapters"][0]["layers"]
    assert list(layers) == ["model.0", "model.2"]
    p = torch.tensor(sigma) / sum(sigma)
    expected_erank = math.exp(-(p * p.log()).sum().item())  # 1.909 for sigma = (2, 1)
    for key, shape in (("model.0", [N_OUT, N_IN]), ("model.2", [10, 54])):
        s = layers[key]
        assert s["shape"] == shape and s["rank"] == RANK
        assert s["effective_rank"] == pytest.approx(expected_erank, abs=2e-3)
        assert s["rank_90"] == 2 and s["rank_99"] == 2 and s["suggested_rank"] == 2
        assert s["singular_values"][:2] == pytest.approx(sigma, rel=1e-3)
        assert max(s["singular_values"][2:]) < 1e-5
        assert s["update_norm"] == pytest.approx(math.sqrt(5.0), rel=1e-3)
    assert layers["model.2"]["kernel"] == [3, 3]


def test_scaling_alpha_over_rank_is_applied() -> None:
    a, b, _, _ = _planted(N_OUT, N_IN, (1.0,), RANK, seed=3)
    adapter = _adapter(_model(), {"0": (a, b)}, alpha=2.0)  # scaling = 2 / 8
    s = analyze([("x", adapter)], progress=False)["adapters"][0]["layers"]["model.0"]
    assert s["scaling"] == pytest.approx(0.25) and s["singular_values"][0] == pytest.approx(0.25, rel=1e-6)


# ---- subspace similarity -------------------------------------------------------------------------------------------
def _random_factors(a_rows: torch.Tensor, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    b = torch.randn(m, a_rows.shape[0], generator=torch.Generator().manual_seed(seed))
    return a_rows.float(), b


@pytest.mark.parametrize("space", ["A", "update"])
def test_adapters_sharing_a_subspace_have_phi_one(space: str) -> None:
    q = _orthonormal(N_IN, RANK, 11)  # the shared input subspace
    g = torch.Generator().manual_seed(12)
    a1 = torch.randn(RANK, RANK, generator=g, dtype=torch.float64) @ q.T
    a2 = torch.randn(RANK, RANK, generator=g, dtype=torch.float64) @ q.T  # other rows, same row space
    first = _adapter(_model(), {"0": _random_factors(a1, N_OUT, 1)})
    second = _adapter(_model(), {"0": _random_factors(a2, N_OUT, 2)})
    sim = analyze([("a", first), ("b", second)], options=AnalysisOptions(subspace=space), progress=False)["similarity"]
    assert sim["space"] == space and set(sim["layers"]) == {"model.0", "model.2"}
    phi = torch.tensor(sim["layers"]["model.0"]["phi"])
    assert phi.shape == (RANK, RANK)
    assert float(phi[-1, -1]) == pytest.approx(1.0, abs=1e-4)
    # Against the definition: phi(i, j) = ||V1_i^T V2_j||_F^2 / min(i, j) from independently computed SVDs.
    if space == "A":
        v1 = torch.linalg.svd(a1.float().double(), full_matrices=False)[2].T
        v2 = torch.linalg.svd(a2.float().double(), full_matrices=False)[2].T
        for i, j in ((1, 1), (3, 5), (8, 2)):
            ref = torch.linalg.matrix_norm(v1[:, :i].T @ v2[:, :j]) ** 2 / min(i, j)
            assert float(phi[i - 1, j - 1]) == pytest.approx(float(ref), abs=1e-4)


def test_nested_subspaces_rank_four_inside_rank_eight() -> None:
    q = _orthonormal(N_IN, RANK, 21)
    g = torch.Generator().manual_seed(22)
    a8 = torch.randn(RANK, RANK, generator=g, dtype=torch.float64) @ q.T
    a4 = torch.randn(4, RANK, generator=g, dtype=torch.float64) @ q.T  # rows inside the rank-8 row space
    m4 = _model()
    lv.inject_lora(m4, lv.LoRAConfig(rank=4, targets=("0",)))
    layer = dict(lv.lora_layers(m4))["0"]
    with torch.no_grad():
        layer.lora_A["default"].copy_(a4.float())
        layer.lora_B["default"].normal_()
    small = Adapter.from_models({"model": m4})
    big = _adapter(_model(), {"0": _random_factors(a8, N_OUT, 3)})
    phi = torch.tensor(analyze([("r4", small), ("r8", big)], progress=False)["similarity"]["layers"]["model.0"]["phi"])
    assert phi.shape == (4, RANK)
    assert float(phi[3, 7]) == pytest.approx(1.0, abs=1e-4)  # all 4 directions lie in the 8-dim subspace
    assert float(phi[3, 3]) < 0.99  # but not in the top-4 of the other adapter (random mixing)


def test_orthogonal_subspaces_have_phi_zero() -> None:
    q = _orthonormal(N_IN, 2 * RANK, 31)
    first = _adapter(_model(), {"0": _random_factors(q[:, :RANK].T, N_OUT, 4)})
    second = _adapter(_model(), {"0": _random_factors(q[:, RANK:].T, N_OUT, 5)})
    for space in ("A", "update"):
        sim = analyze([("a", first), ("b", second)], options=AnalysisOptions(subspace=space),
                      progress=False)["similarity"]
        assert max(max(row) for row in sim["layers"]["model.0"]["phi"]) < 1e-6


def test_subspace_similarity_rejects_different_spaces() -> None:
    with pytest.raises(ValueError, match="different spaces"):
        subspace_similarity(torch.eye(4)[:, :2], torch.eye(5)[:, :2])


# ---- amplification (section 7.3) ---------------------------------------------------------------------------------
def _base_with_spectrum(sigma: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    uw, vw = _orthonormal(N_OUT, len(sigma), seed), _orthonormal(N_IN, len(sigma), seed + 1)
    return uw @ torch.diag(sigma) @ vw.T, uw, vw


def test_amplification_aligned_versus_orthogonal_update(tmp_path) -> None:
    sigma = torch.tensor([10.0, 8.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    w, uw, vw = _base_with_spectrum(sigma, 41)
    d = torch.tensor([1.0, 1.0], dtype=torch.float64)
    aligned = (vw[:, :2].T, uw[:, :2] * d)  # the update lives in W's top-2 directions
    orthogonal = (vw[:, -2:].T, uw[:, -2:] * d)  # ... in W's two weakest directions
    # Through the file path: the base model's state dict with the planted W as layer "0".
    model = _model()
    with torch.no_grad():
        model[0].weight.copy_(w.float())
    base_file = write_safetensors(tmp_path / "base.safetensors", model.state_dict())
    base = BaseWeights.open(str(base_file))
    results = {}
    for name, (a, b) in (("aligned", aligned), ("orthogonal", orthogonal)):
        rows = torch.cat([a, torch.zeros(RANK - 2, N_IN, dtype=torch.float64)]).float()
        cols = torch.cat([b, torch.zeros(N_OUT, RANK - 2, dtype=torch.float64)], 1).float()
        rep = analyze([(name, _adapter(_model(), {"0": (rows, cols)}))], base, progress=False)
        results[name] = rep["adapters"][0]["layers"]["model.0"]
    top2 = math.sqrt(10.0 ** 2 + 8.0 ** 2)
    al, orth = results["aligned"]["amplification"], results["orthogonal"]["amplification"]
    assert al["k"] == 2 and orth["k"] == 2
    assert al["proj_base_top"] == pytest.approx(top2, rel=1e-5) and orth["proj_base_top"] == al["proj_base_top"]
    assert al["proj_update"] == pytest.approx(top2, rel=1e-5)  # W is strong exactly where the update is
    assert orth["proj_update"] == pytest.approx(math.sqrt(1.0 + 0.25), rel=1e-4)
    assert al["amplification"] == pytest.approx(math.sqrt(2) / top2, rel=1e-4)
    assert orth["amplification"] == pytest.approx(math.sqrt(2) / math.sqrt(1.25), rel=1e-4)
    assert results["aligned"]["base_norm"] == pytest.approx(float(torch.linalg.vector_norm(sigma)), rel=1e-5)
    assert results["aligned"]["relative_norm"] == pytest.approx(math.sqrt(2) / float(torch.linalg.vector_norm(sigma)),
                                                                rel=1e-4)


@pytest.mark.parametrize("shape,k", [((60, 50), 3), ((120, 100), 6)])
def test_random_baseline_matches_sampled_subspaces(shape: tuple[int, int], k: int) -> None:
    # proj_random is the exact sqrt(E ||U^T W V||_F^2); sampled random subspaces must average to it.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, shape[1], dtype=torch.float64)
    upd = lowrank_svd(torch.randn(shape[0], k, generator=g), torch.randn(k, shape[1], generator=g))
    exact = amplification(w, upd)["proj_random"]
    sampled = random_projection_norm(w, k, draws=300, seed=1)
    assert exact == pytest.approx(sampled, rel=0.05)


# ---- base weight lookup ------------------------------------------------------------------------------------------
def test_base_weights_for_fused_parts(tmp_path) -> None:
    from lora_vision.models import build_tiny_timm_vit, build_tiny_torchvision_vit

    tv = build_tiny_torchvision_vit()
    path = write_safetensors(tmp_path / "tv.safetensors", {f"model.{k}": v for k, v in tv.state_dict().items()})
    base = BaseWeights.open(str(path))
    mha = tv.get_submodule("encoder.layers.encoder_layer_0.self_attention")
    d = mha.embed_dim
    got_k = base.weight("model.encoder.layers.encoder_layer_0.self_attention.k", d)
    assert torch.equal(got_k, mha.in_proj_weight[d:2 * d].detach())
    got_o = base.weight("model.encoder.layers.encoder_layer_0.self_attention.o", d)
    assert torch.equal(got_o, mha.out_proj.weight.detach())
    timm_vit = build_tiny_timm_vit()
    path = write_safetensors(tmp_path / "timm.safetensors", timm_vit.state_dict())
    qkv = timm_vit.get_submodule("blocks.0.attn.qkv").weight.detach()
    third = qkv.shape[0] // 3
    assert torch.equal(BaseWeights.open(str(path)).weight("model.blocks.0.attn.qkv.v", third), qkv[2 * third:])
    assert BaseWeights.open(str(path)).weight("model.blocks.0.attn.nothing", third) is None


def test_layer_keys_split_into_block_and_kind() -> None:
    assert split_block_kind("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0") == (
        "unet", "down_blocks.1.attentions.0.transformer_blocks.0", "attn2.to_out.0")
    assert split_block_kind("unet.up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2")[2] == "ff.net.2"
    assert split_block_kind("unet.down_blocks.0.attentions.1.proj_in")[1:] == ("down_blocks.0.attentions.1",
                                                                               "proj_in")
    assert split_block_kind("text_encoder.encoder.layers.3.self_attn.q_proj") == (
        "text_encoder", "encoder.layers.3", "self_attn.q_proj")
    assert split_block_kind("model.encoder.layers.encoder_layer_2.self_attention.q")[1:] == (
        "encoder.layers.encoder_layer_2", "self_attention.q")


# ---- the command ---------------------------------------------------------------------------------------------------
def _png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_cli_writes_report_pngs_and_suggested_ranks(tmp_path, capsys) -> None:
    a0, b0, _, _ = _planted(N_OUT, N_IN, (2.0, 1.0), RANK, seed=51, noise=1e-4)
    a2, b2, _, _ = _planted(10, 54, (3.0, 1.0, 1.0), RANK, seed=52, noise=1e-4)
    f1 = _adapter(_model(), {"0": (a0, b0), "2": (a2, b2)}).save(tmp_path / "one.safetensors")
    f2 = _adapter(_model(), {"0": (a0 * 2, b0), "2": (a2, b2 * 3)}).save(tmp_path / "two.safetensors")
    base = write_safetensors(tmp_path / "base.safetensors", _model().state_dict())
    out = tmp_path / "out"
    assert main(["analyze", str(f1), str(f2), "-o", str(out), "--base", str(base), "--suggest-rank", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "one: 2 layers" in printed and "wrote" in printed
    report = json.loads((out / "report.json").read_text())
    assert [a["label"] for a in report["adapters"]] == ["one", "two"]
    assert report["adapters"][0]["layers"]["model.2"]["rank_99"] == 3
    assert report["similarity"]["layers"]["model.0"]["phi"][1][1] == pytest.approx(1.0, abs=1e-4)
    assert json.loads((out / "suggested_ranks.json").read_text()) == {"model.0": 2, "model.2": 3}
    for name in ("update_norm", "spectra", "amplification", "update_norm_2", "spectra_2", "amplification_2",
                 "similarity", "similarity_layers"):
        assert _png(out / f"{name}.png"), name
    # suggested_ranks.json feeds `lora-vision resize --ranks`; it agrees with resize's own --energy 0.99.
    for flag, value in (("--ranks", str(out / "suggested_ranks.json")), ("--energy", "0.99")):
        resized = tmp_path / f"resized{flag}.safetensors"
        assert main(["resize", str(f1), flag, value, "-o", str(resized)]) == 0
        assert Adapter.load(resized).ranks() == {"model.0": 2, "model.2": 3}


def test_cli_on_a_tiny_sd_adapter_with_builtin_base(tmp_path) -> None:
    from lora_vision.models import build_tiny_sd

    pipe = build_tiny_sd("sd1")
    lv.inject_lora(pipe.unet, lv.LoRAConfig(rank=4, targets="unet-attn"))
    lv.inject_lora(pipe.text_encoder, lv.LoRAConfig(rank=4, targets="clip-attn"))
    torch.manual_seed(0)
    for p in lv.lora_parameters(pipe.unet) + lv.lora_parameters(pipe.text_encoder):
        p.data.normal_(std=0.05)
    f = Adapter.from_models({"unet": pipe.unet, "text_encoder": pipe.text_encoder}).save(tmp_path / "sd.safetensors")
    out = tmp_path / "out"
    assert main(["analyze", str(f), "-o", str(out), "--base", "tiny-sd1", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    layers = report["adapters"][0]["layers"]
    assert "base_missing" not in report["adapters"][0]
    assert all(v["relative_norm"] > 0 for v in layers.values())
    # The base norm is the norm of the weight the pipeline really has.
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    w = pipe.unet.get_submodule(key[5:]).base.weight  # the frozen weight under the LoRA wrapper
    assert layers[key]["base_norm"] == pytest.approx(float(w.detach().double().norm()), rel=1e-5)
    assert _png(out / "update_norm.png") and _png(out / "amplification.png") and not (out / "similarity.png").exists()
    # A saved pipeline folder as --base reads the same weights (lazily, from its safetensors files).
    from lora_vision.models import save_tiny_sd

    folder = save_tiny_sd(tmp_path / "pipe", "sd1")
    assert main(["analyze", str(f), "-o", str(tmp_path / "fo"), "--base", str(folder), "--no-plots", "--quiet"]) == 0
    f_layers = json.loads((tmp_path / "fo" / "report.json").read_text())["adapters"][0]["layers"]
    assert {k: v["base_norm"] for k, v in f_layers.items()} == {k: v["base_norm"] for k, v in layers.items()}
    # A kohya export of the same adapter is read through lora_vision.formats and gives the same numbers.
    from lora_vision.formats import export

    kohya = export(Adapter.load(f), "kohya", tmp_path / "sd_kohya.safetensors", dtype=torch.float32)
    assert main(["analyze", str(kohya), "-o", str(tmp_path / "k"), "--no-plots", "--quiet"]) == 0
    k_layers = json.loads((tmp_path / "k" / "report.json").read_text())["adapters"][0]["layers"]
    assert set(k_layers) == set(layers)
    for name, v in layers.items():
        assert k_layers[name]["singular_values"] == pytest.approx(v["singular_values"], rel=1e-5, abs=1e-7)


def test_cli_errors_are_one_clear_line(tmp_path, capsys) -> None:
    assert main(["analyze", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "o")]) == 1
    assert "no such file" in capsys.readouterr().err
    a, b, _, _ = _planted(N_OUT, N_IN, (1.0,), RANK, seed=61)
    f = _adapter(_model(), {"0": (a, b)}).save(tmp_path / "x.safetensors")
    wrong = write_safetensors(tmp_path / "wrong.safetensors", {"0.weight": torch.zeros(3, 3)})
    assert main(["analyze", str(f), "-o", str(tmp_path / "o"), "--base", str(wrong), "--no-plots"]) == 1
    assert "base weight is 3 x 3" in capsys.readouterr().err
    other = write_safetensors(tmp_path / "other.safetensors", {"foo.weight": torch.zeros(3, 3)})
    assert main(["analyze", str(f), "-o", str(tmp_path / "o"), "--base", str(other), "--no-plots"]) == 1
    assert "has none of the" in capsys.readouterr().err


def test_peft_folder_of_a_vit_adapter_gives_the_same_numbers(tmp_path) -> None:
    from lora_vision.formats import export
    from lora_vision.models import build_tiny_hf_vit

    vit = build_tiny_hf_vit()
    lv.inject_lora(vit, lv.LoRAConfig(rank=4, targets="hf-vit-attn"))
    torch.manual_seed(0)
    for p in lv.lora_parameters(vit):
        p.data.normal_(std=0.1)
    native = Adapter.from_models({"model": vit}).save(tmp_path / "vit.safetensors")
    peft_dir = export(Adapter.load(native), "peft", tmp_path / "vit_peft")
    assert main(["analyze", str(native), str(peft_dir), "-o", str(tmp_path / "o"), "--no-plots", "--quiet"]) == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    a, b = (ad["layers"] for ad in report["adapters"])
    assert set(a) == set(b) and len(a) == 8
    for key in a:
        assert b[key]["singular_values"] == pytest.approx(a[key]["singular_values"], rel=1e-5)
        assert report["similarity"]["layers"][key]["phi_diag"][-1] == pytest.approx(1.0, abs=1e-4)


def test_base_weights_find_t5_linears_named_q_and_attention_parts():
    """The base weight of `…SelfAttention.q` is T5's Linear of that name (it used to be looked up as the q part of a
    fused `SelfAttention` and not found); torchvision's attention parts still take their block of in_proj_weight."""
    from transformers import T5Config, T5EncoderModel

    from lora_vision.analysis.sources import BaseWeights
    from lora_vision.models.tiny import build_tiny_torchvision_vit

    t5 = T5EncoderModel(T5Config(vocab_size=40, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
                                 relative_attention_num_buckets=8, is_encoder_decoder=False))
    vit = build_tiny_torchvision_vit(4, 32, 0)
    base = BaseWeights("test", {"text_encoder_2": t5.state_dict().get, "model": vit.state_dict().get})
    q = t5.encoder.block[0].layer[0].SelfAttention.q.weight
    assert torch.equal(base.weight("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q", 32), q)
    attn = vit.encoder.layers[0].self_attention
    assert torch.equal(base.weight("model.encoder.layers.encoder_layer_0.self_attention.k", 32),
                       attn.in_proj_weight[32:64])
    assert torch.equal(base.weight("model.encoder.layers.encoder_layer_0.self_attention.o", 32),
                       attn.out_proj.weight)
    assert base.weight("model.encoder.layers.encoder_layer_0.self_attention.x", 32) is None
