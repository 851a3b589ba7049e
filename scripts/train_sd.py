"""DreamBooth LoRA training for Stable Diffusion 1.x / 2.x and SDXL, and (flow matching) for Flux.1, Flux.2-klein,
SD 3.x, Qwen-Image and Z-Image.

    accelerate launch scripts/train_sd.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" --output_dir out/dog
    python scripts/train_sd.py            # the pretrained tiny model of samples/tiny-sd on samples/instance, offline, CPU
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 2 scripts/train_sd.py ...
                                          # per-GPU batch; all draw the same global batch, each its slice

Flags follow diffusers' examples/dreambooth/train_dreambooth_lora.py (the DiT flags --weighting_scheme,
--logit_mean, --logit_std, --mode_scale, --guidance_scale, --max_sequence_length its _flux.py / _sd3.py);
`--config FILE.yaml` gives the same keys and flags override it. Reads top to bottom: parse, build (model, data, caches, LoRA, optimizer), loop, save.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

_T_START = time.perf_counter()  # before the heavy imports: the time to the first step counts them (issue #17)

import numpy as np  # noqa: E402
import torch
import yaml
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout
    sys.path.insert(0, str(REPO))

from lora_vision.dtypes import parse_dtype  # noqa: E402
from lora_vision.io import unwritable_reason  # noqa: E402
from lora_vision.lora import lora_report  # noqa: E402
from lora_vision.lora.config import ConfigError  # noqa: E402
from lora_vision.models.sd import (TINY_PIPELINES, base_tag, detect_family, load_sd_pipeline,  # noqa: E402
                                   prediction_type)
from lora_vision.models.dit import DIT_KINDS  # noqa: E402
from lora_vision.data.dreambooth import make_buckets  # noqa: E402
from lora_vision.generation.images import save_png  # noqa: E402
from lora_vision.training.checkpoint import (CheckpointError, end_process_group, find_checkpoint,  # noqa: E402
                                             new_run_id, prepare_output_dir, trim_log)
from lora_vision.training.config import config_to_dict, load_config, save_config  # noqa: E402
from lora_vision.training.optim import eval_mode  # noqa: E402
from lora_vision.training.sd.caching import prepare_data  # noqa: E402
from lora_vision.training.sd.captions import CaptionVariants  # noqa: E402
from lora_vision.training.sd.config import SDTrainConfig, kohya_folder_note  # noqa: E402
from lora_vision.training.sd.lora import add_lora, check_peft_folders, optimization, save_adapter  # noqa: E402
from lora_vision.training.sd.pivotal import NewTokens  # noqa: E402
from lora_vision.training.sd.loop import (Checkpoints, LossLog, StepHooks, TrainingDiverged,  # noqa: E402
                                          TrainingSteps, check_distributed, compile_cache_dir, dump_held_weights,
                                          graph_off_reason, interrupted_message, report_step_times, resume_from,
                                          run_steps)
from lora_vision.training.sd.losses import alphas_cumprod  # noqa: E402
from lora_vision.training.sd.samples import generate_class_images, strength_sweep  # noqa: E402
from lora_vision.training.sd.step import StepSettings, clip_and_step  # noqa: E402
from lora_vision.training.sd.validation_loss import ValidationLoss  # noqa: E402
from lora_vision.training.sd import metrics as sd_metrics  # noqa: E402
from lora_vision.training.first_step import mark  # noqa: E402

mark("imports")
from lora_vision.training.dit.train import train_dit  # noqa: E402

TINY_PROMPT = "a photo of sks toy"
TINY_CONFIG = REPO / "configs" / "tiny.yaml"
NO_MODEL = "with no model (configs/tiny.yaml)"
HELP_EPILOG = ("With no --pretrained_model_name_or_path and no --config, the run is --config configs/tiny.yaml: the "
               "built-in tiny SD 1.x model on samples/instance, offline on a CPU; the values marked '" + NO_MODEL
               + "' apply then, other flags still override them.")


def parse(argv: list[str] | None) -> SDTrainConfig:
    """Flags + YAML -> config; no model means the built-in tiny model on samples/."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a.split("=")[0] in ("--config", "--pretrained_model_name_or_path") for a in argv):
        argv = ["--config", str(TINY_CONFIG)] + argv  # the offline default run
    tiny = dict(yaml.safe_load(TINY_CONFIG.read_text(encoding="utf-8")), instance_data_dir="samples/instance")
    cfg = load_config(SDTrainConfig, argv, prog="train_sd.py", description=__doc__.split("\n")[0],
                      other_defaults=(NO_MODEL, tiny), epilog=HELP_EPILOG)
    if cfg.pretrained_model_name_or_path is None:
        cfg = dataclasses.replace(cfg, instance_data_dir=cfg.instance_data_dir or str(REPO / "samples" / "instance"),
                                  instance_prompt=cfg.instance_prompt or TINY_PROMPT)
    note = kohya_folder_note(cfg.instance_data_dir)
    if note:
        print(note)
    return cfg


