"""The pieces of one scripts/train_vit.py run outside its loop: checkpoints, interruption, the optimizer groups, the
weights that evaluation and export see (schedule-free's average, the EMA) and the export of what a mode produced
(adapter + peft folder + processor file, merged or full model, head)."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ...adapter import Adapter
from ...formats.peft import export_peft
from ...io import atomic_write_text, write_safetensors
from ...lora.weight_init import StartPoint, to_plain_delta_
from ...metadata import AdapterMetadata
from ...models.vit import PROCESSOR_FILE, LoadedViT, merged_copy, save_model
from ..checkpoint import (CheckpointError, TrainingInterrupted, TrainableWeights, load_checkpoint,
                          read_checkpoint_tensors, resume_command, rng_state, save_checkpoint)
from ..config import config_to_dict
from ..ema import EMA
from ..optim import eval_mode, loraplus_param_groups
from .config import ViTTrainConfig
from .precision import MasterWeights


@dataclass
class RunState:
    """What a checkpoint of one mode records besides the weights, optimizer and RNG states."""

    mode: str
    step: int = 0
    epoch: int = 0
    seen: int = 0
    train_time: float = 0.0
    history: list[dict] = field(default_factory=list)
    run_id: str | None = None


def save_run_checkpoint(cfg: ViTTrainConfig, out: Path, state: RunState, weights: TrainableWeights, optimizer: Any,
                        epoch: int, batch: int, losses: list[torch.Tensor], is_main: bool,
                        ema: EMA | None = None) -> None:
    """checkpoint-<step> in `out` (main process only): weights, optimizer, RNG, where in the epoch the run is, and
    the EMA (ema.safetensors). A schedule-free optimizer saves its averaged weights (load_run_checkpoint swaps back
    exactly as an unbroken run does)."""
    if not is_main:
        return
    extra = {"epoch": epoch, "batch_in_epoch": batch, "history": state.history, "seen": state.seen,
             "train_time_s": state.train_time, "mode": state.mode, "epoch_losses": [float(v) for v in losses]}
    files = {"ema.safetensors": ema.state_tensors()} if ema is not None else None
    with eval_mode(optimizer):
        save_checkpoint(out, state.step, weights, optimizer, rng_state(), config_to_dict(cfg),
                        cfg.checkpoints_total_limit, extra, state.run_id, tensor_files=files)


def load_run_checkpoint(ckpt: Path, weights: TrainableWeights, optimizer: Any, ema: EMA | None,
                        master: MasterWeights | None) -> dict[str, Any]:
    """Put checkpoint `ckpt` (save_run_checkpoint) back into this run; returns its state. CheckpointError when it
    does not fit (e.g. written without --use_ema)."""
    with eval_mode(optimizer):  # a schedule-free checkpoint holds the averaged weights: swap back after loading
        state = load_checkpoint(ckpt, weights, optimizer)
    if ema is not None:
        try:
            ema.load_state_tensors(read_checkpoint_tensors(ckpt, "ema.safetensors", "--use_ema"), str(ckpt))
        except ValueError as err:
            raise CheckpointError(str(err)) from None
    if master:
        master.master_to_model()
    return state


@contextlib.contextmanager
def evaluated_weights(optimizer: Any, ema: EMA | None, master: MasterWeights | None) -> Iterator[None]:
    """Inside the block the model holds the weights that evaluation reports and export saves: the EMA when on,
    else schedule-free's average (eval_mode), else the trained weights; the trained weights are back after, bit for
    bit. With pure bf16 (`master`) the fp32 copies are what is swapped, and the model follows them."""
    with eval_mode(optimizer), (ema.swapped_in() if ema is not None else contextlib.nullcontext()):
        if master:
            master.master_to_model()
        yield
    if master:
        master.master_to_model()


def interrupted_error(cfg: ViTTrainConfig, state: RunState, total: int, out: Path, script: str,
                      num_processes: int) -> TrainingInterrupted:
    """The error that ends an interrupted run: where it stopped, the checkpoint, the command that resumes it."""
    return TrainingInterrupted(f"[{state.mode}] interrupted at step {state.step} of {total}; saved "
                               f"{out / f'checkpoint-{state.step}'}. Resume with:\n  "
                               + resume_command(script, Path(cfg.output_dir) / "train_config.yaml", num_processes))


def optimizer_groups(model: torch.nn.Module, lr: float, ratio: float | None,
                     master: dict[torch.nn.Parameter, torch.nn.Parameter] | None = None) -> list[dict]:
    """Parameter groups of the trainable parameters (LoRA+ when `ratio` is set); `master` maps each parameter to
    the fp32 copy the optimizer steps instead (pure bf16)."""
    groups = loraplus_param_groups([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr, ratio)
    if master:
        groups = [dict(g, params=[master[p] for p in g["params"]]) for g in groups]
    return groups


def save_processor(loaded: LoadedViT, folder: Path) -> None:
    """preprocessor_config.json in `folder` (transformers models): the recipe's preprocessing as a transformers
    image processor, so that AutoImageProcessor / pipeline("image-classification") preprocess as the recipe did."""
    if loaded.family == "hf":
        text = json.dumps(loaded.preprocessing.processor_config(), indent=2) + "\n"
        atomic_write_text(folder / PROCESSOR_FILE, text)


def export(cfg: ViTTrainConfig, mode: str, out: Path, loaded: LoadedViT, lora_cfg: Any, classes: list[str],
           history: list[dict], starts: dict[str, StartPoint] | None = None, suffix: str = "") -> dict:
    """Save what the mode produced; returns the artifact name and size for the comparison table. `suffix` goes
    after every name (adapter_ema.safetensors, peft_ema/, ... for the EMA weights).

    PiSSA / OLoRA runs (`starts`) are first turned back into a plain update on the ORIGINAL base weights
    (lora_vision.lora.weight_init.to_plain_delta_: rank 2r), so the adapter file and the peft folder work on the
    base model users have; the merged model is the trained one either way.
    """
    meta = AdapterMetadata(base=loaded.source, family=loaded.family, mode=mode, classes=list(classes),
                           preprocessing=loaded.preprocessing.to_dict(),
                           top1=f"{history[-1]['top1']:.3f}" if history else "",
                           init=cfg.init if mode == "lora" and starts else None).to_strings()
    if mode == "lora":
        if starts:
            to_plain_delta_(loaded.model, starts)
        adapter = Adapter.from_models({"model": loaded.model}, metadata=meta, configs={"model": lora_cfg},
                                      full_modules={"model": [loaded.head_name]})
        path = adapter.save(out / f"adapter{suffix}.safetensors")
        if cfg.save_peft:
            base = None if loaded.source.startswith("tiny-") else loaded.source
            export_peft(adapter, out / f"peft{suffix}", base_model_name_or_path=base)
            save_processor(loaded, out / f"peft{suffix}")
        if cfg.save_merged:
            save_model(loaded, out / f"merged{suffix}", merged_copy(loaded.model))
            save_processor(loaded, out / f"merged{suffix}")
        return {"artifact": f"adapter{suffix}.safetensors", "artifact_bytes": path.stat().st_size}
    save_model(loaded, out / f"model{suffix}")
    save_processor(loaded, out / f"model{suffix}")
    if mode == "linear-probe":
        head = loaded.model.get_submodule(loaded.head_name)
        path = write_safetensors(out / f"head{suffix}.safetensors",
                                 {f"full.model.{loaded.head_name}.{k}": v.detach().cpu()
                                  for k, v in head.state_dict().items()}, meta)
        return {"artifact": f"head{suffix}.safetensors", "artifact_bytes": path.stat().st_size}
    size = sum(p.stat().st_size for p in (out / f"model{suffix}").glob("*.safetensors"))
    return {"artifact": f"model{suffix}/*.safetensors", "artifact_bytes": size}
