"""Encode once, train many times: VAE latent distributions and text embeddings cached on the training device.

The VAE is frozen, so each image (and its mirror when flipping is on) is encoded once; every step then draws a
fresh latent sample mean + std * noise on the device, as the reference does by encoding every step. Text
embeddings are cached when the text encoders are frozen; otherwise the token ids are cached and encoded per step.
Rows are grouped by bucket size so a batch always has one shape.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ...data.dreambooth import DreamBoothImages, hold_out, load_example, scan_folder
from .config import SDTrainConfig


@dataclass
class TextTable:
    """One row per distinct prompt: token ids per tokenizer, and embeddings when cached."""

    prompts: list[str]
    ids: list[torch.Tensor]
    hidden: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    """Which positions of `hidden` hold tokens (N, L), for encoders whose prompts differ in length (DiT)."""


@dataclass
class BucketCache:
    """Latent distributions of every image (and mirror) that trains at one bucket size."""

    size: tuple[int, int]
    mean: torch.Tensor
    std: torch.Tensor
    text_row: torch.Tensor
    time_ids: torch.Tensor
    paths: list[str] = field(default_factory=list)
    mask: torch.Tensor | None = None
    """(N, 1, h, w) loss weights in [0, 1] on the latent grid (--masked_loss), cropped and flipped as the image."""


def tokenize(tokenizers: list, prompts: list[str]) -> list[torch.Tensor]:
    """Token ids (N, max_length) per tokenizer, padded and truncated as the pipelines do."""
    return [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids for tok in tokenizers]


def truncated_captions(images: DreamBoothImages, tokenizer, prompt: str, caption_extension: str = ".txt") -> list[str]:
    """'<caption file> (<n> tokens)' for every distinct caption longer than the tokenizer's window (the pipelines
    and tokenize() cut them to model_max_length, 77 for CLIP, without a word)."""
    limit, out, seen = tokenizer.model_max_length, [], set()
    for path, caption in zip(images.paths, images.captions):
        if caption in seen:
            continue
        seen.add(caption)
        n = len(tokenizer(caption, truncation=False, verbose=False).input_ids)
        if n > limit:
            source = "the prompt" if caption == prompt else str(path.with_suffix(caption_extension))
            out.append(f"{source} ({n} tokens)")
    return out


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
                  center_crop: bool, flip: bool, seed: int, dtype: torch.dtype, desc: str, rank: int = 0,
                  world: int = 1, gather: Callable[[list], list] | None = None,
                  encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                  ) -> dict[tuple[int, int], BucketCache]:
    """Encode every image (and its mirror when `flip`) once; returns the caches per bucket size (width, height).

    Stored latents are already multiplied by the VAE's scaling factor; `encode` (pixels -> latent mean and std as
    the model sees them) replaces that for models with another latent normalisation (the DiT families). With random crops, each image's crop is
    drawn once here from a generator seeded by (seed, image index), so it does not depend on which process
    encodes the image (random crops vary between runs, not between steps, when latents are cached).
    Split across processes: process `rank` of `world` encodes images rank, rank + world, ...; `gather`
    (e.g. accelerate.utils.gather_object) collects every process's rows, which are then put back in image order,
    so every process ends with the same caches as one process alone would build.
    """
    device, vae_dtype = vae.device, vae.dtype
    if encode is None:
        factor = float(vae.config.scaling_factor)

        def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dist = vae.encode(pixels).latent_dist
            return dist.mean * factor, dist.std * factor
    records = []
    for index in tqdm(range(rank, len(images), world), desc=desc, unit="image", leave=False, disable=rank != 0):
        rng = np.random.default_rng([seed, index])
        for mirrored in ((False, True) if flip else (False,)):
            ex = load_example(images, index, center_crop, mirrored, rng)
            mean, std = encode(ex.pixels[None].to(device, vae_dtype))
            h, w = ex.pixels.shape[1:]
            mean, std = mean.to(dtype), std.to(dtype)
            # the mask on the latent grid: each latent pixel weighs the mean of the pixels it encodes
            mask = (torch.nn.functional.interpolate(ex.mask[None], size=mean.shape[2:], mode="area").to(dtype)
                    if ex.mask is not None else None)
            if world > 1:
                mean, std = mean.cpu(), std.cpu()
            records.append((index, mirrored, (w, h), mean, std, prompt_row[ex.caption],
                            [*ex.original_size, *ex.crop_top_left, h, w], ex.path + (" (mirrored)" if mirrored else ""),
                            mask))
    if world > 1:
        if gather is None:
            raise ValueError(f"cache_latents: world={world} needs a gather function (e.g. accelerate's gather_object)")
        records = sorted(gather(records), key=lambda r: (r[0], r[1]))
    rows: dict[tuple[int, int], dict[str, list]] = {}
    for _, _, size, mean, std, text, time_ids, path, mask in records:
        r = rows.setdefault(size, {"mean": [], "std": [], "text": [], "time": [], "paths": [], "mask": []})
        r["mean"].append(mean.to(device))
        r["std"].append(std.to(device))
        r["text"].append(text)
        r["time"].append(time_ids)
        r["paths"].append(path)
        if mask is not None:
            r["mask"].append(mask.to(device))
    return {size: BucketCache(size, torch.cat(r["mean"]), torch.cat(r["std"]),
                              torch.tensor(r["text"], device=device),
                              torch.tensor(r["time"], dtype=torch.float32, device=device), r["paths"],
                              torch.cat(r["mask"]) if r["mask"] else None)
            for size, r in sorted(rows.items())}


def mask_source(cfg: SDTrainConfig) -> str:
    """Where the run's loss masks come from, in a few words."""
    if cfg.alpha_mask:
        return "the images' alpha channels (--alpha_mask)"
    return f"the mask folder {cfg.mask_data_dir}" if cfg.mask_data_dir else "<name>_mask.png files beside the images"


