"""Pretrain the tiny text-to-image pipeline of samples/tiny-sd/ and its shape probe on procedural captioned scenes.

    python scripts/pretrain_tiny_sd.py --out build/ --seconds 420          # one GPU, about 8 minutes in all
    python scripts/pretrain_tiny_sd.py --out /tmp/smoke --seconds 20 --batch 8 --eval 8   # a CPU smoke test

Writes OUT/tiny-sd/ (a diffusers StableDiffusionPipeline folder, fp16 safetensors: VAE 4x down to 16x16x4 latents at
64 px, CLIP text encoder, UNet, DPM-Solver++ scheduler), OUT/tiny-sd-probe/probe.safetensors (the classifier that
scores prompt following and the DreamBooth metrics), OUT/training_log.txt and OUT/samples.png. Phases run against a
wall-clock budget (`--seconds`): VAE, then UNet + text encoder (with an EMA of both), then the probe, then the
prompt-following evaluation (probe readings of generated images against the generator's labels).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lora_vision.data.shapes import VOCABULARY, draw_scenes, to_uint8  # noqa: E402
from lora_vision.models.tiny import build_tiny_tokenizer  # noqa: E402
from lora_vision.training.sd.metrics import PROBE_HEADS, ShapeProbe, save_probe  # noqa: E402

RESOLUTION = 64
LATENT = 16  # the VAE downsamples 4x
# Share of the budget per phase (the rest is evaluation and saving).
SHARES = {"vae": 0.14, "unet": 0.74, "probe": 0.05}
BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


class Log:
    """Print and keep every line, for OUT/training_log.txt."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.lines.append(line)


def build(device: torch.device):
    """Untrained VAE, text encoder, tokenizer and UNet of the pipeline (SD 1.x layout at tiny width)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer(words=VOCABULARY)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64), layers_per_block=1,
                        norm_num_groups=16, sample_size=RESOLUTION)
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4, 4),
        cross_attention_dim=64, norm_num_groups=16)
    return tokenizer, text_encoder.to(device), vae.to(device), unet.to(device)


def cosine(step_frac: float, warm: float = 0.03) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 5%, over the fraction of the phase's time used."""
    if step_frac < warm:
        return step_frac / warm
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step_frac - warm) / (1 - warm))))


def phase(seconds: float):
    """Yield (step, fraction of the time used) until `seconds` have passed."""
    t0, step = time.time(), 0
    while (frac := (time.time() - t0) / seconds) < 1.0:
        yield step, frac
        step += 1


