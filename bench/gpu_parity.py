"""Do the GPUs of one host run the DiT at the same speed? The PixArt-XL-2 transformer (random weights, real shapes)
at 1024² with guidance, batch 4 (2 images), timed on each GPU alone, one after the other, then on all of them at
once (one process each, started together), with each GPU's clocks, power and temperature from NVML while it runs.
A several-GPU run divides the work by cost, as if the GPUs were alike: this says whether they are.

    python bench/gpu_parity.py --out OUT [--calls 60] [--rounds 2]

Writes OUT/gpu_parity.json and prints a table."""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import threading
import time
from pathlib import Path


def worker(index: int, calls: int, preset: str, start_at: float | None, queue) -> None:
    import pynvml  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from benchlib import event_times  # noqa: PLC0415
    from diffusers import PixArtTransformer2DModel  # noqa: PLC0415

    from pixart_lowvram.random_model import preset_config  # noqa: PLC0415

    torch.cuda.set_device(index)
    config = preset_config(preset).transformer
    with torch.device("cuda"):  # random weights drawn on the GPU: seconds, not the CPU's minute
        dit = PixArtTransformer2DModel.from_config(config).to(torch.float16).eval()
    x = torch.randn(4, 4, 128, 128, device="cuda", dtype=torch.float16)
    text = torch.randn(4, 120, config["caption_channels"], device="cuda", dtype=torch.float16)
    mask = torch.ones(4, 120, device="cuda", dtype=torch.long)
    t = torch.full((4,), 500, device="cuda", dtype=torch.long)
    extra = {"resolution": torch.tensor([[1024, 1024]] * 4, device="cuda", dtype=torch.float16),
             "aspect_ratio": torch.tensor([[1.0]] * 4, device="cuda", dtype=torch.float16)}

    def call():
        with torch.inference_mode():
            dit(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t, added_cond_kwargs=extra, return_dict=False)

    for _ in range(5):
        call()
    torch.cuda.synchronize()
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)  # CUDA_VISIBLE_DEVICES is not set by this bench
    samples: list[tuple[int, float, int]] = []
    done = threading.Event()

    def sample():
        while not done.wait(0.1):
            samples.append((pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                            pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
                            pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)))

    if start_at is not None:
        time.sleep(max(0.0, start_at - time.time()))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times = event_times(call, calls)
    done.set()
    sampler.join()
    clocks = [s[0] for s in samples] or [0]
    queue.put({"gpu": index, "name": torch.cuda.get_device_name(index), "ms_median": statistics.median(times),
               "ms_min": min(times), "ms_max": max(times), "sm_mhz_median": statistics.median(clocks),
               "sm_mhz_min": min(clocks), "power_w_max": max((s[1] for s in samples), default=0),
               "temp_c_max": max((s[2] for s in samples), default=0)})


def run(indices: list[int], calls: int, preset: str, together: bool) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    # started together: every process builds its model first, then all begin timing at one moment
    start_at = time.time() + 25 if together else None
    procs = [ctx.Process(target=worker, args=(i, calls, preset, start_at, queue)) for i in indices]
    for p in procs:
        p.start()
    rows = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return sorted(rows, key=lambda r: r["gpu"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--calls", type=int, default=60, help="timed transformer calls per GPU and run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--preset", default="xl")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch  # noqa: PLC0415

    count = torch.cuda.device_count()
    results = []
    for rnd in range(args.rounds):
        for i in range(count):
            for row in run([i], args.calls, args.preset, together=False):
                results.append({"round": rnd, "mode": "alone", **row})
                print(json.dumps(results[-1]), flush=True)
        if count > 1:
            for row in run(list(range(count)), args.calls, args.preset, together=True):
                results.append({"round": rnd, "mode": "together", **row})
                print(json.dumps(results[-1]), flush=True)
    (args.out / "gpu_parity.json").write_text(json.dumps({"rows": results}, indent=1))
    print("| round | mode | GPU | ms a call (median, min-max) | SM MHz median (min) | power max W | temp max C |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['round']} | {r['mode']} | {r['gpu']} | {r['ms_median']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f})"
              f" | {r['sm_mhz_median']} ({r['sm_mhz_min']}) | {r['power_w_max']:.0f} | {r['temp_c_max']} |")


if __name__ == "__main__":
    main()
