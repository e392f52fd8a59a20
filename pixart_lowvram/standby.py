"""The other processes of a `--gpus` run, started at the command's first step, before this process imports torch and
checks the queue: each imports torch and the libraries meanwhile, then waits for its part (launch.py hands it one)
or for this process to end.

Measured on 2 H200s (BENCHMARKS.md, "Several GPUs"): a worker started once the launcher was reached, after rank 0
had imported torch (1.9 s), met rank 0 2.4 s after rank 0 was ready, and every rank waited for it. Started here, it
imports while rank 0 does. A queue or option that is wrong still stops the command before any model loads: the
processes on standby have loaded nothing, and are ended with it (or end on their own once their pipe closes).

This module imports nothing heavy: it runs before torch is imported."""
from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import threading
from dataclasses import dataclass, field

from .errors import UsageError

# What every process of a run imports anyway, each before the processes meet (launch.preload): rank 0 while the
# workers start, a spawned worker before it reaches rank 0's store (one that imported them after, in its first
# steps, held every rank 3.5 s at the first collective on 2 H200s), and on the CPU the fork server that starts the
# workers, once for all of them (~3 s of CPU apiece).
PRELOAD = ("pixart_lowvram.launch", "diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha",
           "diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma", "diffusers.models.autoencoders.autoencoder_kl",
           "transformers.models.t5.modeling_t5", "transformers.models.t5.tokenization_t5")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR")
MAX_CPU_WORKERS = 64
GPUS_HELP = "all, a list of indices (0,1,3), or cpu:N"


def context(on_gpu: bool):
    """The workers' start method. On GPUs, spawn: a fresh interpreter each, so CUDA starts in each worker untouched
    (a process forked after any import that asked the driver a question cannot use CUDA; importing diffusers and
    transformers does not promise not to). On the CPU, a fork server where there is one: a fresh process that
    imports PRELOAD, then forks each worker from itself (the tests start 8 workers on two cores). Never a fork of
    this process, whose threads a child would inherit half-way."""
    if on_gpu or "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", *PRELOAD])
    with starting_others():
        multiprocessing.forkserver.ensure_running()
    return ctx


@contextlib.contextmanager
def starting_others():
    """What a process the run starts begins with, set here for the instant it takes to start (an exec'd process
    inherits both): Ctrl-C ignored, and torch's C++ warnings off (`quiet_cpp_warnings`).

    A terminal's Ctrl-C reaches every process, and one still importing the libraries (the fork server's preload, a
    process on standby) would print a KeyboardInterrupt traceback beside this process's one message. An ignored
    signal stays ignored through exec, and Python keeps it so, until launch._worker sets its handlers. This process,
    which handles Ctrl-C for the run, is deaf to it only meanwhile. Only the main thread can set a handler."""
    deaf = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if deaf else None
    try:
        with quiet_cpp_warnings():
            yield
    finally:
        if deaf:
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def quiet_cpp_warnings():
    """Processes started in here read TORCH_CPP_LOG_LEVEL=ERROR as torch loads (where the user set none): a worker
    that loses rank 0 (killed, by the OOM killer say) says so in one line, and each of its calls to rank 0's store
    would first print a C++ warning with its stack trace. The workers are quiet anyway: rank 0, whose warnings are
    kept, reports for all."""
    added = "TORCH_CPP_LOG_LEVEL" not in os.environ
    if added:
        os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    try:
        yield
    finally:
        if added:
            os.environ.pop("TORCH_CPP_LOG_LEVEL", None)


def requested(text: str) -> list[str] | None:
    """`--gpus` as written, read without torch: each rank's device, rank 0 first (`cpu:N`: N times "cpu"; a list of
    indices: "cuda:I" each), or None for `all`, which torch counts. A UsageError (exit code 2) for what is not
    `--gpus`' syntax; launch.parse_gpus checks the indices against the GPUs torch sees."""
    value = text.strip().lower()
    if value.startswith("cpu:"):
        count = value.removeprefix("cpu:")
        if not count.isdigit() or not 1 <= int(count) <= MAX_CPU_WORKERS:
            raise UsageError(f"--gpus {text!r}: cpu:N takes a number of processes from 1 to {MAX_CPU_WORKERS}")
        return ["cpu"] * int(count)
    if value == "all":
        return None
    parts = [p.strip() for p in value.split(",")]
    if not all(p.isdigit() for p in parts):
        raise UsageError(f"--gpus {text!r}: not a list of GPUs ({GPUS_HELP})")
    indices = [int(p) for p in parts]
    if len(set(indices)) != len(indices):
        raise UsageError(f"--gpus {text!r}: a GPU named twice (each GPU runs one process)")
    return [f"cuda:{i}" for i in indices]


def planned_processes(gpus: str | None) -> tuple[int, bool] | None:
    """How many processes `--gpus` asks for and whether on GPUs, where that is known without torch: a list of
    indices or cpu:N. None for `all` (torch counts the GPUs), a single process, a value launch.parse_gpus will
    refuse, or a process torchrun started."""
    if gpus is None or any(name in os.environ for name in TORCHRUN_VARIABLES):
        return None
    try:
        devices = requested(gpus)
    except UsageError:
        return None  # told by launch_problems, with the queue's problems
    if devices is None or len(devices) < 2:
        return None
    return len(devices), devices[0] != "cpu"


@dataclass
class Standby:
    """Processes waiting for their part: rank r + 1 is `processes[r]`, told through `pipes[r]`."""

    on_gpu: bool
    processes: list = field(default_factory=list)
    pipes: list = field(default_factory=list)

    def hand(self, rank: int, order: tuple) -> None:
        """Give rank `rank` (1 and up) its part: launch._worker's arguments after the rank."""
        pipe = self.pipes[rank - 1]
        pipe.send(order)
        pipe.close()

    def close(self) -> None:
        """End those not given a part: nothing of theirs is worth waiting for (they have only imported), and a
        command that stops leaves no process of its own behind."""
        waiting = [process for pipe, process in zip(self.pipes, self.processes) if not pipe.closed]  # handing closes
        for pipe in self.pipes:
            pipe.close()
        for process in waiting:
            process.terminate()
            process.join(5)


def start(gpus: str | None) -> Standby | None:
    """The other processes of `--gpus`, started now, or None where their number is not known yet (see
    `planned_processes`)."""
    planned = planned_processes(gpus)
    if planned is None:
        return None
    count, on_gpu = planned
    standby = Standby(on_gpu)
    ctx = context(on_gpu)
    for rank in range(1, count):
        mine, theirs = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_wait, args=(mine, rank), name=f"pixart-lowvram-rank{rank}", daemon=True)
        # a fork server's worker is forked from the server, which started so: its start waits for the server's
        # preload (seconds), which this process must not spend deaf
        with starting_others() if ctx.get_start_method() == "spawn" else contextlib.nullcontext():
            process.start()
        mine.close()
        standby.processes.append(process)
        standby.pipes.append(theirs)
    return standby


def _wait(pipe, rank: int) -> None:
    """A process on standby: import what its work needs, then run its part, or end quietly where none comes."""
    try:
        from . import launch  # noqa: PLC0415

        launch.preload()
        order = pipe.recv()
    except (EOFError, OSError, KeyboardInterrupt):
        sys.exit(0)  # the command ended before it had work for this process (a wrong queue, Ctrl-C)
    launch._worker(rank, *order)
