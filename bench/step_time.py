"""Where a denoising step and a decode stand against the arithmetic: steady-state milliseconds of one PixArt-XL-2
transformer call (classifier-free guidance: a batch of 2 per image) and of one SD-VAE decode at 1024x1024, eager
and with the levers issue 16 names, on random weights in the real shapes (timing does not depend on the values).

    python bench/step_time.py --out OUT [--size 1024] [--images 1 2] [--variants eager,blocks,blocks-graphs]

Variants: eager; `blocks`: regional compilation (each BasicTransformerBlock compiled, as diffusers'
`compile_repeated_blocks` does for models that declare their blocks); `blocks-graphs`: the same with CUDA graphs
(mode="reduce-overhead", `torch.compiler.cudagraph_mark_step_begin()` before each transformer call, so that a call's
outputs may be overwritten by the next one's); `whole`: the whole transformer compiled; `ours`: the library's own
regional compilation (`compiling.compile_blocks`: each block's forward, one graph for all, what `--compile on`
runs, in inductor's deterministic mode); `ours-autotuned`: the same in inductor's default mode, where each
reduction kernel's tile shape is timed on its first call; `ours-graphs`: the same with CUDA graphs. Suffixes: `-cudnn` runs (and compiles) the call with cuDNN's attention first
in SDPA's order (`torch.nn.attention.sdpa_kernel(..., set_priority=True)`); `-graph` captures the whole transformer
call in one CUDA graph (torch.cuda.graph, static inputs) and times its replay. Each row's `max_abs_diff` is its
output against eager's. `--profile` adds, for the eager and eager-cudnn calls, the GPU time by kind of kernel
(attention, matrix products, the rest) from torch.profiler. The FLOP floor is counted by
torch.utils.flop_counter on one eager call and divided by `--tflops` (a realistic dense fp16 rate for the GPU).
Writes OUT/step_time.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, warm: int, reps: int) -> float:
    """Median milliseconds of `fn()` after `warm` calls."""
    for _ in range(warm):
        fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


ATTENTION_FIRST = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def attention_order(cudnn: bool):
    """SDPA's backends with cuDNN's first (where `cudnn`), or torch's default order."""
    import contextlib  # noqa: PLC0415

    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    if not cudnn:
        return contextlib.nullcontext()
    return sdpa_kernel([getattr(SDPBackend, n) for n in ATTENTION_FIRST], set_priority=True)


def kernel_kinds(fn) -> dict:
    """GPU milliseconds of one `fn()` by kind of kernel, and the ten longest kernels."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    kinds: dict[str, float] = {}
    names: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = ev.name.lower()
        ms = ev.device_time_total / 1000 if hasattr(ev, "device_time_total") else ev.cuda_time_total / 1000
        kind = ("attention" if any(k in name for k in ("flash", "fmha", "cudnn", "attention", "sdpa"))
                else "matmul" if any(k in name for k in ("gemm", "cutlass", "xmma", "nvjet", "sm90", "matmul"))
                else "memcpy" if "memcpy" in name or "memset" in name else "other")
        kinds[kind] = kinds.get(kind, 0.0) + ms
        names[ev.name[:90]] = names.get(ev.name[:90], 0.0) + ms
    top = sorted(names.items(), key=lambda kv: -kv[1])[:10]
    return {"kinds_ms": kinds, "top_kernels_ms": top}


def graphed(call):
    """`call` captured in one CUDA graph (its inputs are the same tensors every time); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()

    def replay():
        graph.replay()
        return out
    return replay


