#!/bin/bash
# Side-by-side DreamBooth LoRA training benchmark: diffusers' train_dreambooth_lora.py (the reference) vs
# scripts/train_sd.py, same random-weight model, same 8 images, rank 4, to_q/k/v/out.0, bf16, alternating.
#
# Usage (repo root, GPU machine, diffusers importable):   bash benchmarks/bench_train_sd.sh sd15|sdxl [OUT_DIR]
# Needs a .ref/ folder that is not in the repository (git-ignored): the reference script, a random-weight model
# builder and a step timer under .ref/tools/.
# CPU dry run of the plumbing: SIZE=tiny RES=64 STEPS_SCALE=0.2 bash benchmarks/bench_train_sd.sh sd15 /tmp/b
#
# Reference steps are timed by the .ref/ step timer (GPU sync after every optimizer step); ours by CUDA
# events recorded after every step (--time_steps). Both drop 10 warm-up steps and report the median.
set -u
MODE=${1:-sd15}
OUTD=${2:-${OUT:-/tmp/bench_out}}
mkdir -p "$OUTD"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SCALE=${STEPS_SCALE:-1}
steps() { python3 -c "print(max(14, int($1 * $SCALE)))"; }
LOG="$OUTD/bench_${MODE}.log"
: > "$LOG"

if [ "$MODE" = sd15 ]; then
  SIZE=${SIZE:-sd15}; RES=${RES:-512}; MODEL=/tmp/bench_$SIZE; IMGS=/tmp/bench_imgs_$SIZE
else
  SIZE=${SIZE:-sdxl}; RES=${RES:-1024}; MODEL=/tmp/bench_$SIZE; IMGS=/tmp/bench_imgs_$SIZE
fi
t0=$(date +%s)
[ -d "$MODEL" ] || python3 .ref/tools/make_random_sd.py "$MODEL" "$SIZE" 8 "$IMGS" >> "$LOG" 2>&1 || { tail "$LOG"; exit 1; }
echo "built $MODEL in $(( $(date +%s) - t0 )) s" | tee -a "$LOG"

COMMON=(--pretrained_model_name_or_path="$MODEL" --instance_data_dir="$IMGS" --instance_prompt="a photo of sks dog"
        --resolution="$RES" --learning_rate=1e-4 --seed=0 --checkpointing_steps=100000 --rank=4
        --mixed_precision=bf16)
ref() { label=$1; shift
  rm -rf "/tmp/out_$label"
  timeout 300 python3 .ref/tools/step_timer.py "$label" .ref/train_dreambooth_lora.py "${COMMON[@]}" \
    --output_dir="/tmp/out_$label" --report_to=tensorboard "$@" > "/tmp/log_$label" 2>&1
  { echo "== $label"; grep -E "STEPS|Error|error" "/tmp/log_$label" | tail -5; } | tee -a "$LOG"
}
ours() { label=$1; shift
  rm -rf "/tmp/out_$label"
  timeout "${T:-300}" python3 scripts/train_sd.py "${COMMON[@]}" --output_dir="/tmp/out_$label" --report_to=none \
    --strength_sweep= --time_steps --logging_steps=50 "$@" > "/tmp/log_$label" 2>&1
  { echo "== $label"; grep -E "STEPS|captured|error|Error" "/tmp/log_$label" | tail -5; } | tee -a "$LOG"
}

# RUNS picks runs by label (default: all of the mode's runs, in this order)
if [ "$MODE" = sd15 ]; then
  RUNS=${RUNS:-"ref_bs1 ours_bs1 ref_bs4 ours_bs4 ours_bs4_eager ours_bs16 ours_bs16_compile"}
  LIMIT=470
else
  RUNS=${RUNS:-"ours_xl_bs1 ours_xl_bs4"}
  LIMIT=55.6  # 790 TFLOP/s / (2.1 x 6.76 TFLOP per image) at 1024 px
