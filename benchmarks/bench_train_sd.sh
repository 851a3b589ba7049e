#!/bin/bash
# Side-by-side DreamBooth LoRA training benchmark: diffusers' train_dreambooth_lora.py (the reference) vs
# scripts/train_sd.py, same random-weight model, same 8 images, rank 4, to_q/k/v/out.0, bf16.
#
# Usage (repo root, GPU machine, diffusers importable):   [ROUNDS=3] [RUNS="..."] bash benchmarks/bench_train_sd.sh sd15|sdxl|flux1 [OUT_DIR]
# flux1: diffusers' train_dreambooth_lora_flux.py vs ours on a real-size random-weight Flux.1-dev transformer
# (benchmarks/bench_dit_lowmem.py build) at 1024 px, rank 16, the reference's default modules on both sides.
# The runs named in RUNS are interleaved over ROUNDS rounds (benchmarks/timing.py: a seeded shuffled order per round,
# every other round reversed), and the table gives per run the median and min-max of images/s over the rounds, and
# against the reference at the same batch the per-round ratios (python benchmarks/timing.py train-log LOG LIMIT).
# The model: benchmarks/make_random_sd.py (sd15, tiny), benchmarks/bench_dit_lowmem.py (flux1); SDXL and the ref_*
# runs need the git-ignored .ref/ folder (diffusers' example script of the mode, .ref/tools/make_random_sd.py for
# SDXL); the reference is timed by benchmarks/step_timer.py.
# MODEL / IMGS name another model folder / image folder (built there when missing). CHECK_ONLY=1 checks RUNS and
# prints the round orders without running anything.
# CPU smoke run of the plumbing:
#   SIZE=tiny RES=64 STEPS_SCALE=0.2 ROUNDS=1 RUNS="ours_bs1 ours_bs4" bash benchmarks/bench_train_sd.sh sd15 /tmp/b
#
# Reference steps are timed by benchmarks/step_timer.py (GPU sync after every optimizer step); ours by CUDA
# events recorded after every step (--time_steps). Both drop 10 warm-up steps and report the median.
set -u
MODE=${1:-sd15}
OUTD=${2:-${OUT:-/tmp/bench_out}}
ROUNDS=${ROUNDS:-3}
SCALE=${STEPS_SCALE:-1}
case $MODE in
  sd15) SIZE=${SIZE:-sd15}; RES=${RES:-512}; LIMIT=470
        DEFAULT_RUNS="ref_bs1 ours_bs1 ref_bs4 ours_bs4 ours_bs4_eager ours_bs16 ours_bs16_compile" ;;
  sdxl) SIZE=${SIZE:-sdxl}; RES=${RES:-1024}; LIMIT=55.6  # 790 TFLOP/s / (2.1 x 6.76 TFLOP per image) at 1024 px
        DEFAULT_RUNS="ours_xl_bs1 ours_xl_bs4" ;;
  # Flux.1 at 1024 px: 4096 image + 512 text tokens; forward 2 x (3.2 B double-block params per stream x 4608
  # tokens + 5.4 B single-block params x 4608) + attention 57 x 4 x 4608^2 x 3072 = 94 TFLOP; x 2.1 for the
  # LoRA backward = 197 TFLOP per image; 790 TFLOP/s / 197 = 4.0 images/s
  flux1) SIZE=${SIZE:-flux1}; RES=${RES:-1024}; LIMIT=4.0  # SIZE flux1 (11.9 B) or flux1_tiny (CPU smoke)
        DEFAULT_RUNS="ref_bs1 ours_bs1" ;;
  *) echo "error: mode '$MODE': expected sd15, sdxl or flux1 (bash benchmarks/bench_train_sd.sh sd15|sdxl|flux1 [OUT_DIR])" >&2
     exit 2 ;;
esac
RUNS=${RUNS:-$DEFAULT_RUNS}
MODEL=${MODEL:-/tmp/bench_$SIZE}; IMGS=${IMGS:-/tmp/bench_imgs_$SIZE}
REF_DIR=${REF_DIR:-.ref}; REF_SCRIPT=$REF_DIR/train_dreambooth_lora.py; RANK=4; OURS_FLAGS=(); REF_FLAGS=(); BS1_REF=80; BS1_OURS=200
if [ "$MODE" = flux1 ]; then  # the reference's default LoRA modules (its target_modules list) on both sides
  REF_SCRIPT=$REF_DIR/train_dreambooth_lora_flux.py; RANK=16; BS1_REF=30; BS1_OURS=30
  OURS_FLAGS=("--unet_targets=re:.*transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))")
  REF_FLAGS=(--guidance_scale=1 --max_sequence_length=512)
  # --profile_steps: where the step's time goes (issue #16), steps 6-10, inside the 10 warm-up steps the timing drops;
  # writing the 12 B model's Chrome trace takes about 80 s of the run, FLUX_PROFILE_STEPS=0 leaves it out
  OURS_FLAGS+=(--guidance_scale=1 --max_sequence_length=512 --profile_steps="${FLUX_PROFILE_STEPS:-5}")
