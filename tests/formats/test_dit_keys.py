"""DiT key dialects (lora_vision/formats/dit_keys.py): every spelling of Flux.1, Flux.2, SD 3.x, Qwen-Image and
Z-Image LoRA files maps to the live diffusers modules (checked against diffusers' own converters where it has one),
the ComfyUI export round-trips exactly and its keys are pinned, and bad files are named."""

from __future__ import annotations

import warnings
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers.loaders import lora_conversion_utils as luc
from safetensors.torch import load_file, save_file

from lora_vision import LoRAConfig, inject_lora
from lora_vision.adapter import Adapter
from lora_vision.formats import BaseMismatchError, detect_format, export, load_any
from lora_vision.io import AdapterFileError

GOLDEN = Path(__file__).parent / "dit_golden"

# Small configs of the real classes (every module kind of each family, width 16).
CONFIGS = {
    "flux1": ("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True, axes_dims_rope=(2, 2, 4))),
    "flux2": ("Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, timestep_guidance_channels=8, axes_dims_rope=(2, 2, 2, 2))),
    "sd3": ("SD3Transformer2DModel", dict(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
        pos_embed_max_size=8, dual_attention_layers=(0,))),
    "qwen-image": ("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, axes_dims_rope=(2, 2, 4))),
    "z-image": ("ZImageTransformer2DModel", dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=12, axes_dims=[2, 2, 4], axes_lens=[16, 16, 16])),
}
FAMILIES = list(CONFIGS)


def build(family: str, **overrides) -> torch.nn.Module:
    cls, cfg = CONFIGS[family]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, cls)(**{**cfg, **overrides})


def random_adapter(family: str, seed: int = 1, rank: int = 2, alpha: float = 3.0, targets=("re:.*",),
                   **overrides) -> Adapter:
    """A random adapter on every Linear/Conv2d of the tiny model (each module its own A)."""
    m = build(family, **overrides)
    inject_lora(m, LoRAConfig(rank=rank, alpha=alpha, targets=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return Adapter.from_models({"transformer": m})


def assert_same_deltas(a: Adapter, b: Adapter, tol: float = 1e-6) -> None:
    la, lb = a.layers("transformer"), b.layers("transformer")
    assert set(la) == set(lb), sorted(set(la) ^ set(lb))[:5]
    for k in la:
        torch.testing.assert_close(lb[k].delta(), la[k].delta(), atol=tol, rtol=0, msg=k)


def deltas_of_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-module B @ A of a state dict diffusers' converters return (alpha already folded into A and B)."""
    out = {}
    for k, a in sd.items():
        if k.endswith(".lora_A.weight"):
            name = k[: -len(".lora_A.weight")].removeprefix("transformer.")
            out[name] = sd[k.replace(".lora_A.", ".lora_B.")].float() @ a.float()
    return out


def assert_matches_diffusers(ours: Adapter, theirs: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    layers = ours.layers("transformer")
    want = {k: v for k, v in deltas_of_diffusers(theirs).items() if k not in skip}
    assert set(want) == set(layers) - set(skip)
    for k, d in want.items():
        torch.testing.assert_close(layers[k].delta().float(), d, atol=1e-6, rtol=0, msg=k)


def kohya_file(adapter: Adapter, tmp_path: Path, family: str, name: str = "k") -> Path:
    return export(adapter, "kohya", tmp_path / f"{name}.safetensors", base=family, dtype=torch.float32)


# ---- export: golden keys, round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_golden_keys(family, tmp_path):
    path = kohya_file(random_adapter(family), tmp_path, family)
    sd = load_file(path)
    modules = sorted({k.split(".", 1)[0] for k in sd})
    assert modules == (GOLDEN / f"{family}.txt").read_text().split()
    assert {k.split(".", 1)[1] for k in sd} == {"lora_down.weight", "lora_up.weight", "alpha"}
    assert len(sd) == 3 * len(modules)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_exact(family, tmp_path):
    """Own A per part: stacked A and block-diagonal B in the file, split back into the same layers and ranks."""
    adapter = random_adapter(family)
    back, report = load_any(kohya_file(adapter, tmp_path, family), models={"transformer": build(family)},
                            strict=True)
    assert report.base == family and report.format == "kohya"
    assert_same_deltas(adapter, back)
    assert back.ranks() == adapter.ranks()
    assert back.info.base == family


@pytest.mark.parametrize("family", ["flux1", "sd3", "z-image"])
def test_fused_file_round_trips_bit_exact(family, tmp_path):
    """A file with one lora_down per fused qkv (what kohya trains) is read as parts sharing A and written back
    as the same tensors."""
    adapter = random_adapter(family)
    first = load_file(kohya_file(adapter, tmp_path, family, "a"))
    g = torch.Generator().manual_seed(5)
    shared = {k: (torch.randn(v.shape, generator=g) if k.endswith("lora_down.weight") else v)
              for k, v in first.items()}  # fused modules: one A of the stacked rank for all parts
    for k in list(shared):
        if k.endswith("lora_up.weight"):
            shared[k] = torch.randn(shared[k].shape, generator=g) * 0.1  # dense B: not block-diagonal
    save_file(shared, tmp_path / "shared.safetensors")
    back, report = load_any(tmp_path / "shared.safetensors", models={"transformer": build(family)}, strict=True)
    assert report.split
    again = load_file(export(back, "kohya", tmp_path / "again.safetensors", base=family, dtype=torch.float32))
    assert set(again) == set(shared)
    for k in shared:
        torch.testing.assert_close(again[k], shared[k], atol=0, rtol=0, msg=k)


def test_missing_parts_are_zero_rows_and_left_out_on_import(tmp_path):
    """Only q and v of a fused qkv adapted: k's rows are zero in the file and k stays unadapted when read back."""
    adapter = random_adapter("flux1", targets=("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v"))
    back, report = load_any(kohya_file(adapter, tmp_path, "flux1"), models={"transformer": build("flux1")})
    assert_same_deltas(adapter, back)
    assert report.split == ["lora_unet_double_blocks_0_img_attn_qkv -> to_q, to_v"]


# ---- every dialect ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefix,down,up", [
    ("transformer.", "lora_A.weight", "lora_B.weight"),                 # diffusers / ai-toolkit / SimpleTuner
    ("base_model.model.", "lora_A.weight", "lora_B.weight"),            # PEFT
    ("", "lora_A.default.weight", "lora_B.default.weight"),             # DiffSynth (Qwen-Image), bare PEFT
    ("transformer.", "lora.down.weight", "lora.up.weight"),             # older diffusers
    ("lora_transformer_", "lora_down.weight", "lora_up.weight"),        # OneTrainer
    ("lycoris_", "lora_down.weight", "lora_up.weight"),                 # SimpleTuner LyCORIS
    ("lora_unet_", "lora_down.weight", "lora_up.weight"),               # musubi-tuner (Qwen-Image, Z-Image)
])
def test_diffusers_names_in_every_prefix(family, prefix, down, up):
    adapter = random_adapter(family)
    raw = {}
    for key, t in adapter.tensors.items():
        body = key.removeprefix("transformer.")
        for ours, theirs in ((".lora_A.weight", down), (".lora_B.weight", up), (".alpha", "alpha")):
            if body.endswith(ours):
                mod = body[: -len(ours)]
                raw[f"{prefix}{mod.replace('.', '_') if prefix.endswith('_') else mod}.{theirs}"] = t
    back, report = load_any(raw, models={"transformer": build(family)}, strict=True)
    assert_same_deltas(adapter, back)
    assert not report.split


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prefix,down,up", [
    ("diffusion_model.", "lora_A.weight", "lora_B.weight"),             # ComfyUI / ai-toolkit (BFL names)
    ("diffusion_model.", "lora_down.weight", "lora_up.weight"),
    ("transformer.", "lora_A.weight", "lora_B.weight"),
    ("", "lora_A.weight", "lora_B.weight"),                             # BFL's own
])
def test_native_names_in_every_prefix(family, prefix, down, up, tmp_path):
    from lora_vision.formats.dit_keys import _native_rows
    from lora_vision.formats.dit_tables import FAMILIES as TABLES

    adapter = random_adapter(family)
    sd = load_file(kohya_file(adapter, tmp_path, family))
    native = {n.format(i).replace(".", "_"): n.format(i) for _g, n, _l, _s in _native_rows(TABLES[family])
              for i in ("", "0", "1")}
    raw = {}
    for k, v in sd.items():
        mod, _, suffix = k.partition(".")
        dotted = native[mod.removeprefix("lora_unet_")]
        raw[f"{prefix}{dotted}." + {"lora_down.weight": down, "lora_up.weight": up}.get(suffix, suffix)] = v
    back, report = load_any(raw, models={"transformer": build(family)}, strict=True)
    assert_same_deltas(adapter, back)


