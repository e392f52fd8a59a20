"""Precision: how far float16, bfloat16 and an 8-bit T5 land from float32, in embeddings and in images.

The same queue (a few prompts and seeds, the model's own defaults) runs through the library's `run_queue` once per
way of running it, one after the other in this process, each way releasing its components (the queue does, stage
by stage) before the next loads:

    float32               the reference: T5, DiT and VAE in float32 (TF32 off, so it is float32 indeed)
    float16               the default on a GPU (PixArt-Σ's SDXL VAE decodes in float32 there)
    bfloat16
    float16 + 8-bit T5    --text-encoder-8bit (bitsandbytes; skipped, with a note, without CUDA or bitsandbytes)

Each way loads its text encoder exactly once (float32 T5-XXL is ~19 GB, once), and its embeddings are read back
from its run folder, so what is compared is what the DiT was given. For each way against float32:
  - embeddings: ||e - e32|| / ||e32|| over each prompt's valid tokens (the attention mask); max and mean over prompts
  - images: max and mean absolute pixel difference on 0-255; max over images, and the mean of per-image means
and the encode stage's peak GPU memory (host RSS is in the JSON, but the ways share one process, so it is not
comparable between them). Writes OUT/precision.json and prints a markdown table; with
--write-benchmarks, replaces the "## Precision" section of BENCHMARKS.md with it and the command that made it.

    python bench/precision.py --model DIR [--preset xl] [--device cuda] [--write-benchmarks]
    python bench/precision.py --model /tmp/tiny --preset tiny --device cpu      # smoke test, a minute on a CPU

On the `xl` preset (PixArt-XL-2-1024-MS shapes) the defaults make 4 images of 1024x1024 in 20 steps per way; the
float32 way needs ~19 GB of GPU memory for T5 and as much host RAM while it loads.

`--preset NAME` builds the random-weight model at DIR first if it is not there (make-random-model).
Runs from a checkout without installing: it puts the repository on sys.path.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import replace_section  # noqa: E402
from pixart_lowvram.errors import UsageError  # noqa: E402
from pixart_lowvram.generate import Settings, run_queue  # noqa: E402
from pixart_lowvram.resolve import check_text_encoder_8bit, resolve_device  # noqa: E402
from pixart_lowvram.jobs import Job  # noqa: E402
from pixart_lowvram.models import resolve_model  # noqa: E402
from pixart_lowvram.run import read_artifact  # noqa: E402

GiB = 1024**3
PROMPTS = [  # the seed article's prompts, and two more of other kinds
    "Oppenheimer sits on the beach on a chair, watching a nuclear explosion with a huge mushroom cloud, 1200mm",
    "pirate ship trapped in a cosmic malestrom nebula",
    "supercar",
    "a lighthouse at dusk, oil painting, dramatic clouds",
    "portrait of an old fisherman with a grey beard, studio lighting, highly detailed",
]
WAYS = [  # name, dtype, 8-bit T5
    ("float32", "float32", False),
    ("float16", "float16", False),
    ("bfloat16", "bfloat16", False),
    ("float16 + 8-bit T5", "float16", True),
]


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_way(model: str, jobs: list[Job], folder: Path, device: torch.device, dtype: str, eight_bit: bool) -> dict:
    start = time.perf_counter()
    result = run_queue(jobs, folder, Settings(model=model, device=str(device), dtype=dtype, embed_cache=None,
                                              force=True, text_encoder_8bit=eight_bit))
    seconds = time.perf_counter() - start
    free(device)
    left = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    return {"result": result, "seconds": seconds, "allocated_after": left,
            "stages": {s.name: s.to_json() for s in result.stages}}


def embeddings(result, shape: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """prompt -> (embedding, mask) as the run stored them (what its DiT was given)."""
    out = {}
    for item in result.items:
        tensors = read_artifact(result.folder / "embeds" / f"{item.prompt_key}.safetensors", item.prompt_key, shape)
        if tensors is None:
            raise SystemExit(f"{result.folder}: the embedding of {item.prompt!r} is missing")
        out[item.prompt] = (tensors["embeds"].float(), tensors["mask"].bool())
    return out


def embedding_errors(ours: dict, reference: dict) -> dict[str, float]:
    errors = {}
    for prompt, (e32, mask) in reference.items():
        e, m = ours[prompt]
        assert torch.equal(m, mask), "the tokenizer gave other masks"
        errors[prompt] = float((e[mask] - e32[mask]).norm() / e32[mask].norm())
    return errors


def pixel_differences(ours, reference) -> dict[str, dict[str, float]]:
    out = {}
    for item in reference.items:
        a = np.asarray(Image.open(ours.images[item.id]).convert("RGB")).astype(np.int16)
        b = np.asarray(Image.open(reference.images[item.id]).convert("RGB")).astype(np.int16)
        diff = np.abs(a - b)
        out[item.id] = {"max": int(diff.max()), "mean": float(diff.mean())}
    return out


def summary(errors: dict[str, float] | None, pixels: dict[str, dict] | None) -> dict:
    row = {}
    if errors is not None:
        row.update(embed_rel_error_max=max(errors.values()), embed_rel_error_mean=float(np.mean(list(errors.values()))))
    if pixels is not None:
        row.update(pixel_diff_max=max(p["max"] for p in pixels.values()),
                   pixel_diff_mean=float(np.mean([p["mean"] for p in pixels.values()])))
    return row


def markdown_table(report: dict) -> str:
    lines = ["| way | embeddings vs fp32: rel. error max / mean | images vs fp32: max / mean px diff "
             "| images vs fp16: max / mean px diff | encode peak GiB (torch / NVML) | wall s |",
             "|---|---|---|---|---|---|"]
    for way in report["ways"]:
        if way.get("skipped"):
            lines.append(f"| {way['name']} | skipped (below) | | | | |")
            continue
        s, f16 = way["vs_float32"], way.get("vs_float16", {})
        encode = way["stages"].get("encode", {})
        peak = " / ".join("-" if encode.get(k) is None else f"{encode[k] / GiB:.2f}"
                          for k in ("torch_peak", "nvml_peak"))
        if way["name"] == "float32":
            lines.append(f"| float32 (reference) | 0 / 0 | 0 / 0 | | {peak} | {way['seconds']:.1f} |")
            continue
        vs16 = f"{f16['pixel_diff_max']} / {f16['pixel_diff_mean']:.2f}" if f16 else ""
        lines.append(f"| {way['name']} | {s['embed_rel_error_max']:.2e} / {s['embed_rel_error_mean']:.2e} "
                     f"| {s['pixel_diff_max']} / {s['pixel_diff_mean']:.2f} | {vs16} | {peak} | {way['seconds']:.1f} |")
    return "\n".join(lines)


def section(report: dict) -> str:
    v = report["versions"]
    versions = ", ".join(f"{k} {v[k]}" for k in ("torch", "diffusers", "transformers", "bitsandbytes") if v.get(k))
    q = report["queue"]
    notes = [f"- {w['name']}: skipped ({w['skipped']})" for w in report["ways"] if w.get("skipped")]
    return "\n".join([
        "## Precision",
        "",
        f"- Device: {report['device_name']}; {versions}, Python {v['python']}.",
        f"- Model: {report['model']['name']} ({report['model']['kind']}, random weights), {q['prompts']} prompt(s) x "
        f"{q['seeds']} seed(s), {q['size']}x{q['size']}, {q['steps']} steps, cfg {q['cfg']:g}, its own sampler.",
        f"- Command: `{report['command']}` — raw results in `bench/results/precision.json`.",
        "",
        markdown_table(report),
        "",
        "The reference is the float32 run (T5, DiT and VAE in float32; on a GPU with TF32 off). Embedding error: "
        "||e - e32|| / ||e32|| over each prompt's valid tokens, as the run stored it for its DiT (max and mean over "
        "prompts). Pixel differences on 0-255: the largest over all images, and the mean of the per-image means; "
        "\"vs fp16\" isolates what the 8-bit T5 changes from the default float16 run. Every way runs the whole "
        "pipeline in its dtype, so an image's difference adds T5's, the DiT's and the VAE's rounding, amplified by "
        "the sampler. Random weights are far less well-conditioned than trained ones, so these figures overstate "
        "what real weights do; compare the rows with one another.",
        *([""] + notes if notes else []),
        "",
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model folder (or hub id)")
    parser.add_argument("--preset", help="build this random-weight preset at --model first if it is not there")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompts", type=int, default=4, help=f"how many of the {len(PROMPTS)} built-in prompts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="seeds per prompt (default: 1)")
    parser.add_argument("--steps", type=int, help="default: the model's")
    parser.add_argument("--size", type=int, help="width and height (default: the model's)")
    parser.add_argument("--work", type=Path, help="where the run folders go (default: a new temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--write-benchmarks", action="store_true", help="replace BENCHMARKS.md's Precision section")
    parser.add_argument("--benchmarks", type=Path, default=ROOT / "BENCHMARKS.md", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.preset:
        from pixart_lowvram.random_model import make_random_model  # noqa: PLC0415

        make_random_model(args.model, args.preset)
    device = resolve_device(args.device)
    if device.type == "cuda":
        # float32 means float32: no TF32 in convolutions (cuDNN allows it by default) or matrix products
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    info = resolve_model(args.model)
    defaults = info.defaults
    steps = args.steps or defaults.steps
    size = args.size or defaults.size
    jobs = [Job(index=i, prompt=prompt, seed=seed, steps=steps, width=size, height=size)
            for i, (prompt, seed) in enumerate(((p, s) for p in PROMPTS[:args.prompts] for s in args.seeds), start=1)]
    work = args.work or Path(tempfile.mkdtemp(prefix="pixart-precision-"))
    shape = {"embeds": (info.geometry.max_sequence_length, info.geometry.text_dim), "mask": (info.geometry.max_sequence_length,)}

    ways, runs, embeds = [], {}, {}
    for name, dtype, eight_bit in WAYS:
        way = {"name": name, "dtype": dtype, "text_encoder_8bit": eight_bit}
        ways.append(way)
        if eight_bit:
            try:
                check_text_encoder_8bit(device, encode_on_cpu=False)
            except UsageError as exc:
                way["skipped"] = str(exc)
                print(f"{name}: skipped ({exc})", file=sys.stderr)
                continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        measured = run_way(str(info.path), jobs, work / re.sub(r"\W+", "-", name), device, dtype, eight_bit)
        result = measured.pop("result")
        runs[name], embeds[name] = result, embeddings(result, shape)
        way.update(measured)
        errors = embedding_errors(embeds[name], embeds["float32"])
        pixels = pixel_differences(result, runs["float32"])
        way.update(vs_float32=summary(errors, pixels), embed_rel_errors=errors, pixel_diffs=pixels)
        if eight_bit and "float16" in runs:
            way["vs_float16"] = summary(embedding_errors(embeds[name], embeds["float16"]),
                                        pixel_differences(result, runs["float16"]))

    import diffusers  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                "transformers": transformers.__version__, "python": platform.python_version()}
    try:
        import bitsandbytes  # noqa: PLC0415

        versions["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    report = {
        "command": "python bench/precision.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU",
        "versions": versions,
        "model": {"source": args.model, "name": info.name, "kind": info.kind.title, "identity": info.identity},
        "queue": {"prompts": min(args.prompts, len(PROMPTS)), "seeds": len(args.seeds), "size": size, "steps": steps,
                  "cfg": defaults.cfg, "jobs": [{"prompt": j.prompt, "seed": j.seed} for j in jobs]},
        "work": str(work),
        "ways": ways,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps(report, indent=2) + "\n")
    text = section(report)
    print(text)
    print(f"raw results: {args.out / 'precision.json'}; images in {work}", file=sys.stderr)
    if args.write_benchmarks:
        replace_section(args.benchmarks, "Precision", text)
        print(f"wrote the Precision section of {args.benchmarks}", file=sys.stderr)
    return report


if __name__ == "__main__":
    from pixart_lowvram.errors import PixartError  # noqa: E402

    try:
        main()
    except PixartError as exc:
        raise SystemExit(f"error: {exc}") from None
