"""The state of the DreamBooth training loop (scripts/train_sd.py), as small objects instead of closures.

- `TrainingSteps`: draws each step's batches (instance and class rows, fresh noise and timesteps) and runs one
  optimizer step, eagerly (gradient accumulation) or as the static step that can be captured in a CUDA graph; on
  several processes both average the gradients through one flat GradientBucket (no DDP wrapper).
- `LossLog`: keeps the losses on the device and brings them to the host every `logging_steps` (the loop's only
  sync), stopping on a NaN/Inf loss; writes logs/loss.csv, TensorBoard and the progress bar.
- `Checkpoints`: writes this run's checkpoint-N (main process) after flushing the log.
- `resume_from`: checks a checkpoint's settings against this run's and restores weights, optimizer and RNGs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ...generation.images import save_png
from ...models.dit import DIT_KINDS
from ..dit.fsdp import CONFIG as FSDP_CONFIG, fsdp_plugin
from ...io import write_safetensors
from ...lora import lora_state_dict
from ..checkpoint import (CheckpointError, StopOnInterrupt, load_checkpoint, read_checkpoint_tensors, read_state,
                          restore_rng, resume_command, rng_state, save_checkpoint)
from ..ema import EMA
from ..first_step import report_first_step
from ..profiling import StepProfiler
from ..optim import eval_mode
from .caching import BatchSampler, BucketCache, TextTable
from .captions import CaptionVariants
from .config import SDTrainConfig
from .pivotal import FILE as TOKENS_FILE, NewTokens
from .samples import validation_grid
from .step import (GradientBucket, Inputs, StaticStep, StepSettings, clip_and_step, gather_inputs, shard_inputs,
                   step_loss)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


def check_losses(losses: torch.Tensor, first_step: int, last_good: Path | None) -> list[float]:
    """Bring the logged losses to the host (the loop's only sync); stop on the first NaN/Inf, naming its step."""
    values = losses.float().cpu().tolist()
    for i, v in enumerate(values):
        if not math.isfinite(v):
            kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"the loss became {v} at step {first_step + i + 1}; training stopped and nothing after that step "
                f"was saved ({kept}). Lower --learning_rate, use --mixed_precision bf16 instead of fp16, or "
                "set --max_grad_norm")
    return values


def check_distributed(acc: Any, family: str | None = None) -> None:
    """ValueError unless the run is one process, DDP, or FSDP of a DiT family (`family` None: not known yet).

    A UNet family (sd1, sd2, sdxl) refuses FSDP: the UNet and its LoRA fit one GPU, so sharding saves nothing and
    DDP is faster. The DiT families shard their frozen transformer (Flux.1 is 24 GB in bf16; training/dit/fsdp.py).
    """
    kind = acc.distributed_type.name
    if kind == "FSDP" or fsdp_plugin(acc) is not None:
        if family is not None and family not in DIT_KINDS.values():
            raise ValueError(f"train_sd.py shards only the DiT transformers with FSDP; {family} is a UNet, which "
                             "fits one GPU with its LoRA, so sharding it saves nothing: use "
                             "configs/accelerate/multi_gpu.yaml (DDP)")
        return
    if kind not in ("NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU"):
        raise ValueError(f"train_sd.py runs on one process, under DDP (accelerate's multi_gpu) or, for the DiT "
                         f"families, FSDP; not {kind}: use configs/accelerate/multi_gpu.yaml, or {FSDP_CONFIG} for "
                         "a DiT too large for one GPU")


def compile_cache_dir(configured: str | None) -> Path:
    """The folder where torch.compile keeps its compiled kernels between runs (--compile_cache_dir; default
    $XDG_CACHE_HOME/lora_vision/torch_compile, else ~/.cache/lora_vision/torch_compile)."""
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora_vision" / "torch_compile"