# ---- against diffusers' converters ------------------------------------------------------------------------------

def _random_file(names: dict[str, tuple[int, int]], rank: int = 4, seed: int = 0, alpha: float | None = 3.0,
                 down: str = ".lora_down.weight", up: str = ".lora_up.weight") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (rows, cols) in names.items():
        out[name + down] = torch.randn(rank, cols, generator=g)
        out[name + up] = torch.randn(rows, rank, generator=g) * 0.1
        if alpha is not None:
            out[name + ".alpha"] = torch.tensor(alpha)
    return out


def _native_shapes(family: str, model: torch.nn.Module, prefix: str, dotted: bool) -> dict[str, tuple[int, int]]:
    """Every native module of the model with its (rows, inputs): fused rows summed over the parts."""
    from lora_vision.formats.dit_keys import _native_rows
    from lora_vision.formats.dit_tables import FAMILIES as TABLES

    mods = dict(model.named_modules())
    n_blocks = {"transformer_blocks": len(getattr(model, "transformer_blocks", [])),
                "single_transformer_blocks": len(getattr(model, "single_transformer_blocks", [])),
                "layers": len(getattr(model, "layers", [])), "noise_refiner": len(getattr(model, "noise_refiner", [])),
                "context_refiner": len(getattr(model, "context_refiner", []))}
    out = {}
    for group, native_t, live_t, _swap in _native_rows(TABLES[family]):
        for i in (range(n_blocks[group]) if group else [""]):
            lives = [x.format(i) for x in live_t]
            if not all(n in mods for n in lives):
                continue
            w = [mods[n].weight for n in lives]
            if w[0].dim() != 2:
                continue
            name = native_t.format(i)
            out[prefix + (name if dotted else name.replace(".", "_"))] = (sum(x.shape[0] for x in w), w[0].shape[1])
    return out


