"""GPU benchmark of one queue over several GPUs (issues 15 and 18): a queue of distinct prompts at 1024x1024 on the
full-size random-weight XL model, made by one GPU and by N (`--gpus 0,...,N-1`), unconstrained and at
`--vram-budget 1.5GiB` per GPU, each run the user's own command in a fresh process (imports and exit included).

For each run: whole-process wall time and throughput (images/s); its ratio to the one-GPU run's throughput at the
same budget (issue 15's target: >= 1.8 on 2 GPUs; issue 18's: >= 0.9 N); each GPU's NVML peak, as each rank
measured its own process (run.json) and as a sampler in this process saw each GPU (every process on it, so a
context a rank opened on another rank's GPU shows); per rank, the time of its share and how long it waited for the
others; the largest pixel difference of any image to the one-GPU run's at the same budget; and a timeline of each
process (run.json's, each step's wall-clock moment relative to rank 0's process start, beside when this bench
started the command, when the last process of each GPU left it, as NVML saw, and when the command ended), which
says where the time outside the stages goes.

    python bench/multigpu.py --out OUT [--gpus N] [--jobs 64] [--budgets none,1.5GiB] [--deadline 420] [--no-warm-up]
                             [--loras K] [--compare-longest-first]
    python bench/multigpu.py --out OUT --device cpu --gpus 2 --jobs 6     # the plumbing, on the CPU: tiny model,
                                                                          # --gpus cpu:N, 128 px, 2 steps

`--loras K`: the jobs take K LoRA sets in turn (job i the set i mod K): one rank-32 peft adapter on every attention
and feed-forward linear (bench/lora.py's), at K scales, each scale a set of its own (the transformer loaded and
merged once per set on each rank). `--compare-longest-first`: each N-GPU run again with the division that ignored
LoRA sets and batch groups (bench/longest_first.py), to compare; each rank's transformer loads are in its row.

The model is built first (`make-random-model --preset xl`, on the GPU, ~30 s) unless --model names one that exists,
and its files are read once so that no run pays for the disk. An untimed run on every GPU comes first, one per budget (the
first process on a fresh GPU ran 10 to 20% slower in bench/budgets.py; `--no-warm-up` leaves them out, for a longer
queue in one call), with `--compile on`: inductor keys what it compiled by the device (cuda:0, cuda:1), so each GPU compiles
its blocks once, as a user's first run on that GPU does; without it the one-GPU run would warm cuda:0's cache for
rank 0 alone and rank 1 would compile in its timed run; a budget can plan another batch shape. Each rank's compile
seconds are in its row. Runs that would start after --deadline seconds are left out, so that the call ends in time with what it measured. Writes OUT/multigpu.json (after every run) and
OUT/multigpu.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from benchlib import max_pixel_diff  # noqa: E402

GiB = 1024**3
PROMPT = "a lighthouse on a cliff at dusk, oil painting, dramatic light, number {i}"


def queue_lines(jobs: int, size: int, steps: int, lora: Path | None = None, sets: int = 0) -> list[dict]:
    """`jobs` images, each of its own prompt (and one shared negative prompt): jobs + 1 distinct texts; with `lora`,
    job i merges it at the (i mod `sets`)-th of `sets` scales."""
    lines = [{"name": f"job-{i:04d}", "prompt": PROMPT.format(i=i), "negative_prompt": "blurry, low quality",
              "seed": 1000 + i, "width": size, "height": size, "steps": steps} for i in range(jobs)]
    if lora is not None:
        for i, line in enumerate(lines):
            line["lora"] = [{"path": str(lora), "scale": round(0.5 + 0.1 * (i % sets), 2)}]
    return lines


class GpuSampler:
    """What NVML shows on each GPU while a run goes: the most memory its processes held together, the most one
    process held, and how many processes there were. Nothing where NVML is not installed."""

    def __init__(self, gpus: int):
        try:
            import pynvml
        except ImportError:
            self.nvml = None
            return
        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(gpus)]

    def __enter__(self) -> GpuSampler:
        # last_seen: when a process of the run was last on the GPU (time.time()), i.e. when the GPU was given back
        self.peaks = [{"together": 0, "one_process": 0, "processes": 0, "last_seen": None}
                      for _ in getattr(self, "handles", [])]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        if self.nvml is not None:
            self.thread.start()
        return self

    def loop(self) -> None:
        while not self.stop.wait(0.05):
            for peak, handle in zip(self.peaks, self.handles):
                try:
                    procs = self.nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                except self.nvml.NVMLError:
                    continue
                used = [p.usedGpuMemory or 0 for p in procs]
                if used:
                    peak["last_seen"] = time.time()
                peak["together"] = max(peak["together"], sum(used))
                peak["one_process"] = max(peak["one_process"], max(used, default=0))
                peak["processes"] = max(peak["processes"], len(used))

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def run(argv: list[str], log: Path, gpus: int, timeout: float) -> tuple[float | None, list[dict], dict]:
    """One command in its own process: its wall time (None: it failed or ran out of time), the GPUs' peaks, and
    when (time.time()) it was started and when it ended."""
    with GpuSampler(gpus) as sampler, open(log, "w") as f:
        launched, start = time.time(), time.perf_counter()
        try:
            proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
            ok = proc.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
        wall, ended = time.perf_counter() - start, time.time()
    print(log.read_text()[-2500:], flush=True)
    return (wall if ok else None), sampler.peaks, {"launched": launched, "ended": ended}


# The steps of a run in the order they happen (run.json's timelines; README, "Several GPUs"); what a process does not
# go through is left out of its column, a step not listed here goes after them.
STEPS = ["launched", "process start", "launch", "workers started", "imported", "store reached", "team joined",
         "run entered", "resolved", "device started", "planned", "share received", "plans gathered",
         "encode start", "encode loaded", "encode end", "encoded", "vae-encode start", "vae-encode loaded",
         "vae-encode end", "denoise start", "denoise loaded", "denoise end", "decode start", "decode loaded",
         "decode end", "work end", "record posted", "records collected", "run.json written", "GPU given back", "ended"]


def timelines(manifest: dict, outside: dict, sampled: list[dict]) -> list[dict[str, float]]:
    """Each process's steps, in seconds from rank 0's process start: run.json's timeline, with what this bench saw
    (`outside`: when it started the command and when that ended; rank 0's column) and when NVML last saw a process
    of the run on each rank's GPU."""
    ranks = manifest.get("ranks") or [{"rank": 0, "timeline": manifest.get("timeline", {})}]
    marks = [dict(r.get("timeline") or {}) for r in ranks]
    marks[0].update(outside)
    for rank, seen in zip(marks, sampled):
        if seen.get("last_seen"):
            rank["GPU given back"] = seen["last_seen"]
    zero = marks[0].get("process start", outside.get("launched", 0.0))
    return [{step: round(at - zero, 2) for step, at in sorted(m.items(), key=lambda kv: kv[1])} for m in marks]


def phases(timeline: list[dict[str, float]]) -> dict[str, float]:
    """The whole process's time in three: before the first stage of any rank started, the stages (the first start to
    the last end), after them (to the command's end)."""
    starts = [t[f"{s} start"] for t in timeline for s in ("encode", "vae-encode", "denoise", "decode")
              if f"{s} start" in t]
    ends = [t[f"{s} end"] for t in timeline for s in ("encode", "vae-encode", "denoise", "decode") if f"{s} end" in t]
    begin, end = timeline[0].get("launched", 0.0), timeline[0].get("ended")
    if not starts or end is None:
        return {}
    return {"before": round(min(starts) - begin, 2), "stages": round(max(ends) - min(starts), 2),
            "after": round(end - max(ends), 2)}


def rank_rows(manifest: dict) -> list[dict]:
    """Each rank's part: its images, the time of its share, how long it waited for the others (at the encode
    barrier, and at the end for the slowest), its peaks."""
    ranks = manifest.get("ranks") or [{"rank": 0, "device": manifest["settings"]["device"], "stages":
                                       manifest["stages"], "seconds": sum(s["seconds"] for s in manifest["stages"]),
                                       "waited": 0.0, "images": len(manifest["items"]), "missing": None}]
    slowest = max(r["seconds"] for r in ranks)
    return [{"rank": r["rank"], "device": r["device"], "images": r.get("images"), "seconds": r["seconds"],
             "waited": r["waited"] + slowest - r["seconds"], "barrier": r["waited"], "missing": r.get("missing"),
             "nvml_peak": max((s.get("nvml_peak") or 0 for s in r["stages"]), default=0),
             "torch_peak": max((s.get("torch_peak") or 0 for s in r["stages"]), default=0),
             "stages": {s["name"]: round(s["seconds"], 2) for s in r["stages"] if not s.get("skipped")},
             "loads": {s["name"]: s.get("loads", 0) for s in r["stages"] if not s.get("skipped")},
             "compile_s": {s["name"]: round(s["compile_seconds"], 2) for s in r["stages"]
                           if s.get("compile_seconds") is not None}}
            for r in ranks]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=None, help="model folder (default: built here, xl; tiny on the CPU)")
    parser.add_argument("--gpus", type=int, default=None, help="N, the GPUs of the N-GPU runs (default: all)")
    parser.add_argument("--jobs", type=int, default=64, help="images in the queue, each of its own prompt")
    parser.add_argument("--size", type=int, default=None, help="image side (default: 1024; 128 on the CPU)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: 20; 2 on the CPU)")
    parser.add_argument("--budgets", default="none,1.5GiB", help="--vram-budget of each pair of runs; none: no limit")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--deadline", type=float, default=420,
                        help="start no run after this many seconds (a run of 64 images takes up to ~100 s)")
    parser.add_argument("--timeout", type=float, default=480, help="seconds one run may take")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pixart-multigpu"))
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                        help="leave out the untimed run on every GPU (~20 s; the first one-GPU run is then its own)")
    parser.add_argument("--loras", type=int, default=0, help="K: the jobs take K LoRA sets in turn (default: none)")
    parser.add_argument("--lora-rank", type=int, default=32, help="the adapter's rank (with --loras)")
    parser.add_argument("--compile", default="on", choices=["auto", "on", "off"],
                        help="the runs' --compile (default: on, as measured: the library's auto then compiled 64 "
                             "and more 1024x1024 jobs, and its default is now off)")
    parser.add_argument("--compare-longest-first", action="store_true",
                        help="each N-GPU run again with the division that ignored LoRA sets (bench/longest_first.py)")
    args = parser.parse_args()
    begin = time.perf_counter()
    cpu = args.device == "cpu"
    size, steps = args.size or (128 if cpu else 1024), args.steps or (2 if cpu else 20)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    py = sys.executable
    cli = [py, "-m", "pixart_lowvram.cli"]

    if cpu:
        gpus, name = args.gpus or 2, "cpu"
    else:
        import torch

        gpus, name = args.gpus or torch.cuda.device_count(), torch.cuda.get_device_name(0)
    several = [f"cpu:{gpus}"] if cpu else [",".join(str(i) for i in range(gpus))]
    model = Path(args.model) if args.model else args.work / ("tiny" if cpu else "xl")
    if not (model / "model_index.json").is_file():
        run(cli + ["make-random-model", "--preset", "tiny" if cpu else "xl", str(model)], logs / "build.log", 0,
            args.timeout)
    subprocess.run(f"cat {model}/*/* > /dev/null", shell=True, check=True)  # the page cache, warm for every run
    # Bytecode compiled once, before anything is timed (the device's containers set PYTHONDONTWRITEBYTECODE).
    os.environ.setdefault("PYTHONPYCACHEPREFIX", "/tmp/pixart-bench-pycache")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    imports = ("import torch, transformers.models.t5.modeling_t5; from diffusers import PixArtAlphaPipeline; "
               "import pixart_lowvram.launch")
    subprocess.run([py, "-c", imports], cwd=ROOT, check=True)

    lora = None
    if args.loras:
        from lora import make_adapter

        lora = make_adapter(model, args.work / f"lora-r{args.lora_rank}", args.lora_rank)
    queue = args.work / "queue.jsonl"
    queue.write_text("".join(json.dumps(line) + "\n" for line in queue_lines(args.jobs, size, steps, lora, args.loras)))
    warm = args.work / "warm.jsonl"
    # two images a GPU: each rank denoises them in one batch, the shape the runs' batches of two have
    warm.write_text("".join(json.dumps(line) + "\n" for line in queue_lines(2 * gpus, size, 2)))
    # one warm-up per budget: a budget can plan another batch, or stream the DiT, and so compile another shape
    for budget in args.budgets.split(",") if args.warm_up else []:
        folder = args.work / f"warm-up-{budget}"
        shutil.rmtree(folder, ignore_errors=True)
        run(cli + ["run", str(warm), "--model", str(model), "--out", str(folder), "--no-embed-cache", "-q", "--gpus",
                   several[0]] + ([] if cpu else ["--compile", "on"])
            + ([] if budget == "none" else ["--vram-budget", budget]), logs / f"warm-up-{budget}.log", gpus,
            args.timeout)

    rows: list[dict] = []
    command = (f"python bench/multigpu.py --out OUT --gpus {gpus} --jobs {args.jobs} --budgets {args.budgets}"
               + (" --device cpu" if cpu else "") + ("" if args.warm_up else " --no-warm-up")
               + (f" --loras {args.loras}" if args.loras else "")
               + (" --compare-longest-first" if args.compare_longest_first else ""))
    result = {"gpu": name, "gpus": gpus, "jobs": args.jobs, "size": size, "steps": steps, "rows": rows,
              "command": command, "loras": args.loras}
    runs = [("1", ["--device", "cpu"] if cpu else [], cli), (str(gpus), ["--gpus", several[0]], cli)]
    if args.compare_longest_first:
        runs.append((str(gpus), ["--gpus", several[0]], [py, str(ROOT / "bench" / "longest_first.py")]))
    for budget in args.budgets.split(","):
        one = None
        for label, launch, program in runs:
            division = "longest-first" if program is not cli else "share.py"
            if time.perf_counter() - begin > args.deadline:
                print(f"deadline: {budget} on {label} GPU(s) ({division}) not run")
                continue
            folder = args.work / (f"{label}-gpu-{budget}" + ("-longest-first" if program is not cli else ""))
            shutil.rmtree(folder, ignore_errors=True)
            argv = program + ["run", str(queue), "--model", str(model), "--out", str(folder), "--no-embed-cache",
                              "-q", *launch] + ([] if budget == "none" else ["--vram-budget", budget]) + (
                                  [] if cpu else ["--compile", args.compile])
            wall, sampled, outside = run(argv, logs / f"{folder.name}.log", 0 if cpu else gpus, args.timeout)
            row = {"budget": budget, "gpus": int(label), "division": division, "wall_s": wall, "folder": str(folder),
                   "sampled": sampled,
                   # GPUs where NVML saw more processes of this run than one per rank: a context opened on the
                   # wrong GPU, which would count against that GPU's budget
                   "stray": [i for i, seen in enumerate(sampled) if seen["processes"] > (i < int(label))]}
            if wall is not None:
                manifest = json.loads((folder / "run.json").read_text())
                made = sum(1 for it in manifest["items"] if it["done"])
                ranks = rank_rows(manifest)
                # the stages alone (from each rank's share to its last stage's end): the part that divides
                timeline = timelines(manifest, outside, sampled if int(label) > 1 else sampled[:1])
                row.update(images=made, images_per_s=made / wall, ranks=ranks, work_s=max(r["seconds"] for r in ranks),
                           stages={s["name"]: round(s["seconds"], 2) for s in manifest["stages"]},
                           timeline=timeline, phases=phases(timeline))
                if label == "1":
                    one = row
                elif one is not None and one["wall_s"] is not None:
                    row["ratio"] = row["images_per_s"] / one["images_per_s"]
                    row["of_ideal"] = row["ratio"] / gpus
                    row["work_ratio"] = one["work_s"] / row["work_s"]
                    names = [it["id"] for it in manifest["items"]]
                    row["max_diff_vs_one"] = max(max_pixel_diff(folder / "images" / f"{n}.png",
                                                                Path(one["folder"]) / "images" / f"{n}.png")
                                                 for n in names)
            rows.append(row)
            (args.out / "multigpu.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (args.out / "multigpu.md").write_text(table)
    print(table)


def gib(value) -> str:
    return "-" if not value else f"{value / GiB:.2f}"


def markdown(result: dict) -> str:
    sets = (f", in {result['loras']} LoRA sets taken in turn" if result.get("loras") else "")
    head = (f"`{result['command']}` on {result['gpus']} x {result['gpu']}: {result['jobs']} images of "
            f"{result['size']}x{result['size']}, {result['steps']} steps, each of its own prompt "
            f"({result['jobs'] + 1} texts){sets}; every run a fresh process, imports and exit included.")
    columns = ("| budget | GPUs | division | wall s | images/s | ratio to 1 GPU | of N x 1 GPU | stages s (ratio) | "
               "before / stages / after s | NVML peak per GPU, GiB (each rank) | waited for the others, s (each rank) | "
               "DiT loads (each rank) | max px diff vs 1 GPU |")
    lines = [head, "", columns, "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        division = r.get("division", "share.py") if r["gpus"] > 1 else "-"
        if r["wall_s"] is None:
            lines.append(f"| {r['budget']} | {r['gpus']} | {division} | failed or timed out | | | | | | | | | |")
            continue
        ranks, cut = r["ranks"], r.get("phases") or {}
        split = " / ".join(format(cut[k], ".1f") for k in ("before", "stages", "after")) if cut else "-"
        dit = [x.get("loads", {}).get("denoise", 0) for x in ranks]
        lines.append(f"| {r['budget']} | {r['gpus']} | {division} | {r['wall_s']:.1f} | {r['images_per_s']:.3f} | "
                     f"{r.get('ratio', 1.0):.2f} | {r.get('of_ideal', 1.0):.2f} | "
                     f"{r['work_s']:.1f} ({r.get('work_ratio', 1.0):.2f}) | {split} | "
                     f"{', '.join(gib(x['nvml_peak']) for x in ranks)} | "
                     f"{', '.join(format(x['waited'], '.1f') for x in ranks)} | {sum(dit)} ({', '.join(map(str, dit))}) | "
                     f"{r.get('max_diff_vs_one', '-')} |")
    per_rank = ("Each rank's share (time s of its stages; images) and what NVML showed on each GPU during the run "
                "(processes there, the most they held together, GiB):")
    lines += ["", per_rank, "",
              "| budget | GPUs | division | rank | device | images | encode | denoise (of it compiling) | DiT loads | "
              "decode | share s | on its GPU: processes, GiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        for x in r.get("ranks", []):
            gpu = r["sampled"][x["rank"]] if x["rank"] < len(r["sampled"]) and r["gpus"] > 1 else (
                r["sampled"][0] if r["sampled"] else None)
            seen = f"{gpu['processes']}, {gib(gpu['together'])}" if gpu else "-"
            st, compiled = x["stages"], x.get("compile_s", {}).get("denoise")
            denoise = f"{st.get('denoise', '-')}" + (f" ({compiled})" if compiled is not None else "")
            division = r.get("division", "share.py") if r["gpus"] > 1 else "-"
            lines.append(f"| {r['budget']} | {r['gpus']} | {division} | {x['rank']} | {x['device']} | {x['images']} | "
                         f"{st.get('encode', '-')} | {denoise} | {x.get('loads', {}).get('denoise', '-')} | "
                         f"{st.get('decode', '-')} | "
                         f"{x['seconds']:.1f} | {seen} |")
    stray = [f"{r['budget']} on {r['gpus']} GPU(s): GPU {', '.join(map(str, r['stray']))}" for r in result["rows"]
             if r.get("stray")]
    lines += ["", "Processes on a GPU that was not theirs: " + ("; ".join(stray) if stray else "none seen.")]
    lines += timeline_tables(result["rows"])
    return "\n".join(lines) + "\n"


def timeline_tables(rows: list[dict]) -> list[str]:
    """Per budget, a column per process of each run: when it reached each step, in seconds from its rank 0's
    process start (`launched` and `ended`: as this bench saw the command; `GPU given back`: the last moment NVML saw
    a process of the run on that GPU)."""
    lines = []
    for budget in dict.fromkeys(r["budget"] for r in rows):
        runs = [r for r in rows if r["budget"] == budget and r.get("timeline")]
        if not runs:
            continue
        columns = [(f"{r['gpus']} GPU{'s' if r['gpus'] > 1 else ''}" + (f", rank {rank}" if r["gpus"] > 1 else "")
                    + (" (longest-first)" if r.get("division") == "longest-first" else ""),
                    marks) for r in runs for rank, marks in enumerate(r["timeline"])]
        seen = {step for _, marks in columns for step in marks}
        steps = [s for s in STEPS if s in seen] + sorted(seen - set(STEPS))
        lines += ["", f"Timeline at budget {budget}: seconds from rank 0's process start.", "",
                  "| step | " + " | ".join(name for name, _ in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for step in steps:
            cells = [format(marks[step], ".2f") if step in marks else "" for _, marks in columns]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
