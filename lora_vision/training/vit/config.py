"""The configuration of ViT classification training (scripts/train_vit.py): one field per flag.

Field names follow transformers' examples/pytorch/image-classification wherever the meaning is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

from ...data.vtab import VTAB_SPLITS, VTAB_TASKS
from ...data.preprocessing import AUGMENT_PRESETS, Augmentation, check_crop_scale
from ...lora.config import _check_pattern, _check_rank
from ...lora.weight_init import WEIGHT_INITS
from ...targets import PRESETS, target_problems
from ..config import LORA_ALIASES, AdapterKindFields, TrainingFeatures
from ..optim import SCHEDULES

MODES = ("lora", "full", "linear-probe")
VARIANTS = ("pissa", "olora", "loraplus", "dora", "lokr", "loha")
KIND_VARIANTS = ("dora", "lokr", "loha")  # variants that are another adapter kind (lora.kinds)
INITS = ("kaiming", "gaussian") + WEIGHT_INITS
AUGMENT_ALIASES = {"true": "imagenet", "false": "none"}
# Learning rates that work for each mode when --learning_rate is not given (AdamW, batch 32-128).
DEFAULT_LR = {"lora": 5e-3, "full": 5e-4, "linear-probe": 1e-2}


@dataclass(frozen=True)
class ViTTrainConfig(TrainingFeatures, AdapterKindFields):
    """Training a ViT classifier on an ImageNet subset with LoRA, full fine-tuning or a linear probe."""

    model_name_or_path: str = "samples/vit/tiny-vit-patterns"
    """transformers folder/hub id, torchvision:vit_b_16, timm:<name>, or tiny-hf / tiny-torchvision / tiny-timm."""
    weights: str | None = None
    """Local .safetensors weights for torchvision / timm / tiny models (transformers folders carry their own)."""
    train_dir: str = "samples/vit/train"
    """ImageFolder tree: one sub-folder per class (ImageNet: one per WordNet id)."""
    validation_dir: str | None = None
    """Validation tree with the same class folders; without it a seeded stratified split of train_dir is used."""
    output_dir: str = "outputs/vit"
    """Where the adapter, peft folder, metrics and checkpoints go."""
    subset: str | None = None
    """Class-list preset from configs/imagenet_subsets (imagenette, imagewoof, imagenet100)."""
    class_list: str | None = None
    """Text file with one class id per line."""
    classes: tuple[str, ...] = ()
    """Comma-separated class ids."""
    first_n_classes: int | None = None
    """Use the first N class folders (sorted by name)."""
    vtab_task: str | None = None
    """A VTAB-1k task (cifar, dtd, ...): train_dir is then the vtab-1k folder (<task>/train800.txt, ...)."""
    vtab_split: str = "final"
    """VTAB-1k: tune (train800 / val200) or final (train800val200 / test, the published numbers)."""
    train_val_split: float = 0.2
    """Fraction of each class held out for validation when there is no validation_dir."""
    verify_images: bool = False
    """Decode every image before training and list those that fail (with skip_corrupt: leave them out)."""
    skip_corrupt: bool = False
    """Skip unreadable images with a warning naming each (at load time the next image takes its place); else stop."""
    mode: str = "lora"
    """lora (adapters + new head), full (every parameter), linear-probe (the head only)."""
    compare: bool = False
    """Run lora, full and linear-probe with the same data and seed; write compare.md/.json/.png."""
    rank: int = 8
    """LoRA rank r."""
    lora_alpha: float | None = None
    """LoRA alpha (scaling alpha / r); default: the rank."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path input."""
    targets: str = ""
    """Preset name (hf-vit-attn, hf-vit-attn-mlp, tv-vit-attn, timm-vit-attn, ...) or comma-separated patterns; default: the family's attention preset."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module ranks as JSON, e.g. '{"re:.*layers\\\\.1[01]\\\\..*": 16}'."""
    per_device_train_batch_size: int = 32
    """Training batch size per device."""
    per_device_eval_batch_size: int = 64
    """Evaluation batch size per device."""
    num_train_epochs: int = 15
    """Number of epochs."""
    max_train_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs)."""
    learning_rate: float | None = None
    """Peak learning rate; default per mode: lora 5e-3, full 5e-4, linear-probe 1e-2 (--optimizer prodigy: 1.0)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    lr_scheduler_type: str = "cosine"
    """constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial."""
    warmup_ratio: float = 0.1
    """Warm-up as a fraction of all optimizer steps (num_warmup_steps overrides)."""
    num_warmup_steps: int | None = None
    """Warm-up steps."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables)."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing."""
    mixed_precision: str = "no"
    """no, fp16 or bf16 (autocast through accelerate)."""
    pure_bf16: bool = False
    """Run the whole model in bf16 without autocast, with fp32 master copies of the trainable parameters."""
    base_dtype: str = "auto"
    """dtype of frozen weights: auto (bf16/fp16 with mixed precision, else float32), float32, bfloat16, float16."""
    torch_compile: bool = False
    """Compile the model with torch.compile."""
    seed: int = 42
    """Seed of the split, the head, LoRA init, the data order and augmentation."""
    dataloader_num_workers: int = 2
    """DataLoader worker processes (images are decoded there)."""
    augment: str = "imagenet"
    """Training augmentation preset: none, light (crop 0.8-1 + flip) or imagenet (crop 0.35-1 + flip); true = imagenet, false = none."""
    hflip: bool | None = None
    """Random horizontal flip; default: the augment preset's (off for digits, text, scans: anything a mirror changes)."""
    crop_scale: tuple[float, ...] = ()
    """Random-resized crop area range MIN MAX (e.g. 0.5 1); default: the augment preset's."""
    init: str = "kaiming"
    """LoRA initialisation: kaiming, gaussian (B = 0), or pissa / olora (from the base weight, which becomes the residual)."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: the B matrices learn at this ratio x the learning rate (the paper suggests 16); None: off."""
    compare_variants: tuple[str, ...] = ()
    """With --compare, also train these LoRA variants: pissa, olora, loraplus (ratio: --loraplus_lr_ratio, else 16)."""
    checkpointing_steps: int | None = None
    """Save a resumable checkpoint every N optimizer steps (and always at the end of an epoch when set)."""
    checkpoints_total_limit: int | None = 2
    """Keep at most this many checkpoints."""
    resume_from_checkpoint: str | None = None
    """'latest' or a checkpoint folder."""
    overwrite_output_dir: bool = False
    """Start over in an output_dir that holds another run's checkpoints, deleting them (else that is an error)."""
    save_merged: bool = False
    """Also save the model with the adapter merged (zero inference overhead)."""
    save_peft: bool = True
    """Also write a peft adapter folder (output_dir/peft): peft's LoRA, LoRA with use_dora, LoHa or LoKr, as
    --adapter_type."""
    logging_steps: int = 10
    """Log the loss every N optimizer steps."""

    ALIASES: ClassVar[dict[str, str]] = LORA_ALIASES

    def __post_init__(self) -> None:
        # --augment true/false (and YAML booleans) are the older spelling of the imagenet / none presets.
        value = str(self.augment).strip().lower()
        object.__setattr__(self, "augment", AUGMENT_ALIASES.get(value, value))

    def problems(self) -> list[str]:
        """Every invalid value, one line each."""
        out = []
        if self.augment not in AUGMENT_PRESETS:
            out.append(f"augment={self.augment!r}: expected one of {AUGMENT_PRESETS} (or true = imagenet, "
                       "false = none)")
        if self.crop_scale:
            out += check_crop_scale(self.crop_scale)
        if self.init not in INITS:
            out.append(f"init={self.init!r}: expected one of {INITS}")
        if self.init in WEIGHT_INITS and self.mode != "lora" and not self.compare:
            out.append(f"init={self.init} applies to --mode lora, not {self.mode}")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            out.append(f"loraplus_lr_ratio={self.loraplus_lr_ratio}: expected a number > 0 or None")
        loraplus = self.loraplus_lr_ratio not in (None, 1) or "loraplus" in self.compare_variants
        if self.optimizer == "prodigy" and loraplus:
            out.append("optimizer='prodigy' with LoRA+ (loraplus_lr_ratio, or loraplus in compare_variants): Prodigy "
                       "estimates one step size for all trained tensors, so they all need the same learning rate; "
                       "leave LoRA+ out or pick another optimizer")
        bad = [v for v in self.compare_variants if v not in VARIANTS]
        if bad:
            out.append(f"compare_variants={list(bad)}: expected some of {VARIANTS}")
        if self.vtab_task is not None and self.vtab_task not in VTAB_TASKS:
            out.append(f"vtab_task={self.vtab_task!r}: expected one of {', '.join(VTAB_TASKS)}")
        if self.vtab_split not in VTAB_SPLITS:
            out.append(f"vtab_split={self.vtab_split!r}: expected one of {tuple(VTAB_SPLITS)}")
        if self.vtab_task and (self.validation_dir or self.subset or self.class_list or self.classes
                               or self.first_n_classes):
            out.append("vtab_task takes its splits and classes from the VTAB-1k files: leave out validation_dir, "
                       "subset, class_list, classes and first_n_classes")
        out += self.feature_problems()
        weight_start = [v for v in (self.init, *self.compare_variants) if v in WEIGHT_INITS]
        if self.use_ema and weight_start:
            out.append(f"use_ema with init={weight_start[0]}: the {weight_start[0]} export rewrites the trained "
                       "weights into a plain update, which the average cannot follow; leave out --use_ema or use "
                       "--init kaiming")
        if self.compare_variants and not self.compare:
            out.append("compare_variants needs --compare")
        if self.compare and self.init in WEIGHT_INITS:
            out.append(f"init={self.init} with --compare: the compared lora run is plain LoRA; add the variant with "
                       f"--compare_variants {self.init}")
        if self.compare and self.loraplus_lr_ratio is not None and "loraplus" not in self.compare_variants:
            out.append("loraplus_lr_ratio with --compare sets the ratio of the loraplus variant: add "
                       "--compare_variants loraplus")
        out += self.kind_problems()
        family = self.model_name_or_path.split(":", 1)[0].removeprefix("tiny-")
        kinds = [k for k in (self.adapter_type, *self.compare_variants) if k in KIND_VARIANTS]
        if kinds and family == "torchvision" and self.save_peft:
            out.append(f"adapter_type={kinds[0]!r} on a torchvision ViT ({self.model_name_or_path}) with --save_peft: "
                       "its attention is an nn.MultiheadAttention, which peft's LoHa, LoKr and DoRA layers do not go "
                       "on; add --save_peft false (adapter.safetensors holds the adapter) or use --adapter_type lora")
        if self.mode not in MODES:
            out.append(f"mode={self.mode!r}: expected one of {MODES}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            out.append(f"mixed_precision={self.mixed_precision!r}: expected no, fp16 or bf16")
        if self.base_dtype not in ("auto", "float32", "bfloat16", "float16"):
            out.append(f"base_dtype={self.base_dtype!r}: expected auto, float32, bfloat16 or float16")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "num_train_epochs", "rank",
                     "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                out.append(f"{name}={getattr(self, name)}: expected >= 1")
        if not 0 <= self.label_smoothing < 1:
            out.append(f"label_smoothing={self.label_smoothing}: expected a value in [0, 1)")
        if self.base_dtype in ("bfloat16", "float16") and self.mixed_precision == "no":
            out.append(f"base_dtype={self.base_dtype} needs --mixed_precision bf16/fp16 (autocast feeds the "
                       "frozen half-precision weights)")
        if self.pure_bf16 and self.mixed_precision != "no":
            out.append("pure_bf16 runs without autocast: leave --mixed_precision at no")
        if self.seed < 0:
            out.append(f"seed={self.seed}: expected an integer >= 0")
        if self.lr_scheduler_type not in SCHEDULES:
            out.append(f"lr_scheduler_type={self.lr_scheduler_type!r}: expected one of {', '.join(SCHEDULES)}")
        if self.num_warmup_steps is not None and self.num_warmup_steps < 0:
            out.append(f"num_warmup_steps={self.num_warmup_steps}: expected an integer >= 0")
        if not 0 <= self.warmup_ratio <= 1:
            out.append(f"warmup_ratio={self.warmup_ratio}: expected a fraction in [0, 1]")
        if not 0 < self.train_val_split < 1:
            out.append(f"train_val_split={self.train_val_split}: expected a fraction in (0, 1)")
        for name in ("max_train_steps", "checkpointing_steps", "checkpoints_total_limit", "first_n_classes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                out.append(f"{name}={getattr(self, name)}: expected an integer >= 1 or None")
        if self.logging_steps < 1:
            out.append(f"logging_steps={self.logging_steps}: expected an integer >= 1")
        if self.dataloader_num_workers < 0:
            out.append(f"dataloader_num_workers={self.dataloader_num_workers}: expected an integer >= 0")
        for name in ("weight_decay", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                out.append(f"{name}={getattr(self, name)}: expected a number >= 0")
        for name in ("learning_rate", "lora_alpha"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                out.append(f"{name}={getattr(self, name)}: expected a number > 0 or None")
        if not 0 <= self.lora_dropout < 1:
            out.append(f"lora_dropout={self.lora_dropout}: expected a probability in [0, 1)")
        targets = [p.strip() for p in self.targets.split(",") if p.strip()]
        out += target_problems("targets", targets, [n for n in PRESETS if "vit-" in n])
        for pat, r in self.rank_pattern.items():
            out += [f"rank_pattern: {p}" for p in _check_pattern(pat)] + _check_rank(f"rank_pattern[{pat!r}]", r)
        return out

    def augmentation(self) -> Augmentation:
        """The training augmentation: the preset with --hflip / --crop_scale on top."""
        return Augmentation.preset(self.augment, self.hflip, tuple(self.crop_scale) if self.crop_scale else None)

    def plain_lora(self) -> "ViTTrainConfig":
        """This config without the LoRA variants (what --compare's lora, full and linear-probe runs use)."""
        return replace(self, init="kaiming" if self.init in WEIGHT_INITS else self.init, loraplus_lr_ratio=None,
                       compare_variants=(), adapter_type="lora")

    def variant(self, name: str) -> "ViTTrainConfig":
        """Plain LoRA with variant `name` switched on: pissa, olora (initialisation), loraplus (ratio
        --loraplus_lr_ratio, else 16), or another adapter kind (dora, lokr, loha; its peft folder is peft's LoRA with
        use_dora, LoKr or LoHa)."""
        if name in KIND_VARIANTS:
            return replace(self.plain_lora(), adapter_type=name)
        if name == "loraplus":
            return replace(self.plain_lora(), loraplus_lr_ratio=self.loraplus_lr_ratio or 16.0)
        return replace(self.plain_lora(), init=name)

    def lr(self, mode: str | None = None) -> float:
        """The learning rate for `mode` (the flag, else the mode's default; Prodigy estimates the step size and
        takes 1.0)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 1.0 if self.optimizer == "prodigy" else DEFAULT_LR[mode or self.mode]