fi
for r in $RUNS; do case $r in
  ref_bs1)  ref  ref_bs1  --train_batch_size=1 --max_train_steps=$(steps 80) ;;
  ours_bs1) ours ours_bs1 --train_batch_size=1 --max_train_steps=$(steps 200) ;;
  ref_bs4)  ref  ref_bs4  --train_batch_size=4 --max_train_steps=$(steps 50) ;;
  ours_bs4) ours ours_bs4 --train_batch_size=4 --max_train_steps=$(steps 150) ;;
  ours_bs4_fp32lora) ours ours_bs4_fp32lora --train_batch_size=4 --max_train_steps=$(steps 150) --lora_precision=fp32 ;;
  ours_bs4_eager) ours ours_bs4_eager --train_batch_size=4 --max_train_steps=$(steps 40) --cuda_graph=false --channels_last=false ;;
  ours_bs16) ours ours_bs16 --train_batch_size=16 --max_train_steps=$(steps 80) ;;
  ours_bs16_compile) T=${COMPILE_TIMEOUT:-300} ours ours_bs16_compile --train_batch_size=16 --max_train_steps=$(steps 60) --compile ;;
  # Training features (RUNS="ours_bs4 ours_bs4_ema ours_bs4_loraplus ours_bs4_prodigy ours_bs4_schedulefree"): EMA and
  # LoRA+ stay in the captured step; prodigy / schedule-free run the eager step (the log says why).
  ours_bs4_ema) ours ours_bs4_ema --train_batch_size=4 --max_train_steps=$(steps 150) --use_ema ;;
  ours_bs4_loraplus) ours ours_bs4_loraplus --train_batch_size=4 --max_train_steps=$(steps 150) --loraplus_lr_ratio=16 \
    --lr_per_component=unet.up=2e-4 ;;
  ours_bs4_prodigy) ours ours_bs4_prodigy --train_batch_size=4 --max_train_steps=$(steps 150) --optimizer=prodigy --learning_rate=1 ;;
  ours_bs4_schedulefree) ours ours_bs4_schedulefree --train_batch_size=4 --max_train_steps=$(steps 150) --optimizer=schedulefree ;;
  # Loss, mask and caption options (RUNS="ours_bs4 ours_bs4_losses ours_bs4_masked ours_bs4_captions"): all stay in
  # the captured step. --alpha_mask on images without alpha weighs every pixel 1: it times the mask's path, not
  # its values; the captions run shuffles only where the images' captions have commas.
  ours_bs4_losses) ours ours_bs4_losses --train_batch_size=4 --max_train_steps=$(steps 150) --loss_type=huber \
    --huber_schedule=snr --multires_noise_iterations=6 --debiased_estimation_loss ;;
  ours_bs4_masked) ours ours_bs4_masked --train_batch_size=4 --max_train_steps=$(steps 150) --alpha_mask ;;
  ours_bs4_captions) ours ours_bs4_captions --train_batch_size=4 --max_train_steps=$(steps 150) --shuffle_caption \
    --caption_dropout_rate=0.1 ;;
  # Pivotal tuning (RUNS="ours_bs4 ours_bs4_pivotal"): the new token vectors train through the live text encoder.
  ours_bs4_pivotal) ours ours_bs4_pivotal --train_batch_size=4 --max_train_steps=$(steps 150) --train_text_encoder_ti \
    --token_abstraction=sks ;;
  ours_xl_bs1) ours ours_xl_bs1 --train_batch_size=1 --max_train_steps=$(steps 40) ;;
  ours_xl_bs4) ours ours_xl_bs4 --train_batch_size=4 --max_train_steps=$(steps 30) ;;
  *) echo "unknown run $r" ;;
esac; done
for f in /tmp/log_ref_* /tmp/log_ours_*; do [ -f "$f" ] && { echo "#### $f"; tail -40 "$f"; } >> "$OUTD/logs_${MODE}.txt"; done

python3 - "$LOG" "$LIMIT" <<'EOF'
import re, sys
rows, label = {}, None
for line in open(sys.argv[1]):
    if line.startswith("== "):
        label = line[3:].strip()
    m = re.search(r"steps_per_s=([\d.]+).*peak_alloc_gib=([\d.]+)", line)
    if m and label:
        rows[label] = (float(m.group(1)), float(m.group(2)))
limit = float(sys.argv[2])
print(f"\n| run | bs | steps/s | images/s | peak alloc GiB | images/s vs ref | share of limit ({limit:g} img/s) |")
print("|---|---|---|---|---|---|---|")
for label, (sps, peak) in rows.items():
    bs = int(re.search(r"bs(\d+)", label).group(1))
    ref = rows.get(f"ref_bs{bs}")
    ratio = f"{sps * bs / (ref[0] * bs):.2f}x" if ref and not label.startswith("ref") else ""
    print(f"| {label} | {bs} | {sps:.2f} | {sps * bs:.1f} | {peak:.2f} | {ratio} | {100 * sps * bs / limit:.1f}% |")
EOF
