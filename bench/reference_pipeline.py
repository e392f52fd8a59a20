"""The plain diffusers pipeline, everything on the GPU: the baseline every low-memory way is measured against.

Runs the items of an earlier pixart-lowvram run (same prompts, sizes, seeds) one call each, as a user of
`PixArtAlphaPipeline` would, and writes the images and its figures (wall time, torch peak, whole-process peak
from NVML, host RSS peak) as JSON. Run it in its own process, so its CUDA context and cache are its own.

    python bench/reference_pipeline.py MODEL RUN_DIR OUT_DIR [--dtype float16]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pixart_lowvram.memory import GpuMemoryProbe, StageMeter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtype", default="float16")
    args = parser.parse_args()

    from diffusers import PixArtAlphaPipeline

    items = json.loads((args.run_dir / "run.json").read_text())["items"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    torch.zeros(1, device=device)
    probe = GpuMemoryProbe(device)
    start = time.perf_counter()
    with StageMeter("all-on-GPU", device, probe) as meter:
        pipe = PixArtAlphaPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype)).to(device)
        pipe.set_progress_bar_config(disable=True)
        loaded = time.perf_counter() - start
        for item in items:
            image = pipe(item["prompt"], negative_prompt=item["negative_prompt"], width=item["width"],
                         height=item["height"], guidance_scale=item["cfg"], num_inference_steps=item["steps"],
                         generator=torch.Generator("cpu").manual_seed(item["seed"])).images[0]
            image.save(args.out_dir / f"{item['id']}.png")
    stats = meter.stats.to_json()
    stats.update(load_seconds=loaded, wall_seconds=time.perf_counter() - start, memory_source=probe.source)
    (args.out_dir / "reference.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
