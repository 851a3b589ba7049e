#!/bin/bash
# The GPU numbers of issues #15-#18 on one H200, in device calls of under 10 minutes each (a device call runs at
# most 600 s), each table with the exact command at the top of its output.
#
#   a: #17 ViT-B/16 ours vs peft per precision mode, adapter operations, generation with adapters
#   b: #18 the captured step with Prodigy / schedule-free / Adafactor (graph_optim_check.py: captured vs the
#      packages' eager step; then their speed against AdamW)
#   c: #17 --compile (regional) at batch 16, cold and then with the kernel cache of round 1, and the batch-16
#      profile; #18 pivotal tuning's step
#   d: #16 DreamBooth on a real-size random-weight Flux.1 at 1024 px, ours against diffusers'
#      train_dreambooth_lora_flux.py (.ref/), one round (ROUNDS=2 when a call has the time), then the low-memory
#      mode (--quantize_base none/fp8/nf4, 20 steps each: peak memory, loss-curve cost); benchmarks/gpu_dit_parts.sh
#      (DIT_ROUNDS=2 FLUX_PROFILE_STEPS=0 ONLY=dittrain: two interleaved rounds, no profile, in one call)
#   e: #15 adapter operations on the real-size Flux.1 transformer against diffusers + peft, and #16's profile of
#      our Flux.1 step (ours only)
#   f: what a session with time for one call still needs: the #18 float64/float32 check, #17's ViT table, and
#      --compile cold and cached at batch 16 only (COMPILE_RUNS="ours_bs16 ours_bs16_compile")
#   g: what #17 still needs after a-f: end to end at batch 4 against the reference (ref_bs4, .ref carried), pivotal
#      tuning's step and the start-up split on the GPU (COMPILE_RUNS="ref_bs4 ours_bs4 ours_bs4_pivotal"), then
#      generation with adapters (call a's part: eager, compiled and peft rows)
#   h: #17's inference in CUDA graphs (lora_vision.captured): the GPU test of tests/test_captured.py, adapter load /
#      apply / fuse after the one-read loader and the one-transfer move, and generation with the captured rows
#      (compile and peft rows left out: measured in call a's first run)
#
# Before the calls, here (the device has no diffusers, prodigyopt or schedulefree; nothing can be fetched there):
#   bash benchmarks/gpu_wheels.sh                      # pure-Python wheels into .whl/ (git-ignored)
# Then device calls in a row, each `run` with carry [".whl"] (call d also ".ref") and timeout_s 600:
#   bash benchmarks/gpu_session.sh a      (then b, c, d, e; d and e share /tmp/bench_flux1 when the machine stays)
# Each call leaves in $OUT: session_<call>.md (the session log and every part's table) and results_<call>.tar.gz
# (all logs, JSON and profiles), within the device's 8 files of 16 MiB. DRY_RUN=1 prints the plan (commands,
# estimated seconds, total against the 600 s limit) and checks the parts' prerequisites without running anything:
#   DRY_RUN=1 bash benchmarks/gpu_session.sh a
# Estimates: ViT-B/16 at 3.7k images/s (docs/benchmarks.md), load+apply 68 ms, the UNet step ~55 ms at batch 1, a
# train_sd.py run ~21 s to its first step plus its steps (46 ms at batch 4 captured, 135 ms eager, 140 ms at batch
# 16), and 304 s of compiling for --compile at batch 16 (issue #17's re-measurement).
set -u
CALL=${1:-}
LIMIT=${LIMIT:-600}  # seconds a device call may run
case $CALL in
  a) PARTS=(vit ops generate) ;;
  b) PARTS=(graphoptim features) ;;
  c) PARTS=(compile) ;;
  d) PARTS=(dittrain lowmem) ;;
  e) PARTS=(ditops ditprofile) ;;
  f) PARTS=(graphoptim vit compile); COMPILE_RUNS=${COMPILE_RUNS:-ours_bs16 ours_bs16_compile} ;;
  g) PARTS=(compile generate); COMPILE_RUNS=${COMPILE_RUNS:-ref_bs4 ours_bs4 ours_bs4_pivotal} ;;
  h) PARTS=(captest ops gencap) ;;
  *) echo "error: call '$CALL': expected a, b, c, d, e, f, g or h (bash benchmarks/gpu_session.sh a|...|h; the calls are" \
          "listed at the top of benchmarks/gpu_session.sh)" >&2; exit 2 ;;
