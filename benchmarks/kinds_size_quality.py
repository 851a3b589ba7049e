"""LoKr against plain LoRA: adapter file size at equal quality on the overfit test (tiny SD 1.x, CPU).

    PYTHONPATH=. python benchmarks/kinds_size_quality.py                  # about 10-15 min on one busy core
    PYTHONPATH=. python benchmarks/kinds_size_quality.py --quick          # smoke run, under a minute

Every run is scripts/train_sd.py's main() on the overfit test of tests/recipes (one image, samples/instance/toy_00.jpg,
tiny-sd1, batch 4, the attention projections, constant learning rate, one CPU thread). Quality is the recipe's
validation loss measured once at the end on the training image: COPIES copies of it in --validation_data_dir, each
noised at the 5 fixed timesteps of training/sd/validation_loss.py with its own fixed noise (5 x COPIES fixed
(t, noise) pairs, mean of the VAE latent, plain MSE), so the number depends only on the trained weights. Size is the
bytes of adapter.safetensors (what a user downloads: tensors, key names and the training metadata) and the number of
trained parameters.

Learning rate, per kind: each kind's reference setting (LoRA rank 4; LoKr --lokr_factor -1 --lokr_full_rank) is
trained at every --lrs value with the first seed; the rate with the lowest fixed loss is then used for every setting of
that kind and every seed. Each setting runs with every seed; the table gives the median fixed loss and its spread
(min-max). The comparison finds the smallest LoRA whose median reaches the best LoKr's, and for each LoRA rank the
smallest LoKr that reaches it, with the size ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(REPO / "benchmarks")]

import timing  # noqa: E402  (the command line printed first)
import train_sd  # noqa: E402  (the recipe: scripts/train_sd.py)
from lora_vision.adapter import Adapter  # noqa: E402
from lora_vision.io import atomic_write_text  # noqa: E402

IMAGE = REPO / "samples" / "instance" / "toy_00.jpg"
COPIES = 7  # 35 fixed (t, noise) pairs

# name -> (kind, extra flags); the first setting of each kind is its reference for the learning-rate sweep.
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "lora r4": ("lora", ["--rank", "4"]),
    "lora r1": ("lora", ["--rank", "1"]),
    "lora r2": ("lora", ["--rank", "2"]),
    "lora r8": ("lora", ["--rank", "8"]),
    "lora r16": ("lora", ["--rank", "16"]),
    "lokr f-1 full": ("lokr", ["--lokr_factor", "-1", "--lokr_full_rank"]),
    "lokr f-1 r1": ("lokr", ["--lokr_factor", "-1", "--rank", "1"]),
    "lokr f2 r4": ("lokr", ["--lokr_factor", "2", "--rank", "4"]),
    "lokr f2 full": ("lokr", ["--lokr_factor", "2", "--lokr_full_rank"]),
}
QUICK = {"lora r1": SETTINGS["lora r1"], "lokr f-1 full": SETTINGS["lokr f-1 full"]}


class Run(NamedTuple):
    """One training run and what it gave."""

    setting: str
    kind: str
    lr: float
    seed: int
    fixed_loss: float
    file_bytes: int
    tensor_bytes: int
    params: int
    seconds: float


def train_once(work: Path, setting: str, lr: float, seed: int, steps: int, model: str = "tiny-sd1",
               batch: int = 4) -> Run:
    """One training run through the recipe; its fixed loss, file size and parameter count."""
    kind, extra = SETTINGS[setting]
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["--pretrained_model_name_or_path", model, "--instance_data_dir", str(work / "train"),
            "--instance_prompt", "a photo of sks toy", "--output_dir", str(out), "--max_train_steps", str(steps),
            "--train_batch_size", str(batch), "--learning_rate", str(lr), "--seed", str(seed), "--adapter_type", kind,
            *extra, "--validation_data_dir", str(work / "fixed"), "--validation_steps", str(steps),
            "--logging_steps", str(steps), "--checkpointing_steps", str(10 * steps), "--report_to", "none",
            "--strength_sweep=", "--export_kohya", "false", "--num_threads", "1"]
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = train_sd.main(argv)
    seconds = time.perf_counter() - t0
    if code != 0:
        lines = log.getvalue().strip().splitlines()
        said = " | ".join([ln for ln in lines if ln.startswith("train_sd.py:")] or lines[-3:])  # the recipe's error
        raise RuntimeError(f"{setting} (lr {lr}, seed {seed}) failed with exit code {code}: {said}")
    last = (out / "logs" / "loss.csv").read_text().splitlines()[-1].split(",")
    path = out / "adapter.safetensors"
    factors = [t for spec in Adapter.load(path).layers("unet").values() for t in spec.all_factors.values()]
    return Run(setting, kind, lr, seed, float(last[3]), path.stat().st_size,
               sum(t.numel() * t.element_size() for t in factors), sum(t.numel() for t in factors), seconds)


def summarize(runs: list[Run]) -> dict[str, dict]:
    """Per setting: kind, learning rate, median / min / max fixed loss over seeds, file bytes, parameters."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r.setting for r in runs):
        mine = [r for r in runs if r.setting == name]
        losses = [r.fixed_loss for r in mine]
        out[name] = {"kind": mine[0].kind, "lr": mine[0].lr, "median": statistics.median(losses),
                     "min": min(losses), "max": max(losses), "seeds": len(mine), "file_bytes": mine[0].file_bytes,
                     "tensor_bytes": mine[0].tensor_bytes, "params": mine[0].params}
    return out


