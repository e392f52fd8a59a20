"""Where a process's first seconds go: `python -X importtime` on what a run imports before its first stage, each
round a fresh interpreter, the module cache warm after the first. A one-GPU run of 64 images spent ~7.5 s before
its first stage on an H200 host (BENCHMARKS.md, Several GPUs); this splits the imports out of that.

    python bench/import_time.py --out OUT [--rounds 3] [--top 25]

Imports what `pixart-lowvram run` imports up to its stages: the command line, then launch.PRELOAD (the pipelines,
the VAE, T5 and its tokenizer). Prints the wall time of each round, the imports' total, and the packages that took
longest (cumulative, first round and last). Writes OUT/import_time.json."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = ("import time; t0 = time.perf_counter(); import pixart_lowvram.cli; t1 = time.perf_counter(); "
          "from pixart_lowvram.launch import preload; preload(); t2 = time.perf_counter(); "
          "import torch; torch.zeros(1, device='cuda' if torch.cuda.is_available() else 'cpu'); "
          "t3 = time.perf_counter(); print(f'TIMES {t1 - t0:.3f} {t2 - t1:.3f} {t3 - t2:.3f}')")
LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def one_round() -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", SCRIPT], capture_output=True, text=True,
                          check=True)
    wall = time.perf_counter() - start
    cli, preload, cuda = (float(x) for x in re.search(r"TIMES (\S+) (\S+) (\S+)", proc.stdout).groups())
    top: dict[str, float] = {}  # module -> cumulative seconds, for the imports 1 to 3 levels deep
    own: dict[str, float] = {}  # top-level package -> the seconds its own modules took (self time)
    for m in LINE.finditer(proc.stderr):
        own_us, cumulative, indent, name = int(m.group(1)), int(m.group(2)), (len(m.group(3)) - 1) // 2, m.group(4)
        package = name.split(".")[0]
        own[package] = own.get(package, 0.0) + own_us / 1e6
        if indent <= 2:
            top[f"{'  ' * indent}{name}"] = top.get(name, 0.0) + cumulative / 1e6
    return {"wall_s": wall, "cli_import_s": cli, "preload_s": preload, "cuda_start_s": cuda,
            "own": dict(sorted(own.items(), key=lambda kv: -kv[1])),
            "top": dict(sorted(top.items(), key=lambda kv: -kv[1]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rounds = [one_round() for _ in range(args.rounds)]
    (args.out / "import_time.json").write_text(json.dumps({"python": sys.version, "rounds": rounds}, indent=1))
    print("| round | process wall s | import cli s | preload s | CUDA start s |")
    print("|---|---|---|---|---|")
    for i, r in enumerate(rounds):
        print(f"| {i} | {r['wall_s']:.2f} | {r['cli_import_s']:.2f} | {r['preload_s']:.2f} | {r['cuda_start_s']:.2f} |")
    for label, r in (("first", rounds[0]), ("last", rounds[-1])):
        print(f"\n{label} round: seconds in each package's own modules (self time, summed)")
        for name, sec in list(r["own"].items())[:args.top]:
            print(f"  {sec:7.3f}  {name}")
        print(f"{label} round: slowest imports up to 3 levels deep (cumulative s; indented: imported by the one above)")
        for name, sec in list(r["top"].items())[:args.top]:
            print(f"  {sec:7.3f}  {name}")


if __name__ == "__main__":
    main()
