"""A denoising step inside diffusers' PixArt pipeline against the bare transformer call, on the GPU: how much of
the denoise stage's time per image-step is the DiT's arithmetic, how much the loop around it (guidance, the
sampler's step, the pipeline's per-call setup), and whether the GPU's clock falls over a sustained run.

    python bench/step_in_loop.py --out OUT [--size 1024] [--images 2] [--steps 20] [--rounds 3] [--sustain 8]

Rows (interleaved rounds, medians): `bare`: the transformer called `steps` times at the guidance batch (2 x images);
`pipeline`: PixArtAlphaPipeline (no text encoder, no VAE: embeddings in, latents out, as the denoise stage calls
it) for `steps` steps; each eager and with the DiT's blocks compiled (compiling.compile_blocks). Then one
pipeline call under torch.profiler: its wall against the GPU's busy time (kernels, merged intervals), the idle
gaps being where the GPU waited for the CPU. Then `--sustain` pipeline calls back to back with the SM clock and
power from NVML after each. Writes OUT/step_in_loop.json and prints a summary."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from run_profile import merged  # bench/, beside this script


def nvml_state() -> dict:
    try:
        import pynvml  # noqa: PLC0415

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return {"sm_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
                "temp_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)}
    except Exception as exc:  # a figure we cannot read is left out, not guessed
        return {"error": repr(exc)[:200]}


def busy_ms(prof) -> tuple[float, float]:
    """GPU time of the kernels (merged intervals, so overlapping streams count once) and the span they cover."""
    busy = merged([(ev.time_range.start, ev.time_range.end) for ev in prof.events()
                   if ev.device_type == torch.autograd.DeviceType.CUDA])
    total = sum(end - start for start, end in busy)
    return total / 1000, (busy[-1][1] - busy[0][0]) / 1000 if busy else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sustain", type=int, default=8)
    parser.add_argument("--preset", default="xl")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", type=lambda s: getattr(torch, s), default=torch.float16)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel  # noqa: PLC0415

    from pixart_lowvram.compiling import compile_blocks  # noqa: PLC0415
    from pixart_lowvram.random_model import preset_config  # noqa: PLC0415

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    configs = preset_config(args.preset)
    torch.manual_seed(0)
    models = {}
    for name in ("eager", "compiled"):
        dit = PixArtTransformer2DModel.from_config(configs.transformer).to(args.device, args.dtype).eval()
        if name == "compiled":
            compile_blocks(dit.transformer_blocks)
        pipe = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=dit,
                                   scheduler=DPMSolverMultistepScheduler.from_config(configs.scheduler_config))
        pipe.set_progress_bar_config(disable=True)
        models[name] = pipe
    n, tokens = args.images, 120
    channels = configs.transformer["caption_channels"]
    embeds = torch.randn(n, tokens, channels, device=args.device, dtype=args.dtype)
    mask = torch.zeros(n, tokens, device=args.device, dtype=torch.long)
    mask[:, :24] = 1  # a prompt of a couple of dozen tokens, as real ones are
    latent = args.size // 8
    x = torch.randn(2 * n, 4, latent, latent, device=args.device, dtype=args.dtype)
    t = torch.full((2 * n,), 500, device=args.device, dtype=torch.long)
    extra = {"resolution": torch.tensor([[args.size, args.size]] * 2 * n, device=args.device, dtype=args.dtype),
             "aspect_ratio": torch.tensor([[1.0]] * 2 * n, device=args.device, dtype=args.dtype)}
    text, text_mask = torch.cat([embeds, embeds]), torch.cat([mask, mask])

    @torch.inference_mode()
    def bare(pipe):
        for _ in range(args.steps):
            pipe.transformer(x, encoder_hidden_states=text, encoder_attention_mask=text_mask, timestep=t,
                             added_cond_kwargs=extra, return_dict=False)

    @torch.inference_mode()
    def pipeline(pipe):
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(n)]
        return pipe(prompt=None, negative_prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask,
                    negative_prompt_embeds=embeds, negative_prompt_attention_mask=mask, width=args.size,
                    height=args.size, guidance_scale=4.5, num_inference_steps=args.steps, generator=generators,
                    output_type="latent", use_resolution_binning=True).images

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    for pipe in models.values():  # warm-up: compile, cuDNN's plans
        bare(pipe)
        pipeline(pipe)
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for name, pipe in models.items():
            times.setdefault(f"bare {name}", []).append(timed(lambda pipe=pipe: bare(pipe)))
            times.setdefault(f"pipeline {name}", []).append(timed(lambda pipe=pipe: pipeline(pipe)))
    image_steps = n * args.steps
    rows = {k: {"s": statistics.median(v), "ms_per_image_step": 1000 * statistics.median(v) / image_steps,
                "every_s": v} for k, v in times.items()}
    profiled = {}
    if cuda:
        from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

        for name, pipe in models.items():
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                wall = timed(lambda pipe=pipe: pipeline(pipe))
            busy, span = busy_ms(prof)
            profiled[name] = {"wall_ms": 1000 * wall, "gpu_busy_ms": busy, "gpu_span_ms": span,
                              "gpu_idle_in_span_ms": span - busy}
    sustained = []
    for i in range(args.sustain):
        s = timed(lambda: pipeline(models["eager"]))
        sustained.append({"call": i, "ms_per_image_step": 1000 * s / image_steps, **(nvml_state() if cuda else {})})
    result = {"gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
              "size": args.size, "images": n, "steps": args.steps, "rows": rows, "profiled": profiled,
              "sustained": sustained}
    (args.out / "step_in_loop.json").write_text(json.dumps(result, indent=2))
    for k, r in rows.items():
        print(f"{k:20} {r['ms_per_image_step']:.1f} ms an image-step  ({r['s']:.2f} s for {image_steps})")
    for k, p in profiled.items():
        print(f"profiled pipeline {k}: wall {p['wall_ms']:.0f} ms, GPU busy {p['gpu_busy_ms']:.0f} ms, "
              f"idle within its span {p['gpu_idle_in_span_ms']:.0f} ms")
    for s in sustained:
        print(s)


if __name__ == "__main__":
    main()
