#!/bin/bash
# Several GPUs: SD 1.5 DreamBooth LoRA (rank 4, bf16, batch 4 per GPU) and ViT-B/16 LoRA (batch 128 per GPU, bf16)
# on 1 GPU vs 2 GPUs, plus the same global batch on 1 and 2 GPUs (loss curves), plus an FSDP smoke run of the ViT.
# SD: the CUDA-graph step on 1 GPU vs on 2 GPUs (sd_*_graph: the gradients' all-reduce captured in the graph), and
# the eager step on both (--cuda_graph=false). Every run starts with `accelerate launch --config_file
# configs/accelerate/multi_gpu.yaml --num_processes N` (single_gpu.yaml for N=1), as a user starts one.
# The configurations are interleaved over ROUNDS rounds (benchmarks/timing.py's order: seeded shuffle, every other
# round reversed); multi_gpu_summary.py reports per configuration the median and min-max of images/s over the rounds
# and the scaling as the median (min-max) of the per-round ratios.
#
# Usage (repo root, a machine with 2 GPUs, diffusers importable):   [ROUNDS=3] bash benchmarks/bench_multi_gpu.sh [OUT_DIR]
# Issue #20's measurement (1 GPU captured vs 2 GPUs captured, target 1.9x):
#   RUNS="sd_1gpu_b4_graph sd_2gpu_b4_graph" ROUNDS=3 bash benchmarks/bench_multi_gpu.sh /tmp/mg_graph
# RUNS picks configurations by label (default: all); BUDGET (s) skips later runs once spent; MASTER_PORT the port.
# The model: benchmarks/make_random_sd.py (random-weight SD 1.5 + 8 images; MODEL / IMGS name other folders).
# CPU dry run of the plumbing (gloo, tiny models):   CPU=1 ROUNDS=1 bash benchmarks/bench_multi_gpu.sh /tmp/mg
set -u
OUTD=${1:-${OUT:-/tmp/multi_gpu_out}}
ROUNDS=${ROUNDS:-3}
RUNS=${RUNS:-"sd_1gpu_b4_graph sd_2gpu_b4_graph sd_1gpu_b4 sd_2gpu_b4 sd_1gpu_b8 vit_1gpu vit_2gpu vit_2gpu_fsdp"}
PORT=${MASTER_PORT:-29561}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
BUDGET=${BUDGET:-345}  # seconds; later runs are skipped once this is spent
if [ "${CPU:-0}" = 1 ]; then
  export ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1
  SIZE=tiny; RES=64; STEPS=14; VIT=(--tiny --batch 8 --steps 4 --warmup 2)
else
  SIZE=sd15; RES=512; STEPS=${STEPS:-30}; VIT=(--batch 128 --steps 30 --warmup 10)
fi
# label -> kind (sd|vit), processes, the run's own flags; unknown labels fail before anything runs
spec() { case $1 in
  sd_1gpu_b4) echo "sd 1 --train_batch_size=4 --cuda_graph=false" ;;
  sd_2gpu_b4) echo "sd 2 --train_batch_size=4 --cuda_graph=false" ;;
  sd_2gpu_b4_graph) echo "sd 2 --train_batch_size=4" ;;
  sd_1gpu_b8) echo "sd 1 --train_batch_size=8 --cuda_graph=false" ;;
  sd_1gpu_b4_graph) echo "sd 1 --train_batch_size=4" ;;
  vit_1gpu) echo "vit 1" ;;
  vit_2gpu) echo "vit 2" ;;
  vit_2gpu_fsdp) echo "vit 2 --fsdp --save $OUTD/vit_fsdp_lora.safetensors" ;;
  *) return 1 ;;
esac; }
for r in $RUNS; do
  spec "$r" > /dev/null || { echo "error: RUNS names '$r', which is no configuration of bench_multi_gpu.sh; the labels are those of spec() in benchmarks/bench_multi_gpu.sh (e.g. sd_2gpu_b4)" >&2; exit 2; }
