"""Where the wall time of one process goes, measured exactly (unlike a sampling profile): interpreter start,
imports, CUDA start, each phase of the work, and the exit after the last line of Python, for a pixart-lowvram run
and for the plain diffusers pipeline (bench/reference_pipeline.py), on the same items.

    python bench/phase_times.py LABEL ours -- run QUEUE --model M --out DIR ...      (pixart-lowvram's CLI)
    python bench/phase_times.py LABEL reference -- MODEL RUN_DIR OUT_DIR [--mode gpu]

The parent runs the command in a child process that wraps the library's main functions and the pipeline's own
steps with timers (each synchronises the GPU as it returns, so that work is counted in the phase that queued it),
and prints one table. Phases nest (a load inside a stage is also in the stage): their times are not to be added.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parent(label: str, kind: str, argv: list[str]) -> None:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    env = {**os.environ, "PHASE_T0": repr(time.time()), "PHASE_OUT": out}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", kind, *argv], cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{label}: child failed ({proc.returncode})")
    child = json.loads(Path(out).read_text())
    os.unlink(out)
    marks = child["marks"]
    end = marks["main returned"]
    print(f"== {label}: {wall:.2f} s whole process")
    previous = 0.0
    for name, at in marks.items():
        print(f"  {at:7.2f} s  +{at - previous:5.2f}  {name}")
        previous = at
    print(f"  {wall:7.2f} s  +{wall - end:5.2f}  process ended (exit: finalisation, CUDA teardown)")
    print("  phases (nested; count, total s):")
    for name, (count, seconds) in sorted(child["phases"].items(), key=lambda kv: -kv[1][1]):
        print(f"    {seconds:7.2f} s  {count:4d}x  {name}")
    for name in ("PixArtAlphaPipeline.__call__", "AutoencoderKL.decode"):
        print(f"  each {name}: {', '.join(map(str, child['calls'].get(name, [])))}")
    print(json.dumps({"label": label, "wall": wall, **child}))


def child(kind: str, argv: list[str]) -> None:
    t0 = float(os.environ["PHASE_T0"])
    marks: dict[str, float] = {"interpreter started": time.time() - t0}
    phases: dict[str, list] = defaultdict(lambda: [0, 0.0])
    calls: dict[str, list] = defaultdict(list)  # each call's seconds

    if kind == "ours":
        from pixart_lowvram.cli import set_allocator_defaults
        set_allocator_defaults()
    import torch
    marks["torch imported"] = time.time() - t0
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, PixArtAlphaPipeline
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image
    marks["diffusers, transformers imported"] = time.time() - t0
    if kind == "ours":
        import pixart_lowvram.cli  # noqa: F401
        from pixart_lowvram import decode, denoise, encode, generate, resolve, run, streaming
        marks["pixart_lowvram imported"] = time.time() - t0

    cuda = torch.cuda.is_available()
    collecting = {}

    def on_gc(phase: str, info: dict) -> None:  # the cycle collector's passes, by generation
        if phase == "start":
            collecting["t"] = time.perf_counter()
        else:
            entry = phases[f"gc collect, generation {info['generation']}"]
            entry[0] += 1
            entry[1] += time.perf_counter() - collecting.pop("t", time.perf_counter())

    import gc
    gc.callbacks.append(on_gc)

    def timed(owner, attr: str, name: str | None = None) -> None:
        fn = getattr(owner, attr)
        is_class_method = isinstance(owner, type) and isinstance(owner.__dict__.get(attr), classmethod)
        raw = fn.__func__ if is_class_method else fn
        key = name or f"{getattr(owner, '__name__', owner)}.{attr}"

        @functools.wraps(raw)
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return raw(*a, **k)
            finally:
                if cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                phases[key][0] += 1
                phases[key][1] += seconds
                calls[key].append(round(seconds, 3))

        setattr(owner, attr, classmethod(wrapper) if is_class_method else wrapper)

    timed(PixArtAlphaPipeline, "__call__")
    timed(PixArtAlphaPipeline, "encode_prompt")
    timed(AutoencoderKL, "decode")
    timed(VaeImageProcessor, "postprocess")
    timed(Image.Image, "save")
    if kind == "ours":
        for attr in ("start_device", "prepare", "pending_images", "pending_latents", "pending_texts",
                     "write_manifest"):
            timed(generate._Run, attr)
        for mod, attrs in ((resolve, ["resolve_model", "check_jobs"]),
                           (generate, ["plan_run", "encode_texts", "denoise_items", "decode_items", "release"]),
                           (encode, ["load_tokenizer", "load_text_encoder", "load_text_encoder_streamed",
                                     "make_pipeline"]),
                           (denoise, ["load_transformer", "load_transformer_streamed", "load_scheduler",
                                      "make_pipeline"]),
                           (decode, ["load_vae", "make_pipeline"])):
            for attr in attrs:
                timed(mod, attr, f"{mod.__name__.split('.')[-1]}.{attr}")
        for attr in ("write_tensors", "read_tensors", "write_png", "png_is_done"):
            timed(run.RunFolder, attr)
        timed(streaming.BlockStreamer, "close")
        sys.argv = ["pixart-lowvram", *argv]
        main = pixart_lowvram.cli.console_main  # as the command runs it: it ends the process through exit_now
        real_exit = pixart_lowvram.cli.exit_now

        def exit_now(code: int):
            marks["main returned"] = time.time() - t0
            Path(os.environ["PHASE_OUT"]).write_text(json.dumps({"marks": marks, "phases": phases, "calls": calls,
                                                                     "code": code}))
            real_exit(code)

        pixart_lowvram.cli.exit_now = exit_now
    else:
        from diffusers import DiffusionPipeline
        timed(DiffusionPipeline, "from_pretrained")
        timed(DiffusionPipeline, "to")
        sys.argv = ["reference_pipeline.py", *argv]
        sys.path.insert(0, str(ROOT / "bench"))
        import reference_pipeline
        main = reference_pipeline.main
    marks["timers set"] = time.time() - t0
    if cuda:
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        marks["CUDA started"] = time.time() - t0
    code = main()
    marks["main returned"] = time.time() - t0
    Path(os.environ["PHASE_OUT"]).write_text(json.dumps({"marks": marks, "phases": phases, "calls": calls,
                                                             "code": code}))
    sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
    else:
        label, kind, sep, *rest = sys.argv[1:]
        assert sep == "--" and kind in ("ours", "reference"), __doc__
        parent(label, kind, rest)
