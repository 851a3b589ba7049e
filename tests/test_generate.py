"""`lora-vision generate`: prompt tags, LoRA folders, PNG infotext, strength grids, exact adapter switching."""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_vision.commands.generate import register
from lora_vision.generation.prompts import (LoraDirectory, addnet_hash, build_infotext, extract_lora_tags,
                                            parse_infotext, parse_lora_flag, parse_lora_hashes)
from lora_vision.generation.run import GenerateConfig, generate, load_pipeline, parse_sweeps
from lora_vision.io import AdapterFileError

sys.path.insert(0, str(Path(__file__).parent))
from test_serving import make_adapter  # noqa: E402

torch.set_num_threads(2)


# ---- prompt syntax -----------------------------------------------------------------------------------------------

def test_tags_multiple_named_negative_and_spaces():
    clean, tags, ignored = extract_lora_tags(
        "a photo, <lora:ink style:0.6> of a dog <lora:clay:-0.5:1.2>, <lyco:x:0.3:unet=-1> <hypernet:h:1> sunny")
    assert clean == "a photo, of a dog, sunny"
    assert [(t.name, t.te, t.unet) for t in tags] == [("ink style", 0.6, 0.6), ("clay", -0.5, 1.2), ("x", 0.3, -1.0)]
    assert ignored == ["<hypernet:h:1>"]
    _, tags, _ = extract_lora_tags("<lora:a>, <lora:b:te=0.2:unet=0.9> <lora:a:1>")
    assert [(t.name, t.te, t.unet) for t in tags] == [("a", 1.0, 1.0), ("b", 0.2, 0.9)]
    assert extract_lora_tags("no tags here")[1] == []


@pytest.mark.parametrize("prompt, message", [
    ("<lora:a:strong>", "not a number"),
    ("<lora:a:1:1:8>", "dyn"),
    ("<lora:a:dyn=8>", "dyn"),
    ("<lora:a:foo=1>", "unknown argument"),
    ("<lora: :1>", "no LoRA name"),
    ("<lora:a:1> <lora:a:0.5>", "twice"),
])
def test_bad_tags_are_clear_errors(prompt, message):
    with pytest.raises(ValueError, match=message):
        extract_lora_tags(prompt)


def test_lora_flag_parsing():
    assert parse_lora_flag("style.safetensors") == (Path("style.safetensors"), 1.0, 1.0)
    assert parse_lora_flag("style.safetensors:0.5") == (Path("style.safetensors"), 0.5, 0.5)
    assert parse_lora_flag("C:/loras/x.safetensors:-0.5:0.25") == (Path("C:/loras/x.safetensors"), -0.5, 0.25)
    assert parse_lora_flag("odd:name.safetensors:1.5") == (Path("odd:name.safetensors"), 1.5, 1.5)
    with pytest.raises(ValueError, match="no file"):
        parse_lora_flag(":0.5")


def test_sweep_parsing():
    assert parse_sweeps(["strength=0,0.5,1"]) == [("strength", [0.0, 0.5, 1.0])]
    for bad in (["strength"], ["a=x,y"], ["a=1", "b=1", "c=1"], ["a=1", "a=2"]):
        with pytest.raises(ValueError):
            parse_sweeps(bad)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("loras")
    ink = make_adapter("unet-attn", "clip-attn", 4, 4.0, 1)
    ink.metadata["ss_output_name"] = "inky"
    clay = make_adapter("unet-attn-ff", None, 8, 8.0, 2)
    (d / "sub").mkdir()
    return {"dir": d, "ink": ink.save(d / "ink style.safetensors"), "clay": clay.save(d / "sub" / "clay.safetensors")}


def test_lora_directory_resolves_stem_alias_and_explains_misses(lora_files, tmp_path):
    lib = LoraDirectory(lora_files["dir"])
    assert lib.resolve("ink style") == lora_files["ink"] and lib.resolve("inky") == lora_files["ink"]
    assert lib.resolve("clay") == lora_files["clay"]
    with pytest.raises(FileNotFoundError, match=r"no LoRA named 'clai'.*did you mean clay"):
        lib.resolve("clai")
    (lora_files["dir"] / "old.pt").write_bytes(b"PK\x03\x04")
    with pytest.raises(AdapterFileError, match="pickle"):
        LoraDirectory(lora_files["dir"]).resolve("old")
    with pytest.raises(FileNotFoundError, match="no --lora_dir"):
        LoraDirectory(None).resolve("ink")


