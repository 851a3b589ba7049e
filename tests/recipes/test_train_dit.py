"""scripts/train_sd.py end to end on the tiny random-weight DiT pipelines (flow matching; in-process, CPU)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from lora_vision.adapter import Adapter
from lora_vision.formats import read_adapter
from lora_vision.io import read_safetensors
from lora_vision.models.dit import build_tiny_dit, transformer_inputs, transformer_output
from lora_vision.pipeline import load_adapter

from test_train_sd import REPO, _load_script

FAMILIES = {"tiny-flux": "flux1", "tiny-sd3": "sd3", "tiny-flux2": "flux2", "tiny-qwen-image": "qwen-image",
            "tiny-z-image": "z-image"}


@pytest.fixture(scope="module")
def train_sd():
    return _load_script()


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    """Two sample images with their captions."""
    folder = tmp_path / "instance"
    folder.mkdir()
    for name in ("toy_00", "toy_01"):
        for suffix in (".jpg", ".txt"):
            if (REPO / "samples" / "instance" / f"{name}{suffix}").exists():
                shutil.copy(REPO / "samples" / "instance" / f"{name}{suffix}", folder)
    return folder


def dit_args(model: str, instance: Path, out: Path, steps: int = 2, *extra: str) -> list[str]:
    """A fast tiny DiT run: batch 1, no sweep, no TensorBoard."""
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", str(instance),
            "--instance_prompt", "a photo of sks toy", "--output_dir", str(out), "--max_train_steps", str(steps),
            "--train_batch_size", "1", "--logging_steps", "1", "--report_to", "none", "--strength_sweep=",
            "--learning_rate", "1e-3", "--checkpointing_steps", "1000", "--max_sequence_length", "16", *extra]


def losses(out: Path) -> list[float]:
    rows = (out / "logs" / "loss.csv").read_text().splitlines()[1:]
    return [float(r.split(",")[1]) for r in rows]


@pytest.mark.parametrize("model", list(FAMILIES))
def test_a_few_steps_train_every_family_and_write_all_files(train_sd, images, tmp_path, model):
    out = tmp_path / "out"
    assert train_sd.main(dit_args(model, images, out)) == 0
    values = losses(out)
    assert len(values) == 2 and all(math.isfinite(v) for v in values)
    adapter = Adapter.load(out / "adapter.safetensors")
    assert adapter.components() == ["transformer"]
    b = [t for k, t in adapter.tensors.items() if "lora_B" in k]
    assert b and any(t.abs().sum() > 0 for t in b), "training left every B matrix at zero"
    kohya, _ = read_safetensors(out / "adapter_kohya.safetensors")
    diffusers, _ = read_safetensors(out / "adapter_diffusers.safetensors")
    assert kohya and all(k.startswith("transformer.") for k in diffusers)


def test_first_step_and_step_times_are_reported_as_in_the_sd_recipe(train_sd, images, tmp_path, capsys):
    # --time_steps used to be accepted and ignored on a DiT run; the first-step line was SD-only
    assert train_sd.main(dit_args("tiny-flux", images, tmp_path / "out", 12, "--time_steps", "--profile_steps",
                                  "2")) == 0
    out = capsys.readouterr().out
    table = (tmp_path / "out" / "profile" / "kernels.md").read_text()  # --profile_steps reaches the DiT loop too
    assert "Steps 6-7 of the run" in table and "| GEMM |" in table, table[:600]
    first = [line for line in out.splitlines() if "first step done" in line]
    assert len(first) == 1 and "imports and setup" in first[0], first
    steps = [line for line in out.splitlines() if line.startswith("STEPS ours")]
    assert len(steps) == 1 and "n=1 " in steps[0], steps  # 12 stamps, 10 warm-up dropped: one interval


@pytest.mark.parametrize("adapter_type", ["lokr", "dora"])
def test_a_kind_trains_on_a_dit_and_its_files_load(train_sd, images, tmp_path, capsys, adapter_type):
    # the run used to end in a traceback from the diffusers export, which holds plain LoRA only
    out = tmp_path / "out"
    assert train_sd.main(dit_args("tiny-flux", images, out, 2, "--adapter_type", adapter_type, "--rank", "4")) == 0
    assert "note: no adapter_diffusers.safetensors" in capsys.readouterr().out
    assert not (out / "adapter_diffusers.safetensors").exists()
    ours = Adapter.load(out / "adapter.safetensors")
    kohya, report = read_adapter(out / "adapter_kohya.safetensors")
    assert set(ours.kinds()) == set(report.kinds) and "LoRA" not in ours.kinds()


def test_resume_equals_an_unbroken_run(train_sd, images, tmp_path):
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    assert train_sd.main(dit_args("tiny-flux", images, unbroken, 4, "--checkpointing_steps", "2")) == 0
    assert train_sd.main(dit_args("tiny-flux", images, broken, 2, "--checkpointing_steps", "2")) == 0
    assert train_sd.main(dit_args("tiny-flux", images, broken, 4, "--checkpointing_steps", "2",
                                  "--resume_from_checkpoint", "latest")) == 0
    a, _ = read_safetensors(unbroken / "adapter.safetensors")
    b, _ = read_safetensors(broken / "adapter.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), "the resumed adapter differs"
    assert losses(unbroken) == losses(broken)


def overfit_flux(train_sd, images: Path, out: Path, *extra: str) -> tuple[float, float]:
    """A 24-step tiny-flux run on one image; the mean loss of its first and of its last 6 steps."""
    for p in list(images.iterdir()):
        if not p.name.startswith("toy_00"):
            p.unlink()
    # One image at 32 px, noise levels held near 0.5 (logit_normal, std 0.1) so the step-to-step spread is small.
    assert train_sd.main(dit_args("tiny-flux", images, out, 24, "--learning_rate", "2e-2", "--rank", "8",
                                  "--train_batch_size", "4", "--resolution", "32", "--weighting_scheme",
                                  "logit_normal", "--logit_std", "0.1", *extra)) == 0
    values = losses(out)
    return sum(values[:6]) / 6, sum(values[-6:]) / 6


def test_loss_goes_down_on_an_overfit_flux_run(train_sd, images, tmp_path):
    first, last = overfit_flux(train_sd, images, tmp_path / "out")
    assert last < 0.8 * first, f"the loss did not go down: first 6 steps {first:.4f}, last 6 {last:.4f}"


def test_prior_preservation_generates_class_images_with_the_pipeline(train_sd, images, tmp_path):
    classes, out = tmp_path / "class", tmp_path / "out"
    assert train_sd.main(dit_args("tiny-sd3", images, out, 2, "--with_prior_preservation", "--class_data_dir",
                                  str(classes), "--class_prompt", "a photo of a toy", "--num_class_images", "2",
                                  "--class_inference_steps", "2", "--sample_batch_size", "2")) == 0
    assert sorted(p.suffix for p in classes.iterdir()) == [".png", ".png"]
    assert len(losses(out)) == 2
    # The class images are kept: a second run generates none.
    made = sorted(classes.iterdir())
    assert train_sd.main(dit_args("tiny-sd3", images, tmp_path / "again", 1, "--with_prior_preservation",
                                  "--class_data_dir", str(classes), "--class_prompt", "a photo of a toy",
                                  "--num_class_images", "2")) == 0
    assert sorted(classes.iterdir()) == made


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_exported_diffusers_file_loads_in_diffusers_with_our_outputs(train_sd, images, tmp_path, model):
    out = tmp_path / "out"
    assert train_sd.main(dit_args(model, images, out, 2, "--learning_rate", "1e-2")) == 0
    ours, theirs = build_tiny_dit(model), build_tiny_dit(model)
    inputs = transformer_inputs(ours.transformer, text_tokens=8)
    with torch.no_grad():
        base = transformer_output(ours.transformer, inputs)
    load_adapter(ours, out / "adapter.safetensors")
    theirs.load_lora_weights(str(out / "adapter_diffusers.safetensors"))
    with torch.no_grad():
        mine, diffusers = transformer_output(ours.transformer, inputs), transformer_output(theirs.transformer, inputs)
    assert not torch.allclose(mine, base, atol=1e-6), "the trained adapter changes nothing"
    torch.testing.assert_close(diffusers, mine, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("extra, words", [
    (["--resolution", "72"], "multiple of 16"),
    (["--train_text_encoder_ti"], "--train_text_encoder_ti"),
    (["--snr_gamma", "5"], "--weighting_scheme"),
])
def test_settings_a_dit_run_cannot_honour_are_one_line_errors(train_sd, images, tmp_path, capsys, extra, words):
    out = tmp_path / "out"
    assert train_sd.main(dit_args("tiny-flux", images, out, 1, *extra)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flux1 training does not support" in err[0] and words in err[0]
    assert not (out / "adapter.safetensors").exists()


def test_unknown_weighting_scheme_is_refused_with_a_suggestion(train_sd, images, tmp_path, capsys):
    assert train_sd.main(dit_args("tiny-flux", images, tmp_path / "out", 1, "--weighting_scheme", "logit_norml")) == 2
    err = capsys.readouterr().err
    assert "weighting_scheme='logit_norml'" in err and "did you mean 'logit_normal'" in err


def test_sd3_preconditions_its_outputs_by_default_as_the_reference(train_sd, images, tmp_path, capsys):
    import yaml

    out = tmp_path / "out"
    assert train_sd.main(dit_args("tiny-sd3", images, out, 1)) == 0
    assert "preconditioned outputs" in capsys.readouterr().out
    assert yaml.safe_load((out / "config.yaml").read_text())["precondition_outputs"] is True
    flux = tmp_path / "flux"
    assert train_sd.main(dit_args("tiny-flux", images, flux, 1)) == 0
    assert yaml.safe_load((flux / "config.yaml").read_text())["precondition_outputs"] is False


@pytest.mark.parametrize("extra, words", [(["--precondition_outputs"], "--prediction_type"),
                                          (["--weighting_scheme", "logit_normal"], "--snr_gamma")])
def test_flow_matching_settings_are_refused_for_a_unet(train_sd, tmp_path, capsys, extra, words):
    out = tmp_path / "out"
    assert train_sd.main(["--output_dir", str(out), "--max_train_steps", "1", *extra]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "train_sd.py" in line]  # not the load bars
    assert len(err) == 1 and "(UNet) training does not support" in err[0] and words in err[0]
    assert not (out / "adapter.safetensors").exists()


def test_validation_split_logs_a_held_out_loss_and_resumes_exactly(train_sd, images, tmp_path, capsys):
    args = ["--validation_split", "0.5", "--validation_steps", "2"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    assert train_sd.main(dit_args("tiny-flux", images, full, 3, *args)) == 0
    assert "1 instance images" in capsys.readouterr().out  # one of the two is held out
    lines = (full / "logs" / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,lr,val_loss"
    measured = {int(r.split(",")[0]): float(r.split(",")[3]) for r in lines[1:] if r.split(",")[3]}
    assert sorted(measured) == [2, 3] and all(math.isfinite(v) for v in measured.values())
    assert measured[2] != measured[3]  # it follows the weights
    assert train_sd.main(dit_args("tiny-flux", images, parts, 2, *args, "--checkpointing_steps", "2")) == 0
    assert train_sd.main(dit_args("tiny-flux", images, parts, 3, *args, "--resume_from_checkpoint", "latest")) == 0
    assert (full / "logs" / "loss.csv").read_text() == (parts / "logs" / "loss.csv").read_text()


def test_masked_loss_black_masks_train_nothing(train_sd, images, tmp_path):
    from PIL import Image

    for image in images.glob("*.jpg"):
        Image.new("L", Image.open(image).size, 0).save(images / f"{image.stem}_mask.png")
    out = tmp_path / "out"
    assert train_sd.main(dit_args("tiny-flux2", images, out, 2, "--masked_loss")) == 0
    assert losses(out) == [0.0, 0.0]
    adapter = Adapter.load(out / "adapter.safetensors")
    assert all(t.abs().sum() == 0 for k, t in adapter.tensors.items() if "lora_B" in k)


@pytest.mark.parametrize("extra, words", [
    (["--noise_offset", "0.1"], "kohya's flux / sd3 trainers draw plain Gaussian noise"),
    (["--prediction_type", "epsilon"], "velocity"),
    (["--loss_type", "huber"], "squared error"),
    (["--debiased_estimation_loss"], "--weighting_scheme"),
    (["--shuffle_caption"], "cached once per caption"),
])
def test_ddpm_only_settings_are_refused_for_a_dit_with_the_reason(train_sd, images, tmp_path, capsys, extra, words):
    out = tmp_path / "out"
    assert train_sd.main(dit_args("tiny-flux", images, out, 1, *extra)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flux1 training does not support" in err[0] and words in err[0]
    assert not (out / "adapter.safetensors").exists()


def test_int8_quantized_base_trains_and_the_adapter_loads_on_the_plain_base(train_sd, images, tmp_path, capsys):
    out = tmp_path / "out"
    first, last = overfit_flux(train_sd, images, out, "--quantize_base", "int8", "--gradient_checkpointing")
    assert "quantized base: 50 of 50 Linear layers of the FluxTransformer2DModel to int8" in capsys.readouterr().out
    assert last < 0.8 * first, f"the loss did not go down: first 6 steps {first:.4f}, last 6 {last:.4f}"
    plain = build_tiny_dit("tiny-flux")
    inputs = transformer_inputs(plain.transformer, text_tokens=8)
    with torch.no_grad():
        base = transformer_output(plain.transformer, inputs)
    load_adapter(plain, out / "adapter.safetensors")
    assert type(plain.transformer.transformer_blocks[0].attn.to_q.base.weight) is torch.nn.Parameter
    with torch.no_grad():
        adapted = transformer_output(plain.transformer, inputs)
    assert torch.isfinite(adapted).all() and not torch.allclose(adapted, base, atol=1e-4)


@pytest.mark.parametrize("kind, code, words", [("fp8", 1, "compute capability 8.9"),
                                               ("nf4", 1, "none of the 50 Linear layers"),
                                               ("int4", 2, "quantize_base='int4': expected one of")])
def test_quantize_base_a_cpu_run_cannot_do_is_one_line(train_sd, images, tmp_path, capsys, kind, code, words):
    out = tmp_path / "out"
    assert train_sd.main(dit_args("tiny-flux", images, out, 1, "--quantize_base", kind)) == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert words in err[-1] and not (out / "adapter.safetensors").exists()


@pytest.mark.parametrize("model, encoders", [("tiny-flux", ["text_encoder"]),
                                             ("tiny-sd3", ["text_encoder", "text_encoder_2"])])
def test_train_text_encoder_trains_the_clip_encoders_and_diffusers_reads_them(train_sd, images, tmp_path, model,
                                                                              encoders):
    out = tmp_path / "out"
    assert train_sd.main(dit_args(model, images, out, 2, "--learning_rate", "1e-2", "--train_text_encoder")) == 0
    adapter = Adapter.load(out / "adapter.safetensors")
    assert adapter.components() == ["transformer", *encoders]
    assert not (out / "adapter_kohya.safetensors").exists()  # the DiT kohya file holds the transformer only
    ours, theirs, base = build_tiny_dit(model), build_tiny_dit(model), build_tiny_dit(model)
    load_adapter(ours, out / "adapter.safetensors")
    theirs.load_lora_weights(str(out / "adapter_diffusers.safetensors"))
    ids = ours.tokenizer(["a photo of sks toy"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    for name in encoders:
        with torch.no_grad():
            mine, diffusers, plain = (getattr(p, name)(ids).last_hidden_state for p in (ours, theirs, base))
        assert not torch.allclose(mine, plain, atol=1e-6), f"training left {name} unchanged"
        torch.testing.assert_close(diffusers, mine, atol=1e-4, rtol=1e-4)


def test_train_text_encoder_is_refused_where_the_family_has_no_clip_encoder(train_sd, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert train_sd.main(dit_args("tiny-qwen-image", images, out, 1, "--train_text_encoder")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CLIP encoders of Flux.1 and SD 3.x" in err[0]


def test_cudnn_attention_is_off_for_a_cuda_run_and_put_back_after_it(capsys):
    """The DiT recipe turns cuDNN attention off on CUDA (its backward failed at Flux.1's size) for the run only: a
    caller that trains in its own process and then generates gets its setting back, also when the run fails."""
    from lora_vision.training.dit.train import cudnn_attention_off

    assert torch.backends.cuda.cudnn_sdp_enabled()
    with pytest.raises(RuntimeError, match="mid-run"):
        with cudnn_attention_off(torch.device("cuda"), say=True):
            assert not torch.backends.cuda.cudnn_sdp_enabled()
            raise RuntimeError("mid-run")
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert "note: cuDNN attention is off for DiT training" in capsys.readouterr().out
    with cudnn_attention_off(torch.device("cpu"), say=True):  # a CPU run leaves it alone and says nothing
        assert torch.backends.cuda.cudnn_sdp_enabled()
    assert capsys.readouterr().out == ""
    torch.backends.cuda.enable_cudnn_sdp(False)  # a caller's own choice is kept, not turned back on
    try:
        with cudnn_attention_off(torch.device("cuda"), say=True):
            pass
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
