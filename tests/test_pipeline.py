"""Adapters in tiny diffusers pipelines: runtime == fused, strengths per component and block against hand-merged
weights, switching, exact fuse/unfuse and unload, merged pipeline folders, and clear errors for bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from lora_vision import LoRAConfig, inject_lora, lora_layers
from lora_vision.adapter import Adapter
from lora_vision.io import read_safetensors
from lora_vision.models import TINY_RESOLUTION, build_tiny_sd, load_sd_pipeline
from lora_vision.pipeline import (AdapterMismatchError, active_adapters, fuse, list_adapters, load_adapter,
                                  merge_into_pipeline, set_adapter_strength, set_adapters, unfuse, unload_adapter)

TOL = 1e-4  # float32 images in [0, 1]


def make_adapter(kind: str, seed: int) -> Adapter:
    """A random adapter on every UNet layer kind (attention, ff, proj, resnet and sampler convs) and the text
    encoders."""
    pipe = build_tiny_sd(kind)
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    cfgs = {"unet": LoRAConfig(rank=4, alpha=2.0, targets="unet-locon", conv_rank=2, conv_alpha=3.0),
            "text_encoder": LoRAConfig(rank=4, alpha=8.0, targets="clip-attn-mlp")}
    if kind == "sdxl":
        comps["text_encoder_2"] = pipe.text_encoder_2
        cfgs["text_encoder_2"] = LoRAConfig(rank=2, targets="clip-attn")
    g = torch.Generator().manual_seed(seed)
    for comp, model in comps.items():
        inject_lora(model, cfgs[comp], name="x")
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = torch.randn(p.shape, generator=g) * (0.2 if "lora_B" in n else 0.5)
    return Adapter.from_models(comps, "x")


def without(adapter: Adapter, prefix: str) -> Adapter:
    return Adapter({k: v for k, v in adapter.tensors.items() if not k.startswith(prefix)}, dict(adapter.metadata))


def images(pipe) -> np.ndarray:
    return pipe("a photo of a dog", num_inference_steps=2, height=TINY_RESOLUTION, width=TINY_RESOLUTION,
                guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np").images


def new_pipe(kind: str):
    pipe = build_tiny_sd(kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, c, None) is not None for k, v in getattr(pipe, c).state_dict().items()}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models: threads only add overhead, and oversubscribed CI cores make them much slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def adapters(kind) -> tuple[Adapter, Adapter]:
    return make_adapter(kind, 1), make_adapter(kind, 2)


@pytest.fixture(scope="module")
def base_image(kind) -> np.ndarray:
    return images(new_pipe(kind))


def test_runtime_equals_fused_and_strength_zero_is_base(kind, adapters, base_image):
    pipe = new_pipe(kind)
    load_adapter(pipe, adapters[0], name="a")
    for s in (0.0, 0.5, 1.0, 1.3):
        set_adapter_strength(pipe, "a", s)
        runtime = images(pipe)
        fuse(pipe)
        fused = images(pipe)
        unfuse(pipe)
        assert np.abs(runtime - fused).max() < TOL, s
        if s == 0.0:
            assert np.abs(runtime - base_image).max() < 1e-6
            assert np.abs(fused - base_image).max() < 1e-6
        else:
            assert np.abs(runtime - base_image).max() > 1e-2  # the adapter really changes the image
    # fuse(strength=m) multiplies the current strengths, like diffusers' lora_scale
    set_adapter_strength(pipe, "a", 1.0)
    fuse(pipe, strength=0.5)
    fused_half = images(pipe)
    unfuse(pipe)
    set_adapter_strength(pipe, "a", 0.5)
    assert np.abs(images(pipe) - fused_half).max() < TOL


def _block(name: str) -> str:
    m = re.match(r"(down|up)_blocks\.(\d+)\.", name)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    return "mid" if name.startswith("mid_block.") else "other"


def test_component_and_block_strengths_match_hand_merged_weights(kind, adapters):
    strength, te, blocks = 0.7, 0.3, {"down": 0.5, "mid": 0.0, "up.1": 2.0, "other": 1.5}
    pipe = new_pipe(kind)
    load_adapter(pipe, adapters[0], name="a", strength=strength, te_strength=te,
                 block_strengths="down=0.5, mid=0, up.1=2, other=1.5")
    ref = new_pipe(kind)
    with torch.no_grad():
        for key, a in adapters[0].tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            stem = key[: -len(".lora_A.weight")]
            comp, mod = stem.split(".", 1)
            b = adapters[0].tensors[stem + ".lora_B.weight"]
            alpha = float(adapters[0].tensors[stem + ".alpha"])
            if comp == "unet":
                blk = _block(mod)
                s = strength * blocks.get(blk, blocks.get(blk.split(".")[0], 1.0))
            else:
                s = te
            w = getattr(ref, comp).get_submodule(mod).weight
            w += s * alpha / a.shape[0] * (b.flatten(1) @ a.flatten(1)).reshape(w.shape)
    assert np.abs(images(pipe) - images(ref)).max() < TOL
    fuse(pipe)
    assert np.abs(images(pipe) - images(ref)).max() < TOL


def test_zero_block_or_text_encoder_strength_equals_adapter_without_those_modules(kind, adapters):
    pipe, ref = new_pipe(kind), new_pipe(kind)
    load_adapter(pipe, adapters[0], name="a", block_strengths={"up": 0.0})
    load_adapter(ref, without(adapters[0], "unet.up_blocks."), name="a")
    assert np.abs(images(pipe) - images(ref)).max() < 1e-6
    set_adapter_strength(pipe, "a", 1.0, te_strength=0.0, block_strengths={})
    unload_adapter(ref)
    load_adapter(ref, Adapter({k: v for k, v in adapters[0].tensors.items() if k.startswith("unet.")}), name="a")
    assert np.abs(images(pipe) - images(ref)).max() < 1e-6


def test_switching_equals_loading_the_other_adapter_alone(kind, adapters):
    pipe = new_pipe(kind)
    load_adapter(pipe, adapters[0], name="a")
    load_adapter(pipe, adapters[1], name="b", strength=0.8)
    assert active_adapters(pipe) == ["a", "b"]
    both = images(pipe)
    set_adapters(pipe, ["b"])
    only_b = images(pipe)
    alone = new_pipe(kind)
    load_adapter(alone, adapters[1], name="b", strength=0.8)
    assert np.abs(only_b - images(alone)).max() < 1e-6
    set_adapters(pipe, "a", strengths=1.0)
    unload_adapter(alone)
    load_adapter(alone, adapters[0], name="a")
    assert np.abs(images(pipe) - images(alone)).max() < 1e-6
    # both again, with their own strengths: runtime equals fused
    set_adapters(pipe, ["a", "b"], strengths={"a": 1.0, "b": 0.8})
    assert np.abs(images(pipe) - both).max() < 1e-6
    fuse(pipe)
    assert np.abs(images(pipe) - both).max() < TOL
    unfuse(pipe)
    assert list_adapters(pipe)["b"]["strength"] == 0.8


def test_unload_restores_exact_weights_and_modules(kind, adapters, base_image):
    pipe = new_pipe(kind)
    before = weights(pipe)
    classes = {c: {n: type(m) for n, m in getattr(pipe, c).named_modules()} for c in ("unet", "text_encoder")}
    load_adapter(pipe, adapters[0], name="a", block_strengths="1,0.5,0")
    load_adapter(pipe, adapters[1], name="b", te_strength=2.0)
    fuse(pipe, strength=1.3)
    unfuse(pipe)
    unload_adapter(pipe, "a")
    assert "a" not in list_adapters(pipe)
    unload_adapter(pipe)
    after = weights(pipe)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for c, names in classes.items():
        assert {n: type(m) for n, m in getattr(pipe, c).named_modules()} == names
    assert np.array_equal(images(pipe), base_image)


def test_thousand_fuse_unfuse_cycles_are_bit_exact(adapters, kind):
    if kind != "sd1":
        pytest.skip("one architecture is enough for the cycle count")
    pipe = new_pipe(kind)
    # A slice of each adapter (attention, ff, convs in two blocks, text encoder) keeps 1000 cycles fast on CPU.
    keep = re.compile(r"unet\.(down_blocks\.0\.attentions\.0|up_blocks\.1\.resnets\.0)\.|text_encoder\..*layers\.0\.")
    a, b = (Adapter({k: v for k, v in ad.tensors.items() if keep.match(k)}) for ad in adapters)
    load_adapter(pipe, a, name="a", strength=1.3, block_strengths="up=0.5")
    report = load_adapter(pipe, b, name="b", strength=-0.7)
    assert report.num_modules > 20 and any("conv" in m for m in report.modules["unet"])
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "lora_" not in n}
    before.update({f"te.{n}": p.detach().clone() for n, p in pipe.text_encoder.named_parameters() if "lora_" not in n})
    for _ in range(1000):
        fuse(pipe)
        unfuse(pipe)
    after = {n: p for n, p in pipe.unet.named_parameters() if "lora_" not in n}
    after.update({f"te.{n}": p for n, p in pipe.text_encoder.named_parameters() if "lora_" not in n})
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_file_round_trip_and_merge_into_pipeline(tmp_path, kind, adapters):
    path = adapters[0].save(tmp_path / "a.safetensors")
    pipe = new_pipe(kind)
    before = weights(pipe)
    result = merge_into_pipeline(pipe, [(path, 0.8, 0.4), (adapters[1], 1.1)], tmp_path / "merged", single_file=True)
    after = weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before) and not list_adapters(pipe)
    assert not any(True for c in ("unet", "text_encoder") for _ in lora_layers(getattr(pipe, c)))
    report = load_adapter(pipe, path, name="a", strength=0.8, te_strength=0.4)
    assert report.modules["unet"] and report.modules["text_encoder"]
    load_adapter(pipe, adapters[1], name="b", strength=1.1)
    expected = images(pipe)
    merged = load_sd_pipeline(str(result.out_dir))
    merged.set_progress_bar_config(disable=True)
    assert np.abs(images(merged) - expected).max() < TOL
    tensors, meta = read_safetensors(result.single_file)
    assert meta["lora_vision.layout"] == "diffusers"
    assert {k.split(".", 1)[0] for k in tensors} >= {"unet", "text_encoder", "vae"}
    for k, v in merged.unet.state_dict().items():
        assert torch.equal(tensors[f"unet.{k}"], v)
    with pytest.raises(FileExistsError):
        merge_into_pipeline(pipe, [(path, 1.0)], tmp_path / "merged")


def test_bad_input_raises_clear_errors(kind, adapters):
    pipe = new_pipe(kind)
    other = make_adapter("sdxl" if kind == "sd1" else "sd1", 3)
    with pytest.raises(AdapterMismatchError, match="another base model"):
        load_adapter(pipe, other, name="wrong")
    assert not list_adapters(pipe) and not any(True for _ in lora_layers(pipe.unet))
    with pytest.raises(ValueError, match="unknown block 'side'"):
        load_adapter(pipe, adapters[0], name="a", block_strengths="side=1")
    with pytest.raises(ValueError, match="is not a number"):
        load_adapter(pipe, adapters[0], name="a", block_strengths="up=abc")
    with pytest.raises(ValueError, match="does not exist"):
        load_adapter(pipe, adapters[0], name="a", block_strengths="up.7=0")
    with pytest.raises(ValueError, match="expected 3"):
        load_adapter(pipe, adapters[0], name="a", block_strengths="1,2")
    assert not list_adapters(pipe)
    load_adapter(pipe, adapters[0], name="a")
    with pytest.raises(ValueError, match="already loaded"):
        load_adapter(pipe, adapters[1], name="a")
    for call in (lambda: set_adapters(pipe, ["nope"]), lambda: set_adapter_strength(pipe, "nope", 1.0),
                 lambda: unload_adapter(pipe, "nope"), lambda: fuse(pipe, names=["nope"])):
        with pytest.raises(KeyError, match="loaded in this pipeline: \\['a'\\]"):
            call()
    fuse(pipe)
    with pytest.raises(RuntimeError, match="unfuse"):
        set_adapter_strength(pipe, "a", 0.5)
    with pytest.raises(RuntimeError, match="unfuse"):
        unload_adapter(pipe, "a")
    unfuse(pipe)
    unload_adapter(pipe, "a")


def test_foreign_files_load_like_the_native_adapter(tmp_path, kind, adapters):
    from lora_vision.formats import export

    pipe = new_pipe(kind)
    load_adapter(pipe, adapters[0], name="native", strength=0.9, te_strength=0.6)
    expected = images(pipe)
    unload_adapter(pipe)
    for fmt in ("diffusers", "kohya"):
        path = export(adapters[0], fmt, tmp_path / f"{fmt}.safetensors", base=kind, dtype=torch.float32) \
            if fmt == "kohya" else export(adapters[0], fmt, tmp_path / f"{fmt}.safetensors", dtype=torch.float32)
        report = load_adapter(pipe, path, name=fmt, strength=0.9, te_strength=0.6)
        assert report.format == fmt and report.num_modules == len(adapters[0].ranks())
        assert np.abs(images(pipe) - expected).max() < TOL, fmt
        unload_adapter(pipe, fmt)
    wrong = make_adapter("sdxl" if kind == "sd1" else "sd1", 3).save(tmp_path / "wrong.safetensors")
    with pytest.raises(AdapterMismatchError, match="another base"):
        load_adapter(pipe, wrong, name="wrong")
    assert not list_adapters(pipe) and not any(True for _ in lora_layers(pipe.unet))


def test_safetensors_whose_header_length_starts_like_a_pickle_is_read(tmp_path):
    # The 8-byte header length can begin with 0x80, a pickle's first byte; such files are valid safetensors and
    # must load (lora_vision.io looks for the "{" that starts the JSON header).
    from safetensors.torch import save_file

    path = tmp_path / "f.safetensors"
    for pad in range(300):
        save_file({"unet.x.lora_A.weight": torch.ones(1, 2)}, str(path), metadata={"p": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    tensors, meta = read_safetensors(path)
    assert meta["p"] == "x" * pad and torch.equal(tensors["unet.x.lora_A.weight"], torch.ones(1, 2))
    pickle = tmp_path / "p.safetensors"
    torch.save({"a": torch.ones(1)}, pickle, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="pickle"):
        read_safetensors(pickle)


def test_adapter_from_a_trained_pipeline_reproduces_its_images_rslora_included():
    src = new_pipe("sd1")
    cfgs = {"unet": LoRAConfig(rank=4, alpha=8.0, rslora=True, targets="unet-attn-ff"),
            "text_encoder": LoRAConfig(rank=2, alpha=3.0, targets="clip-attn")}
    g = torch.Generator().manual_seed(5)
    comps = {"unet": src.unet, "text_encoder": src.text_encoder}
    for comp, model in comps.items():
        inject_lora(model, cfgs[comp], name="trained")
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data = torch.randn(p.shape, generator=g) * 0.2
    expected = images(src)
    adapter = Adapter.from_models(comps, "trained", configs=cfgs)
    pipe = new_pipe("sd1")
    load_adapter(pipe, adapter, name="t")
    assert np.abs(images(pipe) - expected).max() < 1e-6


def test_a_file_naming_the_inside_of_a_wrapper_is_not_found_and_changes_nothing():
    """A layer keyed at a loaded adapter's wrapper inside (`to_q.base`) names a module that takes no adapter: strict
    loading says it is not found and changes nothing, strict=False loads the rest and lists it as skipped (before:
    a raw KeyError from inside the injection, with strict=False too)."""
    pipe = new_pipe("sd1")
    first = make_adapter("sd1", 0)
    load_adapter(pipe, first, name="a")
    t = first.tensors
    q = next(k for k in t if k.endswith("attn1.to_q.lora_A.weight")).removesuffix(".lora_A.weight")
    kv = next(k for k in t if k.endswith("attn2.to_k.lora_A.weight")).removesuffix(".lora_A.weight")
    inside = {f"{q}.base.lora_{ab}.weight": t[f"{q}.lora_{ab}.weight"] for ab in "AB"}
    bad = Adapter(inside | {k: v for k, v in t.items() if k.startswith(kv + ".")}, dict(first.metadata))
    before, mods = weights(pipe), [(n, type(m)) for n, m in pipe.unet.named_modules()]
    with pytest.raises(AdapterMismatchError, match=r"1 of 2 unet modules not found \(first: \['" + re.escape(q)
                       + r"\.base'\]\)"):
        load_adapter(pipe, bad, name="b")
    assert list(list_adapters(pipe)) == ["a"] and [(n, type(m)) for n, m in pipe.unet.named_modules()] == mods
    assert all(torch.equal(v, weights(pipe)[k]) for k, v in before.items())
    report = load_adapter(pipe, bad, name="b", strict=False)
    assert report.modules == {"unet": [kv.removeprefix("unet.")]} and report.skipped == [f"{q}.base"]


@pytest.mark.parametrize("source", ["file", "memory"])
def test_factors_packed_into_one_transfer_equal_the_ones_moved_one_by_one(monkeypatch, tmp_path, source):
    """The load path moves the LoRA pairs bound for another device (a GPU) in one copy: a file's data region whole
    (the factors are views of it), an in-memory adapter's factors packed into one buffer. Here it is forced on the
    CPU (a cast to bf16) and checked against the per-tensor path, factor by factor and by output."""
    import functools

    import lora_vision.pipeline.adapters as adapters

    adapter = make_adapter("sd1", 3)
    plain = {k: v for k, v in adapter.tensors.items() if ".conv" not in k and "resnets" not in k}
    adapter = Adapter(plain, dict(adapter.metadata))
    if source == "file":
        adapter = adapter.save(tmp_path / "a.safetensors")
    pipes = {}
    for pack in (False, True):
        pipe = new_pipe("sd1").to(torch.bfloat16)
        monkeypatch.setattr(adapters, "_move_factors", functools.partial(adapters._move_factors, pack=pack))
        load_adapter(pipe, adapter, name="a")
        monkeypatch.undo()
        pipes[pack] = pipe
    layers = {pack: dict(lora_layers(p.unet)) | {"te." + k: v for k, v in lora_layers(p.text_encoder)}
              for pack, p in pipes.items()}
    assert layers[True].keys() == layers[False].keys() and len(layers[True]) > 20
    storages, factor_bytes = {}, 0
    for name, layer in layers[True].items():
        other = layers[False][name]
        for t, u in ((layer.lora_A["a"], other.lora_A["a"]), (layer.lora_B["a"], other.lora_B["a"])):
            assert t.dtype == u.dtype == torch.bfloat16 and torch.equal(t, u), name
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            factor_bytes += t.numel() * t.element_size()
    assert len(storages) == 1, "the packed path did not run: the factors are not views of one buffer"
    # a file's region went over whole (its alphas too); an in-memory adapter's factors alone
    assert (next(iter(storages.values())) > factor_bytes) == (source == "file")
    x = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16)
    hidden = torch.randn(1, 77, pipes[True].unet.config.cross_attention_dim, dtype=torch.bfloat16)
    outs = [pipes[p].unet(x, 10, encoder_hidden_states=hidden).sample for p in (False, True)]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_file_with_a_nan_or_an_overflow_is_refused_naming_the_tensor(tmp_path, dtype):
    """The finite check of the load looks at the file's whole buffer first; what it finds is named tensor by
    tensor, and a value that overflows the pipeline's dtype (fp16) counts too."""
    from lora_vision.io import AdapterFileError

    adapter = make_adapter("sd1", 4)
    key = next(k for k in adapter.tensors if k.startswith("unet.") and k.endswith("lora_B.weight"))
    bad = dict(adapter.tensors)
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    path = Adapter(bad, dict(adapter.metadata)).save(tmp_path / "nan.safetensors")
    pipe = new_pipe("sd1").to(dtype)
    before = weights(pipe)
    with pytest.raises(AdapterFileError, match=re.escape(key.split(".lora_B")[0].split(".", 1)[1])):
        load_adapter(pipe, path, name="a")
    assert not list_adapters(pipe) and all(torch.equal(before[k], v) for k, v in weights(pipe).items())
    big = dict(adapter.tensors)
    big[key] = big[key].clone()
    big[key][0, 0] = 1e6  # finite in the file, inf in fp16
    path = Adapter(big, dict(adapter.metadata)).save(tmp_path / "big.safetensors")
    half = new_pipe("sd1").to(torch.float16)
    with pytest.raises(AdapterFileError, match="overflow"):
        load_adapter(half, path, name="a")
    load_adapter(new_pipe("sd1").to(dtype), path, name="a")  # fits float32 and bf16