def choose_threads(cfg: SDTrainConfig, device: torch.device) -> str:
    """Set torch's CPU threads; returns a few words for the start-up line.

    --num_threads wins; then an explicit OMP_NUM_THREADS (torch follows it). The built-in tiny model on a CPU gets
    one thread: its tensors are too small to split, and on a busy machine extra threads only wait on each other
    (docs/benchmarks.md has the main job timed with 1 and 2 threads).
    """
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
        return f"{cfg.num_threads} CPU thread(s) (--num_threads)"
    if "OMP_NUM_THREADS" in os.environ:
        return f"{torch.get_num_threads()} CPU thread(s) (OMP_NUM_THREADS)"
    tiny = cfg.pretrained_model_name_or_path is None or cfg.pretrained_model_name_or_path in TINY_PIPELINES
    if device.type == "cpu" and tiny:
        torch.set_num_threads(1)
        return "1 CPU thread (fastest for the tiny model; --num_threads to change)"
    return f"{torch.get_num_threads()} CPU thread(s)"


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse(argv)
    except ConfigError as err:
        print(f"train_sd.py: {err}", file=sys.stderr)
        return 2
    why = unwritable_reason(cfg.output_dir)
    if why:
        print(f"train_sd.py: error: --output_dir {cfg.output_dir!r} cannot be written: {why}; choose a folder you "
              "can write to", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()  # choose_threads may change it; a caller of main() keeps its own
    try:
        return train(cfg)
    except (TrainingDiverged, CheckpointError, ConfigError, OSError, ValueError, ImportError) as err:
        print(f"train_sd.py: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before or after the training loop (in it, the first Ctrl-C saves a checkpoint)
        print("\ntrain_sd.py: interrupted; the checkpoints already written are complete and kept "
              "(resume with --resume_from_checkpoint latest)", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)


def start_run(cfg: SDTrainConfig, acc, out: Path) -> tuple:
    """Checks, threads, the output folder, seeds and the model: (checkpoint or None, thread words, base dtype,
    pipeline, family). The folder is created only once the model loaded (and --save_peft's layout was checked): a
    failed start leaves nothing behind."""
    check_distributed(acc)
    threads = choose_threads(cfg, acc.device)
    ckpt = find_checkpoint(out, cfg.resume_from_checkpoint, cfg.max_train_steps) if cfg.resume_from_checkpoint else None
    for note in prepare_output_dir(out, ckpt is not None, cfg.overwrite_output_dir, acc.is_main_process):
        print(note)
    acc.wait_for_everyone()  # the folder is ready before any process writes to it
    torch.manual_seed(cfg.seed + acc.process_index)
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = parse_dtype(cfg.mixed_precision, "--mixed_precision")
    # diffusers imports its modules on first use: done here, the start-up line tells them from reading the weights
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401
    mark("diffusers imports")
    pipe = load_sd_pipeline(cfg.pretrained_model_name_or_path, torch_dtype=None if dtype == torch.float32 else dtype,
                            variant=cfg.variant)
    family = detect_family(pipe)
    check_distributed(acc, family)  # FSDP: the DiT families only
    if cfg.save_peft and family not in DIT_KINDS.values():  # refuse what peft cannot hold before anything is written
        check_peft_folders(cfg, pipe.unet, [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else []))
    out.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    return ckpt, threads, dtype, pipe, family


def train(cfg: SDTrainConfig) -> int:
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    # ---- build ---------------------------------------------------------------------------------------------
    acc = Accelerator()
    mark("accelerator")  # with CUDA's start on a GPU
    device, main_proc = acc.device, acc.is_main_process
    rank, world = acc.process_index, acc.num_processes
    out = Path(cfg.output_dir)
    ckpt, threads, dtype, pipe, family = start_run(cfg, acc, out)
    mark("model load")
    if family in DIT_KINDS.values():  # Flux.1/2, SD 3.x, Qwen-Image, Z-Image: flow matching (training/dit)
        return train_dit(cfg, acc, pipe, family, dtype, ckpt, threads, __file__, t_start=_T_START)
    from lora_vision.training.dit.train import check_unet_config
    check_unet_config(cfg, family)
    sdxl = family == "sdxl"
    if sdxl and dtype == torch.float16:
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16
    pipe.to(device)
    mark("to the device")
    unet, vae = pipe.unet, pipe.vae
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if sdxl else [])
    for m in [unet, vae, *text_encoders]:
        m.requires_grad_(False)
    pred_type = cfg.prediction_type or prediction_type(pipe)
    resolution = cfg.resolution or int(unet.config.sample_size) * pipe.vae_scale_factor
    base_name = cfg.pretrained_model_name_or_path or "tiny (built-in)"
    run_cfg = dataclasses.replace(cfg, resolution=resolution, prediction_type=pred_type)
    resolved = dict(config_to_dict(cfg), resolution=resolution, prediction_type=pred_type, num_processes=world)
    if main_proc:
        save_config(run_cfg, out / "config.yaml")
        print(f"model: {base_name} ({family}, {pred_type}), resolution {resolution}, device {device}, "
              f"base weights {dtype}, {threads}")
        if cfg.bucketing and len(make_buckets(resolution, cfg.bucket_step)) == 1:
            print(f"note: --bucketing at resolution {resolution} with bucket_step {cfg.bucket_step} makes one bucket "
                  f"({resolution}x{resolution}), so every image is cropped square; use a smaller --bucket_step "
                  "(a multiple of 8) for aspect-ratio buckets")

    if cfg.with_prior_preservation:  # top the class folder up with the base model before any LoRA exists
        acc.wait_for_everyone()  # every process counts the same folder before any writes to it
        made = generate_class_images(pipe, cfg.class_prompt, cfg.class_data_dir, cfg.num_class_images,
                                     cfg.sample_batch_size, cfg.class_inference_steps, resolution, cfg.seed,
                                     rank=rank, world=world)
        acc.wait_for_everyone()  # each process wrote its share (atomically); all see every image after this
        if made and main_proc:
            print(f"generated {made} class images into {cfg.class_data_dir}")

    # pivotal tuning: new tokens in the tokenizers and text encoders; the token abstraction in prompts becomes them
    tokens = (NewTokens(cfg, tokenizers, dict(zip(("text_encoder", "text_encoder_2"), text_encoders)))
              if cfg.train_text_encoder_ti else None)
    prompt_of = tokens.rewrite if tokens else (lambda text: text)
    data = prepare_data(cfg, resolution, tokenizers, text_encoders, vae, sdxl, dtype, rank, world, gather_object,
                        verbose=main_proc, rewrite=tokens.rewrite_captions if tokens else None)
    mark("class images and caching" if cfg.with_prior_preservation else "caching")
    if tokens and main_proc:
        print(f"pivotal tuning: {cfg.token_abstraction!r} in the prompts and captions is {''.join(tokens.names)}, "
              f"new tokens trained as text embeddings ({len(tokens.names)} per text encoder)")
    data_rng = np.random.default_rng(cfg.seed)  # the same on every process: all draw the same global batches

    torch.manual_seed(cfg.seed)  # the same LoRA initialisation on every process and every run
    models, lora_cfgs = add_lora(cfg, unet, text_encoders, dtype)
    for vectors in tokens.parameters() if tokens else []:  # --train_text_encoder's inject_lora froze all but the LoRA
        vectors.requires_grad_(True)
    if main_proc:
        print("; ".join(lora_report(m, k) for k, m in models.items()))
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te in text_encoders if cfg.train_text_encoder else []:
            te.gradient_checkpointing_enable()
    use_cl = cfg.channels_last and device.type == "cuda"
    if use_cl:
        unet.to(memory_format=torch.channels_last)

    one_bucket = len(data.inst_cache) == 1 and (data.class_cache is None
                                               or list(data.class_cache) == list(data.inst_cache))
    graph_off = graph_off_reason(cfg, device, one_bucket, dtype)
    use_graph = graph_off is None
    if cfg.cuda_graph and device.type == "cuda" and graph_off and main_proc:
        print(f"note: the training step is not captured as a CUDA graph ({graph_off}); the eager step runs")
    base_lrs, params, optimizer, ema, schedule = optimization(cfg, models, world, use_graph,
                                                              tokens.parameters() if tokens else ())
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # the same on every process, as data_rng

    start, last_good, run_id = 0, None, new_run_id()
    if cfg.resume_from_checkpoint and ckpt is None:
        print(f"no checkpoint in {out} yet: starting from step 0")
    elif ckpt is not None:
        start, run_id = resume_from(ckpt, run_cfg, world, rank, models, optimizer, generator, data_rng, ema,
                                    tokens)
        last_good = ckpt
        if main_proc:
            print(f"resumed from {ckpt} at step {start}")

    settings = StepSettings(pred_type, int(pipe.scheduler.config.num_train_timesteps), cfg.snr_gamma,
                            cfg.noise_offset, cfg.prior_loss_weight, cfg.max_grad_norm, sdxl, cfg.loss_type,
                            cfg.huber_schedule, cfg.huber_c, cfg.debiased_estimation_loss,
                            cfg.multires_noise_iterations, cfg.multires_noise_discount)
    val_loss = (ValidationLoss(unet, data.held_out_cache, data.table, text_encoders,
                               alphas_cumprod(pipe.scheduler, device), settings, dtype, cfg.train_batch_size,
                               cfg.seed + 2) if data.held_out_cache and main_proc else None)
    captions = (CaptionVariants(data.table, tokenizers, text_encoders, sdxl, dtype, cfg.shuffle_caption,
                                cfg.keep_tokens, cfg.caption_dropout_rate, cfg.train_batch_size * world)
                if cfg.shuffle_caption or cfg.caption_dropout_rate else None)
    steps = TrainingSteps(cfg, acc, unet, data.table, text_encoders, alphas_cumprod(pipe.scheduler, device), settings,
                          dtype, use_cl, data.inst_cache, data.class_cache, data_rng, generator, params, optimizer,
                          update=clip_and_step,  # this module's name: wrapping it wraps every eager update
                          captions=captions)
    if cfg.shuffle_caption and main_proc:
        print("shuffled captions are encoded on the fly (the original captions and the empty prompt are "
              f"{'cached' if data.table.hidden is not None else 'encoded by the training text encoders'})")
    static_s = None  # seconds capturing the step as a CUDA graph (compiling included under --compile)
    if use_graph or cfg.compile:
        t_static = time.perf_counter()
        steps.use_static(capture=use_graph, compile_unet=cfg.compile, verbose=main_proc,
                         cache_dir=compile_cache_dir(cfg.compile_cache_dir) if cfg.compile else None)
        static_s = time.perf_counter() - t_static if use_graph else None  # uncaptured: compiles in the first step

    writer = open_tensorboard(out / cfg.logging_dir) if cfg.report_to == "tensorboard" and main_proc else None
    log_path = out / cfg.logging_dir / "loss.csv"
    if main_proc:
        trim_log(log_path, start, LossLog.header(data.held_out is not None))  # steps after `start` are redone

    # ---- loop ----------------------------------------------------------------------------------------------
    bar = tqdm(range(start, cfg.max_train_steps), initial=start, total=cfg.max_train_steps, desc="training",
               unit="step", disable=not main_proc)
    log = LossLog(acc, log_path, cfg.logging_steps, start, base_lrs[0], schedule, bar, writer, last_good,
                  validation=data.held_out is not None)
    checkpoints = Checkpoints(acc, out, models, optimizer, generator, data_rng, resolved, cfg.checkpoints_total_limit,
                              run_id, ema, tokens)
    hooks = StepHooks(cfg, device, main_proc, start, optimizer, log, ema, val_loss, pipe,
                      prompt_of(cfg.validation_prompt) if cfg.validation_prompt else None, resolution, out,
                      writer, t_start=_T_START, static_s=static_s,
                      capture_failed=steps.capture_failed)
    stopped_at = run_steps(acc, cfg, steps, bar, optimizer, schedule, base_lrs, log, checkpoints, hooks.after_step,
                           hooks.validate)
    hooks.finish()
    if stopped_at is not None:
        if main_proc:
            print(interrupted_message(cfg, stopped_at, __file__, world), file=sys.stderr)
        if writer:
            writer.close()
        return 130
    log.flush(cfg.max_train_steps)
    if cfg.time_steps:
        report_step_times(hooks.events, cfg.train_batch_size)
    dump_held_weights(models, tokens, rank)

    # ---- save ----------------------------------------------------------------------------------------------
    if main_proc:
        kohya_base = base_tag(family, pred_type)
        with eval_mode(optimizer):  # schedule-free: what follows saves and samples the averaged weights
            last_good = checkpoints.write(cfg.max_train_steps) if start < cfg.max_train_steps else log.last_good
            save_outputs(cfg, out, pipe, models, lora_cfgs, ema, tokens, prompt_of, data, kohya_base, base_name,
                         resolved, last_good, resolution)
    if writer:
        writer.close()
    return 0


def save_outputs(cfg: SDTrainConfig, out: Path, pipe, models: dict, lora_cfgs: dict, ema, tokens, prompt_of, data,
                 kohya_base: str, base_name: str, resolved: dict, last_good: Path | None, resolution: int) -> None:
    """The end of a run on the main process: the adapter (and its EMA copy), the strength sweep, the tiny model's
    metrics."""
    captions = [tokens.original(c) for c in data.instance.captions] if tokens else data.instance.captions
    save_adapter(out, cfg, models, lora_cfgs, kohya_base, base_name, resolved, captions, last_good,
                 embeddings=tokens.embeddings() if tokens else None)
    if ema is not None:
        with ema.swapped_in():
            save_adapter(out, cfg, models, lora_cfgs, kohya_base, base_name, resolved, captions, last_good,
                         name="adapter_ema", embeddings=tokens.embeddings() if tokens else None)
    if cfg.strength_sweep:
        prompt = prompt_of(cfg.validation_prompt or cfg.instance_prompt)
        image = strength_sweep(pipe, list(models.values()), prompt, cfg.strength_sweep,
                               min(2, cfg.num_validation_images), cfg.validation_inference_steps, resolution)
        print(f"wrote {save_png(image, out / 'samples' / 'strength_sweep.png')}")
    if sd_metrics.applies_to(cfg.pretrained_model_name_or_path):  # the shape probe knows the tiny model's world
        metrics = sd_metrics.tiny_run_metrics(pipe, list(models.values()), cfg.instance_data_dir,
                                              prompt_of(cfg.instance_prompt),
                                              cfg.class_prompt, cfg.validation_inference_steps, resolution, out)
        print(f"wrote {out / 'metrics.json'}\n{sd_metrics.format_metrics(metrics)}")


def open_tensorboard(folder: Path):
    """A TensorBoard SummaryWriter on `folder`, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


if __name__ == "__main__":
    code = 1
    try:
        code = main()
    finally:
        end_process_group(clean=code == 0)  # a clean end: the processes leave together
    sys.exit(code)