fi
steps() { awk -v n="$1" -v s="$SCALE" 'BEGIN { v = int(n * s); print (v < 14 ? 14 : v) }'; }

# kind (ref|ours), timeout in s, then the run's own flags; unknown labels fail (checked before anything runs)
args_of() { case $1 in
  ref_bs1)  echo "ref 300 --train_batch_size=1 --max_train_steps=$(steps $BS1_REF)" ;;
  ours_bs1) echo "ours 300 --train_batch_size=1 --max_train_steps=$(steps $BS1_OURS)" ;;
  ref_bs4)  echo "ref 300 --train_batch_size=4 --max_train_steps=$(steps 50)" ;;
  ours_bs4) echo "ours 300 --train_batch_size=4 --max_train_steps=$(steps 150)" ;;
  ours_bs4_fp32lora) echo "ours 300 --train_batch_size=4 --max_train_steps=$(steps 150) --lora_precision=fp32" ;;
  ours_bs4_eager) echo "ours 300 --train_batch_size=4 --max_train_steps=$(steps 40) --cuda_graph=false --channels_last=false" ;;
  # --profile_steps profiles steps 6-10, inside the 10 warm-up steps --time_steps drops: the table of where the
  # step's time goes (issue #17) costs the timing nothing; it lands in OUT_DIR/profiles/<run>_r<round>/kernels.md
  ours_bs16) echo "ours 300 --train_batch_size=16 --max_train_steps=$(steps 80) --profile_steps=5" ;;
  ours_bs16_compile) echo "ours ${COMPILE_TIMEOUT:-400} --train_batch_size=16 --max_train_steps=$(steps 60) --compile" ;;
  # Training features (issue #18: the step stays as fast with them; RUNS="ours_bs4 ours_bs4_ema ours_bs4_loraplus
  # ours_bs4_prodigy ours_bs4_schedulefree ours_bs4_adafactor"): EMA and LoRA+ stay in the captured step; prodigy,
  # schedule-free and Adafactor run the eager step (the log says why).
  ours_bs4_ema) echo "ours 300 --train_batch_size=4 --max_train_steps=$(steps 150) --use_ema" ;;
  ours_bs4_loraplus) echo "ours 300 --train_batch_size=4 --max_train_steps=$(steps 150) --loraplus_lr_ratio=16 --lr_per_component=unet.up=2e-4" ;;
  ours_bs4_prodigy) echo "ours 300 --train_batch_size=4 --max_train_steps=$(steps 150) --optimizer=prodigy --learning_rate=1" ;;
  ours_bs4_schedulefree) echo "ours 300 --train_batch_size=4 --max_train_steps=$(steps 150) --optimizer=schedulefree" ;;
  ours_bs4_adafactor) echo "ours 300 --train_batch_size=4 --max_train_steps=$(steps 150) --optimizer=adafactor" ;;
  # Loss, mask and caption options (RUNS="ours_bs4 ours_bs4_losses ours_bs4_masked ours_bs4_captions"): all stay in
  # the captured step. --alpha_mask on images without alpha weighs every pixel 1: it times the mask's path, not
  # its values; the captions run shuffles only where the images' captions have commas.
  ours_bs4_losses) echo "ours 300 --train_batch_size=4 --max_train_steps=$(steps 150) --loss_type=huber --huber_schedule=snr --multires_noise_iterations=6 --debiased_estimation_loss" ;;
  ours_bs4_masked) echo "ours 300 --train_batch_size=4 --max_train_steps=$(steps 150) --alpha_mask" ;;
  ours_bs4_captions) echo "ours 300 --train_batch_size=4 --max_train_steps=$(steps 150) --shuffle_caption --caption_dropout_rate=0.1" ;;
  # Pivotal tuning (RUNS="ours_bs4 ours_bs4_pivotal"): the new token vectors train through the live text encoder.
  ours_bs4_pivotal) echo "ours 300 --train_batch_size=4 --max_train_steps=$(steps 150) --train_text_encoder_ti --token_abstraction=sks" ;;
  ours_xl_bs1) echo "ours 300 --train_batch_size=1 --max_train_steps=$(steps 40)" ;;
  ours_xl_bs4) echo "ours 300 --train_batch_size=4 --max_train_steps=$(steps 30)" ;;
  *) return 1 ;;
