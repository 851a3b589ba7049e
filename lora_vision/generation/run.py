"""Text-to-image generation with adapters: what `lora-vision generate` and scripts/generate.py run.

    cfg = GenerateConfig(model="tiny", prompts=["a photo of a dog <lora:ink:0.8>"], lora_dir="loras",
                         loras=["clay.safetensors:0.5"], seeds=[1, 2], steps=20, sweeps=["strength=0,0.5,1"])
    written = generate(cfg)

Adapters come from `--lora FILE[:STRENGTH[:TE_STRENGTH]]` (all prompts) and from A1111 tags in each prompt
(resolved in `lora_dir`). Each file is loaded once (lora_vision.pipeline.load_adapter); prompts then only switch
the active set and strengths. Every image is written atomically as PNG with A1111's "parameters" text chunk
(`Lora hashes` included) and a JSON sidecar; sweeps also write a labelled grid PNG.
"""

from __future__ import annotations

import inspect
import itertools
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import __version__
from ..dtypes import parse_dtype
from ..formats import declared_base
from ..io import read_header
from ..models.sd import detect_family, load_sd_pipeline
from ..formats.kohya import BUNDLE
from ..pipeline import expand_tokens, load_adapter, set_adapter_strength, set_adapters, unload_adapter
from ..pipeline.adapters import denoiser, pipeline_components
from ..terminal import printable
from .images import make_grid, save_png
from .prompts import (LoraDirectory, addnet_hash, build_infotext, extract_lora_tags, lora_hashes_field,
                      parse_lora_flag, parse_strength)

# name -> (diffusers class, extra config, A1111 sampler name, A1111 schedule type)
SCHEDULERS: dict[str, tuple[str, dict, str, str | None]] = {
    "euler": ("EulerDiscreteScheduler", {}, "Euler", None),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a", None),
    "ddim": ("DDIMScheduler", {}, "DDIM", None),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M", None),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M", "Karras"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC", None),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS", None),
}


@dataclass
class GenerateConfig:
    """Everything one generation run needs (the CLI flags, one to one)."""

    model: str = "tiny"                           # built-in tiny pipeline, local diffusers folder or hub id
    prompts: list[str] = field(default_factory=list)
    negative_prompt: str = ""
    loras: list[str] = field(default_factory=list)  # FILE[:STRENGTH[:TE_STRENGTH]]
    lora_dir: str | None = None                   # where <lora:name:...> tags are looked up
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 30
    guidance_scale: float = 7.5
    width: int | None = None                      # None: the model's native size
    height: int | None = None
    scheduler: str = "default"                    # "default" keeps the model's own, else a SCHEDULERS key
    batch_size: int = 1                           # seeds generated together
    sweeps: list[str] = field(default_factory=list)  # KEY=v1,v2,... (KEY: strength, te, unet, or an adapter name)
    output_dir: str = "outputs"
    device: str | None = None
    dtype: str | None = None                      # fp32 | fp16 | bf16 (default fp16 on CUDA, fp32 on CPU)
    progress: bool = True
    strict: bool = False                          # a file for another SD family or with unmatched modules: error


@dataclass
class LoraUse:
    """One adapter as used for one prompt: its label (A1111 name), file, and strengths."""

    label: str
    path: str
    strength: float
    te_strength: float
    sha256: str = ""


# ---- setup -------------------------------------------------------------------------------------------------------

def set_scheduler(pipe: Any, name: str) -> tuple[str, str | None]:
    """Switch the pipeline's scheduler by short name; returns (A1111 sampler name, schedule type)."""
    if name == "default":
        return type(pipe.scheduler).__name__, None
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected 'default' or one of {', '.join(SCHEDULERS)}")
    import diffusers

    cls_name, extra, sampler, schedule = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)
    return sampler, schedule


def parse_sweeps(specs: Sequence[str]) -> list[tuple[str, list[float]]]:
    """`KEY=v1,v2,...` (at most two) -> [(KEY, values)]."""
    out = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ValueError(f"--sweep {spec!r}: expected KEY=v1,v2,... such as strength=0,0.5,1")
        nums = [parse_strength(v, f"--sweep {spec!r}: value") for v in values.split(",") if v.strip()]
        out.append((key.strip(), nums))
    if len(out) > 2:
        raise ValueError(f"{len(out)} --sweep flags; a grid has at most two axes")
    if len({k for k, _ in out}) != len(out):
        raise ValueError("the two --sweep axes must name different keys")
    return out


def _adapter_name(label: str, taken: set[str]) -> str:
    base = re.sub(r"\W+", "_", label).strip("_") or "lora"
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


