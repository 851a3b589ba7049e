"""The procedural scenes of the tiny pipeline's pretraining, the subject they must not contain, and the probe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lora_vision.data.shapes import (BACKGROUND_RGB, BACKGROUNDS, COLOURS, SHAPES, SUBJECT_RGB, SUBJECT_WORDS,
                                     caption_of, draw_scenes, draw_subject, to_uint8)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scenes():
    return draw_scenes(96, torch.Generator().manual_seed(0), supersample=1)


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> str:
    names = list(table)
    d = ((np.asarray([table[n] for n in names], dtype=np.float32) - rgb.astype(np.float32)) ** 2).sum(1)
    return names[int(d.argmin())]


def test_labels_are_what_was_drawn(scenes):
    images = to_uint8(scenes.images)
    for i, image in enumerate(images):
        corner = image[:2, :2].reshape(-1, 3).mean(0)
        assert _nearest(corner, BACKGROUND_RGB) == BACKGROUNDS[int(scenes.labels["background"][i])]
        fg = image.reshape(-1, 3)[np.abs(image.reshape(-1, 3).astype(int) - corner).sum(1) > 60]
        assert len(fg) > 20, scenes.captions[i]
        assert _nearest(np.median(fg, 0), COLOURS) == list(COLOURS)[int(scenes.labels["colour"][i])]


def test_captions_say_what_was_drawn(scenes):
    for i, caption in enumerate(scenes.captions):
        labels = {k: int(v[i]) for k, v in scenes.labels.items()}
        assert SHAPES[labels["shape"]] in caption and list(COLOURS)[labels["colour"]] in caption
    full = caption_of(shape=0, colour=0, background=4, size=1, count=0, position=0)
    assert full == "a photo of a large red circle on the left on a green background"
    assert caption_of(1, 6, 2, 0, 2, -1, keep=(False, True, True, False)) == "three small white squares"


def test_scenes_never_show_the_subject():
    s = draw_scenes(256, torch.Generator().manual_seed(1), drop=0.0)
    assert not any(word in c.split() for c in s.captions for word in SUBJECT_WORDS)
    pixels = to_uint8(s.images).reshape(-1, 3).astype(np.float32)
    for name, rgb in SUBJECT_RGB.items():
        # Every scene colour is far from the subject's; only a blended edge pixel (green/blue) comes within 40.
        palette = np.asarray(list(BACKGROUND_RGB.values()), dtype=np.float32)
        assert np.sqrt(((palette - np.asarray(rgb)) ** 2).sum(1)).min() > 80, name
        assert np.sqrt(((pixels - np.asarray(rgb)) ** 2).sum(1)).min() > 30, name


def test_same_seed_same_scenes():
    a = draw_scenes(8, torch.Generator().manual_seed(3))
    b = draw_scenes(8, torch.Generator().manual_seed(3))
    assert torch.equal(a.images, b.images) and a.captions == b.captions


def test_subject_is_drawn_in_its_colours():
    image = draw_subject(96, 64, (0.5, 0.5), 0.3, "green", np.random.default_rng(0)).reshape(-1, 3).astype(np.float32)
    for rgb in SUBJECT_RGB.values():
        assert (np.sqrt(((image - np.asarray(rgb)) ** 2).sum(1)) < 10).sum() > 50


def test_shipped_probe_reads_scenes_and_instance_backgrounds():
    from PIL import Image

    from lora_vision.training.sd.metrics import load_probe, predict

    probe = load_probe()
    s = draw_scenes(64, torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = probe(s.images)
    for head in ("shape", "colour", "background"):
        assert (logits[head].argmax(1) == s.labels[head]).float().mean() > 0.95, head
    folder = REPO / "samples" / "instance"
    images = [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.jpg"))]
    asked = [p.with_suffix(".txt").read_text().split(" on a ")[1].split()[0] for p in sorted(folder.glob("*.jpg"))]
    assert predict(probe, images)["background"] == asked


def test_missing_probe_is_a_clear_error(tmp_path):
    from lora_vision.training.sd.metrics import load_probe

    with pytest.raises(FileNotFoundError, match="pretrain_tiny_sd.py"):
        load_probe(tmp_path / "nope.safetensors")


class _ClassPromptPipe:
    """Stands in for the tiny pipeline: the class prompt gives scene `seed + shift` of a fixed pool (the first call
    is the base, later calls the adapter, with `after_shift`); with `collapse`, the adapter draws the subject."""

    def __init__(self, pool, instance, class_prompt: str, after_shift: int, collapse: bool = False) -> None:
        self.pool, self.instance, self.class_prompt = pool, instance, class_prompt
        self.after_shift, self.collapse, self.calls = after_shift, collapse, 0

    def __call__(self, prompts, num_inference_steps, height, width, generator, guidance_scale, output_type):
        import argparse

        after = self.calls > 0
        self.calls += 1
        images = []
        for prompt, g in zip(prompts, generator):
            seed = g.initial_seed()
            if prompt != self.class_prompt or (after and self.collapse):
                images.append(self.instance[seed % len(self.instance)])
            else:
                images.append(self.pool[(seed + (self.after_shift if after else 0)) % len(self.pool)])
        return argparse.Namespace(images=images)


def test_prior_drift_is_class_images_turning_into_the_subject_not_seeds_reshuffled():
    """The class prompt giving other images for the same seeds, from the same set, is no drift (prior preservation
    keeps the distribution); the class prompt drawing the subject is."""
    from PIL import Image

    from lora_vision.training.sd.metrics import MetricPlan, dreambooth_metrics, load_probe

    probe = load_probe()
    plan = MetricPlan(trigger="a photo of sks toy", class_prompt="a photo of a toy")
    pool = [Image.fromarray(im) for im in to_uint8(draw_scenes(len(plan.class_seeds),
                                                               torch.Generator().manual_seed(3)).images)]
    instance = [Image.open(p).convert("RGB") for p in sorted((REPO / "samples" / "instance").glob("*.jpg"))]

    same_set = dreambooth_metrics(_ClassPromptPipe(pool, instance, plan.class_prompt, 5), [], instance, plan, probe)
    assert same_set["class_change"] > 0.05  # every seed's image changed ...
    assert abs(same_set["prior_drift"]) < 1e-5  # ... but the class still looks as it did
    collapsed = dreambooth_metrics(_ClassPromptPipe(pool, instance, plan.class_prompt, 0, collapse=True), [],
                                   instance, plan, probe)
    assert collapsed["prior_drift"] > 0.1
