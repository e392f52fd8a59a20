"""How the processes of a run over several GPUs start, and how each joins the others (team.py). Three ways in, one
code path: every process is a rank that calls `generate.run_queue` with the same jobs and settings and its own
device.

  pixart-lowvram run QUEUE --gpus 0,1     this process is rank 0 on GPU 0 and starts a worker per other GPU
                                          (torch.multiprocessing, spawned: fresh interpreters), which meet at a
                                          TCPStore this process holds; it watches them, so that one that dies stops
                                          the run at once
  torchrun --nproc-per-node 2 -m pixart_lowvram.cli run QUEUE
                                          each process is one rank, told its place by torchrun's environment
                                          (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...) and rendezvousing through
                                          it, on one host or several (the run folder then on shared storage);
                                          torchrun watches them, and stops the others when one fails
  --gpus cpu:N                            N processes on the CPU, for tests and machines without a GPU
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .errors import PixartError, RankFailed, UsageError
from .generate import RunResult, run_queue
from .jobs import Job
from .reporting import Reporter
from .resolve import Settings, check_options
from .standby import PRELOAD, Standby, context, quiet_cpp_warnings, requested
from .team import Team

# How long the store waits for a rank that is expected: a worker's first contact comes after it imports torch.
STORE_TIMEOUT = datetime.timedelta(minutes=5)
# After rank 0 is done, how long a worker may take to end before it is stopped (it ends once it has reported).
REAP_SECONDS = 30.0


def parse_gpus(text: str) -> list[str]:
    """`--gpus`: each rank's device, rank 0 first. `all` (every GPU torch sees), indices (`0,1,3`), or `cpu:N` (N
    processes on the CPU). A UsageError (exit code 2) for anything else, before anything starts."""
    asked = requested(text)
    if asked and asked[0] == "cpu":
        return asked
    import torch  # noqa: PLC0415

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise UsageError(f"--gpus {text!r}: this torch sees no CUDA GPU (torch {torch.__version__}); for "
                         "several processes on the CPU, --gpus cpu:N")
    if asked is None:
        return [f"cuda:{i}" for i in range(available)]
    wrong = [d for d in asked if int(d.removeprefix("cuda:")) >= available]
    if wrong:
        raise UsageError(f"--gpus {text!r}: no GPU {', '.join(d.removeprefix('cuda:') for d in wrong)}; torch "
                         f"sees {available} (0 to {available - 1})")
    return asked


def plan_gpus(text: str) -> list[str]:
    """`--gpus` for `plan`: each rank's device, as `run` would have them. A list of indices is checked against the
    GPUs torch sees where it sees any (where it sees none, the plan is for another machine's GPUs); `all` needs
    torch to count them. A UsageError (exit code 2) for what `run` would refuse."""
    asked = requested(text)
    if asked is not None and asked[0] == "cpu":
        return asked
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        if asked is None:
            raise UsageError(f"--gpus {text!r}: this torch sees no CUDA GPU to count (torch {torch.__version__}); "
                             "to plan for GPUs of another machine, list them (--gpus 0,1), or for several processes "
                             "on the CPU, --gpus cpu:N")
        return asked
    return parse_gpus(text)


@dataclasses.dataclass(frozen=True)
class TorchrunPlace:
    """This process's place among those torchrun (or another launcher setting torch.distributed's environment)
    started."""

    rank: int
    size: int
    local_rank: int


def torchrun_place() -> TorchrunPlace | None:
    """Where torchrun started this process as one of several; None otherwise (or as the only one)."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env or "MASTER_ADDR" not in env:
        return None
    try:
        place = TorchrunPlace(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))
    except ValueError as exc:
        raise UsageError(f"torch.distributed's environment is not numbers (RANK={env['RANK']!r}, "
                         f"WORLD_SIZE={env['WORLD_SIZE']!r})") from exc
    return place if place.size > 1 else None


def launch_problems(gpus: str | None, device: str = "auto") -> list[PixartError]:
    """What is wrong with how the processes would start (`--gpus`, torchrun's environment, `--device` beside
    them): found before any process starts or any model loads, to be told with the queue's and options' problems."""
    place = torchrun_place()
    if place is not None and gpus is not None:
        return [UsageError(f"--gpus {gpus!r}: torchrun already started this process as rank {place.rank} of "
                           f"{place.size} (one per GPU); leave --gpus out")]
    if place is not None and device not in ("auto", "cpu", "cuda"):
        return [UsageError(f"--device {device!r}: under torchrun each process takes the GPU of its LOCAL_RANK; "
                           "give --device cuda or cpu, or leave it out")]
    problems: list[PixartError] = []
    if gpus is not None:
        try:
            parse_gpus(gpus)
        except UsageError as exc:
            problems.append(exc)
        if device != "auto":
            problems.append(UsageError(f"--device {device!r} and --gpus {gpus!r}: --gpus chooses each process's "
                                       "device; leave --device out"))
    return problems


