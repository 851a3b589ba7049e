"""Shared fixtures: tiny SD pipelines and ViTs carrying a random (non-zero) LoRA, and their canonical Adapters."""

from __future__ import annotations

import pytest
import torch

from lora_vision import LoRAConfig, inject_lora
from lora_vision.adapter import Adapter
from lora_vision.models import build_tiny_sd

CLIP = "clip-attn-mlp"


def randomize_lora(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every LoRA B a random value (fresh adapters are the identity, which would test nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=g) * (std if "lora_B" in n else 0.3))


def sd_components(pipe) -> dict:
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        comps["text_encoder_2"] = pipe.text_encoder_2
    return comps


def make_sd_adapter(kind: str, unet_targets: str = "unet-attn-ff", locon: bool = False, rank: int = 4,
                    alpha: float = 2.0, te_alpha: float | None = None, seed: int = 0) -> Adapter:
    """A random adapter for the tiny `kind` pipeline: UNet (+LoCon convs) and every text encoder."""
    pipe = build_tiny_sd(kind)
    comps = sd_components(pipe)
    inject_lora(pipe.unet, LoRAConfig(rank=rank, alpha=alpha, targets="unet-locon" if locon else unet_targets,
                                      conv_rank=2 if locon else None, conv_alpha=1.0 if locon else None))
    for c in ("text_encoder", "text_encoder_2"):
        if c in comps:
            inject_lora(comps[c], LoRAConfig(rank=rank, alpha=te_alpha or alpha, targets=CLIP))
    for i, m in enumerate(comps.values()):
        randomize_lora(m, seed + i)
    return Adapter.from_models(comps, metadata={"modelspec.trigger_phrase": "sks toy"})


@pytest.fixture(scope="session")
def sd1_adapter() -> Adapter:
    return make_sd_adapter("sd1", locon=True)


@pytest.fixture(scope="session")
def sd2_adapter() -> Adapter:
    return make_sd_adapter("sd2", locon=True)


@pytest.fixture(scope="session")
def sdxl_adapter() -> Adapter:
    return make_sd_adapter("sdxl", locon=True)


def lycoris_update(cls, lin: torch.nn.Linear, opts: dict, g: torch.Generator
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(file tensors by LyCORIS suffix, weight update) of a LyCORIS module of class `cls` (options `opts`, with
    lora_dim and alpha) on `lin`, its factors random and non-zero from `g`: the update is LyCORIS' merged weight minus
    the weight (lycoris-lora is the oracle of the adapter kinds)."""
    opts = dict(opts)
    mod = cls("x", lin, 1.0, opts.pop("lora_dim"), opts.pop("alpha"), **opts)
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if name.startswith("org_module"):
                continue
            noise = torch.randn(p.shape, generator=g)
            p.copy_(p * (1 + 0.2 * noise.abs()) if name == "dora_scale" else 0.2 * noise)
    w = lin.weight.detach()
    merged, _ = mod.get_merged_weight(multiplier=1.0, shape=w.shape, device=w.device)
    sd = mod.custom_state_dict() if hasattr(mod, "custom_state_dict") else {}
    tensors = {k: v.detach().clone() for k, v in (sd or mod.state_dict()).items() if not k.startswith("org_")}
    return tensors, merged.detach().float().reshape(w.shape) - w
