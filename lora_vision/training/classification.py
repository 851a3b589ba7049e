"""Image-classification training pieces (scripts/train_vit.py, scripts/eval_vit.py).

- `ViTTrainConfig`: every flag of train_vit.py (names follow transformers' image-classification example).
- Exact resume: the sampler's order is a function of (seed, epoch) and each sample's augmentation of
  (seed, epoch, index), so a resumed run skips the batches it already did and sees the very same data.
- `evaluate`: top-1 / top-5; `save_state` / `load_state`: checkpoints of the trainable parameters, the optimizer
  and the RNGs, in safetensors and JSON only (the optimizer packing of training/checkpoint.py is reused).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from ..io import atomic_write_text, read_safetensors, write_safetensors
from ..lora.config import _check_pattern, _check_rank
from ..targets import PRESETS, target_problems
from .checkpoint import CheckpointError, _join_optimizer, _split_optimizer, read_state, write_checkpoint
from .optim import SCHEDULES

MODES = ("lora", "full", "linear-probe")
# Learning rates that work for each mode when --learning_rate is not given (AdamW, batch 32-128).
DEFAULT_LR = {"lora": 5e-3, "full": 5e-4, "linear-probe": 1e-2}


@dataclass(frozen=True)
class ViTTrainConfig:
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
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: float | None = None
    """LoRA alpha (scaling alpha / r); default: the rank."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path input."""
    lora_targets: str = ""
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
    """Peak learning rate; default per mode: lora 5e-3, full 5e-4, linear-probe 1e-2."""
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
    augment: bool = True
    """Random-resized crop and flip for training."""
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
    """Also write a peft adapter folder (output_dir/peft)."""
    logging_steps: int = 10
    """Log the loss every N optimizer steps."""

    def problems(self) -> list[str]:
        """Every invalid value, one line each."""
        out = []
        if self.mode not in MODES:
            out.append(f"mode={self.mode!r}: expected one of {MODES}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            out.append(f"mixed_precision={self.mixed_precision!r}: expected no, fp16 or bf16")
        if self.base_dtype not in ("auto", "float32", "bfloat16", "float16"):
            out.append(f"base_dtype={self.base_dtype!r}: expected auto, float32, bfloat16 or float16")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "num_train_epochs", "lora_rank",
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
        targets = [p.strip() for p in self.lora_targets.split(",") if p.strip()]
        out += target_problems("lora_targets", targets, [n for n in PRESETS if "vit-" in n])
        for pat, r in self.rank_pattern.items():
            out += [f"rank_pattern: {p}" for p in _check_pattern(pat)] + _check_rank(f"rank_pattern[{pat!r}]", r)
        return out

    def lr(self, mode: str | None = None) -> float:
        """The learning rate for `mode` (the flag, else the mode's default)."""
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[mode or self.mode]


class EpochSampler(Sampler):
    """Yields (index, epoch): a permutation of the dataset seeded by (seed, epoch); set_epoch picks the epoch."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order __iter__ yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if not self.shuffle:
            order = list(range(self.n))
        else:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch)).tolist()
        return iter([(i, self.epoch) for i in order])

    def __len__(self) -> int:
        return self.n


class SeededAugment(Dataset):
    """Wraps a dataset: item (index, epoch) is transformed under a torch seed made of (seed, epoch, index).

    The augmentation then depends neither on the worker nor on what came before: resuming is exact.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 10_000_019 + i) % (2**63 - 1))
            return self.dataset[i]


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, per k (k capped at the number of classes)."""
    top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
    hit = top == labels[:, None]
    return [int(hit[:, :min(k, logits.shape[-1])].any(dim=-1).sum()) for k in ks]


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], loader: Any, device: torch.device,
             gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """Top-1 / top-5 accuracy (in %) and mean cross-entropy of `forward` over `loader`."""
    n = c1 = c5 = 0
    loss_sum = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = forward(x).float()
        if gather is not None:
            logits, y = gather(logits), gather(y)
        a, b = topk_correct(logits, y)
        c1, c5, n = c1 + a, c5 + b, n + y.numel()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "loss": loss_sum / max(n, 1), "n": n}


def trainable_named(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters by name (what a checkpoint stores)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_state(output_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
               state: Mapping[str, Any], total_limit: int | None = None,
               params: Mapping[str, torch.Tensor] | None = None, run_id: str | None = None) -> Path:
    """Write checkpoint-<step> (trainable weights, optimizer, RNGs, loop state) atomically; prune this run's old ones.

    `params` replaces the model's trainable parameters by name (the fp32 master copies of pure-bf16 training).
    """
    named = params if params is not None else trainable_named(model)
    opt_tensors, opt_meta = _split_optimizer(optimizer)

    def write(folder: Path) -> None:
        write_safetensors(folder / "trainable.safetensors",
                          {n: p.detach().cpu().contiguous() for n, p in named.items()})
        write_safetensors(folder / "optimizer.safetensors", opt_tensors)
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        write_safetensors(folder / "rng.safetensors", rng)

    return write_checkpoint(output_dir, step, write, {"optimizer": opt_meta, **state}, total_limit, run_id)


def load_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
               params: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Restore what save_state wrote (into `params` when given); raises CheckpointError when it does not fit."""
    path = Path(path)
    state = read_state(path)
    weights, _ = read_safetensors(path / "trainable.safetensors", check_finite=False)
    params = dict(params) if params is not None else trainable_named(model)
    if set(weights) != set(params):
        extra, missing = sorted(set(weights) - set(params)), sorted(set(params) - set(weights))
        raise CheckpointError(f"{path} does not fit this run: {len(missing)} trainable parameter(s) missing "
                              f"(first: {missing[:3]}), {len(extra)} unknown (first: {extra[:3]}); resume with the "
                              "same mode, model, targets and rank, or use a new output_dir")
    bad = [n for n, p in params.items() if tuple(p.shape) != tuple(weights[n].shape)]
    if bad:
        raise CheckpointError(f"{path} does not fit this run: shapes differ for {bad[:5]} (another rank or number "
                              "of classes?); resume with the same settings or use a new output_dir")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    opt_tensors, _ = read_safetensors(path / "optimizer.safetensors", check_finite=False)
    optimizer.load_state_dict(_join_optimizer(opt_tensors, state["optimizer"]))
    rng, _ = read_safetensors(path / "rng.safetensors", check_finite=False)
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return state


