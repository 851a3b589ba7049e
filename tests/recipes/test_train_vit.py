"""scripts/train_vit.py and scripts/eval_vit.py end to end on tiny ViTs and generated image folders."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lora_vision.data.synthetic import make_pattern_folder, write_blank_png
from lora_vision.io import read_safetensors

REPO = Path(__file__).resolve().parents[2]
BASE = str(REPO / "samples" / "vit" / "tiny-vit-patterns")  # tiny ViT pretrained on procedural patterns


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


train_vit, eval_vit = _script("train_vit"), _script("eval_vit")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vitdata")
    make_pattern_folder(root / "train", classes=("hstripes", "vstripes", "checker", "rings"), per_class=16, size=32,
                        seed=1)
    return root / "train"


def _run(out: Path, data: Path, *extra: str) -> dict:
    args = ["--train_dir", str(data), "--output_dir", str(out), "--dataloader_num_workers", "0",
            "--per_device_train_batch_size", "16", "--logging_steps", "1", *extra]
    assert train_vit.main(args) == 0
    return json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}


@pytest.mark.parametrize("mode", ["lora", "full", "linear-probe"])
def test_three_modes_end_to_end(mode: str, data: Path, tmp_path: Path) -> None:
    m = _run(tmp_path, data, "--model_name_or_path", "tiny-hf", "--mode", mode, "--max_train_steps", "3",
             "--save_merged", "true", "--rank_pattern", '{"re:.*layers\\\\.1\\\\..*": 2}')
    assert m["steps"] == 3 and len(m["history"]) == 1 and 0 <= m["top1"] <= 100 and m["images_per_s"] > 0
    if mode == "lora":
        assert (tmp_path / "adapter.safetensors").is_file() and (tmp_path / "peft" / "adapter_config.json").is_file()
        assert (tmp_path / "merged" / "model.safetensors").is_file()
        tensors, meta = read_safetensors(tmp_path / "adapter.safetensors")
        assert tensors["model.vit.layers.1.attention.q_proj.lora_A.weight"].shape[0] == 2  # --rank_pattern
        assert tensors["model.vit.layers.0.attention.q_proj.lora_A.weight"].shape[0] == 8
        assert "full.model.classifier.weight" in tensors and json.loads(meta["lora_vision.classes"])[0] == "checker"
        assert m["trainable"] < m["total"] * 0.3
    elif mode == "full":
        assert m["trainable"] == m["total"] and (tmp_path / "model" / "model.safetensors").is_file()
    else:
        assert m["trainable"] == 32 * 4 + 4 and (tmp_path / "head.safetensors").is_file()


@pytest.mark.parametrize("pure_bf16", ["false", "true"])
def test_resume_equals_unbroken_run(pure_bf16: str, data: Path, tmp_path: Path) -> None:
    common = ["--model_name_or_path", "tiny-timm", "--max_train_steps", "7", "--lora_dropout", "0.1",
              "--checkpointing_steps", "2", "--checkpoints_total_limit", "10", "--gradient_accumulation_steps", "2",
              "--save_peft", "false", "--pure_bf16", pure_bf16]
    full = _run(tmp_path / "a", data, *common)
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4",
                                                                            "checkpoint-6"]
    # restart from a mid-epoch checkpoint (4 optimizer steps = 8 micro-batches of 16; an epoch has 4 micro-batches)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-6", tmp_path / "b" / "checkpoint-6")
    state = json.loads((tmp_path / "b" / "checkpoint-6" / "state.json").read_text())
    assert state["batch_in_epoch"] == 0 and state["epoch"] == 3  # step 6 ends epoch 3: saved after its evaluation
    shutil.rmtree(tmp_path / "b" / "checkpoint-6")
    shutil.copytree(tmp_path / "a" / "checkpoint-4", tmp_path / "b" / "checkpoint-4")
    resumed = _run(tmp_path / "b", data, *common, "--resume_from_checkpoint", "latest")
    a, _ = read_safetensors(tmp_path / "a" / "adapter.safetensors")
    b, _ = read_safetensors(tmp_path / "b" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["history"] == full["history"] and resumed["steps"] == 7


def test_resume_into_another_setup_is_refused(data: Path, tmp_path: Path) -> None:
    _run(tmp_path, data, "--model_name_or_path", "tiny-hf", "--max_train_steps", "4", "--checkpointing_steps", "2",
         "--save_peft", "false")
    with pytest.raises(ValueError, match="does not fit this run"):
        _run(tmp_path, data, "--model_name_or_path", "tiny-hf", "--max_train_steps", "4", "--lora_rank", "2",
             "--resume_from_checkpoint", "latest", "--save_peft", "false")


def test_compare_writes_table_json_and_plot(data: Path, tmp_path: Path) -> None:
    _run(tmp_path, data, "--model_name_or_path", "tiny-hf", "--compare", "--max_train_steps", "2")
    table = (tmp_path / "compare.md").read_text()
    assert all(m in table for m in ("| lora |", "| full |", "| linear-probe |")) and "images/s" in table
    res = json.loads((tmp_path / "compare.json").read_text())
    assert res["lora"]["trainable"] < res["full"]["trainable"] and res["linear-probe"]["artifact_bytes"] > 0
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_time_to_the_first_step_is_printed_once(data: Path, tmp_path: Path, capsys) -> None:
    _run(tmp_path, data, "--model_name_or_path", "tiny-hf", "--max_train_steps", "2")
    lines = [line for line in capsys.readouterr().out.splitlines() if "first step done" in line]
    assert len(lines) == 1, lines
    m = re.fullmatch(r"\[lora\] first step done ([\d.]+) s after start \(imports and setup ([\d.]+) s, first step "
                     r"([\d.]+) s\)", lines[0])
    assert m and float(m[1]) >= float(m[2]) > 0, lines[0]


def test_bad_input_is_reported(data: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="2 of 3 requested classes are missing.*n01440764, zebra"):
        _run(tmp_path, data, "--classes", "rings,n01440764,zebra")
    with pytest.raises(ValueError, match="tv-vit-attn' is for a torchvision"):
        _run(tmp_path, data, "--lora_targets", "tv-vit-attn")
    with pytest.raises(ValueError, match="mode='lroa'"):
        _run(tmp_path, data, "--mode", "lroa")


def test_skip_corrupt_alone_trains_past_unreadable_images(data: Path, tmp_path: Path) -> None:
    train = shutil.copytree(data, tmp_path / "train")
    (train / "rings" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    write_blank_png(train / "checker" / "bomb.png", 20000, 20000)
    base = ("--model_name_or_path", "tiny-hf", "--max_train_steps", "1", "--per_device_train_batch_size", "80",
            "--per_device_eval_batch_size", "80")  # one batch holds every image: both bad files are met
    with pytest.raises(ValueError) as err:  # stops at the first unreadable image, even from a DataLoader worker
        _run(tmp_path / "stop", train, *base, "--dataloader_num_workers", "1")
    assert "\n" not in str(err.value) and "--skip_corrupt" in str(err.value)
    assert "broken.jpg: not a readable image" in str(err.value) or "bomb.png: too large" in str(err.value)
    with pytest.warns(UserWarning) as caught:
        m = _run(tmp_path / "skip", train, *base, "--skip_corrupt", "true")
    messages = " ".join(str(w.message) for w in caught)
    assert m["steps"] == 1 and "skipping image" in messages and "broken.jpg" in messages and "bomb.png" in messages


def test_lora_learns_as_well_as_full_fine_tuning(tmp_path: Path) -> None:
    """Real signal: new images of 4 pattern classes, a new head; LoRA within 2 points of full, <10% of its params;
    the LoRA variants (PiSSA, OLoRA, LoRA+, DoRA, LoKr) and the linear probe are reported (docs/benchmarks.md has the table)."""
    make_pattern_folder(tmp_path / "train", ("hstripes", "vstripes", "checker", "rings"), per_class=24, seed=11)
    make_pattern_folder(tmp_path / "val", ("hstripes", "vstripes", "checker", "rings"), per_class=50, seed=12)
    common = ["--model_name_or_path", BASE, "--validation_dir", str(tmp_path / "val"), "--max_train_steps", "48",
              "--per_device_train_batch_size", "16", "--augment", "false", "--seed", "0"]
    lora = _run(tmp_path / "lora", tmp_path / "train", *common, "--mode", "lora", "--lora_targets", "hf-vit-attn-mlp",
                "--lora_rank", "2", "--learning_rate", "1e-2", "--save_peft", "false")
    full = _run(tmp_path / "full", tmp_path / "train", *common, "--mode", "full", "--learning_rate", "1e-3")
    runs = {"lora": lora, "full": full}
    variants = {"lora-pissa": ["--init", "pissa"], "lora-olora": ["--init", "olora"],
                "lora-loraplus": ["--loraplus_lr_ratio", "16", "--learning_rate", "2e-3"],
                "lora-dora": ["--adapter_type", "dora"], "lora-lokr": ["--adapter_type", "lokr"]}
    # Reduced runs (24 steps, half of the above) keep the test short; the margin for them is "learns": >= 50%
    # (chance 25%). The full-length table is benchmarks/bench_vit_variants.py's, in docs/benchmarks.md.
    short = [*common, "--max_train_steps", "24"]
    for name, extra in variants.items():  # the variants at LoRA's settings (LoRA+: B at 16x a 5x lower rate)
        args = ["--learning_rate", "1e-2", *extra] if "--learning_rate" not in extra else extra
        runs[name] = _run(tmp_path / name, tmp_path / "train", *short, "--mode", "lora", "--lora_targets",
                          "hf-vit-attn-mlp", "--lora_rank", "2", "--save_peft", "false", *args)
    runs["linear-probe"] = _run(tmp_path / "probe", tmp_path / "train", *short, "--mode", "linear-probe",
                                "--learning_rate", "1e-2")
    for name, r in runs.items():
        print(f"{name}: top-1 {r['top1']:.1f}% ({r['trainable']:,} trainable parameters)")
    assert lora["trainable"] < 0.10 * full["trainable"]
    assert all(runs[v]["top1"] >= 50.0 for v in variants), runs  # every variant learns (chance: 25%)
    assert full["top1"] >= 75.0, full["history"]  # far above chance (25%)
    assert lora["top1"] >= full["top1"] - 2.0, (lora["history"], full["history"])


def test_eval_script_reproduces_training_metrics(data: Path, tmp_path: Path, capsys) -> None:
    m = _run(tmp_path, data, "--model_name_or_path", BASE, "--max_train_steps", "6")
    for extra in ([], ["--merge"]):
        assert eval_vit.main(["--adapter", str(tmp_path / "adapter.safetensors"), "--train_dir", str(data),
                              "--dataloader_num_workers", "0", "--output_json", str(tmp_path / "e.json"), *extra]) == 0
        e = json.loads((tmp_path / "e.json").read_text())
        assert e["top1"] == pytest.approx(m["top1"]) and e["n"] == m["val_images"]
    assert eval_vit.main(["--adapter", str(tmp_path / "peft"), "--model_name_or_path", BASE, "--train_dir", str(data),
                          "--dataloader_num_workers", "0", "--output_json", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["top1"] == pytest.approx(m["top1"])
    with pytest.raises(ValueError, match="classifier.weight: adapter has shape"):
        eval_vit.main(["--adapter", str(tmp_path / "adapter.safetensors"), "--train_dir", str(data),
                       "--classes", "rings,checker", "--dataloader_num_workers", "0"])


def test_bf16_mixed_precision_run_and_shipped_config(data: Path, tmp_path: Path) -> None:
    m = _run(tmp_path, data, "--model_name_or_path", "tiny-timm", "--mixed_precision", "bf16", "--max_train_steps", "2")
    assert m["steps"] == 2 and (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    tensors, _ = read_safetensors(tmp_path / "adapter.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())  # trained weights stay fp32 (bf16 base only)
    m = _run(tmp_path / "pure", data, "--model_name_or_path", "tiny-hf", "--pure_bf16", "--max_train_steps", "2")
    tensors, _ = read_safetensors(tmp_path / "pure" / "adapter.safetensors")
    assert m["steps"] == 2 and all(t.dtype == torch.float32 for t in tensors.values())  # the fp32 master copies
    cfg = train_vit.parse_args(["--config", str(REPO / "configs" / "vit_imagenette_lora.yaml")])
    assert cfg.subset == "imagenette" and cfg.mixed_precision == "bf16" and cfg.lr() == 5e-3
    with pytest.raises(ValueError, match="base_dtype=bfloat16 needs --mixed_precision"):
        train_vit.parse_args(["--base_dtype", "bfloat16"])


def test_flags_are_checked_before_loading(tmp_path: Path) -> None:
    from lora_vision.lora.config import ConfigError

    with pytest.raises(ConfigError) as err:  # a model that does not exist: nothing was loaded before the check
        train_vit.parse_args(["--model_name_or_path", str(tmp_path / "none"), "--seed", "-5", "--lr_scheduler_type",
                              "cosin", "--lora_targets", "hf-vit-atn", "--num_warmup_steps", "-3",
                              "--rank_pattern", "notjson", "--train_val_split", "1.5"])
    text = str(err.value)
    assert "seed=-5" in text and "lr_scheduler_type='cosin'" in text and "num_warmup_steps=-3" in text
    assert "'hf-vit-atn' is not a known preset (did you mean 'hf-vit-attn'?)" in text
    assert "rank_pattern='notjson': not valid JSON" in text and "train_val_split=1.5" in text


def test_new_head_replaces_the_size_mismatch_table(capfd) -> None:
    from lora_vision.models.vit import load_vit

    load_vit(BASE, 3, None, ["a", "b", "c"])
    out, err = capfd.readouterr()
    assert "MISMATCH" not in out + err and "LOAD REPORT" not in out + err and "num_labels" not in out + err
    assert "new classification head for 3 classes (the checkpoint's has 8)" in out


def test_eval_reads_the_base_model_of_a_peft_folder(data: Path, tmp_path: Path) -> None:
    m = _run(tmp_path, data, "--model_name_or_path", BASE, "--max_train_steps", "2", "--save_peft", "true")
    assert eval_vit.main(["--adapter", str(tmp_path / "peft"), "--train_dir", str(data),  # no --model_name_or_path
                          "--dataloader_num_workers", "0", "--output_json", str(tmp_path / "p.json")]) == 0
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["model"] == BASE and result["top1"] == pytest.approx(m["top1"])


@pytest.mark.parametrize("model", ["tiny-timm", "tiny-torchvision"])
def test_weight_init_on_fused_attention_exports_files_that_give_the_trained_model(model: str, data: Path,
                                                                                   tmp_path: Path) -> None:
    """--init pissa on timm's fused qkv and torchvision's nn.MultiheadAttention (part by part): the adapter file
    and the peft folder on the ORIGINAL base give what the recipe trained (its merged/ model)."""
    from peft import PeftModel

    from lora_vision.adapter import Adapter
    from lora_vision.models.vit import load_vit

    _run(tmp_path, data, "--model_name_or_path", model, "--init", "pissa", "--max_train_steps", "3",
         "--learning_rate", "1e-2", "--save_merged", "true")
    adapter = Adapter.load(tmp_path / "adapter.safetensors")
    classes = json.loads(adapter.metadata["lora_vision.classes"])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def fresh():
        return load_vit(model, len(classes), None, classes).model.eval()

    trained = fresh()
    trained.load_state_dict(read_safetensors(tmp_path / "merged" / "model.safetensors")[0])  # head included
    ours = fresh()
    adapter.apply_to({"model": ours})
    theirs = PeftModel.from_pretrained(fresh(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        want = trained(x)
        torch.testing.assert_close(ours(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(x), want, atol=1e-5, rtol=1e-5)
        assert (want - fresh()(x)).abs().max() > 1e-4  # trained away from the base