class AdapterSet:
    """Adapters of one pipeline, each loaded once by file; `use` makes a list of LoraUse the active set.

    A file whose metadata names another SD family than the pipeline's, or with modules the pipeline does not have,
    gets one warning (strict: an error, and the file is not loaded)."""

    def __init__(self, pipe: Any, strict: bool = False) -> None:
        self.pipe = pipe
        self.strict = strict
        self.by_path: dict[str, str] = {}
        self.hashes: dict[str, str] = {}

    def _problem(self, message: str) -> None:
        if self.strict:
            raise ValueError(f"{message} (--strict)")
        print(f"warning: {message}", file=sys.stderr)

    def ensure(self, use: LoraUse) -> str:
        key = str(Path(use.path).resolve())
        if key not in self.by_path:
            self._check_family(use.path)
            name = _adapter_name(use.label, set(self.by_path.values()))
            report = load_adapter(self.pipe, use.path, name=name, strength=use.strength, te_strength=use.te_strength)
            print(printable(report))
            try:
                self._check_unmatched(use.path, report)
            except ValueError:
                unload_adapter(self.pipe, name)
                raise
            self.by_path[key] = name
            self.hashes[key] = addnet_hash(use.path)
        use.sha256 = self.hashes[key]
        return self.by_path[key]

    def _check_family(self, path: str) -> None:
        declared = declared_base(read_header(path)[0].get("__metadata__", {}))
        family = detect_family(self.pipe)
        if declared is not None and declared.removesuffix("-v") != family:
            self._problem(f"{printable(path)} was made for {declared} (its metadata says so) but the model is "
                          f"{family}; its modules fit by name and shape, yet the images will not show what it learned"
                          f": use a {declared} model")

    def _check_unmatched(self, path: str, report: Any) -> None:
        src = report.source_report
        unused = [k for k in src.unused if not (report.tokens and k.startswith(BUNDLE + "."))] if src else []
        left = list(report.skipped) + (list(src.not_found) + unused + list(src.unsupported) if src else [])
        if left:
            more = f" ... (+{len(left) - 3} more)" if len(left) > 3 else ""
            self._problem(f"{printable(path)}: {len(left)} module(s)/tensor(s) of the file are not applied to this "
                          f"model ({printable(', '.join(left[:3]))}{more}); the file may be for another base model")

    def use(self, uses: Sequence[LoraUse]) -> None:
        names = [self.ensure(u) for u in uses]
        if not self.by_path:
            return
        set_adapters(self.pipe, names)
        for n, u in zip(names, uses):
            set_adapter_strength(self.pipe, n, u.strength, u.te_strength)


def plan_loras(raw_prompt: str, flags: Sequence[str], lora_dir: LoraDirectory) -> tuple[str, list[LoraUse]]:
    """(prompt without tags, adapters for this prompt): --lora flags first, then the prompt's tags."""
    clean, tags, ignored = extract_lora_tags(raw_prompt)
    if ignored:
        print(f"warning: ignoring extra-network tags other than <lora:...>: {printable(' '.join(ignored))}")
    uses = []
    for flag in flags:
        path, s, te = parse_lora_flag(flag)
        if not path.is_file():
            raise FileNotFoundError(f"--lora {flag!r}: no file {str(path)!r}")
        uses.append(LoraUse(path.stem, str(path), s, te))
    for t in tags:
        uses.append(LoraUse(t.name, str(lora_dir.resolve(t.name)), t.unet, t.te))
    seen = {}
    for u in uses:
        other = seen.get(str(Path(u.path).resolve()))
        if other is not None:
            raise ValueError(f"{u.path} is used twice ({other.label} and {u.label}); give it once")
        seen[str(Path(u.path).resolve())] = u
    return clean, uses


def apply_sweep(uses: Sequence[LoraUse], cell: Sequence[tuple[str, float]]) -> list[LoraUse]:
    """Copies of `uses` with one grid cell's values: strength/te/unet for all adapters, or one adapter by label."""
    out = [LoraUse(**asdict(u)) for u in uses]
    for key, v in cell:
        hit = False
        for u in out:
            if key in ("strength", "unet") or key == u.label:
                u.strength, hit = v, True
            if key in ("strength", "te") or key == u.label:
                u.te_strength, hit = v, True
        if not hit:
            labels = ", ".join(u.label for u in uses) or "none"
            raise ValueError(f"--sweep {key}=...: no adapter named {key!r} in this prompt (adapters: {labels}); "
                             "use strength, te, unet or an adapter name")
    return out


# ---- output ------------------------------------------------------------------------------------------------------

