"""GPU benchmark of VRAM budgets and speed: a queue (the seed queue by default; bench/queues/long-32.toml for long
queues) on the full-size random-weight XL model, each way of running it in its own process, side by side in one
call on one GPU.

Rows: the plain diffusers pipeline all on the GPU (the baseline), diffusers' own memory savers (model offload,
sequential offload, group offloading with streams and VAE tiling), pixart-lowvram unconstrained, with
--vram-budget 8GiB and 1.5GiB, and on an emulated 2 GB card (torch capped at 1 GiB); each of ours once per
`--compile` mode asked for. For each: wall time of the whole process (median over the rounds) and its ratio to
the baseline's, the time spent compiling, the denoise stage's steady milliseconds per image-step (its time less
loading and compiling, over the steps it ran) against the FLOP floor (the DiT's FLOPs per image-step, counted with
torch's FlopCounterMode on the meta device, at `--tflops`), torch peak, whole-process NVML peak, host RSS peak, and
the max pixel difference to the unconstrained uncompiled run and to the baseline. The page cache is warmed first,
so no row pays for the first read of the weights from disk.

The first run of the call (untimed unless --no-warm-up) is the unconstrained one without compiling: its items and
drawn seeds are everyone's, and it takes the first-GPU-process slowness. Inductor's cache starts empty
(TORCHINDUCTOR_CACHE_DIR in the work folder, emptied): where `--compile on` is asked for, the first compiling row
runs once more before the rounds, and is reported apart as "first run on a machine"; the rounds then find the
cache warm, as every later run on a machine does.

    python bench/budgets.py --out OUT [--queue Q] [--rows ...] [--compile off on] [--repeat N] [--deadline S]
    python bench/budgets.py --out OUT --merge OUT1 OUT2 ...     # one table from several calls or GPUs
    python bench/budgets.py --out OUT --device cpu --preset tiny --queue SMALL.toml --rows unconstrained gpu
                                                                  # a dry check of the plumbing on a CPU
Writes OUT/latest.json (the rows and every run) and OUT/table.md; with --write-benchmarks also
bench/results/latest.json (MARKER.json for another --marker) and the table in BENCHMARKS.md (between the
`--marker` markers).
"""
from __future__ import annotations

import argparse
import functools
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
sys.path.insert(0, str(ROOT))
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
BASE = "unconstrained@off"  # the run whose items and seeds every other run takes, and whose images are compared


