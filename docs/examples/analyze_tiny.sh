#!/usr/bin/env bash
# The worked example of README "What did the adapter learn? lora-vision analyze", offline on a CPU:
# the main job's UNet part (configs/tiny.yaml, --train_text_encoder false: rank 8 on the UNet transformer blocks of the
# pretrained tiny model) with two seeds, `lora-vision analyze` on the pair against the tiny base, then the PNGs shrunk
# to 128-colour palettes for docs/img/analyze/.
#   bash docs/examples/analyze_tiny.sh [WORK_DIR]    (default outputs/analyze_example; about a minute per run on 2 idle cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-outputs/analyze_example}

train() {  # name seed
    [ -f "$WORK/$1/adapter.safetensors" ] || python scripts/train_sd.py --output_dir "$WORK/$1" --seed "$2" \
        --class_data_dir "$WORK/class_images_seed$2" --train_text_encoder false
}
train r8_seed0 0
train r8_seed1 1

python -m lora_vision.cli analyze "$WORK/r8_seed0/adapter.safetensors" "$WORK/r8_seed1/adapter.safetensors" \
    --labels "r8 seed0" "r8 seed1" --base tiny --suggest-rank -o "$WORK/seeds"

mkdir -p docs/img/analyze
python - "$WORK" <<'EOF'
import sys
from PIL import Image

work = sys.argv[1]
for src, dst in (("seeds/update_norm", "update_norm"), ("seeds/spectra", "spectra"),
                 ("seeds/similarity", "similarity_seeds"), ("seeds/similarity_layers", "similarity_layers_seeds"),
                 ("seeds/amplification", "amplification")):
    im = Image.open(f"{work}/{src}.png").convert("RGB")
    im.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        f"docs/img/analyze/{dst}.png", optimize=True)
EOF
du -ch docs/img/analyze/*.png | tail -1

# The suggested ranks (99% of each update's energy) feed resize directly.
python -m lora_vision.cli resize "$WORK/r8_seed0/adapter.safetensors" --ranks "$WORK/seeds/suggested_ranks.json" \
    -o "$WORK/r8_seed0_resized.safetensors"
ls -l "$WORK/r8_seed0/adapter.safetensors" "$WORK/r8_seed0_resized.safetensors"
