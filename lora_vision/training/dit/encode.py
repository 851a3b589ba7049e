"""Encode once for DiT training: each distinct caption through the pipeline's own `encode_prompt`, each image
through the VAE with the family's latent normalisation; afterwards the text encoders leave the accelerator.

| family     | text (encode_prompt)                  | latents the transformer sees                             |
|------------|---------------------------------------|----------------------------------------------------------|
| flux1      | T5 sequence + CLIP pooled             | (z - shift_factor) x scaling_factor                      |
| sd3        | CLIP x2 + T5 sequence, CLIP pooled    | (z - shift_factor) x scaling_factor                      |
| flux2      | stacked Qwen3 hidden states           | 2x2 patches of z, normalised by the VAE's batch-norm stats |
| qwen-image | Qwen2.5-VL hidden states + token mask | (z - latents_mean) / latents_std per channel (one frame) |
| z-image    | Qwen3 hidden states, one length each  | (z - shift_factor) x scaling_factor                      |

All normalisations are affine per element, so the cached latent distribution (mean, std) keeps its meaning:
a sample mean + std x eps is a sample of the normalised latent.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from ..sd.caching import TextTable

# Families whose prompts keep their own length (a mask marks the tokens); the others pad to max_sequence_length.
MASKED_TEXT: frozenset[str] = frozenset({"qwen-image", "z-image"})


def latent_encoder(pipe: Any, family: str) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """pixels (B, 3, H, W) in [-1, 1] -> (mean, std) of the latent the family's transformer trains on."""
    vae = pipe.vae
    if family == "flux2":
        patchify = type(pipe)._patchify_latents

        def flux2(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dist = vae.encode(pixels).latent_dist
            mean, std = patchify(dist.mean), patchify(dist.std)
            bn_mean = vae.bn.running_mean.view(1, -1, 1, 1).to(mean)
            bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(mean)
            return (mean - bn_mean) / bn_std, std / bn_std
        return flux2
    if family == "qwen-image":
        def qwen(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dist = vae.encode(pixels[:, :, None]).latent_dist  # one video frame: (B, C, 1, H, W)
            mean, std = dist.mean[:, :, 0], dist.std[:, :, 0]
            m = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1).to(mean)
            s = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1).to(mean)
            return (mean - m) / s, std / s
        return qwen
    shift, scale = float(vae.config.shift_factor or 0.0), float(vae.config.scaling_factor)

    def shifted(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = vae.encode(pixels).latent_dist
        return (dist.mean - shift) * scale, dist.std * scale
    return shifted


def encode_one(pipe: Any, family: str, prompt: str, max_sequence_length: int | None,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states (L, D), pooled (D,) or None) of one prompt, as the family's pipeline conditions on it."""
    kw: dict[str, Any] = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    if family == "flux1":
        hidden, pooled, _ = pipe.encode_prompt(prompt=[prompt], prompt_2=None, device=device, **kw)
        return hidden[0], pooled[0]
    if family == "sd3":
        hidden, _, pooled, _ = pipe.encode_prompt(prompt=[prompt], prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False, **kw)
        return hidden[0], pooled[0]
    if family == "flux2":
        return pipe.encode_prompt(prompt=[prompt], device=device, **kw)[0][0], None
    if family == "qwen-image":
        hidden, mask = pipe.encode_prompt(prompt=[prompt], device=device, **kw)
        return (hidden[0] if mask is None else hidden[0][mask[0].bool()]), None
    if family == "z-image":
        hidden, _ = pipe.encode_prompt(prompt=[prompt], device=device, do_classifier_free_guidance=False, **kw)
        return hidden[0], None
    raise ValueError(f"encode_one got family {family!r}; expected flux1, flux2, sd3, qwen-image or z-image")


@torch.no_grad()
def dit_text_table(pipe: Any, family: str, prompts: list[str], dtype: torch.dtype,
                   max_sequence_length: int | None, device: torch.device) -> TextTable:
    """Every distinct prompt encoded once: hidden states (P, L, D) padded with zeros to the longest, the mask of
    real tokens (P, L), and pooled embeddings (P, D) where the family has them; all on `device` in `dtype`."""
    rows = [encode_one(pipe, family, p, max_sequence_length, device) for p in prompts]
    longest = max(h.shape[0] for h, _ in rows)
    hidden = torch.zeros(len(rows), longest, rows[0][0].shape[-1], dtype=dtype, device=device)
    mask = torch.zeros(len(rows), longest, dtype=torch.bool, device=device)
    for i, (h, _) in enumerate(rows):
        if h.shape[0] != longest and family not in MASKED_TEXT:  # these pad every prompt to one length
            raise ValueError(f"{family} prompt {prompts[i]!r} encoded to {h.shape[0]} tokens, others to {longest}; "
                             "expected one length (set --max_sequence_length)")
        hidden[i, : h.shape[0]] = h.to(device, dtype)
        mask[i, : h.shape[0]] = True
    pooled = torch.stack([p for _, p in rows]).to(device, dtype) if rows[0][1] is not None else None
    return TextTable(list(prompts), [], hidden=hidden, pooled=pooled, mask=mask)


# The CLIP encoders --train_text_encoder adapts, per family (diffusers' train_dreambooth_lora_flux.py / _sd3.py);
# the T5 and LLM encoders stay frozen and cached.
CLIP_ENCODERS: dict[str, tuple[str, ...]] = {"flux1": ("text_encoder",), "sd3": ("text_encoder", "text_encoder_2")}


def live_clip_text(pipe: Any, family: str, prompts: list[str], cached: torch.Tensor, device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states, pooled) of `prompts` with the CLIP parts encoded now, with gradients (their LoRA trains),
    and the T5 part taken from the cached hidden states `cached` (B, L, D); assembled as the pipeline's
    encode_prompt does (SD 3.x: both CLIP sequences side by side, zero-padded to T5's width, before T5's)."""
    if family == "flux1":  # the T5 sequence is the whole hidden state; CLIP gives the pooled embedding
        return cached, pipe._get_clip_prompt_embeds(prompt=prompts, device=device).to(dtype)
    if family == "sd3":
        (h1, p1), (h2, p2) = (pipe._get_clip_prompt_embeds(prompts, device=device, clip_model_index=i)
                              for i in (0, 1))
        clip = torch.cat([h1, h2], dim=-1).to(dtype)
        clip = torch.nn.functional.pad(clip, (0, cached.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, cached[:, clip.shape[1]:]], dim=1), torch.cat([p1, p2], dim=-1).to(dtype)
    raise ValueError(f"live_clip_text got family {family!r}; expected one of {', '.join(CLIP_ENCODERS)}")


def text_encoders_of(pipe: Any) -> list[torch.nn.Module]:
    """The pipeline's text encoders (text_encoder, text_encoder_2, text_encoder_3 where present)."""
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [m for m in (getattr(pipe, n, None) for n in names) if isinstance(m, torch.nn.Module)]


def offload_text_encoders(pipe: Any, keep: tuple[torch.nn.Module, ...] = ()) -> None:
    """Move the text encoders to the CPU once the embeddings are cached (no-op when they are there already),
    except those in `keep` (trained ones)."""
    for m in text_encoders_of(pipe):
        if not any(m is k for k in keep):
            m.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def text_encoders_on(pipe: Any, device: torch.device) -> Iterator[None]:
    """The text encoders on `device` for the duration (validation images, the strength sweep), then back."""
    encoders = text_encoders_of(pipe)
    moved = [m for m in encoders if next(m.parameters()).device != device]
    for m in moved:
        m.to(device)
    try:
        yield
    finally:
        for m in moved:
            m.to("cpu")
