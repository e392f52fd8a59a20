"""GPU cost of image-to-image: the same two-image queue at 1024x1024 without and with init images, unconstrained and
at --vram-budget 1.5GiB, each run in its own process (its own CUDA context, as a user's run has). Per stage: the
plan's placement and estimate, the measured peaks (NVML whole process, torch, host RAM) and the time; and the
image-to-image images at 1.5 GiB (VAE encoder in strips, DiT streamed, decoder in strips) against the unconstrained
ones (everything whole and resident).

    python bench/img2img.py --out OUT                                  # builds the xl model on the GPU (~30 s)
    python bench/img2img.py --out OUT --device cpu --model TINY_DIR    # a dry check of the plumbing on a CPU

The prompts' embeddings are made once, before the cases (an encode-only run into the shared embedding cache), so the
cases compare the stages image-to-image changes: vae-encode (new), denoise (fewer steps: int(steps x strength)) and
decode. Writes OUT/img2img.json and OUT/img2img.md; with --write-benchmarks also the section "Image-to-image" of
BENCHMARKS.md. About 2 to 3 minutes on an H200 (model build included).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from benchlib import max_pixel_diff, replace_section  # noqa: E402

GiB = 1024**3
PROMPTS = ["a lighthouse on a cliff at dusk, oil painting, dramatic light", "a red fox in the snow, photograph"]
CASES = [("text", None), ("image", None), ("text", "1.5GiB"), ("image", "1.5GiB")]  # (kind, --vram-budget)


def write_picture(path: Path, width: int, height: int, seed: int) -> None:
    """A picture with structure (gradients, a disc), as a user's photo stands in for here."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    a, b, c = np.random.default_rng(seed).random(3)
    disc = ((x - 0.3 - 0.4 * a) ** 2 + (y - 0.3 - 0.4 * b) ** 2 < 0.04).astype(float)
    rgb = np.stack([x * a + disc * 0.5, y * b, (1 - x) * c + disc * 0.3], axis=-1)
    Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(path)


def queue(kind: str, side: int, steps: int, strength: float, pictures: list[Path]) -> list[dict]:
    jobs = []
    for i, prompt in enumerate(PROMPTS):
        job = {"prompt": prompt, "seed": 100 + i, "width": side, "height": side, "steps": steps, "name": f"img-{i}"}
        if kind == "image":
            job.update(init_image=str(pictures[i]), strength=strength)
        jobs.append(job)
    return jobs


def child(spec: dict) -> int:
    """One case in its own process: run the queue, leave run.json; `until` stops after that stage."""
    import threading  # noqa: PLC0415

    from pixart_lowvram.cli import set_allocator_defaults  # noqa: PLC0415

    set_allocator_defaults()  # before CUDA starts, as the command does
    from pixart_lowvram.errors import Interrupted  # noqa: PLC0415
    from pixart_lowvram.generate import Settings, run_queue  # noqa: PLC0415
    from pixart_lowvram.jobs import validate_document  # noqa: PLC0415
    from pixart_lowvram.reporting import Bar, Reporter  # noqa: PLC0415

    stop = threading.Event()

    class StopAfter(Reporter):
        def bar(self, desc, total, unit="it", transient=False):
            class Closing(Bar):
                def close(self) -> None:
                    stop.set()

            return Closing() if desc == spec.get("until") else Bar()

    jobs = validate_document({"jobs": spec["jobs"]}, "bench")
    settings = Settings(model=spec["model"], device=spec["device"], vram_budget=spec["budget"])
    try:
        run_queue(jobs, spec["folder"], settings, StopAfter(), stop=stop)
    except Interrupted:
        pass
    return 0


def run(spec: dict, log: Path, timeout: float) -> dict:
    start = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], stdout=f,
                                  stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout, check=False,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    row = {"returncode": code, "wall_s": time.perf_counter() - start}
    manifest = Path(spec["folder"]) / "run.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        row.update(plan=data.get("plan"), stages=data.get("stages", []), vram_budget=data.get("vram_budget"),
                   items=data.get("items", []))
    if code != 0:
        row["note"] = log.read_text()[-400:].strip().splitlines()[-1:] if log.is_file() else "no log"
    return row


def gib(v) -> str:
    return "-" if not v else f"{v / GiB:.2f}"


