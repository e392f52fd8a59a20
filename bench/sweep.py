"""GPU sweep of the budget planner's promise: for each case, in a fresh process, every stage's measured peaks (NVML,
whole process; torch; host RAM) against the plan's estimates and the budgets it was made for.

    python bench/sweep.py --out OUT [--cases encode-texts,encode-budgets,...] [--write-benchmarks]
    python bench/sweep.py --out OUT --device cpu --model DIR     # a dry check of the plumbing on a CPU

Each case is one `run_queue` in its own process (its own CUDA context, as a user's run has), under the run's own
`--vram-budget` plan, on the random-weight model of a preset (`make-random-model --preset P --device cuda`, built
here, page cache warmed, deleted after its cases unless --keep-models: the GPU machines have 64 GiB of disk). A
case that only needs a stage or two stops after them (the run's own stop flag, set when that stage's progress bar
closes), so that 500 texts are encoded without denoising 500 images. Steps are few (2 to 8): no peak depends on
them. Cases, by group (`--cases` takes group names or case names, comma-separated):

  encode-texts    PixArt-α (xl), 1.5 GiB, 1 / 4 / 32 / 33 / 100 / 500 distinct texts (encode only)
  encode-budgets  33 texts at 2, 3, 4, 6, 8 GiB (encode only)
  encode-batch    33 texts, --encode-batch 8 and 32, at 1.5 and 4 GiB (encode only)
  denoise-batch   8 images of 8 steps, --denoise-batch 1 / 2 / 4 / 8 at 512x512 (xl-512) and 1024x1024 (xl),
                  unconstrained (where batching pays, timed), and batch 8 at 1.5 GiB (encode and denoise)
  sizes           whole runs of one image at the largest binned sizes: 2048x512 and 512x2048 (xl) at 1.5 GiB and
                  2048x512 at 4; 1024x256 (xl-512) at 1.5; Σ 2K 2048x2048 at 3 and 6, 4096x1024 at 3, 1024x4096 at 6
  kinds           every kind at its default size (1024x1024, 512x512 for xl-512 and DMD, 2048x2048 for Σ 2K):
                  xl, xl-512, xl-sigma, xl-lcm, xl-dmd at 1.5 GiB, xl and xl-sigma at 8, xl-sigma-2k at 2.5
  host            Σ 2K, 2048x2048 at 2.5 GiB, --host-budget 32, 16 and 8 GiB (strips pinned or spilled to files),
                  images compared with the 32 GiB run's

Two GPU commands (10 minutes each at most; --deadline stops starting cases in time) cover them, split by model so
that each builds what it needs once (~30 s a model on an H100):
  python bench/sweep.py --out OUT1 --presets xl --deadline 540 --write-benchmarks
  python bench/sweep.py --out OUT2 --presets xl-512,xl-sigma,xl-sigma-2k,xl-lcm,xl-dmd --deadline 540 --write-benchmarks
Writes OUT/sweep.json (every case: its plan, stages, wall time) and OUT/sweep.md; with --write-benchmarks also the
tables into BENCHMARKS.md (between its sweep-table markers; a later command adds its cases to what the earlier
one wrote, through bench/results/sweep.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from benchlib import max_pixel_diff, replace_marked  # noqa: E402

GiB = 1024**3
PROMPT = "a lighthouse on a cliff at dusk, oil painting, dramatic light, number {i}"


@dataclass(frozen=True)
class Case:
    name: str
    group: str
    preset: str
    texts: int = 2  # distinct texts the queue encodes (prompts and negative prompts)
    images: int = 1
    width: int = 1024
    height: int = 1024
    steps: int = 2
    budget: str | None = "1.5GiB"
    host_budget: str | None = None  # None: the run's default (auto)
    encode_batch: int = 1
    denoise_batch: int = 1
    until: str | None = None  # the last stage to run ("encode", "denoise"); None: all three


def cases() -> list[Case]:
    out = []
    for texts in (1, 4, 32, 33, 100, 500):
        out.append(Case(f"encode-{texts}-texts", "encode-texts", "xl", texts=texts, until="encode"))
    for budget in ("2GiB", "3GiB", "4GiB", "6GiB", "8GiB"):
        out.append(Case(f"encode-33-texts-{budget}", "encode-budgets", "xl", texts=33, budget=budget, until="encode"))
    for batch in (8, 32):
        for budget in ("1.5GiB", "4GiB"):
            out.append(Case(f"encode-batch-{batch}-{budget}", "encode-batch", "xl", texts=33, encode_batch=batch,
                            budget=budget, until="encode"))
    for preset, side in (("xl-512", 512), ("xl", 1024)):
        for batch in (1, 2, 4, 8):
            out.append(Case(f"denoise-{side}-batch-{batch}", "denoise-batch", preset, images=8, width=side,
                            height=side, steps=8, budget=None, denoise_batch=batch, until="denoise"))
        out.append(Case(f"denoise-{side}-batch-8-1.5GiB", "denoise-batch", preset, images=8, width=side,
                        height=side, steps=8, denoise_batch=8, until="denoise"))
    sizes = [("xl", 2048, 512, "1.5GiB"), ("xl", 512, 2048, "1.5GiB"), ("xl", 2048, 512, "4GiB"),
             ("xl-512", 1024, 256, "1.5GiB"), ("xl-sigma-2k", 2048, 2048, "3GiB"), ("xl-sigma-2k", 2048, 2048, "6GiB"),
             ("xl-sigma-2k", 4096, 1024, "3GiB"), ("xl-sigma-2k", 1024, 4096, "6GiB")]
    for preset, w, h, budget in sizes:
        out.append(Case(f"size-{preset}-{w}x{h}-{budget}", "sizes", preset, width=w, height=h, budget=budget))
    kinds = [("xl", 1024, 2, "1.5GiB"), ("xl", 1024, 2, "8GiB"), ("xl-512", 512, 2, "1.5GiB"),
             ("xl-sigma", 1024, 2, "1.5GiB"), ("xl-sigma", 1024, 2, "8GiB"), ("xl-lcm", 1024, 4, "1.5GiB"),
             ("xl-dmd", 512, 1, "1.5GiB"), ("xl-sigma-2k", 2048, 2, "2.5GiB")]
    for preset, side, steps, budget in kinds:
        out.append(Case(f"kind-{preset}-{budget}", "kinds", preset, width=side, height=side, steps=steps,
                        budget=budget))
    for host in ("32GiB", "16GiB", "8GiB"):
        out.append(Case(f"host-2k-{host}", "host", "xl-sigma-2k", width=2048, height=2048, budget="2.5GiB",
                        host_budget=host))
    return out


def queue_lines(case: Case) -> list[dict]:
    """Jobs with exactly `case.texts` distinct texts: one negative prompt shared by every job and distinct
    prompts (one text: the prompt is its own negative prompt), or `case.images` images of one prompt."""
    base = {"width": case.width, "height": case.height, "steps": case.steps}
    if case.until == "encode":
        if case.texts == 1:
            return [{**base, "prompt": PROMPT.format(i=0), "negative_prompt": PROMPT.format(i=0), "seed": 1}]
        return [{**base, "prompt": PROMPT.format(i=i), "negative_prompt": "blurry", "seed": i}
                for i in range(case.texts - 1)]
    return [{**base, "prompt": PROMPT.format(i=0), "negative_prompt": "blurry", "seed": 1, "count": case.images}]


# -- the child: one case in its own process ---------------------------------------------------------------------

def child(spec: dict) -> int:
    """Run one case (`spec`: the case, model, device, folder) and leave its run.json; stop after `until`."""
    from pixart_lowvram.cli import set_allocator_defaults

    set_allocator_defaults()  # before CUDA starts, as the command does
    from pixart_lowvram.errors import Interrupted
    from pixart_lowvram.generate import Settings, run_queue
    from pixart_lowvram.jobs import load_queue
    from pixart_lowvram.placement import PROCESS_RSS
    from pixart_lowvram.reporting import Bar, Reporter

    case = Case(**spec["case"])
    folder = Path(spec["folder"])
    queue = folder.parent / f"{folder.name}.jsonl"
    queue.write_text("".join(json.dumps(line) + "\n" for line in queue_lines(case)))
    import threading

    stop = threading.Event()

    class StopAfter(Reporter):
        """Sets the run's stop flag when the last stage the case needs closes its progress bar."""

        def bar(self, desc, total, unit="it", transient=False):

            class Closing(Bar):
                def close(self) -> None:
                    if desc == case.until:
                        stop.set()

            return Closing() if desc == case.until else Bar()

    settings = Settings(model=spec["model"], device=spec["device"], vram_budget=case.budget, force=True,
                        embed_cache=None, encode_batch=case.encode_batch, denoise_batch=case.denoise_batch,
                        **({"host_budget": case.host_budget} if case.host_budget else {}))
    try:
        run_queue(load_queue(queue), folder, settings, StopAfter(), stop=stop)
    except Interrupted:
        pass  # stopped after the stage the case needs; run.json holds what ran
    (folder / "process_rss.json").write_text(json.dumps({"process_rss": PROCESS_RSS}))
    return 0


