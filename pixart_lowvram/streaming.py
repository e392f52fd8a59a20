"""Streamed weights: the mechanism under the planner's "streamed" placements.

T5 (encode) streams through a focused streamer, not diffusers' group offloading, for three reasons measured in
BENCHMARKS.md: group offloading pins a host copy of every weight (25 GiB of RAM for the pipeline,
11 GiB for T5 alone), moves two blocks at a time (two 0.45 GiB T5 blocks plus the CUDA context exceed a
1.5 GiB budget), and runs the whole model per call. Here each block's bytes are read straight from the
safetensors files into a small ring of pinned buffers (no copy of the model in RAM), copied to the GPU on a side
stream while the previous block computes, and every text of the queue passes through a block before the next
block is needed: T5's weights cross the bus once per queue. Blocks run the texts in micro-batches of the size
the reference uses (one), so the embeddings are bit-identical to an unstreamed run.

The DiT (denoise), needed at every step, streams through the same streamer, its blocks read from the files once
into pinned buffers that stay in RAM (or, where RAM is short, from the files at every step).

This is the mechanism only: the loaders that build T5 and the DiT around it (load_text_encoder_streamed,
load_transformer_streamed) and the reader of the files' headers are with the other loaders, in models.py.
"""
from __future__ import annotations

import contextlib
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

_ALIGN = 64  # each tensor's place in a pinned slot starts on this boundary, so any dtype can view it

class MicroBatched(nn.Module):
    """Runs the wrapped block on slices of the batch, so each matrix product has the shape it has for one
    micro-batch: the outputs equal separate runs bit for bit, while the block's weights serve the whole batch.
    Tensors whose first dimension is the batch are sliced; the block's other outputs (T5's position bias) are
    taken from the first slice when all slices agree, and concatenated otherwise."""

    def __init__(self, block: nn.Module, size: int = 1):
        super().__init__()
        self.block = block
        self.size = size

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        batch = hidden_states.shape[0]
        if batch <= self.size:
            return self.block(hidden_states, *args, **kwargs)

        def part(x, s):
            return x[s] if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == batch else x

        outs = []
        for start in range(0, batch, self.size):
            s = slice(start, start + self.size)
            outs.append(self.block(hidden_states[s], *(part(a, s) for a in args),
                                   **{k: part(v, s) for k, v in kwargs.items()}))
        if torch.is_tensor(outs[0]):
            return torch.cat(outs)
        merged = [torch.cat([o[0] for o in outs])]
        for i in range(1, len(outs[0])):
            values = [o[i] for o in outs]
            if not torch.is_tensor(values[0]) or all(v is values[0] or torch.equal(v, values[0]) for v in values):
                merged.append(values[0])
            else:
                merged.append(torch.cat(values))
        return type(outs[0])(merged)


def micro_batch_blocks(blocks: nn.ModuleList, size: int) -> list[MicroBatched]:
    """Wrap each block of `blocks` in place; returns the wrappers (the streaming units)."""
    wrappers = []
    for i, block in enumerate(blocks):
        wrapper = block if isinstance(block, MicroBatched) else MicroBatched(block, size)
        wrapper.size = size
        blocks[i] = wrapper
        wrappers.append(wrapper)
    return wrappers


class CpuEmbedding(nn.Module):
    """A token-embedding table kept in host memory: a lookup needs only the rows of the prompt's tokens, so the
    table (0.25 GiB for T5-XXL) never takes room on the GPU."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids.to("cpu")].to(ids.device, non_blocking=True)


# -- reading tensors straight from safetensors files --------------------------------------------------------------

@dataclass(frozen=True)
class Stored:
    """Where one tensor lies in a safetensors file (models.index_safetensors reads them from the headers)."""

    path: Path
    start: int  # absolute byte offset
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Computed:
    """A tensor made on the CPU when it is first needed rather than read as stored: a weight with a LoRA merged in
    (lora.py). `make` returns it in `dtype`. Only held units (read once) can be made of these."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    def numel(self) -> int:
        return math.prod(self.shape)


