"""GPU benchmark of LoRAs: memory and time with and without a LoRA, unconstrained and at --vram-budget 1.5GiB, and
the images against the plain diffusers pipeline with the same LoRA fused into its transformer by peft.

The LoRA is made here, in peft's adapter folder format (adapter_config.json written by peft's LoraConfig,
adapter_model.safetensors with peft's key names): rank --rank on every attention and feed-forward linear of the
transformer (to_q, to_k, to_v, to_out.0 of both attentions, ff.net.0.proj, ff.net.2), random A and B sized so
that each update is a fraction of its weight (a tuned style's size). Each row is its own process:

    ours-plain, ours-lora                 pixart-lowvram run, unconstrained, without and with the LoRA
    ours-plain-1.5GiB, ours-lora-1.5GiB   the same at --vram-budget 1.5GiB (the DiT streamed)
    pipeline-lora                         PixArtAlphaPipeline all on the GPU, the LoRA fused by peft
                                          (PeftModel.from_pretrained + merge_and_unload), same items and seeds

Reported: wall time, the denoise stage's time, its loading time and its time per step, its torch and NVML peaks,
host RSS, and max pixel differences (ours with the LoRA vs the pipeline with it: the target is 2/255 in float16;
1.5GiB vs unconstrained; with vs without the LoRA, to show it changes the images).

    python bench/lora.py --out OUT [--model DIR] [--preset xl] [--rank 32] [--device cuda]
    python bench/lora.py --out /tmp/lora-smoke --device cpu --preset tiny     # a quick check on a CPU

Writes OUT/latest.json and OUT/table.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from benchlib import max_pixel_diff  # noqa: E402
from reference_pipeline import make_images  # noqa: E402

GiB = 1024**3
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
JOBS = [("lighthouse", "a lighthouse at dusk on a rocky coast, ink drawing, crosshatching", 1152753),
        ("pirate-ship", "pirate ship trapped in a cosmic maelstrom nebula", 7)]


def make_adapter(model: Path, out: Path, rank: int, seed: int = 0) -> Path:
    """A peft LoRA adapter folder for the model's transformer, made from its safetensors headers (no weights
    loaded): rank `rank` on TARGETS, A with unit-variance rows over the fan-in, B small."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    from pixart_lowvram.models import stored_tensors

    stored = stored_tensors(model / "transformer")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, s in sorted(stored.items()):
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and len(s.shape) == 2 and any(module.endswith("." + t) for t in TARGETS):
            out_features, in_features = s.shape
            a = torch.randn(rank, in_features, generator=generator) * in_features ** -0.5
            b = torch.randn(out_features, rank, generator=generator) * (0.15 * (in_features * rank) ** -0.5)
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS).save_pretrained(out)
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def write_queue(path: Path, lora: Path | None, size: int, steps: int) -> Path:
    lines = [f"[defaults]\nwidth = {size}\nheight = {size}\nsteps = {steps}\n"]
    if lora is not None:
        lines.append(f'lora = [{{ path = "{lora}", scale = 0.8 }}]\n')
    for name, prompt, seed in JOBS:
        lines.append(f'[[jobs]]\nname = "{name}"\nprompt = "{prompt}"\nseed = {seed}\n')
    path.write_text("\n".join(lines))
    return path


def sh(args: list[str], log: Path, env: dict | None = None) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    seconds = time.perf_counter() - start
    print(log.read_text()[-1500:])
    if proc.returncode:
        raise SystemExit(f"{' '.join(map(str, args))} failed ({proc.returncode}); see {log}")
    return seconds


