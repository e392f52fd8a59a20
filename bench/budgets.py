"""GPU benchmark of VRAM budgets: the seed queue at 1024x1024 on the full-size random-weight XL model,
each way of running it in its own process, side by side in one call on one GPU.

Rows: the plain diffusers pipeline all on the GPU (the baseline), diffusers' own memory savers (model offload,
sequential offload, group offloading with streams and VAE tiling), pixart-lowvram unconstrained, with
--vram-budget 8GiB and 1.5GiB, and on an emulated 2 GB card (torch capped at 1 GiB). For each: wall time of the
whole process and its ratio to the baseline's, torch peak, whole-process NVML peak, host RSS peak, and the max
pixel difference to the unconstrained run and to the baseline. The page cache is warmed first, so no row pays
for the first read of the weights from disk.

    python bench/budgets.py --out OUT_DIR [--model DIR] [--rows ...] [--repeat N] [--write-benchmarks]
Writes OUT_DIR/latest.json and OUT_DIR/table.md; with --write-benchmarks also bench/results/latest.json and the
table in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from benchlib import max_pixel_diff, queue_arguments, replace_marked  # noqa: E402
GiB = 1024**3


OURS = {"unconstrained": ("pixart-lowvram, unconstrained", None, None),
        "8GiB": ("pixart-lowvram --vram-budget 8GiB", "8GiB", None),
        "1.5GiB": ("pixart-lowvram --vram-budget 1.5GiB", "1.5GiB", None),
        "capped": ("pixart-lowvram, emulated 2 GB card (torch capped at 1 GiB, --vram-budget 1.6GiB)", "1.6GiB", 1.0)}
ANCHORS = {"gpu": "diffusers PixArtAlphaPipeline, all on GPU",
           "model-offload": "diffusers, enable_model_cpu_offload",
           "group-offload": "diffusers, group offloading (block level, streams) + VAE tiling",
           "sequential-offload": "diffusers, enable_sequential_cpu_offload"}


def sh(args: list[str], log: Path, timeout: float | None = None) -> float | None:
    """Run a command, its output to `log`; its wall time, or None where it ran past `timeout` (killed)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except subprocess.TimeoutExpired:
            print(f"{' '.join(args)}: not finished after {timeout:.0f} s")
            return None
    seconds = time.perf_counter() - start
    tail = log.read_text()[-2500:]
    print(tail)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode})")
    return seconds