def run(jobs: list[Job], out: str | Path, settings: Settings, reporter: Reporter, stop: threading.Event,
        gpus: str | None = None, standby: Standby | None = None) -> RunResult | None:
    """The queue in this one process, over the GPUs of `gpus` (this process is rank 0 and starts the others), or
    as the rank torchrun made this process. Returns the result where this process is rank 0 (or alone); None on
    the other ranks, whose errors rank 0 reports. `launch_problems` tells what is wrong with `gpus` beforehand;
    the options are checked here for the first process's device, before any other process is given work.
    `standby`: the other processes, started already (standby.start) and given their parts here; those it has that
    the run does not use end."""
    marks = {"launch": time.time()}  # the run's timeline (RunResult.timeline) begins here on several processes
    place = torchrun_place()
    if place is not None:
        check_options(dataclasses.replace(settings, device=_torchrun_device(settings.device, place.local_rank)))
        return _as_torchrun_rank(place, jobs, out, settings, reporter, stop, marks)
    if gpus is None:
        return run_queue(jobs, out, settings, reporter, stop)
    try:
        devices = parse_gpus(gpus)
        check_options(dataclasses.replace(settings, device=devices[0]))
    except BaseException:
        if standby is not None:
            standby.close()
        raise
    if standby is not None and (len(standby.processes) != len(devices) - 1 or standby.on_gpu != (devices[0] != "cpu")):
        standby.close()  # not the processes this run needs (cannot happen from the command line)
        standby = None
    if len(devices) == 1:
        _quiet_libraries()
        return run_queue(jobs, out, dataclasses.replace(settings, device=devices[0]), reporter, stop)
    return _spawn(devices, jobs, out, settings, reporter, stop, marks, standby)


def _spawn(devices: list[str], jobs: list[Job], out: str | Path, settings: Settings, reporter: Reporter,
           stop: threading.Event, marks: dict[str, float], standby: Standby | None = None) -> RunResult:
    import torch.distributed as dist  # noqa: PLC0415

    # Port 0: the system picks a free one; the workers learn it with their part.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT)
    env = dict(os.environ)
    # workers started here (spawned ones on the thread) are quiet, until every one has reached the store
    quiet = contextlib.ExitStack()
    if standby is not None:
        workers = dict(enumerate(standby.processes, start=1))
        order = (devices, store.port, jobs, str(out), settings, env)
        # on the thread: a pipe that fills (a long queue) does not hold this process up until the worker reads it
        starting = _Starting(workers, marks, start=lambda: [standby.hand(rank, order) for rank in workers])
    else:
        ctx = context(on_gpu=devices[0] != "cpu")
        workers = {rank: ctx.Process(target=_worker, name=f"pixart-lowvram-rank{rank}", daemon=True,
                                     args=(rank, devices, store.port, jobs, str(out), settings, env))
                   for rank in range(1, len(devices))}
        quiet.enter_context(quiet_cpp_warnings())  # this process loaded torch already: not for it
        starting = _Starting(workers, marks)
    try:
        with quiet:
            _quiet_libraries()
            preload()  # while the workers start, as they do
            marks["imported"] = time.time()
            _wait_for(workers, devices, store, starting)
        marks["store reached"] = time.time()  # by every worker
        _settle(devices[0], len(devices))
        with Team.join(0, len(devices), store, devices[0], exited=lambda: {
                rank: w.exitcode for rank, w in workers.items() if w.exitcode is not None}, marks=marks) as team:
            return run_queue(jobs, out, dataclasses.replace(settings, device=devices[0]), reporter, stop, team)
    finally:
        starting.thread.join()
        _reap(w for w in workers.values() if w.pid is not None)


class _Starting:
    """The workers, started (or, on standby, given their parts: `start`) on a thread of their own: a fork server's
    first start returns once the server has imported PRELOAD (seconds, measured on the CPU), which this process
    spends importing the same meanwhile."""

    def __init__(self, workers: dict, marks: dict[str, float], start=None):
        self.workers, self.marks = workers, marks
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._start, args=(start or self._start_all,),
                                       name="pixart-lowvram-start", daemon=True)
        self.thread.start()

    def _start_all(self) -> None:
        for worker in self.workers.values():
            worker.start()

    def _start(self, start) -> None:
        try:
            start()
        except BaseException as exc:  # noqa: BLE001 - told by _wait_for, on the main thread
            self.error = exc
        self.marks["workers started"] = time.time()


def _wait_for(workers: dict, devices: list[str], store, starting: _Starting) -> None:
    """Until every worker has reached the store: one that ends first could not start (the group would otherwise
    wait for it until its timeout)."""
    keys = [f"launch/started/{rank}" for rank in workers]
    while not store.check(keys):
        if starting.error is not None:
            raise RankFailed(f"the other processes could not be started ({starting.error}); nothing was made")
        for rank, worker in workers.items():
            if worker.exitcode is not None and not store.check([keys[rank - 1]]):
                raise RankFailed(f"rank {rank} ({devices[rank]}) ended before it started (exit code "
                                 f"{worker.exitcode}); nothing was made")
        time.sleep(0.05)