class BatchSampler:
    """Chooses each step's rows: a bucket (weighted by its size), then rows in random order, epoch by epoch.

    All choices are made on the host with a numpy Generator (its state goes into checkpoints), so sampling
    never waits for the GPU. Under several processes, `batch_size` is the global batch (per-device batch x
    processes) and every process draws from a generator with the same seed, so all draw the same global batch
    and each takes its own slice of it (step.shard_inputs): no image is duplicated or dropped between processes,
    and N processes at batch b see exactly what one process at batch N*b sees.
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



@dataclass
class TrainingData:
    """The images of a run with what is cached of them: text table and latent caches by bucket size."""

    instance: DreamBoothImages
    classes: DreamBoothImages | None
    prompts: list[str]
    table: TextTable
    inst_cache: dict[tuple[int, int], BucketCache]
    class_cache: dict[tuple[int, int], BucketCache] | None
    held_out: DreamBoothImages | None = None
    """Images of the validation loss (--validation_split or --validation_data_dir), never trained on."""
    held_out_cache: dict[tuple[int, int], BucketCache] | None = None


def prepare_data(cfg: SDTrainConfig, resolution: int, tokenizers: list, text_encoders: list, vae: torch.nn.Module,
                 sdxl: bool, dtype: torch.dtype, rank: int = 0, world: int = 1, gather: Callable | None = None,
                 verbose: bool = True, text_table: Callable[[list[str]], TextTable] | None = None,
                 encode_latents: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 rewrite: Callable[[tuple[str, ...], str], tuple[str, ...]] | None = None) -> TrainingData:
    """Scan the instance (and class) folders, warn about captions the text encoder cuts, and cache the text
    embeddings (or token ids when the text encoders train) and every image's latent distribution.

    `text_table` (distinct prompts -> their cached TextTable) and `encode_latents` (cache_latents' `encode`)
    replace the SD text encoding and latent scaling for other model families (training.dit). `rewrite(captions,
    what)` changes the instance ("instance") and held-out ("validation") captions first (pivotal tuning's tokens)."""
    scan = dict(resolution=resolution, bucketing=cfg.bucketing, bucket_step=cfg.bucket_step,
                small_images=cfg.small_images, caption_extension=cfg.caption_extension)
    masks = "alpha" if cfg.alpha_mask else "files" if cfg.masked_loss else None
    instance = scan_folder(cfg.instance_data_dir, cfg.instance_prompt, use_captions=cfg.use_captions, masks=masks,
                           mask_dir=cfg.mask_data_dir, **scan)
    held_out = None
    if cfg.validation_data_dir:  # the validation loss is plain MSE: no masks
        held_out = scan_folder(cfg.validation_data_dir, cfg.instance_prompt, what="validation",
                               use_captions=cfg.use_captions, **scan)
    elif cfg.validation_split:
        instance, held_out = hold_out(instance, cfg.validation_split, cfg.seed)
    classes = (scan_folder(cfg.class_data_dir, cfg.class_prompt, what="class", use_captions=False, **scan)
               if cfg.with_prior_preservation else None)
    if rewrite is not None:
        instance = dataclasses.replace(instance, captions=rewrite(instance.captions, "instance"))
        if held_out is not None:
            held_out = dataclasses.replace(held_out, captions=rewrite(held_out.captions, "validation"))
    prompts = sorted(set(instance.captions) | set(classes.captions if classes else ())
                     | set(held_out.captions if held_out else ()) | ({""} if cfg.caption_dropout_rate else set()))
    long = truncated_captions(instance, tokenizers[0], cfg.instance_prompt, cfg.caption_extension)
    if long and verbose:
        print(f"warning: {len(long)} caption(s) are longer than the text encoder's {tokenizers[0].model_max_length} "
              f"tokens and are cut to that length: {', '.join(long)}", file=sys.stderr)
    table = (text_table(prompts) if text_table is not None else
             build_text_table(prompts, tokenizers, text_encoders, sdxl, cache=not cfg.text_encoders_train,
                              dtype=dtype))
    row_of = {p: i for i, p in enumerate(prompts)}
    crop = dict(center_crop=cfg.center_crop, flip=cfg.random_flip, seed=cfg.seed, dtype=dtype, rank=rank,
                world=world, gather=gather, encode=encode_latents)
    inst_cache = cache_latents(instance, vae, row_of, desc="caching instance latents", **crop)
    class_cache = cache_latents(classes, vae, row_of, desc="caching class latents", **crop) if classes else None
    held_out_cache = (cache_latents(dataclasses.replace(held_out, masks=()), vae, row_of,
                                    desc="caching validation latents", **dict(crop, flip=False)) if held_out else None)
    if verbose:
        print(f"{len(instance)} instance images in {len(inst_cache)} bucket(s) "
              f"{[f'{w}x{h}' for w, h in inst_cache]}" + (f", {len(classes)} class images" if classes else "")
              + f", {len(prompts)} distinct prompt(s), text embeddings {'live' if cfg.text_encoders_train else 'cached'}"
              + (f"; loss masks from {mask_source(cfg)}" if masks else "")
              + (f"; {len(held_out)} held-out image(s) for the validation loss" if held_out else ""))
    return TrainingData(instance, classes, prompts, table, inst_cache, class_cache, held_out, held_out_cache)
