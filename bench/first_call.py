"""What the first call of a shape costs against the next ones, per SDPA backend, each in a fresh process (one-time
costs such as cuDNN building its attention kernels are per process and per shape): the PixArt-XL-2 transformer at
1024² with guidance, one image (batch 2) and then two (batch 4, a new shape), and SDPA alone at the DiT's
self-attention shape.

    python bench/first_call.py --out OUT [--backends default,flash,efficient] [--reps 10]

`default`: torch's own order (on an H100/H200, cuDNN's attention first); `flash`: FLASH_ATTENTION first, then
EFFICIENT_ATTENTION and MATH (`torch.nn.attention.sdpa_kernel(..., set_priority=True)`); `efficient`: the
memory-efficient kernel first. Writes OUT/first_call.json and prints a table."""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

ORDERS = {"default": None, "flash": ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"],
          "efficient": ["EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION", "MATH"],
          "cudnn": ["CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"]}


def child(backend: str, size: int, reps: int, preset: str) -> dict:
    import torch  # noqa: PLC0415
    from diffusers import PixArtTransformer2DModel  # noqa: PLC0415
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    from pixart_lowvram.random_model import preset_config  # noqa: PLC0415

    order = ORDERS[backend]
    ctx = (lambda: sdpa_kernel([getattr(SDPBackend, n) for n in order], set_priority=True)) if order else \
        contextlib.nullcontext
    dev, dtype = "cuda", torch.float16
    out: dict = {"backend": backend}

    def timed(fn) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - start)

    torch.ones(1, device=dev)
    a = torch.randn(64, 64, device=dev, dtype=dtype)
    out["cublas_init_ms"] = timed(lambda: a @ a)  # the T5 stage before the DiT's does this in a run
    q = torch.randn(4, 16, (size // 16) ** 2, 72, device=dev, dtype=dtype)
    with ctx(), torch.inference_mode():
        out["sdpa_first_ms"] = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
        out["sdpa_next_ms"] = min(timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
                                  for _ in range(reps))
    config = preset_config(preset).transformer
    dit = PixArtTransformer2DModel.from_config(config).to(dev, dtype).eval()
    latent = size // 8
    for images in (1, 2):
        batch = 2 * images
        x = torch.randn(batch, 4, latent, latent, device=dev, dtype=dtype)
        text = torch.randn(batch, 120, config["caption_channels"], device=dev, dtype=dtype)
        mask = torch.zeros(batch, 120, device=dev, dtype=torch.long)
        mask[:, :24] = 1
        t = torch.full((batch,), 500, device=dev, dtype=torch.long)
        extra = {"resolution": torch.tensor([[size, size]] * batch, device=dev, dtype=dtype),
                 "aspect_ratio": torch.tensor([[1.0]] * batch, device=dev, dtype=dtype)}

        def call():
            with ctx(), torch.inference_mode():
                dit(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t, added_cond_kwargs=extra,
                    return_dict=False)
        out[f"dit_b{batch}_first_ms"] = timed(call)
        times = sorted(timed(call) for _ in range(reps))
        out[f"dit_b{batch}_next_ms"] = times[len(times) // 2]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--backends", type=lambda s: s.split(","), default=["default", "flash", "efficient"])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--preset", default="xl")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.size, args.reps, args.preset)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(args.rounds):  # interleaved: the machine drifts
        for backend in args.backends:
            done = subprocess.run([sys.executable, __file__, "--child", backend, "--size", str(args.size), "--reps",
                                   str(args.reps), "--preset", args.preset], capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"backend": backend, "error": done.stderr[-600:]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    (args.out / "first_call.json").write_text(json.dumps({"size": args.size, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
