#!/bin/bash
# Several GPUs: SD 1.5 DreamBooth LoRA (rank 4, bf16, batch 4 per GPU) and ViT-B/16 LoRA (batch 128 per GPU, bf16)
# on 1 GPU vs 2 GPUs (DDP through accelerate), plus the same global batch on 1 and 2 GPUs (loss curves), plus an
# FSDP smoke run of the ViT.
#
# Usage (repo root, a machine with 2 GPUs, diffusers importable):   bash benchmarks/bench_multi_gpu.sh [OUT_DIR]
# Needs the git-ignored .ref/tools/make_random_sd.py (random-weight SD 1.5 pipeline + 8 images).
# CPU dry run of the plumbing (gloo, tiny models):   CPU=1 bash benchmarks/bench_multi_gpu.sh /tmp/mg
set -u
OUTD=${1:-${OUT:-/tmp/multi_gpu_out}}
mkdir -p "$OUTD"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
LOG="$OUTD/multi_gpu.log"
: > "$LOG"
T0=$(date +%s)
BUDGET=${BUDGET:-345}  # seconds; later runs are skipped once this is spent
if [ "${CPU:-0}" = 1 ]; then
  export ACCELERATE_USE_CPU=true OMP_NUM_THREADS=1
  SIZE=tiny; RES=64; STEPS=14; VIT=(--tiny --batch 8 --steps 4 --warmup 2)
else
  SIZE=sd15; RES=512; STEPS=${STEPS:-30}; VIT=(--batch 128 --steps 30 --warmup 10)
fi
# torchrun starts one process per GPU and accelerate takes the setup from its environment; the same as
# `accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes N` (single_gpu.yaml for N=1)
launch() { n=$1; shift; python3 -m torch.distributed.run --nproc_per_node "$n" --master_port 29561 "$@"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
MODEL=/tmp/mg_$SIZE; IMGS=/tmp/mg_imgs_$SIZE
[ -d "$MODEL" ] || python3 .ref/tools/make_random_sd.py "$MODEL" "$SIZE" 8 "$IMGS" >> "$LOG" 2>&1 || { tail "$LOG"; exit 1; }
echo "built $MODEL in $(( $(date +%s) - T0 )) s" | tee -a "$LOG"

COMMON=(--pretrained_model_name_or_path="$MODEL" --instance_data_dir="$IMGS" --instance_prompt="a photo of sks dog"
        --resolution="$RES" --learning_rate=1e-4 --seed=0 --checkpointing_steps=100000 --rank=4
        --mixed_precision=bf16 --report_to=none --strength_sweep= --export_kohya=false --time_steps
        --logging_steps=1 --max_train_steps="$STEPS")
sd() { label=$1; n=$2; shift 2
  if [ "$(left)" -lt 40 ]; then echo "== $label skipped (time budget)" | tee -a "$LOG"; return; fi
  rm -rf "/tmp/out_$label"
  timeout "$(left)" bash -c "$(declare -f launch); launch $n scripts/train_sd.py $(printf '%q ' "${COMMON[@]}") \
    --output_dir=/tmp/out_$label $(printf '%q ' "$@")" > "/tmp/log_$label" 2>&1
  { echo "== $label ($n process(es))"; grep -E "STEPS|captured|rror" "/tmp/log_$label" | tail -6; } | tee -a "$LOG"
  cp "/tmp/out_$label/logs/loss.csv" "$OUTD/loss_$label.csv" 2>/dev/null
}
vit() { label=$1; n=$2; shift 2
  if [ "$(left)" -lt 25 ]; then echo "== $label skipped (time budget)" | tee -a "$LOG"; return; fi
  timeout "$(left)" bash -c "$(declare -f launch); launch $n benchmarks/bench_vit_ddp.py $(printf '%q ' "${VIT[@]}" "$@")" \
    > "/tmp/log_$label" 2>&1
  { echo "== $label ($n process(es))"; grep -E "RESULT|rror" "/tmp/log_$label" | tail -4; } | tee -a "$LOG"
}

sd sd_1gpu_b4 1 --train_batch_size=4 --cuda_graph=false
sd sd_2gpu_b4 2 --train_batch_size=4
sd sd_1gpu_b8 1 --train_batch_size=8 --cuda_graph=false
vit vit_1gpu 1
vit vit_2gpu 2
vit vit_2gpu_fsdp 2 --fsdp --save "$OUTD/vit_fsdp_lora.safetensors"
sd sd_1gpu_b4_graph 1 --train_batch_size=4
python3 benchmarks/multi_gpu_summary.py "$OUTD" | tee "$OUTD/summary.md"
echo "total $(( $(date +%s) - T0 )) s"
