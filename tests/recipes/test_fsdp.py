"""FSDP for the DiT recipe: two CPU processes (gloo) under `accelerate launch --config_file
configs/accelerate/fsdp_dit.yaml` on the tiny Flux.1, and the pieces of lora_vision/training/dit/fsdp.py in one process.

- the frozen transformer is sharded (each process holds half of it), the LoRA is whole on every process;
- 2 processes x batch 1 under FSDP give the adapter and loss curves (training and held-out) of 1 process x batch 2
  (float32 rounding);
- a checkpoint written under FSDP resumes under FSDP and ends bit for bit where the unbroken FSDP run ends;
- the SD (UNet) recipe refuses FSDP, saying why; FSDP settings the recipe cannot honour are refused, each named.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lora_vision.models.dit import build_tiny_dit
from lora_vision.training.dit.fsdp import (CONFIG, block_classes, fsdp_refusals, fsdp_run_refusals,
                                           shard_frozen_base)
from lora_vision.training.sd.config import SDTrainConfig

from test_distributed import _free_port, _in_process, _max_diff, _weights, instance_dir  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    # accelerate keeps CPU processes MULTI_CPU even with an FSDP config; the recipe reads the exported FSDP settings
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="true")


def _fsdp_launch(args: list[str], expect: int = 0) -> str:
    """`accelerate launch --config_file configs/accelerate/fsdp_dit.yaml --num_processes 2` on CPU processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIG, "--num_processes", "2",
           "--main_process_port", str(_free_port()), *args]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    text = done.stdout + done.stderr
    assert done.returncode == expect, text[-4000:]
    return text


def _flux_args(instance: Path, out: Path, batch: int, steps: int = 4, *extra: str) -> list[str]:
    return ["scripts/train_sd.py", "--pretrained_model_name_or_path", "tiny-flux", "--instance_data_dir",
            str(instance), "--instance_prompt", "a photo of sks toy", "--output_dir", str(out), "--max_train_steps",
            str(steps), "--train_batch_size", str(batch), "--logging_steps", "1", "--report_to", "none",
            "--strength_sweep=", "--learning_rate", "1e-3", "--checkpointing_steps", "2", "--export_kohya", "false",
            "--max_sequence_length", "16", "--validation_split", "0.34", "--validation_steps", "2", *extra]


def _losses(out: Path, column: int = 1) -> list[float]:
    """loss.csv's training losses (column 1) or held-out validation losses (column 3, the steps that have one)."""
    rows = [r.split(",") for r in (out / "logs" / "loss.csv").read_text().splitlines()[1:]]
    return [float(r[column]) for r in rows if r[column]]


@pytest.mark.slow
def test_flux_under_fsdp_equals_one_process_at_twice_the_batch_and_resumes_exactly(instance_dir: Path,
                                                                                    tmp_path: Path) -> None:
    fsdp, one, resumed = tmp_path / "fsdp", tmp_path / "one", tmp_path / "resumed"
    log = _fsdp_launch(_flux_args(instance_dir, fsdp, batch=1))
    assert "the frozen transformer is sharded over 2 processes" in log, log[-3000:]
    _in_process(_flux_args(instance_dir, one, batch=2), None)  # 1 process, here (no second start-up)
    a, b = _weights(fsdp / "adapter.safetensors"), _weights(one / "adapter.safetensors")
    moved = max(float(b[k].abs().max()) for k in b if k.endswith("lora_B.weight"))  # B starts at 0
    assert moved > 1e-4, "training did not change the weights; the comparison below would prove nothing"
    # same global batches, noise and noise levels; float32 sums over half batches: rounding only
    assert _max_diff(a, b) < 1e-5 * max(1.0, moved * 100), _max_diff(a, b)
    assert all(abs(x - y) < 1e-5 for x, y in zip(_losses(fsdp), _losses(one))), (_losses(fsdp), _losses(one))
    assert len(_losses(fsdp)) == 4
    # the held-out loss runs the sharded transformer on every process (the main one alone would wait forever)
    assert len(_losses(fsdp, 3)) == 2 and all(abs(x - y) < 1e-5 for x, y in zip(_losses(fsdp, 3), _losses(one, 3)))
    # the FSDP checkpoint of step 2 resumes under FSDP and ends exactly where the unbroken FSDP run ends
    shutil.copytree(fsdp / "checkpoint-2", resumed / "checkpoint-2")
    _fsdp_launch(_flux_args(instance_dir, resumed, 1, 4, "--resume_from_checkpoint", "latest"))
    r = _weights(resumed / "adapter.safetensors")
    assert r.keys() == a.keys() and all(r[k].equal(a[k]) for k in a), _max_diff(r, a)
    assert _losses(resumed) == _losses(fsdp)[2:]  # its log starts after the checkpoint