def compare(table: dict[str, dict]) -> list[str]:
    """Lines of the equal-quality comparison: the smallest LoRA reaching the best LoKr (by median fixed loss), and
    for each LoRA the smallest LoKr reaching it, with the file and parameter ratios (LoRA / LoKr)."""
    lora = sorted((v["file_bytes"], k) for k, v in table.items() if v["kind"] == "lora")
    lokr = sorted((v["file_bytes"], k) for k, v in table.items() if v["kind"] == "lokr")
    if not lora or not lokr:
        return ["(no comparison: both kinds need at least one setting)"]

    def ratio(big: str, small: str) -> str:
        a, b = table[big], table[small]
        return (f"file {a['file_bytes']:,} / {b['file_bytes']:,} B = {a['file_bytes'] / b['file_bytes']:.2f}x, "
                f"parameters {a['params']:,} / {b['params']:,} = {a['params'] / b['params']:.2f}x")

    best = min((v["median"], k) for k, v in table.items() if v["kind"] == "lokr")[1]
    lines = []
    reach = next((k for _, k in lora if table[k]["median"] <= table[best]["median"]), None)
    if reach:
        lines.append(f"best LoKr {best!r} (median {table[best]['median']:.4f}) is reached by LoRA {reach!r} "
                     f"(median {table[reach]['median']:.4f}): {ratio(reach, best)}")
    else:
        lines.append(f"best LoKr {best!r} (median {table[best]['median']:.4f}) is reached by no LoRA tried "
                     f"(largest {lora[-1][1]!r}: median {table[lora[-1][1]]['median']:.4f})")
    for _, name in lora:
        small = next((k for _, k in lokr if table[k]["median"] <= table[name]["median"]), None)
        lines.append(f"LoRA {name!r} (median {table[name]['median']:.4f}): "
                     + (f"smallest LoKr reaching it {small!r} (median {table[small]['median']:.4f}): "
                        f"{ratio(name, small)}" if small else "no LoKr setting tried reaches it"))
    return lines


def markdown(table: dict[str, dict]) -> str:
    rows = ["| setting | lr | adapter.safetensors bytes | tensor bytes | parameters | fixed loss median | spread |",
            "|---|---|---|---|---|---|---|"]
    for name, v in sorted(table.items(), key=lambda kv: (kv[1]["kind"], kv[1]["file_bytes"])):
        rows.append(f"| {name} | {v['lr']:g} | {v['file_bytes']:,} | {v['tensor_bytes']:,} | {v['params']:,} | "
                    f"{v['median']:.4f} | {v['min']:.4f}-{v['max']:.4f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2, 1e-1],
                    help="learning rates tried on each kind's reference setting with the first seed")
    ap.add_argument("--model", default="tiny-sd1",
                    help="the recipe's --pretrained_model_name_or_path (default tiny-sd1; a local SD 1.x folder for a "
                         "real-size run on a GPU)")
    ap.add_argument("--image", type=Path, default=IMAGE,
                    help=f"the one training image (default {IMAGE.relative_to(REPO)})")
    ap.add_argument("--batch", type=int, default=4, help="training batch size (default 4)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 steps, one seed, one rate, two settings")
    ap.add_argument("--json", type=Path, help="also write every run and the summary here")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or any(lr <= 0 for lr in args.lrs):
        ap.error(f"--steps {args.steps} --batch {args.batch} --lrs {args.lrs}: expected at least 1 step, a batch of "
                 "1 or more and rates > 0")
    if not args.image.is_file():
        ap.error(f"--image {args.image}: no such file; give one training image (.jpg / .png)")
    settings = QUICK if args.quick else SETTINGS
    steps, seeds, lrs = (2, args.seeds[:1], args.lrs[:1]) if args.quick else (args.steps, args.seeds, args.lrs)
    timing.print_command()
    runs: list[Run] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kinds_size_quality_") as tmp:
        work = Path(tmp)
        (work / "train").mkdir()
        (work / "fixed").mkdir()
        shutil.copy(args.image, work / "train" / args.image.name)
        for i in range(COPIES):
            shutil.copy(args.image, work / "fixed" / f"copy{i}{args.image.suffix}")

        def run(setting: str, lr: float, seed: int) -> Run:
            r = train_once(work, setting, lr, seed, steps, args.model, args.batch)
            print(f"{setting:14s} lr {lr:<7g} seed {seed}: fixed loss {r.fixed_loss:.4f}, {r.file_bytes:,} B, "
                  f"{r.params:,} parameters ({r.seconds:.0f} s)", file=sys.stderr, flush=True)
            runs.append(r)
            return r

        try:
            chosen = {}
            for kind in dict.fromkeys(k for k, _ in settings.values()):
                ref = next(name for name, (k, _) in settings.items() if k == kind)
                sweep = [run(ref, lr, seeds[0]) for lr in lrs]
                chosen[kind] = min(sweep, key=lambda r: r.fixed_loss).lr
                print(f"{kind}: learning rate {chosen[kind]:g} (lowest fixed loss of {ref!r} over {lrs})",
                      file=sys.stderr, flush=True)
            for name, (kind, _) in settings.items():
                for seed in seeds:
                    if not any(r.setting == name and r.lr == chosen[kind] and r.seed == seed for r in runs):
                        run(name, chosen[kind], seed)
        except RuntimeError as err:
            print(f"kinds_size_quality.py: error: {err}", file=sys.stderr)
            return 1
    kept = [r for r in runs if r.lr == chosen[r.kind]]
    table = summarize(kept)
    print(f"overfit test, {args.model}, {args.image.name}, {steps} steps, batch {args.batch}, seeds {seeds}, fixed "
          f"loss over {5 * COPIES} (t, noise) pairs; {len(runs)} runs in {time.perf_counter() - t_start:.0f} s\n")
    print(markdown(table) + "\n")
    lines = compare(table)
    print("\n".join(lines))
    if args.json:
        atomic_write_text(args.json, json.dumps({"runs": [r._asdict() for r in runs], "summary": table,
                                                 "comparison": lines}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