def table(rows: list[dict], side: int, steps: int, strength: float) -> str:
    lines = [f"Two {side}x{side} images, {steps} steps; image-to-image at strength {strength:g} "
             f"({int(steps * strength)} steps run). Embeddings made beforehand (T5 is not part of these runs).", "",
             "| queue | budget | stage | placement | estimate GiB | NVML peak GiB | torch peak GiB | RSS GiB | s | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        plan = row.get("plan") or {}
        budget = row.get("vram_budget")
        for st in row.get("stages") or []:
            if st.get("skipped"):
                continue
            p = plan.get(st["name"], {})
            how = p.get("placement", "-") + (f" ({gib(p['room'])} GiB room)" if p.get("room") else "")
            nvml, estimate = st.get("nvml_peak"), p.get("estimate")
            checks = [v for v in ((nvml <= budget) if nvml and budget else None,
                                  (nvml <= estimate) if nvml and estimate else None) if v is not None]
            ok = "-" if not checks else ("yes" if all(checks) else "**NO**")
            lines.append(f"| {row['kind']} | {row['budget'] or 'none'} | {st['name']} | {how} | {gib(estimate)} | "
                         f"{gib(nvml)} | {gib(st.get('torch_peak'))} | {gib(st.get('rss_peak'))} | "
                         f"{st['seconds']:.2f} | {ok} |")
        if not row.get("stages"):
            lines.append(f"| {row['kind']} | {row['budget'] or 'none'} | - | did not run: {row.get('note')} | | | | | | |")
    lines += ["", "| queue | budget | process wall s | stages s |", "|---|---|---|---|"]
    for row in rows:
        stages = sum(s.get("seconds", 0) for s in row.get("stages") or [])
        lines.append(f"| {row['kind']} | {row['budget'] or 'none'} | {row['wall_s']:.1f} | {stages:.2f} |")
    diffs = [row for row in rows if row.get("image_diff") is not None]
    if diffs:
        lines += ["", "Max pixel difference of each budget's images to the unconstrained run's of the same queue: "
                  + ", ".join(f"{row['kind']} at {row['budget']}: {row['image_diff']}/255" for row in diffs)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", help="a model folder (default: build the xl preset on the GPU)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--work", type=Path, default=Path("/tmp/pixart-img2img"))
    parser.add_argument("--timeout", type=float, default=150, help="seconds a case may take")
    parser.add_argument("--write-benchmarks", action="store_true")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if args.out is None:
        parser.error("--out is required")
    dry = args.device == "cpu"
    if dry and not args.model:
        parser.error("--device cpu needs --model DIR (a tiny model): it checks the plumbing only")
    side, steps = (256, 2) if dry else (1024, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "logs"
    logs.mkdir(exist_ok=True)
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    # A cache of our own (embeddings, weight hashes), shared by the cases and gone with the work folder.
    os.environ["XDG_CACHE_HOME"] = str(args.work / "cache")
    model = Path(args.model) if args.model else args.work / "pixart-xl"
    if not args.model:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pixart_lowvram.cli", "make-random-model", "--preset", "xl", str(model),
                        "--device", args.device], check=True, cwd=ROOT)
        subprocess.run(f"cat {model}/*/* > /dev/null", shell=True, check=False)  # warm the page cache
        print(f"xl model built in {time.perf_counter() - start:.1f} s", flush=True)
    pictures = [args.work / "photo-0.png", args.work / "photo-1.jpg"]
    write_picture(pictures[0], 1200, 800, 1)  # other sizes and aspect ratios than the images': resized
    write_picture(pictures[1], 768, 1024, 2)
    common = {"model": str(model), "device": args.device}
    warm = run({**common, "jobs": queue("text", side, steps, args.strength, pictures), "budget": None,
                "folder": str(args.work / "warm"), "until": "encode"}, logs / "warm.log", args.timeout)
    print(f"embeddings made in {warm['wall_s']:.1f} s", flush=True)
    rows = []
    for kind, budget in CASES:
        name = f"{kind}-{budget or 'unconstrained'}"
        spec = {**common, "jobs": queue(kind, side, steps, args.strength, pictures), "budget": budget,
                "folder": str(args.work / name)}
        row = {"kind": "text-to-image" if kind == "text" else "image-to-image", "budget": budget, "name": name,
               **run(spec, logs / f"{name}.log", args.timeout)}
        rows.append(row)
        print(f"{name}: exit {row['returncode']}, {row['wall_s']:.1f} s", flush=True)
    for row in rows:
        if row["budget"]:
            base = args.work / row["name"].replace(row["budget"], "unconstrained") / "images"
            here = args.work / row["name"] / "images"
            pairs = [(here / p.name, p) for p in sorted(base.glob("*.png")) if (here / p.name).is_file()]
            if pairs:
                row["image_diff"] = max(max_pixel_diff(a, b) for a, b in pairs)
    text = table(rows, side, steps, args.strength)
    (args.out / "img2img.json").write_text(json.dumps({"steps": steps, "strength": args.strength, "side": side,
                                                       "rows": [{k: v for k, v in r.items() if k != "items"}
                                                                for r in rows]}, indent=2))
    (args.out / "img2img.md").write_text(text + "\n")
    print(text)
    if args.write_benchmarks and not dry:
        replace_section(ROOT / "BENCHMARKS.md", "Image-to-image", "## Image-to-image\n\n" + text + "\n")
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