def write_comparison(results: Mapping[str, Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """compare.md, compare.json and compare.png (top-1 per epoch) for the runs of --compare."""
    out = Path(out_dir)
    rows = ["| mode | trainable params | trainable % | top-1 | top-5 | training time s | images/s | adapter size |",
            "|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        size = r["artifact_bytes"]
        rows.append(f"| {mode} | {r['trainable']:,} | {r['trainable_pct']:.2f}% | {r['top1']:.1f} | {r['top5']:.1f} | "
                    f"{r['train_time_s']:.1f} | {r['images_per_s']:.1f} | {size / 1024:.1f} KiB ({r['artifact']}) |")
    atomic_write_text(out / "compare.md", "\n".join(rows) + "\n")
    atomic_write_text(out / "compare.json", json.dumps(results, indent=1) + "\n")
    paths = [out / "compare.md", out / "compare.json"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the table is the result; the plot is optional (pip install matplotlib)
        return paths
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for mode, r in results.items():
        hist = r["history"]
        ax.plot([h["epoch"] for h in hist], [h["top1"] for h in hist], marker="o", label=mode)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("LoRA vs full fine-tuning vs linear probe")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out / ".compare.png.tmp"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, out / "compare.png")
    return paths + [out / "compare.png"]


class MasterWeights:
    """fp32 master copies of half-precision trainable parameters, for pure bf16 training (no autocast at all).

    The whole model, activations included, runs in bf16, so no op casts and no fp32 residual stream is written;
    the optimizer steps the fp32 copies. `grads_to_master` adds the model's gradients into the copies (micro-batches
    accumulate in fp32) and `master_to_model` writes the updated values back into the model.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = list(params)
        self.master = [nn.Parameter(p.detach().float().clone()) for p in self.params]

    def grads_to_master(self) -> None:
        """Move (and add) the model's gradients into the fp32 copies; the model's gradients are cleared."""
        for m, p in zip(self.master, self.params):
            if p.grad is not None:
                g = p.grad.float()
                m.grad = g if m.grad is None else m.grad.add_(g)
                p.grad = None

    @torch.no_grad()
    def master_to_model(self) -> None:
        """Copy the fp32 values into the model's parameters (rounded to their dtype)."""
        torch._foreach_copy_(self.params, self.master)
