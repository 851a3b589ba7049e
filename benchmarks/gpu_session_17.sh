#!/bin/bash
# Issue #17 re-measurement in ONE device call (one H200): every table of docs/benchmarks.md "GPU plan for issue #17",
# each written under $OUT/<name>/ with the exact command at the top of its output.
#
#   bash benchmarks/gpu_session_17.sh            # OUT defaults to /tmp/gpu17; BUDGET (s) skips later parts when spent
#   PARTS="vit ops" bash benchmarks/gpu_session_17.sh   # only some parts
set -u
OUTD=${OUT:-/tmp/gpu17}
mkdir -p "$OUTD"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD
T0=$(date +%s)
BUDGET=${BUDGET:-580}
PARTS=${PARTS:-"vit ops generate train"}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
part() { name=$1; need=$2; shift 2
  case " $PARTS " in *" $name "*) ;; *) return ;; esac
  if [ "$(left)" -lt "$need" ]; then echo "== $name skipped (time budget)" | tee -a "$OUTD/session.log"; return; fi
  mkdir -p "$OUTD/$name"
  echo "== $name: $*" | tee -a "$OUTD/session.log"
  timeout "$(left)" "$@" > "$OUTD/$name/output.md" 2> "$OUTD/$name/stderr.txt"
  echo "== $name exit $? after $(( $(date +%s) - T0 )) s" | tee -a "$OUTD/session.log"
}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv > "$OUTD/gpu.txt" 2>&1
# 1. ViT-B/16 LoRA, ours vs peft in each precision mode, interleaved rounds (~2-3 min)
part vit 150 python benchmarks/bench_vit.py --batch 128 --steps 20 --warmup 5 --rounds 5 \
  --variants peft,ours-fp32,peft-bf16,ours-bf16,peft-purebf16,ours-purebf16 --out "$OUTD/vit"
# 2. adapter load + apply, switch, fuse vs diffusers + peft on SD 1.5 (target: load + apply < 50 ms, fuse <= diffusers)
part ops 120 python benchmarks/bench_adapter_ops.py --model sd15 --device cuda --dtype bf16 --rounds 5 --repeats 6 \
  --out "$OUTD/ops"
# 3. generation: unfused / fused / served / compiled against the base, interleaved (target: unfused < 3% per step)
part generate 200 python benchmarks/bench_generate.py --size sd15 --rounds 5 --iters 20 --steps 30 --batches 1,4 \
  --out "$OUTD/generate"
# 4. SD 1.5 training, batch 16 eager vs compiled: compile cost and time to the first step (the train_sd log lines)
part train 200 env RUNS="ours_bs16 ours_bs16_compile" ROUNDS=1 bash benchmarks/bench_train_sd.sh sd15 "$OUTD/train"
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$OUTD/session.log"
