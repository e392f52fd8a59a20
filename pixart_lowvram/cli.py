"""The command line: argument parsing and calls into the Python API, nothing more.

Importing this module loads nothing heavy (torch, diffusers and transformers load inside `main`), so a Ctrl-C in
the first seconds lands in main's handler: a message and exit code 130, never a traceback."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

from .errors import PixartError, UsageError
from .reporting import Bar, Reporter
from .samplers import NAMES as SAMPLER_NAMES

EXAMPLES = """\
examples:
  pixart-lowvram demo                                   offline: tiny random model, the article's queue
  pixart-lowvram run examples/seed-queue.toml           the whole queue with PixArt-XL-2-1024-MS
  pixart-lowvram run queue.toml --model ./my-pixart     a model folder in the diffusers layout
  pixart-lowvram generate "a lighthouse at dusk" --seed 7 --count 4
  pixart-lowvram generate "a fox" --model PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --sampler euler-a
  pixart-lowvram run queue.toml --gpus all               one process per GPU, one run folder
  torchrun --nproc-per-node 4 -m pixart_lowvram.cli run queue.toml     the same, started by torchrun
  pixart-lowvram generate "a harbour at dawn" --lora styles/ink.safetensors:0.8   a LoRA, weighed 0.8
  pixart-lowvram generate "the same street at night" --init-image street.jpg --strength 0.6
  pixart-lowvram make-random-model --preset xl ./pixart-xl-random

Running the same command again resumes: finished embeddings, latents and images are kept and skipped.
A finished image is never replaced by one made from other parameters: the new one gets another name (NAME~2).
Exit codes: 0 done; 1 the run folder could not be used or written (locked by another run, read-only, disk
full); 2 bad input (queue, options, model, --out not a run folder; nothing was loaded or written); 3 out of GPU
memory; 4 some images not made (a component overflowed: see --upcast); 5 a process of a run over several GPUs
died (killed, crashed); 130 interrupted (Ctrl-C). Finished work is kept in every case.
"""

QUEUE_HELP = """\
A queue file is TOML, JSON or JSONL. Each job has a `prompt` and optionally negative_prompt, width, height,
seed, cfg (guidance scale), steps, sampler, count (images with seeds seed, seed+1, ...), name (the image's
file name), lora (LoRAs merged into the transformer: lora = [{ path = "ink.safetensors", scale = 0.8 }], paths
relative to the queue file; a .safetensors file as ComfyUI loads for PixArt, or a peft adapter folder), and for
image-to-image init_image (a path, relative to the queue file's folder) and strength (0 to 1, default 0.8: the
share of the steps that runs, from the image noised to match). What a job leaves out follows the model's
reference usage (PixArt-α and Σ: 20 steps, cfg 4.5; PixArt-LCM: 4 steps, cfg 0; DMD: one step, cfg 1).
Samplers: {samplers} (the first is PixArt-α's and Σ's own).
A `defaults` table applies to every job. Example (TOML):

  [defaults]
  steps = 20
  sampler = "dpm-solver"

  [[jobs]]
  prompt = "pirate ship trapped in a cosmic maelstrom nebula"
  seed = 1152753
  cfg = 5
"""
QUEUE_HELP = QUEUE_HELP.replace("{samplers}", ", ".join(SAMPLER_NAMES))


EXIT_NON_FINITE = 4  # the run ended, but a component overflowed for some images: they are named, the rest is done


class _TqdmBar(Bar):
    def __init__(self, bar):
        self._bar = bar

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def describe(self, text: str) -> None:
        self._bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        self._bar.close()


class TqdmReporter(Reporter):
    """Progress bars and messages on stderr."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def bar(self, desc: str, total: int | None, unit: str = "it", transient: bool = False) -> Bar:
        if self.quiet:
            return Bar()
        from tqdm.auto import tqdm  # noqa: PLC0415

        return _TqdmBar(tqdm(desc=desc, total=total, unit=unit, leave=not transient, dynamic_ncols=True,
                             file=sys.stderr))

    def info(self, message: str) -> None:
        if not self.quiet:
            from tqdm.auto import tqdm  # noqa: PLC0415

            tqdm.write(message, file=sys.stderr)


