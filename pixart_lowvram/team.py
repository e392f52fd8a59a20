"""Several processes making one queue: the ranks of a torch.distributed process group (one per GPU, or several on
the CPU), each running the single-GPU stages on its share of the work, into one run folder. Rank 0 holds the
folder's lock, writes run.json, and shows the progress and the summary for all of them.

What the ranks tell one another is small (shares, plans, counters, figures), so it goes over a gloo group and its
store even on GPUs: an NCCL communicator would take GPU memory out of each GPU's budget. Two channels, for two
kinds of moment:

  start-up (resolve, shares, plans)  the ranks arrive within seconds of one another: gloo collectives, under the
                                     group's timeout (`together`, `scatter`, `gather`)
  the stages                         ranks drift apart by as long as a stage takes, and one may die: counters,
                                     barriers and records go through the group's store (TCPStore), and every
                                     wait on it also watches for the team stopping, so that no rank waits on one
                                     that is gone (`exchange`, `collect`)

A thread per rank carries its progress counters to the store and watches for a stop; on rank 0 it also draws one
bar per stage, summed over the ranks, prints what the others report, and (when it started them) notices a worker
that died. No collective runs in a loop whose trip count could differ between ranks."""
from __future__ import annotations

import datetime
import pickle
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch.distributed as dist

from .errors import Interrupted, PixartError, RankFailed
from .reporting import Bar, Reporter

T = TypeVar("T")

# the bars summed over ranks, in the order the stages run
STAGE_UNITS = {"encode": "text", "vae-encode": "image", "denoise": "step", "decode": "image"}
POLL_SECONDS = 0.2  # how often the team thread flushes counters, looks for a stop and redraws rank 0's bars
# How often a rank waiting at a barrier or for the records looks again: the wait ends this long after the last
# rank arrives, at most (each look is one store request per rank, ~0.1 ms on one host)
WAIT_SECONDS = 0.05
# Once the team stops, how long rank 0 waits for the others' figures (each stops at its next safe point: after the
# text group, denoising batch or image at hand) before it writes run.json without them. Under torchrun the agent
# kills what is left 30 s after it asks the ranks to stop.
GRACE_SECONDS = 20.0
# The gloo group's timeout for the start-up collectives: rank 0 prepares the run folder while the others wait (a
# queue of 100,000 images takes seconds), and a rank that dies closes its connections, which ends a wait at once.
START_TIMEOUT = datetime.timedelta(minutes=30)
# A wait on the others ends when no rank has counted any progress for this long: one of them is taken for hung (a
# process that dies is noticed at once, by whatever started it). Long, because progress is counted per text
# group, denoising step and image, and a group of many texts through T5 on a CPU counts once, at its end.
STALL_SECONDS = 30 * 60
# Once the team stops, a rank whose team thread has not ticked for this long while rank 0 waits for its record is
# taken for gone (killed) instead of waited for GRACE_SECONDS: under torchrun nobody tells rank 0 that a rank died
# (torchrun asks the others to stop), and this names it. A rank at work ticks every POLL_SECONDS, on a thread of its
# own, whatever its stage computes.
SILENT_SECONDS = 8.0
_PREFIX = "pixart-lowvram/"


@dataclass(frozen=True)
class Member:
    """One rank, as the others know it."""

    rank: int
    device: str  # "cuda:1", "cpu"
    host: str


@dataclass(frozen=True)
class Failure:
    """Why a rank stopped, as the others learn it: its error's exit code and message."""

    rank: int
    code: int
    message: str
    stage: str | None = None


def devices(names: list[str]) -> str:
    """The ranks' devices, for a line: "cuda:0, cuda:1", or "8 x cpu" for a device several ranks share."""
    counts = {name: names.count(name) for name in names}
    return ", ".join(name if n == 1 else f"{n} x {name}" for name, n in counts.items())


