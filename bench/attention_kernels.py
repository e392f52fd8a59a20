"""The DiT's self-attention alone, by kernel: PixArt-XL-2 at 1024² with guidance runs it on (batch, 16 heads, 4096
tokens, head size 72) each block. Times torch's SDPA (its default, cuDNN's kernel on an H100/H200; FlashAttention-2),
SDPA with the head size padded with zeros (80, 96, 128: does a size that fits the kernels' tiles run faster than it
costs?), and SageAttention 1's Triton kernel (`sageattention` 1.0.6 from PyPI: 8-bit Q and K, per-block scales, its
sizes are 64, 96 and 128, so 72 is padded to 96), and measures each against float32 attention on the same inputs.

    python bench/attention_kernels.py --out OUT [--batch 4] [--reps 30]

Two kinds of input: unit normal Q, K, V; and the same with a per-channel offset on K (`outliers`), the shape real
keys take and the one SageAttention's smoothing of K is for. Error: relative L2 of the output against float32, and
the largest absolute difference. Writes OUT/attention_kernels.json and prints a table."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from benchlib import event_times


def timed(fn, reps: int) -> float:
    """Median milliseconds of `fn()` by CUDA events, after 5 warm-up calls."""
    times = sorted(event_times(fn, reps, warm=5))
    return times[len(times) // 2]


def padded(fn, size: int):
    """`fn(q, k, v, scale)` on the head size padded with zeros to `size`: QK^T and PV are unchanged (zero columns),
    the scale is the unpadded size's, and the output's padding is cut off."""
    def call(q, k, v):
        d = q.shape[-1]
        pad = (0, size - d)
        out = fn(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), 1 / math.sqrt(d))
        return out[..., :d]
    return call


def sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    def call(q, k, v, scale=None):
        with sdpa_kernel([getattr(SDPBackend, name)]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return call


def variants() -> dict:
    out = {
        "sdpa default": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "sdpa cudnn": lambda q, k, v: sdpa_backend("CUDNN_ATTENTION")(q, k, v),
        "sdpa flash": lambda q, k, v: sdpa_backend("FLASH_ATTENTION")(q, k, v),
        "sdpa cudnn, padded to 80": padded(sdpa_backend("CUDNN_ATTENTION"), 80),
        "sdpa cudnn, padded to 96": padded(sdpa_backend("CUDNN_ATTENTION"), 96),
        "sdpa cudnn, padded to 128": padded(sdpa_backend("CUDNN_ATTENTION"), 128),
    }
    try:
        from sageattention import sageattn  # noqa: PLC0415
    except ImportError as exc:
        print(f"sageattention: not importable ({exc})")
        return out
    out["sage 1 (triton), padded to 96"] = padded(
        lambda q, k, v, scale: sageattn(q, k, v, tensor_layout="HND", sm_scale=scale), 96)
    out["sage 1 (triton), padded to 96, no smoothing"] = padded(
        lambda q, k, v, scale: sageattn(q, k, v, tensor_layout="HND", sm_scale=scale, smooth_k=False), 96)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=4, help="2 per image with guidance (default 4: 2 images)")
    ap.add_argument("--tokens", type=int, default=4096, help="(size/16)^2: 4096 at 1024x1024")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    shape = (args.batch, 16, args.tokens, 72)
    flop = 4 * args.batch * 16 * args.tokens * args.tokens * 72
    inputs = {}
    for kind in ("normal", "outliers"):
        q, k, v = (torch.randn(shape, device="cuda") for _ in range(3))
        if kind == "outliers":
            k = k + 4 * torch.randn(1, 16, 1, 72, device="cuda")  # a per-channel offset shared by all tokens
        ref = F.scaled_dot_product_attention(q, k, v)  # float32 inputs: the math or efficient kernel, float32
        inputs[kind] = (q.half(), k.half(), v.half(), ref)
    rows = []
    for name, fn in variants().items():
        row = {"variant": name}
        try:
            q, k, v, _ = inputs["normal"]
            row["ms"] = timed(lambda: fn(q, k, v), args.reps)  # noqa: B023
            row["tflops"] = flop / row["ms"] / 1e9
            for kind, (q, k, v, ref) in inputs.items():
                got = fn(q.clone(), k.clone(), v.clone()).float()  # clones: sage smooths K in place
                row[f"{kind}_rel_l2"] = ((got - ref).norm() / ref.norm()).item()
                row[f"{kind}_max_abs"] = (got - ref).abs().max().item()
        except Exception as exc:  # noqa: BLE001 -- a variant this GPU or version cannot run is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": list(shape),
              "flop": flop, "rows": rows}
    (args.out / "attention_kernels.json").write_text(json.dumps(result, indent=1))
    print(f"\n{result['gpu']}, shape {shape}, {flop / 1e12:.2f} TFLOP a call")
    print("| variant | ms | TFLOP/s | rel L2 normal | rel L2 outliers | max abs outliers |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['error']} | | | | |")
        else:
            print(f"| {r['variant']} | {r['ms']:.2f} | {r['tflops']:.0f} | {r['normal_rel_l2']:.1e} | "
                  f"{r['outliers_rel_l2']:.1e} | {r['outliers_max_abs']:.1e} |")


if __name__ == "__main__":
    main()