def test_addnet_hash_is_sha256_of_the_data_region(lora_files):
    raw = lora_files["clay"].read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert addnet_hash(lora_files["clay"]) == hashlib.sha256(raw[8 + n:]).hexdigest()


def test_infotext_round_trip():
    params = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7.5", "Seed": 42,
              "Size": "512x768", "Model": "sd15", "Lora hashes": "ink style: 0123456789ab, clay: ba9876543210",
              "Version": "lora_vision 0.1.0"}
    text = build_infotext("a dog, sunny\nsecond line", "blurry, low quality", params)
    back = parse_infotext(text)
    assert back["Prompt"] == "a dog, sunny\nsecond line" and back["Negative prompt"] == "blurry, low quality"
    assert {k: back[k] for k in params} == {k: str(v) for k, v in params.items()}
    assert parse_lora_hashes(back["Lora hashes"]) == {"ink style": "0123456789ab", "clay": "ba9876543210"}


# ---- generation --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(GenerateConfig(device="cpu", model="tiny-sd1"))  # the adapters are made on tiny-sd1


def _fresh(pipe):
    from lora_vision.pipeline import unload_adapter

    unload_adapter(pipe)
    return pipe


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _run(pipe, tmp: Path, **kw) -> list[Path]:
    cfg = GenerateConfig(**{"model": "tiny-sd1", "steps": 2, "output_dir": str(tmp), "progress": False, **kw})
    return generate(cfg, pipe=_fresh(pipe))


def test_strength_zero_equals_base_and_png_metadata_round_trips(pipe, lora_files, tmp_path):
    base = _run(pipe, tmp_path / "base", prompts=["a red box"], seeds=[7, 8], batch_size=2)
    zero = _run(pipe, tmp_path / "zero", prompts=["a red box <lora:inky:0>"], seeds=[7, 8], batch_size=2,
                lora_dir=str(lora_files["dir"]), loras=[f"{lora_files['clay']}:0"], scheduler="euler_a")
    assert len(base) == len(zero) == 2
    full = _run(pipe, tmp_path / "full", prompts=["a red box <lora:inky:1>"], seeds=[7],
                lora_dir=str(lora_files["dir"]))
    assert not np.array_equal(_pixels(full[0]), _pixels(base[0]))
    # Euler a differs from the default DDPM only in the noise schedule; compare like with like.
    base_ea = _run(pipe, tmp_path / "base_ea", prompts=["a red box"], seeds=[7, 8], batch_size=2, scheduler="euler_a")
    for a, b in zip(base_ea, zero):
        assert np.array_equal(_pixels(a), _pixels(b))

    info = parse_infotext(Image.open(zero[1]).info["parameters"])
    assert info["Prompt"] == "a red box <lora:clay:0:0> <lora:inky:0:0>"
    assert (info["Seed"], info["Steps"], info["Sampler"], info["Size"]) == ("8", "2", "Euler a", "64x64")
    hashes = parse_lora_hashes(info["Lora hashes"])
    assert hashes == {"clay": addnet_hash(lora_files["clay"])[:12], "inky": addnet_hash(lora_files["ink"])[:12]}
    side = json.loads(zero[1].with_suffix(".json").read_text())
    assert side["seed"] == 8 and side["prompt"] == "a red box" and side["parameters"] == Image.open(zero[1]).info[
        "parameters"]
    assert {x["name"]: x["strength"] for x in side["loras"]} == {"clay": 0.0, "inky": 0.0}


def test_switching_adapters_between_prompts_equals_loading_one_alone(pipe, lora_files, tmp_path):
    both = _run(pipe, tmp_path / "both", prompts=["a dog <lora:inky:0.9>", "a dog <lora:clay:1.1>", "a dog"],
                seeds=[3], lora_dir=str(lora_files["dir"]))
    alone = _run(pipe, tmp_path / "alone", prompts=["a dog <lora:clay:1.1>"], seeds=[3],
                 lora_dir=str(lora_files["dir"]))
    base = _run(pipe, tmp_path / "base", prompts=["a dog"], seeds=[3])
    assert np.array_equal(_pixels(both[1]), _pixels(alone[0]))
    assert np.array_equal(_pixels(both[2]), _pixels(base[0]))
    assert not np.array_equal(_pixels(both[0]), _pixels(both[1]))


