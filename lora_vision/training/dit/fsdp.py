"""FSDP for the DiT recipe: the frozen transformer sharded over the processes, the LoRA replicated.

A real-size DiT does not fit next to its activations on one GPU (Flux.1: 12 B parameters, 24 GB in bf16), but its
LoRA does (tens of millions of parameters). So the transformer is sharded with FSDP2 (torch's `fully_shard`), one
unit per transformer block (accelerate's TRANSFORMER_BASED_WRAP; the family's block classes come from the model's
`_no_split_modules` unless the config names them) plus the root, and every trainable tensor is left out of the
sharding (`ignored_params`): each process holds the whole LoRA as plain tensors, so the optimizer, the gradient
average over processes, clipping, EMA, checkpoints and the saved adapter are those of a DDP run, and the adapter
written equals the unsharded one without gathering anything of the base. Only the frozen weights are all-gathered
block by block in the forward and backward passes; they get no gradients, so nothing is reduce-scattered.

The settings are accelerate's: `accelerate launch --config_file configs/accelerate/fsdp_dit.yaml` exports them
(ACCELERATE_USE_FSDP, FSDP_*). On GPUs accelerate's state holds them as its FSDP plugin. On CPU processes
(ACCELERATE_USE_CPU=true, gloo) accelerate ignores the FSDP config (its MULTI_CPU state never becomes FSDP), so the
plugin is read from the same exported settings: the CPU tests shard exactly as a GPU run does.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

CONFIG = "configs/accelerate/fsdp_dit.yaml"


def fsdp_plugin(acc: Any) -> Any | None:
    """This run's accelerate FSDP plugin (FullyShardedDataParallelPlugin), or None when the run is not FSDP."""
    if acc.distributed_type.name == "FSDP":
        return acc.state.fsdp_plugin
    if acc.num_processes > 1 and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        from accelerate.utils import FullyShardedDataParallelPlugin

        return FullyShardedDataParallelPlugin()  # reads the FSDP_* settings accelerate launch exported
    return None


def fsdp_refusals(plugin: Any, accelerate_precision: str) -> list[str]:
    """What in the accelerate FSDP settings this recipe cannot honour, one item each (empty: all fine)."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    bad = []
    if plugin.fsdp_version != 2:
        bad.append(f"fsdp_version {plugin.fsdp_version} (the recipe shards with FSDP2, which leaves the LoRA "
                   "unsharded beside the sharded frozen weights: set fsdp_version: 2)")
    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    if policy is not transformer_auto_wrap_policy:
        name = getattr(policy, "__name__", None) or "NO_WRAP"
        bad.append(f"fsdp_auto_wrap_policy {name} (one unit per transformer block keeps one block's weights "
                   "gathered at a time: set TRANSFORMER_BASED_WRAP)")
    if plugin.cpu_ram_efficient_loading:
        bad.append("fsdp_cpu_ram_efficient_loading true (every process loads the model itself: set it false)")
    if plugin.activation_checkpointing:
        bad.append("fsdp_activation_checkpointing true (use the recipe's --gradient_checkpointing instead)")
    if accelerate_precision != "no":
        bad.append(f"mixed_precision {accelerate_precision} in the accelerate config (the recipe casts the frozen "
                   "base itself: set it to \"no\" and use --mixed_precision)")
    return bad


def block_classes(transformer: nn.Module, plugin: Any) -> set[type]:
    """The module classes that become FSDP units: the config's fsdp_transformer_layer_cls_to_wrap, else the
    transformer's `_no_split_modules` (its blocks, e.g. FluxTransformerBlock and FluxSingleTransformerBlock).
    ValueError naming the classes the model has when a name matches none of its modules."""
    names = plugin.transformer_cls_names_to_wrap or list(getattr(transformer, "_no_split_modules", None) or [])
    present = {type(m).__name__: type(m) for m in transformer.modules()}
    unknown = [n for n in names if n not in present]
    if unknown or not names:
        blocks = sorted(n for n in present if n.endswith("Block"))
        raise ValueError(f"fsdp_transformer_layer_cls_to_wrap {unknown or names}: no such module in "
                         f"{type(transformer).__name__}; expected block classes such as {blocks[:4]}; leave the key "
                         "out to wrap the model's own blocks")
    return {present[n] for n in names}


def shard_frozen_base(transformer: nn.Module, plugin: Any, device: torch.device) -> int:
    """Shard `transformer`'s frozen weights over the processes in place (FSDP2): one unit per block of
    `block_classes`, then the root for the rest. The tensors that require grad (the LoRA) stay whole on every
    process and are moved to `device`. Returns the number of units."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    classes = tuple(block_classes(transformer, plugin))
    trainable = {p for p in transformer.parameters() if p.requires_grad}
    with torch.no_grad():
        for p in trainable:
            p.data = p.data.to(device)
    offload = plugin.cpu_offload if isinstance(plugin.cpu_offload, CPUOffloadPolicy) else None
    kwargs: dict[str, Any] = {"reshard_after_forward": plugin.reshard_after_forward, "ignored_params": trainable}
    if offload is not None:
        kwargs["offload_policy"] = offload
    blocks = [m for m in transformer.modules() if isinstance(m, classes)]
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(transformer, **{k: v for k, v in kwargs.items() if k != "reshard_after_forward"})
    return len(blocks) + 1


def fsdp_run_refusals(cfg: Any) -> list[str]:
    """The recipe settings a run with a sharded transformer cannot honour yet, one item each (empty: all fine).
    `cfg` is the SDTrainConfig. What runs on the main process alone (validation images) would wait forever for
    the other processes' share of the weights; the static step and torchao's tensors are not tried under FSDP."""
    from ..sd.samples import missing_class_images

    bad = []
    if cfg.compile:
        bad.append("--compile (not tried with the sharded transformer: leave it out)")
    if cfg.quantize_base != "none":
        bad.append(f"--quantize_base {cfg.quantize_base} (torchao's weight tensors are not sharded by FSDP here: "
                   "use one of the two, sharding or quantizing)")
    if cfg.validation_prompt:
        bad.append("--validation_prompt (validation images are made on the main process alone, and the sharded "
                   "transformer needs every process: leave it out and sample from the saved checkpoints)")
    if cfg.with_prior_preservation and cfg.class_data_dir:
        missing = missing_class_images(cfg.class_data_dir, cfg.num_class_images)
        if missing:
            bad.append(f"--with_prior_preservation with {missing} of {cfg.num_class_images} class images missing "
                       f"from {cfg.class_data_dir} (the unsharded base makes them before training, which a sharded run "
                       "cannot: put the class images there first, or leave out the FSDP config for a run that "
                       "makes them)")
    return bad
