"""Generation with adapters: UNet step and full-generation time for base, unfused, fused, served (slots, eager and
torch.compile'd) and diffusers + peft on the same adapter files; switch latency and recompile count.

    python benchmarks/bench_generate.py --out results/          # SD 1.5 architecture, random weights, GPU
    python benchmarks/bench_generate.py --size tiny --device cpu --iters 2 --steps 2 --compile_backend eager

Adapters: two random files written by lora_vision.formats.export(..., "diffusers") (alpha in the metadata), read
by our loaders and by `pipe.load_lora_weights`: A = rank 16 on UNet attention (attn1/attn2 q, k, v, out) and
text-encoder attention (the reference's setting); B = rank 8 on UNet attention + feed-forward + text encoder, so
the served slots hold adapters of different ranks and target sets. Results go to OUT/results.json after every
section (a time-out keeps what was measured) and a table is printed last.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from lora_vision.adapter import Adapter  # noqa: E402
from lora_vision.dtypes import parse_dtype  # noqa: E402
from lora_vision.formats import export  # noqa: E402
from lora_vision.pipeline import fuse, load_adapter, set_adapter_strength, set_adapters, unfuse, unload_adapter  # noqa: E402
from lora_vision.serving import AdapterServer  # noqa: E402

T0 = time.time()
RESULTS: dict = {}


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def save(out: Path) -> None:
    (out / "results.json").write_text(json.dumps(RESULTS, indent=2))


# ---- models and files ----------------------------------------------------------------------------------------

def build_pipe(size: str, device: str, dtype: torch.dtype):
    """SD 1.5 architecture (or the tiny test layout) with random weights, built directly on the device."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora_vision.models.tiny import build_tiny_sd, build_tiny_tokenizer

    torch.manual_seed(0)
    if size == "tiny":
        pipe = build_tiny_sd("sd1")
    else:
        with torch.device(device):
            unet = UNet2DConditionModel(
                sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280),
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768, attention_head_dim=8)
            vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                                sample_size=512, block_out_channels=(128, 256, 512, 512),
                                down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4)
            te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                              num_hidden_layers=12, num_attention_heads=12,
                                              max_position_embeddings=77, hidden_act="quick_gelu",
                                              projection_dim=768))
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=build_tiny_tokenizer(), unet=unet,
                                       scheduler=None, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_adapter(pipe, rank: int, unet_leaves: tuple[str, ...], seed: int) -> Adapter:
    """A random adapter (alpha = 0.75 rank, so scaling is not a power of two) on the given UNet Linear leaves and the text encoder's attention."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for comp, model, leaves in (("unet", pipe.unet, unet_leaves),
                                ("text_encoder", pipe.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj"))):
        for name, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear) or not any(name.endswith(leaf) for leaf in leaves):
                continue
            if comp == "unet" and "transformer_blocks" not in name:
                continue
            tensors[f"{comp}.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) \
                / mod.in_features ** 0.5
            tensors[f"{comp}.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.05
            tensors[f"{comp}.{name}.alpha"] = torch.tensor(0.75 * rank, dtype=torch.float32)
    return Adapter(tensors, {})


ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")


# ---- timing --------------------------------------------------------------------------------------------------

def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


class Bench:
    def __init__(self, args, device: str, dtype: torch.dtype, latent: int, ctx: int) -> None:
        self.args, self.device, self.dtype = args, device, dtype
        g = torch.Generator().manual_seed(0)
        self.inputs = {}
        for images in args.batches:
            b = 2 * images   # classifier-free guidance doubles the UNet batch
            self.inputs[images] = (torch.randn(b, 4, latent, latent, generator=g).to(device, dtype),
                                   torch.tensor(500, device=device),
                                   torch.randn(b, 77, ctx, generator=g).to(device, dtype))

    def unet_step(self, unet, images: int) -> torch.Tensor:
        x, t, e = self.inputs[images]
        with torch.inference_mode():
            return unet(x, t, e).sample

    def step_ms(self, unet, images: int) -> float:
        return median_ms(lambda: self.unet_step(unet, images), self.args.iters)

    def gen_ms_per_image(self, pipe, images: int) -> float:
        def run(steps: int) -> None:
            with torch.inference_mode():
                pipe(prompt=["a photo of a dog"] * images, num_inference_steps=steps, guidance_scale=7.5,
                     generator=torch.Generator().manual_seed(0), output_type="pil")
        run(2)
        sync()
        t = time.perf_counter()
        run(self.args.steps)
        sync()
        return (time.perf_counter() - t) * 1e3 / images

    def record(self, label: str, unet, pipe, out: Path) -> None:
        if "eager" in self.args.skip and not label.startswith("compiled"):
            return
        row = RESULTS.setdefault("configs", {}).setdefault(label, {})
        for images in self.args.batches:
            row[f"step_ms_bs{images}"] = self.step_ms(unet, images)
            if pipe is not None and not self.args.no_generate:
                row[f"gen_ms_per_image_bs{images}"] = self.gen_ms_per_image(pipe, images)
        log(f"{label}: {row}")
        save(out)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def with_parts(pipe, unet, te):
    """A pipeline sharing pipe's VAE, tokenizer and scheduler config, with its own UNet and text encoder."""
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline(vae=pipe.vae, text_encoder=te, tokenizer=pipe.tokenizer, unet=unet,
                                scheduler=copy.deepcopy(pipe.scheduler), safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


# ---- the run -------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("sd15", "tiny"), default="sd15")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4],
                    help="images per generation (the UNet runs twice as many with guidance)")
    ap.add_argument("--iters", type=int, default=20, help="timed UNet steps per configuration (median)")
    ap.add_argument("--steps", type=int, default=30, help="denoising steps of the full generations")
    ap.add_argument("--compile_backend", default="inductor")
    ap.add_argument("--no_generate", action="store_true", help="UNet steps only")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: eager (timings of the eager "
                    "configurations), peft, compile")
    ap.add_argument("--out", default="bench_generate_out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    import transformers

    transformers.logging.set_verbosity_error()
    dtype = parse_dtype(args.dtype, "--dtype")
    RESULTS["setup"] = {"size": args.size, "dtype": args.dtype, "device": torch.cuda.get_device_name()
                        if args.device.startswith("cuda") else "cpu", "torch": torch.__version__,
                        "steps": args.steps, "iters": args.iters, "batches": args.batches}
    pipe = build_pipe(args.size, args.device, dtype)
    latent = pipe.unet.config.sample_size
    bench = Bench(args, args.device, dtype, latent, pipe.unet.config.cross_attention_dim)
    tmp = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    files = {"a": tmp / "adapter_a.safetensors", "b": tmp / "adapter_b.safetensors"}
    export(random_adapter(pipe, 16, ATTN, 1), "diffusers", files["a"])
    export(random_adapter(pipe, 8, ATTN + ("ff.net.0.proj", "ff.net.2"), 2), "diffusers", files["b"])
    pristine_unet, pristine_te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    log("built pipeline and adapter files")

    # ours: base, unfused (pipeline.load_adapter), fused
    base_out = bench.unet_step(pipe.unet, args.batches[0]).clone()
    bench.record("base", pipe.unet, pipe, out)
    t = time.perf_counter()
    load_adapter(pipe, str(files["a"]), name="a")
    sync()
    RESULTS["load_apply_ms"] = (time.perf_counter() - t) * 1e3
    load_adapter(pipe, str(files["b"]), name="b")
    set_adapters(pipe, ["a"])
    ref_a = bench.unet_step(pipe.unet, args.batches[0]).clone()
    RESULTS["agreement"] = {"adapter effect: ours unfused vs base (max rel diff)": max_rel_diff(ref_a, base_out)}
    bench.record("ours unfused", pipe.unet, pipe, out)
    flip = [0]

    def pipeline_switch() -> None:
        flip[0] += 1
        set_adapters(pipe, ["ab"[flip[0] % 2]])
    RESULTS["ours_pipeline_switch_ms"] = median_ms(pipeline_switch, 50)
    RESULTS["ours_pipeline_strength_ms"] = median_ms(lambda: set_adapter_strength(pipe, "a", 0.7), 50)
    set_adapters(pipe, ["a"])
    set_adapter_strength(pipe, "a", 1.0)
    t = time.perf_counter()
    fuse(pipe)
    sync()
    RESULTS["ours_fuse_ms"] = (time.perf_counter() - t) * 1e3
    bench.record("ours fused", pipe.unet, pipe, out)
    unfuse(pipe)
    unload_adapter(pipe)

    # served: slots (eager), plain and with fused q/k/v projections
    served = {}
    for label, fuse_qkv in (("served eager", False), ("served eager, fused qkv", True)):
        p = with_parts(pipe, copy.deepcopy(pristine_unet), copy.deepcopy(pristine_te))
        server = AdapterServer(p, fuse_qkv=fuse_qkv)
        server.add("a", str(files["a"]))
        server.add("b", str(files["b"]))
        server.prepare()
        server.activate("a")
        RESULTS.setdefault("agreement", {})[f"{label} vs ours unfused (max rel diff)"] = max_rel_diff(
            bench.unet_step(p.unet, args.batches[0]), ref_a)
        bench.record(label, p.unet, p, out)
        served[label] = (p, server)
    base_qkv = with_parts(pipe, copy.deepcopy(pristine_unet), pipe.text_encoder)
    base_qkv.unet.fuse_qkv_projections()
    bench.record("base, fused qkv", base_qkv.unet, base_qkv, out)
    p, server = served["served eager, fused qkv"]
    names = ["a", "b"]
    i = [0]

    def switch() -> None:
        i[0] += 1
        server.activate(names[i[0] % 2])
    RESULTS["served_switch_ms"] = median_ms(switch, 100, warmup=5)
    RESULTS["served_strength_ms"] = median_ms(lambda: server.set_strength(0.8), 100, warmup=5)
    server.activate("a")

    # diffusers + peft on the same files
    if "peft" not in skip and "eager" not in skip:
        ref = with_parts(pipe, copy.deepcopy(pristine_unet), copy.deepcopy(pristine_te))
        t = time.perf_counter()
        ref.load_lora_weights(str(files["a"]), adapter_name="a")
        sync()
        RESULTS["peft_load_ms"] = (time.perf_counter() - t) * 1e3
        ref.load_lora_weights(str(files["b"]), adapter_name="b")
        ref.set_adapters(["a"], adapter_weights=[1.0])
        RESULTS["agreement"]["peft unfused vs ours unfused (max rel diff)"] = max_rel_diff(
            bench.unet_step(ref.unet, args.batches[0]), ref_a)
        bench.record("diffusers+peft unfused", ref.unet, ref, out)
        j = [0]

        def peft_switch() -> None:
            j[0] += 1
            ref.set_adapters([names[j[0] % 2]], adapter_weights=[1.0])
        RESULTS["peft_switch_ms"] = median_ms(peft_switch, 20, warmup=2)
        ref.set_adapters(["a"], adapter_weights=[1.0])
        t = time.perf_counter()
        ref.fuse_lora(adapter_names=["a"], lora_scale=1.0)
        sync()
        RESULTS["peft_fuse_ms"] = (time.perf_counter() - t) * 1e3
        bench.record("diffusers+peft fused", ref.unet, ref, out)
        del ref
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    # torch.compile: base (fused qkv) and served (fused qkv) with hot swaps
    if "compile" not in skip:
        from torch._dynamo.testing import CompileCounterWithBackend

        for label, pp, srv in (("compiled base, fused qkv", base_qkv, None), ("compiled served + hot-swap", p, server)):
            counter = CompileCounterWithBackend(args.compile_backend)
            pp.unet = torch.compile(pp.unet, backend=counter, dynamic=False)
            t = time.perf_counter()
            for images in args.batches:
                bench.unet_step(pp.unet, images)
            sync()
            RESULTS.setdefault("compile_s", {})[label] = time.perf_counter() - t
            log(f"{label}: compiled in {RESULTS['compile_s'][label]:.1f}s ({counter.frame_count} frames)")
            bench.record(label, pp.unet, pp, out)
            if srv is not None:
                warm = counter.frame_count
                for k, step in enumerate((lambda: srv.activate("b"), lambda: srv.set_strength(0.6),
                                          lambda: srv.activate(None), lambda: srv.activate("a", 1.2, 0.5),
                                          lambda: srv.activate("b", 1.0, block_strengths="up=0"))):
                    step()
                    for images in args.batches:
                        bench.unet_step(pp.unet, images)
                if not args.no_generate:
                    bench.gen_ms_per_image(pp, args.batches[0])
                RESULTS["recompiles_after_warmup"] = counter.frame_count - warm
                RESULTS["compiled_switch_ms"] = median_ms(switch, 100, warmup=5)
                srv.activate("a")
                RESULTS["agreement"]["compiled served vs ours unfused (max rel diff)"] = max_rel_diff(
                    bench.unet_step(pp.unet, args.batches[0]), ref_a)
            save(out)
    save(out)
    print_table()


def print_table() -> None:
    cfg = RESULTS["configs"]
    batches = RESULTS["setup"]["batches"]
    base = cfg.get("base", {})
    head = " | ".join(f"UNet step bs{b} (ms) | vs base | per image bs{b} (ms)" for b in batches)
    print(f"| configuration | {head} |")
    print("|---" * (1 + 3 * len(batches)) + "|")
    refs = {"served eager, fused qkv": "base, fused qkv", "compiled served + hot-swap": "compiled base, fused qkv"}
    for label, row in cfg.items():
        ref = cfg.get(refs.get(label, "base"), base)
        cells = []
        for b in batches:
            s = row.get(f"step_ms_bs{b}")
            g = row.get(f"gen_ms_per_image_bs{b}")
            r = ref.get(f"step_ms_bs{b}")
            over = f"{100 * (s / r - 1):+.1f}%" if s and r else ""
            cells.append(f"{s:.2f} | {over} | {g:.0f}" if g else f"{s:.2f} | {over} | ")
        print(f"| {label} | " + " | ".join(cells) + " |")
    for k, v in RESULTS.items():
        if k not in ("configs", "setup"):
            print(f"{k}: {json.dumps(v) if isinstance(v, dict) else (f'{v:.4g}' if isinstance(v, float) else v)}")


if __name__ == "__main__":
    main()
