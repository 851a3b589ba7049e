"""Generation with adapters: UNet step and full-generation time for base, unfused, fused, served (slots, eager and
torch.compile'd) and diffusers + peft on the same adapter files; switch latency and recompile count.

    python benchmarks/bench_generate.py --out results/          # SD 1.5 architecture, random weights, GPU
    python benchmarks/bench_generate.py --size tiny --device cpu --iters 2 --steps 2 --rounds 1 \
        --compile_backend eager --skip peft                     # smoke test

Adapters: two random files written by lora_vision.formats.export(..., "diffusers") (alpha in the metadata), read
by our loaders and by `pipe.load_lora_weights`: A = rank 16 on UNet attention (attn1/attn2 q, k, v, out) and
text-encoder attention (the reference's setting); B = rank 8 on UNet attention + feed-forward + text encoder, so
the served slots hold adapters of different ranks and target sets. Every configuration has its own UNet and text
encoder (sharing the VAE), so all are built (and compiled) first; then the UNet steps and generations of all of
them are timed in interleaved rounds in a shuffled order (benchmarks/timing.py): one median of --iters steps per
configuration and round, reported as median and spread over the rounds and as the ratio to the configuration's base
per round. Results go to OUT/results.json after every section (a time-out keeps what was measured) and a table is
printed last.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import timing  # noqa: E402  (the shared rounds and report)
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

sync = timing.sync


def median_ms(fn, iters: int, warmup: int = 3) -> float:
    return timing.median_ms(fn, iters, warmup=warmup)


class Bench:
    def __init__(self, args, device: str, dtype: torch.dtype, latent: int, ctx: int) -> None:
        self.args, self.device, self.dtype = args, device, dtype
        self.configs: dict = {}
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

    def record(self, label: str, unet, pipe, out: Path | None = None) -> None:
        """Register a configuration for the interleaved rounds of `measure` (nothing is timed here)."""
        if "eager" in self.args.skip and not label.startswith(("compiled", "captured")):
            return
        self.configs[label] = (unet, pipe)

    def measure(self, out: Path) -> None:
        """Every configuration's UNet step (and generation) per batch, interleaved over --rounds rounds; per metric
        {label: [value per round]} into RESULTS["rounds"] and the medians into RESULTS["configs"]."""
        jobs = {}
        for label, (unet, pipe) in self.configs.items():
            for images in self.args.batches:
                jobs[(label, f"step_ms_bs{images}")] = lambda u=unet, i=images: self.step_ms(u, i)
                if pipe is not None and not self.args.no_generate:
                    jobs[(label, f"gen_ms_per_image_bs{images}")] = lambda p=pipe, i=images: self.gen_ms_per_image(p, i)
        keys = {f"{label} | {metric}": (label, metric) for label, metric in jobs}
        values = timing.interleave({k: jobs[keys[k]] for k in keys}, self.args.rounds)
        for k, vals in values.items():
            label, metric = keys[k]
            RESULTS.setdefault("rounds", {}).setdefault(label, {})[metric] = vals
            RESULTS.setdefault("configs", {}).setdefault(label, {})[metric] = statistics.median(vals)
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
    ap.add_argument("--iters", type=int, default=20, help="timed UNet steps per configuration and round (median)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (shuffled order per round, seed 0)")
    ap.add_argument("--steps", type=int, default=30, help="denoising steps of the full generations")
    ap.add_argument("--compile_backend", default="inductor")
    ap.add_argument("--no_generate", action="store_true", help="UNet steps only")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: eager (timings of the eager "
                    "configurations), peft, compile, captured (CUDA graphs, lora_vision.captured)")
    ap.add_argument("--out", default="bench_generate_out")
    args = ap.parse_args()
    if args.rounds < 1 or args.iters < 1:
        ap.error(f"--rounds {args.rounds} --iters {args.iters}: both must be at least 1")
    timing.print_command()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    import transformers

    transformers.logging.set_verbosity_error()
    dtype = parse_dtype(args.dtype, "--dtype")
    RESULTS["setup"] = {"size": args.size, "dtype": args.dtype, "device": torch.cuda.get_device_name()
                        if args.device.startswith("cuda") else "cpu", "torch": torch.__version__,
                        "steps": args.steps, "iters": args.iters, "batches": args.batches,
                        "rounds": args.rounds, "command": timing.command_line()}
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
    base_p = with_parts(pipe, copy.deepcopy(pristine_unet), copy.deepcopy(pristine_te))  # the base keeps its copy
    bench.record("base", base_p.unet, base_p)
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
    fused = with_parts(pipe, copy.deepcopy(pristine_unet), copy.deepcopy(pristine_te))  # its own copy: timed later
    load_adapter(fused, str(files["a"]), name="a")
    t = time.perf_counter()
    fuse(fused)
    sync()
    RESULTS["ours_fuse_ms"] = (time.perf_counter() - t) * 1e3
    bench.record("ours fused", fused.unet, fused, out)
    t = time.perf_counter()
    unfuse(fused)
    sync()
    RESULTS["ours_unfuse_ms"] = (time.perf_counter() - t) * 1e3
    fuse(fused)

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

    # CUDA graphs (lora_vision.captured): base, ours unfused and served slots, each over its eager UNet above
    captured = {}
    if "captured" not in skip and args.device.startswith("cuda"):
        from lora_vision.captured import CapturedModel

        for label, src in (("captured base", base_p), ("captured ours unfused", pipe),
                           ("captured base, fused qkv", base_qkv), ("captured served + hot-swap", p)):
            model = CapturedModel(src.unet)
            t = time.perf_counter()
            for images in args.batches:
                bench.unet_step(model, images)
            sync()
            RESULTS.setdefault("capture_s", {})[label] = time.perf_counter() - t
            bench.record(label, model, with_parts(src, model, src.text_encoder))
            captured[label] = model
        RESULTS["agreement"]["captured ours unfused vs ours unfused (max rel diff)"] = max_rel_diff(
            bench.unet_step(captured["captured ours unfused"], args.batches[0]), ref_a)
        save(out)

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
        ref_fused = with_parts(pipe, copy.deepcopy(pristine_unet), copy.deepcopy(pristine_te))
        ref_fused.load_lora_weights(str(files["a"]), adapter_name="a")
        t = time.perf_counter()
        ref_fused.fuse_lora(adapter_names=["a"], lora_scale=1.0)
        sync()
        RESULTS["peft_fuse_ms"] = (time.perf_counter() - t) * 1e3
        bench.record("diffusers+peft fused", ref_fused.unet, ref_fused, out)

    # torch.compile: base (fused qkv) and served (fused qkv) with hot swaps
    if "compile" not in skip:
        from torch._dynamo.testing import CompileCounterWithBackend

        for label, eager, srv in (("compiled base, fused qkv", base_qkv, None), ("compiled served + hot-swap", p, server)):
            counter = CompileCounterWithBackend(args.compile_backend)
            # a pipeline of its own around the compiled UNet: the eager configuration keeps its eager UNet
            pp = with_parts(eager, torch.compile(eager.unet, backend=counter, dynamic=False), eager.text_encoder)
            t = time.perf_counter()
            for images in args.batches:
                bench.unet_step(pp.unet, images)
            sync()
            RESULTS.setdefault("compile_s", {})[label] = time.perf_counter() - t
            log(f"{label}: compiled in {RESULTS['compile_s'][label]:.1f}s ({counter.frame_count} frames)")
            bench.record(label, pp.unet, pp)
            if srv is not None:
                served_compiled = (pp, counter)
            save(out)

    # the timed rounds: every configuration, interleaved
    bench.measure(out)

    # hot swaps on the captured served UNet: the graphs stay valid (no new capture) and follow the switches
    if captured:
        model = captured["captured served + hot-swap"]
        before = model.captures
        for step in (lambda: server.activate("b"), lambda: server.set_strength(0.6), lambda: server.activate(None),
                     lambda: server.activate("a", 1.2, 0.5), lambda: server.activate("b", 1.0, block_strengths="up=0")):
            step()
            for images in args.batches:
                bench.unet_step(model, images)
        RESULTS["captures_after_warmup"] = model.captures - before
        RESULTS["captured_switch_ms"] = median_ms(switch, 100, warmup=5)
        server.activate("a")
        RESULTS["agreement"]["captured served vs ours unfused (max rel diff)"] = max_rel_diff(
            bench.unet_step(model, args.batches[0]), ref_a)
        save(out)

    # hot swaps on the compiled served UNet: no recompiles after the warm-up
    if "compile" not in skip:
        pp, counter = served_compiled
        warm = counter.frame_count
        for step in (lambda: server.activate("b"), lambda: server.set_strength(0.6), lambda: server.activate(None),
                     lambda: server.activate("a", 1.2, 0.5), lambda: server.activate("b", 1.0, block_strengths="up=0")):
            step()
            for images in args.batches:
                bench.unet_step(pp.unet, images)
        if not args.no_generate:
            bench.gen_ms_per_image(pp, args.batches[0])
        RESULTS["recompiles_after_warmup"] = counter.frame_count - warm
        RESULTS["compiled_switch_ms"] = median_ms(switch, 100, warmup=5)
        server.activate("a")
        RESULTS["agreement"]["compiled served vs ours unfused (max rel diff)"] = max_rel_diff(
            bench.unet_step(pp.unet, args.batches[0]), ref_a)
    save(out)
    print_table()


REFS = {"served eager, fused qkv": "base, fused qkv", "compiled served + hot-swap": "compiled base, fused qkv",
        "captured ours unfused": "captured base", "captured served + hot-swap": "captured base, fused qkv"}


def print_table() -> None:
    """Per metric, the configurations' round values against their base (timing.markdown_table); then the one-off
    measurements."""
    rounds = RESULTS.get("rounds", {})
    metrics = list(dict.fromkeys(m for row in rounds.values() for m in row))
    for metric in metrics:
        values = {label: row[metric] for label, row in rounds.items() if metric in row}
        refs = {label: REFS.get(label, "base") for label in values}
        print(f"\n{metric}\n")
        print(timing.markdown_table(values, "ms", refs))
    for k, v in RESULTS.items():
        if k not in ("configs", "setup", "rounds"):
            print(f"{k}: {json.dumps(v) if isinstance(v, dict) else (f'{v:.4g}' if isinstance(v, float) else v)}")


if __name__ == "__main__":
    main()
