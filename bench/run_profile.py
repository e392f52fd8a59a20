"""Where a run's GPU waits: a whole `pixart-lowvram run` in this process under torch.profiler (CPU and CUDA
activities), then the GPU's busy time per stage and its longest idle gaps with what the CPU was doing meanwhile.

    python bench/run_profile.py --out OUT --model MODEL [--queue bench/queues/long-32.toml] [--jobs 8] [-- RUN_ARGS]

`--jobs`: the queue's first N jobs. RUN_ARGS go to `pixart-lowvram run` (e.g. `--vram-budget 1.5GiB`). Stage
spans come from the profiler's own clock: each stage's first and last kernel between the CPU events of its
functions (`encode_texts`, `denoise_items`, `decode_items`, recorded with torch.profiler.record_function around the
library's stage functions by this script, not by the library). Writes OUT/run_profile.json and prints a summary."""
from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import sys
import tomllib
from pathlib import Path

import torch

STAGES = {"encode": ("pixart_lowvram.encode", "encode_texts"), "denoise": ("pixart_lowvram.denoise", "denoise_items"),
          "decode": ("pixart_lowvram.decode", "decode_items")}


def merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--queue", default="bench/queues/long-32.toml")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--gap-ms", type=float, default=2.0, help="idle gaps shorter than this are not listed")
    parser.add_argument("rest", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    queue = tomllib.loads(Path(args.queue).read_text())
    queue["jobs"] = queue["jobs"][: args.jobs]
    short = args.out / "queue.json"
    short.write_text(json.dumps(queue))

    import importlib  # noqa: PLC0415

    from torch.profiler import ProfilerActivity, profile, record_function  # noqa: PLC0415

    from pixart_lowvram import cli, generate  # noqa: PLC0415

    # Each stage function wrapped in a named range, in this process only, so the trace says which stage ran when.
    for stage, (module_name, func) in STAGES.items():
        module = importlib.import_module(module_name)
        original = getattr(module, func)

        def wrapped(*a, _original=original, _stage=stage, **k):
            with record_function(f"stage:{_stage}"):
                return _original(*a, **k)
        setattr(module, func, wrapped)
        if hasattr(generate, func):
            setattr(generate, func, wrapped)
    rest = [a for a in args.rest if a != "--"]
    argv = ["run", str(short), "--model", args.model, "--out", str(args.out / "run"), "--no-embed-cache", "-q",
            "--force", *rest]
    sys.argv = ["pixart-lowvram", *argv]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof, contextlib.suppress(SystemExit):
        code = cli.main()
    events = prof.events()
    gpu = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    ranges = {e.name.removeprefix("stage:"): (e.time_range.start, e.time_range.end) for e in events
              if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("stage:")}
    cpu = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU
                  and not e.name.startswith("stage:")), key=lambda e: e.time_range.start)
    cpu_starts = [e.time_range.start for e in cpu]
    longest = max((e.time_range.end - e.time_range.start for e in cpu), default=0)
    busy = merged(gpu)
    result: dict = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "exit": code,
                    "argv": argv, "stages": {}}
    for stage, (start, end) in sorted(ranges.items(), key=lambda kv: kv[1][0]):
        inside = [(max(a, start), min(b, end)) for a, b in busy if b > start and a < end]
        gpu_ms = sum(b - a for a, b in inside) / 1000
        gaps = []
        for (a0, a1), (b0, b1) in zip(inside, inside[1:]):
            if (b0 - a1) / 1000 >= args.gap_ms:
                # the CPU events spanning the gap: those that started before it ends and at most the longest
                # event's length before it began (bisected: a streamed run's trace holds millions of events)
                lo, hi = bisect.bisect_left(cpu_starts, a1 - longest), bisect.bisect_right(cpu_starts, b0)
                doing = sorted({e.name for e in cpu[lo:hi] if e.time_range.end >= a1}, key=len)[:6]
                gaps.append({"at_ms": (a1 - start) / 1000, "ms": (b0 - a1) / 1000, "cpu": doing})
        first_kernel = (inside[0][0] - start) / 1000 if inside else None
        result["stages"][stage] = {"wall_ms": (end - start) / 1000, "gpu_busy_ms": gpu_ms,
                                   "before_first_kernel_ms": first_kernel,
                                   "idle_gaps_total_ms": sum(g["ms"] for g in gaps),
                                   "gaps": sorted(gaps, key=lambda g: -g["ms"])[:25]}
    (args.out / "run_profile.json").write_text(json.dumps(result, indent=2))
    for stage, s in result["stages"].items():
        print(f"{stage:8} wall {s['wall_ms']:8.0f} ms  GPU busy {s['gpu_busy_ms']:8.0f} ms  gaps>= {args.gap_ms} ms: "
              f"{s['idle_gaps_total_ms']:6.0f} ms")
        for g in s["gaps"][:8]:
            print(f"    at {g['at_ms']:8.0f} ms: idle {g['ms']:6.1f} ms   cpu: {', '.join(g['cpu'])[:150]}")


if __name__ == "__main__":
    main()