class Team:
    """This process's place in a run of several: its rank, the others, and the ways to reach them. Use `join`."""

    def __init__(self, rank: int, size: int, store: dist.Store, members: list[Member],
                 exited: Callable[[], dict[int, int]] | None = None, marks: dict[str, float] | None = None):
        self.rank, self.size, self.store, self.members = rank, size, store, members
        self.marks = dict(marks or {})  # when this process reached each step of its start: event -> time.time()
        self._exited = exited  # rank 0, when it started the others: {rank: exit code} of those that ended
        self.local_size = sum(1 for m in members if m.host == members[rank].host)
        self.stopped_by: int | None = None  # the rank that stopped the team, once one has
        # rank -> exit code (None: it went silent), of those that ended without reporting
        self.dead: dict[int, int | None] = {}
        self.lost = False  # this rank lost the store (rank 0 or the launcher is gone)
        self._lost_why = ""
        self.stage: str | None = None  # the stage this rank is in
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}  # progress not yet added to the store's counters
        self._messages: list[str] = []  # this rank's messages not yet sent to rank 0
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._stop: threading.Event | None = None
        self._display: _Display | None = None

    # -- joining ---------------------------------------------------------------------------------------------
    @classmethod
    def join(cls, rank: int, size: int, store: dist.Store, device: str,
             exited: Callable[[], dict[int, int]] | None = None, marks: dict[str, float] | None = None) -> Team:
        """Join the gloo group of `size` ranks that meets at `store`; returns when every rank has joined. `marks`:
        the moments of this process's start so far (launch.py's), for the run's timeline."""
        try:
            dist.init_process_group("gloo", store=dist.PrefixStore("gloo/", store), rank=rank, world_size=size,
                                    timeout=START_TIMEOUT)
            members: list[Member | None] = [None] * size
            dist.all_gather_object(members, Member(rank, device, socket.gethostname()))
        except RuntimeError as exc:
            raise RankFailed(f"rank {rank}: could not join the other processes of the run ({exc})") from exc
        return cls(rank, size, dist.PrefixStore(_PREFIX, store), members, exited,
                   {**(marks or {}), "team joined": time.time()})

    def leave(self) -> None:
        self.quiet()
        if dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> Team:
        return self

    def __exit__(self, *exc) -> None:
        self.leave()

    def label(self, rank: int) -> str:
        m = self.members[rank]
        hosts = {x.host for x in self.members}
        return f"rank {rank} ({m.device}{'' if len(hosts) == 1 else ' on ' + m.host})"

    # -- start-up: collectives -------------------------------------------------------------------------------
    def gather(self, value: T) -> list[T]:
        """Every rank's `value`, on every rank."""
        out: list = [None] * self.size
        try:
            dist.all_gather_object(out, value)
        except RuntimeError as exc:
            raise RankFailed(f"{self.label(self.rank)}: lost the other processes ({exc})") from exc
        return out

    def together(self, work: Callable[[], T]) -> T:
        """`work()` on every rank; where it raised anywhere, it raises everywhere: the rank's own error where it has
        one, else a RankFailed naming the first rank that failed (what rank 0 tells the user)."""
        own = None
        try:
            result = work()
        except PixartError as exc:
            own, result = exc, None
        failures = [f for f in self.gather(None if own is None else self.failure(own)) if f is not None]
        if failures:
            raise own if own is not None else self.failed(failures[0])
        return result

    def scatter(self, make: Callable[[], list[T]]) -> T:
        """Rank 0 makes one payload per rank (`make`, run there only) and each rank gets its own; where `make`
        fails, every rank raises."""
        payloads, own = None, None
        if self.rank == 0:
            try:
                payloads = make()
            except PixartError as exc:
                own, payloads = exc, [self.failure(exc)] * self.size
        out: list = [None]
        try:
            dist.scatter_object_list(out, payloads, src=0)
        except RuntimeError as exc:
            raise RankFailed(f"{self.label(self.rank)}: lost the other processes ({exc})") from exc
        if isinstance(out[0], Failure):
            raise own if own is not None else self.failed(out[0])
        return out[0]

    # -- failures --------------------------------------------------------------------------------------------
    def failure(self, exc: PixartError) -> Failure:
        return Failure(self.rank, exc.exit_code, str(exc), self.stage)

    def failed(self, failure: Failure) -> RankFailed:
        """The error a rank raises for another rank's failure: its message, named, and its exit code."""
        return RankFailed(f"{self.label(failure.rank)}: {failure.message}", failure.code)

    def stop_all(self, exc: PixartError | None = None) -> None:
        """Ask every rank to stop at its next safe point: this one failed (`exc`: why; None: it died or was lost).
        The first rank to stop the team is the one the run's error names."""
        if exc is not None:
            self._set(f"failure/{self.rank}", self.failure(exc))
        self._call(self.store.compare_set, "stop", "", str(self.rank))

    def stopper(self) -> int | None:
        """The rank that stopped the team; None while nobody has."""
        if not self._call(self.store.check, ["stop"]):
            return None
        return int(self._call(self.store.get, "stop"))

    def cause(self) -> RankFailed | None:
        """The error that names why the team stopped (None if it did not): the failure the first rank to stop it
        reported, or that it died."""
        rank = self.stopper()
        if rank is None:
            return None
        key = f"failure/{rank}"
        if self._call(self.store.check, [key]):
            return self.failed(self._get(key))
        return self.ended(rank)

    def ended(self, rank: int) -> RankFailed:
        """The error for a rank that ended without saying why (killed, crashed, gone silent)."""
        code = self.dead.get(rank)
        stage = self._get(f"stage/{rank}") if self._call(self.store.check, [f"stage/{rank}"]) else None
        how = (f"killed by signal {-code}" if code is not None and code < 0 else
               f"exit code {code}" if code is not None else "it stopped answering")
        return RankFailed(f"{self.label(rank)} ended unexpectedly ({how})" + (f" during {stage}" if stage else "")
                          + "; the other processes stopped too. Finished work is kept: run the same command again "
                          "to resume")

    # -- the stages: the store -------------------------------------------------------------------------------
    def exchange(self, name: str, value: T, stop: threading.Event) -> list[T]:
        """Every rank's `value` once all have given theirs: a barrier for ranks that arrive far apart. Raises
        (RankFailed, Interrupted) where the team, or this rank, stops first."""
        self._set(f"{name}/{self.rank}", value)
        keys = [f"{name}/{r}" for r in range(self.size)]
        stall = _Stall(self)
        while not self._call(self.store.check, keys):
            self.check(stop)
            stall.check(lambda: [r for r, key in enumerate(keys) if not self._call(self.store.check, [key])])
            time.sleep(WAIT_SECONDS)
        return [self._get(key) for key in keys]

    def check(self, stop: threading.Event) -> None:
        """Raise where the team stopped for another rank (RankFailed) or this rank was asked to (Interrupted)."""
        if self.stopped_by is None:
            self.stopped_by = self.stopper()
        if self.stopped_by is not None and self.stopped_by != self.rank:
            raise RankFailed(f"{self.label(self.rank)}: stopped because {self.label(self.stopped_by)} did")
        if stop.is_set():
            raise Interrupted("stop requested")

    def post(self, record: object) -> None:
        """This rank's record of the run, for rank 0."""
        self._set(f"record/{self.rank}", record)

    def collect(self, own: object, stop: threading.Event) -> dict[int, object]:
        """Rank 0: every rank's record (`own` is rank 0's), waiting for ranks still at work. A rank that died is
        left out; once the team or this rank stops, so is any that has not answered within GRACE_SECONDS."""
        records = {0: own}
        deadline = None
        stall = _Stall(self)
        beats: dict[int, tuple[int, float]] = {}  # rank -> its team thread's ticks, and when they last moved
        while True:
            for r in range(1, self.size):
                if r not in records and self._call(self.store.check, [f"record/{r}"]):
                    records[r] = self._get(f"record/{r}")
            missing = [r for r in range(self.size) if r not in records and r not in self.dead]
            if not missing:
                return records
            if deadline is None and (stop.is_set() or self.stopper() is not None):
                deadline = time.monotonic() + GRACE_SECONDS
            if deadline is not None and time.monotonic() > deadline:
                return records
            if deadline is not None:
                for r in self._silent(missing, beats):
                    self.dead[r] = None
                    self._call(self.store.compare_set, "stop", "", str(r))
            try:
                stall.check(lambda: missing)
            except RankFailed as exc:
                self.stop_all(exc)
                deadline = time.monotonic()
            time.sleep(WAIT_SECONDS)

    def _silent(self, ranks: list[int], beats: dict[int, tuple[int, float]]) -> list[int]:
        """Those of `ranks` whose team thread has not ticked for SILENT_SECONDS of this rank's looking."""
        now, gone = time.monotonic(), []
        for r in ranks:
            ticks = self._call(self.store.add, f"alive/{r}", 0)
            if r not in beats or beats[r][0] != ticks:
                beats[r] = (ticks, now)
            elif now - beats[r][1] > SILENT_SECONDS:
                gone.append(r)
        return gone

    # -- the team thread: progress, messages, stops ------------------------------------------------------------
    def watch(self, stop: threading.Event) -> None:
        """Start this rank's team thread: it sets `stop` when the team stops."""
        self._stop = stop
        self._thread = threading.Thread(target=self._loop, name=f"team-rank{self.rank}", daemon=True)
        self._thread.start()

    def show(self, reporter: Reporter, totals: dict[str, int]) -> None:
        """Rank 0: draw one bar per stage through `reporter`, `totals[stage]` units summed over the ranks."""
        self._display = _Display(reporter, totals)

    def quiet(self) -> None:
        """Stop the team thread, after a last round (the bars drawn to the end, the last messages printed)."""
        if self._thread is not None:
            self._done.set()
            self._thread.join()
            self._thread = None
            if not self.lost:
                try:
                    self._tick()
                except (RuntimeError, OSError):
                    pass
        if self._display is not None:
            self._display.close()

    def enter(self, stage: str) -> None:
        """This rank begins `stage`: said at once, for the message should it die in it."""
        self.stage = stage
        self._set(f"stage/{self.rank}", stage)

    def count(self, stage: str, n: int) -> None:
        with self._lock:
            self._counts[stage] = self._counts.get(stage, 0) + n

    def tell(self, message: str) -> None:
        """A message for rank 0 to print, with this rank's name."""
        with self._lock:
            self._messages.append(f"{self.label(self.rank)}: {message}")

    def _loop(self) -> None:
        while not self._done.wait(POLL_SECONDS):
            try:
                self._tick()
            except (RuntimeError, OSError) as exc:  # the store is gone: rank 0, or the process that started us, ended
                self.lost = True
                self._lost_why = str(exc)
                if self._stop is not None:
                    self._stop.set()
                return

    def lost_contact(self) -> RankFailed:
        """What this rank says when the store went away under it (its stage stopped for that, or a call failed)."""
        return RankFailed(f"{self.label(self.rank)}: lost contact with the run's other processes ({self._lost_why}); "
                          "finished work is kept: run the same command again to resume")

    def _tick(self) -> None:
        with self._lock:
            counts, self._counts = self._counts, {}
            messages, self._messages = self._messages, []
        self.store.add(f"alive/{self.rank}", 1)
        for name, n in counts.items():
            self.store.add(f"progress/{name}", n)
        for message in messages:
            self._set(f"message/{self.store.add('messages', 1)}", message)
        if self._exited is not None:
            self._watch_workers()
        if self.stopped_by is None:
            self.stopped_by = self.stopper()
            if self.stopped_by is not None and self.stopped_by != self.rank and self._stop is not None:
                self._stop.set()
        if self._display is not None:
            self._display.draw(self)

    def _watch_workers(self) -> None:
        """Rank 0, when it started the others: a worker that ended with an error before reporting died (killed,
        crashed); it stops the team."""
        for rank, code in self._exited().items():
            if code != 0 and rank not in self.dead and not self.store.check([f"record/{rank}"]):
                self.dead[rank] = code
                self.store.compare_set("stop", "", str(rank))

    # -- the store, pickled ----------------------------------------------------------------------------------
    def _set(self, key: str, value: object) -> None:
        self._call(self.store.set, key, pickle.dumps(value))

    def _get(self, key: str) -> object:
        return pickle.loads(self._call(self.store.get, key))

    def _call(self, op, *args):
        try:
            return op(*args)
        except RuntimeError as exc:  # DistStoreError and the like: the store's process is gone
            self.lost = True
            self._lost_why = str(exc)
            raise self.lost_contact() from exc


