#!/usr/bin/env bash
# Runs each argument on a GPU of its own, at the same time (GPU 0 the first, GPU 1 the second, ...), each one's
# output to $OUT/gpuN.log; waits for all. For a call on a several-GPU machine that does independent benches at once:
#   bash bench/device_call.sh "bash bench/parallel.sh 'python3 bench/sweep.py ...' 'python3 bench/step_time.py ...'"
# At the end everything under $OUT except images is packed into $OUT/results.tgz (deep folders of many files do
# not all come back from the device machine).
set -u
i=0
for cmd in "$@"; do
    CUDA_VISIBLE_DEVICES=$i bash -c "$cmd" > "$OUT/gpu$i.log" 2>&1 &
    i=$((i + 1))
done
wait
for n in $(seq 0 $((i - 1))); do echo "=== GPU $n"; tail -40 "$OUT/gpu$n.log"; done
(cd "$OUT" && tar czf /tmp/results.tgz --exclude='*.png' --exclude='*.safetensors' . && mv /tmp/results.tgz "$OUT/")