# page cache -> pinned memory on the H100 machines: 5.5 GB/s with one thread, 15.4 with 4, 22.6 with 8
# (bench/stream_profile.py); with 4 the encode stage still waited 0.5 s on reads (bench/profile.sh)
READ_THREADS = min(8, os.cpu_count() or 1)


def read_into(stored: Stored, out: torch.Tensor, lo: int = 0, hi: int | None = None) -> None:
    """Fill bytes lo..hi (default: all) of a CPU uint8 tensor (pinned or not) holding a tensor's bytes, with plain
    reads: the page cache serves them and nothing is mapped into this process, so host RSS does not grow by the
    model's size. os.preadv lets go of the GIL: the streamer reads pieces of a block on several threads at once."""
    hi = stored.nbytes if hi is None else hi
    view = memoryview(out.numpy()).cast("B")
    with open(stored.path, "rb", buffering=0) as f:
        done = lo
        while done < hi:
            n = os.preadv(f.fileno(), [view[done:hi]], stored.start + done)
            if n <= 0:
                raise OSError(f"{stored.path}: unexpected end of file")
            done += n


# Reads are split into pieces of at most this size, so that all the threads share a block's reads evenly: a T5
# block is four 32 MB and three 80 MB tensors, read one tensor a thread it waited on the last big ones
READ_PIECE = 16 * 2**20


def read_pieces(pool: ThreadPoolExecutor, stored: Stored, out: torch.Tensor) -> list[Future]:
    """Read a stored tensor's bytes into the CPU uint8 tensor `out` on `pool`'s threads, piece by piece."""
    return [pool.submit(read_into, stored, out, lo, min(lo + READ_PIECE, stored.nbytes))
            for lo in range(0, stored.nbytes, READ_PIECE)]


def load_tensor(stored: Stored | Computed, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(stored, Computed):
        return stored.make().to(device=device, dtype=dtype)
    raw = torch.empty(stored.nbytes, dtype=torch.uint8)
    read_into(stored, raw)
    return raw.view(stored.dtype).reshape(stored.shape).to(device=device, dtype=dtype)


# Pieces in flight when many tensors go to a device at once (load_tensors): two a reading thread, so each thread
# has its next piece while the one it read crosses the bus
LOAD_SLOTS = 2 * READ_THREADS


def _read_piece(stored: Stored, slot: torch.Tensor, lo: int, hi: int) -> None:
    """Bytes lo..hi of a stored tensor into the start of `slot`."""
    read_into(Stored(stored.path, stored.start + lo, hi - lo, stored.dtype, (hi - lo,)), slot)


def load_tensors(sources: list[Stored | Computed], dtypes: list[torch.dtype], device: torch.device
                 ) -> list[torch.Tensor]:
    """Every tensor of `sources` on `device` in its dtype of `dtypes`, for a model loaded whole onto a GPU: their
    bytes are read in pieces of READ_PIECE on READ_THREADS threads into a ring of LOAD_SLOTS pinned buffers, and
    each piece is copied to the device as soon as it is read; a tensor stored in another dtype is converted there
    once its bytes are in, so the device holds one tensor's stored bytes beyond the converted ones. Copies and
    conversions go on the current stream, in order: nothing else runs while a model loads. On the H200, T5-XXL
    reached the GPU in 0.61 s this way against 1.9 s through `from_pretrained(device_map=...)`
    (bench/t5_load.py). Without a GPU the same ring fills ordinary tensors (tests run this path on the CPU)."""
    cuda = device.type == "cuda"
    out: list[torch.Tensor | None] = [None] * len(sources)
    pieces: list[tuple[int, int, int]] = []
    for k, (src, dtype) in enumerate(zip(sources, dtypes)):
        if isinstance(src, Computed):
            out[k] = src.make().to(device=device, dtype=dtype)
        elif src.nbytes == 0:
            out[k] = torch.empty(src.shape, dtype=dtype, device=device)
        else:
            pieces += [(k, lo, min(lo + READ_PIECE, src.nbytes)) for lo in range(0, src.nbytes, READ_PIECE)]
    ring = min(LOAD_SLOTS, len(pieces))
    slots = [torch.empty(READ_PIECE, dtype=torch.uint8, pin_memory=cuda) for _ in range(ring)]
    copied: list[torch.cuda.Event | None] = [None] * ring
    stream = torch.cuda.current_stream(device) if cuda else None  # where copies to `device` go
    raw: torch.Tensor | None = None  # the bytes of the tensor whose pieces are coming in
    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="weights-load") as pool:
        def start(n: int) -> Future:
            s = n % ring
            if copied[s] is not None:
                copied[s].synchronize()  # the piece this slot held before is on the device
            k, lo, hi = pieces[n]
            return pool.submit(_read_piece, sources[k], slots[s], lo, hi)

        try:
            reading = {n: start(n) for n in range(ring)}
            for n, (k, lo, hi) in enumerate(pieces):
                reading.pop(n).result()
                s, src = n % ring, sources[k]
                if lo == 0:
                    raw = torch.empty(src.nbytes, dtype=torch.uint8, device=device)
                raw[lo:hi].copy_(slots[s][:hi - lo], non_blocking=cuda)
                if cuda:
                    copied[s] = torch.cuda.Event()
                    copied[s].record(stream)
                if hi == src.nbytes:  # a view of the bytes where the dtypes agree, else a converted copy
                    out[k], raw = raw.view(src.dtype).reshape(src.shape).to(dtypes[k]), None
                if n + ring < len(pieces):
                    reading[n + ring] = start(n + ring)
        finally:
            if cuda:  # no copy may still be reading a slot when the slots go (after a failed read too)
                stream.synchronize()
    return out