def train_vae(vae, args, gen, device, log) -> float:
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr_vae, weight_decay=0.0)
    vae.train()
    for step, frac in phase(args.seconds * SHARES["vae"]):
        for g in opt.param_groups:
            g["lr"] = args.lr_vae * cosine(frac)
        x = draw_scenes(args.batch // 2, gen, RESOLUTION, device).images
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            post = vae.encode(x).latent_dist
            z = post.sample()
            rec = vae.decode(z).sample.float()
        kl = post.kl().mean() / z[0].numel()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 200 == 0:
            log(f"vae step {step} loss {loss.item():.5f} mse {F.mse_loss(rec, x).item():.5f} kl {kl.item():.3f}")
    vae.eval()
    with torch.no_grad():
        x = draw_scenes(256, gen, RESOLUTION, device).images
        z = torch.cat([vae.encode(x[i:i + 64]).latent_dist.sample() for i in range(0, len(x), 64)])
        rec = torch.cat([vae.decode(z[i:i + 64]).sample for i in range(0, len(z), 64)])
        scale = float(1.0 / z.float().std())
        log(f"vae done: {step + 1} steps, held-out mse {F.mse_loss(rec.clamp(-1, 1), x).item():.5f}, "
            f"latent std {z.std().item():.4f} -> scaling_factor {scale:.5f}")
    vae.register_to_config(scaling_factor=scale)
    return scale


def ids_of(tokenizer, captions: list[str], cache: dict[str, list[int]], device) -> torch.Tensor:
    missing = [c for c in captions if c not in cache]
    if missing:
        for c, ids in zip(missing, tokenizer(missing, padding="max_length", max_length=77, truncation=True).input_ids):
            cache[c] = ids
    return torch.tensor([cache[c] for c in captions], device=device)


def ema_update(ema, model, decay: float) -> None:
    with torch.no_grad():
        e, m = list(ema.parameters()), list(model.parameters())
        torch._foreach_lerp_(e, m, 1 - decay)


def latent_pool(vae, tokenizer, args, gen, device, log) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw `args.pool` scenes once and keep their latent means and stds (bf16) and caption token ids."""
    means, stds, ids, cache = [], [], [], {}
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, args.pool, 1024):
            s = draw_scenes(min(1024, args.pool - i), gen, RESOLUTION, device)
            d = vae.encode(s.images).latent_dist
            means.append(d.mean.to(torch.bfloat16))
            stds.append(d.std.to(torch.bfloat16))
            ids.append(ids_of(tokenizer, s.captions, cache, device))
    log(f"latent pool: {args.pool:,} scenes, {len(cache):,} distinct captions")
    return torch.cat(means), torch.cat(stds), torch.cat(ids)


def train_unet(unet, text_encoder, vae, tokenizer, args, gen, device, log):
    from diffusers import DDPMScheduler

    t0 = time.time()
    means, stds, pool_ids = latent_pool(vae, tokenizer, args, gen, device, log)
    empty = ids_of(tokenizer, [""], {}, device)[0]
    ac = DDPMScheduler(**BETAS).alphas_cumprod.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_u, ema_t = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    unet.train(), text_encoder.train()
    scale = vae.config.scaling_factor
    for step, frac in phase(args.seconds * SHARES["unet"] - (time.time() - t0)):
        for g in opt.param_groups:
            g["lr"] = args.lr * cosine(frac)
        rows = torch.randint(0, len(means), (args.batch,), device=device)
        z = (means[rows].float() + stds[rows].float() * torch.randn(args.batch, 4, LATENT, LATENT, device=device)) * scale
        drop = torch.rand(args.batch, 1, device=device) < 0.1  # unconditional 10% of the time, for guidance
        ids = torch.where(drop, empty.unsqueeze(0), pool_ids[rows])
        noise = torch.randn_like(z)
        t = torch.randint(0, 1000, (len(z),), device=device)
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            emb = text_encoder(ids)[0]
            pred = unet(zt, t, emb).sample.float()
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_u, unet, decay)
        ema_update(ema_t, text_encoder, decay)
        if step % 1000 == 0:
            log(f"unet step {step} loss {loss.item():.5f} lr {args.lr * cosine(frac):.2e}")
    log(f"unet done: {step + 1} steps of batch {args.batch} ({(step + 1) * args.batch:,} samples of the pool)")
    return ema_u, ema_t


def train_probe(args, gen, device, log) -> ShapeProbe:
    probe = ShapeProbe().to(device)
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=0.01)
    for step, frac in phase(args.seconds * SHARES["probe"]):
        for g in opt.param_groups:
            g["lr"] = 2e-3 * cosine(frac)
        s = draw_scenes(args.batch, gen, RESOLUTION, device)
        # Generated images are a little soft and noisy: train on blurred, noisy scenes too.
        x = s.images
        if step % 2:
            x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        x = x + 0.05 * torch.randn_like(x)
        logits = probe(x)
        loss = sum(F.cross_entropy(logits[k], s.labels[k].to(device), ignore_index=-1) for k in PROBE_HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0:
            log(f"probe step {step} loss {loss.item():.4f}")
    probe.eval()
    with torch.no_grad():
        s = draw_scenes(512, gen, RESOLUTION, device)
        logits = probe(s.images)
        accs = {k: _accuracy(logits[k], s.labels[k].to(device)) for k in PROBE_HEADS}
    log("probe done: accuracy on fresh scenes " + ", ".join(f"{k} {v:.3f}" for k, v in accs.items()))
    return probe


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    keep = labels >= 0
    return float((logits.argmax(1)[keep] == labels[keep]).float().mean())


def make_pipeline(vae, text_encoder, tokenizer, unet):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler(**BETAS, prediction_type="epsilon", timestep_spacing="trailing",
                                            steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def evaluate(pipe, probe, args, device, log) -> dict:
    """Prompt following: the probe reads generated images of full captions; compare with what was asked."""
    gen = torch.Generator().manual_seed(1234)
    s = draw_scenes(args.eval, gen, RESOLUTION, "cpu", drop=0.0)
    images = []
    for i in range(0, args.eval, 128):
        g = torch.Generator(device=device).manual_seed(i)
        out = pipe(s.captions[i:i + 128], num_inference_steps=20, generator=g, output_type="pt",
                   height=RESOLUTION, width=RESOLUTION).images
        images.append(out * 2 - 1)
    images = torch.cat(images).float().to(device)
    with torch.no_grad():
        logits = probe(images)
    result = {k: _accuracy(logits[k], s.labels[k].to(device)) for k in PROBE_HEADS}
    chance = {k: 1 / n for k, n in PROBE_HEADS.items()}
    log("prompt following (probe readings of generated images vs the caption, 20 steps, guidance 7.5, "
        f"{args.eval} prompts): " + ", ".join(f"{k} {v:.3f} (chance {chance[k]:.3f})" for k, v in result.items()))
    return {"images": images[:64], "captions": s.captions[:64], "accuracy": result, "chance": chance}


def save_grid(images: torch.Tensor, path: Path) -> None:
    from PIL import Image

    a = to_uint8(images.cpu())
    rows = [np.concatenate(list(a[r * 8:(r + 1) * 8]), 1) for r in range(len(a) // 8)]
    Image.fromarray(np.concatenate(rows, 0)).save(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=420.0, help="wall-clock budget of the training phases")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr_vae", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.9995)
    p.add_argument("--pool", type=int, default=100_000, help="scenes in the UNet's latent pool")
    p.add_argument("--eval", type=int, default=512, help="prompts in the prompt-following evaluation")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    log = Log()
    log(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), torch "
        f"{torch.__version__}, args {vars(args)}")
    tokenizer, text_encoder, vae, unet = build(device)
    for name, m in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet)):
        log(f"{name}: {sum(p.numel() for p in m.parameters()):,} parameters")
    train_vae(vae, args, gen, device, log)
    vae.requires_grad_(False)
    ema_u, ema_t = train_unet(unet, text_encoder, vae, tokenizer, args, gen, device, log)
    probe = train_probe(args, gen, device, log)
    save_probe(probe, out / "tiny-sd-probe" / "probe.safetensors")
    pipe = make_pipeline(vae, ema_t, tokenizer, ema_u)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(torch.float16).save_pretrained(out / "tiny-sd", safe_serialization=True)
    log(f"saved {out / 'tiny-sd'} (fp16) and {out / 'tiny-sd-probe'}")
    pipe.to(torch.float32)
    result = evaluate(pipe, probe, args, device, log)
    save_grid(result.pop("images"), out / "samples.png")
    (out / "prompt_following.json").write_text(json.dumps(result, indent=1))
    (out / "training_log.txt").write_text("\n".join(log.lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