def test_kohya_flux1_matches_diffusers_at_real_width():
    """diffusers' kohya Flux.1 converter has the real widths built in (linear1 = 3 x 3072 + 12288), so this one runs
    on a full-width Flux.1 with one block of each kind, built on the meta device (shapes only)."""
    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    raw = _random_file(_native_shapes("flux1", model, "lora_unet_", dotted=False))
    for m in ("final_layer_linear", "final_layer_adaLN_modulation_1"):  # diffusers drops these two alphas
        raw[f"lora_unet_{m}.alpha"] = torch.tensor(4.0)
    ours, report = load_any(dict(raw), models={"transformer": model}, strict=True)
    theirs = luc._convert_kohya_flux_lora_to_diffusers(dict(raw))
    layers = ours.layers("transformer")
    probe = torch.randn(3072, 3, generator=torch.Generator().manual_seed(0))
    want = {k.removeprefix("transformer.")[: -len(".lora_A.weight")]: (theirs[k], theirs[k.replace("_A.", "_B.")])
            for k in theirs if k.endswith(".lora_A.weight")}
    assert set(want) == set(layers)
    for name, (a, b) in want.items():
        x = probe[: a.shape[1]] if a.shape[1] <= 3072 else torch.randn(a.shape[1], 3)
        spec = layers[name]
        x = x.double()  # sums over 3072 inputs: float64 so that only the factors' own rounding remains
        want_x = b.double() @ (a.double() @ x)
        torch.testing.assert_close(spec.scaling * (spec.B.double() @ (spec.A.double() @ x)), want_x,
                                   atol=1e-6 * float(want_x.abs().max()), rtol=0, msg=name)
    assert "lora_unet_single_blocks_0_linear1 -> to_q, to_k, to_v, proj_mlp" in report.split


def test_xlabs_flux1_matches_diffusers():
    model = build("flux1")
    names = {}
    for i in range(2):
        names.update({f"double_blocks.{i}.processor.qkv_lora1": (48, 16), f"double_blocks.{i}.processor.qkv_lora2":
                      (48, 16), f"double_blocks.{i}.processor.proj_lora1": (16, 16),
                      f"double_blocks.{i}.processor.proj_lora2": (16, 16)})
    raw = _random_file(names, alpha=None, down=".down.weight", up=".up.weight")
    assert detect_format(raw) == "xlabs"
    ours, report = load_any(dict(raw), models={"transformer": model}, strict=True)
    assert report.format == "xlabs"
    assert_matches_diffusers(ours, luc._convert_xlabs_flux_lora_to_diffusers(dict(raw)))