esac
# ONLY="part part": run only these parts of the call, in this order (a call cut short by the device time left)
if [ -n "${ONLY:-}" ]; then
  read -r -a ONLY_PARTS <<< "$ONLY"
  for p in "${ONLY_PARTS[@]}"; do
    [[ " ${PARTS[*]} " == *" $p "* ]] || { echo "error: ONLY names part '$p', which call $CALL does not have (${PARTS[*]})" >&2; exit 2; }
  done
  PARTS=("${ONLY_PARTS[@]}")
fi
OUTD=${OUT:-/tmp/gpu17_out}
WORK=${WORK:-/tmp/gpu17_work}/$CALL
T0=$(date +%s)
BUDGET=${BUDGET:-570}  # leave time to pack the results inside the call's limit

# part -> estimated seconds, then the command (run from the repository root)
estimate() { case $1 in
  vit) echo 170 ;; ops) echo 120 ;; generate) echo 240 ;; features) echo 300 ;; captest) echo 40 ;; gencap) echo 220 ;;
  compile) case ${COMPILE_RUNS:-} in "ours_bs16 ours_bs16_compile") echo 280 ;; *compile*|"") echo 500 ;; *) echo 300 ;;
           esac ;;
  ditops) echo 150 ;; dittrain) [ "${DIT_ROUNDS:-1}" = 1 ] && echo 340 || echo 420 ;; lowmem) echo 230 ;; graphoptim) echo 110 ;; ditprofile) echo 280 ;;
esac; }
command_of() { case $1 in
  vit) echo "python3 benchmarks/bench_vit.py --batch 128 --steps 20 --warmup 5 --rounds 5 --variants" \
            "peft,ours-fp32,peft-bf16,ours-bf16,peft-purebf16,ours-purebf16 --profile peft-purebf16,ours-purebf16" \
            "--out $WORK/vit" ;;
  ops) echo "python3 benchmarks/bench_adapter_ops.py --model sd15 --device cuda --dtype bf16 --rounds ${OPS_ROUNDS:-5}" \
            "--repeats ${OPS_REPEATS:-6}" \
            "--out $WORK/ops" ;;
  generate) echo "python3 benchmarks/bench_generate.py --size sd15 --rounds 5 --iters 20 --steps 30 --batches 1,4" \
                 "--out $WORK/generate" ;;
  graphoptim) echo "python3 benchmarks/graph_optim_check.py --steps 12" ;;
  captest) echo "python3 -m pytest -q -o addopts= -p no:cacheprovider tests/test_captured.py" ;;
  gencap) echo "python3 benchmarks/bench_generate.py --size sd15 --rounds ${GEN_ROUNDS:-3} --iters 20 --steps 30" \
               "--batches 1,4 --skip compile,peft ${GEN_EXTRA:-} --out $WORK/gencap" ;;
  features) echo "env ROUNDS=${FEATURE_ROUNDS:-2} STEPS_SCALE=0.5 RUNS=\"ours_bs4 ours_bs4_prodigy ours_bs4_schedulefree" \
                 "ours_bs4_adafactor\" bash benchmarks/bench_train_sd.sh sd15 $WORK/features" ;;
  ditprofile) echo "env ROUNDS=1 RUNS=ours_bs1 SDPA_PICK=no-cudnn bash benchmarks/gpu_dit_parts.sh train $WORK/ditprofile" ;;
  compile) echo "env ROUNDS=2 RUNS=\"${COMPILE_RUNS:-ours_bs16 ours_bs16_compile ours_bs4 ours_bs4_pivotal}\"" \
                "COMPILE_TIMEOUT=300" \
                "bash benchmarks/bench_train_sd.sh sd15 $WORK/compile" ;;
  ditops) echo "python3 benchmarks/bench_dit_adapter_ops.py --model flux1 --device cuda --dtype bf16 --rounds 3" \
               "--repeats 4 --out $WORK/ditops" ;;
  dittrain) echo "env ROUNDS=${DIT_ROUNDS:-1} bash benchmarks/gpu_dit_parts.sh train $WORK/dittrain" ;;
  lowmem) echo "env STEPS=20 MODES=\"none fp8 nf4\" bash benchmarks/gpu_dit_parts.sh lowmem $WORK/lowmem" ;;