def reference(args) -> None:
    """The plain pipeline with the LoRA fused by peft (run in its own process by the main script)."""
    import torch
    from diffusers import PixArtAlphaPipeline
    from peft import PeftModel

    from pixart_lowvram.memory import GpuMemoryProbe, StageMeter

    items = json.loads((args.run_dir / "run.json").read_text())["items"]
    args.ref_out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.zeros(1, device=device)
    probe = GpuMemoryProbe(device) if device.type == "cuda" else None
    start = time.perf_counter()
    with StageMeter("pipeline-lora", device, probe) as meter:
        pipe = PixArtAlphaPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
        pipe.transformer = PeftModel.from_pretrained(pipe.transformer, args.lora).merge_and_unload()
        pipe.set_progress_bar_config(disable=True)
        loaded = time.perf_counter() - start
        make_images(pipe, items, args.ref_out)
    stats = meter.stats.to_json()
    stats.update(load_seconds=loaded, wall_seconds=time.perf_counter() - start)
    (args.ref_out / "reference.json").write_text(json.dumps(stats, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=Path("/tmp/pixart-xl-random"))
    parser.add_argument("--preset", default="xl", help="the random model to build where --model has none")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ref-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--lora", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        return reference(args)

    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    py = sys.executable
    cli = [py, "-m", "pixart_lowvram.cli"]
    env = {"XDG_CACHE_HOME": str(work / "cache")}  # the rows share prompt embeddings: T5 runs in the first
    if not (args.model / "model_index.json").is_file():
        sh(cli + ["make-random-model", "--preset", args.preset, str(args.model)], args.out / "build.log")
    subprocess.run(f"cat {args.model}/*/* > /dev/null", shell=True, check=True)  # warm the page cache
    start = time.perf_counter()
    lora = make_adapter(args.model, work / "lora", args.rank)
    # the queue weighs the LoRA 0.8; peft fuses at 1: the reference's copy has the 0.8 in its B
    from safetensors.torch import load_file, save_file

    fused = work / "lora-fused"
    shutil.copytree(lora, fused)
    weights = load_file(lora / "adapter_model.safetensors")
    save_file({k: v * 0.8 if ".lora_B." in k else v for k, v in weights.items()}, fused / "adapter_model.safetensors")
    print(f"adapters made in {time.perf_counter() - start:.1f} s")
    plain_queue = write_queue(work / "plain.toml", None, args.size, args.steps)
    lora_queue = write_queue(work / "lora.toml", lora, args.size, args.steps)

    rows = {}
    for name, queue, budget in (("ours-plain", plain_queue, None), ("ours-lora", lora_queue, None),
                                ("ours-plain-1.5GiB", plain_queue, "1.5GiB"), ("ours-lora-1.5GiB", lora_queue, "1.5GiB")):
        out = work / name
        argv = ["run", str(queue), "--model", str(args.model), "--out", str(out), "--device", args.device, "-q"]
        argv += ["--vram-budget", budget] if budget else []
        wall = sh(cli + argv, args.out / f"{name}.log", env)
        manifest = json.loads((out / "run.json").read_text())
        denoise = next(s for s in manifest["stages"] if s["name"] == "denoise")
        steps = sum(it["steps"] for it in manifest["items"])
        rows[name] = {"wall_s": wall, "budget": budget, "denoise_s": denoise["seconds"],
                      "denoise_load_s": denoise.get("load_seconds"),
                      "denoise_step_ms": 1000 * (denoise["seconds"] - (denoise.get("load_seconds") or 0)) / steps,
                      "denoise_torch_peak": denoise.get("torch_peak"), "denoise_nvml_peak": denoise.get("nvml_peak"),
                      "nvml_peak": max(s.get("nvml_peak") or 0 for s in manifest["stages"]),
                      "rss_peak": max(s.get("rss_peak") or 0 for s in manifest["stages"]), "folder": str(out),
                      "plan": manifest["plan"]["denoise"]["placement"]}
        (args.out / "rows-partial.json").write_text(json.dumps(rows, indent=2))
    ref_out = work / "pipeline-lora"
    wall = sh([py, __file__, "--out", str(args.out), "--reference", "--model", str(args.model), "--device", args.device,
               "--run-dir", str(work / "ours-lora"), "--ref-out", str(ref_out), "--lora", str(fused)],
              args.out / "pipeline-lora.log", env)
    ref = json.loads((ref_out / "reference.json").read_text())
    rows["pipeline-lora"] = {"wall_s": wall, "budget": None, "denoise_s": None, "nvml_peak": ref.get("nvml_peak"),
                             "torch_peak": ref.get("torch_peak"), "rss_peak": ref.get("rss_peak"),
                             "folder": str(ref_out), "load_s": ref["load_seconds"]}

    def images(row: str) -> dict[str, Path]:
        folder = Path(rows[row]["folder"])
        return {n: (folder / f"{n}.png" if row == "pipeline-lora" else folder / "images" / f"{n}.png")
                for n, _, _ in JOBS}

    def diff(a: str, b: str) -> int:
        return max(max_pixel_diff(images(a)[n], images(b)[n]) for n, _, _ in JOBS)

    diffs = {"ours-lora vs pipeline-lora (target <= 2)": diff("ours-lora", "pipeline-lora"),
             "ours-lora-1.5GiB vs pipeline-lora (target <= 2)": diff("ours-lora-1.5GiB", "pipeline-lora"),
             "ours-lora-1.5GiB vs ours-lora": diff("ours-lora-1.5GiB", "ours-lora"),
             "ours-plain vs ours-lora (the LoRA's effect)": diff("ours-plain", "ours-lora")}
    import torch

    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    result = {"device": device_name, "model": str(args.model), "rank": args.rank, "size": args.size,
              "steps": args.steps, "jobs": len(JOBS), "rows": rows, "max_pixel_diff": diffs}
    (args.out / "latest.json").write_text(json.dumps(result, indent=2, default=str))

    def gib(v) -> str:
        return f"{v / GiB:.2f}" if v else "-"

    lines = [f"LoRA rank {args.rank} on every attention and feed-forward linear, {len(JOBS)} images at {args.size}² "
             f"x {args.steps} steps, {device_name}:", "",
             "| row | budget | DiT placement | wall s | denoise s | of which loading s | ms per image-step | "
             "denoise NVML GiB | whole run NVML GiB | host RSS GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if name == "pipeline-lora":
            lines.append(f"| {name} (peft-fused, all on the GPU) | - | resident | {r['wall_s']:.1f} | - | "
                         f"{r['load_s']:.1f} (whole pipeline) | - | - | {gib(r['nvml_peak'])} | {gib(r['rss_peak'])} |")
            continue
        lines.append(f"| {name} | {r['budget'] or '-'} | {r['plan']} | {r['wall_s']:.1f} | {r['denoise_s']:.2f} | "
                     f"{r['denoise_load_s'] or 0:.2f} | {r['denoise_step_ms']:.1f} | {gib(r['denoise_nvml_peak'])} | "
                     f"{gib(r['nvml_peak'])} | {gib(r['rss_peak'])} |")
    lines += ["", "| max pixel difference | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in diffs.items()]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