def test_diffsynth_flux1_names():
    adapter = random_adapter("flux1", targets=("re:.*transformer_blocks.*",))
    tmp = {}  # DiffSynth fuses q, k, v (and the single blocks' MLP input): built from our fused modules
    from lora_vision.formats.dit_keys import fuse_tensors
    from lora_vision.formats.dit_tables import DIFFSYNTH
    fused = fuse_tensors(adapter, "flux1")
    native_to_ds = {}
    for g_ds in DIFFSYNTH:
        for r in g_ds.rows:
            for i in range(2):
                bfl = _bfl_name(g_ds.native, r.live, i)
                if bfl is not None:
                    native_to_ds[bfl] = f"{g_ds.native}.{i}.{r.native}"
    for native, (a, b, alpha) in fused.items():
        if native in native_to_ds:
            ds = native_to_ds[native]
            tmp[f"{ds}.lora_A.default.weight"], tmp[f"{ds}.lora_B.default.weight"] = a, b
            tmp[f"{ds}.alpha"] = torch.tensor(alpha)
    assert detect_format(tmp) == "diffsynth"
    back, report = load_any(tmp, models={"transformer": build("flux1")}, strict=True)
    assert report.format == "diffsynth"
    assert_same_deltas(adapter, back)


def _bfl_name(ds_group: str, live: tuple[str, ...], i: int) -> str | None:
    from lora_vision.formats.dit_tables import FLUX1
    for g in FLUX1.groups:
        if (g.native == "double_blocks") == (ds_group == "blocks"):
            for r in g.rows:
                if r.live == live:
                    return f"{g.native}.{i}.{r.native}"
    return None


@pytest.mark.parametrize("down,up", [("lora_A.weight", "lora_B.weight"), ("lora_down.weight", "lora_up.weight")])
def test_comfy_flux2_matches_diffusers(down, up):
    """ai-toolkit / ComfyUI Flux.2 files (`diffusion_model.` + BFL names). diffusers' converter leaves
    final_layer.adaLN_modulation.1 unswapped although Flux.2's norm_out is (scale, shift) and BFL's (shift, scale)
    (its single-file loader swaps it), so that one module is compared in the test below instead."""
    model = build("flux2")
    names = _native_shapes("flux2", model, "diffusion_model.", dotted=True)
    names.pop("diffusion_model.final_layer.adaLN_modulation.1")
    raw = _random_file(names, alpha=None, down="." + down, up="." + up)
    ours, _ = load_any(dict(raw), models={"transformer": model}, strict=True)
    assert_matches_diffusers(ours, luc._convert_non_diffusers_flux2_lora_to_diffusers(dict(raw)))


def test_final_layer_modulation_swaps_shift_and_scale():
    """BFL / MMDiT final_layer.adaLN_modulation.1 gives (shift, scale); diffusers' norm_out.linear (scale, shift).
    alpha = rank here: diffusers' kohya Flux.1 converter drops this module's alpha (its other modules keep it)."""
    raw = _random_file({"lora_unet_final_layer_adaLN_modulation_1": (32, 16)}, alpha=4.0)
    ours, _ = load_any(dict(raw), models={"transformer": build("flux1")})
    theirs = luc._convert_kohya_flux_lora_to_diffusers(dict(raw))
    d = ours.layers("transformer")["norm_out.linear"].delta()
    torch.testing.assert_close(d, deltas_of_diffusers(theirs)["norm_out.linear"], atol=1e-6, rtol=0)
    native = raw["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"] @ raw[
        "lora_unet_final_layer_adaLN_modulation_1.lora_down.weight"]
    torch.testing.assert_close(d[:16], native[16:], atol=1e-6, rtol=0)


def test_kohya_flux2_matches_diffusers():
    model = build("flux2")
    names = _native_shapes("flux2", model, "lora_unet_", dotted=False)
    names = {k: v for k, v in names.items() if "_blocks_" in k}  # diffusers maps the blocks and five top modules
    raw = _random_file(names)
    ours, report = load_any(dict(raw), models={"transformer": model}, strict=True)
    assert report.base == "flux2"  # same names as Flux.1: told apart by the MLP widths (6 x hidden, not 4)
    assert_matches_diffusers(ours, luc._convert_kohya_flux2_lora_to_diffusers(dict(raw)))