esac; }

if [ "${DRY_RUN:-0}" = 1 ]; then
  total=0
  echo "call $CALL: plan (dry run, nothing runs)"
  for p in "${PARTS[@]}"; do
    cmd=$(command_of "$p"); est=$(estimate "$p"); total=$(( total + est ))
    echo "- $p (~$est s): $cmd"
    script=$(grep -oE "(benchmarks|tests)/[a-z_0-9]+\.(py|sh)" <<< "$cmd" | head -1)
    [ -f "$script" ] || { echo "error: part $p needs $script, which is not in this checkout" >&2; exit 1; }
    case $cmd in *bench_train_sd.sh*)  # the runs it names exist, and their round orders
      eval "CHECK_ONLY=1 ${cmd#env }" | sed 's/^/    /' || { echo "error: part $p names runs bench_train_sd.sh does not have" >&2; exit 1; } ;;
    esac
  done
  echo "estimated total ${total} s of the ${BUDGET} s budget (a device call may run ${LIMIT} s)"
  [ "$total" -le "$BUDGET" ] || { echo "error: call $CALL would need ~${total} s, over its ${BUDGET} s budget; move a part to another call" >&2; exit 1; }
  exit 0
fi

mkdir -p "$OUTD" "$WORK"
SLOG="$OUTD/session_$CALL.md"
echo "command: bash benchmarks/gpu_session.sh $CALL (commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))" > "$SLOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD
# the carried wheels (device README: --target a folder on PYTHONPATH, no index, no dependencies)
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$SLOG" 2>&1 || { echo "error: installing the carried wheels failed (see $SLOG)" | tee -a "$SLOG" >&2; exit 1; }
  export PYTHONPATH=$PWD:/tmp/site
fi
python3 -c "import diffusers" 2>> "$SLOG" || { echo "error: diffusers is not importable on this machine; run" \
  "bash benchmarks/gpu_wheels.sh here first and carry .whl" | tee -a "$SLOG" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >> "$SLOG" 2>&1
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" >> "$SLOG" 2>&1

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
for p in "${PARTS[@]}"; do
  cmd=$(command_of "$p")
  need=$(( $(estimate "$p") / 2 ))
  if [ "$(left)" -lt "$need" ]; then echo "== $p skipped (time budget: $(left) s left)" | tee -a "$SLOG"; continue; fi
  mkdir -p "$WORK/$p"
  echo "== $p: $cmd" | tee -a "$SLOG"
  timeout "$(left)" bash -c "$cmd" > "$WORK/$p/output.md" 2> "$WORK/$p/stderr.txt"
  echo "== $p exit $? after $(( $(date +%s) - T0 )) s" | tee -a "$SLOG"
  { echo; echo "### $p"; echo; tail -60 "$WORK/$p/output.md"; } >> "$SLOG"
done
# Chrome traces stay out (the device returns files of 16 MiB at most); each profile's kernels.md goes in
tar -czf "$OUTD/results_$CALL.tar.gz" -C "$WORK" --exclude='*.safetensors' --exclude='out_*' --exclude='trace.json.gz' \
  . 2>> "$SLOG"
# The profiles also come back on their own: the tarball of call d (the Flux.1 model folder's logs and images) went
# over the file limit once, and its kernels.md with it.
find "$WORK" -name kernels.md | while read -r k; do
  rel=${k#"$WORK"/}; cp "$k" "$OUTD/kernels_${rel//\//_}"
done
echo "total $(( $(date +%s) - T0 )) s" | tee -a "$SLOG"
