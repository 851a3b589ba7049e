#!/bin/bash
# The Flux.1 training parts of benchmarks/gpu_session.sh (issue #16), each after one check that a training
# backward of the real-size transformer runs on this GPU (benchmarks/flux_backward_check.py; its first working
# attention setting is applied to ours and the reference alike through benchmarks/sdpa_site):
#   bash benchmarks/gpu_dit_parts.sh train OUT_DIR     # ours vs diffusers' train_dreambooth_lora_flux.py, 2 rounds
#   bash benchmarks/gpu_dit_parts.sh lowmem OUT_DIR    # --quantize_base none/int8/fp8/nf4, 30 steps each
set -u
PART=${1:-}; OUTD=${2:-/tmp/gpu_dit}
case $PART in train|lowmem) ;; *)
  echo "error: part '$PART': expected train or lowmem (bash benchmarks/gpu_dit_parts.sh train|lowmem OUT_DIR)" >&2
  exit 2 ;;
esac
mkdir -p "$OUTD"
PICKED=/tmp/flux_sdpa_pick
# SDPA_PICK names the setting without the check (no-cudnn: what the check picked on the H200 with torch 2.11)
[ -n "${SDPA_PICK:-}" ] && echo "$SDPA_PICK" > "$PICKED" && echo "attention setting given (SDPA_PICK), no check" > "$OUTD/backward_check.txt"
if [ ! -s "$PICKED" ]; then
  python3 benchmarks/flux_backward_check.py 2>&1 | tee "$OUTD/backward_check.txt" | grep -E "^CHECK|^PICK|Error"
  sed -n 's/^PICK //p' "$OUTD/backward_check.txt" > "$PICKED"
fi
[ -s "$PICKED" ] || { echo "error: no attention setting ran a Flux.1 training backward (see $OUTD/backward_check.txt)" >&2; rm -f "$PICKED"; exit 1; }
export BENCH_SDPA; BENCH_SDPA=$(cat "$PICKED"); export PYTHONPATH=$PWD/benchmarks/sdpa_site:${PYTHONPATH:-}
export BENCH_EXTRA=""  # both scripts' flag when only a recomputed backward runs
[ "$BENCH_SDPA" = checkpointing ] && BENCH_EXTRA="--gradient_checkpointing"
echo "attention setting for both sides: $BENCH_SDPA ${BENCH_EXTRA}"
case $PART in
  train) ROUNDS=${ROUNDS:-2} MODEL=/tmp/bench_flux1 IMGS=/tmp/bench_imgs_flux1 RUNS=${RUNS:-"ref_bs1 ours_bs1"} \
           bash benchmarks/bench_train_sd.sh flux1 "$OUTD" ;;
  lowmem) { [ -d /tmp/bench_flux1 ] || python3 benchmarks/bench_dit_lowmem.py build --out /tmp/bench_flux1; } &&
          python3 benchmarks/bench_dit_lowmem.py compare --model /tmp/bench_flux1 --steps "${STEPS:-30}" \
            --modes ${MODES:-none int8 fp8 nf4} --out "$OUTD" ;;
esac
