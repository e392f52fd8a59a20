"""How long T5 takes to reach the GPU, each way in a fresh process, interleaved:

- `cpu-then-to`: `from_pretrained(dtype=...)` on the CPU, then `.to(device)`;
- `device_map`: `from_pretrained(..., device_map={"": 0})`, read straight onto the GPU (the library before);
- `device_map-parallel`: the same with transformers' `HF_ENABLE_PARALLEL_LOADING=true` (one thread a shard);
- `ours`: `models.load_text_encoder` (built empty, pieces read on several threads into pinned buffers and copied
  as they arrive: streaming.load_tensors).

The files are read once first, so every way reads the page cache. Checks that all give the same tensors (dtypes
included: T5's `wo` stays float32). `--fp32` also times a copy of the text encoder stored in float32 (as
checkpoints often are), made here from the float16 one: 19 GB more on disk.

    python bench/t5_load.py --model FOLDER --out OUT [--rounds 3] [--fp32]

Writes OUT/t5_load.json and prints a table."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import hashlib, json, sys, time
import torch
from transformers import T5EncoderModel
from pixart_lowvram import models
folder, way = sys.argv[1], sys.argv[2]
info = models.resolve_model(folder, hash_weights=False) if way == "ours" else None
torch.zeros(1, device="cuda")
torch.cuda.synchronize()
start = time.perf_counter()
if way == "cpu-then-to":
    model = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float16,
                                           use_safetensors=True).to("cuda")
elif way == "ours":
    model = models.load_text_encoder(info, torch.float16, torch.device("cuda", 0))
else:
    model = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float16,
                                           use_safetensors=True, device_map={"": 0})
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
WAYS = ("cpu-then-to", "device_map", "device_map-parallel", "ours")


def fp32_copy(model: Path, work: Path) -> Path:
    """A model folder whose text_encoder is `model`'s stored in float32 (the other components linked)."""
    from safetensors.torch import load_file, save_file

    out = work / "fp32-t5"
    if (out / "done").exists():
        return out
    (out / "text_encoder").mkdir(parents=True, exist_ok=True)
    for entry in model.iterdir():
        if entry.name != "text_encoder" and not (out / entry.name).exists():
            (out / entry.name).symlink_to(entry.resolve())
    for path in (model / "text_encoder").iterdir():
        if path.suffix == ".safetensors":
            save_file({k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items()},
                      out / "text_encoder" / path.name, metadata={"format": "pt"})
        elif path.name.endswith(".index.json"):
            index = json.loads(path.read_text())
            index.setdefault("metadata", {})["total_size"] = 2 * index.get("metadata", {}).get("total_size", 0)
            (out / "text_encoder" / path.name).write_text(json.dumps(index))
        else:
            (out / "text_encoder" / path.name).write_bytes(path.read_bytes())
    (out / "done").write_text("")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a PixArt model folder (its text_encoder/ is loaded)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fp32", action="store_true", help="also a float32-stored copy of the text encoder")
    ap.add_argument("--work", type=Path, default=Path("/tmp/t5-load"))
    ap.add_argument("--ways", default=",".join(WAYS))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folders = {"fp16": args.model}
    if args.fp32:
        folders["fp32"] = fp32_copy(args.model, args.work)
    ways = args.ways.split(",")
    rows = []
    for rnd in range(args.rounds):
        for stored, folder in folders.items():
            subprocess.run(f"cat {folder}/text_encoder/* > /dev/null", shell=True, check=True)
            for way in ways:
                env = dict(os.environ, HF_ENABLE_PARALLEL_LOADING="true" if way.endswith("-parallel") else "false")
                proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), way.removesuffix("-parallel")],
                                      capture_output=True, text=True, env=env)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                row = {"round": rnd, "stored": stored,
                       **(json.loads(line[7:]) if line else {"error": proc.stderr[-800:]}), "way": way}
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for stored in folders:
        for way in ways:
            mine = [r for r in rows if r["way"] == way and r["stored"] == stored and "seconds" in r]
            summary[f"{stored} {way}"] = {
                "median_s": statistics.median(r["seconds"] for r in mine) if mine else None,
                "runs_s": [round(r["seconds"], 3) for r in mine],
                "peak_gib": max((r["peak_gib"] for r in mine), default=None),
                "digests": sorted({r["digest"] for r in mine})}
    same = len({d for s in summary.values() for d in s["digests"]}) == 1
    (args.out / "t5_load.json").write_text(json.dumps({"rows": rows, "summary": summary, "same_tensors": same},
                                                      indent=1))
    print("| stored | way | median s | every run, s | torch peak GiB | tensors |")
    print("|---|---|---|---|---|---|")
    for key, s in summary.items():
        stored, way = key.split(" ", 1)
        median = f"{s['median_s']:.2f}" if s["median_s"] is not None else "failed"
        peak = f"{s['peak_gib']:.2f}" if s["peak_gib"] is not None else "-"
        print(f"| {stored} | {way} | {median} | {s['runs_s']} | {peak} | "
              f"{'same' if same else s['digests']} |")


if __name__ == "__main__":
    main()