def transformer_rows(args) -> list[dict]:
    from diffusers import PixArtTransformer2DModel  # noqa: PLC0415
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    from pixart_lowvram.compiling import compile_blocks  # noqa: PLC0415
    from pixart_lowvram.random_model import preset_config  # noqa: PLC0415

    config = preset_config(args.preset).transformer
    rows = []
    latent = args.size // 8
    for images in args.images:
        batch = 2 * images
        x = torch.randn(batch, 4, latent, latent, device=args.device, dtype=args.dtype)
        text = torch.randn(batch, 120, config["caption_channels"], device=args.device, dtype=args.dtype)
        mask = torch.ones(batch, 120, device=args.device, dtype=torch.long)
        t = torch.full((batch,), 500, device=args.device, dtype=torch.long)
        extra = {"resolution": torch.tensor([[args.size, args.size]] * batch, device=args.device, dtype=args.dtype),
                 "aspect_ratio": torch.tensor([[1.0]] * batch, device=args.device, dtype=args.dtype)}
        reference = None
        for variant in args.variants:
            torch.manual_seed(0)
            base = variant.removesuffix("-graph").removesuffix("-cudnn")
            cudnn = "-cudnn" in variant
            model = PixArtTransformer2DModel.from_config(config).to(args.device, args.dtype).eval()
            start = time.perf_counter()
            if base == "blocks":
                for block in model.transformer_blocks:
                    block.compile(fullgraph=True)
            elif base == "blocks-graphs":
                for block in model.transformer_blocks:
                    block.compile(fullgraph=True, mode="reduce-overhead")
            elif base == "whole":
                model.compile(fullgraph=True)
            elif base == "ours":
                compile_blocks(model.transformer_blocks)
            elif base == "ours-autotuned":  # inductor's default: reductions' tile shapes timed, fastest kept
                compile_blocks(model.transformer_blocks, deterministic=False)
            elif base == "ours-graphs":
                compile_blocks(model.transformer_blocks, mode="reduce-overhead")
            graphs = base.endswith("graphs")

            @torch.inference_mode()
            def step(model=model, graphs=graphs, cudnn=cudnn):
                if graphs:  # a call's outputs may be overwritten by the next call's replay
                    torch.compiler.cudagraph_mark_step_begin()
                with attention_order(cudnn):
                    return model(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t,
                                 added_cond_kwargs=extra, return_dict=False)[0]
            try:
                step()
                sync()
                if variant.endswith("-graph"):
                    step = graphed(step)
                out = step().float()
                if variant == "eager":
                    reference = out
                diff = (out - reference).abs().max().item() if reference is not None else None
                first = time.perf_counter() - start
                ms = timed(step, 3, args.reps)
                row = {"what": "transformer", "variant": variant, "images": images, "batch": batch,
                       "ms": ms, "ms_per_image": ms / images, "first_call_s": first, "max_abs_diff": diff}
                if args.profile and variant in ("eager", "eager-cudnn"):
                    row.update(kernel_kinds(step))
                if variant == "eager":
                    with FlopCounterMode(display=False) as counter, torch.inference_mode():
                        step()
                    flops = counter.get_total_flops()
                    row["tflop"] = flops / 1e12
                    row["floor_ms"] = flops / (args.tflops * 1e12) * 1000
            except Exception as exc:  # a lever that does not compile here is a result too
                row = {"what": "transformer", "variant": variant, "images": images, "error": repr(exc)[:400]}
            rows.append(row)
            print(row, flush=True)
            del model, step
            torch.compiler.reset()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return rows


def vae_rows(args) -> list[dict]:
    from diffusers import AutoencoderKL  # noqa: PLC0415

    from pixart_lowvram.random_model import preset_config  # noqa: PLC0415
    from pixart_lowvram.vae_strips import StripDecoder  # noqa: PLC0415

    vae = AutoencoderKL.from_config(preset_config(args.preset).vae).to(args.device, args.dtype).eval()
    latent = args.size // 8
    rows = []
    for n in (1, 2, 4):
        z = torch.randn(n, 4, latent, latent, device=args.device, dtype=args.dtype)
        peak = torch.cuda.reset_peak_memory_stats if torch.cuda.is_available() else lambda: None
        peak()
        with torch.inference_mode():
            ms = timed(lambda z=z: vae.decode(z).sample, 1, max(3, args.reps // 4))
        rows.append({"what": "vae", "variant": f"whole x{n}", "images": n, "ms": ms, "ms_per_image": ms / n,
                     "torch_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None})
        print(rows[-1], flush=True)
    z = torch.randn(1, 4, latent, latent, device=args.device, dtype=args.dtype)
    with torch.inference_mode():
        whole = vae.decode(z).sample
    for room_gib in (0.37, 0.5, 1.0):  # 0.37: what the planner gives the decode at --vram-budget 1.5GiB
        strips = StripDecoder(vae, torch.device(args.device), int(room_gib * 2**30))
        peak()
        ms = timed(lambda strips=strips: strips.decode(z), 1, 3)
        diff = (strips.decode(z).float() - whole.float()).abs().max().item()  # exact up to float16 rounding
        rows.append({"what": "vae", "variant": f"strips room {room_gib} GiB", "images": 1, "ms": ms,
                     "ms_per_image": ms, "max_abs_diff_vs_whole": diff,
                     "torch_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--images", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--variants", type=lambda s: s.split(","), default=["eager", "blocks", "ours", "blocks-graphs", "ours-graphs"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--tflops", type=float, default=600.0, help="the dense fp16 rate the floor assumes")
    parser.add_argument("--no-vae", action="store_true")
    parser.add_argument("--profile", action="store_true", help="GPU time by kind of kernel, eager calls")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="xl", help="a random-model preset's shapes (tiny: a CPU smoke run)")
    parser.add_argument("--dtype", type=lambda s: getattr(torch, s), default=torch.float16)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = transformer_rows(args) + ([] if args.no_vae else vae_rows(args))
    result = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "size": args.size,
              "tflops_assumed": args.tflops, "rows": rows}
    (args.out / "step_time.json").write_text(json.dumps(result, indent=2))
    for r in rows:
        print(f"{r['what']:12} {r['variant']:22} images {r['images']}: "
              + (f"{r['ms']:.1f} ms ({r['ms_per_image']:.1f} a image)" if "ms" in r else r.get("error", "")))


if __name__ == "__main__":
    main()
