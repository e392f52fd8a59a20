#!/usr/bin/env bash
# Where does the wall time of a run go? py-spy recordings (sampled without pausing the process; wall clock:
# --idle keeps the time a thread waits) of the plain pipeline and of pixart-lowvram runs (unconstrained and the
# given budgets, default 8 GiB and 1.5 GiB) on the xl random model, each summarised by bench/spy_timeline.py.
# Needs py-spy (pip install py-spy).
#   bash bench/profile.sh OUT_DIR [MODEL_DIR] [BUDGET ...]
set -eu
out=$1; model=${2:-/tmp/pixart-xl-random}; shift $(( $# > 1 ? 2 : 1 ))
budgets=${*:-8GiB 1.5GiB}
work=/tmp/pixart-profile
mkdir -p "$out" "$work"
py=python3
[ -f "$model/pixart_lowvram_random.json" ] || $py -m pixart_lowvram.cli make-random-model --preset xl "$model" > "$out/build.log" 2>&1
cat "$model"/*/* > /dev/null
# as bench/budgets.py: compile the libraries' bytecode once, untimed
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pixart-bench-pycache}; unset PYTHONDONTWRITEBYTECODE
$py -c "import torch, transformers.models.t5.modeling_t5; from diffusers import PixArtAlphaPipeline; import pixart_lowvram.generate, pixart_lowvram.streaming, pixart_lowvram.vae_strips"
t() { local s=$(date +%s.%N); "$@"; local e=$(date +%s.%N); echo "WALL $(python3 -c "print(round($e-$s, 2))") s: ${*:1:12}"; }
spy() { local name=$1; shift; t py-spy record --idle --nonblocking -r 50 -f speedscope -o "$out/$name.json" -- "$@" > "$out/$name.log" 2>&1
        $py bench/spy_timeline.py "$out/$name.json" > "$out/$name.txt"; }
$py -m pixart_lowvram.cli run examples/seed-queue.toml --model "$model" --out $work/warm-up --no-embed-cache -q --force
spy run-unconstrained $py -m pixart_lowvram.cli run examples/seed-queue.toml --model "$model" --out $work/base --no-embed-cache -q --force
for b in $budgets; do
  mkdir -p $work/$b; cp $work/base/run.json $work/$b/run.json
  spy run-$b $py -m pixart_lowvram.cli run examples/seed-queue.toml --model "$model" --out $work/$b --no-embed-cache -q --vram-budget $b
done
spy reference $py bench/reference_pipeline.py "$model" $work/base $work/ref
for b in unconstrained $budgets; do
  echo "== $b"; $py -c "import json,sys; [print(s['name'], round(s['seconds'],2), round(s.get('load_seconds') or 0,2)) for s in json.load(open(sys.argv[1]))['stages']]" $work/${b/unconstrained/base}/run.json
done
head -c 3000 "$out"/*.txt
