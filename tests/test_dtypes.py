"""The one dtype map: every spelling the flags use, and one clear error for anything else."""

from __future__ import annotations

import pytest
import torch

from lora_vision.dtypes import DTYPES, SHORT_NAMES, parse_dtype


@pytest.mark.parametrize("names, dtype", [(("fp32", "float32", "no", "FP32"), torch.float32),
                                          (("fp16", "float16", " Float16 "), torch.float16),
                                          (("bf16", "bfloat16"), torch.bfloat16)])
def test_every_spelling_of_the_flags_maps_to_its_dtype(names, dtype):
    assert all(parse_dtype(n, "--dtype") is dtype for n in names)
    assert set(SHORT_NAMES) <= set(DTYPES)


@pytest.mark.parametrize("bad", ["half", "fp8", "", "float64"])
def test_an_unknown_dtype_is_one_line_naming_the_flag_and_the_choices(bad):
    with pytest.raises(ValueError) as info:
        parse_dtype(bad, "--mixed_precision")
    message = str(info.value)
    assert message.startswith(f"--mixed_precision {bad!r} is not a dtype name") and "\n" not in message
    assert all(name in message for name in DTYPES)


def test_generation_reads_dtype_names_through_the_map(tmp_path):
    from lora_vision.generation.run import GenerateConfig, load_pipeline

    with pytest.raises(ValueError, match=r"^--dtype 'half' is not a dtype name; expected one of fp32, float32"):
        load_pipeline(GenerateConfig(model="tiny", device="cpu", dtype="half", output_dir=str(tmp_path)))
    pipe = load_pipeline(GenerateConfig(model="tiny", device="cpu", dtype="float16", output_dir=str(tmp_path)))
    assert pipe.unet.dtype == torch.float16
