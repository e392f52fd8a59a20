"""GPU benchmark of the staged queue (pixart-lowvram 0.1) on the full-size random-weight XL model.

One command does it all, each measured way in its own process:
  1. build the `xl` random model (exact PixArt-XL-2-1024-MS shapes) on the GPU;
  2. `pixart-lowvram run examples/seed-queue.toml` at 1024x1024: per-stage time, torch peak, NVML peak, RSS;
  3. the plain diffusers pipeline, all on the GPU, on the same items (bench/reference_pipeline.py);
  4. max pixel difference between the two, image by image (equivalence on the GPU, fp16);
  5. in-process: after each stage's release, torch.cuda.memory_allocated is back where it was.
Writes results JSON and a markdown table to --out.

    python bench/core_gpu.py --out OUT_DIR [--model DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from benchlib import max_pixel_diff, queue_arguments  # noqa: E402

GiB = 1024**3


def sh(args: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - start
    print(log.read_text()[-3000:])
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode})")
    return seconds


def embed_relative_errors(a: Path, b: Path) -> dict[str, float]:
    """||a - b|| / ||b|| for each embedding the two runs share (same key: same text, model, dtype)."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted((b / "embeds").glob("*.safetensors")):
        x, y = load_file(str(a / "embeds" / path.name)), load_file(str(path))
        m = y["mask"].bool()
        ex, ey = x["embeds"][m].float(), y["embeds"][m].float()
        out[path.stem] = float((ex - ey).norm() / ey.norm())
    return out


def release_check(model: str, out: Path) -> list[dict]:
    """torch.cuda.memory_allocated before each component loads, and at the end: it must not grow.

    torch keeps a cuBLAS workspace per stream (32 MiB, through its caching allocator) once a matrix product
    ran; it is torch's, not a component's, so it is cleared before reading (a private call, in this check only).
    """
    import gc

    import torch

    from pixart_lowvram import decode, denoise, encode
    from pixart_lowvram.generate import Settings, run_queue
    from pixart_lowvram.jobs import jobs_from_options

    readings = []

    def track(module, name):
        real = getattr(module, name)

        def load(*a, **k):
            readings.append(reading(name))
            return real(*a, **k)

        setattr(module, name, load)

    def reading(name):
        gc.collect()
        raw = torch.cuda.memory_allocated()
        torch._C._cuda_clearCublasWorkspaces()
        live = [tuple(o.shape) for o in gc.get_objects() if torch.is_tensor(o) and o.is_cuda]
        return {"before": name, "allocated_raw": raw, "allocated": torch.cuda.memory_allocated(),
                "live_cuda_tensors": live[:20]}

    track(encode, "load_text_encoder")
    track(denoise, "load_transformer")
    track(decode, "load_vae")
    torch.zeros(1, device="cuda")
    baseline = torch.cuda.memory_allocated()
    run_queue(jobs_from_options("release check", seed=1, steps=2, width=512, height=512), out,
              Settings(model=model, device="cuda"))
    readings.append(reading("end"))
    for r in readings:
        r["above_baseline"] = r["allocated"] - baseline
    return readings


def main() -> None:
    parser = argparse.ArgumentParser()
    queue_arguments(parser)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path("/tmp/pixart-bench")
    work.mkdir(exist_ok=True)
    py = sys.executable
    results: dict = {}

    import torch

    results["gpu"] = torch.cuda.get_device_name(0)
    results["versions"] = {"torch": torch.__version__}
    build_s = sh([py, "-m", "pixart_lowvram.cli", "make-random-model", "--preset", "xl", args.model],
                 args.out / "build.log")
    results["build_xl_seconds"] = build_s

    run_dir = work / "staged"
    wall = sh([py, "-m", "pixart_lowvram.cli", "run", args.queue, "--model", args.model, "--out", str(run_dir),
               "--force", "-q"], args.out / "staged.log")
    manifest = json.loads((run_dir / "run.json").read_text())
    results["staged"] = {"wall_seconds": wall, "stages": manifest["stages"], "versions": manifest["versions"],
                         "memory_source": manifest["memory_source"]}

    ref_dir = work / "reference"
    ref_wall = sh([py, "bench/reference_pipeline.py", args.model, str(run_dir), str(ref_dir)],
                  args.out / "reference.log")
    reference = json.loads((ref_dir / "reference.json").read_text())
    reference["process_wall_seconds"] = ref_wall
    results["reference"] = reference

    results["pixel_diff"] = {
        item["id"]: max_pixel_diff(run_dir / item["image"], ref_dir / f"{item['id']}.png")
        for item in manifest["items"]}

    # The same queue with all its texts through T5 in one batch: faster on long queues, but other kernels run.
    # The manifest is copied so the drawn seeds are the same.
    batch_dir = work / "staged-encode-batch-32"
    batch_dir.mkdir(exist_ok=True)
    (batch_dir / "run.json").write_text((run_dir / "run.json").read_text())
    sh([py, "-m", "pixart_lowvram.cli", "run", args.queue, "--model", args.model, "--out", str(batch_dir),
        "-q", "--encode-batch", "32"], args.out / "staged-batch32.log")
    results["pixel_diff_encode_batch_32"] = {
        item["id"]: max_pixel_diff(batch_dir / item["image"], ref_dir / f"{item['id']}.png")
        for item in manifest["items"]}
    results["embed_relative_error_batch_32_vs_1"] = embed_relative_errors(batch_dir, run_dir)
    results["release_check"] = release_check(args.model, work / "release")

    (args.out / "core.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