class _Stall:
    """Watches a wait: raises RankFailed, naming the ranks waited for, once no rank has counted progress for
    STALL_SECONDS. Looks at the counters every POLL_SECONDS, however often it is asked."""

    def __init__(self, team: Team):
        self.team = team
        self.seen = self.counts()
        self.since = self.looked = time.monotonic()

    def counts(self) -> list[int]:
        return [self.team._call(self.team.store.add, f"progress/{stage}", 0) for stage in STAGE_UNITS]

    def check(self, waiting_for: Callable[[], list[int]]) -> None:
        """`waiting_for()`: the ranks waited for, asked only when the wait ends."""
        if time.monotonic() - self.looked < POLL_SECONDS:
            return
        self.looked = time.monotonic()
        now = self.counts()
        if now != self.seen:
            self.seen, self.since = now, time.monotonic()
        elif time.monotonic() - self.since > STALL_SECONDS:
            names = ", ".join(self.team.label(r) for r in waiting_for())
            raise RankFailed(f"{names}: no progress for {STALL_SECONDS // 60} minutes, taken for hung; the run "
                             "stopped. Finished work is kept: run the same command again to resume")


class _Display:
    """Rank 0's bars, one per stage, summed over the ranks from the store's counters; and the others' messages."""

    def __init__(self, reporter: Reporter, totals: dict[str, int]):
        self.reporter, self.totals = reporter, totals
        self.shown: dict[str, int] = {}
        self.bars: dict[str, Bar] = {}
        self.messages = 0

    def draw(self, team: Team) -> None:
        for stage, total in self.totals.items():
            done = team.store.add(f"progress/{stage}", 0)
            if done > self.shown.get(stage, 0):
                if stage not in self.bars:
                    self.bars[stage] = self.reporter.bar(stage, total=total, unit=STAGE_UNITS[stage])
                self.bars[stage].update(done - self.shown.get(stage, 0))
                self.shown[stage] = done
                if done >= total:
                    self.bars.pop(stage).close()
        sent = team.store.add("messages", 0)
        while self.messages < sent and team.store.check([f"message/{self.messages + 1}"]):
            self.messages += 1
            self.reporter.info(pickle.loads(team.store.get(f"message/{self.messages}")))

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars = {}


class TeamReporter(Reporter):
    """A rank's reporter: the stages' progress is counted into the store (rank 0 draws the sums), and messages go
    to rank 0, which prints them (its own straight through `reporter`). Loading bars are not drawn: there would be
    one per rank."""

    def __init__(self, team: Team, reporter: Reporter):
        self.team, self.reporter = team, reporter

    def bar(self, desc: str, total: int | None, unit: str = "it", transient: bool = False) -> Bar:
        if desc not in STAGE_UNITS:
            return Bar()
        self.team.enter(desc)
        return _CountingBar(self.team, desc)

    def info(self, message: str) -> None:
        if self.team.rank == 0:
            self.reporter.info(message)
        else:
            self.team.tell(message)


class _CountingBar(Bar):
    def __init__(self, team: Team, stage: str):
        self.team, self.stage = team, stage

    def update(self, n: int = 1) -> None:
        self.team.count(self.stage, n)
