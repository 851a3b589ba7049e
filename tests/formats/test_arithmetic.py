"""resize / merge / extract against constructions with known answers, the low-rank SVD against the dense one, and
the CLI subcommands end to end on tiny models."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from lora_vision.adapter import Adapter
from lora_vision.cli import main
from lora_vision.formats import load_any
from lora_vision.lora.ops import parse_canonical
from lora_vision.arithmetic import extract, lowrank_svd, merge_adapters, resize


def _orth(n, k, g):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q


def planted(out=24, inp=16, s=(3.0, 1.0), rank=6, seed=0, conv=False):
    """Canonical entry whose update has exactly the singular values `s`, stored at a larger rank."""
    g = torch.Generator().manual_seed(seed)
    u, v = _orth(out, len(s), g), _orth(inp * (9 if conv else 1), len(s), g)
    mix = _orth(rank, len(s), g)  # spread the rank-len(s) product over `rank` columns
    b = (u * torch.tensor(s, dtype=torch.float64)) @ mix.T
    a = mix @ v.T
    if conv:
        a, b = a.reshape(rank, inp, 3, 3), b.reshape(out, rank, 1, 1)
    return b.float(), a.float(), (u * torch.tensor(s, dtype=torch.float64)) @ v.T


def adapter_of(pairs: dict, alpha=None) -> Adapter:
    t = {}
    for key, (b, a) in pairs.items():
        t[f"{key}.lora_A.weight"], t[f"{key}.lora_B.weight"] = a, b
        t[f"{key}.alpha"] = torch.tensor(float(alpha or a.shape[0]))
    return Adapter(t, {"lora_vision.format": "1"})


def deltas(ad: Adapter) -> dict:
    out = {}
    for comp in ad.components():
        for (m, p), e in parse_canonical(ad.state_dict_for(comp)).items():
            out[f"{comp}.{m}"] = e["B"].double().flatten(1) @ e["A"].double().flatten(1) * e["alpha"] / e["rank"]
    return out


def test_lowrank_svd_matches_dense():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(40, 5, generator=g), torch.randn(5, 30, generator=g)
    u, s, vh = lowrank_svd(b, a)
    s_dense = torch.linalg.svdvals(b.double() @ a.double())
    assert torch.allclose(s, s_dense[:5], rtol=1e-9, atol=1e-9)
    assert torch.allclose((u * s) @ vh, b.double() @ a.double(), atol=1e-9)


@pytest.mark.parametrize("conv", [False, True])
def test_resize_keeps_what_the_singular_values_say(conv):
    b, a, d = planted(conv=conv)
    ad = adapter_of({"unet.x": (b, a)})
    r2, rows = resize(ad, rank=2, progress=False)
    assert rows[0].rank_out == 2 and rows[0].kept == pytest.approx(1.0)
    assert (deltas(r2)["unet.x"] - d).abs().max() < 1e-5
    assert r2.tensors["unet.x.lora_A.weight"].dim() == (4 if conv else 2)
    r1, rows = resize(ad, rank=1, progress=False)
    assert rows[0].kept == pytest.approx(3 / math.sqrt(10), abs=1e-6)
    assert resize(ad, energy=0.85, progress=False)[1][0].rank_out == 1  # 9/10 of the energy in the first value
    assert resize(ad, energy=0.95, progress=False)[1][0].rank_out == 2
    assert resize(ad, ranks={"unet.x": 1}, progress=False)[1][0].rank_out == 1


def test_merge_exact_and_compressed():
    b1, a1, d1 = planted(seed=1, s=(2.0, 1.0), rank=3)
    b2, a2, d2 = planted(seed=2, s=(4.0,), rank=2)
    x, y = adapter_of({"unet.m": (b1, a1)}, alpha=6.0), adapter_of({"unet.m": (b2, a2), "unet.n": (b2, a2)})
    merged, rows = merge_adapters([x, y], [0.5, -1.0], progress=False)
    dd = deltas(merged)
    assert rows[0].rank_out == 5 and rows[0].kept == 1.0
    assert (dd["unet.m"] - (0.5 * 2 * d1 - d2)).abs().max() < 1e-5  # alpha 6 / rank 3 = 2
    assert (dd["unet.n"] + d2).abs().max() < 1e-5
    comp, rows = merge_adapters([x, y], [0.5, -1.0], rank=1, progress=False)
    want = 0.5 * 2 * d1 - d2
    s = torch.linalg.svdvals(want)
    assert rows[0].kept == pytest.approx(float(s[0] / s.norm()), abs=1e-6)
    u, sv, vh = torch.linalg.svd(want)
    assert (deltas(comp)["unet.m"] - sv[0] * torch.outer(u[:, 0], vh[0])).abs().max() < 1e-5


def test_extract_recovers_a_planted_rank_2_difference():
    g = torch.Generator().manual_seed(0)
    base = {"unet": {"a.weight": torch.randn(24, 16, generator=g), "c.weight": torch.randn(8, 4, 3, 3, generator=g),
                     "same.weight": torch.randn(5, 5, generator=g), "n.weight": torch.randn(7, generator=g),
                     "token_embedding.weight": torch.randn(9, 4, generator=g)}}
    tuned = {"unet": {k: v.clone() for k, v in base["unet"].items()}}
    _, _, d = planted()
    _, _, dc = planted(out=8, inp=4, conv=True)
    tuned["unet"]["a.weight"] += d.float()
    tuned["unet"]["c.weight"] += dc.float().reshape(8, 4, 3, 3)
    tuned["unet"]["n.weight"] += 1  # a norm: not a LoRA target
    tuned["unet"]["token_embedding.weight"] += 1  # an embedding: not a LoRA target
    ad, rows = extract(base, tuned, rank=4, progress=False)
    assert {r.module: (r.rank_out, round(r.kept, 6)) for r in rows} == {"unet.a": (2, 1.0), "unet.c": (2, 1.0)}
    dd = deltas(ad)
    assert (dd["unet.a"] - d).abs().max() < 1e-5 and (dd["unet.c"] - dc).abs().max() < 1e-5
    assert ad.tensors["unet.c.lora_A.weight"].shape == (2, 4, 3, 3)


def test_cli_commands_end_to_end(tmp_path, capsys):
    from conftest import make_sd_adapter
    from lora_vision.models import save_tiny_sd

    src = tmp_path / "a.safetensors"
    make_sd_adapter("sd1", unet_targets="unet-attn").save(src)
    assert main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert "format:     lora_vision" in out and "sks toy" in out and "unet: 48 modules" in out
    assert main(["convert", str(src), "--to", "kohya", "-o", str(tmp_path / "k.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "k.safetensors"), "--to", "diffusers", "-o",
                 str(tmp_path / "d.safetensors")]) == 0
    assert main(["resize", str(tmp_path / "d.safetensors"), "--rank", "2", "-o", str(tmp_path / "r.safetensors")]) == 0
    assert "kept" in capsys.readouterr().out
    assert main(["merge", str(src), str(tmp_path / "k.safetensors"), "--weights", "1", "-1", "--rank", "1",
                 "-o", str(tmp_path / "m.safetensors")]) == 0
    merged, _ = load_any(tmp_path / "m.safetensors")
    assert max(v.abs().max().item() for v in deltas(merged).values()) < 2e-3  # a - a (fp16 copy) ~ 0

    base = save_tiny_sd(tmp_path / "base", "sd1")
    tuned = tmp_path / "tuned"
    shutil.copytree(base, tuned)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tuned / "unet")
    _, _, d = planted(out=32, inp=32, s=(0.5, 0.25))
    with torch.no_grad():
        unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight += d.float()
    unet.save_pretrained(tuned / "unet")
    assert main(["extract", "--base", str(base), "--tuned", str(tuned), "--rank", "4", "-o",
                 str(tmp_path / "x.safetensors"), "--to", "kohya", "--family", "sd1", "--dtype", "fp32"]) == 0
    ex, report = load_any(tmp_path / "x.safetensors")
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert report.matched == [key] and (deltas(ex)[key] - d).abs().max() < 1e-5

    out_dir = tmp_path / "merged_pipe"
    assert main(["merge", str(src), "--into", "tiny-sd1", "--weights", "0.5", "-o", str(out_dir)]) == 0
    assert (out_dir / "model_index.json").is_file()


def test_extract_torchvision_attention_and_apply():
    from lora_vision.models import build_tiny_torchvision_vit

    base, tuned = build_tiny_torchvision_vit(), build_tiny_torchvision_vit()
    name = "encoder.layers.encoder_layer_1.self_attention"
    _, _, dq = planted(out=32, inp=32, s=(0.4, 0.2), seed=3)
    _, _, do = planted(out=32, inp=32, s=(0.3,), seed=4)
    with torch.no_grad():
        tuned.get_submodule(name).in_proj_weight[:32] += dq.float()  # the q block only
        tuned.get_submodule(name).out_proj.weight += do.float()
        tuned.get_submodule("encoder.layers.encoder_layer_0.mlp.0").weight += dq.float()[:, :32].repeat(37 // 32 + 1,
                                                                                                        1)[:37]
    ad, rows = extract({"model": base.state_dict()}, {"model": tuned.state_dict()}, rank=4, progress=False)
    assert {r.module: r.rank_out for r in rows} == {f"model.{name}.q": 2, f"model.{name}.o": 1,
                                                    "model.encoder.layers.encoder_layer_0.mlp.0": 2}
    ad.apply_to({"model": base})
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (base(x) - tuned(x)).abs().max() < 1e-5
