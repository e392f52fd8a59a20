"""Two numbers the streamers live by, on this GPU: host->GPU copy speed (pinned and pageable) and the DiT's
compute per block at 1024x1024 with guidance (batch 2), fp16. A streamed block hides behind compute only if its
copy takes less time than the block before it computes.

    python bench/bus.py
"""
import json

import torch


def timed(fn, n=20):
    fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n / 1000


def main():
    size = 42 * 1024**2  # one PixArt-XL DiT block in fp16
    gpu = torch.empty(size, dtype=torch.uint8, device="cuda")
    pinned = torch.randint(0, 255, (size,), dtype=torch.uint8).pin_memory()
    pageable = torch.randint(0, 255, (size,), dtype=torch.uint8)
    out = {"pinned_GBps": size / timed(lambda: gpu.copy_(pinned, non_blocking=True)) / 1e9,
           "pageable_GBps": size / timed(lambda: gpu.copy_(pageable)) / 1e9}
    from diffusers import PixArtTransformer2DModel

    with torch.device("cuda"):
        model = PixArtTransformer2DModel().to(torch.float16).eval()
    block = model.transformer_blocks[0]
    x = torch.randn(2, 4096, 1152, device="cuda", dtype=torch.float16)
    enc = torch.randn(2, 120, 1152, device="cuda", dtype=torch.float16)
    t = torch.randn(2, 6 * 1152, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        out["dit_block_ms"] = 1000 * timed(lambda: block(x, encoder_hidden_states=enc, timestep=t))
    out["block_copy_ms_pinned"] = 1000 * size / out["pinned_GBps"] / 1e9
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
