#!/usr/bin/env bash
# Each PixArt kind, full size (random weights), through the staged queue under a VRAM budget on the GPU: builds
# the xl preset, runs two 1024 px images (512 px for DMD) at --vram-budget BUDGET, and prints each stage's time
# and peaks, the plan, and whether the images are finite and not flat (PixArt-Σ's SDXL VAE overflows in float16).
#   bash bench/family_gpu.sh OUT_DIR [BUDGET] [PRESETS...]
set -eu
out=$1; budget=${2:-1.5GiB}; shift 2 || true
presets=${*:-xl-sigma xl-lcm xl-dmd}
mkdir -p "$out"
for preset in $presets; do
  model=/tmp/pixart-$preset
  python3 -m pixart_lowvram.cli make-random-model --preset "$preset" "$model" > "$out/build-$preset.log" 2>&1
  cat "$model"/*/* > /dev/null
  python3 -m pixart_lowvram.cli generate "a lighthouse on a cliff at dusk, oil painting" --count 2 --seed 7 \
    --model "$model" --vram-budget "$budget" --out "/tmp/family-$preset" --no-embed-cache --force > "$out/run-$preset.log" 2>&1
  python3 - "$preset" "/tmp/family-$preset" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
preset, folder = sys.argv[1], Path(sys.argv[2])
run = json.loads((folder / "run.json").read_text())
gib = 2**30
print(f"== {preset}: plan", {k: v["placement"] for k, v in run["plan"].items()})
for s in run["stages"]:
    print(f"   {s['name']:8} {s['seconds']:.1f} s  torch {(s['torch_peak'] or 0) / gib:.2f} GiB  NVML {(s['nvml_peak'] or 0) / gib:.2f} GiB")
for png in sorted((folder / "images").glob("*.png")):
    a = np.asarray(Image.open(png).convert("RGB")).astype(float)
    print(f"   {png.name}: {a.shape[1]}x{a.shape[0]} mean {a.mean():.1f} std {a.std():.1f} finite {np.isfinite(a).all()}")
    print("   " + Image.open(png).text["parameters"].splitlines()[-1][:150])
PY
done
