"""Test harness for tests/test_crash.py (not a test): runs the real command line in this process and SIGKILLs
the process at a chosen point, as a power cut or the kernel's OOM killer would.

    python tests/crash_child.py [--kill STAGE:POINT:N] [--rank R] [--draw-seed S] [--env NAME=VALUE] -- run QUEUE ...
    python tests/crash_child.py --stdin      # the same arguments, as one JSON list on stdin

`--stdin` lets the test start the process (and pay for the torch and diffusers imports) while it is still busy
with the previous one; the process does nothing until it reads its arguments, then runs them exactly as if they
had been given on the command line.

STAGE is encode, denoise or decode; N counts from 1 within that stage. POINT:

    temp-half       the stage's N-th artifact: half its bytes in the temporary file, then killed (before the rename)
    temp-whole      the stage's N-th artifact: the whole temporary file written and flushed, killed before the rename
    renamed         killed right after the stage's N-th artifact is renamed into place
    torn            half the N-th artifact's bytes written straight at its final name, then killed: what a writer
                    that skipped the temporary file (or a disk that lost the file's tail) would leave
    full            the stage's N-th artifact is not written: the disk is full (ENOSPC), and the process goes on
    compute         killed inside the stage's N-th model call: the text encoder's forward, the transformer's
                    forward (one denoising step) or the VAE's decode (one image)
    manifest-half   the run.json write that ends STAGE (N = 1): half of it in the temporary file, then killed
    manifest-whole  the same, the whole temporary file written, killed before the rename
    manifest-torn   the same, half of run.json written straight over the old one, then killed

    load            killed while the stage loads its component for the N-th time (T5, the transformer, the VAE)
    barrier         (STAGE encode, N 1) killed as the process reaches the wait for the others after encoding, in a
                    run over several processes

    wait            inside the stage's N-th model call, make the file named by --wait-for with `.reached` added, and
                    wait until the file named by --wait-for exists (a run held in the middle, for a test to do
                    something meanwhile), then go on

In a run over several processes (`--gpus cpu:N`), `--rank R` puts the point in rank R's process only (rank 0 is
this process; the others are spawned, and each imports this file as its `__mp_main__`, which installs the same
point there: the environment carries it). N then counts that rank's calls.

The artifact is told by its path (embeds/, latents/, images/, run.json) and, for run.json, by the last stage
the manifest being written reports (its `stages` list; "prepare" before the first). The writes themselves still go through the library's files.write_atomic,
which this only wraps; the model calls are caught by class, however the library loads the models.

`--draw-seed S` makes the seeds drawn for jobs without one come from random.Random(S) instead of the system's
entropy, so that a killed run and the reference run draw the same seed. The rerun after a kill is started
without it: it can only make the reference image again by reusing the seed the killed run recorded.

`--env NAME=VALUE` sets an environment variable before the command runs (the test's own cache folder).
"""
from __future__ import annotations

import argparse
import errno
import io
import json
import os
import signal
import sys
import threading
from pathlib import Path

STAGE_OF_FOLDER = {"embeds": "encode", "latents": "denoise", "images": "decode"}
ARTIFACT_POINTS = ("temp-half", "temp-whole", "renamed", "torn", "full")
MANIFEST_POINTS = ("manifest-half", "manifest-whole", "manifest-torn")
POINTS = ARTIFACT_POINTS + MANIFEST_POINTS + ("compute", "wait", "load", "barrier")
LOADER_OF_STAGE = {"encode": ("encode", "load_text_encoder"), "denoise": ("denoise", "load_transformer"),
                   "decode": ("decode", "load_vae")}  # the stage's module and the loader it calls
POINT_ENV = "PIXART_LOWVRAM_TEST_POINT"  # the point, for the processes a several-process run spawns
MODEL_OF_STAGE = {"encode": "T5EncoderModel", "denoise": "PixArtTransformer2DModel"}  # forward = one call


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


MANIFEST_STAGE = threading.local()  # the stage whose end the manifest being written records


def running_stage() -> str:
    return getattr(MANIFEST_STAGE, "name", "prepare")


def write_and_fsync(f, data: bytes) -> None:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def my_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def install_kill_point(stage: str, point: str, n: int, rank: int = 0, wait_for: str | None = None) -> None:
    calls = {"count": 0}

    def reached() -> bool:
        if my_rank() != rank:
            return False
        calls["count"] += 1
        return calls["count"] == n

    def act() -> None:
        if point == "wait":
            Path(f"{wait_for}.reached").touch()
            while not Path(wait_for).exists():
                threading.Event().wait(0.05)
        else:
            die()

    if point in ("compute", "wait"):
        install_compute_kill(stage, reached, act)
    elif point == "load":
        install_load_kill(stage, reached)
    elif point == "barrier":
        from pixart_lowvram.team import Team

        real_exchange = Team.exchange

        def exchange(self, *args, **kwargs):
            if reached():
                die()
            return real_exchange(self, *args, **kwargs)

        Team.exchange = exchange
    else:
        install_write_kill(stage, point, reached)


