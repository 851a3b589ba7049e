#!/usr/bin/env python
"""Fine-tune a ViT classifier on an ImageNet subset (or any ImageFolder tree): LoRA, full fine-tuning or a linear probe.

    accelerate launch scripts/train_vit.py --model_name_or_path google/vit-base-patch16-224-in21k \\
        --train_dir /data/imagenet/train --validation_dir /data/imagenet/val --subset imagenette \\
        --mode lora --rank 16 --mixed_precision bf16 --output_dir out/vit-imagenette
    python scripts/train_vit.py                 # offline demo: tiny ViT on samples/vit/train (seconds on a CPU)
    python scripts/train_vit.py --compare       # lora, full and linear-probe with the same data and seed

Flags follow transformers' image-classification example; `--config FILE.yaml` takes the same keys. Outputs in
output_dir: adapter.safetensors (LoRA + head, lora_vision format), peft/ (PeftModel.from_pretrained), merged/
(--save_merged), model/ (full, linear-probe), the same with an _ema suffix (--use_ema), metrics.json,
train_config.yaml, checkpoint-<step>/.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

_T_START = time.perf_counter()  # before the heavy imports: the time to the first step counts them (issue #17)

import torch  # noqa: E402
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lora_vision import LoRAConfig, count_parameters, inject_lora, lora_report
from lora_vision.data.imagenet import ImageListDataset, build_subset, build_transforms
from lora_vision.data.vtab import build_vtab_subset
from lora_vision.dtypes import parse_dtype
from lora_vision.io import write_safetensors
from lora_vision.lora.config import ConfigError
from lora_vision.lora.weight_init import WEIGHT_INITS, init_from_weights_
from lora_vision.models.vit import freeze_to, load_vit, lora_targets
from lora_vision.training.checkpoint import (StopOnInterrupt, TrainableWeights, TrainingInterrupted, check_resume_step,
                                             end_process_group, find_checkpoint, new_run_id, prepare_output_dir, restore_rng)
from lora_vision.training.vit.compare import write_comparison
from lora_vision.training.vit.config import MODES, ViTTrainConfig
from lora_vision.training.vit.run import (RunState, evaluated_weights, export, interrupted_error,
                                          load_run_checkpoint, optimizer_groups, save_run_checkpoint)
from lora_vision.training.vit.data import EpochSampler, SeededAugment
from lora_vision.training.vit.evaluate import evaluate
from lora_vision.training.vit.precision import MasterWeights
from lora_vision.training.config import load_config, save_config
from lora_vision.training.ema import EMA
from lora_vision.training.first_step import report_first_step
from lora_vision.training.optim import LRSchedule, build_optimizer, eval_mode

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> ViTTrainConfig:
    """Flags and --config YAML -> a validated ViTTrainConfig (all problems in one error)."""
    cfg = load_config(ViTTrainConfig, argv, prog="train_vit.py", description=__doc__.splitlines()[0])
    # The offline defaults live in the repository: find them from any working directory.
    fix = {k: str(REPO / v) for k, v in (("model_name_or_path", cfg.model_name_or_path), ("train_dir", cfg.train_dir))
           if v.startswith("samples/") and not Path(v).exists() and (REPO / v).exists()}
    return dataclasses.replace(cfg, **fix) if fix else cfg


def frozen_dtype(cfg: ViTTrainConfig) -> torch.dtype:
    """dtype of the frozen weights: half precision only under autocast of that type."""
    if cfg.base_dtype != "auto":
        return parse_dtype(cfg.base_dtype, "--base_dtype")
    return parse_dtype(cfg.mixed_precision, "--mixed_precision")


def forward_fn(model: torch.nn.Module, family: str):
    """A function images -> logits for this model family."""
    if family == "hf":
        return lambda x: model(pixel_values=x).logits
    return lambda x: model(x)


def build_model(cfg: ViTTrainConfig, mode: str, classes: list[str]):
    """Load the model with a new head and make the right parameters trainable for `mode`."""
    loaded = load_vit(cfg.model_name_or_path, len(classes), cfg.weights, classes, seed=cfg.seed)
    model, head = loaded.model, loaded.model.get_submodule(loaded.head_name)
    lora_cfg, starts = None, None
    if mode == "lora":
        lora_cfg = LoRAConfig(rank=cfg.rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                              init=cfg.init if cfg.init not in WEIGHT_INITS else "kaiming",
                              targets=lora_targets(loaded, cfg.targets), rank_pattern=cfg.rank_pattern,
                              **cfg.kind_settings())
        inject_lora(model, lora_cfg)  # freezes everything else
        if cfg.init in WEIGHT_INITS:  # before freeze_to: the residual is computed from the fp32 weights
            starts = init_from_weights_(model, cfg.init)
        head.requires_grad_(True)
    elif mode == "linear-probe":
        model.requires_grad_(False)
        head.requires_grad_(True)
    else:
        model.requires_grad_(True)
    if mode != "full":
        freeze_to(model, frozen_dtype(cfg))
    return loaded, lora_cfg, starts


def build_loaders(cfg: ViTTrainConfig, subset, pre, cuda: bool):
    """Training loader (seeded order and augmentation, see EpochSampler) and evaluation loader."""
    train_ds = SeededAugment(ImageListDataset(subset.train, subset.classes, build_transforms(pre, True, cfg.augmentation()),
                                              cfg.skip_corrupt), cfg.seed)
    eval_ds = ImageListDataset(subset.val, subset.classes, build_transforms(pre, False), cfg.skip_corrupt)
    sampler = EpochSampler(len(train_ds), cfg.seed)
    common = {"num_workers": cfg.dataloader_num_workers, "pin_memory": cuda,
              "persistent_workers": cfg.dataloader_num_workers > 0,
              "generator": torch.Generator().manual_seed(cfg.seed)}  # never draw from the global RNG
    train = DataLoader(train_ds, batch_size=cfg.per_device_train_batch_size, sampler=sampler, **common)
    evl = DataLoader(eval_ds, batch_size=cfg.per_device_eval_batch_size, shuffle=False, **common)
    return train, evl, sampler


def train_one(cfg: ViTTrainConfig, mode: str, out: Path, accelerator, subset, ckpt: Path | None = None,
              label: str | None = None, t_start: float | None = None) -> dict:
    """Train one mode end to end, resuming from checkpoint `ckpt`; returns its metrics (also out/metrics.json).
    `label` names the run in messages and the comparison (a LoRA variant of --compare); default: the mode. With
    `t_start` (the process start), the time to this run's first optimizer step is printed."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    loaded, lora_cfg, starts = build_model(cfg, mode, subset.classes)
    raw = loaded.model
    trainable_params = [p for p in raw.parameters() if p.requires_grad]
    n_train, n_total = count_parameters(raw)
    run = RunState(label or mode, run_id=new_run_id())
    accelerator.print(f"[{run.mode}] " + (lora_report(raw, loaded.source) if mode == "lora" else
                                          f"{n_train:,} trainable parameters of {n_total:,} "
                                          f"({100 * n_train / n_total:.2f}%)"))
    train_loader, eval_loader, sampler = build_loaders(cfg, subset, loaded.preprocessing,
                                                       accelerator.device.type == "cuda")
    lr = cfg.lr(mode)
    master, weights = None, TrainableWeights.of_model(raw)
    if cfg.pure_bf16:  # bf16 everywhere, no autocast casts; the optimizer steps fp32 copies (what a checkpoint keeps)
        raw.to(torch.bfloat16)
        master = MasterWeights(trainable_params)
        weights = TrainableWeights(dict(zip(weights.params, master.master)))
    opt_params = master.master if master else trainable_params
    groups = optimizer_groups(raw, lr, cfg.loraplus_lr_ratio if mode == "lora" else None,
                              dict(zip(trainable_params, master.master)) if master else None)
    base_lrs = [g["lr"] for g in groups]
    optimizer = build_optimizer(groups, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8,
                                name=cfg.optimizer)
    ema = EMA(opt_params, cfg.ema_decay, "cpu" if cfg.ema_cpu else None) if cfg.use_ema else None
    model = torch.compile(raw) if cfg.torch_compile else raw
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
    total = cfg.max_train_steps or cfg.num_train_epochs * per_epoch
    epochs = math.ceil(total / per_epoch)
    warm = cfg.num_warmup_steps if cfg.num_warmup_steps is not None else int(cfg.warmup_ratio * total)
    schedule = LRSchedule(cfg.lr_scheduler_type, warm, total)
    plain = forward_fn(model, loaded.family)
    fwd = (lambda x: plain(x.to(torch.bfloat16))) if master else plain

    start_epoch, skip = 0, 0
    carried: list[torch.Tensor] = []  # the losses of a resumed epoch's first part: its mean covers all of them
    if cfg.resume_from_checkpoint:
        if ckpt is None:
            accelerator.print(f"[{run.mode}] no checkpoint in {out}; starting from scratch")
        else:
            check_resume_step(ckpt, total)
            st = load_run_checkpoint(ckpt, weights, optimizer.optimizer, ema, master)
            restore_rng(st["rng_tensors"], st.get("rng", {}))
            run.run_id = st.get("run_id")
            run.step, start_epoch, skip = st["step"], st["epoch"], st["batch_in_epoch"]
            run.history, run.seen, run.train_time = st["history"], st["seen"], st["train_time_s"]
            carried = [torch.tensor(v, device=accelerator.device) for v in st.get("epoch_losses", [])]
            accelerator.print(f"[{run.mode}] resumed from {ckpt} (step {run.step}, epoch {start_epoch + 1})")
    is_main = accelerator.is_main_process

    bar = tqdm(total=total, initial=run.step, desc=f"train {run.mode}", disable=not accelerator.is_local_main_process)
    with StopOnInterrupt() as stop:  # the first Ctrl-C stops after the current step, with a checkpoint
        for epoch in range(start_epoch, epochs):
            if run.step >= total:
                break
            model.train()
            loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
            # accelerate's loaders call set_epoch(<their own iteration count>) on the sampler when iterated: set
            # theirs.
            for obj in (sampler, loader):
                if hasattr(obj, "set_epoch"):
                    obj.set_epoch(epoch)
            # accelerate groups micro-batches by its own counter, which runs on across epochs: restart it per epoch
            # (at `skip` on resume, a multiple of gradient_accumulation_steps) so grouping never depends on history.
            accelerator.step = skip
            batch, skip, losses, carried = skip, 0, carried, []
            t0 = time.perf_counter()
            t_first = t0 if t_start is not None and epoch == start_epoch else None  # the first step loads its batch
            for x, y in loader:
                with accelerator.accumulate(model):
                    loss = F.cross_entropy(fwd(x).float(), y, label_smoothing=cfg.label_smoothing)
                    accelerator.backward(loss)
                    if master:
                        master.grads_to_master()
                    if accelerator.sync_gradients:
                        if cfg.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(opt_params, cfg.max_grad_norm)
                        schedule.apply(optimizer, base_lrs, run.step)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        if master:
                            master.master_to_model()
                        if ema is not None:
                            ema.update()
                batch += 1
                run.seen += x.shape[0] * accelerator.num_processes
                losses.append(loss.detach())
                if accelerator.sync_gradients:
                    run.step += 1
                    bar.update(1)
                    if t_first is not None:  # one sync: what compiling and the first step cost
                        if is_main:
                            report_first_step(accelerator.device, t_start, t_first, cfg.torch_compile,
                                              prefix=f"[{run.mode}] ")
                        t_first = None
                    if run.step % cfg.logging_steps == 0:
                        bar.set_postfix(loss=f"{float(loss.detach()):.4f}",
                                        lr=f"{lr * schedule.factor(run.step - 1):.2e}")
                    saving = bool(cfg.checkpointing_steps) and run.step % cfg.checkpointing_steps == 0
                    if saving and run.step < total:
                        run.train_time += _elapsed(t0, accelerator)
                        save_run_checkpoint(cfg, out, run, weights, optimizer.optimizer, epoch, batch, losses, is_main,
                                            ema)
                        t0 = time.perf_counter()
                    # at an epoch's end the stop waits for its evaluation
                    if batch < len(train_loader) and _should_stop(stop, accelerator, run.step, total, cfg):
                        if not saving:
                            run.train_time += _elapsed(t0, accelerator)
                            save_run_checkpoint(cfg, out, run, weights, optimizer.optimizer, epoch, batch, losses,
                                                is_main, ema)
                        bar.close()
                        raise interrupted_error(cfg, run, total, out, __file__, accelerator.num_processes)
                    if run.step >= total:
                        break
            run.train_time += _elapsed(t0, accelerator)
            model.eval()
            with evaluated_weights(optimizer.optimizer, ema, master):  # the EMA / schedule-free average when on
                metrics = evaluate(fwd, eval_loader, accelerator.device, accelerator.gather_for_metrics)
            train_loss = float(torch.stack(losses).float().mean()) if losses else float("nan")
            run.history.append({"epoch": epoch + 1, "step": run.step, "train_loss": round(train_loss, 5),
                                "top1": metrics["top1"], "top5": metrics["top5"], "val_loss": round(metrics["loss"], 5)})
            accelerator.print(f"[{run.mode}] epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}, "
                              f"val loss {metrics['loss']:.4f}, val top-1 {metrics['top1']:.2f}%, "
                              f"top-5 {metrics['top5']:.2f}%" + (" (EMA weights)" if ema is not None else ""))
            stopping = _should_stop(stop, accelerator, run.step, total, cfg)
            if (cfg.checkpointing_steps or stopping) and run.step < total:
                save_run_checkpoint(cfg, out, run, weights, optimizer.optimizer, epoch + 1, 0, [], is_main, ema)
            if stopping:
                bar.close()
                raise interrupted_error(cfg, run, total, out, __file__, accelerator.num_processes)
    bar.close()
    accelerator.wait_for_everyone()
    history = run.history
    result = {"mode": run.mode, "model": loaded.source, "classes": len(subset.classes),
              "train_images": len(subset.train), "val_images": len(subset.val), "split": subset.split,
              "trainable": n_train, "total": n_total, "trainable_pct": 100.0 * n_train / n_total,
              "top1": history[-1]["top1"] if history else float("nan"),
              "top5": history[-1]["top5"] if history else float("nan"),
              "val_loss": history[-1]["val_loss"] if history else float("nan"), "steps": run.step,
              "train_time_s": round(run.train_time, 3), "images_per_s": round(run.seen / max(run.train_time, 1e-9), 2),
              "history": history}

    def fp32_to_model() -> None:
        if master:  # export the fp32 values of what was trained
            for p, m in zip(trainable_params, master.master):
                p.data = m.detach().clone()

    with eval_mode(optimizer.optimizer):  # schedule-free: its averaged weights are the result
        fp32_to_model()
        dump = os.environ.get("LORA_VISION_DUMP_RANK_LORA")
        if dump:  # debugging/tests: every process writes the trainable weights it holds, to compare processes
            Path(dump).mkdir(parents=True, exist_ok=True)
            write_safetensors(Path(dump) / f"rank{accelerator.process_index}.safetensors",
                              {n: p.detach().float().cpu().contiguous() for n, p in raw.named_parameters()
                               if p.requires_grad})
        if accelerator.is_main_process:
            result.update(export(cfg, mode, out, loaded, lora_cfg, subset.classes, history, starts))
            if ema is not None:  # what the evaluations above measured
                with ema.swapped_in():
                    fp32_to_model()
                    result["ema_artifact"] = export(cfg, mode, out, loaded, lora_cfg, subset.classes, history,
                                                    suffix="_ema")["artifact"]
            (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    accelerator.free_memory()
    return result


def _should_stop(stop: StopOnInterrupt, accelerator, step: int, total: int, cfg: ViTTrainConfig) -> bool:
    """Whether a Ctrl-C asks to stop after optimizer step `step` (never after the last one)."""
    return step < total and stop.should_stop(accelerator, step, cfg.logging_steps)


def _elapsed(t0: float, accelerator) -> float:
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_plan(cfg: ViTTrainConfig) -> dict[str, tuple[str, ViTTrainConfig]]:
    """{run name: (mode, its config)}: the one mode, or with --compare lora, its variants (lora-pissa, lora-olora,
    lora-loraplus), full and linear-probe."""
    if not cfg.compare:
        return {cfg.mode: (cfg.mode, cfg)}
    plain = cfg.plain_lora()
    runs = {"lora": ("lora", plain)}
    runs.update({f"lora-{v}": ("lora", cfg.variant(v)) for v in cfg.compare_variants})
    runs.update({m: (m, plain) for m in MODES if m != "lora"})
    return runs


def main(argv: list[str] | None = None) -> int:
    """Parse, build the subset once, train the mode(s), write the comparison."""
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState, GradientState

    cfg = parse_args(argv)
    if not PartialState._shared_state or not PartialState().use_distributed:
        # accelerate keeps one global state per process; a second main() in the same (non-distributed) process,
        # e.g. a notebook or a test, may ask for another mixed precision, which it would refuse.
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    if cfg.vtab_task:
        subset = build_vtab_subset(cfg.train_dir, cfg.vtab_task, cfg.vtab_split)
    else:
        subset = build_subset(cfg.train_dir, cfg.validation_dir, cfg.classes or None, cfg.class_list,
                              cfg.first_n_classes, cfg.subset, cfg.train_val_split, cfg.seed, cfg.verify_images,
                              cfg.skip_corrupt)
    accelerator.print(f"{len(subset.classes)} classes, {len(subset.train)} training and {len(subset.val)} "
                      f"validation images (split: {subset.split})")
    out = Path(cfg.output_dir)
    runs = run_plan(cfg)
    folders = {m: out / m if cfg.compare else out for m in runs}
    resume = {m: find_checkpoint(f, cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else None
              for m, f in folders.items()}
    for m, folder in folders.items():  # before anything is written: refuse a folder holding another run's checkpoints
        for note in prepare_output_dir(folder, resume[m] is not None, cfg.overwrite_output_dir,
                                       accelerator.is_main_process):
            accelerator.print(f"[{m}] {note}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "train_config.yaml")
    try:
        results = {m: train_one(run_cfg, mode, folders[m], accelerator, subset, resume[m], label=m,
                                t_start=_T_START if i == 0 else None)  # the start-up cost: the first run's
                   for i, (m, (mode, run_cfg)) in enumerate(runs.items())}
    except TrainingInterrupted as stop:
        if accelerator.is_main_process:
            print(stop, file=sys.stderr)
        return 130
    if cfg.compare and accelerator.is_main_process:
        written = write_comparison(results, out)
        accelerator.print((out / "compare.md").read_text() + "wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    code = 1
    try:
        code = main()
        sys.exit(code)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except ImportError as err:  # an optional package of the chosen feature (--optimizer prodigy, ...)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # outside the training loop (in it, the first Ctrl-C saves a checkpoint)
        print("\ninterrupted; the checkpoints already written are complete and kept (resume with "
              "--resume_from_checkpoint latest)", file=sys.stderr)
        sys.exit(130)
    finally:
        end_process_group(clean=code == 0)  # a clean end: the processes leave together