def test_two_adapter_sweep_writes_a_labelled_grid_of_the_cells(pipe, lora_files, tmp_path):
    out = _run(pipe, tmp_path, prompts=["a box <lora:inky:1>"], seeds=[5], loras=[str(lora_files["clay"])],
               lora_dir=str(lora_files["dir"]), sweeps=["clay=0,1", "inky=0,0.5,1"])
    with pytest.raises(ValueError, match="no adapter named"):
        _run(pipe, tmp_path / "bad", prompts=["a box"], seeds=[5], sweeps=["nope=0,1"])
    images, grids = out[:-1], out[-1:]
    assert len(images) == 6 and grids[0].name.startswith("grid-")
    grid = _pixels(grids[0])
    cell = _pixels(images[0])
    h, w = cell.shape[:2]
    assert grid.shape[1] > 3 * w and grid.shape[0] > 2 * h
    # The bottom-right cell is clay=1, inky=1 (the last image), pasted unchanged.
    assert np.array_equal(grid[-h:, -w:], _pixels(images[-1]))
    sweep_cells = [json.loads(p.with_suffix(".json").read_text())["sweep_cell"] for p in images]
    assert sweep_cells[0] == {"clay": 0.0, "inky": 0.0} and sweep_cells[-1] == {"clay": 1.0, "inky": 1.0}
    assert "Sweep" in parse_infotext(Image.open(grids[0]).info["parameters"])


def _kind_file(adapter_type: str, path: Path, seed: int) -> Path:
    """A LoHa / LoKr adapter of the tiny SD 1.x UNet and text encoder, written as LyCORIS writes it (kohya names)."""
    from lora_vision import LoRAConfig, inject_lora, lora_parameters
    from lora_vision.adapter import Adapter
    from lora_vision.formats.kohya import export_kohya
    from lora_vision.models import build_tiny_sd

    torch.manual_seed(seed)
    tiny = build_tiny_sd("sd1")
    extra = {"lokr_factor": 4} if adapter_type == "lokr" else {}
    inject_lora(tiny.unet, LoRAConfig(rank=4, targets="unet-attn", adapter_type=adapter_type, **extra))
    inject_lora(tiny.text_encoder, LoRAConfig(rank=4, targets="clip-attn", adapter_type=adapter_type, **extra))
    with torch.no_grad():
        for p in lora_parameters(tiny.unet) + lora_parameters(tiny.text_encoder):
            p.add_(torch.randn_like(p) * 0.3)
    return export_kohya(Adapter.from_models({"unet": tiny.unet, "text_encoder": tiny.text_encoder}), path, "sd1")


def test_lyco_and_lora_tags_apply_loha_and_lokr_files_as_load_adapter_does(pipe, tmp_path):
    from lora_vision.formats import read_adapter
    from lora_vision.pipeline import load_adapter

    d = tmp_path / "loras"
    d.mkdir()
    files = {"hada": _kind_file("loha", d / "hada.safetensors", 1), "kron": _kind_file("lokr", d / "kron.safetensors", 2)}
    assert [set(read_adapter(f)[0].kinds()) for f in files.values()] == [{"LoHa"}, {"LoKr"}]
    out = _run(pipe, tmp_path / "gen", prompts=["a red box <lyco:hada:0.7>", "a red box <lora:kron:0.7>", "a red box"],
               seeds=[5], lora_dir=str(d))
    tagged = {"hada": _pixels(out[0]), "kron": _pixels(out[1])}
    base = _pixels(out[2])
    for name, path in files.items():
        assert not np.array_equal(tagged[name], base), name
        _fresh(pipe)
        load_adapter(pipe, path, name=name, strength=0.7)  # the same file, loaded by hand at 0.7 (te and UNet)
        with torch.no_grad():
            image = pipe(prompt=["a red box"], negative_prompt=[""], num_inference_steps=2, guidance_scale=7.5,
                         width=64, height=64, generator=[torch.Generator(device="cpu").manual_seed(5)]).images[0]
        assert np.array_equal(np.asarray(image.convert("RGB")), tagged[name]), name
    _fresh(pipe)