def preload() -> None:
    """Import PRELOAD; a name that does not import (another version of a library) is passed over, as the fork
    server passes it over: the run imports what it needs, and says what is missing, later."""
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _worker(rank: int, devices: list[str], port: int, jobs: list[Job], out: str, settings: Settings,
            env: dict[str, str]) -> None:
    """A process `--gpus` started: rank `rank` of `len(devices)`. Quiet: rank 0 reports for all; it speaks only
    where it lost rank 0, which then cannot. `env`: rank 0's environment now (a fork server keeps the one it
    started with)."""
    marks = {"launch": time.time()}
    import torch.distributed as dist  # noqa: PLC0415

    os.environ.clear()
    os.environ.update(env)
    stop = threading.Event()
    _stop_on_signals(stop)
    code = 0
    try:
        _quiet_libraries()
        preload()  # a fork server's workers have them already
        marks["imported"] = time.time()
        _settle(devices[rank], len(devices))
        try:
            store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=STORE_TIMEOUT)
            store.set(f"launch/started/{rank}", "")
        except RuntimeError as exc:
            raise RankFailed(f"rank {rank}: could not reach rank 0 ({exc})") from exc
        marks["store reached"] = time.time()
        with Team.join(rank, len(devices), store, devices[rank], marks=marks) as team:
            try:
                run_queue(jobs, out, dataclasses.replace(settings, device=devices[rank]), None, stop, team)
            except PixartError as exc:
                if team.lost:
                    print(f"error: {exc}", file=sys.stderr)
                    code = exc.exit_code
    except PixartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    # Its record is with rank 0, which waits for this process to end: what Python's teardown would add (the
    # collector over every object the imports made, CUDA's context) does nothing useful (cli.exit_now).
    from .cli import exit_now  # noqa: PLC0415

    exit_now(code)


def _as_torchrun_rank(place: TorchrunPlace, jobs: list[Job], out: str | Path, settings: Settings,
                      reporter: Reporter, stop: threading.Event, marks: dict[str, float]) -> RunResult | None:
    import torch.distributed as dist  # noqa: PLC0415

    device = _torchrun_device(settings.device, place.local_rank)
    _pin(device)
    _stop_on_signals(stop, interrupt=False)  # torchrun asks its workers to stop with SIGTERM
    store, rank, size = next(dist.rendezvous("env://", timeout=STORE_TIMEOUT))
    marks["store reached"] = time.time()
    with Team.join(rank, size, store, device, marks=marks) as team:
        settings = dataclasses.replace(settings, device=device)
        if rank == 0:
            return run_queue(jobs, out, settings, reporter, stop, team)
        try:
            run_queue(jobs, out, settings, None, stop, team)
        except PixartError:
            if team.lost:
                raise
        return None


def _torchrun_device(device: str, local_rank: int) -> str:
    """Under torchrun each process takes the GPU of its LOCAL_RANK (or the CPU); where the launcher gave each
    process one GPU of its own (CUDA_VISIBLE_DEVICES), that one."""
    import torch  # noqa: PLC0415

    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return "cpu"
    return "cuda:0" if torch.cuda.device_count() == 1 else f"cuda:{local_rank}"


def _pin(device: str) -> None:
    """Make `device` this process's current GPU before CUDA starts, so nothing creates a context on another one
    (each would take ~0.5 GiB of that GPU)."""
    if device.startswith("cuda"):
        import torch  # noqa: PLC0415

        torch.cuda.set_device(torch.device(device))


def _settle(device: str, ranks: int) -> None:
    """A process of `ranks` on this machine: its GPU, and its share of the CPU cores for torch's threads (each would
    otherwise start one per core, `ranks` times over; torchrun sets OMP_NUM_THREADS=1 itself)."""
    import torch  # noqa: PLC0415

    _pin(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ranks))


def _stop_on_signals(stop: threading.Event, interrupt: bool = True) -> None:
    """A worker's signals: SIGTERM (and with `interrupt`, a first Ctrl-C) asks it to stop at its next safe point;
    a second Ctrl-C stops it at once. A Ctrl-C in a terminal reaches every process of the run."""

    def handler(signum, frame):
        if signum == signal.SIGINT and stop.is_set():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    if interrupt:
        signal.signal(signal.SIGINT, handler)


def _quiet_libraries() -> None:
    """The libraries' own loading bars off, in every process of a run over several (the stages draw none there
    either: there would be one per process); the CLI's one process does it as it starts."""
    from tqdm import tqdm  # noqa: PLC0415

    from .cli import quiet_libraries  # noqa: PLC0415

    quiet_libraries()
    # tqdm's default lock holds a multiprocessing semaphore, which a worker killed outright leaves for rank 0's
    # resource tracker to warn about; a worker draws no bar of its own
    tqdm.set_lock(threading.RLock())


def _reap(workers) -> None:
    """Wait for the workers to end; stop those that do not (SIGTERM: at their next safe point), then kill."""
    for worker in workers:
        worker.join(REAP_SECONDS)
        if worker.is_alive():
            worker.terminate()
            worker.join(REAP_SECONDS)
        if worker.is_alive():
            worker.kill()
            worker.join()
