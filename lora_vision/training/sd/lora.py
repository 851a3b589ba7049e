"""The LoRA layers the DreamBooth recipe trains: where they go, their optimizer groups, and the adapter file written
at the end (native format with the training metadata, plus the A1111/ComfyUI export)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ...adapter import Adapter
from ...formats.kohya import tag_frequency
from ...lora import LoRAConfig, inject_lora, lora_layers, lora_parameters
from ...metadata import AdapterMetadata
from ..checkpoint import CheckpointError
from .config import SDTrainConfig


def add_lora(cfg: SDTrainConfig, unet: nn.Module, text_encoders: list[nn.Module],
             dtype: torch.dtype) -> tuple[dict[str, nn.Module], dict[str, LoRAConfig]]:
    """Inject LoRA into the UNet (and the text encoders with --train_text_encoder); returns the adapted models and
    their LoRA configs by component. With --lora_precision base the low-rank product runs in the base dtype."""
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
    return models, lora_cfgs


def param_groups(cfg: SDTrainConfig, models: Mapping[str, nn.Module], world: int) -> list[dict]:
    """Optimizer groups: the UNet's LoRA at --learning_rate, the text encoders' at --text_encoder_lr (--scale_lr
    multiplies both by batch size x accumulation x processes)."""
    scale = cfg.train_batch_size * cfg.gradient_accumulation_steps * world if cfg.scale_lr else 1
    groups = [{"params": lora_parameters(models["unet"]), "lr": cfg.learning_rate * scale}]
    for key in ("text_encoder", "text_encoder_2"):
        if key in models:
            groups.append({"params": lora_parameters(models[key]),
                           "lr": (cfg.text_encoder_lr or cfg.learning_rate) * scale})
    return groups


def save_adapter(out: Path, cfg: SDTrainConfig, models: Mapping[str, nn.Module], lora_cfgs: Mapping[str, LoRAConfig],
                 base: str, base_name: str, resolved: Mapping[str, Any], captions: Sequence[str],
                 last_good: Path | None) -> Adapter:
    """Write out/adapter.safetensors with the training metadata (`base`: the kohya base-model tag, `captions` the
    instance captions for A1111's tag list) and, unless --export_kohya false, out/adapter_kohya.safetensors."""
    metadata = AdapterMetadata(
        base=base, base_model=base_name, trigger_phrase=cfg.instance_prompt, rank=cfg.rank,
        alpha=cfg.lora_alpha or cfg.rank, targets={k: c.to_dict()["targets"] for k, c in lora_cfgs.items()},
        steps=cfg.max_train_steps, training_config=dict(resolved),
        extra={"modelspec.trigger_phrase": cfg.instance_prompt,
               "ss_tag_frequency": tag_frequency(captions, cfg.instance_data_dir)}).to_strings()  # A1111's tag list
    adapter = Adapter.from_models(models, metadata=metadata, configs=lora_cfgs)
    try:
        path = adapter.save(out / "adapter.safetensors")
    except OSError as err:
        raise CheckpointError(f"could not write {out / 'adapter.safetensors'}: {err.strerror or err}; {last_good} "
                              "holds the trained weights: free space and run the same command with "
                              "--resume_from_checkpoint latest to write the adapter") from None
    print(f"wrote {path}")
    if cfg.export_kohya is not False:
        try:
            from ...formats import export
        except ImportError as err:
            if cfg.export_kohya:
                raise ValueError(f"--export_kohya needs lora_vision.formats ({err})") from None
        else:
            print(f"wrote {export(adapter, 'kohya', out / 'adapter_kohya.safetensors', trigger_phrase=cfg.instance_prompt)}")
    return adapter