def _next_index(out: Path) -> int:
    nums = [int(m.group(1)) for p in out.glob("*.png") if (m := re.match(r"^(?:grid-)?(\d+)-", p.name))]
    return max(nums, default=-1) + 1


# ---- the run -----------------------------------------------------------------------------------------------------

def load_pipeline(cfg: GenerateConfig) -> Any:
    """The pipeline on its device and dtype, progress bar off (ours counts steps over the whole run)."""
    device = check_device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = cfg.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    dtype = parse_dtype(dtype_name, "--dtype")
    dtype = None if dtype == torch.float32 else dtype
    pipe = load_sd_pipeline(cfg.model, torch_dtype=dtype).to(device)  # names a hub id it cannot reach
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_device(device: str) -> str:
    """`device` if torch can use it here; ValueError saying what is missing otherwise."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device name; expected cpu, cuda, cuda:N or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: no CUDA GPU is available on this machine (or this torch build has no "
                         "CUDA); use --device cpu, or leave --device out to pick what is available")
    if kind == "cuda" and torch.device(device).index is not None and \
            torch.device(device).index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                         f"expected cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device!r}: Apple MPS is not available here; use --device cpu")
    return device


def check_size(value: int | None, flag: str) -> None:
    """Image sizes are None (the model's native size) or positive multiples of 8 (the VAE's downscale)."""
    if value is not None and (value <= 0 or value % 8):
        raise ValueError(f"{flag} {value}: expected a positive multiple of 8 such as 512 (or leave it out for the "
                         "model's native size)")


def generate(cfg: GenerateConfig, pipe: Any = None) -> list[Path]:
    """Run `cfg`; returns the written PNG paths (images, then grids). `pipe` reuses an already loaded pipeline."""
    if not cfg.prompts:
        raise ValueError("no prompt: give --prompt or --prompt_file")
    if cfg.batch_size < 1 or cfg.steps < 1:
        raise ValueError(f"batch_size and steps must be >= 1, got {cfg.batch_size} and {cfg.steps}")
    check_size(cfg.width, "--width")
    check_size(cfg.height, "--height")
    sweeps = parse_sweeps(cfg.sweeps)
    lora_dir = LoraDirectory(cfg.lora_dir)
    plans = [(raw, *plan_loras(raw, cfg.loras, lora_dir)) for raw in cfg.prompts]  # fail early, before loading
    neg_clean, neg_tags, _ = extract_lora_tags(cfg.negative_prompt)
    if neg_tags:
        raise ValueError("LoRA tags in the negative prompt are not supported; put them in the prompt")
    pipe = pipe if pipe is not None else load_pipeline(cfg)
    original = pipe.scheduler
    try:
        return _generate(cfg, pipe, plans, sweeps, neg_clean, *set_scheduler(pipe, cfg.scheduler))
    finally:
        pipe.scheduler = original


def native_size(pipe: Any) -> int:
    """The pixel size a pipeline generates by default: UNet sample size (SD) or the DiT pipeline's
    default_sample_size (1024 px when it has none, as Z-Image), times the VAE scale factor."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        return int(unet.config.sample_size) * int(pipe.vae_scale_factor)
    size = getattr(pipe, "default_sample_size", None)
    return int(size) * int(pipe.vae_scale_factor) if size else 1024


def _generate(cfg: GenerateConfig, pipe: Any, plans: list, sweeps: list, neg_clean: str, sampler: str,
              schedule: str | None) -> list[Path]:
    from tqdm.auto import tqdm

    native = native_size(pipe)
    width = native if cfg.width is None else cfg.width
    height = native if cfg.height is None else cfg.height
    # Flux.2-klein is distilled without a negative prompt; every other pipeline takes one.
    takes_negative = "negative_prompt" in inspect.signature(type(pipe).__call__).parameters
    adapters = AdapterSet(pipe, strict=cfg.strict)
    for _, _, uses in plans:  # load every file once, before the progress bar starts
        for u in uses:
            adapters.ensure(u)
    cells = list(itertools.product(*[[(k, v) for v in vals] for k, vals in sweeps])) or [()]
    out = Path(cfg.output_dir)
    index = _next_index(out) if out.is_dir() else 0
    written: list[Path] = []
    grids: list[Path] = []
    batches = [cfg.seeds[i:i + cfg.batch_size] for i in range(0, len(cfg.seeds), cfg.batch_size)]
    bar = tqdm(total=len(plans) * len(cells) * len(batches) * cfg.steps, unit="step", disable=not cfg.progress,
               desc="generate")

    def step_done(_pipe: Any, _i: int, _t: Any, kwargs: dict) -> dict:
        bar.update(1)
        return kwargs

    for raw, clean, uses in plans:
        results: dict[int, list[Any]] = {s: [] for s in cfg.seeds}
        for cell in cells:
            cell_uses = apply_sweep(uses, cell)
            adapters.use(cell_uses)
            for seeds in batches:
                gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
                negative = ({"negative_prompt": [expand_tokens(pipe, neg_clean)] * len(seeds)} if takes_negative
                            else {})
                images = pipe(prompt=[expand_tokens(pipe, clean)] * len(seeds), **negative, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, width=width,
                              height=height, generator=gens, callback_on_step_end=step_done).images
                for seed, image in zip(seeds, images):
                    params = image_parameters(cfg, sampler, schedule, seed, width, height, cell_uses)
                    tags = " ".join(f"<lora:{u.label}:{u.te_strength:g}:{u.strength:g}>" for u in cell_uses)
                    prompt_text = f"{clean} {tags}".strip()
                    infotext = build_infotext(prompt_text, cfg.negative_prompt, params)
                    path = out / f"{index:05d}-{seed}.png"
                    index += 1
                    save_png(image, path, infotext, _sidecar(cfg, raw, clean, seed, width, height, sampler,
                                                              pipe, cell_uses, cell, infotext))
                    written.append(path)
                    results[seed].append(image)
        if sweeps:
            grids += _write_grids(out, index, results, sweeps, cells, clean, cfg)
            index += len(cfg.seeds)
    bar.close()
    return written + grids


def image_parameters(cfg: GenerateConfig, sampler: str, schedule: str | None, seed: int, width: int, height: int,
                     uses: Sequence[LoraUse]) -> dict[str, object]:
    """The `Key: value` line of the infotext, in A1111's order."""
    hashes = {u.label: u.sha256 for u in uses}
    return {"Steps": cfg.steps, "Sampler": sampler, "Schedule type": schedule, "CFG scale": f"{cfg.guidance_scale:g}",
            "Seed": seed, "Size": f"{width}x{height}", "Model": Path(cfg.model).name if cfg.model else "tiny",
            "Lora hashes": lora_hashes_field(hashes), "Version": f"lora_vision {__version__}"}


def _sidecar(cfg: GenerateConfig, raw: str, clean: str, seed: int, width: int, height: int, sampler: str,
             pipe: Any, uses: Sequence[LoraUse], cell: Sequence[tuple[str, float]], infotext: str) -> dict:
    return {"prompt": clean, "prompt_as_written": raw, "negative_prompt": cfg.negative_prompt, "seed": seed,
            "steps": cfg.steps, "guidance_scale": cfg.guidance_scale, "width": width, "height": height,
            "sampler": sampler, "scheduler": type(pipe.scheduler).__name__, "model": cfg.model,
            "dtype": str(denoiser(pipeline_components(pipe)).dtype).removeprefix("torch."),
            "loras": [{"name": u.label, "file": u.path, "strength": u.strength, "te_strength": u.te_strength,
                       "sha256": u.sha256} for u in uses],
            "sweep_cell": dict(cell), "parameters": infotext, "lora_vision_version": __version__}


def _write_grids(out: Path, index: int, results: dict[int, list[Any]], sweeps: list[tuple[str, list[float]]],
                 cells: list, clean: str, cfg: GenerateConfig) -> list[Path]:
    """One grid per seed: rows follow the first sweep axis, columns the second (or one row for one axis)."""
    paths = []
    ncol = len(sweeps[-1][1])
    for k, (seed, images) in enumerate(results.items()):
        rows = [images[i:i + ncol] for i in range(0, len(images), ncol)]
        col_key, col_vals = sweeps[-1]
        col_labels = [f"{col_key}={v:g}" for v in col_vals]
        row_labels = [f"{sweeps[0][0]}={v:g}" for v in sweeps[0][1]] if len(sweeps) == 2 else [""]
        title = f"{clean[:80]} | seed {seed}"
        grid = make_grid(rows, row_labels, col_labels, title)
        path = out / f"grid-{index + k:05d}-{seed}.png"
        infotext = build_infotext(clean, cfg.negative_prompt, {"Seed": seed, "Steps": cfg.steps, "Sweep": " x ".join(
            f"{key}={','.join(f'{v:g}' for v in vals)}" for key, vals in sweeps)})
        save_png(grid, path, infotext, {"prompt": clean, "seed": seed, "sweeps": dict(sweeps),
                                        "cells": [dict(c) for c in cells], "parameters": infotext})
        paths.append(path)
    return paths
