"""The benchmark method (issue #17): the shared rounds and report of benchmarks/timing.py, and one CPU smoke run per
timing script so the scripts do not rot (tiny models, one round; the slow ones are marked slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


timing = _load("timing")


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_round_orders_are_seeded_shuffles_and_each_variant_leads_as_often_as_it_trails():
    orders = timing.round_orders(["a", "b", "c"], 6, seed=3)
    assert orders == timing.round_orders(["a", "b", "c"], 6, seed=3)
    assert all(sorted(o) == ["a", "b", "c"] for o in orders)
    for r in range(1, 6, 2):
        assert orders[r] == orders[r - 1][::-1]
    firsts = [o[0] for o in orders]
    lasts = [o[-1] for o in orders]
    assert sorted(firsts) == sorted(lasts)
    with pytest.raises(ValueError, match="--rounds 1 or more"):
        timing.round_orders(["a"], 0)


def test_interleave_runs_every_variant_once_per_round_in_the_round_order():
    calls: list[str] = []
    values = timing.interleave({k: (lambda k=k: calls.append(k) or len(calls)) for k in "ab"}, 4, progress=False)
    assert [sorted(calls[i:i + 2]) for i in range(0, 8, 2)] == [["a", "b"]] * 4
    assert calls[:2] == timing.round_orders("ab", 4)[0]
    assert {k: len(v) for k, v in values.items()} == {"a": 4, "b": 4}


def test_summary_gives_ratio_of_medians_and_median_of_per_round_ratios():
    # a drifting machine: both variants slow down together; b is 2x a in every round
    a = [1.0, 2.0, 4.0, 8.0, 16.0]
    values = {"a": a, "b": [2 * v for v in a]}
    s = timing.summarize(values, {"b": "a"})
    assert s["b"]["median_ratio"] == 2.0 and s["b"]["ratio_min"] == s["b"]["ratio_max"] == 2.0
    assert s["b"]["ratio_of_medians"] == 2.0
    assert (s["a"]["min"], s["a"]["max"], s["a"]["median"]) == (1.0, 16.0, 4.0)
    table = timing.markdown_table(values, "ms", {"b": "a"}, {"a": {"mode": "x"}})
    assert "| b |  | 8.00 | 2.00-32.00 |" in table and "2.000x (2.000-2.000)" in table


def test_command_line_is_quoted_for_the_shell():
    assert timing.command_line(["benchmarks/x.py", "--variants", "a b"]) == "python benchmarks/x.py --variants 'a b'"


def test_train_log_table_groups_rounds_and_compares_ours_with_the_reference(tmp_path):
    log = tmp_path / "bench.log"
    lines = []
    for r, (ref, ours) in enumerate([(1.0, 5.0), (2.0, 9.0)]):
        lines += [f"== ref_bs4@r{r}", f"STEPS ref n=10 steps_per_s={ref} peak_alloc_gib=9.0",
                  f"== ours_bs4@r{r}", f"STEPS ours n=10 median_s=0.1 steps_per_s={ours} peak_alloc_gib=4.5"]
    log.write_text("\n".join(lines) + "\n")
    table = timing.train_log_table(str(log), 100.0)
    assert "| ours_bs4 | 4.50 |" in table and "4.750x (4.500-5.000)" in table  # per-round ratios 5 and 4.5
    (tmp_path / "failed.log").write_text("== ours_bs4@r0\nTraceback ...\n")
    assert timing.train_log_table(str(tmp_path / "failed.log"), 1.0).startswith("no STEPS lines in")
    done = _run("benchmarks/timing.py", "train-log", str(tmp_path / "missing.log"), "10")
    assert done.returncode == 1 and "expected a bench_train_sd.sh log" in done.stderr
    assert "Traceback" not in done.stderr


def test_bench_layer_cpu_smoke():
    done = _run("benchmarks/bench_layer_cpu.py", "--rounds", "1", "--repeats", "1", "--small", "--threads", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("command: python benchmarks/bench_layer_cpu.py --rounds 1")
    assert "| lora_vision |" in done.stdout and "per-round ratio" in done.stdout


def test_bench_vit_kinds_cpu_smoke_times_every_kind_against_lora():
    done = _run("benchmarks/bench_vit_kinds_cpu.py", "--model", "tiny-torchvision", "--rounds", "1", "--repeats", "1",
                "--threads", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("command: python benchmarks/bench_vit_kinds_cpu.py --model tiny-torchvision")
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    for kind in ("loha", "lokr", "dora"):  # each against plain LoRA (training) and the base (inference)
        assert "| lora train step |" in rows[f"{kind} train step"]
        assert "| base forward |" in rows[f"{kind} forward"]


def test_bench_layer_cpu_rejects_zero_rounds():
    done = _run("benchmarks/bench_layer_cpu.py", "--rounds", "0")
    assert done.returncode == 2 and "--rounds 0" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_bench_vit_smoke_compares_each_mode_with_peft_in_that_mode(tmp_path):
    done = _run("benchmarks/bench_vit.py", "--tiny", "--batch", "2", "--steps", "1", "--warmup", "1", "--rounds", "1",
                "--variants", "peft,ours-fp32,peft-purebf16,ours-purebf16", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("command: python benchmarks/bench_vit.py --tiny")
    rows = {r["variant"]: r for r in json.loads((tmp_path / "bench_vit.json").read_text())}
    assert rows["ours-purebf16"]["mode"] == rows["peft-purebf16"]["mode"] == "pure bf16, fp32 master copies"
    table = (tmp_path / "bench_vit.md").read_text()
    assert "| ours-purebf16 | pure bf16, fp32 master copies |" in table
    assert [line for line in table.splitlines() if line.startswith("| ours-purebf16 ")][0].count("| peft-purebf16 |")


def test_bench_vit_reference_is_peft_in_the_same_mode():
    vit = _load("bench_vit")
    kinds = ["peft", "ours-fp32", "peft-bf16", "ours-bf16", "peft-purebf16", "ours-purebf16", "ours-purebf16-compile",
             "full"]
    refs = {k: vit.peft_reference(k, kinds) for k in kinds}
    assert refs == {"peft": None, "ours-fp32": "peft", "peft-bf16": None, "ours-bf16": "peft-bf16",
                    "peft-purebf16": None, "ours-purebf16": "peft-purebf16", "ours-purebf16-compile": "peft-purebf16",
                    "full": "peft"}


@pytest.mark.slow
def test_bench_adapter_ops_smoke(tmp_path):
    done = _run("benchmarks/bench_adapter_ops.py", "--model", "tiny", "--device", "cpu", "--dtype", "fp32",
                "--rounds", "1", "--repeats", "1", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("command: ")
    result = json.loads((tmp_path / "bench_adapter_ops.json").read_text())
    assert len(result["round_medians"]["lora_vision"]["fuse_ms"]) == 1
    assert "fuse_ms: lora_vision" in done.stdout


def test_profile_load_splits_each_load_and_counts_the_collector():
    done = _run("benchmarks/profile_load.py", "--model", "tiny", "--device", "cpu", "--dtype", "fp32", "--loads", "1",
                "--peft_cycles", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("command: ")
    lines = [ln for ln in done.stdout.splitlines() if " load " in ln]
    assert len(lines) == 4 and "after 1 diffusers + peft loads load 1:" in lines[-1], lines
    for part in ("read_adapter", "_plan", "_move_factors", "_check_finite", "inject_lora", "garbage collector"):
        assert all(part in ln for ln in lines), part


@pytest.mark.slow
def test_bench_generate_smoke(tmp_path):
    done = _run("benchmarks/bench_generate.py", "--size", "tiny", "--device", "cpu", "--iters", "1", "--steps", "2",
                "--rounds", "1", "--batches", "1", "--compile_backend", "eager", "--skip", "peft", "--dtype", "fp32",
                "--out", str(tmp_path))  # fp32: bf16 matmuls on a CPU made this smoke run a third slower
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("command: ")
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["rounds"]) >= {"base", "ours unfused", "ours fused", "compiled served + hot-swap"}
    assert result["recompiles_after_warmup"] == 0


def _bash(script: str, *args: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    # the scripts call `python3`: the interpreter running the tests comes first on PATH (a venv not activated)
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    full = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PATH=path, **env)
    return subprocess.run(["bash", script, *args], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=timeout)


def test_order_prints_the_rounds_for_the_shell_scripts():
    done = _run("benchmarks/timing.py", "order", "4", "a", "b", "c")
    assert done.returncode == 0 and done.stdout.splitlines() == [" ".join(o) for o in
                                                                 timing.round_orders("abc", 4)]
    done = _run("benchmarks/timing.py", "order", "0", "a")
    assert done.returncode == 2 and "ROUNDS=1 or more" in done.stderr and "Traceback" not in done.stderr


def test_train_log_table_reports_the_first_step_and_capture_per_round(tmp_path):
    log = tmp_path / "bench.log"
    log.write_text("".join(
        f"== ours_bs16_compile@r{r}\nfirst step done {start} s after start (imports and setup 9.0 s, compile + capture "
        f"{cap} s, first step 0.5 s)\nSTEPS ours n=10 median_s=0.1 steps_per_s=9.5 peak_alloc_gib=12.0\n"
        for r, (start, cap) in enumerate([(40.0, 30.0), (50.0, 40.0), (45.0, 35.0)])))
    row = [line for line in timing.train_log_table(str(log), 470).splitlines() if line.startswith("| ours_bs16")][0]
    assert "| 45.0 (40.0-50.0) | 35.0 (30.0-40.0) |" in row


def test_train_log_table_says_when_a_run_s_capture_failed(tmp_path):
    """A run whose capture failed stepped eagerly: its row says so (the recipes' first-step line, as printed)."""
    import torch

    from lora_vision.training.first_step import report_first_step

    now = time.perf_counter()
    failed = report_first_step(torch.device("cpu"), now - 28.0, now - 0.5, compiled=False, static_s=1.7,
                               capture_failed=True)
    assert "capture failed after 1.7 s, eager step, first step" in failed
    ok = report_first_step(torch.device("cpu"), now - 28.0, now - 0.5, compiled=False, static_s=1.7)
    log = tmp_path / "bench.log"
    log.write_text(f"== ours_bs1@r1\n{failed}\nSTEPS ours n=19 median_s=0.6 steps_per_s=1.5 peak_alloc_gib=44.6\n"
                   f"== ours_bs1@r2\n{ok}\nSTEPS ours n=19 median_s=0.5 steps_per_s=2.0 peak_alloc_gib=44.6\n")
    firsts = timing.read_first_steps(str(log))["ours_bs1"]
    assert firsts["capture"] == [1.7, 1.7] and firsts["failed"] == [1.0]
    row = [line for line in timing.train_log_table(str(log), 4).splitlines() if line.startswith("| ours_bs1")][0]
    assert "FAILED in 1 of 2 round(s): eager step" in row


def test_step_timer_times_a_reference_script_s_optimizer_steps_in_the_recipes_format(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("import sys, time, torch\n"
                      "w = torch.nn.Parameter(torch.zeros(3))\n"
                      "opt = torch.optim.SGD([w], lr=0.1)\n"
                      "for i in range(int(sys.argv[1])):\n"
                      "    (w - 1).pow(2).sum().backward(); time.sleep(0.02 if i < 10 else 0.05); opt.step()\n")
    done = _run("benchmarks/step_timer.py", "ref_bs2", str(script), "16")
    assert done.returncode == 0, done.stderr
    log = tmp_path / "bench.log"
    log.write_text("== ref_bs2@r1\n" + done.stdout)
    rates, _ = timing.read_train_log(str(log))
    assert 2 / 0.07 < rates["ref_bs2"][0] < 2 / 0.045  # 2 images per step of about 50 ms after the 10 warm-up steps
    assert timing.read_first_steps(str(log))["ref_bs2"]["start"][0] > 0
    too_few = _run("benchmarks/step_timer.py", "ref_bs2", str(script), "11")
    assert "STEPS too few steps: 11 optimizer steps" in too_few.stdout
    assert _run("benchmarks/step_timer.py", "ref_bs2", str(tmp_path / "missing.py")).returncode == 2


def test_bench_train_sd_refuses_unknown_runs_and_missing_reference_before_any_work(tmp_path):
    done = _bash("benchmarks/bench_train_sd.sh", "sd15", str(tmp_path / "out"), RUNS="ours_bs4 ours_bs5")
    assert done.returncode == 2 and "'ours_bs5', which is no run" in done.stderr
    no_ref = str(tmp_path / "no_ref")  # the reference scripts' folder (.ref/ by default) without them
    done = _bash("benchmarks/bench_train_sd.sh", "sd15", str(tmp_path / "out"), RUNS="ref_bs4", REF_DIR=no_ref)
    assert done.returncode == 2 and "no_ref/train_dreambooth_lora.py" in done.stderr
    done = _bash("benchmarks/bench_train_sd.sh", "flux1", str(tmp_path / "out"), RUNS="ref_bs1", REF_DIR=no_ref)
    assert done.returncode == 2 and "no_ref/train_dreambooth_lora_flux.py" in done.stderr
    done = _bash("benchmarks/bench_train_sd.sh", "sd21", str(tmp_path / "out"))
    assert done.returncode == 2 and "expected sd15, sdxl or flux1" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bench_train_sd_cpu_smoke_prints_the_table(tmp_path):
    done = _bash("benchmarks/bench_train_sd.sh", "sd15", str(tmp_path), MODEL="samples/tiny-sd",
                 IMGS="samples/instance", SIZE="tiny", RES="64", STEPS_SCALE="0.01", ROUNDS="1", RUNS="ours_bs1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.startswith('command: ROUNDS=1 RUNS="ours_bs1"')
    table = (tmp_path / "table_sd15.md").read_text()
    row = [line for line in table.splitlines() if line.startswith("| ours_bs1 |")]
    assert row and "1 interleaved round(s)" in table and "first step after start s" in table
    assert "== ours_bs1@r1" in (tmp_path / "bench_sd15.log").read_text()


@pytest.mark.slow
def test_bench_train_sd_flux1_cpu_smoke_builds_the_model_and_trains_the_reference_s_modules(tmp_path):
    done = _bash("benchmarks/bench_train_sd.sh", "flux1", str(tmp_path), MODEL=str(tmp_path / "flux"),
                 IMGS=str(tmp_path / "imgs"), SIZE="flux1_tiny", RES="64", STEPS_SCALE="0.3", ROUNDS="1",
                 RUNS="ours_bs1")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(list((tmp_path / "imgs").glob("*.png"))) == 8 and (tmp_path / "flux" / "model_index.json").exists()
    assert [line for line in (tmp_path / "table_flux1.md").read_text().splitlines() if line.startswith("| ours_bs1 |")]
    # where the step's time goes (issue #16): the profile of steps 6-10 is kept beside the table
    assert "Steps 6-10 of the run" in (tmp_path / "profiles" / "ours_bs1_r1" / "kernels.md").read_text()
    # the same modules as diffusers' train_dreambooth_lora_flux.py's default target_modules, counted by peft
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    model = FluxTransformer2DModel.from_pretrained(tmp_path / "flux" / "transformer")
    model.add_adapter(LoraConfig(r=16, target_modules=[
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]))
    wrapped = sum(hasattr(m, "lora_A") for m in model.modules())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"adapted {wrapped} modules in transformer ({trainable:,} trainable" in (
        tmp_path / "runs" / "ours_bs1_r1.log").read_text()


def test_multi_gpu_summary_reports_rounds_and_per_round_scaling(tmp_path):
    summary = _load("multi_gpu_summary")
    log = []
    for r, (one, two) in enumerate([(0.10, 0.11), (0.20, 0.21)], start=1):  # the machine slowed down in round 2
        log += [f"== sd_1gpu_b4@r{r} (1 process(es))",
                f"STEPS ours n=19 median_s={one} steps_per_s=1 images_per_s={4 / one} peak_alloc_gib=5.30",
                f"== sd_2gpu_b4@r{r} (2 process(es))",
                f"training: 93%|###| 13/14 STEPS ours n=19 median_s={two} steps_per_s=1 images_per_s={4 / two} "
                "peak_alloc_gib=5.30",
                f"STEPS ours n=19 median_s={two - 0.01} steps_per_s=1 images_per_s=1 peak_alloc_gib=5.31",
                f"round {r}/2 done"]
    log += ["== vit_2gpu@r1 (2 process(es))", "Traceback: boom"]
    (tmp_path / "multi_gpu.log").write_text("\n".join(log) + "\n")
    text = summary.summary(str(tmp_path))
    assert "| sd_2gpu_b4 | 2 | 5.30, 5.31 | 55.4 | 38.1-72.7 |" in text  # 2 x 4 / slowest process, per round
    assert "- scaling sd_2gpu_b4 / sd_1gpu_b4: 1.86x (1.82-1.90) over 2 round(s)" in text
    assert "- vit_2gpu round 1: failed or skipped: Traceback: boom" in text
    done = _run("benchmarks/multi_gpu_summary.py", str(tmp_path / "missing"))
    assert done.returncode == 1 and "expected the output folder of bench_multi_gpu.sh" in done.stderr


def test_multi_gpu_summary_scales_the_captured_step_and_compares_its_loss_curve(tmp_path):
    summary = _load("multi_gpu_summary")
    log = ["== sd_1gpu_b4_graph@r1 (1 process(es))",
           "STEPS ours n=19 median_s=0.05 steps_per_s=20 images_per_s=80 peak_alloc_gib=5.38",
           "== sd_2gpu_b4_graph@r1 (2 process(es))",
           "STEPS ours n=19 median_s=0.052 steps_per_s=19 images_per_s=76.9 peak_alloc_gib=5.38",
           "STEPS ours n=19 median_s=0.051 steps_per_s=19 images_per_s=78.4 peak_alloc_gib=5.38"]
    (tmp_path / "multi_gpu.log").write_text("\n".join(log) + "\n")
    (tmp_path / "loss_sd_1gpu_b8.csv").write_text("step,loss,lr\n1,1.0,1e-4\n2,0.5,1e-4\n3,0.25,1e-4\n")
    (tmp_path / "loss_sd_2gpu_b4_graph.csv").write_text("step,loss,lr\n1,1.0,1e-4\n2,0.5001,1e-4\n3,0.25,1e-4\n")
    text = summary.summary(str(tmp_path))
    assert "- scaling sd_2gpu_b4_graph / sd_1gpu_b4_graph: 1.92x (1.92-1.92) over 1 round(s)" in text  # 2 x 4 / 0.052
    assert "- loss curve, sd_1gpu_b8 vs sd_2gpu_b4_graph (3 steps, round 1): max |diff| 1.00e-04" in text
    assert "| sd_2gpu_b4_graph | 2 | 5.38, 5.38 |" in text


def test_bench_multi_gpu_refuses_unknown_configurations(tmp_path):
    done = _bash("benchmarks/bench_multi_gpu.sh", str(tmp_path / "out"), RUNS="vit_3gpu", CPU="1")
    assert done.returncode == 2 and "'vit_3gpu', which is no configuration" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bench_multi_gpu_cpu_smoke_prints_the_table(tmp_path):
    port = str(20000 + os.getpid() % 20000)
    done = _bash("benchmarks/bench_multi_gpu.sh", str(tmp_path), CPU="1", ROUNDS="1", RUNS="vit_1gpu vit_2gpu",
                 MASTER_PORT=port, MODEL="samples/tiny-sd", IMGS="samples/instance")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.startswith('command: CPU=1 ROUNDS=1 RUNS="vit_1gpu vit_2gpu"')
    table = (tmp_path / "summary.md").read_text()
    assert "| vit_2gpu | 2 |" in table and "| vit_1gpu |" in table and "- scaling vit_2gpu / vit_1gpu:" in table


def test_gpu_session_dry_run_plans_every_number_of_issues_15_to_18_within_the_call_limit():
    plans = {}
    for call in "abcdefgh":
        done = _bash("benchmarks/gpu_session.sh", call, timeout=60, DRY_RUN="1", OUT="/nonexistent/out")
        assert done.returncode == 0, done.stderr
        plans[call] = done.stdout
        total = int(done.stdout.split("estimated total ")[1].split()[0])
        assert total <= 570, f"call {call} plans {total} s: over the budget of a 600 s device call"
    # 17: ViT ours vs peft in each precision mode; load/switch/fuse; generation with adapters; compile and first step
    assert "peft,ours-fp32,peft-bf16,ours-bf16,peft-purebf16,ours-purebf16" in plans["a"]
    assert "bench_adapter_ops.py --model sd15" in plans["a"] and "bench_generate.py --size sd15" in plans["a"]
    assert "ours_bs16 ours_bs16_compile" in plans["c"]
    # 18: the captured step with the new optimizers, checked against the packages, then timed against the plain
    # step, interleaved over rounds (EMA and LoRA+ were measured in the first call b); 16: our Flux.1 profile
    assert "graph_optim_check.py" in plans["b"] and "RUNS=ours_bs1 SDPA_PICK=no-cudnn" in plans["e"]
    for run in ("ours_bs4", "ours_bs4_prodigy", "ours_bs4_schedulefree", "ours_bs4_adafactor"):
        assert run in plans["b"].split("round order:")[1], run
    assert plans["b"].count("round order:") == 2
    # 15 and 16: Flux.1 adapter operations, DreamBooth against diffusers' script, the low-memory modes
    assert "gpu_dit_parts.sh train" in plans["d"] and "gpu_dit_parts.sh lowmem" in plans["d"]
    assert "bench_dit_adapter_ops.py --model flux1 --device cuda" in plans["e"]
    assert not Path("/nonexistent/out").exists()
    # f: one call for a session with time for one: the check, the ViT table, compile cold and cached at batch 16
    assert "graph_optim_check.py" in plans["f"] and "peft-purebf16,ours-purebf16" in plans["f"]
    assert 'RUNS="ours_bs16 ours_bs16_compile" COMPILE_TIMEOUT=300' in plans["f"]
    # g: end to end at batch 4 against the reference, pivotal tuning, then generation in a captured graph
    assert 'RUNS="ref_bs4 ours_bs4 ours_bs4_pivotal"' in plans["g"] and "bench_generate.py" in plans["g"]
    # h: the captured generation rows, the GPU test of the captured model, adapter operations after the loader work
    assert "tests/test_captured.py" in plans["h"] and "--skip compile,peft" in plans["h"]
    done = _bash("benchmarks/gpu_session.sh", "i", timeout=60)
    assert done.returncode == 2 and "expected a, b, c, d, e, f, g or h" in done.stderr
    # ONLY: a call cut short runs the parts it names, in that order, and refuses parts of other calls
    done = _bash("benchmarks/gpu_session.sh", "b", timeout=60, DRY_RUN="1", ONLY="features graphoptim")
    assert done.returncode == 0, done.stderr
    assert done.stdout.index("- features") < done.stdout.index("- graphoptim") and "compile" not in done.stdout
    done = _bash("benchmarks/gpu_session.sh", "b", timeout=60, DRY_RUN="1", ONLY="vit")
    assert done.returncode == 2 and "ONLY names part 'vit', which call b does not have" in done.stderr


def test_gpu_dit_parts_runs_the_reference_and_the_quantized_modes_and_refuses_other_parts(tmp_path):
    text = Path(REPO, "benchmarks", "gpu_dit_parts.sh").read_text()
    assert 'RUNS=${RUNS:-"ref_bs1 ours_bs1"}' in text and "--modes ${MODES:-none int8 fp8 nf4}" in text
    done = _bash("benchmarks/gpu_dit_parts.sh", "sweep", str(tmp_path / "out"), timeout=60)
    assert done.returncode == 2 and "expected train or lowmem" in done.stderr


def test_kinds_size_quality_compare_finds_the_smallest_setting_reaching_the_other_kind():
    bench = _load("kinds_size_quality")
    row = dict(min=0.0, max=0.0, seeds=3, lr=0.01, tensor_bytes=0)
    table = {"lora r1": dict(row, kind="lora", median=0.90, file_bytes=100, params=10),
             "lora r4": dict(row, kind="lora", median=0.80, file_bytes=400, params=40),
             "lora r8": dict(row, kind="lora", median=0.70, file_bytes=800, params=80),
             "lokr a": dict(row, kind="lokr", median=0.85, file_bytes=20, params=2),
             "lokr b": dict(row, kind="lokr", median=0.79, file_bytes=40, params=5)}
    lines = bench.compare(table)
    # the best LoKr (b, 0.79) is first reached by LoRA r8 (0.70): 800 / 40 bytes, 80 / 5 parameters
    assert lines[0].startswith("best LoKr 'lokr b' (median 0.7900) is reached by LoRA 'lora r8'")
    assert "= 20.00x" in lines[0] and "= 16.00x" in lines[0]
    assert "'lora r1' (median 0.9000): smallest LoKr reaching it 'lokr a'" in lines[1]
    assert "'lora r4' (median 0.8000): smallest LoKr reaching it 'lokr b'" in lines[2] and "= 10.00x" in lines[2]
    assert lines[3].endswith("no LoKr setting tried reaches it")
    del table["lora r8"]
    assert "is reached by no LoRA tried (largest 'lora r4': median 0.8000)" in bench.compare(table)[0]


@pytest.mark.slow
def test_kinds_size_quality_smoke_trains_both_kinds_through_the_recipe(tmp_path):
    done = _run("benchmarks/kinds_size_quality.py", "--quick", "--json", str(tmp_path / "r.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("command: ")
    result = json.loads((tmp_path / "r.json").read_text())
    assert {r["kind"] for r in result["runs"]} == {"lora", "lokr"}
    for r in result["runs"]:  # the file holds the trained tensors plus key names and the training metadata
        assert r["file_bytes"] > r["tensor_bytes"] == 4 * r["params"] > 0 and r["fixed_loss"] > 0
    assert "| lora r1 |" in done.stdout and "| lokr f-1 full |" in done.stdout


@pytest.mark.parametrize("argv,said", [(["--steps", "0"], "--steps 0 --batch 4 --lrs [0.003, 0.01, 0.03, 0.1]: "
                                                           "expected at least 1 step"),
                                       (["--image", "no/such.jpg"], "--image no/such.jpg: no such file")],
                         ids=["zero steps", "missing image"])
def test_kinds_size_quality_rejects_bad_arguments_naming_them(capsys, argv, said):
    with pytest.raises(SystemExit) as stop:
        _load("kinds_size_quality").main(argv)
    assert stop.value.code == 2
    assert said in capsys.readouterr().err


def test_kinds_size_quality_failed_run_exits_1_naming_the_setting_and_the_recipes_error(tmp_path, capsys):
    code = _load("kinds_size_quality").main(["--quick", "--model", str(tmp_path / "no_model"), "--json",
                                             str(tmp_path / "r.json")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kinds_size_quality.py: error: lora r1 (lr 0.003, seed 0) failed with exit code 1: "
                          "train_sd.py: error: load_sd_pipeline got"), err
    assert "no_model" in err and not (tmp_path / "r.json").exists()


def test_bench_dit_split_kinds_smoke_reads_kinds_at_the_file_size():
    done = _run("benchmarks/bench_dit_split_kinds.py", "--double", "1", "--single", "1", "--rounds", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("command: python benchmarks/bench_dit_split_kinds.py --double 1")
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in done.stdout.splitlines()
            if line.startswith(("| lokr |", "| loha |"))}
    assert set(rows) == {"lokr", "loha"}
    for kind, cells in rows.items():  # the read adapter holds no more than the file: no dense diffs
        assert float(cells[2]) <= float(cells[1]) + 0.05, cells
    assert "window" in rows["lokr"][4] and "dense" not in " ".join(rows["lokr"] + rows["loha"])
