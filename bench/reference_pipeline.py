"""The plain diffusers pipeline: everything on the GPU (the baseline every low-memory way is measured against), or
with one of diffusers' own memory savers (the anchors pixart-lowvram is compared with).

Runs the items of an earlier pixart-lowvram run (same prompts, sizes, seeds) one call each, as a user of
`PixArtAlphaPipeline` would, and writes the images and its figures (wall time, torch peak, whole-process peak
from NVML, host RSS peak) as JSON. Run it in its own process, so its CUDA context and cache are its own.

    python bench/reference_pipeline.py MODEL RUN_DIR OUT_DIR [--dtype float16] [--mode MODE] [--device cuda]

Modes: gpu (all on the GPU), model-offload (`enable_model_cpu_offload`: one component on the GPU at a time),
sequential-offload (`enable_sequential_cpu_offload`: every layer moved in when it runs), group-offload
(`enable_group_offload`, one block per group, copies on a side stream, with the VAE tiled: diffusers' fastest
low-memory recipe).
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


def make_images(pipe, items: list[dict], out_dir: Path) -> None:
    """Each run item made by `pipe` as a user would call it (one call an image, the item's seed on a CPU generator),
    saved as OUT_DIR/<id>.png."""
    for item in items:
        image = pipe(item["prompt"], negative_prompt=item["negative_prompt"], width=item["width"],
                     height=item["height"], guidance_scale=item["cfg"], num_inference_steps=item["steps"],
                     generator=torch.Generator("cpu").manual_seed(item["seed"])).images[0]
        image.save(out_dir / f"{item['id']}.png")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--mode", default="gpu", choices=["gpu", "model-offload", "sequential-offload",
                                                          "group-offload"])
    parser.add_argument("--device", default="cuda", help="cpu: a dry check of the bench's plumbing (mode gpu only)")
    args = parser.parse_args()

    from diffusers import PixArtAlphaPipeline

    items = json.loads((args.run_dir / "run.json").read_text())["items"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    torch.zeros(1, device=device)
    probe = GpuMemoryProbe(device)
    start = time.perf_counter()
    with StageMeter(args.mode, device, probe) as meter:
        pipe = PixArtAlphaPipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype))
        if args.mode == "gpu":
            pipe.to(device)
        elif args.mode == "model-offload":
            pipe.enable_model_cpu_offload(device=device)
        elif args.mode == "sequential-offload":
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            pipe.enable_group_offload(onload_device=device, offload_type="block_level", num_blocks_per_group=1,
                                      use_stream=True)
            pipe.vae.enable_tiling()
        pipe.set_progress_bar_config(disable=True)
        loaded = time.perf_counter() - start
        make_images(pipe, items, args.out_dir)
    stats = meter.stats.to_json()
    stats.update(load_seconds=loaded, wall_seconds=time.perf_counter() - start, memory_source=probe.source)
    (args.out_dir / "reference.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
