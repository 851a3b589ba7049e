"""Encode once, train many times: VAE latent distributions and text embeddings cached on the training device.

The VAE is frozen, so each image (and its mirror when flipping is on) is encoded once; every step then draws a
fresh latent sample mean + std * noise on the device, as the reference does by encoding every step. Text
embeddings are cached when the text encoders are frozen; otherwise the token ids are cached and encoded per step.
Rows are grouped by bucket size so a batch always has one shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.dreambooth import DreamBoothImages, load_example


@dataclass
class TextTable:
    """One row per distinct prompt: token ids per tokenizer, and embeddings when cached."""

    prompts: list[str]
    ids: list[torch.Tensor]
    hidden: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


@dataclass
class BucketCache:
    """Latent distributions of every image (and mirror) that trains at one bucket size."""

    size: tuple[int, int]
    mean: torch.Tensor
    std: torch.Tensor
    text_row: torch.Tensor
    time_ids: torch.Tensor
    paths: list[str] = field(default_factory=list)


def tokenize(tokenizers: list, prompts: list[str]) -> list[torch.Tensor]:
    """Token ids (N, max_length) per tokenizer, padded and truncated as the pipelines do."""
    return [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids for tok in tokenizers]


def encode_text(text_encoders: list, ids: list[torch.Tensor], sdxl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompt embeddings as the pipelines build them.

    SD 1.x/2.x: the last hidden state. SDXL: the penultimate hidden states of both encoders concatenated, and the
    pooled, projected output of the second encoder.
    """
    if not sdxl:
        return text_encoders[0](ids[0].to(text_encoders[0].device))[0], None
    hidden, pooled = [], None
    for encoder, tok_ids in zip(text_encoders, ids):
        out = encoder(tok_ids.to(encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled


def build_text_table(prompts: list[str], tokenizers: list, text_encoders: list, sdxl: bool, cache: bool,
                     dtype: torch.dtype) -> TextTable:
    """Tokenize the distinct prompts; with `cache`, also encode them once (no grad)."""
    table = TextTable(prompts, tokenize(tokenizers, prompts))
    if cache:
        with torch.no_grad():
            hidden, pooled = encode_text(text_encoders, table.ids, sdxl)
        table.hidden = hidden.to(dtype)
        table.pooled = pooled.to(dtype) if pooled is not None else None
    device = text_encoders[0].device
    table.ids = [i.to(device) for i in table.ids]
    return table


@torch.no_grad()
def cache_latents(images: DreamBoothImages, vae: torch.nn.Module, prompt_row: dict[str, int], *,
                  center_crop: bool, flip: bool, rng: np.random.Generator, dtype: torch.dtype,
                  desc: str) -> dict[tuple[int, int], BucketCache]:
    """Encode every image (and its mirror when `flip`) once; returns the caches per bucket size (width, height).

    Stored latents are already multiplied by the VAE's scaling factor. With random crops, each image's crop is
    drawn once here (documented: random crops vary between runs, not between steps, when latents are cached).
    """
    factor = float(vae.config.scaling_factor)
    device, vae_dtype = vae.device, vae.dtype
    rows: dict[tuple[int, int], dict[str, list]] = {}
    for index in tqdm(range(len(images)), desc=desc, unit="image", leave=False):
        for mirrored in ((False, True) if flip else (False,)):
            ex = load_example(images, index, center_crop, mirrored, rng)
            dist = vae.encode(ex.pixels[None].to(device, vae_dtype)).latent_dist
            h, w = ex.pixels.shape[1:]
            r = rows.setdefault((w, h), {"mean": [], "std": [], "text": [], "time": [], "paths": []})
            r["mean"].append((dist.mean * factor).to(dtype))
            r["std"].append((dist.std * factor).to(dtype))
            r["text"].append(prompt_row[ex.caption])
            r["time"].append([*ex.original_size, *ex.crop_top_left, h, w])
            r["paths"].append(ex.path + (" (mirrored)" if mirrored else ""))
    return {size: BucketCache(size, torch.cat(r["mean"]), torch.cat(r["std"]),
                              torch.tensor(r["text"], device=device),
                              torch.tensor(r["time"], dtype=torch.float32, device=device), r["paths"])
            for size, r in sorted(rows.items())}


class BatchSampler:
    """Chooses each step's rows: a bucket (weighted by its size), then rows in random order, epoch by epoch.

    All choices are made on the host with a numpy Generator (its state goes into checkpoints), so sampling
    never waits for the GPU.
    """

    def __init__(self, buckets: dict[tuple[int, int], BucketCache], batch_size: int, rng: np.random.Generator):
        self.sizes = list(buckets)
        self.counts = np.array([buckets[s].mean.shape[0] for s in self.sizes], dtype=np.float64)
        self.batch_size = batch_size
        self.rng = rng

    def next(self) -> tuple[tuple[int, int], np.ndarray]:
        """(bucket size, row indices) of the next batch; rows repeat only when the bucket is smaller than a batch."""
        b = int(self.rng.choice(len(self.sizes), p=self.counts / self.counts.sum()))
        n = int(self.counts[b])
        rows = self.rng.permutation(n)
        while rows.shape[0] < self.batch_size:
            rows = np.concatenate([rows, self.rng.permutation(n)])
        return self.sizes[b], rows[: self.batch_size]
