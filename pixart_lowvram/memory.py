"""Measuring a stage (wall time, peak GPU memory as torch and as NVML see it, peak host RSS) and releasing it.

torch's `max_memory_allocated` counts only tensors; what decides whether a run fits on a user's card is the
whole process as the driver sees it (CUDA context, allocator cache, cuBLAS workspaces). NVML reports that, so
a small thread samples it, together with the host's resident memory, while a stage runs.
"""
from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from dataclasses import asdict, dataclass

import torch

from .placement import HOST_MARGIN, format_size, parse_size

GiB = 1024**3
# NVML sees the allocator's reserved memory, which only grows within a stage (it is returned at the release that
# ends it), so slow sampling misses nothing that lasts; a fast sampler competes with the stage for the GIL (every
# 5 ms: the streamed DiT ran 33% slower, bench/stream_profile.py).
_SAMPLE_SECONDS = 0.05


@dataclass
class StageStats:
    """What one stage cost. Memory in bytes; None where it could not be measured (no GPU, no NVML)."""

    name: str
    seconds: float = 0.0
    load_seconds: float | None = None  # of `seconds`, the part spent loading the component (its first load)
    loads: int = 0  # times the component was loaded: the DiT once per LoRA set
    compile_seconds: float | None = None  # of `seconds`, the part spent in torch.compile (None: not compiled)
    items: int = 0
    torch_peak: int | None = None  # torch.cuda.max_memory_allocated during the stage
    torch_reserved_peak: int | None = None  # torch.cuda.max_memory_reserved: the caching allocator's pool
    nvml_peak: int | None = None  # the whole process on the GPU, CUDA context included
    rss_peak: int | None = None  # host resident memory of the process
    # of it, memory the kernel cannot drop (anonymous and shared: the heap, pinned buffers): what the host budget
    # counts. The rest of RSS is file pages (the weights as loading maps them, spilled strips), reclaimable.
    ram_peak: int | None = None
    skipped: bool = False  # nothing was pending, the component never loaded
    vram_budget: int | None = None  # the budgets the stage ran under (bytes, whole process), for `over_budget`
    host_budget: int | None = None

    def over_budget(self) -> list[str]:
        """What went over its budget, in words ("GPU 1.56 GiB over the 1.50 GiB budget"); empty if nothing did."""
        out = []
        if self.vram_budget is not None and self.nvml_peak is not None and self.nvml_peak > self.vram_budget:
            out.append(f"GPU {format_size(self.nvml_peak)} (NVML) over the {format_size(self.vram_budget)} budget")
        if self.host_budget is not None and self.ram_peak is not None and self.ram_peak > self.host_budget:
            out.append(f"host RAM {format_size(self.ram_peak)} over the {format_size(self.host_budget)} budget")
        return out

    def to_json(self) -> dict:
        return {**asdict(self), "over_budget": self.over_budget()}


def available_ram() -> int | None:
    """What the machine can still give this process without swapping (MemAvailable), in bytes; None if unknown."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_rss() -> tuple[int | None, int | None]:
    """The process's resident memory, and the part of it the kernel cannot drop (RssAnon + RssShmem)."""
    rss = ram = None
    try:
        with open("/proc/self/status", "rb") as f:
            fields = {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(b":") for line in f)
                      if k in (b"VmRSS", b"RssAnon", b"RssShmem")}
        rss = fields.get(b"VmRSS")
        if b"RssAnon" in fields:
            ram = fields[b"RssAnon"] + fields.get(b"RssShmem", 0)
    except (OSError, ValueError, IndexError):
        pass
    return rss, ram


