"""DreamBooth LoRA training for Stable Diffusion 1.x / 2.x and SDXL.

    accelerate launch scripts/train_sd.py --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" --output_dir out/dog
    python scripts/train_sd.py            # the pretrained tiny model of samples/tiny-sd on samples/instance, offline, CPU
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 2 scripts/train_sd.py ...
                                          # DDP: per-GPU batch; all draw the same global batch, each its slice

Flags follow diffusers' examples/dreambooth/train_dreambooth_lora.py; `--config FILE.yaml` gives the same keys and
flags override it. Reads top to bottom: parse, build (model, data, caches, LoRA, optimizer), loop, save.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from a checkout
    sys.path.insert(0, str(REPO))

from lora_vision.adapter import Adapter  # noqa: E402
from lora_vision.io import write_safetensors  # noqa: E402
from lora_vision.lora import (LoRAConfig, inject_lora, lora_layers, lora_parameters, lora_report,  # noqa: E402
                              lora_state_dict)
from lora_vision.lora.config import ConfigError  # noqa: E402
from lora_vision.models.sd import detect_sd_family, load_sd_pipeline, prediction_type  # noqa: E402
from lora_vision.data.dreambooth import scan_folder  # noqa: E402
from lora_vision.training.caching import BatchSampler, build_text_table, cache_latents  # noqa: E402
from lora_vision.training.checkpoint import (CheckpointError, find_checkpoint, load_checkpoint,  # noqa: E402
                                             restore_rng, rng_state, save_checkpoint)
from lora_vision.training.config import config_to_dict, load_config, save_config  # noqa: E402
from lora_vision.training.losses import alphas_cumprod  # noqa: E402
from lora_vision.training.optim import LRSchedule, build_optimizer  # noqa: E402
from lora_vision.training import sd_metrics  # noqa: E402
from lora_vision.training.sd_config import SDTrainConfig  # noqa: E402
from lora_vision.training.sd_samples import generate_class_images, save_png, strength_sweep, validation_grid  # noqa: E402,E501
from lora_vision.training.sd_step import (StaticStep, StepSettings, clip_and_step, gather_inputs,  # noqa: E402
                                          shard_inputs, step_loss)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TINY_PROMPT = "a photo of sks toy"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


def parse(argv: list[str] | None) -> SDTrainConfig:
    """Flags + YAML -> config; no model means the built-in tiny model on samples/."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a.split("=")[0] in ("--config", "--pretrained_model_name_or_path") for a in argv):
        argv = ["--config", str(REPO / "configs" / "tiny.yaml")] + argv  # the offline default run
    cfg = load_config(SDTrainConfig, argv, prog="train_sd.py", description=__doc__.split("\n")[0])
    if cfg.pretrained_model_name_or_path is None:
        cfg = dataclasses.replace(cfg, instance_data_dir=cfg.instance_data_dir or str(REPO / "samples" / "instance"),
                                  instance_prompt=cfg.instance_prompt or TINY_PROMPT)
    return cfg


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


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse(argv)
    except ConfigError as err:
        print(f"train_sd.py: {err}", file=sys.stderr)
        return 2
    try:
        return train(cfg)
    except (TrainingDiverged, CheckpointError, ConfigError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"train_sd.py: error: {err}", file=sys.stderr)
        return 1


