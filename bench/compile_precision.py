"""How far compiled images are from eager ones, and at what speed, for several inductor settings: each way runs
the same queue (default: the first 8 jobs of bench/queues/long-32.toml, 1024x1024, 20 steps) in a fresh
process through the CLI, `--compile off` for eager and `--compile on` for the others, whose inductor options are
set here (torch.compile wrapped in the child: the library itself asks for inductor's deterministic mode). Two
rounds, interleaved: the first compiles (an empty cache for each option set the first time), the second is timed
steady. Every image is compared with the eager run's; each way's two rounds with each other.

Ways: eager; det (the library: deterministic); autotune (inductor's default, which times reduction shapes);
det-emulate (deterministic, and `emulate_precision_casts`: fused kernels round to float16 between operations as
eager does); emulate (that alone).

    python bench/compile_precision.py --out OUT [--model FOLDER] [--jobs 8] [--ways eager,det,...]

Writes OUT/compile_precision.json and prints a table."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import max_pixel_diff  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = {"det": {"deterministic": True}, "autotune": {}, "det-emulate": {"deterministic": True,
           "emulate_precision_casts": True}, "emulate": {"emulate_precision_casts": True}}
CHILD = r"""
import json, sys, torch
options = json.loads(sys.argv[1])
if options is not None:
    plain = torch.compile
    def compile_with(fn, *args, **kwargs):
        kwargs["options"] = dict(options) or None
        return plain(fn, *args, **kwargs)
    torch.compile = compile_with
from pixart_lowvram.cli import main
sys.exit(main(sys.argv[2:]))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=Path("/tmp/pixart-precision/xl"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/pixart-precision"))
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--queue", type=Path, default=ROOT / "bench/queues/long-32.toml")
    ap.add_argument("--ways", default="eager,det,autotune,det-emulate,emulate")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="xl")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.model / "model_index.json").exists():
        subprocess.run([sys.executable, "-m", "pixart_lowvram.cli", "make-random-model", "--preset", args.preset,
                        str(args.model)], check=True)
    queue = tomllib.loads(args.queue.read_text())
    queue["jobs"] = queue["jobs"][:args.jobs]
    qfile = args.work / "queue.json"
    qfile.write_text(json.dumps(queue))
    ways = args.ways.split(",")
    rows = []
    for rnd in range(args.rounds):
        for way in ways:
            folder = args.work / f"{way}-{rnd}"
            subprocess.run(["rm", "-rf", str(folder)], check=True)
            cli = ["run", str(qfile), "--model", str(args.model), "--out", str(folder), "--device", args.device,
                   "--compile", "off" if way == "eager" else "on", "--no-embed-cache", "-q"]
            options = None if way == "eager" else OPTIONS[way]
            proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(options), *cli], capture_output=True,
                                  text=True, env=dict(os.environ, TORCH_LOGS="recompiles"))
            (args.out / f"{way}-{rnd}.log").write_text(proc.stderr[-200_000:])
            row = {"way": way, "round": rnd, "rc": proc.returncode,
                   "recompiles": proc.stderr.count("Recompiling function")}
            if proc.returncode:
                row["error"] = proc.stderr[-1500:]
            else:
                manifest = json.loads((folder / "run.json").read_text())
                stage = next(s for s in manifest["stages"] if s["name"] == "denoise")
                steps = sum(item["steps"] for item in manifest["items"])
                work = stage["seconds"] - (stage.get("load_seconds") or 0) - (stage.get("compile_seconds") or 0)
                row.update(denoise_s=stage["seconds"], compile_s=stage.get("compile_seconds"),
                           steady_ms=1000 * work / steps,
                           stages_s=manifest["timeline"]["decode end"] - manifest["timeline"]["encode start"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in rows:
        if row["rc"]:
            continue
        images = sorted((args.work / f"{row['way']}-{row['round']}" / "images").glob("*.png"))
        eager = args.work / f"eager-{row['round']}" / "images"
        first = args.work / f"{row['way']}-0" / "images"
        row["max_diff_vs_eager"] = max(max_pixel_diff(p, eager / p.name) for p in images)
        row["max_diff_vs_round_0"] = max(max_pixel_diff(p, first / p.name) for p in images)
        row["images"] = len(images)
    (args.out / "compile_precision.json").write_text(json.dumps({"jobs": args.jobs, "rows": rows}, indent=1))
    print("| way | round | images | compile s | recompiles | steady ms / image-step | max px diff vs eager | "
          "vs its round 0 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["rc"]:
            print(f"| {r['way']} | {r['round']} | failed: {r['error'].splitlines()[-1] if r['error'] else ''} |")
            continue
        compile_s = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
        print(f"| {r['way']} | {r['round']} | {r['images']} | {compile_s} | {r['recompiles']} | {r['steady_ms']:.1f} | "
              f"{r['max_diff_vs_eager']} | {r['max_diff_vs_round_0']} |")


if __name__ == "__main__":
    main()