def process_start() -> float | None:
    """When this process started, in time.time()'s seconds (to the kernel's clock tick, 10 ms); None where the
    system does not say (no /proc). The kernel counts a process's start from boot: its age is the boot clock now
    less that."""
    try:
        with open("/proc/self/stat", "rb") as f:
            # the command name, field 2, is in parentheses and may hold spaces: count the fields after it
            ticks = int(f.read().rpartition(b")")[2].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.time() - age


def current_ram() -> int | None:
    """What this process holds in RAM now that the kernel cannot drop (as the host budget counts it)."""
    return _read_rss()[1]


def resolve_host_budget(value: str | int | None) -> int | None:
    """--host-budget as bytes of the whole process's RAM: a size as given; "auto" (or None): what this process
    holds now plus what the machine can still give it (MemAvailable), less `placement.HOST_MARGIN`; None where the
    machine does not say (no /proc)."""
    if isinstance(value, str):
        value = parse_size(value, option="--host-budget")
    if isinstance(value, int):
        return value
    free, held = available_ram(), current_ram()
    if free is None:
        return None
    return max(0, (held or 0) + free - HOST_MARGIN)


class _Nvml:
    """The process's own GPU memory through NVML (optional dependency `nvidia-ml-py`)."""

    def __init__(self, device: torch.device):
        import pynvml  # noqa: PLC0415 - optional

        pynvml.nvmlInit()
        self._nvml = pynvml
        index = device.index if device.index is not None else torch.cuda.current_device()
        # NVML numbers GPUs physically; CUDA_VISIBLE_DEVICES may renumber them, the UUID does not lie.
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        try:
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except Exception:  # noqa: BLE001 - older torch without uuid, or a MIG slice: fall back to the index
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self._pid = os.getpid()

    def process_bytes(self) -> int | None:
        """GPU memory held by this process; None if NVML cannot attribute it (e.g. inside some containers)."""
        try:
            procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except self._nvml.NVMLError:
            return None
        for p in procs:
            if p.pid == self._pid and p.usedGpuMemory is not None:
                return int(p.usedGpuMemory)
        return None

    def device_used_bytes(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)


def open_nvml(device: torch.device) -> _Nvml | None:
    if device.type != "cuda":
        return None
    try:
        return _Nvml(device)
    except Exception:  # noqa: BLE001 - no NVML library, no driver access: measure without it
        return None


class GpuMemoryProbe:
    """Reads the process's GPU footprint as the driver sees it.

    NVML's per-process figure is used when the driver attributes memory to our pid; some containers hide pids,
    and then the device's used memory minus what was used before we started is the closest honest figure.
    """

    def __init__(self, device: torch.device):
        self._nvml = open_nvml(device)
        self.source = None
        self._baseline = 0
        if self._nvml is not None:
            if self._nvml.process_bytes() is not None:
                self.source = "nvml-process"
            else:
                self.source = "nvml-device"
                self._baseline = self._nvml.device_used_bytes()

    def read(self) -> int | None:
        if self._nvml is None:
            return None
        if self.source == "nvml-device":
            return max(0, self._nvml.device_used_bytes() - self._baseline)
        value = self._nvml.process_bytes()
        if value is None and self.source == "nvml-process":
            return 0  # no context yet: the process does not hold the GPU
        return value


class StageMeter:
    """Context manager measuring one stage. Use `.stats` after the block."""

    def __init__(self, name: str, device: torch.device, probe: GpuMemoryProbe | None = None, *,
                 vram_budget: int | None = None, host_budget: int | None = None):
        self.stats = StageStats(name=name, vram_budget=vram_budget, host_budget=host_budget)
        self._device = device
        self._probe = probe
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml_peak: int | None = None
        self._rss_peak: int | None = None
        self._ram_peak: int | None = None
        self.components: list[weakref.ref] | None = None  # what the stage loaded (see `loaded`)

    def _sample(self) -> None:
        gpu = self._probe.read() if self._probe is not None else None
        if gpu is not None:
            self._nvml_peak = gpu if self._nvml_peak is None else max(self._nvml_peak, gpu)
        rss, ram = _read_rss()
        if rss is not None:
            self._rss_peak = rss if self._rss_peak is None else max(self._rss_peak, rss)
        if ram is not None:
            self._ram_peak = ram if self._ram_peak is None else max(self._ram_peak, ram)

    def _loop(self) -> None:
        while not self._stop.wait(_SAMPLE_SECONDS):
            self._sample()

    def __enter__(self) -> StageMeter:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            torch.cuda.reset_peak_memory_stats(self._device)
        self._sample()
        self._thread = threading.Thread(target=self._loop, name=f"meter-{self.stats.name}", daemon=True)
        self._thread.start()
        self._start = time.perf_counter()
        return self

    def loaded(self, *components) -> None:
        """Mark the end of a load: after the first, the rest of the stage is work (a stage that loads its component
        again, the DiT for another LoRA set, calls this each time). `components`: what the stage loaded, watched
        (weakly) so that `release` can tell whether they are gone."""
        self.components = [weakref.ref(c) for c in components]
        self.stats.loads += 1
        if self.stats.load_seconds is None:
            if self._device.type == "cuda":
                torch.cuda.synchronize(self._device)
            self.stats.load_seconds = time.perf_counter() - self._start

    def __exit__(self, *exc) -> None:
        if self._device.type == "cuda":
            try:
                torch.cuda.synchronize(self._device)
            except RuntimeError:
                pass  # the device may be in an error state after an OOM; the peaks below are still readable
        self.stats.seconds = time.perf_counter() - self._start
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if self._device.type == "cuda":
            self.stats.torch_peak = int(torch.cuda.max_memory_allocated(self._device))
            self.stats.torch_reserved_peak = int(torch.cuda.max_memory_reserved(self._device))
        self.stats.nvml_peak = self._nvml_peak
        self.stats.rss_peak = self._rss_peak
        self.stats.ram_peak = self._ram_peak


def release(device: torch.device, components: list[weakref.ref] | None = None) -> None:
    """Return what a stage held: Python's garbage, then the CUDA cache.

    A stage's component dies with its last reference. Python's cycle collector runs only where one of the watched
    `components` is still alive (held in a reference cycle), or where none was watched: once torch, diffusers
    and transformers are imported, a full pass takes 0.3 to 0.5 s on the GPU machines (1.35 s of a run's three
    stages, bench/profile.sh)."""
    if components is None or any(ref() is not None for ref in components):
        gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        # Pinned host blocks freed by the stage (T5's ring, the DiT's buffers, the strips' rows) stay cached by
        # torch's host allocator until this: each stage's host budget assumes the last one's RAM is back.
        empty_host = getattr(torch._C, "_host_emptyCache", None)
        if empty_host is not None:
            empty_host()