def compile_regions(model: nn.Module, cache_dir: Path | None = None, **compile_kwargs: Any) -> int:
    """Regional compilation: torch.compile each of the model's repeated blocks in place (diffusers'
    `_repeated_blocks`: the UNet's BasicTransformerBlock, Flux.1's double and single blocks, ...), not the whole
    model, so the compiler sees a few distinct blocks instead of one graph of all of them. Blocks of one class with
    other shapes (the UNet's widths) get their own compiled version: the recompile limit is raised to fit them.
    With `cache_dir`, inductor's kernels and graphs are kept there (TORCHINDUCTOR_CACHE_DIR), so a later run with
    the same model and shapes loads them instead of compiling. `compile_kwargs` go to torch.compile. Returns the
    number of blocks compiled; a model without `_repeated_blocks` (or none of them inside) is compiled whole (0)."""
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    names = set(getattr(model, "_repeated_blocks", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        model.forward = torch.compile(model.forward, **compile_kwargs)
        return 0
    dynamo = torch._dynamo.config
    for limit in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(dynamo, limit):
            setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def graph_off_reason(cfg: SDTrainConfig, device: torch.device, one_bucket: bool, dtype: torch.dtype) -> str | None:
    """Why the whole step cannot be one CUDA graph on this run (None: it can). It needs CUDA, one batch shape, no
    accumulation, no gradient checkpointing, no 8-bit AdamW (AdamW is torch's capturable fused kernel; Prodigy,
    schedule-free and Adafactor those of training/optim_graph.py), no fp16 (its scaler syncs) and no dropout. EMA, LoRA+
    and per-block learning rates do not stop it: the EMA update runs after each replay, the learning rates are device
    tensors per group. Nor do the loss options: Huber thresholds, debiased and min-SNR weights and masks are device ops
    on the step's buffers, and multires noise is drawn with the other random numbers, outside the graph; nor caption
    shuffle and dropout: the step reads text rows chosen (and, for shuffled captions, encoded into scratch rows) before
    it. Nor do several processes: their gradients are averaged by the GradientBucket's all-reduce inside the graph."""
    if not cfg.cuda_graph or device.type != "cuda":
        return None if cfg.cuda_graph and device.type == "cuda" else "not on CUDA or --cuda_graph false"
    checks = [(one_bucket, "more than one batch shape (buckets)"),
              (cfg.gradient_accumulation_steps == 1, "gradient accumulation"),
              (not cfg.gradient_checkpointing, "gradient checkpointing"),
              (not cfg.use_8bit_adam and cfg.optimizer != "adamw8bit", "--optimizer adamw8bit (bitsandbytes)"),
              (dtype != torch.float16, "fp16 (its loss scaler syncs)"), (cfg.lora_dropout == 0, "LoRA dropout")]
    reasons = [why for ok, why in checks if not ok]
    return ", ".join(reasons) if reasons else None


def graph_possible(cfg: SDTrainConfig, device: torch.device, one_bucket: bool, dtype: torch.dtype) -> bool:
    """Whether the whole step can be one CUDA graph (graph_off_reason gives the reason when not)."""
    return graph_off_reason(cfg, device, one_bucket, dtype) is None


class TrainingSteps:
    """One optimizer step after another over the cached latents, the same on every process (each trains its slice).

    `update(params, optimizer, max_grad_norm, scaler)` clips and steps after the eager backward (clip_and_step).
    On several processes `unet` is the bare denoiser (no DDP wrapper: its hooks cannot sit in a CUDA graph) and
    `bucket`, a GradientBucket over every trained tensor, averages the gradients in both the eager and the static
    step; a denoiser given wrapped in something that reduces its own gradients (DDP, FSDP) keeps them out of it.
    """

    def __init__(self, cfg: SDTrainConfig, acc: Any, unet: nn.Module, table: TextTable, text_encoders: list,
                 ac: torch.Tensor, settings: StepSettings, dtype: torch.dtype, channels_last: bool,
                 inst_cache: Mapping[tuple[int, int], BucketCache],
                 class_cache: Mapping[tuple[int, int], BucketCache] | None, data_rng: np.random.Generator,
                 generator: torch.Generator, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                 update: Callable[..., None] = clip_and_step, captions: CaptionVariants | None = None) -> None:
        self.acc, self.unet, self.table, self.text_encoders, self.ac = acc, unet, table, text_encoders, ac
        self.settings, self.dtype, self.channels_last = settings, dtype, channels_last
        self.rank, self.world, self.device = acc.process_index, acc.num_processes, acc.device
        global_batch = cfg.train_batch_size * self.world  # drawn identically everywhere; each process its slice
        self.inst_cache, self.class_cache = inst_cache, class_cache
        self.inst_sampler = BatchSampler(inst_cache, global_batch, data_rng)
        self.class_sampler = BatchSampler(class_cache, global_batch, data_rng) if class_cache else None
        self.data_rng, self.generator = data_rng, generator
        self.params, self.optimizer, self.update = params, optimizer, update
        wrapped = {id(p) for p in unet.parameters()} if reduces_own_gradients(unet) else set()
        own = [p for p in params if id(p) not in wrapped]
        self.bucket = GradientBucket(own, self.world) if self.world > 1 and own else None
        self.accumulation, self.max_grad_norm = cfg.gradient_accumulation_steps, cfg.max_grad_norm
        self.prior_loss_weight = cfg.prior_loss_weight
        fp16_cuda = dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if fp16_cuda else None  # fp16 gradients need loss scaling
        self.static: StaticStep | None = None
        self.capture_failed = False  # use_static tried to capture the step and fell back to the eager one
        self.captions = captions
        # the instance rows' prompt rows on the host, for the caption variants (one copy at the start)
        self.text_rows = {s: c.text_row.cpu().numpy() for s, c in inst_cache.items()} if captions else {}

    def _gather(self, parts: list) -> Inputs:
        """The batch of these cached rows: noise, timesteps and the model's inputs (the DiT loop overrides it)."""
        return gather_inputs(parts, self.generator, self.settings, self.data_rng)

    def _inputs(self, parts: list, instance_rows: np.ndarray | None = None) -> Inputs:
        x = self._gather(parts)
        if instance_rows is not None:  # caption variants: other text rows for the instance images
            rows = torch.from_numpy(instance_rows).to(self.device, non_blocking=True)
            x = dataclasses.replace(x, text_rows=torch.cat([rows, x.text_rows[x.n_instance:]]))
        return shard_inputs(x, self.rank, self.world)

    def next_inputs(self) -> list[Inputs]:
        """This micro-batch's inputs: one concatenated batch, or instance and class apart when sizes differ."""
        size, rows = self.inst_sampler.next()
        parts = [(self.inst_cache[size], torch.from_numpy(rows).to(self.device, non_blocking=True))]
        variants = self.captions.rows(self.text_rows[size][rows], self.data_rng) if self.captions else None
        if self.class_sampler is None:
            return [self._inputs(parts, variants)]
        csize, crows = self.class_sampler.next()
        cpart = (self.class_cache[csize], torch.from_numpy(crows).to(self.device, non_blocking=True))
        if csize == size:
            return [self._inputs(parts + [cpart], variants)]
        return [self._inputs(parts, variants), self._inputs([cpart])]

    def loss_of(self, x: Inputs) -> torch.Tensor:
        """The DreamBooth loss of one batch."""
        return step_loss(self.unet, x, self.table, self.text_encoders, self.ac, self.settings, self.dtype,
                         self.channels_last)

    def eager_step(self) -> torch.Tensor:
        """One optimizer step in plain PyTorch: the micro-batches' gradients add up in place, then the bucket
        averages them over the processes once (a wrapped denoiser syncs on the last micro-batch only)."""
        total = torch.zeros((), device=self.device)
        if self.bucket is not None:
            self.bucket.attach()
        for micro in range(self.accumulation):
            xs = self.next_inputs()
            loss = self.loss_of(xs[0]) + sum(self.prior_loss_weight * self.loss_of(x) for x in xs[1:])
            loss = loss / self.accumulation
            sync = micro == self.accumulation - 1 or self.world == 1
            with (self.acc.no_sync(self.unet) if not sync else torch.enable_grad()):
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total = total + loss.detach()
        if self.bucket is not None:
            self.bucket.all_reduce()
        self.update(self.params, self.optimizer, self.max_grad_norm, self.scaler)
        return total

    def use_static(self, capture: bool, compile_unet: bool, verbose: bool, cache_dir: Path | None = None) -> None:
        """Switch to the static step (its repeated blocks torch.compile'd with `compile_unet`, compile_regions,
        kernels cached in `cache_dir`; captured as a CUDA graph with `capture`, falling back to the eager step when
        capture fails). Building it draws an example batch: the random generators are put back afterwards, so the
        training sees the same numbers as without it."""
        if compile_unet:
            blocks = compile_regions(self.unet, cache_dir)
            if verbose:
                what = f"{blocks} repeated blocks of the denoiser (regional)" if blocks else "the whole denoiser"
                print(f"torch.compile: {what}" + (f"; kernels cached in {cache_dir}" if cache_dir else ""))
        saved_rng = self.generator.get_state(), self.data_rng.bit_generator.state
        self.static = StaticStep(self.loss_of, self.params, self.optimizer, self.max_grad_norm,
                                 self.next_inputs()[0], self.bucket)
        if capture:
            failed = None
            try:
                self.static.capture(warmup=2)
            except RuntimeError as err:  # e.g. an op that cannot be captured: keep training, eagerly
                failed = str(err)
            if self.world > 1 and not failed and not all_agree(True, self.device):
                failed = "it failed on another process"  # replays meet in the all-reduce: all capture or none
            elif self.world > 1 and failed:
                all_agree(False, self.device)
            if failed:
                print(f"warning: CUDA graph capture failed ({failed}); using the eager step", file=sys.stderr)
                self.static.release()
                self.static = None
                self.capture_failed = True
            elif verbose:
                print("training step captured as one CUDA graph"
                      + (f" (with the gradients' all-reduce over {self.world} processes)" if self.bucket else ""))
        self.generator.set_state(saved_rng[0])
        self.data_rng.bit_generator.state = saved_rng[1]

    def run(self) -> torch.Tensor:
        """One optimizer step; returns its loss as a device tensor (no host sync)."""
        if self.static is None:
            return self.eager_step()
        self.static.load(self.next_inputs()[0])
        return self.static.run()


def reduces_own_gradients(model: nn.Module) -> bool:
    """Whether `model` is wrapped in DDP, which averages its gradients itself, so the training step's
    GradientBucket leaves its parameters out. FSDP (the DiT recipe, training/dit/fsdp.py) shards only the frozen
    weights and leaves the LoRA whole: its gradients go through the bucket."""
    return isinstance(model, nn.parallel.DistributedDataParallel)


def all_agree(ok: bool, device: torch.device) -> bool:
    """True when `ok` holds on every process (one all-reduce of a flag; call on all of them)."""
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


class LossLog:
    """Step losses kept on the device and written every `every` steps to the CSV log, TensorBoard and the bar.

    `last_good` is the newest checkpoint written, named when the loss diverges. With `validation`, rows have a
    fourth column, val_loss: the validation loss of the steps that measured it (record_validation), else empty.
    """

    def __init__(self, acc: Any, path: Path, every: int, start: int, base_lr: float, schedule: Any, bar: Any,
                 writer: Any = None, last_good: Path | None = None, validation: bool = False) -> None:
        self.acc, self.path, self.every, self.base_lr, self.schedule = acc, path, every, base_lr, schedule
        self.bar, self.writer, self.last_good, self.validation = bar, writer, last_good, validation
        self.losses = torch.zeros(every, device=acc.device)
        self.pending_from, self.pending = start, 0
        self.val_losses: dict[int, torch.Tensor] = {}

    @staticmethod
    def header(validation: bool) -> str:
        """The CSV header line of a run with or without the validation loss."""
        return "step,loss,lr,val_loss" if validation else "step,loss,lr"

    def record_validation(self, step: int, loss: torch.Tensor) -> None:
        """Keep the validation loss measured after `step` (a device tensor, no sync) for that step's row."""
        self.val_losses[step] = loss.detach().float().reshape(())

    def record(self, loss: torch.Tensor) -> None:
        """Keep one step's loss (a device copy, no sync)."""
        self.losses[self.pending].copy_(loss, non_blocking=True)
        self.pending += 1

    def full(self) -> bool:
        """Whether `every` losses wait to be written."""
        return self.pending == self.every

    def flush(self, step: int) -> None:
        """Write the waiting losses (their mean over processes); TrainingDiverged on a NaN/Inf."""
        if not self.pending:
            return
        logged = self.losses[:self.pending]
        if self.acc.num_processes > 1:
            logged = self.acc.reduce(logged.clone(), "mean")  # the global loss
        values = check_losses(logged, self.pending_from, self.last_good)
        mean, lr = statistics.fmean(values), self.base_lr * self.schedule.factor(step - 1)
        self.bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
        val = {k: float(v) for k, v in self.val_losses.items()}
        if self.acc.is_main_process:
            rows = [f"{self.pending_from + i + 1},{v:.6g},{lr:.6g}" for i, v in enumerate(values)]
            if self.validation:
                rows = [r + "," + (f"{val[s]:.6g}" if (s := self.pending_from + i + 1) in val else "")
                        for i, r in enumerate(rows)]
            with self.path.open("a") as f:
                f.writelines(r + "\n" for r in rows)
            if self.writer:
                self.writer.add_scalar("train/loss", mean, step)
                self.writer.add_scalar("train/lr", lr, step)
                for s, v in val.items():
                    self.writer.add_scalar("validation/loss", v, s)
        if val:
            self.bar.set_postfix(loss=f"{mean:.4f}", val_loss=f"{val[max(val)]:.4f}", lr=f"{lr:.2e}")
        self.pending_from, self.pending, self.val_losses = step, 0, {}


def run_steps(acc: Any, cfg: SDTrainConfig, steps: "TrainingSteps", bar: Any, optimizer: torch.optim.Optimizer,
              schedule: Any, base_lrs: list[float], log: "LossLog", checkpoints: "Checkpoints",
              after_step: Callable[[int, float], None], validate: Callable[[int], None]) -> int | None:
    """The training loop both recipes of train_sd.py share (SD and the DiT families): one step per item of `bar`,
    `after_step(step, start time)` right after it (EMA, timings, validation loss), the loss log flushed and
    checkpoints written on schedule, `validate(done)` every --validation_steps on the main process when a
    validation prompt is set. The first Ctrl-C ends the loop after the current step, with a checkpoint; returns the
    step it stopped at, or None when every step ran."""
    stopped_at = None
    with StopOnInterrupt() as stop:
        for step in bar:
            schedule.apply(optimizer, base_lrs, step)
            t_step = time.perf_counter()
            log.record(steps.run())
            after_step(step, t_step)
            done = step + 1
            if log.full() or done == cfg.max_train_steps:
                log.flush(done)
            if done % cfg.checkpointing_steps == 0 and done != cfg.max_train_steps:
                checkpoints.save(done, log)
            if done < cfg.max_train_steps and stop.should_stop(acc, done, cfg.logging_steps):
                if done % cfg.checkpointing_steps:
                    checkpoints.save(done, log)
                stopped_at = done
                break
            if cfg.validation_prompt and done % cfg.validation_steps == 0 and acc.is_main_process:
                validate(done)
    bar.close()
    return stopped_at


def interrupted_message(cfg: SDTrainConfig, stopped_at: int, script: str, world: int) -> str:
    """What a run stopped by Ctrl-C prints: where its checkpoint is and the command that resumes it."""
    out = Path(cfg.output_dir)
    return (f"interrupted at step {stopped_at} of {cfg.max_train_steps}; saved {out / f'checkpoint-{stopped_at}'}. "
            f"Resume with:\n  {resume_command(script, out / 'config.yaml', world)}")


@dataclasses.dataclass
class Checkpoints:
    """Writes checkpoint-N of this run: models' LoRA layers, optimizer, RNGs and the resolved config."""

    acc: Any
    out: Path
    models: Mapping[str, nn.Module]
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    data_rng: np.random.Generator
    config: Mapping[str, Any]
    total_limit: int | None
    run_id: str | None
    ema: EMA | None = None
    tokens: NewTokens | None = None

    def write(self, step: int) -> Path:
        """Write checkpoint-<step> (call on the main process); schedule-free optimizers save their averaged weights
        (a resumed run swaps back exactly as an unbroken one does), the EMA goes into ema.safetensors, pivotal
        tuning's token vectors into token_embeddings.safetensors."""
        files = {"ema.safetensors": self.ema.state_tensors()} if self.ema is not None else {}
        with eval_mode(self.optimizer):
            if self.tokens is not None:  # the vectors as schedule-free evaluates them, like the LoRA weights
                files[TOKENS_FILE] = self.tokens.state_tensors()
            return save_checkpoint(self.out, step, self.models, self.optimizer,
                                   rng_state(self.generator, self.data_rng), self.config, self.total_limit,
                                   run_id=self.run_id, tensor_files=files)

    def save(self, step: int, log: LossLog) -> None:
        """Flush the log, write checkpoint-<step> on the main process (it becomes log.last_good); all wait for it."""
        log.flush(step)
        if self.acc.is_main_process:
            log.last_good = self.write(step)
        self.acc.wait_for_everyone()


def resume_from(ckpt: Path, cfg: SDTrainConfig, world: int, rank: int, models: Mapping[str, nn.Module],
                optimizer: torch.optim.Optimizer, generator: torch.Generator,
                data_rng: np.random.Generator, ema: EMA | None = None,
                tokens: NewTokens | None = None) -> tuple[int, str | None]:
    """Restore checkpoint `ckpt` into this run; returns (its step, its run id). `cfg` is the resolved config
    (resolution and prediction type filled in). CheckpointError listing the differences when it was written with
    other settings; the same global batch over another number of processes is fine."""
    saved = read_state(ckpt).get("config", {})
    saved_world = int(saved.get("num_processes", 1))
    if saved.get("train_batch_size", 0) * saved_world == cfg.train_batch_size * world:
        saved = dict(saved, train_batch_size=cfg.train_batch_size)  # same global batch, another split: fine
    elif saved_world != world:
        saved = dict(saved, train_batch_size=f"{saved['train_batch_size']} per process x {saved_world} "
                     f"processes (keep train_batch_size x processes = {saved['train_batch_size'] * saved_world})")
    bad = cfg.resume_mismatches(saved)
    if bad:
        raise CheckpointError(f"{ckpt} was written by a different configuration:\n  - " + "\n  - ".join(bad)
                              + "\nresume with the same settings, or use a new --output_dir")
    with eval_mode(optimizer):  # a schedule-free checkpoint holds the averaged weights: swap back after loading
        state = load_checkpoint(ckpt, models, optimizer)
        if tokens is not None:
            try:
                tokens.load_state_tensors(read_checkpoint_tensors(ckpt, TOKENS_FILE, "--train_text_encoder_ti"),
                                          str(ckpt))
            except ValueError as err:
                raise CheckpointError(str(err)) from None
    if ema is not None:
        try:
            ema.load_state_tensors(read_checkpoint_tensors(ckpt, "ema.safetensors", "--use_ema"), str(ckpt))
        except ValueError as err:
            raise CheckpointError(str(err)) from None
    restore_rng(state["rng_tensors"], state["rng"], generator, data_rng)
    if world > 1:  # the global-batch streams above are shared; dropout's stream is each process's own
        torch.manual_seed(cfg.seed + 1_000_003 * (rank + 1))
    return int(state["step"]), state.get("run_id")


class StepHooks:
    """What `run_steps` calls around each step, for both recipes: `after_step` (the time to the first step, EMA,
    the validation loss, step stamps for --time_steps) and `validate` (the validation grid, sampled with the averaged
    weights; `sampling` adds what the family needs, e.g. its text encoders back on the device)."""

    def __init__(self, cfg: SDTrainConfig, device: torch.device, main_proc: bool, start: int,
                 optimizer: torch.optim.Optimizer, log: LossLog, ema: EMA | None, val_loss: Callable | None,
                 pipe: Any, prompt: str | None, resolution: int, out: Path, writer: Any = None,
                 t_start: float | None = None, static_s: float | None = None,
                 sampling: Callable[[], Any] | None = None, capture_failed: bool = False) -> None:
        self.cfg, self.device, self.main_proc, self.start = cfg, device, main_proc, start
        self.optimizer, self.log, self.ema, self.val_loss = optimizer, log, ema, val_loss
        self.pipe, self.prompt, self.resolution, self.out, self.writer = pipe, prompt, resolution, out, writer
        self.t_start, self.static_s, self.sampling = t_start, static_s, sampling
        self.capture_failed = capture_failed
        self.events: list = []
        self.profiler = (StepProfiler(cfg.profile_steps, start, device, out / "profile",
                                      header=f"command: {' '.join(sys.argv)}") if cfg.profile_steps and main_proc
                         else None)

    def after_step(self, step: int, t_step: float) -> None:
        cfg = self.cfg
        if step == self.start and self.main_proc and self.t_start is not None:  # one sync (issue #17)
            report_first_step(self.device, self.t_start, t_step, cfg.compile, self.static_s,
                              capture_failed=self.capture_failed)
        if self.ema is not None:
            self.ema.update()
        if self.val_loss is not None and ((step + 1) % cfg.validation_steps == 0 or step + 1 == cfg.max_train_steps):
            with eval_mode(self.optimizer):
                self.log.record_validation(step + 1, self.val_loss())
        if cfg.time_steps:
            self.events.append(step_stamp(self.device))
        if self.profiler is not None:
            self.profiler.after_step(step)

    def finish(self) -> None:
        """After the loop: the profile of a run that ended before its last profiled step is written too."""
        if self.profiler is not None:
            self.profiler.finish()

    def validate(self, done: int) -> None:
        cfg = self.cfg
        with contextlib.ExitStack() as stack:
            stack.enter_context(eval_mode(self.optimizer))
            if self.sampling is not None:
                stack.enter_context(self.sampling())
            if self.ema is not None:
                stack.enter_context(self.ema.swapped_in())
            image = validation_grid(self.pipe, self.prompt, cfg.num_validation_images,
                                    cfg.validation_inference_steps, self.resolution)
        save_png(image, self.out / "samples" / f"validation_step{done:06d}.png")
        if self.writer:
            self.writer.add_image("validation", np.asarray(image), done, dataformats="HWC")


def dump_held_weights(models: Mapping[str, nn.Module], tokens: NewTokens | None, rank: int) -> None:
    """With LORA_VISION_DUMP_RANK_LORA=DIR (debugging, tests): every process writes the LoRA weights and new token
    vectors it holds to DIR/rank<N>.safetensors, to compare processes (both recipes call it after the loop)."""
    dump = os.environ.get("LORA_VISION_DUMP_RANK_LORA")
    if not dump:
        return
    Path(dump).mkdir(parents=True, exist_ok=True)
    held = {f"{comp}.{k}": v for comp, m in models.items() for k, v in lora_state_dict(m).items()}
    held.update({f"embeddings.{comp}": v for comp, v in (tokens.vectors() if tokens else {}).items()})
    write_safetensors(Path(dump) / f"rank{rank}.safetensors",
                      {k: v.detach().float().cpu().contiguous() for k, v in held.items()})


def step_stamp(device: torch.device) -> Any:
    """A point in time after the step's queued work: a CUDA event on a GPU, the wall clock on a CPU."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def report_step_times(events: list, batch_size: int, warmup: int = 10) -> None:
    """Print `STEPS ours n=.. median_s=.. steps_per_s=.. peak_alloc_gib=..` (bench_train_sd.sh greps it)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        d = [a.elapsed_time(b) / 1000 for a, b in zip(events[warmup:], events[warmup + 1:])]
    else:
        d = [b - a for a, b in zip(events[warmup:], events[warmup + 1:])]
    if not d:
        print(f"STEPS too few steps: {len(events)}", flush=True)
        return
    d.sort()
    med = statistics.median(d)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    print(f"STEPS ours n={len(d)} median_s={med:.4f} p10_s={d[len(d) // 10]:.4f} p90_s={d[(9 * len(d)) // 10]:.4f} "
          f"steps_per_s={1 / med:.3f} images_per_s={batch_size / med:.1f} peak_alloc_gib={peak:.2f}", flush=True)