def merge(runs: list[dict]) -> dict:
    """One row from a way's runs: the median wall time (and the stages of the run that took it), the highest
    peaks (a budget is a promise every run keeps), every run's wall time and folder."""
    done = [r for r in runs if r["wall_s"] is not None]
    if not done:
        return runs[0]
    middle = sorted(done, key=lambda r: r["wall_s"])[(len(done) - 1) // 2]
    row = {**middle, "wall_s": statistics.median(r["wall_s"] for r in done),
           "walls_s": [r["wall_s"] for r in runs], "folders": [r["folder"] for r in done]}
    for key in ("torch_peak", "nvml_peak", "rss_peak"):
        row[key] = max(r[key] for r in done)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    queue_arguments(parser)
    parser.add_argument("--rows", nargs="*", default=list(OURS) + list(ANCHORS),
                        help=f"which rows to run (default: all): {', '.join(list(OURS) + list(ANCHORS))}; the "
                             "unconstrained run always runs (its items and seeds are everyone's)")
    parser.add_argument("--write-benchmarks", action="store_true",
                        help="also put the table into BENCHMARKS.md (between its budgets-table markers) and the "
                             "results into bench/results/latest.json")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of the baseline and the 8GiB and 1.5GiB rows, interleaved; each row reports its "
                             "median wall time (the machines varied by up to 20%% between runs of one call)")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="leave out the untimed first run (a quick check; the unconstrained row is then the "
                             "first GPU process, 10 to 20%% slower)")
    parser.add_argument("--anchor-timeout", type=float, default=240,
                        help="seconds an anchor may take before it is recorded as not finished")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/pixart-budgets")
    work.mkdir(exist_ok=True)
    py = sys.executable
    cli = [py, "-m", "pixart_lowvram.cli"]

    import torch

    sh(cli + ["make-random-model", "--preset", "xl", args.model], args.out / "build.log")
    subprocess.run(f"cat {args.model}/*/* > /dev/null", shell=True, check=True)  # warm the page cache
    # Every row imports the same libraries; where the installed ones have no compiled bytecode (a --no-compile
    # install, a read-only site-packages), the first process to import them would pay for compiling them.
    # Compile once, before timing anything, as an installed environment would have them.
    os.environ.setdefault("PYTHONPYCACHEPREFIX", "/tmp/pixart-bench-pycache")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # set in some containers: every process would compile again
    sh([py, "-c", "import torch, transformers.models.t5.modeling_t5; from diffusers import PixArtAlphaPipeline; "
                  "import pixart_lowvram.generate, pixart_lowvram.streaming, pixart_lowvram.vae_strips"],
       args.out / "warm-imports.log")
    # The first GPU process on a fresh machine ran 10 to 20% slower than later ones in every call: one untimed run
    # first, so no timed row is the first.
    if not args.no_warm_up:
        sh(cli + ["run", args.queue, "--model", args.model, "--out", str(work / "warm-up"), "--no-embed-cache",
                  "-q", "--force"], args.out / "warm-up.log")

    base = work / "unconstrained"

    def reference(mode: str, tag: str = "") -> dict:
        ref_dir = work / f"reference-{mode}{tag}"
        wall = sh([py, "bench/reference_pipeline.py", args.model, str(base), str(ref_dir), "--mode", mode],
                  args.out / f"reference-{mode}{tag}.log", timeout=None if mode == "gpu" else args.anchor_timeout)
        row = {"method": ANCHORS[mode], "budget": None, "wall_s": wall, "folder": str(ref_dir), "reference": True,
               "mode": mode}
        if wall is None:
            return {**row, "note": f"not finished after {args.anchor_timeout:.0f} s"}
        ref = json.loads((ref_dir / "reference.json").read_text())
        return {**row, "torch_peak": ref["torch_peak"], "nvml_peak": ref["nvml_peak"], "rss_peak": ref["rss_peak"],
                "pipeline_s": ref["wall_seconds"]}

    def ours(name: str, tag: str = "") -> dict:
        label, budget, cap = OURS[name]
        out = work / f"{name}{tag}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        if out != base:  # same items and drawn seeds as the unconstrained run
            (out / "run.json").write_text((base / "run.json").read_text())
        argv = ["run", args.queue, "--model", args.model, "--out", str(out), "--no-embed-cache", "-q"]
        argv += ["--force"] if out == base else []
        argv += ["--vram-budget", budget] if budget else []
        cmd = cli + argv if cap is None else [py, "bench/capped_run.py", str(cap)] + argv
        wall = sh(cmd, args.out / f"{out.name}.log")
        manifest = json.loads((out / "run.json").read_text())
        stages = manifest["stages"]
        return {"method": label, "budget": budget, "torch_cap_gib": cap, "wall_s": wall, "stages": stages,
                "plan": manifest.get("plan"),
                "torch_peak": max(s["torch_peak"] or 0 for s in stages),
                "nvml_peak": max(s["nvml_peak"] or 0 for s in stages),
                "rss_peak": max(s["rss_peak"] or 0 for s in stages),
                "items": manifest["items"], "folder": str(out)}

    runs: dict[str, list[dict]] = {}  # row name -> its runs, one a round

    def keep(name: str, run: dict) -> None:  # a run at a time, so a call cut short still leaves what it measured
        runs.setdefault(name, []).append(run)
        (args.out / "runs-partial.json").write_text(json.dumps(runs, indent=2, default=str))

    # The unconstrained run once (its items and drawn seeds are everyone's); then, --repeat times over, a round of
    # the budget rows and the baseline, interleaved, so that a slow spell of the machine falls on all of them.
    # The emulated card's target is to complete under its cap: it runs in the first round only.
    keep("unconstrained", ours("unconstrained"))
    for r in range(args.repeat):
        tag = f"-{r + 1}"
        for name in OURS:
            if name != "unconstrained" and name in args.rows and (name != "capped" or r == 0):
                keep(name, ours(name, tag))
        keep("gpu", reference("gpu", tag))
    for mode in ("model-offload", "group-offload", "sequential-offload"):
        if mode in args.rows:
            keep(mode, reference(mode))
    rows = [merge(r) for r in runs.values()]
    ref_dir = Path(runs["gpu"][0]["folder"])
    baseline = next(r for r in rows if r.get("mode") == "gpu")["wall_s"]
    rows.sort(key=lambda r: not r.get("reference"))  # the anchors first

    names = [it["id"] for it in next(r for r in rows if "items" in r)["items"]]
    for row in rows:
        if row["wall_s"] is None:
            continue

        def png(folder: Path, name: str, reference: bool = bool(row.get("reference"))) -> Path:
            return folder / f"{name}.png" if reference else folder / "images" / f"{name}.png"

        folders = [Path(f) for f in row["folders"]]  # every run's images, not only the median one's
        row["max_diff_vs_unconstrained"] = max(max_pixel_diff(png(f, n), base / "images" / f"{n}.png")
                                               for f in folders for n in names)
        row["max_diff_vs_pipeline"] = max(max_pixel_diff(png(f, n), ref_dir / f"{n}.png") for f in folders
                                          for n in names)
        row["ratio"] = row["wall_s"] / baseline
        row.pop("items", None)

    command = ("python bench/budgets.py --out OUT" + (f" --rows {' '.join(args.rows)}" if args.rows else "")
               + (f" --repeat {args.repeat}" if args.repeat > 1 else "") + (" --no-warm-up" if args.no_warm_up else ""))
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "queue": args.queue,
              "command": command, "repeat": args.repeat, "baseline_wall_s": baseline, "rows": rows}
    (args.out / "latest.json").write_text(json.dumps(result, indent=2))
    lines = ["| method | budget | wall s (median) | ratio | every run, s | torch peak GiB | NVML peak GiB | "
             "host RSS GiB | max px diff vs unconstrained | vs plain pipeline |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["wall_s"] is None:
            lines.append(f"| {r['method']} | - | {r['note']} | | | | | | | |")
            continue
        every = ", ".join(f"{w:.1f}" if w is not None else "-" for w in r["walls_s"])
        lines.append(f"| {r['method']} | {r['budget'] or '-'} | {r['wall_s']:.1f} | {r['ratio']:.2f} | {every} | "
                     f"{r['torch_peak'] / GiB:.2f} | {r['nvml_peak'] / GiB:.2f} | {r['rss_peak'] / GiB:.2f} | "
                     f"{r['max_diff_vs_unconstrained']} | {r['max_diff_vs_pipeline']} |")
    lines += ["", "Per stage, the median run of each row (time s, of which loading / NVML peak GiB):", "",
              "| way | encode | denoise | decode |", "|---|---|---|---|"]
    for r in rows:
        if r.get("stages"):
            cells = {st["name"]: f"{st['seconds']:.2f} ({st.get('load_seconds') or 0:.2f}) / "
                                 f"{(st.get('nvml_peak') or 0) / GiB:.2f}" for st in r["stages"]}
            lines.append(f"| {r['method']} | {cells.get('encode', '-')} | {cells.get('denoise', '-')} | "
                         f"{cells.get('decode', '-')} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.write_benchmarks:
        (ROOT / "bench" / "results" / "latest.json").write_text(json.dumps(result, indent=2))
        head = (f"Latest run (`bench/results/latest.json`): `{result['command']}` on {result['gpu']}, torch "
                f"{result['torch']}; wall times are medians over the rounds, ratios divide by the baseline's, "
                f"{baseline:.1f} s; peaks and pixel differences are the worst of every run:")
        replace_marked(ROOT / "BENCHMARKS.md", "budgets-table", head + "\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
