"""Our metadata keys are spelled in lora_vision/metadata.py only: the typed fields read the strings the recipes and
tools have always written, give the same strings back, and keep malformed values as they are."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import lora_vision
from lora_vision.metadata import AdapterMetadata

ROOT = Path(lora_vision.__file__).resolve().parents[1]

# Exactly as the SD and ViT recipes, resize, merge and extract wrote them before the typed fields existed.
WRITTEN = {
    "lora_vision.format": "1", "lora_vision.base": "sd2-v", "lora_vision.base_model": "tiny-sd2",
    "lora_vision.trigger_phrase": "a photo of sks toy", "lora_vision.rank": "4", "lora_vision.alpha": "8.0",
    "lora_vision.targets": json.dumps({"unet": "unet-attn", "text_encoder": ["q_proj", "v_proj"]}),
    "lora_vision.steps": "3", "lora_vision.training_config": json.dumps({"resolution": 64, "rank": 4}),
    "lora_vision.family": "hf", "lora_vision.mode": "lora", "lora_vision.classes": json.dumps(["checker", "dots"]),
    "lora_vision.preprocessing": json.dumps({"size": 32, "mean": [0.5, 0.5, 0.5]}), "lora_vision.top1": "",
    "lora_vision.resized": "energy=0.99", "lora_vision.merged_from": "2", "lora_vision.extracted": "1",
    "modelspec.trigger_phrase": "a photo of sks toy", "ss_output_name": "toy",
}


def test_typed_fields_read_the_written_strings_and_give_them_back() -> None:
    info = AdapterMetadata.from_strings(WRITTEN)
    assert (info.rank, info.alpha, info.steps, info.merged_from, info.extracted) == (4, 8.0, 3, 2, True)
    assert info.trigger_phrase == "a photo of sks toy" and info.base_model == "tiny-sd2" and info.top1 == ""
    assert info.classes == ["checker", "dots"] and info.training_config["resolution"] == 64
    assert info.targets["text_encoder"] == ["q_proj", "v_proj"] and info.preprocessing["size"] == 32
    assert info.extra == {"modelspec.trigger_phrase": "a photo of sks toy", "ss_output_name": "toy"}
    assert info.to_strings() == WRITTEN
    assert AdapterMetadata(alpha=4).to_strings() == {"lora_vision.alpha": "4"}  # an int alpha stays "4"


def test_malformed_values_of_our_keys_stay_strings_in_extra() -> None:
    bad = {"lora_vision.rank": "four", "lora_vision.alpha": "", "lora_vision.classes": "[unclosed",
           "lora_vision.extracted": "yes", "lora_vision.components": "5", "lora_vision.scaling": "[1]"}
    info = AdapterMetadata.from_strings(bad)
    assert info.rank is None and info.classes is None and info.extracted is None and info.components == ()
    assert info.extra == bad and info.to_strings() == bad


def _literal_keys(path: Path) -> list[str]:
    modules = {p.stem for p in (ROOT / "lora_vision").iterdir() if p.suffix == ".py" or p.is_dir()}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("lora_vision."):
            head = node.value[len("lora_vision."):].split(".")[0].split("/")[0]
            if head not in modules:  # lora_vision.commands.x is a module path, not a metadata key
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    return found


def test_no_metadata_key_is_spelled_outside_the_metadata_module() -> None:
    files = [p for p in (ROOT / "lora_vision").rglob("*.py") if p.name != "metadata.py"]
    files += sorted((ROOT / "scripts").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    found = [hit for f in files for hit in _literal_keys(f)]
    assert not found, "use lora_vision.metadata (AdapterMetadata fields or its *_KEY constants):\n" + "\n".join(found)
