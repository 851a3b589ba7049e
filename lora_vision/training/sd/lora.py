"""The LoRA layers the DreamBooth recipe trains: where they go, their optimizer groups, and the adapter file written
at the end (native format with the training metadata, plus the A1111/ComfyUI export and, with --save_peft, peft
folders)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ...adapter import Adapter, embedding_tensors
from ...formats import export
from ...formats.kohya import a1111_embedding_tensors, tag_frequency
from ...formats.peft import check_peft_export
from ...formats.peft_kinds import PeftExportError
from ...io import write_safetensors
from ...lora import LoRAConfig, inject_lora, lora_layers, lora_parameters, remove_lora
from ...lora.config import ConfigError
from ...metadata import AdapterMetadata
from ...models.dit import DIT_KINDS
from ...models.sd import TINY_PIPELINES
from ...targets import PRESETS
from ..checkpoint import CheckpointError
from ..ema import EMA
from ..optim import LRSchedule, build_optimizer, loraplus_param_groups
from .config import SDTrainConfig


def add_lora(cfg: SDTrainConfig, unet: nn.Module, text_encoders: list[nn.Module],
             dtype: torch.dtype, component: str = "unet") -> tuple[dict[str, nn.Module], dict[str, LoRAConfig]]:
    """Inject LoRA into the UNet (and the text encoders with --train_text_encoder); returns the adapted models and
    their LoRA configs by component. With --lora_precision base the low-rank product runs in the base dtype.
    `component` names the denoiser: "unet", or "transformer" for the DiT families (--unet_targets adapt it)."""
    targets = cfg.unet_targets[0] if len(cfg.unet_targets) == 1 and cfg.unet_targets[0] in PRESETS \
        else cfg.unet_targets
    unet_lora = LoRAConfig(rank=cfg.rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=targets,
                           rank_pattern=cfg.rank_pattern, **cfg.kind_settings())
    lora_cfgs = {component: unet_lora}
    inject_lora(unet, unet_lora)
    models = {component: unet}
    if cfg.train_text_encoder:
        te_targets = cfg.text_encoder_targets[0] if len(cfg.text_encoder_targets) == 1 and \
            cfg.text_encoder_targets[0].startswith("clip-") else cfg.text_encoder_targets
        te_lora = LoRAConfig(rank=cfg.rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, targets=te_targets,
                             **cfg.kind_settings())
        for key, te in zip(("text_encoder", "text_encoder_2"), text_encoders):
            inject_lora(te, te_lora)
            models[key], lora_cfgs[key] = te, te_lora
    if cfg.lora_precision == "base" and dtype != torch.float32:
        for m in models.values():
            for _, layer in lora_layers(m):
                layer.compute_dtype = dtype  # the low-rank product in bf16/fp16; parameters stay float32
    return models, lora_cfgs


def check_peft_folders(cfg: SDTrainConfig, unet: nn.Module, text_encoders: list[nn.Module]) -> None:
    """ConfigError when --save_peft could not write this run's adapter as peft folders (e.g. LoKr sides split by a
    --lokr_factor that no peft decompose_factor gives): the layers are built on the untrained models (on the CPU,
    before anything is written), checked by the peft writer's own rules and removed again; the random state is
    left as it was, so the run trains as it would without the check."""
    with torch.random.fork_rng(devices=[]):
        models, lora_cfgs = add_lora(cfg, unet, text_encoders, torch.float32)
        try:
            check_peft_export(Adapter.from_models(models, configs=lora_cfgs))
        except PeftExportError as err:
            hint = " or split the LoKr sides as peft does (--lokr_factor -1)" if cfg.adapter_type == "lokr" else ""
            raise ConfigError(f"--save_peft: {err}. Refused before training: leave out --save_peft "
                              f"(adapter.safetensors and the kohya file hold every kind){hint}") from None
        finally:
            for model in models.values():
                remove_lora(model)


def _unet_part(name: str) -> str:
    """The --lr_per_component key of a UNet parameter: unet.down / unet.mid / unet.up, else unet."""
    head = name.split(".", 1)[0]
    return {"down_blocks": "unet.down", "mid_block": "unet.mid", "up_blocks": "unet.up"}.get(head, "unet")


def param_groups(cfg: SDTrainConfig, models: Mapping[str, nn.Module], world: int,
                 token_vectors: Sequence[torch.Tensor] = ()) -> list[dict]:
    """Optimizer groups: the UNet's LoRA at --learning_rate, the text encoders' at --text_encoder_lr (--scale_lr
    multiplies all by batch size x accumulation x processes). --lr_per_component sets the rate of a component or
    UNet part (down/mid/up blocks; text_encoder_2 falls back to text_encoder's); --loraplus_lr_ratio splits each
    group into its A matrices and its B matrices at ratio x the rate (LoRA+). `token_vectors` (pivotal tuning) are
    one more group, "token_embeddings", at the text encoder's rate. Groups carry a "name" for logs."""
    scale = cfg.train_batch_size * cfg.gradient_accumulation_steps * world if cfg.scale_lr else 1
    rates = cfg.lr_per_component
    groups = []
    for comp, model in models.items():
        fallback = cfg.learning_rate if comp in ("unet", "transformer") else (cfg.text_encoder_lr or cfg.learning_rate)
        comp_lr = rates.get(comp, rates.get("text_encoder", fallback) if comp == "text_encoder_2" else fallback)
        names = {id(p): n for n, p in model.named_parameters()}
        parts: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for p in lora_parameters(model):
            part = _unet_part(names[id(p)]) if comp == "unet" and any(k.startswith("unet.") for k in rates) else comp
            parts.setdefault(part, []).append((names[id(p)], p))
        for part, pairs in parts.items():
            lr = rates.get(part, comp_lr) * scale
            if cfg.loraplus_lr_ratio is None:
                groups.append({"name": part, "params": [p for _, p in pairs], "lr": lr})
            else:
                groups += [dict(g, name=f"{part}.{g['name']}")
                           for g in loraplus_param_groups(pairs, lr, cfg.loraplus_lr_ratio)]
    if token_vectors:
        lr = rates.get("text_encoder", cfg.text_encoder_lr or cfg.learning_rate) * scale
        groups.append({"name": "token_embeddings", "params": list(token_vectors), "lr": lr})
    return groups


def optimization(cfg: SDTrainConfig, models: Mapping[str, nn.Module], world: int, capturable: bool,
                 token_vectors: Sequence[torch.Tensor] = ()) -> tuple[list[float], list[torch.Tensor], Any, Any, Any]:
    """What trains the adapter, for both recipes: (each group's base rate, the trained tensors, the optimizer, the
    EMA of the tensors or None, the rate schedule)."""
    groups = param_groups(cfg, models, world, token_vectors)
    base_lrs, params = [g["lr"] for g in groups], [p for g in groups for p in g["params"]]
    optimizer = build_optimizer(groups, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
                                eps=cfg.adam_epsilon, use_8bit=cfg.use_8bit_adam, capturable=capturable,
                                name=cfg.optimizer)
    ema = EMA(params, cfg.ema_decay, "cpu" if cfg.ema_cpu else None) if cfg.use_ema else None
    schedule = LRSchedule(cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_train_steps, cfg.lr_num_cycles, cfg.lr_power)
    return base_lrs, params, optimizer, ema, schedule


def save_adapter(out: Path, cfg: SDTrainConfig, models: Mapping[str, nn.Module], lora_cfgs: Mapping[str, LoRAConfig],
                 base: str, base_name: str, resolved: Mapping[str, Any], captions: Sequence[str],
                 last_good: Path | None, name: str = "adapter",
                 embeddings: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> Adapter:
    """Write out/<name>.safetensors with the training metadata (`base`: the kohya base-model tag, `captions` the
    instance captions for A1111's tag list) and, unless --export_kohya false, out/<name>_kohya.safetensors
    (`name`: adapter, or adapter_ema for the moving average of --use_ema). Pivotal tuning's `embeddings` ({token:
    {text encoder: vectors}}) go into both files and into an A1111 embedding file, out/embeddings.safetensors
    (embeddings_ema.safetensors beside adapter_ema)."""
    metadata = AdapterMetadata(
        base=base, base_model=base_name, trigger_phrase=cfg.instance_prompt, rank=cfg.rank,
        alpha=cfg.lora_alpha or cfg.rank, targets={k: c.to_dict()["targets"] for k, c in lora_cfgs.items()},
        steps=cfg.max_train_steps, training_config=dict(resolved),
        extra={"modelspec.trigger_phrase": cfg.instance_prompt,
               "ss_tag_frequency": tag_frequency(captions, cfg.instance_data_dir)}).to_strings()  # A1111's tag list
    adapter = Adapter.from_models(models, metadata=metadata, configs=lora_cfgs)
    adapter.tensors.update(embedding_tensors(embeddings or {}))
    try:
        path = adapter.save(out / f"{name}.safetensors")
        for token, vectors in (embeddings or {}).items():  # one token per run (--token_abstraction)
            emb = out / f"{name.replace('adapter', 'embeddings')}.safetensors"
            write_safetensors(emb, a1111_embedding_tensors(vectors, base == "sdxl"))
            print(f"wrote {emb} (A1111 embedding {token!r})")
    except OSError as err:
        raise CheckpointError(f"could not write {out / f'{name}.safetensors'}: {err.strerror or err}; {last_good} "
                              "holds the trained weights: free space and run the same command with "
                              "--resume_from_checkpoint latest to write the adapter") from None
    print(f"wrote {path}")
    if cfg.export_kohya is not False:
        # a DiT transformer gets its family's ComfyUI names (the trigger phrase travels in the metadata)
        how = {"base": base} if "transformer" in models else {"trigger_phrase": cfg.instance_prompt}
        kohya = export(adapter, "kohya", out / f"{name}_kohya.safetensors", **how)
        print(f"wrote {kohya}")
    if cfg.save_peft:  # peft/<component>/ (peft_ema/ beside adapter_ema), written whole under a temporary name
        model_id = cfg.pretrained_model_name_or_path  # a built-in tiny model has no id peft could load
        base_id = None if model_id in (None, *TINY_PIPELINES, *DIT_KINDS) else model_id
        folder = export(adapter, "peft", out / name.replace("adapter", "peft"), per_component=True,
                        base_model_name_or_path=base_id)
        print(f"wrote {folder}/ ({', '.join(adapter.components())})")
    return adapter