@pytest.mark.parametrize("prefix,dotted", [("lora_unet_", False), ("diffusion_model.", True)])
def test_qwen_image_matches_diffusers(prefix, dotted):
    model = build("qwen-image")
    raw = _random_file(_native_shapes("qwen-image", model, prefix, dotted))
    ours, report = load_any(dict(raw), models={"transformer": model}, strict=True)
    assert report.base == "qwen-image"
    assert_matches_diffusers(ours, luc._convert_non_diffusers_qwen_lora_to_diffusers(dict(raw)))


def test_z_image_split_names_match_diffusers():
    """musubi-style `lora_unet_layers_0_attention_to_q` (split q/k/v)."""
    model = build("z-image")
    names = {f"lora_unet_{n.replace('.', '_')}": tuple(m.weight.shape) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and ("layers." in n or "refiner." in n)}
    raw = _random_file(names)
    ours, _ = load_any(dict(raw), models={"transformer": model}, strict=True)
    assert_matches_diffusers(ours, luc._convert_non_diffusers_z_image_lora_to_diffusers(dict(raw)))


def test_z_image_fused_qkv_matches_diffusers():
    """Fused `layers.N.attention.qkv` in the dotted `.lora.down.weight` spelling diffusers splits itself."""
    model = build("z-image")
    names = {f"diffusion_model.{g}.0.attention.qkv": (48, 16) for g in ("layers", "noise_refiner", "context_refiner")}
    raw = _random_file(names, down=".lora.down.weight", up=".lora.up.weight")
    ours, report = load_any(dict(raw), models={"transformer": model}, strict=True)
    assert len(report.split) == 3
    assert_matches_diffusers(ours, luc._convert_non_diffusers_z_image_lora_to_diffusers(dict(raw)))


# ---- detection and bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_family_detected_without_a_model(family, tmp_path):
    path = kohya_file(random_adapter(family), tmp_path, family)
    meta_free = load_file(path)  # names and widths only, no metadata
    back, report = load_any(meta_free)
    assert report.base == family, report
    assert detect_format(path) == "kohya"


def test_metadata_breaks_a_name_tie():
    """Attention-only diffusers names fit Flux.1, SD3 and Qwen-Image alike: the metadata decides, else a note."""
    adapter = random_adapter("qwen-image", targets=("re:.*attn\\.to_[qkv]",))
    raw = {k: v for k, v in adapter.tensors.items()}
    _, report = load_any(raw, metadata={"modelspec.architecture": "qwen-image/lora"})
    assert report.base == "qwen-image"
    _, report = load_any(raw)
    assert any("alike" in n for n in report.notes)


def test_file_of_another_family_is_refused(tmp_path):
    path = kohya_file(random_adapter("flux1"), tmp_path, "flux1")
    for strict in (False, True):
        with pytest.raises(BaseMismatchError, match="Flux.1 LoRA but the transformer given is Qwen-Image"):
            load_any(path, models={"transformer": build("qwen-image")}, strict=strict)


def test_file_of_another_size_is_refused(tmp_path):
    """A Flux.2 file of hidden size 16 on a Flux.2 of hidden size 24 (as Flux.2-klein 4B vs 9B)."""
    path = kohya_file(random_adapter("flux2"), tmp_path, "flux2")
    with pytest.raises(BaseMismatchError, match=r"another base model.*hidden size: file 16, model 24"):
        load_any(path, models={"transformer": build("flux2", num_attention_heads=3)})


def test_qkv_that_does_not_split_is_named(tmp_path):
    raw = _random_file({"lora_unet_double_blocks_0_img_attn_qkv": (50, 16),
                        "lora_unet_double_blocks_0_img_attn_proj": (16, 16)})
    adapter, report = load_any(dict(raw), models={"transformer": build("flux1")})
    assert report.unsupported == ["lora_unet_double_blocks_0_img_attn_qkv (50 rows do not split into 16 + 16 + 16 "
                                  "(to_q, to_k, to_v))"]
    assert list(adapter.layers("transformer")) == ["transformer_blocks.0.attn.to_out.0"]
    with pytest.raises(AdapterFileError, match="(?s)strict load failed.*50 rows do not split"):
        load_any(dict(raw), models={"transformer": build("flux1")}, strict=True)