done
mapfile -t ORDERS < <(python3 benchmarks/timing.py order "$ROUNDS" $RUNS) || exit 2
[ "${#ORDERS[@]}" -gt 0 ] || exit 2
mkdir -p "$OUTD/runs"
LOG="$OUTD/multi_gpu.log"
CMD="command: CPU=${CPU:-0} ROUNDS=$ROUNDS RUNS=\"$RUNS\" bash benchmarks/bench_multi_gpu.sh $OUTD"
echo "$CMD" | tee "$LOG"
# `accelerate launch` with the config files users launch with (on the CPU, ACCELERATE_USE_CPU=true makes them gloo
# processes); called as the module behind the console script, which a wheel installed with --target (the GPU
# sessions) leaves off PATH
launch() { n=$1; shift
  if [ "$n" = 1 ]; then python3 -m accelerate.commands.launch --config_file configs/accelerate/single_gpu.yaml "$@"
  else python3 -m accelerate.commands.launch --config_file configs/accelerate/multi_gpu.yaml --num_processes "$n" \
    --main_process_port "$PORT" "$@"; fi; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
MODEL=${MODEL:-/tmp/mg_$SIZE}; IMGS=${IMGS:-/tmp/mg_imgs_$SIZE}
if [ ! -d "$MODEL" ]; then
  python3 benchmarks/make_random_sd.py "$MODEL" "$SIZE" 8 "$IMGS" "$RES" >> "$LOG" 2>&1 \
    || { tail "$LOG" >&2; echo "error: could not build the model with benchmarks/make_random_sd.py" >&2; exit 1; }
fi
echo "model $MODEL ready after $(( $(date +%s) - T0 )) s" | tee -a "$LOG"

COMMON=(--pretrained_model_name_or_path="$MODEL" --instance_data_dir="$IMGS" --instance_prompt="a photo of sks dog"
        --resolution="$RES" --learning_rate=1e-4 --seed=0 --checkpointing_steps=100000 --rank=4
        --mixed_precision=bf16 --report_to=none --strength_sweep= --export_kohya=false --time_steps
        --logging_steps=1 --max_train_steps="$STEPS")
run_one() { label=$1; round=$2
  read -r kind n flags <<< "$(spec "$label")"
  need=$([ "$kind" = sd ] && echo 40 || echo 25)
  if [ "$(left)" -lt "$need" ]; then echo "== $label@r$round ($n process(es)) skipped (time budget)" | tee -a "$LOG"; return; fi
  log="$OUTD/runs/${label}_r$round.log"
  if [ "$kind" = sd ]; then
    out="$OUTD/runs/out_$label"; rm -rf "$out"
    # shellcheck disable=SC2086
    timeout "$(left)" bash -c "$(declare -f launch); PORT=$PORT; launch $n scripts/train_sd.py \
      $(printf '%q ' "${COMMON[@]}") --output_dir=$out $flags" > "$log" 2>&1
    [ "$round" = 1 ] && cp "$out/logs/loss.csv" "$OUTD/loss_$label.csv" 2>/dev/null
    rm -rf "$out"
    { echo "== $label@r$round ($n process(es))"; grep -E "STEPS|captured|rror" "$log" | tail -6; } | tee -a "$LOG"
  else
    # shellcheck disable=SC2086
    timeout "$(left)" bash -c "$(declare -f launch); PORT=$PORT; launch $n benchmarks/bench_vit_ddp.py \
      $(printf '%q ' "${VIT[@]}") $flags" > "$log" 2>&1
    { echo "== $label@r$round ($n process(es))"; grep -E "RESULT|rror" "$log" | tail -4; } | tee -a "$LOG"
  fi
}
for i in "${!ORDERS[@]}"; do
  for r in ${ORDERS[$i]}; do run_one "$r" $(( i + 1 )); done
  echo "round $(( i + 1 ))/$ROUNDS done (${ORDERS[$i]})" | tee -a "$LOG"
done
{ echo "$CMD"; echo; python3 benchmarks/multi_gpu_summary.py "$OUTD"; } | tee "$OUTD/summary.md"
echo "total $(( $(date +%s) - T0 )) s"
grep -q "^| [a-z]" "$OUTD/summary.md"  # exit 1 when no configuration gave a number