def install_compute_kill(stage: str, reached, act) -> None:
    if stage == "decode":
        from diffusers import AutoencoderKL

        real_decode = AutoencoderKL.decode

        def decode(self, *args, **kwargs):
            out = real_decode(self, *args, **kwargs)
            if reached():
                act()
            return out

        AutoencoderKL.decode = decode
        return
    import torch

    def after_forward(module, args, output):
        if type(module).__name__ == MODEL_OF_STAGE[stage] and reached():
            act()

    torch.nn.modules.module.register_module_forward_hook(after_forward)


def install_load_kill(stage: str, reached) -> None:
    import importlib

    module_name, loader = LOADER_OF_STAGE[stage]
    module = importlib.import_module(f"pixart_lowvram.{module_name}")
    real_load = getattr(module, loader)

    def load(*args, **kwargs):
        if reached():
            die()
        return real_load(*args, **kwargs)

    setattr(module, loader, load)


def install_write_kill(stage: str, point: str, reached) -> None:
    from pixart_lowvram import run
    from pixart_lowvram.run import MANIFEST, RunFolder

    real_atomic = run.write_atomic
    kind = point.split("-")[-1]  # half, whole, renamed, torn

    cache = os.environ.get("XDG_CACHE_HOME")

    def targeted(path: Path) -> bool:
        if cache and path.is_relative_to(cache):
            return False  # the shared embedding cache's copies (its folder is named embeds/ too): not the run's
        if point in MANIFEST_POINTS:
            return path.name == MANIFEST and running_stage() == stage
        return STAGE_OF_FOLDER.get(path.parent.name) == stage

    one_at_a_time = threading.Lock()

    def atomic(path, write) -> None:
        if not targeted(Path(path)):
            return real_atomic(path, write)
        # decode writes its PNGs on threads: counted and written one at a time here, so that when the N-th is
        # reached exactly N-1 are whole (another thread's rename could otherwise slip in before the kill lands)
        with one_at_a_time:
            return kill_at(path, write)

    def kill_at(path, write) -> None:
        if not reached():
            return real_atomic(path, write)
        if kind == "full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        if kind == "renamed":
            real_atomic(path, write)
            die()
        buffer = io.BytesIO()
        write(buffer)
        data = buffer.getvalue()
        if kind == "torn":
            with open(path, "wb") as f:
                write_and_fsync(f, data[: len(data) // 2])
            die()
        kept = data if kind == "whole" else data[: len(data) // 2]

        def write_then_die(f):
            write_and_fsync(f, kept)
            die()

        real_atomic(path, write_then_die)  # the library makes and names the temporary file
        raise AssertionError("unreachable: killed inside the write")

    run.write_atomic = atomic  # every write of the run folder goes through it
    real_write_manifest = RunFolder.write_manifest

    def write_manifest(self, manifest: dict) -> None:
        stages = manifest.get("stages") or [{"name": "prepare"}]
        MANIFEST_STAGE.name = stages[-1]["name"]
        try:
            real_write_manifest(self, manifest)
        finally:
            MANIFEST_STAGE.name = "prepare"

    RunFolder.write_manifest = write_manifest


def pin_drawn_seeds(seed: int) -> None:
    import random

    # items.expand draws missing seeds from random.SystemRandom(): this process's draws become reproducible
    random.SystemRandom = lambda: random.Random(seed)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="crash_child.py")
    parser.add_argument("--kill", metavar="STAGE:POINT:N")
    parser.add_argument("--rank", type=int, default=0, help="the rank whose process the point is in")
    parser.add_argument("--wait-for", metavar="PATH", help="the file the point `wait` waits for")
    parser.add_argument("--draw-seed", type=int)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--stdin", action="store_true", help="read the arguments as a JSON list on stdin")
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- then the pixart-lowvram arguments")
    args = parser.parse_args(argv)
    if args.cli[:1] == ["--"]:
        args.cli = args.cli[1:]
    return args


def import_ahead() -> None:
    """The slow imports, done while the test is still busy with the previous process: only modules a run
    imports anyway (diffusers and transformers load these lazily, on first use)."""
    import diffusers
    import transformers

    import pixart_lowvram.cli  # noqa: F401
    import pixart_lowvram.generate  # noqa: F401

    for name in ("PixArtAlphaPipeline", "PixArtTransformer2DModel", "AutoencoderKL", "DPMSolverMultistepScheduler"):
        getattr(diffusers, name)
    for name in ("T5EncoderModel", "T5Tokenizer"):
        getattr(transformers, name)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.stdin:
        import_ahead()
        line = sys.stdin.readline()
        if not line:
            return 0  # the test did not need this process after all
        args = parse(json.loads(line))
    for assignment in args.env:
        name, _, value = assignment.partition("=")
        os.environ[name] = value
    if args.kill:
        stage, point, n = args.kill.split(":")
        assert stage in ("encode", "denoise", "decode") and point in POINTS, args.kill
        os.environ[POINT_ENV] = json.dumps([stage, point, int(n), args.rank, args.wait_for])
        install_kill_point(stage, point, int(n), args.rank, args.wait_for)
    if args.draw_seed is not None:
        pin_drawn_seeds(args.draw_seed)
    from pixart_lowvram.cli import main as cli_main

    return cli_main(args.cli)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
elif __name__ == "__mp_main__" and os.environ.get(POINT_ENV):  # a process a several-process run spawned
    install_kill_point(*json.loads(os.environ[POINT_ENV]))
