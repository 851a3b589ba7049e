"""The configuration of DreamBooth LoRA training (scripts/train_sd.py).

Field names follow diffusers' examples/dreambooth/train_dreambooth_lora.py wherever the meaning is the same, so
an existing command line keeps working.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from ...adapter import check_token
from ...lora.config import ConfigError, _check_pattern, _check_rank
from ...targets import CLIP_LAYER_NAMES, DIT_PRESET_FAMILIES, PRESETS, UNET_LAYER_NAMES, target_problems
from ..config import LORA_ALIASES, AdapterKindFields, TrainingFeatures
from ..dit.flow import WEIGHTING_SCHEMES
from ..dit.lowmem import QUANTIZE_KINDS
from ..optim import OPTIMIZERS, SCHEDULES
from .losses import HUBER_SCHEDULES, LOSS_TYPES

# The keys of --lr_per_component: a component, or a part of the UNet (its down blocks, mid block, up blocks).
LR_KEYS: tuple[str, ...] = ("unet", "unet.down", "unet.mid", "unet.up", "text_encoder", "text_encoder_2")

# Fields that may change between a checkpoint and the run that resumes it; every other field must match.
RESUMABLE_CHANGES: frozenset[str] = frozenset({
    "max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint", "output_dir",
    "overwrite_output_dir",
    "validation_prompt", "num_validation_images", "validation_steps", "validation_inference_steps",
    "strength_sweep", "logging_steps", "report_to", "export_kohya", "save_peft", "time_steps", "profile_steps",
    "cuda_graph", "compile", "compile_cache_dir",
    "sample_batch_size", "class_inference_steps", "num_class_images", "logging_dir", "num_threads", "ema_cpu",
})

# kohya sd-scripts flags with another name here (accepted as aliases), and those with no counterpart (refused,
# saying what to use instead).
KOHYA_ALIASES: dict[str, str] = {"network_dim": "rank", "network_alpha": "lora_alpha",
                                 "conditioning_data_dir": "mask_data_dir"}
KOHYA_INSTEAD: dict[str, str] = {
    "num_train_epochs": "this script counts optimizer steps, not epochs: use --max_train_steps "
                        "(steps = epochs x images x repeats / train_batch_size)",
    "network_module": "this script always trains LoRA: leave --network_module out and choose the layers with "
                      "--unet_targets",
    "train_data_dir": "use --instance_data_dir with the folder that holds the images (kohya's <repeats>_<name> "
                      "folders are not needed: every step draws a random batch)",
}

# The shared LoRA spellings, with `targets` meaning the UNet's (text_encoder_targets has no other name), and kohya's.
SD_ALIASES: dict[str, str] = {**{alias: "unet_targets" if name == "targets" else name
                                 for alias, name in LORA_ALIASES.items()}, "targets": "unet_targets", **KOHYA_ALIASES}

_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


def kohya_folder_note(folder: str | None) -> str | None:
    """A note when `folder` follows kohya's `<repeats>_<name>` convention (e.g. `10_sks toy`): the repeats are not
    used here. Raises ConfigError when `folder` holds only such sub-folders, which this script would not read."""
    if folder is None:
        return None
    path = Path(folder)
    if path.is_dir():
        entries = list(path.iterdir())
        subs = sorted(p.name for p in entries if p.is_dir() and _KOHYA_FOLDER.match(p.name))
        if subs and not any(p.is_file() for p in entries):
            raise ConfigError(f"instance_data_dir={folder!r} holds kohya-style <repeats>_<name> folders ({subs[0]!r}"
                              f"{', ...' if len(subs) > 1 else ''}) and no images; expected the folder with the "
                              f"images: give --instance_data_dir {str(path / subs[0])!r}")
    match = _KOHYA_FOLDER.match(path.name)
    if match is None:
        return None
    return (f"note: the instance folder {path.name!r} is named in kohya's <repeats>_<name> style; the {match[1]} "
            "repeats are not used (every step draws a random batch of all images): set the training length with "
            "--max_train_steps")


@dataclass(frozen=True)
class SDTrainConfig(TrainingFeatures, AdapterKindFields):
    """Everything scripts/train_sd.py needs; built by load_config from defaults, YAML and flags."""

    pretrained_model_name_or_path: str | None = None
    """Local diffusers folder or hub id (SD 1.x/2.x/SDXL, detected from the model); None: the built-in tiny model."""
    variant: str | None = None
    """Weight file variant to load, e.g. fp16."""
    instance_data_dir: str | None = None
    """Folder of instance images (a .txt beside an image is its caption); None with no model: samples/instance."""
    instance_prompt: str | None = None
    """Prompt with the trigger phrase (e.g. 'a photo of sks dog'); also the trigger phrase in the adapter metadata."""
    use_captions: bool = True
    """Use `<image><caption_extension>` as the caption of an image when it exists."""
    caption_extension: str = ".txt"
    """The suffix of caption files beside the images (kohya's flag; kohya's own default is .caption)."""
    shuffle_caption: bool = False
    """Shuffle the comma-separated tags of each instance caption every time it is drawn (kohya's flag); shuffled
    captions are encoded on the fly (the text encoder runs once per new variant and step)."""
    keep_tokens: int = 0
    """With shuffle_caption: keep the first N tags in place (e.g. the trigger word), shuffle the rest."""
    caption_dropout_rate: float = 0.0
    """Train an instance image with the empty prompt at this rate (its embedding is cached)."""
    masked_loss: bool = False
    """Weight the loss per latent pixel by a mask per instance image (white = trained, black = ignored): the file
    with the image's name in mask_data_dir, else <name>_mask.png beside the image (not trained on as an image)."""
    alpha_mask: bool = False
    """Masked loss with each instance image's alpha channel as its mask (images without alpha count fully)."""
    mask_data_dir: str | None = None
    """A folder of mask images named as the instance images (kohya's conditioning_data_dir); needs masked_loss."""
    class_data_dir: str | None = None
    """Folder of class images for prior preservation; missing ones are generated into it."""
    class_prompt: str | None = None
    """Prompt of the class images (e.g. 'a photo of a dog')."""
    with_prior_preservation: bool = False
    """Add the prior-preservation loss on class images."""
    prior_loss_weight: float = 1.0
    """Weight of the prior-preservation loss."""
    num_class_images: int = 100
    """How many class images to have; fewer in class_data_dir are topped up by generation."""
    sample_batch_size: int = 4
    """Batch size when generating class images."""
    class_inference_steps: int = 25
    """Denoising steps per generated class image."""
    output_dir: str = "outputs/train_sd"
    """Where the adapter, checkpoints, samples and the resolved config go."""
    logging_dir: str = "logs"
    """Folder under output_dir for the loss log and TensorBoard events."""
    seed: int = 0
    """Seed of everything random (data order, noise, timesteps, LoRA init)."""
    resolution: int | None = None
    """Training size in pixels (the square bucket side); None: the model's native size."""
    center_crop: bool = False
    """Center crop (true) or random crop (false) to the bucket."""
    random_flip: bool = False
    """Mirror images left-right at random."""
    bucketing: bool = False
    """Aspect-ratio bucketing: each image trains at the bucket nearest its aspect ratio instead of a square crop."""
    bucket_step: int = 64
    """Bucket sides are multiples of this many pixels."""
    small_images: str = "upscale"
    """Images smaller than the resolution: 'upscale' (with a warning) or 'error'."""
    train_text_encoder: bool = False
    """Also train LoRA on the text encoder(s)."""
    train_text_encoder_ti: bool = False
    """Pivotal tuning: train new tokens as text embeddings with the LoRA (token_abstraction in the prompts and
    captions stands for them); saved in the adapter, bundled in the kohya file and as embeddings.safetensors."""
    token_abstraction: str = "TOK"
    """With train_text_encoder_ti: the word in the instance prompt and captions that the new tokens replace."""
    num_new_tokens_per_abstraction: int = 2
    """With train_text_encoder_ti: how many new tokens (vectors per text encoder) the token_abstraction stands for."""
    train_batch_size: int = 4
    """Instance images per step (prior preservation adds as many class images)."""
    max_train_steps: int = 400
    """Optimizer steps to train."""
    checkpointing_steps: int = 500
    """Save a resumable checkpoint every this many steps."""
    checkpoints_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest deleted first)."""
    resume_from_checkpoint: str | None = None
    """A checkpoint folder, or 'latest' for the newest in output_dir."""
    overwrite_output_dir: bool = False
    """Start over in an output_dir that holds another run's checkpoints, deleting them (else that is an error)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in backward to save memory."""
    learning_rate: float = 1e-4
    """Learning rate of the UNet LoRA."""
    text_encoder_lr: float | None = None
    """Learning rate of the text-encoder LoRA; None: learning_rate."""
    scale_lr: bool = False
    """Multiply learning rates by batch size x accumulation x processes."""
    lr_scheduler: str = "constant"
    """constant, constant_with_warmup, linear, cosine, cosine_with_restarts or polynomial."""
    lr_warmup_steps: int = 0
    """Steps of linear warm-up from 0."""
    lr_num_cycles: int = 1
    """Cycles of cosine_with_restarts."""
    lr_power: float = 1.0
    """Power of the polynomial schedule."""
    use_8bit_adam: bool = False
    """8-bit AdamW from bitsandbytes (must be installed); the same as --optimizer adamw8bit."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: the B matrices learn at this multiple of the learning rate (16 in the paper); None: off."""
    lr_per_component: dict[str, float] = field(default_factory=dict)
    """Learning rates per component or UNet part, e.g. 'unet=1e-4,unet.up=2e-4,text_encoder=5e-5' (keys: unet,
    unet.down, unet.mid, unet.up, text_encoder, text_encoder_2); unlisted parts use learning_rate / text_encoder_lr."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_weight_decay: float = 1e-2
    """AdamW weight decay."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0 disables clipping)."""
    mixed_precision: str = "no"
    """no, fp16 or bf16: dtype of the frozen base weights; LoRA weights and optimizer stay in float32."""
    lora_precision: str = "base"
    """Precision of the LoRA product: 'base' (the base weights' dtype; parameters stay float32) or 'fp32'."""
    allow_tf32: bool = False
    """Allow TF32 matrix math on Ampere and newer GPUs."""
    rank: int = 4
    """LoRA rank."""
    lora_alpha: float | None = None
    """LoRA alpha (scaling = alpha / rank); None: alpha = rank."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    unet_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """UNet modules to adapt: a preset name (unet-attn, unet-attn-ff, ...) or module-name patterns; for a DiT model
    its transformer's (flux-attn, sd3-attn-ff, ...), and left at this default, the family's attention preset
    (Flux.1: flux-attn-ff, whose single-block MLP input the ComfyUI file's fused linear1 needs)."""
    text_encoder_targets: tuple[str, ...] = ("clip-attn",)
    """Text-encoder modules to adapt: a preset name or module-name patterns."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module ranks: pattern -> rank (e.g. {'re:.*up_blocks.*': 8}); JSON on the command line."""
    snr_gamma: float | None = None
    """Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is the paper's value; None disables it."""
    noise_offset: float = 0.0
    """Offset noise strength (0 disables)."""
    loss_type: str = "l2"
    """l2 (squared error), l1, huber or smooth_l1 (kohya's pseudo-Huber forms, threshold from huber_schedule)."""
    huber_schedule: str = "snr"
    """Huber threshold over timesteps: constant (huber_c), exponential (1 at t=0 down to huber_c) or snr (kohya's
    default: about 1 for clean samples, huber_c for noisy ones)."""
    huber_c: float = 0.1
    """The Huber threshold (constant) or its end value (exponential, snr); large values make huber equal l2."""
    multires_noise_iterations: int = 0
    """Multires (pyramid) noise levels, kohya's pyramid_noise_like (6-10 is usual); 0 disables."""
    multires_noise_discount: float = 0.3
    """Weight factor per multires noise level (kohya recommends 0.1-0.3)."""
    debiased_estimation_loss: bool = False
    """Weight each sample's loss by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)), debiased estimation (Yu et al. 2023)."""
    prediction_type: str | None = None
    """epsilon or v_prediction; None: the model's scheduler decides."""
    weighting_scheme: str | None = None
    """DiT (flow matching): how noise levels are drawn and weighted: none, uniform, logit_normal, mode, sigma_sqrt or
    cosmap (diffusers' names); None: logit_normal for SD 3.x, none for the others (the references' defaults)."""
    logit_mean: float = 0.0
    """DiT: mean of the logit_normal density."""
    logit_std: float = 1.0
    """DiT: standard deviation of the logit_normal density."""
    mode_scale: float = 1.29
    """DiT: scale of the mode density."""
    precondition_outputs: bool | None = None
    """DiT: train the clean latent the prediction implies (x_sigma - sigma x prediction) against the image latent,
    EDM-style, instead of the prediction against noise - x0 (a sigma^2 loss weight); None: on for SD 3.x, as
    diffusers' train_dreambooth_lora_sd3.py, off for the others."""
    quantize_base: str = "none"
    """DiT low-memory mode: quantize the frozen transformer's Linear weights with torchao (none, int8, fp8 on CUDA
    8.9+, nf4); the LoRA trains on top in the compute dtype and loads on the unquantized base."""
    guidance_scale: float = 3.5
    """DiT: the value the guidance embedding sees during training (Flux.1-dev; unused by transformers without one)."""
    resolution_shift: bool = True
    """DiT: shift the training noise levels by image size where the scheduler does so at inference (Flux.1,
    Flux.2, Qwen-Image); false: its unshifted table, as diffusers' train_dreambooth_lora_flux.py."""
    max_sequence_length: int | None = None
    """DiT: text tokens per prompt; None: the pipeline's encode_prompt default."""
    validation_prompt: str | None = None
    """Prompt for validation grids; None: no periodic validation (the final sweep uses the instance prompt)."""
    num_validation_images: int = 4
    """Images per validation grid (fixed seeds 0..n-1)."""
    validation_steps: int = 100
    """Write a validation grid every this many steps."""
    validation_inference_steps: int = 25
    """Denoising steps of validation images."""
    validation_split: float = 0.0
    """Fraction of the instance images held out (never trained on) for a validation loss every validation_steps,
    logged in loss.csv as val_loss; 0: none."""
    validation_data_dir: str | None = None
    """A folder of held-out images (captions as for the instance images) for the validation loss, instead of
    validation_split."""
    strength_sweep: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Strengths of the final sweep grid; empty disables it."""
    logging_steps: int = 10
    """Log loss and learning rate every this many steps (the only host syncs of the loop)."""
    report_to: str = "tensorboard"
    """tensorboard (when installed) or none."""
    cuda_graph: bool = True
    """Capture the whole training step in a CUDA graph when possible (CUDA, one bucket, no accumulation)."""
    compile: bool = False
    """torch.compile the denoiser's repeated blocks (regional compilation: the UNet's transformer blocks, a DiT's
    double and single blocks), the compiled kernels cached in compile_cache_dir for the next run."""
    compile_cache_dir: str | None = None
    """Where --compile keeps its compiled kernels between runs (TORCHINDUCTOR_CACHE_DIR); default
    $XDG_CACHE_HOME/lora_vision/torch_compile (~/.cache/lora_vision/torch_compile)."""
    channels_last: bool = True
    """Use channels_last memory format for the UNet on CUDA."""
    export_kohya: bool | None = None
    """Also write the A1111/ComfyUI (kohya) file; None: when the exporter is available."""
    save_peft: bool = False
    """Also write peft adapter folders, output_dir/peft/<component>/ (unet, text_encoder, text_encoder_2; peft_ema/
    with --use_ema): peft's LoRA, LoRA with use_dora, LoHa or LoKr, as --adapter_type (PeftModel.from_pretrained(
    unet, 'out/peft/unet')). Settings peft cannot rebuild are refused before training."""
    time_steps: bool = False
    """Time every step with CUDA events and print a STEPS line (benchmarks)."""
    profile_steps: int = 0
    """Profile this many steps after 5 warm-up steps (torch.profiler) and write where the step's time goes to
    output_dir/profile/kernels.md (kernel categories and top kernels per step, the device's busy share of the wall
    time) and a Chrome trace, profile/trace.json.gz; 0: off."""
    num_threads: int | None = None
    """CPU threads of torch; None: 1 for the built-in tiny model on CPU unless OMP_NUM_THREADS is set, else torch's."""

    ALIASES: ClassVar[dict[str, str]] = SD_ALIASES
    INSTEAD: ClassVar[dict[str, str]] = KOHYA_INSTEAD

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))

    def problems(self) -> list[str]:
        """Every problem of this config, one line each."""
        out: list[str] = []
        out += self.kind_problems()
        positive = ("train_batch_size", "max_train_steps", "checkpointing_steps", "gradient_accumulation_steps",
                    "rank", "num_validation_images", "validation_steps", "logging_steps", "sample_batch_size",
                    "bucket_step", "class_inference_steps", "validation_inference_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                out.append(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            out.append(f"resolution={self.resolution}: expected a positive multiple of 8")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit <= 0:
            out.append(f"checkpoints_total_limit={self.checkpoints_total_limit}: expected a positive integer or None")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            out.append(f"mixed_precision={self.mixed_precision!r}: expected one of no, fp16, bf16")
        if self.lora_precision not in ("base", "fp32"):
            out.append(f"lora_precision={self.lora_precision!r}: expected 'base' or 'fp32'")
        if self.small_images not in ("upscale", "error"):
            out.append(f"small_images={self.small_images!r}: expected 'upscale' or 'error'")
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            out.append(f"prediction_type={self.prediction_type!r}: expected epsilon or v_prediction")
        if self.report_to not in ("tensorboard", "none"):
            out.append(f"report_to={self.report_to!r}: expected tensorboard or none")
        for name in ("learning_rate", "adam_epsilon"):
            if not getattr(self, name) > 0:
                out.append(f"{name}={getattr(self, name)}: expected a number > 0")
        if self.seed < 0:
            out.append(f"seed={self.seed}: expected an integer >= 0")
        if self.profile_steps < 0:
            out.append(f"profile_steps={self.profile_steps}: expected 0 (off) or a number of steps to profile")
        if self.bucket_step > 0 and self.bucket_step % 8:
            out.append(f"bucket_step={self.bucket_step}: expected a multiple of 8 (the VAE works on 8x8 pixel blocks)")
        elif self.bucketing and self.resolution and self.bucket_step > 0 and self.resolution % self.bucket_step:
            out.append(f"bucket_step={self.bucket_step}: resolution {self.resolution} is not a multiple of it; "
                       "expected a divisor of the resolution")
        if self.lr_scheduler not in SCHEDULES:
            close = difflib.get_close_matches(self.lr_scheduler, SCHEDULES, n=1)
            out.append(f"lr_scheduler={self.lr_scheduler!r}: expected one of {', '.join(SCHEDULES)}"
                       + (f" (did you mean {close[0]!r}?)" if close else ""))
        for name in ("lr_warmup_steps", "max_grad_norm", "noise_offset", "prior_loss_weight", "adam_weight_decay"):
            if not getattr(self, name) >= 0:
                out.append(f"{name}={getattr(self, name)}: expected a number >= 0")
        if self.lr_num_cycles < 1:
            out.append(f"lr_num_cycles={self.lr_num_cycles}: expected an integer >= 1")
        if not self.lr_power > 0:
            out.append(f"lr_power={self.lr_power}: expected a number > 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                out.append(f"{name}={getattr(self, name)}: expected a number in [0, 1)")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            out.append(f"lora_alpha={self.lora_alpha}: expected a number > 0 or None")
        out += self.feature_problems()
        if self.use_8bit_adam and self.optimizer in OPTIMIZERS and self.optimizer not in ("adamw", "adamw8bit"):
            out.append(f"use_8bit_adam with optimizer={self.optimizer!r}: give only one of them")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            out.append(f"loraplus_lr_ratio={self.loraplus_lr_ratio}: expected a number > 0 (e.g. 16) or None")
        if self.optimizer == "prodigy":  # it estimates one step size: the package refuses unequal group rates
            uneven = [name for name, bad in (
                ("loraplus_lr_ratio", self.loraplus_lr_ratio not in (None, 1)),
                ("lr_per_component", any(v != self.learning_rate for v in self.lr_per_component.values())),
                ("text_encoder_lr", (self.train_text_encoder or self.train_text_encoder_ti)
                 and self.text_encoder_lr not in (None, self.learning_rate))) if bad]
            if uneven:
                out.append(f"optimizer='prodigy' with {', '.join(uneven)}: Prodigy estimates one step size for all "
                           "trained tensors, so they all need the same learning rate; leave these out or pick "
                           "another optimizer")
        for key, lr in self.lr_per_component.items():
            if key not in LR_KEYS:
                close = difflib.get_close_matches(str(key), LR_KEYS, n=1)
                out.append(f"lr_per_component: unknown key {key!r}; expected some of {', '.join(LR_KEYS)}"
                           + (f" (did you mean {close[0]!r}?)" if close else ""))
            elif not (isinstance(lr, (int, float)) and lr > 0):
                out.append(f"lr_per_component[{key!r}]={lr!r}: expected a learning rate > 0")
        if not 0 <= self.validation_split < 1:
            out.append(f"validation_split={self.validation_split}: expected a fraction in [0, 1), e.g. 0.1")
        elif self.validation_split and self.validation_data_dir:
            out.append("validation_split and validation_data_dir both given: hold out part of the instance images "
                       "or give a folder of validation images, not both")
        if self.num_threads is not None and self.num_threads < 1:
            out.append(f"num_threads={self.num_threads}: expected an integer >= 1 or None")
        unet_presets = [n for n in PRESETS if n.startswith("unet-")
                        or any(n.startswith(f + "-") for f in DIT_PRESET_FAMILIES)]  # DiT: the transformer's
        out += target_problems("unet_targets", self.unet_targets, unet_presets, UNET_LAYER_NAMES)
        if not self.unet_targets:
            out.append("unet_targets is empty: give a preset name or module-name patterns")
        if self.train_text_encoder:
            clip_presets = [n for n in PRESETS if n.startswith("clip-")]
            out += target_problems("text_encoder_targets", self.text_encoder_targets, clip_presets, CLIP_LAYER_NAMES)
        for pat, r in self.rank_pattern.items():
            out += [f"rank_pattern: {p}" for p in _check_pattern(pat)] + _check_rank(f"rank_pattern[{pat!r}]", r)
        if self.weighting_scheme is not None and self.weighting_scheme not in WEIGHTING_SCHEMES:
            close = difflib.get_close_matches(self.weighting_scheme, WEIGHTING_SCHEMES, n=1)
            out.append(f"weighting_scheme={self.weighting_scheme!r}: expected one of {', '.join(WEIGHTING_SCHEMES)}"
                       + (f" (did you mean {close[0]!r}?)" if close else ""))
        if self.quantize_base not in QUANTIZE_KINDS:
            close = difflib.get_close_matches(self.quantize_base, QUANTIZE_KINDS, n=1)
            out.append(f"quantize_base={self.quantize_base!r}: expected one of {', '.join(QUANTIZE_KINDS)}"
                       + (f" (did you mean {close[0]!r}?)" if close else ""))
        if not self.logit_std > 0:
            out.append(f"logit_std={self.logit_std}: expected a number > 0")
        if self.max_sequence_length is not None and self.max_sequence_length <= 0:
            out.append(f"max_sequence_length={self.max_sequence_length}: expected a positive integer or None")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            out.append(f"snr_gamma={self.snr_gamma}: expected a number > 0 or None")
        for name, allowed in (("loss_type", LOSS_TYPES), ("huber_schedule", HUBER_SCHEDULES)):
            if getattr(self, name) not in allowed:
                close = difflib.get_close_matches(str(getattr(self, name)), allowed, n=1)
                out.append(f"{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}"
                           + (f" (did you mean {close[0]!r}?)" if close else ""))
        if not self.huber_c > 0:
            out.append(f"huber_c={self.huber_c}: expected a number > 0 (kohya's default is 0.1)")
        elif self.huber_schedule == "exponential" and self.loss_type in ("huber", "smooth_l1") and self.huber_c >= 1:
            out.append(f"huber_c={self.huber_c} with huber_schedule exponential: expected a number in (0, 1) (the "
                       "threshold falls from 1 to huber_c)")
        if self.multires_noise_iterations < 0:
            out.append(f"multires_noise_iterations={self.multires_noise_iterations}: expected an integer >= 0")
        if not 0 <= self.multires_noise_discount <= 1:
            out.append(f"multires_noise_discount={self.multires_noise_discount}: expected a number in [0, 1]")
        if self.train_text_encoder_ti:
            if self.num_new_tokens_per_abstraction < 1:
                out.append(f"num_new_tokens_per_abstraction={self.num_new_tokens_per_abstraction}: expected an "
                           "integer >= 1 (2 is the usual)")
            if check_token(self.token_abstraction):
                out.append(f"token_abstraction={self.token_abstraction!r}: expected one word without spaces or dots "
                           "(e.g. TOK)")
        if self.keep_tokens < 0:
            out.append(f"keep_tokens={self.keep_tokens}: expected an integer >= 0")
        elif self.keep_tokens and not self.shuffle_caption:
            out.append(f"keep_tokens={self.keep_tokens} without shuffle_caption does nothing; add --shuffle_caption")
        if not 0 <= self.caption_dropout_rate < 1:
            out.append(f"caption_dropout_rate={self.caption_dropout_rate}: expected a fraction in [0, 1), e.g. 0.1")
        if self.mask_data_dir is not None and not self.masked_loss:
            out.append(f"mask_data_dir={self.mask_data_dir!r} was given without masked_loss; add --masked_loss")
        if self.mask_data_dir is not None and self.alpha_mask:
            out.append("alpha_mask and mask_data_dir both given: take the masks from the images' alpha channels or "
                       "from the mask folder, not both")
        ext = self.caption_extension
        if not ext.startswith(".") or len(ext) < 2 or "/" in ext or "\\" in ext:
            out.append(f"caption_extension={ext!r}: expected a file suffix starting with a dot, e.g. .txt or .caption")
        if not 0 <= self.lora_dropout < 1:
            out.append(f"lora_dropout={self.lora_dropout}: expected a probability in [0, 1)")
        if self.with_prior_preservation:
            if self.class_data_dir is None:
                out.append("with_prior_preservation needs class_data_dir (a folder for the class images; "
                           "missing ones are generated into it)")
            if self.class_prompt is None:
                out.append("with_prior_preservation needs class_prompt (e.g. 'a photo of a dog')")
        elif self.class_data_dir is not None and self.class_prompt is None:
            out.append(f"class_data_dir={self.class_data_dir!r} was given without class_prompt; give "
                       "--class_prompt (and --with_prior_preservation to use the class images)")
        if self.pretrained_model_name_or_path is not None and self.instance_data_dir is None:
            out.append("instance_data_dir is required with a model (the built-in tiny model defaults to samples/)")
        if self.pretrained_model_name_or_path is not None and self.instance_prompt is None:
            out.append("instance_prompt is required with a model (e.g. 'a photo of sks dog')")
        return out

    @property
    def text_encoders_train(self) -> bool:
        """Whether the text encoders run with gradients (their LoRA or new token embeddings train), so text
        embeddings cannot be cached."""
        return self.train_text_encoder or self.train_text_encoder_ti

    def resume_mismatches(self, saved: dict) -> list[str]:
        """Fields that differ from a checkpoint's saved config and must not (see RESUMABLE_CHANGES)."""
        out = []
        for f in fields(self):
            if f.name in RESUMABLE_CHANGES or f.name not in saved:
                continue
            mine = getattr(self, f.name)
            mine = list(mine) if isinstance(mine, tuple) else mine
            if mine != saved[f.name]:
                out.append(f"{f.name}: checkpoint has {saved[f.name]!r}, this run has {mine!r}")
        return out