def train(cfg: SDTrainConfig) -> int:
    from accelerate import Accelerator

    # ---- build ---------------------------------------------------------------------------------------------
    acc = Accelerator()
    device, main_proc = acc.device, acc.is_main_process
    rank, world = acc.process_index, acc.num_processes
    if acc.distributed_type.name not in ("NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU"):
        raise ValueError(f"train_sd.py runs on one process or under DDP (accelerate's multi_gpu), not "
                         f"{acc.distributed_type.name}; use configs/accelerate/multi_gpu.yaml (the LoRA weights "
                         "are small, so sharding them with FSDP saves nothing)")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + acc.process_index)
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = DTYPES[cfg.mixed_precision]
    pipe = load_sd_pipeline(cfg.pretrained_model_name_or_path, torch_dtype=None if dtype == torch.float32 else dtype,
                            variant=cfg.variant)
    pipe.set_progress_bar_config(disable=True)
    family = detect_sd_family(pipe)
    sdxl = family == "sdxl"
    if sdxl and dtype == torch.float16:
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16
    pipe.to(device)
    unet, vae = pipe.unet, pipe.vae
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if sdxl else [])
    for m in [unet, vae, *text_encoders]:
        m.requires_grad_(False)
    pred_type = cfg.prediction_type or prediction_type(pipe)
    resolution = cfg.resolution or int(unet.config.sample_size) * pipe.vae_scale_factor
    base_name = cfg.pretrained_model_name_or_path or "tiny (built-in)"
    resolved = dict(config_to_dict(cfg), resolution=resolution, prediction_type=pred_type, num_processes=world)
    if main_proc:
        save_config(dataclasses.replace(cfg, resolution=resolution, prediction_type=pred_type), out / "config.yaml")
        print(f"model: {base_name} ({family}, {pred_type}), resolution {resolution}, device {device}, "
              f"base weights {dtype}")

    if cfg.with_prior_preservation:  # top the class folder up with the base model before any LoRA exists
        acc.wait_for_everyone()  # every process counts the same folder before any writes to it
        made = generate_class_images(pipe, cfg.class_prompt, cfg.class_data_dir, cfg.num_class_images,
                                     cfg.sample_batch_size, cfg.class_inference_steps, resolution, cfg.seed,
                                     rank=rank, world=world)
        acc.wait_for_everyone()  # each process wrote its share (atomically); all see every image after this
        if made and main_proc:
            print(f"generated {made} class images into {cfg.class_data_dir}")

    scan = dict(resolution=resolution, bucketing=cfg.bucketing, bucket_step=cfg.bucket_step,
                small_images=cfg.small_images)
    instance = scan_folder(cfg.instance_data_dir, cfg.instance_prompt, use_captions=cfg.use_captions, **scan)
    classes = (scan_folder(cfg.class_data_dir, cfg.class_prompt, what="class", use_captions=False, **scan)
               if cfg.with_prior_preservation else None)
    prompts = sorted(set(instance.captions) | set(classes.captions if classes else ()))
    table = build_text_table(prompts, tokenizers, text_encoders, sdxl, cache=not cfg.train_text_encoder, dtype=dtype)
    row_of = {p: i for i, p in enumerate(prompts)}
    data_rng = np.random.default_rng(cfg.seed)  # the same on every process: all draw the same global batches
    latent_dtype = torch.float32 if dtype == torch.float32 else dtype
    from accelerate.utils import gather_object
    crop = dict(center_crop=cfg.center_crop, flip=cfg.random_flip, seed=cfg.seed, dtype=latent_dtype, rank=rank,
                world=world, gather=gather_object)
    inst_cache = cache_latents(instance, vae, row_of, desc="caching instance latents", **crop)
    class_cache = cache_latents(classes, vae, row_of, desc="caching class latents", **crop) if classes else None
    if main_proc:
        print(f"{len(instance)} instance images in {len(inst_cache)} bucket(s) "
              f"{[f'{w}x{h}' for w, h in inst_cache]}" + (f", {len(classes)} class images" if classes else "")
              + f", {len(prompts)} distinct prompt(s), text embeddings {'live' if cfg.train_text_encoder else 'cached'}")

    torch.manual_seed(cfg.seed)  # the same LoRA initialisation on every process and every run
    targets = cfg.unet_targets[0] if len(cfg.unet_targets) == 1 and "." not in cfg.unet_targets[0] \
        and cfg.unet_targets[0].startswith("unet-") else cfg.unet_targets
    unet_lora = LoRAConfig(rank=cfg.rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=targets,
                           rank_pattern=cfg.rank_pattern)
    lora_cfgs = {"unet": unet_lora}
    inject_lora(unet, unet_lora)
    models = {"unet": unet}
    if cfg.train_text_encoder:
        te_targets = cfg.text_encoder_targets[0] if len(cfg.text_encoder_targets) == 1 and \
            cfg.text_encoder_targets[0].startswith("clip-") else cfg.text_encoder_targets
        te_lora = LoRAConfig(rank=cfg.rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=te_targets)
        for key, te in zip(("text_encoder", "text_encoder_2"), text_encoders):
            inject_lora(te, te_lora)
            models[key], lora_cfgs[key] = te, te_lora
    if cfg.lora_precision == "base" and dtype != torch.float32:
        for m in models.values():
            for _, layer in lora_layers(m):
                layer.compute_dtype = dtype  # the low-rank product in bf16/fp16; parameters stay float32
    if main_proc:
        print("; ".join(lora_report(m, k) for k, m in models.items()))
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for te in text_encoders if cfg.train_text_encoder else []:
            te.gradient_checkpointing_enable()
    use_cl = cfg.channels_last and device.type == "cuda"
    if use_cl:
        unet.to(memory_format=torch.channels_last)

    one_bucket = len(inst_cache) == 1 and (class_cache is None or list(class_cache) == list(inst_cache))
    use_graph = (cfg.cuda_graph and device.type == "cuda" and acc.num_processes == 1 and one_bucket
                 and cfg.gradient_accumulation_steps == 1 and not cfg.gradient_checkpointing
                 and not cfg.use_8bit_adam and dtype != torch.float16 and cfg.lora_dropout == 0)
    scale = cfg.train_batch_size * cfg.gradient_accumulation_steps * acc.num_processes if cfg.scale_lr else 1
    groups = [{"params": lora_parameters(unet), "lr": cfg.learning_rate * scale}]
    for key in ("text_encoder", "text_encoder_2"):
        if key in models:
            groups.append({"params": lora_parameters(models[key]), "lr": (cfg.text_encoder_lr or cfg.learning_rate) * scale})
    base_lrs = [g["lr"] for g in groups]
    params = [p for g in groups for p in g["params"]]
    optimizer = build_optimizer(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                                eps=cfg.adam_epsilon, use_8bit=cfg.use_8bit_adam, capturable=use_graph)
    schedule = LRSchedule(cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_train_steps, cfg.lr_num_cycles, cfg.lr_power)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # the same on every process, as data_rng

    start, last_good = 0, None
    if cfg.resume_from_checkpoint:
        ckpt = find_checkpoint(out, cfg.resume_from_checkpoint)
        if ckpt is None:
            print(f"no checkpoint in {out} yet: starting from step 0")
        else:
            saved = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))["config"]
            saved_world = int(saved.get("num_processes", 1))
            if saved.get("train_batch_size", 0) * saved_world == cfg.train_batch_size * world:
                saved = dict(saved, train_batch_size=cfg.train_batch_size)  # same global batch, another split: fine
            elif saved_world != world:
                saved = dict(saved, train_batch_size=f"{saved['train_batch_size']} per process x {saved_world} "
                             f"processes (keep train_batch_size x processes = {saved['train_batch_size'] * saved_world})")
            bad = dataclasses.replace(cfg, resolution=resolution, prediction_type=pred_type).resume_mismatches(saved)
            if bad:
                raise CheckpointError(f"{ckpt} was written by a different configuration:\n  - " + "\n  - ".join(bad)
                                      + "\nresume with the same settings, or use a new --output_dir")
            state = load_checkpoint(ckpt, models, optimizer)
            restore_rng(state["rng_tensors"], state["rng"], generator, data_rng)
            if world > 1:  # the global-batch streams above are shared; dropout's stream is each process's own
                torch.manual_seed(cfg.seed + 1_000_003 * (rank + 1) + start)
            start, last_good = int(state["step"]), ckpt
            if main_proc:
                print(f"resumed from {ckpt} at step {start}")

    if acc.num_processes > 1:
        unet = acc.prepare_model(unet)
    ac = alphas_cumprod(pipe.scheduler, device)
    settings = StepSettings(pred_type, int(pipe.scheduler.config.num_train_timesteps), cfg.snr_gamma,
                            cfg.noise_offset, cfg.prior_loss_weight, cfg.max_grad_norm, sdxl)
    global_batch = cfg.train_batch_size * world  # drawn identically everywhere; each process trains on its slice
    inst_sampler = BatchSampler(inst_cache, global_batch, data_rng)
    class_sampler = BatchSampler(class_cache, global_batch, data_rng) if class_cache else None
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 and device.type == "cuda" else None

    def next_inputs() -> list:
        """This micro-batch's inputs: one concatenated batch, or instance and class apart when sizes differ."""
        size, rows = inst_sampler.next()
        parts = [(inst_cache[size], torch.from_numpy(rows).to(device, non_blocking=True))]
        if class_sampler is None:
            return [shard_inputs(gather_inputs(parts, generator, settings), rank, world)]
        csize, crows = class_sampler.next()
        cpart = (class_cache[csize], torch.from_numpy(crows).to(device, non_blocking=True))
        if csize == size:
            return [shard_inputs(gather_inputs(parts + [cpart], generator, settings), rank, world)]
        return [shard_inputs(gather_inputs(parts, generator, settings), rank, world),
                shard_inputs(gather_inputs([cpart], generator, settings), rank, world)]

    def loss_of(x) -> torch.Tensor:
        return step_loss(unet, x, table, text_encoders, ac, settings, dtype, use_cl)

    def eager_step() -> torch.Tensor:
        total = torch.zeros((), device=device)
        for micro in range(cfg.gradient_accumulation_steps):
            xs = next_inputs()
            loss = loss_of(xs[0]) + sum(cfg.prior_loss_weight * loss_of(x) for x in xs[1:])
            loss = loss / cfg.gradient_accumulation_steps
            sync = micro == cfg.gradient_accumulation_steps - 1 or acc.num_processes == 1
            with (acc.no_sync(unet) if not sync else torch.enable_grad()):
                (scaler.scale(loss) if scaler else loss).backward()
            total = total + loss.detach()
        clip_and_step(params, optimizer, cfg.max_grad_norm, scaler)
        return total

    static = None
    if use_graph or cfg.compile:
        if cfg.compile:
            unet.forward = torch.compile(unet.forward)
        saved_rng = generator.get_state(), data_rng.bit_generator.state
        static = StaticStep(loss_of, params, optimizer, cfg.max_grad_norm, next_inputs()[0])
        if use_graph:
            try:
                static.capture(warmup=2)
                if main_proc:
                    print("training step captured as one CUDA graph")
            except RuntimeError as err:  # e.g. an op that cannot be captured: keep training, eagerly
                print(f"warning: CUDA graph capture failed ({err}); using the eager step", file=sys.stderr)
                static = None
        generator.set_state(saved_rng[0])  # the example batch drew random numbers: give them back
        data_rng.bit_generator.state = saved_rng[1]

    writer = None
    if cfg.report_to == "tensorboard" and main_proc:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out / cfg.logging_dir))
        except ImportError:
            writer = None
    log_path = out / cfg.logging_dir / "loss.csv"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if start == 0:
        log_path.write_text("step,loss,lr\n")

    # ---- loop ----------------------------------------------------------------------------------------------
    losses = torch.zeros(cfg.logging_steps, device=device)
    pending_from, pending = start, 0
    events: list = []
    bar = tqdm(range(start, cfg.max_train_steps), initial=start, total=cfg.max_train_steps, desc="training",
               unit="step", disable=not main_proc)

    def flush(step: int) -> None:
        nonlocal pending_from, pending
        if not pending:
            return
        logged = acc.reduce(losses[:pending].clone(), "mean") if world > 1 else losses[:pending]  # the global loss
        values = check_losses(logged, pending_from, last_good)
        mean, lr = statistics.fmean(values), base_lrs[0] * schedule.factor(step - 1)
        bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
        if main_proc:
            with log_path.open("a") as f:
                f.writelines(f"{pending_from + i + 1},{v:.6g},{lr:.6g}\n" for i, v in enumerate(values))
            if writer:
                writer.add_scalar("train/loss", mean, step)
                writer.add_scalar("train/lr", lr, step)
        pending_from, pending = step, 0

    for step in bar:
        schedule.apply(optimizer, base_lrs, step)
        if static is not None:
            static.load(next_inputs()[0])
            loss = static.run()
        else:
            loss = eager_step()
        losses[pending].copy_(loss, non_blocking=True)
        pending += 1
        if cfg.time_steps:
            events.append(_stamp(device))
        done = step + 1
        if pending == cfg.logging_steps or done == cfg.max_train_steps:
            flush(done)
        if done % cfg.checkpointing_steps == 0 and done != cfg.max_train_steps:
            flush(done)
            if main_proc:
                last_good = save_checkpoint(out, done, models, optimizer, rng_state(generator, data_rng), resolved,
                                            cfg.checkpoints_total_limit)
            acc.wait_for_everyone()
        if cfg.validation_prompt and done % cfg.validation_steps == 0 and main_proc:
            image = validation_grid(pipe, cfg.validation_prompt, cfg.num_validation_images,
                                    cfg.validation_inference_steps, resolution)
            save_png(image, out / "samples" / f"validation_step{done:06d}.png")
            if writer:
                writer.add_image("validation", np.asarray(image), done, dataformats="HWC")
    bar.close()
    flush(cfg.max_train_steps)
    if cfg.time_steps:
        _report_times(events, cfg.train_batch_size)
    dump = os.environ.get("LORA_VISION_DUMP_RANK_LORA")
    if dump:  # debugging/tests: every process writes the LoRA weights it holds, to compare processes
        Path(dump).mkdir(parents=True, exist_ok=True)
        write_safetensors(Path(dump) / f"rank{rank}.safetensors",
                          {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(models["unet"]).items()})

    # ---- save ----------------------------------------------------------------------------------------------
    if not main_proc:
        return 0
    if start < cfg.max_train_steps:
        last_good = save_checkpoint(out, cfg.max_train_steps, models, optimizer, rng_state(generator, data_rng),
                                    resolved, cfg.checkpoints_total_limit)
    kohya_base = "sd2-v" if family == "sd2" and pred_type == "v_prediction" else family
    metadata = {"lora_vision.base": kohya_base, "lora_vision.base_model": base_name,
                "lora_vision.trigger_phrase": cfg.instance_prompt, "modelspec.trigger_phrase": cfg.instance_prompt,
                "lora_vision.rank": str(cfg.rank), "lora_vision.alpha": str(cfg.lora_alpha or cfg.rank),
                "lora_vision.targets": json.dumps({k: c.to_dict()["targets"] for k, c in lora_cfgs.items()}),
                "lora_vision.steps": str(cfg.max_train_steps), "lora_vision.training_config": json.dumps(resolved)}
    adapter = Adapter.from_models(models, metadata=metadata, configs=lora_cfgs)
    path = adapter.save(out / "adapter.safetensors")
    print(f"wrote {path}")
    if cfg.export_kohya is not False:
        try:
            from lora_vision.formats import export
        except ImportError as err:
            if cfg.export_kohya:
                raise ValueError(f"--export_kohya needs lora_vision.formats ({err})") from None
        else:
            print(f"wrote {export(adapter, 'kohya', out / 'adapter_kohya.safetensors', trigger_phrase=cfg.instance_prompt)}")
    if cfg.strength_sweep:
        prompt = cfg.validation_prompt or cfg.instance_prompt
        image = strength_sweep(pipe, list(models.values()), prompt, cfg.strength_sweep,
                               min(2, cfg.num_validation_images), cfg.validation_inference_steps, resolution)
        print(f"wrote {save_png(image, out / 'samples' / 'strength_sweep.png')}")
    if sd_metrics.applies_to(cfg.pretrained_model_name_or_path):  # the shape probe knows the tiny model's world
        metrics = sd_metrics.tiny_run_metrics(pipe, list(models.values()), cfg.instance_data_dir, cfg.instance_prompt,
                                              cfg.class_prompt, cfg.validation_inference_steps, resolution, out)
        print(f"wrote {out / 'metrics.json'}\n{sd_metrics.format_metrics(metrics)}")
    if writer:
        writer.close()
    return 0


def _stamp(device: torch.device):
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def _report_times(events: list, batch_size: int, warmup: int = 10) -> None:
    """Print `STEPS ours n=.. median_s=.. steps_per_s=.. peak_alloc_gib=..` (same format as step_timer.py)."""
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


if __name__ == "__main__":
    sys.exit(main())