def sh(args: list[str], log: Path, timeout: float | None = None, env: dict | None = None) -> float | None:
    """Run a command, its output to `log`; its wall time, or None where it ran past `timeout` (killed)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
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
    peaks and pixel differences (a budget is a promise every run keeps), every run's wall time and compile time."""
    done = [r for r in runs if r["wall_s"] is not None]
    if not done:
        return runs[0]
    middle = sorted(done, key=lambda r: r["wall_s"])[(len(done) - 1) // 2]
    row = {**middle, "wall_s": statistics.median(r["wall_s"] for r in done),
           "walls_s": [r["wall_s"] for r in runs], "compiles_s": [r.get("compile_s") for r in done],
           "folders": [r["folder"] for r in done]}
    for key in ("torch_peak", "nvml_peak", "rss_peak", "max_diff_vs_unconstrained", "max_diff_vs_pipeline"):
        values = [r[key] for r in done if r.get(key) is not None]
        row[key] = max(values) if values else None
    steady = [r["denoise"]["steady_ms"] for r in done if r.get("denoise")]
    if steady and middle.get("denoise"):
        row["denoise"] = {**middle["denoise"], "steady_ms": statistics.median(steady)}
    return row


@functools.cache
def _transformer_config(model: str) -> dict:
    return json.loads((Path(model) / "transformer" / "config.json").read_text())


@functools.cache
def _model_info(model: str):
    from pixart_lowvram.models import resolve_model  # noqa: PLC0415

    return resolve_model(model, hash_weights=False)


@functools.cache
def flops_per_image_step(model: str, height: int, width: int, guided: bool) -> float:
    """The DiT's FLOPs for one image and one step at the size it denoises at (with guidance: two rows), counted by
    FlopCounterMode on the meta device: the shapes alone, no memory, no GPU."""
    import torch  # noqa: PLC0415
    from diffusers import PixArtTransformer2DModel  # noqa: PLC0415
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    config = _transformer_config(model)
    rows = 2 if guided else 1
    with torch.device("meta"):
        dit = PixArtTransformer2DModel.from_config(config).eval()
        scale = 2 ** (len(json.loads((Path(model) / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
        x = torch.empty(rows, config["in_channels"], height // scale, width // scale)
        text = torch.empty(rows, 120, config["caption_channels"])
        extra = {"resolution": torch.empty(rows, 2), "aspect_ratio": torch.empty(rows, 1)}
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            dit(x, encoder_hidden_states=text, encoder_attention_mask=torch.ones(rows, 120, dtype=torch.long),
                timestep=torch.zeros(rows, dtype=torch.long), added_cond_kwargs=extra, return_dict=False)
    return float(counter.get_total_flops())


def denoise_figures(model: str, manifest: dict, tflops: float) -> dict | None:
    """The denoise stage's steady milliseconds per image-step (its time less loading and compiling, over the
    image-steps it ran) and the FLOP floor's, from a run's manifest."""
    from pixart_lowvram.items import binned_size  # noqa: PLC0415

    stage = next((s for s in manifest["stages"] if s["name"] == "denoise" and not s["skipped"]), None)
    if stage is None:
        return None
    info = _model_info(model)
    steps = flops = 0.0
    for item in manifest["items"]:
        width, height = binned_size(info, item["width"], item["height"])
        steps += item["steps"]
        flops += item["steps"] * flops_per_image_step(model, height, width, item["cfg"] > 1)
    work = stage["seconds"] - (stage.get("load_seconds") or 0) - (stage.get("compile_seconds") or 0)
    return {"image_steps": int(steps), "steady_ms": 1000 * work / steps, "floor_ms": 1000 * flops / steps / (tflops * 1e12),
            "tflop_per_image_step": flops / steps / 1e12, "batch": (manifest.get("plan") or {}).get("denoise", {}).get("batch")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    queue_arguments(parser)
    parser.add_argument("--rows", nargs="*", default=list(OURS) + list(ANCHORS),
                        help=f"which rows to run (default: all): {', '.join(list(OURS) + list(ANCHORS))}; the "
                             "unconstrained uncompiled run always runs first (its items and seeds are everyone's), and "
                             "the baseline (gpu) in every round")
    parser.add_argument("--compile", nargs="+", default=["off"], choices=["auto", "on", "off"],
                        help="each of our rows once per mode, in every round (default: off, the library's default)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of every row and the baseline, interleaved; each row reports its median wall "
                             "time (the machines varied by up to 20%% between runs of one call)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after the start: a round that would end after it (as long as the last one) is "
                             "not started; what was measured is reported")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="count the first run (unconstrained, uncompiled) as a run of its row (a quick check; it "
                             "is the first GPU process, 10 to 20%% slower)")
    parser.add_argument("--anchor-timeout", type=float, default=240,
                        help="seconds an anchor may take before it is recorded as not finished")
    parser.add_argument("--tflops", type=float, default=600.0, help="the dense fp16 rate the FLOP floor assumes")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pixart-budgets"),
                        help="where the runs' folders go (one per GPU when several calls run side by side)")
    parser.add_argument("--preset", default="xl", help="the random model to build (tiny: a CPU dry check)")
    parser.add_argument("--device", default="cuda", help="cpu: a dry check of the plumbing")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="OUT",
                        help="make one table from the runs of earlier calls' OUT folders (no run is made)")
    parser.add_argument("--write-benchmarks", action="store_true",
                        help="also put the table into BENCHMARKS.md (between its --marker markers) and the results "
                             "into bench/results/latest.json (MARKER.json for another marker)")
    parser.add_argument("--marker", default="budgets-table", help="BENCHMARKS.md's markers --write-benchmarks uses")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        runs: dict[str, list[dict]] = {}
        infos = [json.loads((d / "latest.json").read_text()) for d in args.merge]
        for info in infos:
            for name, its in info["runs"].items():
                runs.setdefault(name, []).extend(its)
        report(args, runs, {**infos[0], "merged": [str(d) for d in args.merge]})
        return
    measure(args)


def measure(args) -> None:
    started = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    cli = [py, "-m", "pixart_lowvram.cli"]
    cpu = args.device == "cpu"
    common = ["--device", args.device] + (["--dtype", "float32"] if cpu else [])

    sh(cli + ["make-random-model", "--preset", args.preset, args.model] + (["--device", "cpu"] if cpu else []),
       args.out / "build.log")
    subprocess.run(f"cat {args.model}/*/* > /dev/null", shell=True, check=True)  # warm the page cache
    # Every row imports the same libraries; where the installed ones have no compiled bytecode (a --no-compile
    # install, a read-only site-packages), the first process to import them would pay for compiling them.
    # Compile once, before timing anything, as an installed environment would have them.
    os.environ.setdefault("PYTHONPYCACHEPREFIX", "/tmp/pixart-bench-pycache")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # set in some containers: every process would compile again
    sh([py, "-c", ("import torch, transformers.models.t5.modeling_t5; from diffusers import PixArtAlphaPipeline; "
                   "import pixart_lowvram.generate, pixart_lowvram.streaming, pixart_lowvram.vae_strips")],
       args.out / "warm-imports.log")
    # Inductor's cache starts empty, so that the first compiling run is what a user's first run on a machine is.
    inductor = work / "inductor-cache"
    shutil.rmtree(inductor, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
    base = work / "unconstrained-off"

    def reference(mode: str, tag: str = "") -> dict:
        ref_dir = work / f"reference-{mode}{tag}"
        extra = ["--device", "cpu", "--dtype", "float32"] if cpu else []
        wall = sh([py, "bench/reference_pipeline.py", args.model, str(base), str(ref_dir), "--mode", mode] + extra,
                  args.out / f"reference-{mode}{tag}.log", timeout=None if mode == "gpu" else args.anchor_timeout)
        row = {"method": ANCHORS[mode], "budget": None, "wall_s": wall, "folder": str(ref_dir), "reference": True,
               "mode": mode}
        if wall is None:
            return {**row, "note": f"not finished after {args.anchor_timeout:.0f} s"}
        ref = json.loads((ref_dir / "reference.json").read_text())
        return {**row, "torch_peak": ref["torch_peak"], "nvml_peak": ref["nvml_peak"], "rss_peak": ref["rss_peak"],
                "pipeline_s": ref["wall_seconds"]}

    def ours(name: str, mode: str, tag: str = "") -> dict:
        label, budget, cap = OURS[name]
        out = work / f"{name}-{mode}{tag}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if out != base:  # same items and drawn seeds as the first run
            (out / "run.json").write_text((base / "run.json").read_text())
        argv = ["run", args.queue, "--model", args.model, "--out", str(out), "--no-embed-cache", "-q",
                "--compile", mode] + common
        argv += ["--force"] if out == base else []
        argv += ["--vram-budget", budget] if budget else []
        cmd = cli + argv if cap is None else [py, "bench/capped_run.py", str(cap)] + argv
        wall = sh(cmd, args.out / f"{out.name}.log")
        manifest = json.loads((out / "run.json").read_text())
        stages = manifest["stages"]
        return {"method": f"{label}, --compile {mode}", "budget": budget, "compile": mode, "torch_cap_gib": cap,
                "wall_s": wall, "stages": stages, "plan": manifest.get("plan"),
                "compile_s": sum(s.get("compile_seconds") or 0 for s in stages) if any(
                    s.get("compile_seconds") is not None for s in stages) else None,
                "denoise": denoise_figures(args.model, manifest, args.tflops),
                "torch_peak": max(s["torch_peak"] or 0 for s in stages),
                "nvml_peak": max(s["nvml_peak"] or 0 for s in stages),
                "rss_peak": max(s["rss_peak"] or 0 for s in stages),
                "items": [it["id"] for it in manifest["items"]], "folder": str(out)}

    runs: dict[str, list[dict]] = {}  # row name -> its runs, one a round

    def keep(name: str, run: dict) -> None:  # a run at a time, so a call cut short still leaves what it measured
        runs.setdefault(name, []).append(run)
        (args.out / "runs-partial.json").write_text(json.dumps(runs, indent=2, default=str))

    first = ours("unconstrained", "off")
    if args.no_warm_up:
        keep(BASE, first)
    mine = [(name, mode) for name in OURS if name in args.rows for mode in args.compile]
    compiling = [(name, mode) for name, mode in mine if mode == "on" and name != "capped"]
    if compiling:
        name, mode = compiling[0]
        keep(f"cold {name}@{mode}", {**ours(name, mode, "-cold"), "cold": True})
    last_round = 0.0
    for r in range(args.repeat):
        if args.deadline and r and time.perf_counter() - started + last_round > args.deadline:
            print(f"round {r + 1} not started: it would end past the {args.deadline:.0f} s deadline")
            break
        round_start = time.perf_counter()
        tag = f"-{r + 1}"
        for name, mode in mine:
            if name != "capped" or r == 0:  # the emulated card's target is to complete under its cap: once
                keep(f"{name}@{mode}", ours(name, mode, tag))
        keep("gpu", reference("gpu", tag))
        last_round = time.perf_counter() - round_start
    for mode in ("model-offload", "group-offload", "sequential-offload"):
        if mode in args.rows:
            keep(mode, reference(mode))

    # Pixel differences, run by run: to the first run (unconstrained, uncompiled) and to the first baseline run.
    ref_dir = Path(runs["gpu"][0]["folder"])
    names = first["items"]
    for its in runs.values():
        for run in its:
            if run["wall_s"] is None:
                continue

            def png(folder: Path, name: str, reference: bool = bool(run.get("reference"))) -> Path:
                return folder / f"{name}.png" if reference else folder / "images" / f"{name}.png"

            folder = Path(run["folder"])
            run["max_diff_vs_unconstrained"] = max(max_pixel_diff(png(folder, n), base / "images" / f"{n}.png")
                                                   for n in names)
            run["max_diff_vs_pipeline"] = max(max_pixel_diff(png(folder, n), ref_dir / f"{n}.png") for n in names)
            run.pop("items", None)
    command = ("python bench/budgets.py --out OUT --queue " + args.queue
               + (f" --rows {' '.join(args.rows)}" if args.rows else "") + f" --compile {' '.join(args.compile)}"
               + (f" --repeat {args.repeat}" if args.repeat > 1 else "") + (" --no-warm-up" if args.no_warm_up else ""))
    import torch  # noqa: PLC0415

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not cpu else "cpu"
    report(args, runs, {"gpu": gpu, "torch": torch.__version__, "queue": args.queue, "command": command,
                        "repeat": args.repeat, "seconds": time.perf_counter() - started})


def report(args, runs: dict[str, list[dict]], info: dict) -> None:
    rows = {name: merge(its) for name, its in runs.items()}
    baseline = rows["gpu"]["wall_s"]
    for row in rows.values():
        if row["wall_s"] is not None:
            row["ratio"] = row["wall_s"] / baseline
    for name, row in rows.items():
        if name.startswith("cold "):
            row["method"] += ", first run on a machine (empty compile cache)"
    # the anchors first, the first runs on an empty compile cache last
    order = sorted(rows, key=lambda n: (not rows[n].get("reference"), n.startswith("cold ")))
    result = {**info, "baseline_wall_s": baseline, "rows": [rows[n] for n in order], "runs": runs}
    (args.out / "latest.json").write_text(json.dumps(result, indent=2, default=str))
    lines = table(rows, order, args.tflops)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.write_benchmarks:
        name = "latest.json" if args.marker == "budgets-table" else f"{args.marker}.json"
        (ROOT / "bench" / "results" / name).write_text(json.dumps(result, indent=2, default=str))
        head = (f"Latest run (`bench/results/{name}`): `{result.get('command')}` on {result.get('gpu')}, torch "
                f"{result.get('torch')}; wall times are medians over the rounds, ratios divide by the baseline's, "
                f"{baseline:.1f} s; peaks and pixel differences are the worst of every run:")
        replace_marked(ROOT / "BENCHMARKS.md", args.marker, head + "\n\n" + "\n".join(lines))


def _cell(value, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def table(rows: dict[str, dict], order: list[str], tflops: float) -> list[str]:
    lines = ["| method | budget | wall s (median) | ratio | every run, s | compile s | denoise ms / image-step "
             f"(steady) | FLOP floor ms ({tflops:.0f} TFLOP/s) | x floor | torch peak GiB | NVML peak GiB | "
             "host RSS GiB | max px diff vs unconstrained | vs plain pipeline |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        r = rows[name]
        if r["wall_s"] is None:
            lines.append(f"| {r['method']} | - | {r.get('note', '')} |" + " |" * 11)
            continue
        every = ", ".join(_cell(w) for w in r.get("walls_s", [r["wall_s"]]))
        compiles = ", ".join(_cell(c) for c in r.get("compiles_s", [])) if r.get("compile_s") is not None else "-"
        d = r.get("denoise") or {}
        lines.append(
            f"| {r['method']} | {r.get('budget') or '-'} | {r['wall_s']:.1f} | {r['ratio']:.2f} | {every} | "
            f"{compiles} | {_cell(d.get('steady_ms'))} | {_cell(d.get('floor_ms'))} | "
            f"{_cell(d['steady_ms'] / d['floor_ms'] if d else None, '{:.2f}')} | "
            f"{_cell(r['torch_peak'] / GiB if r.get('torch_peak') is not None else None, '{:.2f}')} | "
            f"{_cell(r['nvml_peak'] / GiB if r.get('nvml_peak') else None, '{:.2f}')} | "
            f"{_cell(r['rss_peak'] / GiB if r.get('rss_peak') else None, '{:.2f}')} | "
            f"{_cell(r.get('max_diff_vs_unconstrained'), '{}')} | {_cell(r.get('max_diff_vs_pipeline'), '{}')} |")
    lines += ["", "Per stage, the median run of each row (time s, of which loading / NVML peak GiB):", "",
              "| way | encode | denoise | decode |", "|---|---|---|---|"]
    for name in order:
        r = rows[name]
        if r.get("stages"):
            cells = {st["name"]: f"{st['seconds']:.2f} ({st.get('load_seconds') or 0:.2f}) / "
                                 f"{(st.get('nvml_peak') or 0) / GiB:.2f}" for st in r["stages"]}
            lines.append(f"| {r['method']} | {cells.get('encode', '-')} | {cells.get('denoise', '-')} | "
                         f"{cells.get('decode', '-')} |")
    return lines


if __name__ == "__main__":
    main()