def _cli(argv: list[str]) -> int:
    # The `generate` subcommand exactly as lora_vision.cli registers it (other subcommands are not needed here).
    parser = argparse.ArgumentParser(prog="lora-vision")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_and_script_run_end_to_end(lora_files, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na red box <lora:inky:0.5>\n\n")
    rc = _cli(["generate", "--model", "tiny-sd1", "--prompt_file", str(prompts), "--lora_dir", str(lora_files["dir"]), "--steps", "1",
               "--num_images", "2", "--seed", "11", "-o", str(tmp_path / "cli"), "--no_progress"])
    assert rc == 0 and "wrote 2 image(s)" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cli").glob("*.png")) == ["00000-11.png", "00001-12.png"]
    with pytest.raises(FileNotFoundError, match="no LoRA named 'missing'"):
        _cli(["generate", "--model", "tiny-sd1", "--prompt", "a <lora:missing:1>", "--lora_dir", str(lora_files["dir"]),
              "-o", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    import generate as script

    assert script.main(["--prompt", "a box", "--steps", "1", "-o", str(tmp_path / "script"), "--no_progress",
                        "--scheduler", "ddim"]) == 0
    assert len(list((tmp_path / "script").glob("*.png"))) == 1


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "1e999"])
def test_non_finite_strengths_are_refused_on_every_path(bad, tmp_path):
    with pytest.raises(ValueError, match="not a finite number"):
        extract_lora_tags(f"a dog <lora:dog:{bad}>")
    with pytest.raises(ValueError, match="not a finite number"):
        extract_lora_tags(f"a dog <lora:dog:1:unet={bad}>")
    with pytest.raises(ValueError, match="not a finite number"):
        parse_lora_flag(f"f.safetensors:{bad}")
    with pytest.raises(ValueError, match="not a finite number"):
        parse_sweeps([f"strength=0,{bad}"])
    from lora_vision.cli import main

    with pytest.raises(SystemExit) as e:
        main(["merge", "a.safetensors", "--weights", bad, "-o", str(tmp_path / "m.safetensors")])
    assert e.value.code == 2


def test_lora_flag_with_a_word_for_strength_says_it_is_not_a_number(tmp_path):
    f = tmp_path / "f.safetensors"
    f.write_bytes(b"")
    for text in (f"{f}:abc", "missing.safetensors:abc", f"{f}:0.5:abc"):
        with pytest.raises(ValueError, match=r"strength 'abc' is not a number"):
            parse_lora_flag(text)
    odd = tmp_path / "odd:name.safetensors"
    odd.write_bytes(b"")
    assert parse_lora_flag(f"{odd}:0.5") == (odd, 0.5, 0.5)
    assert parse_lora_flag(str(odd)) == (odd, 1.0, 1.0)


def _main_err(argv: list[str], capsys) -> tuple[int, str]:
    from lora_vision.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--height", "-8"], "--height -8: expected a positive multiple of 8"),
    (["--width", "0"], "--width 0: expected a positive multiple of 8"),
    (["--width", "100"], "--width 100: expected a positive multiple of 8"),
    (["--device", "cuda"], "--device 'cuda': no CUDA GPU is available"),
    (["--device", "gpu0"], "--device 'gpu0' is not a device name"),
])
def test_bad_sizes_and_devices_are_one_line_errors(flags, message, tmp_path, capsys):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, err = _main_err(["generate", "--prompt", "a box", "--steps", "1", "-o", str(tmp_path / "o"), *flags], capsys)
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_hub_id_without_network_says_so(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network, without waiting for it
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    rc, err = _main_err(["generate", "--model", "someone/not-cached-model", "--prompt", "a box", "--steps", "1",
                         "-o", str(tmp_path / "o")], capsys)
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "'someone/not-cached-model' is not a local folder and the Hugging Face hub could not be reached" in err


def test_file_for_another_family_or_with_unmatched_modules_warns_or_fails_under_strict(pipe, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from lora_vision.formats import export

    sd2 = make_adapter("unet-attn", None, 4, 4.0, 5)
    sd2.metadata["lora_vision.base"] = "sd2"  # fits the tiny SD 1.x by name and shape, but was made for SD 2.x
    sd2_file = sd2.save(tmp_path / "sd2 style.safetensors")
    _run(pipe, tmp_path / "a", prompts=["a box"], seeds=[1], loras=[str(sd2_file)])
    err = capsys.readouterr().err
    assert "warning:" in err and "was made for sd2" in err and "the model is sd1" in err
    with pytest.raises(ValueError, match=r"was made for sd2.*\(--strict\)"):
        _run(pipe, tmp_path / "b", prompts=["a box"], seeds=[1], loras=[str(sd2_file)], strict=True)
    assert not (tmp_path / "b").exists()

    kohya = export(make_adapter("unet-attn", None, 4, 4.0, 6), "kohya", tmp_path / "k.safetensors", base="sd1")
    sd = load_file(kohya)
    sd["lora_unet_not_in_this_model.lora_down.weight"] = torch.zeros(4, 8, dtype=torch.float16)
    sd["lora_unet_not_in_this_model.lora_up.weight"] = torch.zeros(8, 4, dtype=torch.float16)
    save_file(sd, str(tmp_path / "extra.safetensors"))
    _run(pipe, tmp_path / "c", prompts=["a box"], seeds=[1], loras=[str(tmp_path / "extra.safetensors")])
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "1 module(s)/tensor(s) of the file are not applied" in err
    assert "lora_unet_not_in_this_model" in err
    with pytest.raises(ValueError, match="not applied.*--strict"):
        _run(pipe, tmp_path / "d", prompts=["a box"], seeds=[1], loras=[str(tmp_path / "extra.safetensors")],
             strict=True)
    from lora_vision.pipeline.adapters import _state

    assert not _state(pipe).adapters  # nothing stays loaded after the refusal


# ---- the one PNG writer and grid maker ----------------------------------------------------------------------------

def test_one_png_writer_with_and_without_infotext_and_sidecar(tmp_path):
    from lora_vision.generation.images import save_png

    image = Image.new("RGB", (8, 8), (10, 20, 30))
    plain = save_png(image, tmp_path / "plain.png")
    assert plain == tmp_path / "plain.png" and "parameters" not in Image.open(plain).info
    assert not plain.with_suffix(".json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["plain.png"]
    infotext = build_infotext("a box", "", {"Steps": 1, "Seed": 3, "Size": "8x8"})
    tagged = save_png(image, str(tmp_path / "tagged.png"), infotext, {"seed": 3})
    assert parse_infotext(Image.open(tagged).info["parameters"])["Seed"] == "3"
    assert json.loads(tagged.with_suffix(".json").read_text()) == {"seed": 3}
    assert np.array_equal(_pixels(plain), _pixels(tagged))


class _ColourPipe:
    """Stands in for a diffusers pipeline: one flat image per generator, its colour drawn from that generator."""

    def __call__(self, prompts, num_inference_steps, height, width, generator, output_type, guidance_scale=7.5):
        colours = [tuple(int(c) for c in torch.randint(0, 256, (3,), generator=g)) for g in generator]
        return argparse.Namespace(images=[Image.new("RGB", (width, height), c) for c in colours])


def test_training_grids_come_from_the_generation_grid_maker():
    from lora_vision.generation.images import make_grid
    from lora_vision.training.sd.samples import generate_images, strength_sweep, validation_grid

    pipe = _ColourPipe()
    row = generate_images(pipe, ["p"] * 3, range(3), 1, 16)
    grid = validation_grid(pipe, "p", 3, 1, 16)
    assert grid.size == (48, 16) and np.array_equal(np.asarray(grid), np.asarray(make_grid([row])))
    sweep = strength_sweep(pipe, [], "p", [0, 1], 2, 1, 16)
    cols = [generate_images(pipe, ["p"] * 2, range(2), 1, 16)] * 2
    expected = make_grid([[c[r] for c in cols] for r in range(2)], col_labels=["strength 0", "strength 1"])
    assert sweep.size == expected.size and np.array_equal(np.asarray(sweep), np.asarray(expected))
    assert make_grid([row], title="t").size == make_grid([row], col_labels=["a", "b", "c"]).size == (48, 16 + 18)
