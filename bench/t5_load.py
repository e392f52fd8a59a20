"""How long T5 takes to reach the GPU, two ways, each in a fresh process, interleaved: `from_pretrained(dtype=...)`
on the CPU then `.to(device)` (models.load_text_encoder today), and `from_pretrained(..., device_map={"": index})`,
which reads the safetensors straight onto the GPU. The files are read once first, so both read the page cache.
Checks that both give the same tensors (dtypes included: transformers keeps T5's `wo` in float32 either way).

    python bench/t5_load.py --model FOLDER --out OUT [--rounds 3]

Writes OUT/t5_load.json and prints a table."""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import hashlib, json, sys, time
import torch
from transformers import T5EncoderModel
folder, way = sys.argv[1], sys.argv[2]
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
start = time.perf_counter()
if way == "cpu-then-to":
    model = T5EncoderModel.from_pretrained(folder, dtype=torch.float16, use_safetensors=True).to("cuda")
else:
    model = T5EncoderModel.from_pretrained(folder, dtype=torch.float16, use_safetensors=True, device_map={"": 0})
torch.cuda.synchronize()
seconds = time.perf_counter() - start
digest = hashlib.sha256()
dtypes = {}
for name, t in sorted(model.state_dict().items()):
    digest.update(name.encode())
    digest.update(t.float().sum().item().hex().encode())
    dtypes[str(t.dtype)] = dtypes.get(str(t.dtype), 0) + 1
print("RESULT " + json.dumps({"way": way, "seconds": seconds, "digest": digest.hexdigest(), "dtypes": dtypes,
                              "device": str(next(model.parameters()).device),
                              "peak_gib": torch.cuda.max_memory_allocated() / 2**30}))
"""
WAYS = ("cpu-then-to", "device_map")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a PixArt model folder (its text_encoder/ is loaded)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folder = args.model / "text_encoder"
    subprocess.run(f"cat {folder}/* > /dev/null", shell=True, check=True)
    rows = []
    for rnd in range(args.rounds):
        for way in WAYS:
            proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), way], capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            row = {"round": rnd, **(json.loads(line[7:]) if line else {"way": way, "error": proc.stderr[-800:]})}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for way in WAYS:
        times = [r["seconds"] for r in rows if r["way"] == way and "seconds" in r]
        summary[way] = {"median_s": statistics.median(times) if times else None,
                        "digests": sorted({r["digest"] for r in rows if r["way"] == way and "digest" in r})}
    same = len({d for s in summary.values() for d in s["digests"]}) == 1
    (args.out / "t5_load.json").write_text(json.dumps({"rows": rows, "summary": summary, "same_tensors": same},
                                                      indent=1))
    print("| way | median s | tensors |")
    print("|---|---|---|")
    for way, s in summary.items():
        print(f"| {way} | {s['median_s']:.2f} | {'same' if same else s['digests']} |")


if __name__ == "__main__":
    main()
