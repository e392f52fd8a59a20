"""Regional compilation of the DiT: its repeated transformer blocks compiled with torch.compile, one compiled graph
shared by every block, resident or streamed, with inductor's caches kept in our cache folder so that a machine
compiles once.

Only the block's `forward` is compiled, not the module's call: the streamer's hooks (streaming.py) run around it
eagerly, as without compilation. With torch's default `inline_inbuilt_nn_modules`, the block's parameters are
inputs of the graph, not constants in it, so swapping a streamed block's weights in and out changes nothing it is
guarded on: every block of a step, and every step, reuses the graph (tests/test_compiling.py counts it). A new
image size or batch compiles once more (static shapes give the best kernels): the denoise stage compiles the shapes
that make enough calls to repay it (`shapes_to_compile`) and runs the others eager (`CompiledBlocks.eager`), which
also keeps a queue of many sizes under torch's limit of shapes per function."""
from __future__ import annotations

import functools
import os
import time
import weakref
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .files import cache_dir

COMPILE_MODES = ("auto", "on", "off")
# `auto` compiles, on a GPU, each call shape (image size and batch) of the denoise stage that makes at least this
# many transformer calls (one a step and batch). On an H200 a compiled run with a warm cache spent 2.3 s in its
# first call and ~2.5 s more that no call shows (8 images at 1024x1024: the denoise stage took 4.8 s longer than
# eager, bench/compile_precision.py), against ~3.7 ms saved an image-step (bench/step_time.py): ~1,300 image-steps,
# 650 calls of 2 images, to break even.
AUTO_MIN_CALLS = 650


def compile_cache() -> str:
    """Where inductor keeps what it compiled: the user's TORCHINDUCTOR_CACHE_DIR if set, else our cache folder
    (inductor's own default lies in /tmp, which a reboot empties)."""
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(cache_dir() / "torch-compile")


def shape_limit() -> int:
    """How many input shapes torch compiles one function for: past it, dynamo prints a warning and runs eager."""
    config = torch._dynamo.config
    return int(getattr(config, "recompile_limit", None) or getattr(config, "cache_size_limit", 8))


def shapes_to_compile(mode: str, device: torch.device, calls: Mapping[Hashable, int]) -> set:
    """The call shapes the denoise stage compiles: `mode` is the --compile option, `calls` how many transformer
    calls the stage makes in each shape (denoise.calls_by_shape). `on`: every shape; `auto`: on a GPU, those with
    AUTO_MIN_CALLS calls or more (on the CPU none: compiling there takes longer than most runs). At most
    shape_limit() of them, those with the most calls first; the others run eager."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return set()
    ordered = sorted(calls, key=lambda shape: (-calls[shape], repr(shape)))
    return set([s for s in ordered if mode == "on" or calls[s] >= AUTO_MIN_CALLS][:shape_limit()])


@dataclass
class CompiledBlocks:
    """What compiling a model's blocks did: the time spent in calls that compiled (each new input shape: tracing,
    and inductor's work where its cache did not have it), and why it fell back to eager, if it did."""

    seconds: float = 0.0
    fallback: str | None = None
    # Set by the caller between calls: the next calls run eager (a call shape not chosen for compiling)
    eager: bool = False
    _shapes: set = field(default_factory=set)


def compile_blocks(blocks: nn.ModuleList, backend: str = "inductor", mode: str | None = None,
                   record: CompiledBlocks | None = None, deterministic: bool = True) -> CompiledBlocks:
    """Compile the `forward` of each block of `blocks` (all of one class) into one shared graph; returns the record
    that the calls fill in (`record`: one to go on filling, for another model of the same blocks). A failure to
    compile (no C compiler, no Triton) falls back to eager for every block, recorded in `fallback`: the images are
    the same, only slower."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", compile_cache())
    classes = {type(b) for b in blocks}
    if len(classes) != 1:
        raise ValueError(f"blocks of several classes: {sorted(c.__name__ for c in classes)}")
    cls = classes.pop()
    compiled = _compiled(cls, backend, mode, deterministic)
    record = CompiledBlocks() if record is None else record
    for block in blocks:
        block.forward = _compiled_forward(weakref.ref(block), cls.forward, compiled, record)
    return record


@functools.cache
def _compiled(cls: type, backend, mode: str | None, deterministic: bool = True):
    """One compiled function per block class: torch keeps its graphs with the function's code, guarded on the
    compiler, so a model loaded again (the next LoRA set, the next run in this process) reuses them.

    `deterministic`: inductor's deterministic mode, where torch has it. By default inductor times several tile
    shapes of each reduction kernel (layer norms, softmax) on its first call and keeps the fastest; the shapes sum
    in different orders, so two processes, or two GPUs of one run, could pick different ones and make images that
    differ by a unit or two of 255 (seen: 2/255 between a one-GPU and a two-GPU run, BENCHMARKS.md). The mode
    picks one shape by rule instead, so a resumed run, or another rank, computes what the first one did."""
    options = ({"deterministic": True} if deterministic and backend == "inductor" and mode is None
               and _has_deterministic_mode() else None)
    return torch.compile(cls.forward, backend=backend, mode=mode, options=options, dynamic=False)


def _has_deterministic_mode() -> bool:
    import torch._inductor.config as inductor_config  # noqa: PLC0415

    return hasattr(inductor_config, "deterministic")


def _compiled_forward(block_ref, eager, compiled, record: CompiledBlocks):
    # The block is held weakly: a strong reference from its own attribute would keep it (and, through its
    # parent, the whole DiT) alive until Python's cycle collector ran.
    def forward(hidden_states: torch.Tensor, *args, **kwargs):
        block = block_ref()
        # The first block gets a transposed view from the patch embedding, the others contiguous outputs: made
        # contiguous here, all blocks match one graph instead of two (the same values: a copy, no arithmetic).
        hidden_states = hidden_states.contiguous()
        if record.fallback is not None or record.eager:
            return eager(block, hidden_states, *args, **kwargs)
        shape = tuple(tuple(t.shape) for t in (hidden_states, *args, *kwargs.values()) if torch.is_tensor(t))
        if shape in record._shapes:
            return compiled(block, hidden_states, *args, **kwargs)
        start = time.perf_counter()
        try:
            out = compiled(block, hidden_states, *args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as exc:  # the compiler failed, not the computation
            record.fallback = _why(exc)
            out = eager(block, hidden_states, *args, **kwargs)
        record.seconds += time.perf_counter() - start
        record._shapes.add(shape)
        return out

    return forward


def _why(exc: BaseException) -> str:
    """A compiler's failure in one line: what the backend raised (dynamo wraps it), its first line."""
    inner = getattr(exc, "inner_exception", None) or exc.__cause__ or exc
    lines = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {lines[0] if lines else ''}"