@pytest.mark.slow
def test_sd_recipe_refuses_fsdp_and_says_why(instance_dir: Path, tmp_path: Path) -> None:
    args = ["scripts/train_sd.py", "--pretrained_model_name_or_path", "tiny-sd1", "--instance_data_dir",
            str(instance_dir), "--instance_prompt", "a photo of sks toy", "--output_dir", str(tmp_path / "out"),
            "--max_train_steps", "1"]
    text = _fsdp_launch(args, expect=1)
    assert "sd1 is a UNet, which fits one GPU with its LoRA, so sharding it saves nothing" in text
    assert "configs/accelerate/multi_gpu.yaml" in text
    assert 'train_sd.py", line' not in text, "the script raised instead of ending with its one-line error"
    assert not (tmp_path / "out").exists(), "a refused start left its output folder behind"


def _plugin(**kw):
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(**{"fsdp_version": 2, "auto_wrap_policy": "transformer_based_wrap", **kw})


def test_fsdp_settings_the_recipe_cannot_honour_are_each_named() -> None:
    assert fsdp_refusals(_plugin(), "no") == []
    bad = " | ".join(fsdp_refusals(_plugin(fsdp_version=1, auto_wrap_policy="no_wrap"), "bf16"))
    assert "fsdp_version 1" in bad and "set fsdp_version: 2" in bad
    assert "NO_WRAP" in bad and "TRANSFORMER_BASED_WRAP" in bad
    assert "mixed_precision bf16" in bad and "--mixed_precision" in bad


def test_recipe_settings_a_sharded_run_cannot_honour_are_each_named(tmp_path: Path) -> None:
    assert fsdp_run_refusals(SDTrainConfig()) == []
    cfg = SDTrainConfig(compile=True, validation_prompt="a dog", with_prior_preservation=True,
                        class_data_dir=str(tmp_path / "class"), num_class_images=3, class_prompt="a toy")
    bad = " | ".join(fsdp_run_refusals(cfg))
    assert "--compile" in bad and "--validation_prompt" in bad
    assert f"3 of 3 class images missing from {tmp_path / 'class'}" in bad


def test_the_wrapped_blocks_are_the_family_blocks_or_the_named_ones() -> None:
    transformer = build_tiny_dit("tiny-flux").transformer
    assert {c.__name__ for c in block_classes(transformer, _plugin())} == {"FluxTransformerBlock",
                                                                          "FluxSingleTransformerBlock"}
    named = _plugin(transformer_cls_names_to_wrap=["FluxSingleTransformerBlock"])
    assert {c.__name__ for c in block_classes(transformer, named)} == {"FluxSingleTransformerBlock"}
    wrong = r"'UNetBlock'.*no such module in FluxTransformer2DModel.*FluxTransformerBlock"
    with pytest.raises(ValueError, match=wrong):
        block_classes(transformer, _plugin(transformer_cls_names_to_wrap=["UNetBlock"]))


def test_sharding_leaves_the_lora_whole_and_the_output_unchanged() -> None:
    """One gloo process: every frozen weight becomes a DTensor, the LoRA stays plain tensors, same outputs."""
    import lora_vision as lv
    from lora_vision.models.dit import transformer_inputs, transformer_output

    pipe = build_tiny_dit("tiny-flux")
    transformer = pipe.transformer.requires_grad_(False)
    torch.manual_seed(0)
    lv.inject_lora(transformer, lv.LoRAConfig(rank=4, targets="flux-attn-ff"))
    for p in lv.lora_parameters(transformer):
        torch.nn.init.normal_(p, std=0.1)  # B away from zero, so the LoRA path counts in the output
    inputs = transformer_inputs(transformer, seed=0)
    with torch.no_grad():
        before = transformer_output(transformer, inputs)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        units = shard_frozen_base(transformer, _plugin(), torch.device("cpu"))
        lora = {id(p) for p in lv.lora_parameters(transformer)}
        assert units == 1 + sum(type(m).__name__.endswith("TransformerBlock") for m in transformer.modules())
        assert {type(p).__name__ for p in transformer.parameters() if id(p) in lora} == {"Parameter"}
        assert {type(p).__name__ for p in transformer.parameters() if id(p) not in lora} == {"DTensor"}
        with torch.no_grad():
            after = transformer_output(transformer, inputs)
        torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()