GPUS_HELP = (
    "run over several GPUs of this machine, one process each: all, a list of indices (0,1,3), or cpu:N (N processes "
    "on the CPU, for trying it without GPUs). The images still to make are divided by cost (steps x pixels) so the "
    "GPUs finish together, each LoRA set's images on as few GPUs as that allows (the transformer is loaded once per "
    "set on each), each text is encoded once, and everything goes into the one run folder; --vram-budget "
    "and --host-budget apply to each process (auto: this machine's RAM shared between them). Resume with the same "
    "command, with any number of GPUs. Under torchrun (torchrun --nproc-per-node N -m pixart_lowvram.cli run QUEUE; "
    "several hosts through its rendezvous, the run folder on shared storage) leave it out: each process takes the "
    "GPU of its LOCAL_RANK")


PLAN_GPUS_HELP = (
    "show how `run --gpus` with the same value would divide the whole queue, as a fresh run (a run folder's finished "
    "work is not read): rank 0's plan, the ranks whose placements differ, the texts, init images, latents and "
    "images each process gets, and with LoRAs the sets (transformer loads) each meets. all, a list of indices "
    "(0,1,3; on a machine without GPUs, a plan for another's), or cpu:N")


def _add_run_options(p: argparse.ArgumentParser, out_help: str, several: bool = False,
                     gpus_help: str = GPUS_HELP) -> None:
    from .presets import DEFAULT_MODEL  # noqa: PLC0415

    g = p.add_argument_group("run options")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="ID_OR_DIR",
                   help=f"hub id or local folder in the diffusers layout; PixArt-α, Σ, LCM or DMD, told apart by "
                        f"its model_index.json (default: {DEFAULT_MODEL})")
    g.add_argument("--out", metavar="DIR", help=out_help)
    g.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda if there is one)")
    if several:
        g.add_argument("--gpus", metavar="all|0,1,...|cpu:N", help=gpus_help)
    g.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="precision of the weights (default: float16 on a GPU, as the reference; float32 on CPU). "
                        "PixArt-Σ's SDXL VAE overflows float16: it decodes in float32 in a float16 run")
    g.add_argument("--encode-batch", type=int, default=1, metavar="N",
                   help="texts through T5 at once (1: the reference's exact kernels; more is faster on long "
                        "queues, within fp16 rounding). Under a --vram-budget the plan lowers it where it does not "
                        "fit, never moving T5 off the GPU for it")
    g.add_argument("--denoise-batch", type=int, default=None, metavar="N",
                   help="images denoised at once when size, steps, cfg and sampler match. Default on a GPU: as many "
                        "as keep a batch within 8192 latent tokens, at most 4 (4 at 512x512, 2 at 1024x1024, 1 from "
                        "2048x2048), which is where batching paid on an H200: at 512x512 a batch of 4 took 0.20 s "
                        "an image against 0.53, at 1024x1024 a batch of 2 saved 7%%; 1 on the CPU. Images match "
                        "batch 1 within float16 rounding. Under a --vram-budget the plan lowers it to 1 where it "
                        "does not fit")
    g.add_argument("--vram-budget", metavar="SIZE",
                   help="GPU memory the whole process may use, CUDA context included: 1.5GiB, 6GB, 800MiB, or "
                        "auto (what the GPU has free). Components that do not fit stream their weights. "
                        "Default: no limit, everything that fits stays on the GPU")
    g.add_argument("--host-budget", metavar="SIZE", default="auto",
                   help="host RAM the whole process may hold, pinned buffers included: 16GiB, 32GB, or auto (what "
                        "the machine has available, less 2 GiB). Where it is short, the DiT's blocks are read from "
                        "the weights files at every step and the strip decoder's activations wait in files in the "
                        "run folder (slower) instead of RAM. `plan` shows each stage's GPU and host memory")
    g.add_argument("--text-encoder-on-cpu", dest="encode_on_cpu", action="store_true",
                   help="run T5 on the CPU: no GPU memory for it at all, but slow")
    g.add_argument("--text-encoder-8bit", dest="text_encoder_8bit", action="store_true",
                   help="load T5 in 8 bits, diffusers' bitsandbytes recipe: T5-XXL takes ~7.4 GiB of GPU memory "
                        "instead of ~10.7, loaded straight onto the GPU, never streamed. Embeddings and images "
                        "deviate from 16-bit ones (BENCHMARKS.md, Precision). CUDA only; needs "
                        "pip install 'pixart-lowvram[8bit]'")
    g.add_argument("--upcast", type=_components, default=(), metavar="COMPONENT[,COMPONENT]",
                   help="compute these components in float32 in a 16-bit run: text_encoder, transformer, vae. The "
                        "fix when one overflows float16 (the run then ends with exit code 4 and names it); it "
                        "applies to what is still to make, so a rerun with it redoes only the failed images")
    g.add_argument("--compile", choices=["auto", "on", "off"], default="off",
                   help="torch.compile the DiT's repeated blocks (resident or streamed): faster denoising steps on "
                        "a GPU for long queues, images up to 3/255 from the uncompiled ones (float16 rounding; "
                        "BENCHMARKS.md, Compiled images). The first run on a machine spends ~10 to 20 s compiling, "
                        "later runs seconds (the cache is kept in ~/.cache/pixart-lowvram/torch-compile). off "
                        "(default): the plain pipeline's numbers. auto: on a GPU, each image size and batch with at "
                        "least 650 transformer calls (steps x batches: ~65 images of 20 steps at 1024x1024), the "
                        "others uncompiled; never on the CPU. on: every size and batch. At most 8 either way "
                        "(torch's limit per function)")
    g.add_argument("--no-embed-cache", dest="embed_cache", action="store_const", const=None, default="default",
                   help="do not share prompt embeddings across runs (default: ~/.cache/pixart-lowvram/embeds)")
    g.add_argument("--force", action="store_true",
                   help="make every image again instead of resuming (the same images: seeds drawn at random "
                        "before are kept)")
    g.add_argument("--new-seeds", action="store_true",
                   help="draw new random seeds for jobs without a seed (new images; the earlier ones are kept, "
                        "the new ones get other names)")
    g.add_argument("--allow-pickle", action="store_true",
                   help="load pickled .bin weights where a component has no safetensors (they can run code "
                        "when loaded: only for sources you trust)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only the summary")