esac; }
for r in $RUNS; do
  args_of "$r" > /dev/null || { echo "error: RUNS names '$r', which is no run of bench_train_sd.sh; the runs are the labels of args_of in benchmarks/bench_train_sd.sh (e.g. ours_bs4)" >&2; exit 2; }
  case $r in ref_*) [ -f "$REF_SCRIPT" ] || { echo "error: run '$r' needs the reference script $REF_SCRIPT (diffusers' examples/dreambooth, git-ignored, not in the repository); leave the ref_* runs out of RUNS" >&2; exit 2; } ;; esac
done
mapfile -t ORDERS < <(python3 benchmarks/timing.py order "$ROUNDS" $RUNS) || exit 2
[ "${#ORDERS[@]}" -gt 0 ] || exit 2
if [ "${CHECK_ONLY:-0}" = 1 ]; then  # the plan only (gpu_session.sh's dry run): runs checked, nothing run
  printf 'round order: %s\n' "${ORDERS[@]}"; exit 0
fi

mkdir -p "$OUTD/runs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LOG="$OUTD/bench_${MODE}.log"
CMD="command: ROUNDS=$ROUNDS RUNS=\"$RUNS\" SIZE=$SIZE RES=$RES STEPS_SCALE=$SCALE${BENCH_EXTRA:+ BENCH_EXTRA=\"$BENCH_EXTRA\"}${BENCH_SDPA:+ BENCH_SDPA=$BENCH_SDPA} bash benchmarks/bench_train_sd.sh $MODE $OUTD"
echo "$CMD" | tee "$LOG"
t0=$(date +%s)
if [ ! -d "$MODEL" ]; then
  if [ "$MODE" = flux1 ]; then BUILD=(benchmarks/bench_dit_lowmem.py build --out "$MODEL" --size "$([ "$SIZE" = flux1_tiny ] && echo tiny || echo full)"
                                      --images "$IMGS" --resolution "$RES")
  elif [ "$SIZE" = sdxl ]; then BUILD=("$REF_DIR"/tools/make_random_sd.py "$MODEL" "$SIZE" 8 "$IMGS")
  else BUILD=(benchmarks/make_random_sd.py "$MODEL" "$SIZE" 8 "$IMGS" "$RES"); fi
  python3 "${BUILD[@]}" >> "$LOG" 2>&1 || { tail "$LOG" >&2; echo "error: could not build the model with ${BUILD[*]}" >&2; exit 1; }
fi
echo "model $MODEL ready after $(( $(date +%s) - t0 )) s" | tee -a "$LOG"

COMMON=(--pretrained_model_name_or_path="$MODEL" --instance_data_dir="$IMGS" --instance_prompt="a photo of sks dog"
        --resolution="$RES" --learning_rate=1e-4 --seed=0 --checkpointing_steps=100000 --rank=$RANK
        --mixed_precision=bf16 ${BENCH_EXTRA:-})  # BENCH_EXTRA: flags for both sides (gpu_dit_parts.sh)
run_one() { label=$1; round=$2
  read -r kind limit flags <<< "$(args_of "$label")"
  out="$OUTD/runs/out_$label"; log="$OUTD/runs/${label}_r$round.log"
  rm -rf "$out"
  if [ "$kind" = ref ]; then
    # shellcheck disable=SC2086
    timeout "$limit" python3 benchmarks/step_timer.py "$label" "$REF_SCRIPT" "${COMMON[@]}" "${REF_FLAGS[@]}" \
      --output_dir="$out" --report_to=tensorboard $flags > "$log" 2>&1
  else
    # shellcheck disable=SC2086
    timeout "$limit" python3 scripts/train_sd.py "${COMMON[@]}" --output_dir="$out" --report_to=none \
      --strength_sweep= --time_steps --logging_steps=50 --export_kohya=false "${OURS_FLAGS[@]}" $flags > "$log" 2>&1
  fi
  echo "exit $? after $(( $(date +%s) - t0 )) s" >> "$log"
  if [ -d "$out/profile" ]; then mkdir -p "$OUTD/profiles"; cp -r "$out/profile" "$OUTD/profiles/${label}_r$round"; fi
  { echo "== $label@r$round"; grep -E "STEPS|first step done|captured|error|Error|^exit" "$log" | tail -6; } | tee -a "$LOG"
  rm -rf "$out"
}
for i in "${!ORDERS[@]}"; do
  for r in ${ORDERS[$i]}; do run_one "$r" $(( i + 1 )); done
  echo "round $(( i + 1 ))/$ROUNDS done (${ORDERS[$i]})" | tee -a "$LOG"
done
for f in "$OUTD"/runs/*.log; do { echo "#### $f"; tail -40 "$f"; } >> "$OUTD/logs_${MODE}.txt"; done

{ echo "$CMD"; echo; python3 benchmarks/timing.py train-log "$LOG" "$LIMIT"; } | tee "$OUTD/table_${MODE}.md"
grep -q "^| " "$OUTD/table_${MODE}.md"  # exit 1 when no run gave a STEPS line