# -- the block streamer ------------------------------------------------------------------------------------------

class BlockStreamer:
    """Moves blocks' weights to `device` in turn, from the safetensors files through a ring of pinned buffers, or
    (`hold`) from pinned buffers read once and kept in RAM, for blocks needed again and again (the DiT, at every
    step).

    Hooks on each unit: before it runs, its weights are on the device (copied on a side stream, waited for with
    an event: no device-wide synchronisation); after it ran, they are dropped. `ahead` more units are copied
    while one computes; host reads run further ahead on a thread, into a ring of `ahead + 2` pinned buffers."""

    def __init__(self, units: list[nn.Module],
                 params: list[dict[str, tuple[tuple[nn.Module, str], Stored | Computed, torch.dtype]]],
                 device: torch.device, ahead: int = 1, cyclic: bool = False, hold: bool = False):
        if not hold and any(isinstance(src, Computed) for p in params for _, src, _ in p.values()):
            raise ValueError("computed tensors stream only from units held in RAM")
        self.units, self.params, self.device, self.ahead = units, params, device, ahead
        # cyclic: the units run again and again (the DiT, at every step): the last one prefetches the first ones
        self.cyclic = cyclic
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None
        # hold: every unit's weights stay in RAM, one pinned buffer each, read once; else they are read from the
        # files at each use into a ring of pinned buffers
        sizes = [] if hold else [sum(_aligned(s.nbytes) for _, s, _ in p.values()) for p in params]
        slots = ahead + 2 if max(sizes, default=0) else 0
        self.slots = [torch.empty(max(sizes), dtype=torch.uint8, pin_memory=self.cuda) for _ in range(slots)]
        self.slot_free: list[torch.cuda.Event | None] = [None] * len(self.slots)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights-read")  # one block after another
        self.io = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="weights-io")
        self.reads: dict[int, Future] = {}
        self.ready: dict[int, torch.cuda.Event | None] = {}
        self.on_device: dict[int, list[torch.Tensor]] = {}
        self.handles = []
        for i, unit in enumerate(units):
            self.handles.append(unit.register_forward_pre_hook(lambda m, a, i=i: self._before(i)))
            self.handles.append(unit.register_forward_hook(lambda m, a, o, i=i: self._after(i)))
        self.bytes_moved = 0
        self.on_close: list[Callable[[], None]] = []  # run when it closes (a scratch file of merged weights)
        # what stands in for a unit's weights while it is not on the device (made once: a run swaps them
        # ~50,000 times, and making them anew cost ~0.3 s of the main thread's time a run)
        self.meta = [[nn.Parameter(torch.empty(src.shape, dtype=dtype, device="meta"), requires_grad=False)
                      for _, src, dtype in p.values()] for p in params]
        for i in range(len(units)):
            self._unplace(i)
        self.flat = self._pack([i for i, p in enumerate(params) if p] if hold else [])
        # held units on the device: buffers, the free ones, which unit is in which, the units' parameter views
        self.buffers: list[torch.Tensor] = []
        self.free_buffers: list[int] = []
        self.buffer_of: dict[int, int] = {}
        self.views: dict[tuple[int, int], list[nn.Parameter]] = {}
        self._schedule_read(0)  # the first block's bytes while the rest of the model is set up

    def _pack(self, units: list[int]) -> dict[int, tuple[torch.Tensor, list[tuple[int, int, torch.dtype, tuple]]]]:
        """Units held in RAM, one pinned buffer each (one allocation and one copy per unit on the way in), in the
        dtype they compute in; from the files, their tensors are read on the I/O threads, all side by side."""
        flat, pending = {}, []
        for i in units:
            layout, total = [], 0
            for _, src, dtype in self.params[i].values():
                nbytes = src.numel() * dtype.itemsize
                layout.append((total, nbytes, dtype, tuple(src.shape)))
                total += _aligned(nbytes)
            buffer = torch.empty(total, dtype=torch.uint8, pin_memory=self.cuda)
            for (offset, nbytes, dtype, shape), (_, src, _) in zip(layout, self.params[i].values()):
                out = buffer[offset:offset + nbytes]
                if isinstance(src, Stored) and src.dtype == dtype:  # straight from the file
                    pending += read_pieces(self.io, src, out)
                else:  # converted on the way, as from_pretrained converts (or made: a LoRA merged in)
                    pending.append(self.io.submit(_convert_into, out, dtype, shape, src))
            flat[i] = (buffer, layout)
        for job in pending:
            job.result()
        return flat

    # host side
    def _read(self, i: int) -> int:
        slot = i % len(self.slots)
        if self.slot_free[slot] is not None:
            self.slot_free[slot].synchronize()  # its previous copy to the GPU is done
        offset = 0
        pieces = []
        for _, stored, _ in self.params[i].values():  # the block's tensors, read side by side
            pieces += read_pieces(self.io, stored, self.slots[slot][offset:offset + stored.nbytes])
            offset += _aligned(stored.nbytes)
        for piece in pieces:
            piece.result()
        return slot

    def _schedule_read(self, i: int) -> None:
        if not self.slots:
            return
        if 0 <= i < len(self.units) and i not in self.reads and i not in self.on_device:
            self.reads[i] = self.pool.submit(self._read, i)

    # device side
    def _copy_flat(self, i: int) -> None:
        """A held unit to the device, into one of `ahead + 1` device buffers made once and reused in turn, its
        weights as parameters viewing that buffer, made the first time the unit lands in it: a DiT run moves
        ~3,000 units, and making ~20 tensor views and parameters anew each time kept the main thread ~0.5 s
        longer than the GPU's work (bench/profile.sh, 1.5 GiB)."""
        host, layout = self.flat[i]
        slot = self.free_buffers.pop(0) if self.free_buffers else self._new_buffer()
        gpu = self.buffers[slot]
        main = torch.cuda.current_stream(self.device) if self.cuda else None
        event = None
        if self.cuda:
            self.side.wait_stream(main)  # the unit that used this buffer before has been computed
            with torch.cuda.stream(self.side):
                gpu[:host.numel()].copy_(host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.side)
        else:
            gpu[:host.numel()].copy_(host)
        self.bytes_moved += host.numel()
        self.ready[i] = event
        if (i, slot) not in self.views:
            with torch.inference_mode(False):  # see _new_buffer
                self.views[(i, slot)] = [nn.Parameter(gpu[o:o + n].view(dtype).view(shape), requires_grad=False)
                                         for o, n, dtype, shape in layout]
        self.on_device[i] = self.views[(i, slot)]
        self.buffer_of[i] = slot

    def _new_buffer(self) -> int:
        size = max(host.numel() for host, _ in self.flat.values())
        # Ordinary tensors, like the resident blocks' parameters, though made inside the pipeline's inference mode: a
        # compiled block's graph is guarded on its parameters' dispatch keys, and inference tensors would need a
        # second graph (compiling.py)
        with torch.inference_mode(False):
            self.buffers.append(torch.empty(size, dtype=torch.uint8, device=self.device))  # on the compute stream
        return len(self.buffers) - 1

    def _copy(self, i: int) -> None:
        if i >= len(self.units) or i in self.on_device:
            return
        if i in self.flat:
            return self._copy_flat(i)
        if not self.params[i]:  # nothing to move
            self.ready[i], self.on_device[i] = None, []
            return
        self._schedule_read(i)
        slot = self.reads.pop(i).result()
        main = torch.cuda.current_stream(self.device) if self.cuda else None
        # Allocated on the compute stream, so a block's memory is reused by the next in stream order (one block
        # at a time really is one block); the copy stream first waits for the work queued before it.
        with torch.inference_mode(False):  # see _new_buffer
            tensors = [torch.empty(src.shape, dtype=dtype, device=self.device)
                       for _, src, dtype in self.params[i].values()]
        if self.cuda:
            self.side.wait_stream(main)
        offset = 0
        with torch.cuda.stream(self.side) if self.cuda else contextlib.nullcontext():
            for gpu, (_, src, _) in zip(tensors, self.params[i].values()):
                raw = self.slots[slot][offset:offset + src.nbytes]
                offset += _aligned(src.nbytes)
                gpu.copy_(raw.view(src.dtype).reshape(src.shape), non_blocking=self.cuda)
                self.bytes_moved += src.nbytes
            event = torch.cuda.Event() if self.cuda else None
            if event is not None:
                event.record(self.side)
        self.slot_free[slot] = event
        self.ready[i] = event
        self.on_device[i] = tensors

    def _next(self, j: int) -> int:
        return j % len(self.units) if self.cyclic else j

    def _before(self, i: int) -> None:
        self._copy(i)
        for j in range(i + 1, i + 1 + self.ahead):
            self._copy(self._next(j))
        for j in range(i + 1 + self.ahead, i + 1 + self.ahead + 2):
            self._schedule_read(self._next(j))
        event = self.ready.pop(i, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        for (owner, _, _), tensor in zip(self.params[i].values(), self.on_device[i]):
            set_parameter(owner, tensor)

    def _unplace(self, i: int) -> None:
        for (module, leaf), placeholder in zip((owner for owner, _, _ in self.params[i].values()), self.meta[i]):
            module._parameters[leaf] = placeholder

    def _after(self, i: int) -> None:
        self._unplace(i)
        del self.on_device[i]
        if i in self.buffer_of:
            self.free_buffers.append(self.buffer_of.pop(i))
        if i == len(self.units) - 1 and not self.cyclic:
            self.ready.clear()

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        if self.cuda:
            self.side.synchronize()  # copies still in flight (the next step's prefetch) before their memory goes
        self.pool.shutdown(wait=True)
        self.io.shutdown(wait=True)
        self.slots.clear()
        self.flat.clear()
        self.on_device.clear()
        self.views.clear()
        self.buffers.clear()
        while self.on_close:
            self.on_close.pop()()


def set_parameter(owner: tuple[nn.Module, str], tensor: torch.Tensor) -> None:
    """Put `tensor` in place of a parameter (a meta placeholder cannot take another device's data in place)."""
    module, leaf = owner
    module._parameters[leaf] = tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor, requires_grad=False)


def _convert_into(out: torch.Tensor, dtype: torch.dtype, shape: tuple, src: Stored | Computed) -> None:
    """Put a stored tensor's values, converted to `dtype`, into the uint8 buffer `out`."""
    out.view(dtype).view(shape).copy_(load_tensor(src, src.dtype, torch.device("cpu")))


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN
