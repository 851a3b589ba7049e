"""DreamBooth quality metrics for the tiny pretrained pipeline, offline counterparts of the DreamBooth paper's.

The paper (Ruiz et al. 2023, https://arxiv.org/abs/2208.12242, section 4.1) scores subject fidelity with DINO
features (mean cosine similarity of generated images to the real subject images) and prompt fidelity with CLIP.
Here a small CNN trained on the procedural scenes of `lora_vision.data.shapes` (the "shape probe", shipped in
samples/tiny-sd-probe/) stands in for both: its pooled features play DINO, and its background head checks that the
context in the prompt ("... on a green background") still appears. Prior drift is the language drift that prior
preservation is there to prevent, measured as the paper's PRES is (section 4.3): how much more the images of the
class prompt ("a photo of a toy") look like the subject with the adapter than with the base model (mean cosine
similarity of their probe features to the instance images, adapter minus base). Prior preservation keeps the class
*distribution*, not the image each seed gives: how far each seed's image moves (`class_change`, also recorded) is
large with or without it on this 10-step sampler (docs/benchmarks.md, "Tiny DreamBooth quality").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from ...data.images import list_images, load_image
from ...data.shapes import BACKGROUNDS, COLOURS, COUNTS, POSITIONS, SHAPES, SIZES
from ...io import atomic_write_text, read_safetensors, write_safetensors
from ...lora.ops import set_strength
from ...metadata import PROBE_KEY
from .samples import generate_images

PROBE_HEADS: dict[str, int] = {"shape": len(SHAPES), "colour": len(COLOURS), "background": len(BACKGROUNDS),
                               "size": len(SIZES), "count": len(COUNTS), "position": len(POSITIONS)}
PROBE_RESOLUTION = 64
DEFAULT_PROBE = Path(__file__).resolve().parents[3] / "samples" / "tiny-sd-probe" / "probe.safetensors"


class ShapeProbe(nn.Module):
    """Five 3x3 conv stages (64 -> 4 px) and a pooled feature vector, with one linear head per scene attribute."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(chans, chans[1:])):
            layers += [nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.width = width
        self.heads = nn.ModuleDict({k: nn.Linear(4 * width, n) for k, n in PROBE_HEADS.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, 64, 64) images in [-1, 1] -> (N, 4 * width) pooled features."""
        return self.body(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every head."""
        f = self.features(images)
        return {k: head(f) for k, head in self.heads.items()}


def save_probe(probe: ShapeProbe, path: str | Path) -> Path:
    """Write the probe's weights (float32 safetensors, atomically) with its width in the metadata."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in probe.state_dict().items()}
    write_safetensors(path, tensors, metadata={PROBE_KEY: json.dumps({"width": probe.width})})
    return Path(path)


def load_probe(path: str | Path | None = None) -> ShapeProbe:
    """The shape probe from `path` (default: samples/tiny-sd-probe/probe.safetensors of this checkout), in eval mode."""
    path = Path(path or DEFAULT_PROBE)
    if not path.is_file():
        raise FileNotFoundError(f"the shape probe {str(path)!r} does not exist; expected the file written by "
                                "scripts/pretrain_tiny_sd.py (samples/tiny-sd-probe/probe.safetensors)")
    tensors, metadata = read_safetensors(path)
    width = json.loads(metadata.get(PROBE_KEY, "{}")).get("width", 32)
    probe = ShapeProbe(int(width))
    probe.load_state_dict(tensors)
    return probe.eval()


def images_to_tensor(images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    """PIL images or uint8 arrays -> (N, 3, 64, 64) float in [-1, 1] (centre-cropped and resized when another size)."""
    out = []
    for im in images:
        im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
        im = im.convert("RGB")
        if im.size != (PROBE_RESOLUTION, PROBE_RESOLUTION):
            im = ImageOps.fit(im, (PROBE_RESOLUTION, PROBE_RESOLUTION), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(out)


@torch.no_grad()
def _features(probe: ShapeProbe, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
    return nn.functional.normalize(probe.features(images_to_tensor(images)), dim=1)


@torch.no_grad()
def predict(probe: ShapeProbe, images: Sequence[Image.Image | np.ndarray]) -> dict[str, list[str]]:
    """The probe's reading of each image: {"background": ["green", ...], "colour": [...], "shape": [...], ...}."""
    logits = probe(images_to_tensor(images))
    names = {"shape": SHAPES, "colour": tuple(COLOURS), "background": BACKGROUNDS, "size": SIZES, "count": COUNTS,
             "position": tuple(POSITIONS)}
    return {k: [names[k][i] for i in v.argmax(1).tolist()] for k, v in logits.items()}


def subject_fidelity(probe: ShapeProbe, generated: Sequence[Image.Image], instance: Sequence[Image.Image]) -> float:
    """Mean cosine similarity of probe features over all (generated, instance) pairs (the paper's DINO score)."""
    return float((_features(probe, generated) @ _features(probe, instance).T).mean())


def prompt_fidelity(probe: ShapeProbe, generated: Sequence[Image.Image], backgrounds: Sequence[str]) -> float:
    """Fraction of images whose background, as the probe reads it, is the one their prompt asked for."""
    seen = predict(probe, generated)["background"]
    return float(np.mean([a == b for a, b in zip(seen, backgrounds)]))


def image_change(probe: ShapeProbe, before: Sequence[Image.Image], after: Sequence[Image.Image]) -> float:
    """1 - mean cosine similarity of paired images (same prompt and seed) before and after training."""
    return float(1.0 - (_features(probe, before) * _features(probe, after)).sum(1).mean())


@dataclass(frozen=True)
class MetricPlan:
    """What to generate: the trigger phrase in each context, the class prompt, seeds and sampler steps."""

    trigger: str
    contexts: tuple[str, ...] = ("green", "red", "white", "blue")
    class_prompt: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    # 16 class-prompt images: with 3 the drift's seed-to-seed spread hid the effect. Seeds from 1000 on: the class
    # images of a run with --seed 0 use seeds 0, 1, 2, ..., so those would score images the prior loss trained on.
    class_seeds: tuple[int, ...] = tuple(range(1000, 1016))
    steps: int = 10
    resolution: int = 64

    def prompts(self) -> list[str]:
        """The trigger phrase on each context's background."""
        return [f"{self.trigger} on a {c} background" for c in self.contexts]


def dreambooth_metrics(pipe, models: Sequence[nn.Module], instance: Sequence[Image.Image], plan: MetricPlan,
                       probe: ShapeProbe | None = None) -> dict[str, float]:
    """Subject fidelity, prompt fidelity and prior drift of the LoRA in `models` against the base (strength 0).

    Returns {"subject_fidelity_base", "subject_fidelity", "prompt_fidelity_base", "prompt_fidelity"} and, when
    plan.class_prompt is set, {"class_subject_similarity_base", "class_subject_similarity", "prior_drift" (their
    difference), "class_change"}; strengths are set back to 1 afterwards.
    """

    probe = probe or load_probe()
    prompts = [p for p in plan.prompts() for _ in plan.seeds]
    seeds = [s for _ in plan.contexts for s in plan.seeds]
    backgrounds = [c for c in plan.contexts for _ in plan.seeds]
    n_ctx = len(prompts)
    if plan.class_prompt:
        prompts += [plan.class_prompt] * len(plan.class_seeds)
        seeds += list(plan.class_seeds)
    images = {}
    try:
        for strength in (0.0, 1.0):
            for m in models:
                set_strength(m, strength)
            images[strength] = generate_images(pipe, prompts, seeds, plan.steps, plan.resolution)
    finally:
        for m in models:
            set_strength(m, 1.0)
    out = {
        "subject_fidelity_base": subject_fidelity(probe, images[0.0][:n_ctx], instance),
        "subject_fidelity": subject_fidelity(probe, images[1.0][:n_ctx], instance),
        "prompt_fidelity_base": prompt_fidelity(probe, images[0.0][:n_ctx], backgrounds),
        "prompt_fidelity": prompt_fidelity(probe, images[1.0][:n_ctx], backgrounds),
    }
    if plan.class_prompt:
        before, after = images[0.0][n_ctx:], images[1.0][n_ctx:]
        out["class_subject_similarity_base"] = subject_fidelity(probe, before, instance)
        out["class_subject_similarity"] = subject_fidelity(probe, after, instance)
        out["prior_drift"] = out["class_subject_similarity"] - out["class_subject_similarity_base"]
        out["class_change"] = image_change(probe, before, after)
    return out


def applies_to(model: str | None) -> bool:
    """Whether the probe can judge this base model: only the pretrained tiny pipeline draws its scenes."""
    return model in (None, "tiny")


def tiny_run_metrics(pipe, models: Sequence[nn.Module], instance_dir: str | Path, trigger: str,
                     class_prompt: str | None, steps: int, resolution: int, out_dir: str | Path) -> dict[str, float]:
    """The metrics of a finished run on the tiny base, written atomically to OUT_DIR/metrics.json and returned."""

    instance = [im for im in (load_image(p) for p in list_images(instance_dir)) if im is not None]
    plan = MetricPlan(trigger=trigger, class_prompt=class_prompt, steps=steps, resolution=resolution)
    metrics = dreambooth_metrics(pipe, models, instance, plan)
    record = dict(metrics, contexts=list(plan.contexts), seeds=list(plan.seeds), class_prompt=class_prompt,
                  class_seeds=list(plan.class_seeds) if class_prompt else [], trigger=trigger)
    atomic_write_text(Path(out_dir) / "metrics.json", json.dumps(record, indent=1) + "\n")
    return metrics


def format_metrics(metrics: dict[str, float]) -> str:
    """One line per metric, base -> adapter where both exist."""
    lines = [f"subject fidelity {metrics['subject_fidelity_base']:.3f} (base) -> {metrics['subject_fidelity']:.3f}",
             f"prompt fidelity  {metrics['prompt_fidelity_base']:.3f} (base) -> {metrics['prompt_fidelity']:.3f}"]
    if "prior_drift" in metrics:
        lines.append(f"prior drift      {metrics['prior_drift']:+.3f} (class-prompt images' similarity to the subject "
                     f"{metrics['class_subject_similarity_base']:.3f} (base) -> "
                     f"{metrics['class_subject_similarity']:.3f})")
    return "\n".join(lines)
