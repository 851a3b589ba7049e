"""One DreamBooth LoRA run on a DiT pipeline (called by scripts/train_sd.py once it has loaded the model and found a
DiT family): build (resolution, class images, cached text and latents, LoRA, optimizer), loop, save. The loop
pieces (LossLog, Checkpoints, resume, the static step) and the files written are the SD recipe's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ...formats import export
from ...generation.images import save_png
from ...lora import lora_report
from ...lora.config import ConfigError
from ..checkpoint import new_run_id, trim_log
from ..config import config_to_dict, save_config
from ..optim import eval_mode
from ..sd.caching import prepare_data
from ..sd.config import SDTrainConfig
from ..sd.lora import add_lora, optimization, save_adapter
from ..sd.loop import (Checkpoints, LossLog, StepHooks, compile_cache_dir, dump_held_weights, graph_off_reason,
                       interrupted_message, report_step_times, resume_from, run_steps)
from ..sd.samples import generate_class_images, strength_sweep
from ..sd.step import clip_and_step
from .encode import (CLIP_ENCODERS, dit_text_table, latent_encoder, live_clip_text, offload_text_encoders,
                     text_encoders_of, text_encoders_on)
from .flow import ResolutionShift, training_sigmas
from .fsdp import CONFIG as FSDP_CONFIG, fsdp_plugin, fsdp_refusals, fsdp_run_refusals, shard_frozen_base
from .lowmem import quantize_base, quantize_unsupported_reason
from .step import FlowSettings, FlowTrainingSteps, FlowValidationLoss

# SD-recipe settings a DiT run does not honour: refused up front (when set away from their defaults), saying why.
_REFUSED = {
    "train_text_encoder_ti": "pivotal tuning adds tokens to the SD text encoders; the DiT families have none yet",
    "snr_gamma": "Min-SNR weighs DDPM timesteps by their signal-to-noise ratio; use --weighting_scheme for flow "
                 "matching",
    "debiased_estimation_loss": "its weights are DDPM signal-to-noise ratios; use --weighting_scheme for flow "
                                "matching",
    "noise_offset": "no flow-matching trainer applies it (diffusers' train_dreambooth_lora_flux.py / _sd3.py and "
                    "kohya's flux / sd3 trainers draw plain Gaussian noise); leave it at 0",
    "multires_noise_iterations": "pyramid noise is a DDPM technique no flow-matching trainer uses; leave it at 0",
    "prediction_type": "flow matching predicts the velocity noise - x0 (or x0 with --precondition_outputs); leave "
                       "it out",
    "loss_type": "the flow-matching loss is squared error; leave it at l2",
    "shuffle_caption": "the DiT text embeddings are cached once per caption; leave it off",
    "caption_dropout_rate": "the DiT text embeddings are cached once per caption; leave it at 0"}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SDTrainConfig)}


# --unet_targets left at the SD default -> the transformer's preset per family (diffusers' examples adapt the
# attention layers; Flux.1 also its MLPs: the ComfyUI file fuses single blocks' q, k, v and MLP input).
DEFAULT_TARGETS: dict[str, str] = {"flux1": "flux-attn-ff", "flux2": "flux2-attn", "sd3": "sd3-attn",
                                   "qwen-image": "qwen-image-attn", "z-image": "z-image-attn"}


# Flow-matching settings that a UNet (DDPM) run has no use for: refused there rather than ignored.
DIT_ONLY: dict[str, str] = {
    "weighting_scheme": "it picks flow-matching noise levels; use --snr_gamma for a UNet",
    "precondition_outputs": "it preconditions flow-matching outputs; use --prediction_type for a UNet",
    "quantize_base": "the low-memory mode is for the DiT transformers; leave it at none"}


def check_unet_config(cfg: SDTrainConfig, family: str) -> None:
    """ConfigError naming every DiT-only setting given to a UNet (SD 1.x/2.x/SDXL) run."""
    bad = [f"--{k} ({why})" for k, why in DIT_ONLY.items() if getattr(cfg, k) != _DEFAULTS[k]]
    if bad:
        raise ConfigError(f"{family} (UNet) training does not support: " + "; ".join(bad))


def check_dit_config(cfg: SDTrainConfig, family: str, resolution: int) -> None:
    """ConfigError naming every setting this DiT run cannot honour."""
    bad = [f"--{k} ({why})" for k, why in _REFUSED.items() if getattr(cfg, k) != _DEFAULTS[k]]
    if cfg.train_text_encoder and family not in CLIP_ENCODERS:
        bad.append(f"--train_text_encoder (it trains the CLIP encoders of Flux.1 and SD 3.x, as diffusers' "
                   f"scripts; {family} has none: its text embeddings are cached and only the transformer trains)")
    if cfg.train_text_encoder and cfg.export_kohya:
        bad.append("--export_kohya with --train_text_encoder (the DiT kohya / ComfyUI file holds the transformer "
                   "only; adapter_diffusers.safetensors holds both: leave --export_kohya out)")
    if resolution % 16:
        bad.append(f"--resolution {resolution} (the {family} transformer packs 2x2 latent patches: use a multiple "
                   "of 16)")
    if cfg.bucketing and cfg.bucket_step % 16:
        bad.append(f"--bucket_step {cfg.bucket_step} (2x2 latent patches: use a multiple of 16)")
    if bad:
        raise ConfigError(f"{family} training does not support: " + "; ".join(bad))


def train_dit(cfg: SDTrainConfig, acc: Any, pipe: Any, family: str, dtype: torch.dtype, ckpt: Path | None,
              threads: str, script: str, t_start: float | None = None) -> int:
    """Train a LoRA on `pipe.transformer` as configured; returns the exit status (0, or 130 when interrupted)."""
    device, main_proc = acc.device, acc.is_main_process
    resolution = cfg.resolution or int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
    check_dit_config(cfg, family, resolution)
    why = quantize_unsupported_reason(cfg.quantize_base, device)
    if why:
        raise ConfigError(f"--quantize_base {cfg.quantize_base}: {why}")
    fsdp = fsdp_plugin(acc)  # the frozen transformer sharded over the processes (training/dit/fsdp.py)
    bad = fsdp_refusals(fsdp, acc.mixed_precision) + fsdp_run_refusals(cfg) if fsdp is not None else []
    if bad:
        raise ConfigError(f"{family} training under FSDP does not support: " + "; ".join(bad)
                          + f" (the working settings: {FSDP_CONFIG})")
    if cfg.unet_targets == SDTrainConfig.unet_targets:
        cfg = dataclasses.replace(cfg, unet_targets=(DEFAULT_TARGETS[family],))
    if cfg.train_text_encoder and cfg.export_kohya is None:  # the DiT kohya file holds the transformer only
        cfg = dataclasses.replace(cfg, export_kohya=False)
        if main_proc:
            print("note: no kohya (ComfyUI) file with --train_text_encoder (it holds the transformer only); "
                  "adapter_diffusers.safetensors holds the text encoders too")
    with cudnn_attention_off(device, main_proc):
        return _train(cfg, acc, pipe, family, dtype, ckpt, threads, script, t_start, fsdp, resolution)


@contextlib.contextmanager
def cudnn_attention_off(device: torch.device, say: bool) -> Iterator[None]:
    """cuDNN's attention off on CUDA for the run, put back as it was afterwards (a caller that trains in its own
    process and then generates gets its setting back). Its backward failed at Flux.1's size on an H200 (torch 2.11,
    "mha_graph.execute ... is_good()"; diffusers' own training script dies alike); flash and memory-efficient
    attention ran it: benchmarks/flux_backward_check.py, docs/benchmarks.md."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    if device.type == "cuda" and before:
        torch.backends.cuda.enable_cudnn_sdp(False)
        if say:
            print("note: cuDNN attention is off for DiT training (its backward fails at real DiT sizes on "
                  "torch 2.11); PyTorch's flash / memory-efficient attention run instead")
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def _train(cfg: SDTrainConfig, acc: Any, pipe: Any, family: str, dtype: torch.dtype, ckpt: Path | None,
           threads: str, script: str, t_start: float | None, fsdp: Any, resolution: int) -> int:
    """train_dit's run, its settings checked."""
    from accelerate.utils import gather_object

    device, main_proc = acc.device, acc.is_main_process
    rank, world = acc.process_index, acc.num_processes
    out = Path(cfg.output_dir)
    transformer = pipe.transformer
    if fsdp is None:
        pipe.to(device)
    else:  # the transformer reaches the device as shards (shard_frozen_base)
        for part in pipe.components.values():
            if isinstance(part, torch.nn.Module) and part is not transformer:
                part.to(device)
    for m in [transformer, pipe.vae, *text_encoders_of(pipe)]:
        m.requires_grad_(False)
    scheme = cfg.weighting_scheme or ("logit_normal" if family == "sd3" else "none")
    precondition = cfg.precondition_outputs if cfg.precondition_outputs is not None else family == "sd3"
    base_name = cfg.pretrained_model_name_or_path
    run_cfg = dataclasses.replace(cfg, resolution=resolution, weighting_scheme=scheme,
                                  precondition_outputs=precondition)
    resolved = dict(config_to_dict(run_cfg), num_processes=world, family=family)
    shift = ResolutionShift.of(dict(pipe.scheduler.config)) if cfg.resolution_shift else None
    guidance = cfg.guidance_scale if transformer.config.get("guidance_embeds") else None
    if main_proc:
        save_config(run_cfg, out / "config.yaml")
        print(f"model: {base_name} ({family}, flow matching, weighting {scheme}"
              + (", preconditioned outputs" if precondition else "") + (", image-size shift" if shift else "") + (f", guidance {guidance:g}" if guidance else "")
              + f"), resolution {resolution}, device {device}, base weights {dtype}, {threads}")

    if cfg.with_prior_preservation:  # the base pipeline makes the class images, before any LoRA exists
        acc.wait_for_everyone()
        made = generate_class_images(pipe, cfg.class_prompt, cfg.class_data_dir, cfg.num_class_images,
                                     cfg.sample_batch_size, cfg.class_inference_steps, resolution, cfg.seed,
                                     rank=rank, world=world)
        acc.wait_for_everyone()
        if made and main_proc:
            print(f"generated {made} class images into {cfg.class_data_dir}")

    data = prepare_data(cfg, resolution, [pipe.tokenizer], [], pipe.vae, False, dtype, rank, world, gather_object,
                        verbose=main_proc, encode_latents=latent_encoder(pipe, family),
                        text_table=lambda prompts: dit_text_table(pipe, family, prompts, dtype,
                                                                  cfg.max_sequence_length, device))
    trained_encoders = [getattr(pipe, n) for n in CLIP_ENCODERS[family]] if cfg.train_text_encoder else []
    if device.type != "cpu":  # the embeddings are cached: the other encoders wait in host memory
        offload_text_encoders(pipe, keep=tuple(trained_encoders))
    data_rng = np.random.default_rng(cfg.seed)

    if cfg.quantize_base != "none":  # the frozen weights only, before the LoRA wraps them
        note = quantize_base(transformer, cfg.quantize_base)
        if main_proc:
            print(note)
    torch.manual_seed(cfg.seed)
    models, lora_cfgs = add_lora(cfg, transformer, trained_encoders, dtype, component="transformer")
    if main_proc:
        print("; ".join(lora_report(m, k) for k, m in models.items()))
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        for te in trained_encoders:
            te.gradient_checkpointing_enable()
    if fsdp is not None:  # before the optimizer: it holds the LoRA tensors on the device
        units = shard_frozen_base(transformer, fsdp, device)
        if main_proc:
            print(f"FSDP: the frozen transformer is sharded over {world} processes in {units} units "
                  "(its blocks and the rest); the LoRA is whole on every process")
    one_bucket = len(data.inst_cache) == 1 and (data.class_cache is None
                                               or list(data.class_cache) == list(data.inst_cache))
    use_graph = (graph_off_reason(cfg, device, one_bucket, dtype) is None and family != "z-image"
                 and cfg.quantize_base == "none"  # capture with torchao's weight tensors is not measured yet
                 and not cfg.train_text_encoder  # the live CLIP prompts are tokenized on the host
                 and fsdp is None)
    base_lrs, params, optimizer, ema, schedule = optimization(cfg, models, world, use_graph)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)

    start, last_good, run_id = 0, None, new_run_id()
    if cfg.resume_from_checkpoint and ckpt is None and main_proc:
        print(f"no checkpoint in {out} yet: starting from step 0")
    elif ckpt is not None:
        start, run_id = resume_from(ckpt, run_cfg, world, rank, models, optimizer, generator, data_rng, ema)
        last_good = ckpt
        if main_proc:
            print(f"resumed from {ckpt} at step {start}")

    settings = FlowSettings(family, scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, guidance, shift,
                            cfg.prior_loss_weight, type(pipe), precondition,
                            (lambda prompts, cached: live_clip_text(pipe, family, prompts, cached, device, dtype))
                            if cfg.train_text_encoder else None)
    denoiser = transformer  # several processes: the steps' GradientBucket averages every trained gradient
    steps = FlowTrainingSteps(cfg, acc, denoiser, data.table, [], training_sigmas(dict(pipe.scheduler.config), device),
                              settings, dtype, False, data.inst_cache, data.class_cache, data_rng, generator, params,
                              optimizer, update=clip_and_step)
    static_s = None
    if use_graph or cfg.compile:
        t_static = time.perf_counter()
        steps.use_static(capture=use_graph, compile_unet=cfg.compile, verbose=main_proc,
                         cache_dir=compile_cache_dir(cfg.compile_cache_dir) if cfg.compile else None)
        static_s = time.perf_counter() - t_static if use_graph else None  # uncaptured: compiles in the first step
    val_loss = (FlowValidationLoss(transformer, data.held_out_cache, data.table, settings, dtype,
                                   cfg.train_batch_size, cfg.seed + 2)
               if data.held_out_cache and (main_proc or fsdp is not None) else None)  # sharded: every process runs it

    log_path = out / cfg.logging_dir / "loss.csv"
    if main_proc:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        trim_log(log_path, start, LossLog.header(data.held_out is not None))
    bar = tqdm(range(start, cfg.max_train_steps), initial=start, total=cfg.max_train_steps, desc="training",
               unit="step", disable=not main_proc)
    log = LossLog(acc, log_path, cfg.logging_steps, start, base_lrs[0], schedule, bar, None, last_good,
                  validation=data.held_out is not None)
    checkpoints = Checkpoints(acc, out, models, optimizer, generator, data_rng, resolved, cfg.checkpoints_total_limit,
                              run_id, ema)

    hooks = StepHooks(cfg, device, main_proc, start, optimizer, log, ema, val_loss, pipe, cfg.validation_prompt,
                      resolution, out, t_start=t_start, static_s=static_s, capture_failed=steps.capture_failed,
                      sampling=lambda: text_encoders_on(pipe, device))  # validation images: text encoders back
    stopped_at = run_steps(acc, cfg, steps, bar, optimizer, schedule, base_lrs, log, checkpoints, hooks.after_step,
                           hooks.validate)
    hooks.finish()
    if stopped_at is not None:
        if main_proc:
            print(interrupted_message(cfg, stopped_at, script, world), file=sys.stderr)
        return 130
    log.flush(cfg.max_train_steps)
    if cfg.time_steps:
        report_step_times(hooks.events, cfg.train_batch_size)
    dump_held_weights(models, None, rank)
    sweep_everywhere = fsdp is not None and bool(cfg.strength_sweep)  # the sharded transformer needs all
    if not main_proc and not sweep_everywhere:
        return 0

    with eval_mode(optimizer):
        if main_proc:  # the LoRA is whole on every process, FSDP or not: the main one writes it
            last_good = checkpoints.write(cfg.max_train_steps) if start < cfg.max_train_steps else log.last_good
            captions = data.instance.captions
            adapter = save_adapter(out, cfg, models, lora_cfgs, family, base_name, resolved, captions, last_good)
            export_diffusers(adapter, out / "adapter_diffusers.safetensors")
            if ema is not None:
                with ema.swapped_in():
                    ema_adapter = save_adapter(out, cfg, models, lora_cfgs, family, base_name, resolved, captions,
                                               last_good, name="adapter_ema")
                    export_diffusers(ema_adapter, out / "adapter_ema_diffusers.safetensors")
        if cfg.strength_sweep:
            with text_encoders_on(pipe, device):
                image = strength_sweep(pipe, list(models.values()), cfg.validation_prompt or cfg.instance_prompt,
                                       cfg.strength_sweep, min(2, cfg.num_validation_images),
                                       cfg.validation_inference_steps, resolution)
            if main_proc:
                print(f"wrote {save_png(image, out / 'samples' / 'strength_sweep.png')}")
    return 0


def export_diffusers(adapter: Any, path: Path) -> Path | None:
    """Write the adapter in diffusers' layout (what `pipe.load_lora_weights` reads) and say so; an adapter of
    another kind (LoHa, LoKr, DoRA) gets a note instead, since that layout holds plain LoRA only."""
    other = sorted(k for k in adapter.kinds() if k != "LoRA")
    if other:
        print(f"note: no {path.name}: diffusers' LoRA layout holds plain LoRA and this adapter is {', '.join(other)}; "
              "adapter.safetensors and the kohya (ComfyUI) file hold it")
        return None
    written = export(adapter, "diffusers", path)
    print(f"wrote {written}")
    return written
