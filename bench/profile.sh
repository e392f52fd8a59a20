#!/usr/bin/env bash
# Where does the wall time of a run go? cProfile of the plain pipeline and of pixart-lowvram runs (8 GiB and
# 1.5 GiB budgets), plus import and CUDA start-up times, on the xl random model.
#   bash bench/profile.sh OUT_DIR [MODEL_DIR]
set -eu
out=$1; model=${2:-/tmp/pixart-xl-random}; work=/tmp/pixart-profile
mkdir -p "$out" "$work"
py=python3
[ -f "$model/pixart_lowvram_random.json" ] || $py -m pixart_lowvram.cli make-random-model --preset xl "$model" > "$out/build.log" 2>&1
cat "$model"/*/* > /dev/null
t() { local s=$(date +%s.%N); "$@"; local e=$(date +%s.%N); echo "WALL $(python3 -c "print(round($e-$s, 2))") s: ${*:1:8}"; }
t $py -c "import torch; torch.zeros(1, device='cuda')"
t $py -c "import torch, diffusers; from diffusers import PixArtAlphaPipeline; torch.zeros(1, device='cuda')"
t $py -c "import pixart_lowvram.cli"
$py -X importtime -c "from diffusers import PixArtAlphaPipeline; import pixart_lowvram.generate" 2> "$out/importtime.txt"
sort -t'|' -k2 -n -r "$out/importtime.txt" | head -25
t $py -m pixart_lowvram.cli run examples/seed-queue.toml --model "$model" --out $work/base --no-embed-cache -q --force
for b in 8GiB 1.5GiB; do
  mkdir -p $work/$b; cp $work/base/run.json $work/$b/run.json
  t $py -m cProfile -o "$out/run-$b.prof" -m pixart_lowvram.cli run examples/seed-queue.toml --model "$model" \
     --out $work/$b --no-embed-cache -q --vram-budget $b
done
t $py -m cProfile -o "$out/ref.prof" bench/reference_pipeline.py "$model" $work/base $work/ref
for p in "$out"/*.prof; do
  echo "== $p"; $py -c "import pstats,sys; s=pstats.Stats(sys.argv[1]); s.sort_stats('cumulative').print_stats(45)" "$p" | sed -n '1,80p' | cut -c1-160
done
