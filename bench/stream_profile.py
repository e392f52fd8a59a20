"""Where the streamed DiT's time goes, and how fast T5's weights come off the page cache.

The DiT of MODEL runs 20 steps at 1024x1024 with guidance (batch 2), fp16, by itself
(no pipeline, no scheduler), in several ways: resident, and streamed with some blocks kept and some moved ahead,
with and without a torch memory cap and the NVML sampling thread. For each: ms per step, what crossed the bus,
and the caching allocator's retries and cudaMalloc/cudaFree calls (each a possible device-wide stall). Then the
page-cache read speed of T5's shards into pinned memory with 1, 2, 4 and 8 threads.

    python bench/stream_profile.py MODEL_DIR [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pixart_lowvram import memory  # noqa: E402
from pixart_lowvram.models import index_safetensors, load_transformer_streamed  # noqa: E402
from pixart_lowvram.streaming import read_into  # noqa: E402

STEPS = 20


def inputs(device):
    g = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(2, 4, 128, 128, generator=g).to(device, torch.float16)
    text = torch.randn(2, 120, 4096, generator=g).to(device, torch.float16)
    mask = torch.ones(2, 120, device=device)
    cond = {"resolution": torch.tensor([[1024.0, 1024.0]] * 2, device=device, dtype=torch.float16),
            "aspect_ratio": torch.tensor([[1.0]] * 2, device=device, dtype=torch.float16)}
    return latents, text, mask, cond


def steps(model, device, n=STEPS) -> float:
    latents, text, mask, cond = inputs(device)
    with torch.inference_mode():
        for warm in (True, False):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for t in range(2 if warm else n):
                out = model(latents, encoder_hidden_states=text, encoder_attention_mask=mask,
                            timestep=torch.tensor([999 - t * 40] * 2, device=device), added_cond_kwargs=cond,
                            return_dict=False)[0]
                latents = latents + 0.0 * out[:, :4]
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1000


def alloc_counts(device) -> dict:
    s = torch.cuda.memory_stats(device)
    return {k: s.get(k, 0) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-reads", action="store_true", help="leave out the T5 read-speed rows")
    args = parser.parse_args()
    from diffusers import PixArtTransformer2DModel

    device = torch.device("cuda")
    torch.zeros(1, device=device)
    results = {"gpu": torch.cuda.get_device_name(0), "rows": [],
               "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")}
    print("PYTORCH_CUDA_ALLOC_CONF", results["PYTORCH_CUDA_ALLOC_CONF"])

    def record(label, ms, before, moved=None, **extra):
        after = alloc_counts(device)
        row = {"way": label, "ms_per_step": round(ms, 2), **{k: after[k] - before[k] for k in after},
               "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3), **extra}
        if moved is not None:
            row["gb_per_step"] = round(moved / 1e9, 3)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)

    # resident
    gpu = PixArtTransformer2DModel.from_pretrained(args.model / "transformer", torch_dtype=torch.float16).to(device)
    torch.cuda.reset_peak_memory_stats()
    before = alloc_counts(device)
    record("resident", steps(gpu, device), before)
    del gpu
    memory.release(device)

    total = torch.cuda.get_device_properties(0).total_memory
    for resident, ahead, cap_gib, sampler in [(5, 2, None, False), (0, 2, None, False), (5, 1, None, False),
                                              (5, 2, None, True), (5, 2, 0.9, True)]:
        if cap_gib:
            torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total)
        start = time.perf_counter()
        model, streamer = load_transformer_streamed(args.model / "transformer", torch.float16, device, ahead=ahead,
                                                    resident=resident)
        load_s = time.perf_counter() - start
        stop = threading.Event()
        probe = memory.GpuMemoryProbe(device) if sampler else None
        thread = None
        if sampler:
            def loop():
                while not stop.wait(memory._SAMPLE_SECONDS):
                    probe.read()
                    memory._read_rss()
            thread = threading.Thread(target=loop, daemon=True)
            thread.start()
        torch.cuda.reset_peak_memory_stats()
        before = alloc_counts(device)
        streamer.bytes_moved = 0
        ms = steps(model, device)
        moved = streamer.bytes_moved / (STEPS + 2)
        stop.set()
        if thread:
            thread.join()
        record(f"streamed, {resident} kept, {ahead} ahead" + (f", torch capped at {cap_gib} GiB" if cap_gib else "")
               + (f", NVML sampler every {memory._SAMPLE_SECONDS * 1000:g} ms" if sampler else ""),
               ms, before, moved, resident=resident, ahead=ahead, cap_gib=cap_gib, sampler=sampler,
               load_s=round(load_s, 2))
        streamer.close()
        del model, streamer
        torch.cuda.set_per_process_memory_fraction(1.0)
        memory.release(device)

    if args.no_reads:
        return print(json.dumps(results)) if not args.out else args.out.write_text(json.dumps(results, indent=2))
    # T5 shards from the page cache into pinned memory
    stored = list(index_safetensors(sorted((args.model / "text_encoder").glob("*.safetensors"))).values())
    nbytes = sum(s.nbytes for s in stored)
    pinned = torch.empty(max(s.nbytes for s in stored), dtype=torch.uint8, pin_memory=True)
    buffers = [torch.empty(max(s.nbytes for s in stored), dtype=torch.uint8, pin_memory=True) for _ in range(8)]
    for threads in (1, 2, 4, 8):
        start = time.perf_counter()
        if threads == 1:
            for s in stored:
                read_into(s, pinned)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda ix: read_into(ix[1], buffers[ix[0] % threads]), enumerate(stored)))
        seconds = time.perf_counter() - start
        row = {"way": f"T5 shards -> pinned, {threads} thread(s)", "gb": round(nbytes / 1e9, 2),
               "seconds": round(seconds, 2), "gb_per_s": round(nbytes / 1e9 / seconds, 1)}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