# -- the parent ---------------------------------------------------------------------------------------------------

def build(preset: str, root: Path, device: str, log: Path) -> Path:
    path = root / f"pixart-{preset}"
    cmd = [sys.executable, "-m", "pixart_lowvram.cli", "make-random-model", "--preset", preset, str(path),
           "--device", device]
    with open(log, "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    subprocess.run(f"cat {path}/*/* > /dev/null", shell=True, check=False)  # warm the page cache
    return path


def run_case(case: Case, model: Path, device: str, work: Path, logs: Path, timeout: float) -> dict:
    folder = work / case.name
    shutil.rmtree(folder, ignore_errors=True)
    spec = {"case": dataclasses.asdict(case), "model": str(model), "device": device, "folder": str(folder)}
    start = time.perf_counter()
    row = {"case": dataclasses.asdict(case), "folder": str(folder)}
    with open(logs / f"{case.name}.log", "w") as f:
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], stdout=f,
                                  stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            row["returncode"] = proc.returncode
        except subprocess.TimeoutExpired:
            row["returncode"] = None
            row["note"] = f"not finished after {timeout:.0f} s"
    row["wall_s"] = time.perf_counter() - start
    manifest = folder / "run.json"
    if manifest.is_file():
        run = json.loads(manifest.read_text())
        row.update(plan=run.get("plan"), stages=[s for s in run.get("stages", []) if s.get("seconds")],
                   vram_budget=run.get("vram_budget"), host_budget=run.get("host_budget"),
                   process_rss=json.loads((folder / "process_rss.json").read_text())["process_rss"]
                   if (folder / "process_rss.json").is_file() else None)
    if row.get("returncode") not in (0, None):
        row["note"] = (logs / f"{case.name}.log").read_text()[-300:].strip().splitlines()[-1:]
    return row


def stage_rows(row: dict) -> list[dict]:
    """One line a stage: placement, estimates, measured peaks, budgets, and whether the promise held."""
    out = []
    plan = row.get("plan") or {}
    for st in row.get("stages") or []:
        p = plan.get(st["name"], {})
        budget, estimate, nvml = row.get("vram_budget"), p.get("estimate"), st.get("nvml_peak")
        host_est = (row.get("process_rss") or 0) + (p.get("host") or 0)
        checks = []
        if nvml is not None and budget:
            checks.append(nvml <= budget)
        if nvml is not None and estimate:
            checks.append(nvml <= estimate)
        if st.get("ram_peak") is not None and row.get("host_budget"):
            checks.append(st["ram_peak"] <= row["host_budget"])
        how = p.get("placement", "-")
        if p.get("placement") == "streamed":
            how += f" ahead {p.get('ahead')}" + (f", {p['resident_blocks']} kept" if p.get("resident_blocks") else "")
        if st["name"] == "encode" and p.get("group"):
            how += f", batch {p.get('batch')}, group {p['group']}"
        if st["name"] == "denoise":
            how += f", batch {p.get('batch')}" + ("" if p.get("hold_in_ram", True) else ", from files")
        if p.get("spill"):
            how += ", spilled"
        work = st["seconds"] - (st.get("load_seconds") or 0)
        out.append({"case": row["case"]["name"], "stage": st["name"], "placement": how, "estimate": estimate,
                    "nvml_peak": nvml, "torch_peak": st.get("torch_peak"), "budget": budget,
                    "host_estimate": host_est, "ram_peak": st.get("ram_peak"), "rss_peak": st.get("rss_peak"),
                    "host_budget": row.get("host_budget"), "seconds": st["seconds"], "work_s": work,
                    "images": row["case"]["images"], "over_budget": st.get("over_budget", []),
                    "ok": all(checks) if checks else None})
    return out


def gib(v) -> str:
    return "-" if not v else f"{v / GiB:.2f}"


def tables(rows: list[dict]) -> str:
    lines = ["| case | stage | placement | estimate GiB | NVML peak GiB | torch peak GiB | budget GiB | host est. GiB "
             "| RAM peak GiB | RSS GiB | s | ok |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if not row.get("stages"):
            done = "-" if str(row.get("note", "")).startswith("not run") else "no"
            lines.append(f"| {row['case']['name']} | - | {row.get('note') or 'no run.json'} | | | | | | | | | {done} |")
        for r in stage_rows(row):
            ok = "-" if r["ok"] is None else ("yes" if r["ok"] else "**NO**")
            lines.append(f"| {r['case']} | {r['stage']} | {r['placement']} | {gib(r['estimate'])} | "
                         f"{gib(r['nvml_peak'])} | {gib(r['torch_peak'])} | {gib(r['budget'])} | "
                         f"{gib(r['host_estimate'])} | {gib(r['ram_peak'])} | {gib(r['rss_peak'])} | "
                         f"{r['seconds']:.1f} | {ok} |")
    timed = [r for row in rows if row["case"]["group"] == "denoise-batch" for r in stage_rows(row)
             if r["stage"] == "denoise"]
    if timed:
        lines += ["", "Denoise, 8 images of 8 steps each (the stage's time less its loading, per image):", "",
                  "| case | placement | s per image | NVML peak GiB |", "|---|---|---|---|"]
        for r in timed:
            lines.append(f"| {r['case']} | {r['placement']} | {r['work_s'] / r['images']:.3f} | {gib(r['nvml_peak'])} |")
    host = [row for row in rows if row["case"]["group"] == "host" and row.get("image_diff") is not None]
    if host:
        lines += ["", "Host budgets (Σ 2K at 2.5 GiB): max pixel difference to the 32 GiB run's image: "
                  + ", ".join(f"{row['case']['name']}: {row['image_diff']}/255" for row in host)]
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[str]:
    """What broke a promise: a stage over its budget or its estimate, a case that did not finish."""
    out = []
    for row in rows:
        if str(row.get("note", "")).startswith("not run"):
            continue  # listed in the table; a later command can run it
        if row.get("returncode") != 0:
            out.append(f"{row['case']['name']}: did not finish ({row.get('note')})")
        for r in stage_rows(row):
            if r["ok"] is False:
                what = "; ".join(r["over_budget"]) or "over its estimate"
                out.append(f"{r['case']} {r['stage']}: {what} (NVML {gib(r['nvml_peak'])}, estimate "
                           f"{gib(r['estimate'])}, budget {gib(r['budget'])} GiB)")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--cases", default="all", help="comma-separated group or case names (default: all)")
    parser.add_argument("--presets", default="all", help="comma-separated presets: only their cases (default: all)")
    parser.add_argument("--deadline", type=float, help="seconds after which no case starts (the rest are listed "
                                                       "as not run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", help="use this model folder for every case instead of building the presets "
                                        "(with --device cpu: a dry check of the plumbing with a tiny model)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pixart-sweep"))
    parser.add_argument("--keep-models", action="store_true", help="keep the built models (11 GB each)")
    parser.add_argument("--timeout", type=float, default=150, help="seconds a case may take")
    parser.add_argument("--write-benchmarks", action="store_true")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if args.out is None:
        parser.error("--out is required")
    wanted = set(args.cases.split(","))
    presets = set(args.presets.split(","))
    chosen = [c for c in cases() if ("all" in wanted or c.group in wanted or c.name in wanted)
              and ("all" in presets or c.preset in presets)]
    if not chosen:
        parser.error(f"no case is named by {args.cases!r}")
    dry = args.device == "cpu"
    if dry:
        if not args.model:
            parser.error("--device cpu needs --model DIR (a tiny model): it checks the plumbing only")
        # Plumbing only: the tiny model's default 256 px, few texts; budgets are ignored on the CPU.
        chosen = [dataclasses.replace(c, width=256, height=256, texts=min(c.texts, 6), images=min(c.images, 2))
                  for c in chosen]
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    rows = []
    began = time.perf_counter()
    by_preset: dict[str, list[Case]] = {}
    for c in chosen:
        by_preset.setdefault(c.preset, []).append(c)
    for preset, group in by_preset.items():
        if args.deadline and time.perf_counter() - began > args.deadline:
            rows += [{"case": dataclasses.asdict(c), "returncode": None, "note": "not run (--deadline)"} for c in group]
            continue
        model = Path(args.model) if args.model else None
        if model is None:
            start = time.perf_counter()
            model = build(preset, args.work, args.device, logs / f"build-{preset}.log")
            print(f"built {preset} in {time.perf_counter() - start:.0f} s", flush=True)
        for case in group:
            if args.deadline and time.perf_counter() - began > args.deadline:
                rows.append({"case": dataclasses.asdict(case), "returncode": None, "note": "not run (--deadline)"})
                continue
            row = run_case(case, model, args.device, args.work, logs, args.timeout)
            rows.append(row)
            print(f"{case.name}: {row['wall_s']:.1f} s" + (f" ({row['note']})" if row.get("note") else ""), flush=True)
            (args.out / "sweep-partial.json").write_text(json.dumps(rows, indent=2, default=str))
        if not args.model and not args.keep_models:
            shutil.rmtree(model, ignore_errors=True)
    base = next((r for r in rows if r["case"]["name"] == "host-2k-32GiB"), None)
    for row in rows:
        if row["case"]["group"] == "host" and base is not None and row.get("returncode") == 0:
            a, b = sorted(Path(row["folder"], "images").glob("*.png")), sorted(Path(base["folder"], "images").glob("*.png"))
            row["image_diff"] = max((max_pixel_diff(x, y) for x, y in zip(a, b)), default=None)
    problems = summary(rows)
    gpu = "cpu (dry check)"
    if not dry:
        gpu = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0))"],
                             capture_output=True, text=True).stdout.strip()
    command = f"python bench/sweep.py --out OUT --cases {args.cases} --presets {args.presets}"
    result = {"gpu": gpu, "command": command, "problems": problems, "rows": rows}
    (args.out / "sweep.json").write_text(json.dumps(result, indent=2, default=str))
    text = tables(rows)
    (args.out / "sweep.md").write_text(text + "\n")
    print(text)
    print("\n" + ("\n".join(["PROMISES BROKEN:"] + problems) if problems else "every stage within its budget "
                                                                              "and its estimate"))
    if args.write_benchmarks:
        store = ROOT / "bench" / "results" / "sweep.json"
        earlier = json.loads(store.read_text()) if store.is_file() else {"runs": []}
        runs = [r for r in earlier["runs"] if r["command"] != command] + [result]
        store.write_text(json.dumps({"runs": runs}, indent=2, default=str))
        every = [row for r in runs for row in r["rows"]]
        head = "; ".join(f"`{r['command']}` on {r['gpu']}" for r in runs)
        broken = [p for r in runs for p in r["problems"]]
        verdict = ("**Promises broken:** " + "; ".join(broken)) if broken else \
            "Every stage stayed within its budget and under its estimate."
        replace_marked(ROOT / "BENCHMARKS.md", "sweep-table", f"Latest: {head}. {verdict}\n\n{tables(every)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
