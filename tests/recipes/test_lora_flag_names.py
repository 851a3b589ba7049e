"""Both recipes spell the LoRA settings alike (--rank, --lora_alpha, --lora_dropout, --rank_pattern, --targets);
the older spellings (--lora_rank, --lora_targets) still work, as flags and as YAML keys, and --help names both."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lora_vision.lora.config import ConfigError

REPO = Path(__file__).resolve().parents[2]
SD_ARGS = ["--pretrained_model_name_or_path", "tiny-sd1", "--instance_data_dir", str(REPO / "samples" / "instance"),
           "--instance_prompt", "a photo of sks toy"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_flag_names", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def parsers():
    """recipe -> (parse function, the arguments every parse needs, the config field of --targets)."""
    sd, vit = _script("train_sd"), _script("train_vit")
    return {"sd": (sd.parse, SD_ARGS, "unet_targets"), "vit": (vit.parse_args, [], "targets")}


@pytest.mark.parametrize("recipe", ["sd", "vit"])
@pytest.mark.parametrize("rank_flag,targets_flag", [("rank", "targets"), ("lora_rank", "lora_targets")])
def test_both_recipes_take_the_same_lora_flags(parsers, recipe, rank_flag, targets_flag, tmp_path):
    parse, base, field = parsers[recipe]
    targets = {"sd": "to_q,to_v", "vit": "query,value"}[recipe]
    cfg = parse(base + [f"--{rank_flag}", "6", "--lora_alpha", "3", "--lora_dropout", "0.1",
                        f"--{targets_flag}", targets, "--rank_pattern", '{"to_q": 2}'])
    assert (cfg.rank, cfg.lora_alpha, cfg.lora_dropout, cfg.rank_pattern) == (6, 3.0, 0.1, {"to_q": 2})
    assert _joined(getattr(cfg, field)) == targets
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"{rank_flag}: 5\n{targets_flag}: {targets}\n")
    cfg = parse(base + ["--config", str(yaml_file)])
    assert cfg.rank == 5 and _joined(getattr(cfg, field)) == targets


def _joined(targets: tuple[str, ...] | str) -> str:  # SD keeps a tuple, ViT the comma-separated text
    return ",".join(targets) if isinstance(targets, tuple) else targets


@pytest.mark.parametrize("recipe", ["sd", "vit"])
def test_an_alias_and_its_name_together_are_refused(parsers, recipe):
    parse, base, _ = parsers[recipe]
    with pytest.raises(ConfigError, match="lora_rank and rank are the same setting; give only --rank"):
        parse(base + ["--lora_rank", "4", "--rank", "8"])
    if recipe == "sd":  # two other names of the UNet's targets
        with pytest.raises(ConfigError, match="lora_targets and targets are the same setting; give only "
                                              "--unet_targets"):
            parse(base + ["--lora_targets", "to_q", "--targets", "to_v"])


@pytest.mark.parametrize("recipe", ["sd", "vit"])
def test_help_shows_the_name_and_its_aliases(parsers, recipe, capsys):
    parse, _, _ = parsers[recipe]
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--rank RANK LoRA rank" in text and "also accepted as --lora_rank" in text
    assert "--lora_rank LORA_RANK the same as --rank" in text
    targets = {"sd": "--unet_targets UNET_TARGETS", "vit": "--targets TARGETS"}[recipe]
    assert targets in text and "also accepted as --lora_targets" in text