def _lora(text: str) -> dict:
    """PATH[:SCALE] -> a queue's LoRA entry; a scale that is not a number is left for the queue's checks to name
    (a path that itself holds a colon, C:\\styles\\ink.safetensors, stays whole)."""
    path, sep, scale = text.rpartition(":")
    if not sep or not path or os.path.exists(text) or "/" in scale or "\\" in scale or scale.endswith(
            ".safetensors"):
        return {"path": text}
    try:
        return {"path": path, "scale": float(scale)}
    except ValueError:
        return {"path": path, "scale": scale}


def _components(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _add_job_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job options")
    g.add_argument("--negative-prompt", help='what to steer away from (default: "")')
    g.add_argument("--width", type=int, help="image width, a multiple of 8 (default: the model's, 1024 for XL)")
    g.add_argument("--height", type=int, help="image height, a multiple of 8 (default: the model's)")
    g.add_argument("--seed", type=int, help="random seed (default: drawn at random and recorded)")
    g.add_argument("--cfg", type=float,
                   help="guidance scale (default: the model's: 4.5 for PixArt-α and Σ, 0 for LCM, 1 for DMD)")
    g.add_argument("--steps", type=int,
                   help="denoising steps (default: the model's: 20 for PixArt-α and Σ, 4 for LCM, 1 for DMD)")
    g.add_argument("--sampler", metavar="NAME",
                   help=f"{', '.join(SAMPLER_NAMES)} (default: the model's own "
                        "scheduler: dpm-solver for PixArt-α and Σ, lcm for LCM, ddpm for DMD)")
    g.add_argument("--count", type=int, help="how many images, with seeds seed, seed+1, ... (default: 1)")
    g.add_argument("--name", help="file name of the image (default: from the prompt)")
    g.add_argument("--lora", action="append", type=_lora, metavar="PATH[:SCALE]",
                   help="merge a LoRA into the transformer: a .safetensors file as ComfyUI loads for PixArt, or a "
                        "peft adapter folder; SCALE (default 1) weighs its update. Repeat for several. Merged into "
                        "the weights as they load: no GPU memory and no time per step")
    g.add_argument("--init-image", metavar="PATH",
                   help="image-to-image: start from this picture (resized to the image's size), encoded by the VAE "
                        "and noised as diffusers' img2img pipeline does")
    g.add_argument("--strength", type=float,
                   help="image-to-image: how much of the picture is redone, more than 0 to 1: the share of the "
                        "steps that runs (default 0.8; 1 runs them all from the picture noised to the first one)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pixart-lowvram", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Run PixArt text-to-image models (PixArt-α 1024 and 512, PixArt-Σ, PixArt-LCM, PixArt-α DMD: "
                    "the kind is read from the model folder) on small GPUs at full 16-bit quality. The queue runs in "
                    "stages, one model component in memory at a time: encode every prompt (T5), denoise every "
                    "image (DiT), decode every image (VAE); image-to-image jobs' init images are encoded by the "
                    "VAE before denoising.")
    from . import __version__  # noqa: PLC0415

    parser.add_argument("--version", action="version", version=f"pixart-lowvram {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run a queue file (TOML, JSON or JSONL)", description=QUEUE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("queue", metavar="QUEUE", help="the queue file")
    _add_run_options(p, "run folder (default: runs/<queue file name>)", several=True)

    p = sub.add_parser("plan", help="show where each stage's model goes for a VRAM budget (loads nothing)",
                       description="Prints the placement plan for a queue: for each stage whether its model is "
                                   "resident on the GPU, streamed block by block, or (T5) on the CPU, whether the "
                                   "VAE decodes (and, for init images, encodes) whole or in strips, and the "
                                   "predicted peak. With --gpus, how a run over those GPUs would divide the queue: "
                                   "each process's plan and counts, and with LoRAs the sets each one loads. Reads "
                                   "only configs and safetensors headers; starts no process.")
    p.add_argument("queue", metavar="QUEUE", help="the queue file")
    _add_run_options(p, "(not used)", several=True, gpus_help=PLAN_GPUS_HELP)

    p = sub.add_parser("generate", help="make images from one prompt",
                       description="Make images from one prompt; a one-job queue with the same rules.")
    p.add_argument("prompt", metavar="PROMPT")
    _add_job_options(p)
    _add_run_options(p, "run folder (default: runs/<prompt>)", several=True)

    p = sub.add_parser("demo", help="offline demo: the article's queue on a tiny random-weight model",
                       description="Builds (or reuses) a tiny random-weight PixArt model in the cache folder and "
                                   "runs the seed article's queue at the model's small size. Needs no network "
                                   "and no GPU; the images are noise (the weights are random).")
    p.add_argument("--out", metavar="DIR", default="runs/demo", help="run folder (default: runs/demo)")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N (default: cuda if there is one)")
    p.add_argument("--force", action="store_true", help="make every image again instead of resuming")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, only the summary")

    from .presets import PRESET_HELP  # noqa: PLC0415

    p = sub.add_parser("make-random-model", help="write a random-weight PixArt model folder (tests, benchmarks)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Writes a PixArt model in the diffusers layout with random weights, loaded "
                                   "exactly like the real checkpoint.\n'tiny' presets are for tests and the demo "
                                   "(seconds on a CPU), 'xl' ones have the real shapes, for memory and speed\n"
                                   "benchmarks (build them on a GPU). Images from them are noise. Presets:\n\n"
                                   + "\n".join(f"  {name:<14} {text}" for name, text in PRESET_HELP.items()))
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--preset", choices=list(PRESET_HELP), default="tiny", metavar="NAME",
                   help="which model and size (default: tiny; see the list above)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="where to build the weights (default: cuda if there is one)")
    return parser


def _settings(args: argparse.Namespace, **overrides):
    from .generate import Settings  # noqa: PLC0415

    fields = {f.name for f in dataclasses.fields(Settings)}
    values = {k: v for k, v in vars(args).items() if k in fields and (v is not None or k == "embed_cache")}
    values.update(overrides)
    return Settings(**values)


SHOW_IMAGES = 10  # a run of at most this many images lists each image's file


def print_summary(result, seconds: float) -> None:
    """The end-of-run table: per stage, what it made, how long it took and its memory peaks (over several processes:
    each one's row, then the stage over all of them, and how long each one waited for the others); then where
    the images are (each one, for a short queue)."""
    from .placement import format_size  # noqa: PLC0415

    def row(s, *label):
        load = "-" if s.load_seconds is None else f"{s.load_seconds:.1f} s"
        if s.loads > 1:  # the DiT, once per LoRA set: the time is the first load's
            load += f" (1st of {s.loads})"
        return (s.name, *label, "skipped" if s.skipped else str(s.items), "-" if s.skipped else f"{s.seconds:.1f} s",
                load, format_size(s.torch_peak), format_size(s.nvml_peak), format_size(s.rss_peak))

    head = ("stage", "made", "time", "loading", "torch peak", "GPU (NVML)", "host RSS")
    over = [(s.name, what) for s in result.stages for what in s.over_budget()]
    if not result.ranks:
        _table([head] + [row(s) for s in result.stages])
    else:
        rows = [head[:1] + ("process",) + head[1:]]
        for s in result.stages:
            for r in result.ranks:
                rows += [row(mine, _process(r)) for mine in r.stages if mine.name == s.name]
            rows.append(row(s, "all"))
        _table(rows)
        over = [(f"{mine.name} on rank {r.rank}", what) for r in result.ranks for mine in r.stages
                for what in mine.over_budget()]
        slowest = max(r.seconds for r in result.ranks)
        inits = any(r.inits for r in result.ranks)  # the column only for a run that encodes init images
        rows = [("process", "images", "texts", *(["init images"] if inits else []), "time", "waiting for the others")]
        rows += [(_process(r), str(r.images), str(r.texts), *([str(r.inits)] if inits else []), f"{r.seconds:.1f} s",
                  f"{r.waited + slowest - r.seconds:.1f} s") if r.missing is None
                 else (_process(r), "-", "-", *(["-"] if inits else []), "-", f"no figures: {r.missing}")
                 for r in result.ranks]
        _table(rows)
    for s in result.stages:
        if s.compile_seconds is not None:
            print(f"{s.name}: {s.compile_seconds:.1f} s of it compiling (torch.compile)")
    for name, what in over:
        print(f"over budget: {name}: {what}")
    done = sum(1 for p in result.images.values() if p.is_file())
    if len(result.images) <= SHOW_IMAGES:
        print()
        for path in result.images.values():
            print(f"  {path}")
    if result.ranks:
        from .team import devices  # noqa: PLC0415

        device = devices([r.device for r in result.ranks])
    else:
        device = result.device
    print(f"\n{done}/{len(result.images)} images in {result.folder / 'images'} "
          f"({seconds:.1f} s, {device}, {result.dtype}; figures in {result.folder / 'run.json'})")


def _process(record) -> str:
    return f"{record.rank} ({record.device}{'' if record.host == socket.gethostname() else ' on ' + record.host})"


def _table(rows: list[tuple[str, ...]]) -> None:
    """Rows under a ruled head; the first column left, the others right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _run(jobs, out: Path, settings, quiet: bool, gpus: str | None = None, standby=None) -> int:
    from . import launch  # noqa: PLC0415

    start = time.perf_counter()
    place = launch.torchrun_place()
    with _stop_on_ctrl_c(say=place is None or place.rank == 0) as stop:
        result = launch.run(jobs, out, settings, TqdmReporter(quiet), stop, gpus=gpus, standby=standby)
    if result is None:
        return 0  # a process of several other than the first: the first reports for all
    print_summary(result, time.perf_counter() - start)
    if result.left_alone:
        print(f"{len(result.left_alone)} image(s) of jobs no longer in the queue were left in place.")
    for failure in result.failures:
        print(f"error: {failure}", file=sys.stderr)
    return EXIT_NON_FINITE if result.failures else 0


@contextlib.contextmanager
def _stop_on_ctrl_c(say: bool = True):
    """The first Ctrl-C asks the run to stop at the next safe point (after the image or text at hand is
    saved); a second one stops at once. Either way nothing finished is lost. `say`: tell the user so (not on the
    ranks other than the first of a run torchrun started: the terminal's Ctrl-C reaches each, and rank 0 speaks
    for all)."""
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set():
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        stop.set()
        if say:
            sys.stderr.write("\nstopping after the current step is saved (Ctrl-C again to stop at once)\n")

    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: no handler, Ctrl-C works as Python's default
        yield stop
        return
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _standby(gpus: str | None):
    """The other processes of `--gpus`, started before anything is imported or checked (standby.py); ended where
    the command stops before it gives them work."""
    from . import standby  # noqa: PLC0415

    waiting = standby.start(gpus)
    try:
        yield waiting
    except BaseException:
        if waiting is not None:
            waiting.close()
        raise


def cmd_run(args) -> int:
    with _standby(args.gpus) as standby:
        from .jobs import load_queue  # noqa: PLC0415
        from .launch import launch_problems  # noqa: PLC0415
        from .resolve import jobs_with_options  # noqa: PLC0415

        settings = _settings(args)
        jobs = jobs_with_options(lambda: load_queue(args.queue), settings, launch_problems(args.gpus, args.device))
        out = Path(args.out) if args.out else Path("runs") / Path(args.queue).stem
        return _run(jobs, out, settings, args.quiet, args.gpus, standby)


def cmd_generate(args) -> int:
    with _standby(args.gpus) as standby:
        from .jobs import jobs_from_options  # noqa: PLC0415
        from .items import prompt_folder_name  # noqa: PLC0415

        from .launch import launch_problems  # noqa: PLC0415
        from .resolve import jobs_with_options  # noqa: PLC0415

        settings = _settings(args)
        jobs = jobs_with_options(lambda: jobs_from_options(
            args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height, seed=args.seed,
            cfg=args.cfg, steps=args.steps, count=args.count, name=args.name, sampler=args.sampler, lora=args.lora,
            init_image=args.init_image, strength=args.strength), settings, launch_problems(args.gpus, args.device))
        out = Path(args.out) if args.out else Path("runs") / prompt_folder_name(args.prompt)
        return _run(jobs, out, settings, args.quiet, args.gpus, standby)


def cmd_demo(args) -> int:
    from .demo import demo_jobs, demo_model  # noqa: PLC0415
    from .generate import default_cache_dir  # noqa: PLC0415

    reporter = TqdmReporter(args.quiet)
    model = demo_model(default_cache_dir(), reporter)
    reporter.info(f"model: {model} (tiny, random weights: the images are noise)")
    return _run(demo_jobs(), Path(args.out), _settings(args, model=str(model)), args.quiet)


def cmd_make_random_model(args) -> int:
    from .random_model import make_random_model  # noqa: PLC0415

    start = time.perf_counter()
    path = make_random_model(args.dir, args.preset, seed=args.seed, device=args.device)
    print(f"{args.preset} random-weight model in {path} ({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_plan(args) -> int:
    from .generate import plan_queue, plan_team  # noqa: PLC0415
    from .jobs import load_queue  # noqa: PLC0415
    from .launch import plan_gpus  # noqa: PLC0415
    from .placement import format_plan  # noqa: PLC0415

    from .resolve import jobs_with_options  # noqa: PLC0415

    settings = _settings(args)
    if args.gpus is None:
        jobs = jobs_with_options(lambda: load_queue(args.queue), settings)
        print(format_plan(plan_queue(jobs, settings, TqdmReporter(args.quiet))))
        return 0
    quiet_libraries()  # main leaves it to the launcher where there is --gpus
    reporter = TqdmReporter(args.quiet)
    problems, devices_used = [], []
    try:
        devices_used = plan_gpus(args.gpus)
    except UsageError as exc:
        problems.append(exc)
    if args.device != "auto":
        problems.append(UsageError(f"--device {args.device!r} and --gpus {args.gpus!r}: --gpus chooses each "
                                   "process's device; leave --device out"))
    jobs = jobs_with_options(lambda: load_queue(args.queue), settings, problems)
    if devices_used[0] == "cpu" or _sees_gpu():
        settings = dataclasses.replace(settings, device=devices_used[0])  # rank 0's, as the run resolves it
    else:
        reporter.info(f"this machine has no GPU: planned for GPUs {args.gpus} with this machine's device and "
                      "its defaults")
    if len(devices_used) == 1:  # a run on one device is one process
        print(format_plan(plan_queue(jobs, settings, reporter)))
        return 0
    print("\n".join(plan_team(jobs, devices_used, settings, reporter).lines))
    return 0


def _sees_gpu() -> bool:
    import torch  # noqa: PLC0415

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


COMMANDS = {"run": cmd_run, "plan": cmd_plan, "generate": cmd_generate, "demo": cmd_demo,
            "make-random-model": cmd_make_random_model}


# Expandable segments let the caching allocator grow and shrink in place: less memory held back by fragmentation,
# which matters under a budget. Pinned host memory (the streamed weights' buffers, the strip decoder's
# activations) is allocated with malloc and registered with CUDA on 8 threads instead of cudaHostAlloc, which
# pinned ~1.7 GiB a second on the H100 machines (1 GiB: 0.6 s, against 0.15 to 0.2 s so; BENCHMARKS.md).
ALLOCATOR_SETTINGS = "expandable_segments:True,pinned_use_cuda_host_register:True,pinned_num_register_threads:8"


def set_allocator_defaults() -> None:
    """Our allocator settings, where the user chose none (read when CUDA starts: call this before)."""
    if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_SETTINGS


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (the README's table). Every failure this tool foresees ends in a
    message on stderr and its code, Ctrl-C included, wherever it lands (loading the libraries too)."""
    try:
        set_allocator_defaults()
        args = build_parser().parse_args(argv)
        if getattr(args, "gpus", None) is None:
            # with --gpus, the launcher does it once the other processes are on their way: these imports take
            # seconds, and the others wait for this process to start them
            quiet_libraries()
        return COMMANDS[args.command](args)
    except PixartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; finished work is kept: run the same command again to resume", file=sys.stderr)
        return 130


def console_main() -> NoReturn:
    """The `pixart-lowvram` command: `main`, then the process ends at once with its code."""
    exit_now(main())


def exit_now(code: int) -> NoReturn:
    """End the process with `code` once the output is flushed, skipping Python's finalization: everything the run
    made is already written, flushed to disk and closed, and what is left is teardown that does nothing useful:
    the cycle collector over every object the imports of torch, diffusers and transformers made, their atexit
    hooks, and CUDA's context (0.5 to 1.1 s of ours on the H100, 1.4 s of the plain pipeline's, BENCHMARKS.md;
    0.3 s on a CPU machine)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: nothing more can be said on it
    os._exit(code)


def quiet_libraries() -> None:
    """Our own bars show progress; the libraries' loading bars would only interleave with them."""
    from diffusers.utils import logging as diffusers_logging  # noqa: PLC0415
    from transformers.utils import logging as transformers_logging  # noqa: PLC0415

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


if __name__ == "__main__":
    console_main()