def test_keys_that_map_to_nothing_are_named(tmp_path):
    raw = _random_file({"lora_unet_double_blocks_0_img_attn_proj": (16, 16),
                        "lora_unet_double_blocks_0_txt_attn_proj": (16, 16),
                        "lora_unet_double_blocks_1_img_attn_proj": (16, 16),
                        "lora_unet_double_blocks_0_img_attn_bogus": (16, 16),
                        "lora_unet_double_blocks_7_img_attn_proj": (16, 16)})
    raw["lora_unet_double_blocks_0_img_attn_proj.dora_scale"] = torch.ones(1, 16)
    adapter, report = load_any(dict(raw), models={"transformer": build("flux1")})
    assert sorted(report.not_found) == ["transformer.lora_unet_double_blocks_0_img_attn_bogus",
                                        "transformer.lora_unet_double_blocks_7_img_attn_proj"]
    # A DoRA magnitude next to a LoRA pair is applied as LoRA+DoRA (adapter kinds go through the DiT maps).
    assert report.unsupported == [] and report.kinds == {"LoRA+DoRA": 1}
    with pytest.raises(AdapterFileError, match="strict load failed"):
        load_any(dict(raw), models={"transformer": build("flux1")}, strict=True)


def test_text_encoder_keys_go_to_the_clip_importer(tmp_path):
    adapter = random_adapter("flux1", targets=("transformer_blocks.0.attn.to_q",))
    raw = load_file(kohya_file(adapter, tmp_path, "flux1"))
    raw["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.randn(2, 768)
    raw["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.randn(768, 2)
    out, report = load_any(raw)
    assert out.components() == ["transformer", "text_encoder"]
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in report.matched or \
        "text_encoder.encoder.layers.0.self_attn.q_proj" in report.matched


@pytest.mark.parametrize("name,comp,keys", [
    ("tiny-flux", "text_encoder_2", ("lora_te2_encoder_block_0_layer_0_SelfAttention_{}",
                                     "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.{}")),
    ("tiny-sd3", "text_encoder_3", ("lora_te3_encoder_block_0_layer_0_SelfAttention_{}",
                                    "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.{}")),
])
def test_t5_text_encoder_keys_load_into_the_pipelines_t5(name, comp, keys):
    """kohya (lora_te2_ on Flux.1, lora_te3_ on SD 3.x) and ComfyUI (text_encoders.t5xxl) T5 keys, including the
    T5 modules named q / k / v, reach the T5 encoder like the core API applies them."""
    import copy

    from lora_vision.adapter import Adapter
    from lora_vision.models import build_tiny_dit
    from lora_vision.pipeline import load_adapter, unload_adapter

    pipe = build_tiny_dit(name)
    te = getattr(pipe, comp)
    gen = torch.Generator().manual_seed(0)
    factors = {}
    for part in ("q", "v", "o"):
        w = te.encoder.block[0].layer[0].SelfAttention.get_submodule(part).weight
        factors[part] = (torch.randn(2, w.shape[1], generator=gen), torch.randn(w.shape[0], 2, generator=gen))
    ref = copy.deepcopy(te)
    canonical = {}
    for part, (a, b) in factors.items():
        canonical[f"{comp}.encoder.block.0.layer.0.SelfAttention.{part}.lora_A.weight"] = a
        canonical[f"{comp}.encoder.block.0.layer.0.SelfAttention.{part}.lora_B.weight"] = b
    Adapter(canonical).apply_to({comp: ref}, strength=0.5)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        want = ref(ids).last_hidden_state
        plain = te(ids).last_hidden_state
    assert not torch.allclose(want, plain)
    proj = pipe.transformer.transformer_blocks[0].attn.to_out[0].weight
    native = "double_blocks_0_img_attn_proj" if name == "tiny-flux" else "joint_blocks_0_x_block_attn_proj"
    for template in keys:  # files carry transformer modules too (that is how they are told to be DiT files)
        sd = {f"lora_unet_{native}.lora_down.weight": torch.randn(2, proj.shape[1], generator=gen),
              f"lora_unet_{native}.lora_up.weight": torch.randn(proj.shape[0], 2, generator=gen)}
        for part, (a, b) in factors.items():
            sd[f"{template.format(part)}.lora_down.weight"] = a
            sd[f"{template.format(part)}.lora_up.weight"] = b
            sd[f"{template.format(part)}.alpha"] = torch.tensor(2.0)
        report = load_adapter(pipe, sd, name="t5", te_strength=0.5)
        assert f"{comp} 3 modules" in str(report)
        with torch.no_grad():
            torch.testing.assert_close(te(ids).last_hidden_state, want, atol=1e-5, rtol=1e-5)
        unload_adapter(pipe, "t5")
