"""The budget planner: a VRAM budget and the sizes of things in, a plan out. Pure: no GPU, no weights.

The budget counts the whole process as the driver (NVML) sees it, CUDA context included, because that is what
decides whether a run fits a user's card. For each stage the plan picks a placement:
  encode   resident (T5 on the GPU) | streamed (one T5 block at a time, from the weights files) | cpu
  denoise  resident (DiT on the GPU) | streamed (its blocks prefetched on a side stream while others compute)
  decode   whole (the VAE decodes an image in one piece) | strips (exactly the same image, layer by layer in
           rows, within `room` bytes of activations; see vae_strips.py)
Memory figures below are estimates calibrated on PixArt-XL-2 at 1024x1024 on an H100 (BENCHMARKS.md); the
benchmark checks the measured peaks against the budget.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import UsageError

MiB = 1024**2
GiB = 1024**3
CUDA_CONTEXT = int(0.60 * GiB)  # NVML's view of a fresh CUDA context with torch (H100, CUDA 13)
# What NVML sees beyond the context measured at start-up and torch's reserved memory: cuBLAS and cuDNN handles
# and workspaces, and kernels CUDA loads lazily when first used (H100, CUDA 13: NVML minus torch's reserved
# memory was 0.73 GiB in every stage of a run, BENCHMARKS.md, against 0.6 GiB for the bare context).
RESERVE = 200 * MiB
FRAGMENTATION = 1.10  # what the caching allocator holds over what tensors use, with expandable segments
VAE_BYTES_PER_PIXEL = 2560  # fp16 SD-VAE decode activations per output pixel (2.42 GiB at 1024x1024, measured)
DIT_ACTIVATION_FACTOR = 16  # live hidden-state-sized tensors in a DiT block (0.27 GiB at 1024x1024, measured)
TILES = (1024, 768, 512, 384, 256)  # tile sides for VAEs that cannot decode in strips, largest first
# Strips of many sizes fragment the allocator's pool more than whole layers do: reserved over allocated was 1.26
# to 1.45 in the strip decode of the 1.5 GiB and capped runs (BENCHMARKS.md), 1.1 elsewhere.
STRIP_FRAGMENTATION = 1.5
MIN_STRIP_ROOM = 64 * MiB  # strip decoding: a few rows of the largest layer, the image, the small layers whole


@dataclass(frozen=True)
class Sizes:
    """Bytes at the run's dtype, read from the safetensors headers (see models.component_sizes)."""

    text_encoder: int  # all of T5 (its fp32 `wo` layers counted at 4 bytes)
    text_encoder_block: int  # the largest T5 block
    text_encoder_other: int  # T5 outside its blocks that stays on the GPU when streaming (the token embedding
    # table stays on the CPU then: a lookup needs only the rows of the prompt's tokens)
    transformer: int
    transformer_block: int
    transformer_other: int
    vae: int
    transformer_blocks: int = 28
    text_tokens: int = 120
    text_dim: int = 4096
    text_ff: int = 10240
    dit_width: int = 1152
    dit_patch: int = 2
    vae_scale: int = 8
    dtype_bytes: int = 2
    vae_dtype_bytes: int = 0  # the VAE's, where it decodes in another dtype (Σ's SDXL VAE in float32); 0: dtype_bytes


@dataclass(frozen=True)
class StagePlan:
    stage: str
    placement: str
    estimate: int  # predicted whole-process peak, bytes
    batch: int = 1
    tile: int | None = None  # decode, VAEs that cannot decode in strips: tile side in pixels
    room: int | None = None  # decode in strips: bytes of GPU memory its activations may use
    ahead: int = 0  # streamed: blocks moved to the GPU ahead of the one computing
    resident_blocks: int = 0  # streamed DiT: blocks that stay on the GPU (the budget's room to spare)
    note: str = ""


@dataclass(frozen=True)
class Plan:
    budget: int | None  # bytes, whole process; None = unconstrained
    context: int
    stages: dict[str, StagePlan] = field(default_factory=dict)

    def __getitem__(self, stage: str) -> StagePlan:
        return self.stages[stage]


class PlanError(UsageError):
    """The budget is too small for any placement."""


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": MiB, "gib": GiB, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str) -> int | str:
    """'1.5GiB', '6GB', '800MiB', '2g' -> bytes; 'auto' -> 'auto' (what the GPU has free)."""
    value = str(text).strip().lower().replace(" ", "")
    if value == "auto":
        return "auto"
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", value)
    if not match or match.group(2) not in _UNITS:
        raise UsageError(f"--vram-budget {text!r}: not a size (examples: 1.5GiB, 6GB, 800MiB, auto)")
    size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise UsageError(f"--vram-budget {text!r}: must be more than zero")
    return size


def format_size(value: int | None) -> str:
    return "-" if value is None else f"{value / GiB:.2f} GiB"


def _t5_activations(s: Sizes, texts: int, micro: int) -> int:
    per_prompt = s.text_tokens * (2 * s.text_ff + 6 * s.text_dim) * 4  # one micro-batch inside a block, fp32 worst
    hidden = texts * s.text_tokens * s.text_dim * s.dtype_bytes * 3  # the whole group's hidden states
    return micro * per_prompt + hidden


def _dit_activations(s: Sizes, size: tuple[int, int], batch: int) -> int:
    w, h = size
    tokens = (w // s.vae_scale // s.dit_patch) * (h // s.vae_scale // s.dit_patch)
    return 2 * batch * tokens * s.dit_width * s.dtype_bytes * DIT_ACTIVATION_FACTOR  # x2: guidance


def _vae_activations(s: Sizes, side_w: int, side_h: int) -> int:
    return int(side_w * side_h * VAE_BYTES_PER_PIXEL * (s.vae_dtype_bytes or s.dtype_bytes) / 2)


def _peak(context: int, tensors: int) -> int:
    return int(context + RESERVE + tensors * FRAGMENTATION)


def make_plan(budget: int | None, sizes: Sizes, image_sizes: list[tuple[int, int]], *, texts: int = 1,
              encode_batch: int = 1, denoise_batch: int = 1, context: int = CUDA_CONTEXT,
              encode_on_cpu: bool = False, text_encoder_8bit: bool = False) -> Plan:
    """Choose each stage's placement for `budget` bytes (None: everything resident, as fast as it goes).

    `image_sizes` are the (width, height) the DiT and VAE work at (after resolution binning); `texts` how
    many texts go through T5 together. An 8-bit T5 (`sizes` counted so) is resident or nothing: bitsandbytes'
    int8 layers are not streamed."""
    biggest = max(image_sizes, key=lambda wh: wh[0] * wh[1], default=(1024, 1024))
    fits = (lambda need: True) if budget is None else (lambda need: need <= budget)
    stages = {"encode": _plan_encode(sizes, fits, context, texts, encode_batch, encode_on_cpu, text_encoder_8bit),
              "denoise": _plan_denoise(sizes, fits, context, biggest, denoise_batch, budget),
              "decode": _plan_decode(sizes, fits, context, biggest, budget)}
    return Plan(budget=budget, context=context, stages=stages)


def _plan_encode(s: Sizes, fits, context: int, texts: int, micro: int, on_cpu: bool,
                 eight_bit: bool = False) -> StagePlan:
    act = _t5_activations(s, texts, micro)
    if on_cpu:
        return StagePlan("encode", "cpu", estimate=0, batch=micro, note="asked for: T5 runs on the CPU")
    resident = _peak(context, s.text_encoder + act)
    if eight_bit:
        if not fits(resident):
            raise PlanError(f"the 8-bit text encoder needs ~{format_size(resident)} on the GPU (CUDA context "
                            f"included) and is never streamed: leave out --text-encoder-8bit, and T5 streams in "
                            f"16 bits within the budget")
        return StagePlan("encode", "resident", estimate=resident, batch=micro, note="T5 in 8 bits (bitsandbytes)")
    if fits(resident):
        return StagePlan("encode", "resident", estimate=resident, batch=micro)
    for ahead in (1, 0):
        streamed = _peak(context, s.text_encoder_other + (1 + ahead) * s.text_encoder_block + act)
        if fits(streamed):
            return StagePlan("encode", "streamed", estimate=streamed, batch=micro, ahead=ahead,
                             note=f"T5 weights cross the bus once for {texts} text(s)")
    return StagePlan("encode", "cpu", estimate=0, batch=micro,
                     note=f"even one T5 block at a time needs {format_size(streamed)}: T5 runs on the CPU")


def _plan_denoise(s: Sizes, fits, context: int, size: tuple[int, int], batch: int, budget: int | None) -> StagePlan:
    act = _dit_activations(s, size, batch)
    resident = _peak(context, s.transformer + act)
    if fits(resident):
        return StagePlan("denoise", "resident", estimate=resident, batch=batch)
    # Two blocks copied ahead of the one computing hide the copies (bench/stream_profile.py, H100: 42.7 ms a
    # step against 41.3 resident; with one ahead, 48.9); one ahead where two do not fit.
    for ahead in (2, 1):
        streamed = _peak(context, s.transformer_other + (1 + ahead) * s.transformer_block + act)
        if fits(streamed):
            # Blocks that fit in what is left stay on the GPU: fewer bytes cross the bus at every step.
            spare = (budget - streamed) / FRAGMENTATION * 0.7 if budget is not None else 0
            keep = max(0, min(s.transformer_blocks - 1 - ahead, int(spare // max(1, s.transformer_block))))
            estimate = _peak(context, s.transformer_other + (1 + ahead + keep) * s.transformer_block + act)
            return StagePlan("denoise", "streamed", estimate=estimate, batch=batch, ahead=ahead,
                             resident_blocks=keep)
    if batch > 1:
        return _plan_denoise(s, fits, context, size, 1, budget)
    raise PlanError(f"a VRAM budget of {format_size(budget)} is too small to denoise {size[0]}x{size[1]} images: "
                    f"it needs at least {format_size(streamed)} (CUDA context {format_size(context)} included)")


def _plan_decode(s: Sizes, fits, context: int, size: tuple[int, int], budget: int | None) -> StagePlan:
    w, h = size
    whole = _peak(context, s.vae + _vae_activations(s, w, h))
    if fits(whole):
        return StagePlan("decode", "whole", estimate=whole)
    room = int((budget - context - RESERVE - s.vae) / STRIP_FRAGMENTATION)
    least = context + RESERVE + s.vae + int(MIN_STRIP_ROOM * STRIP_FRAGMENTATION)
    if room < MIN_STRIP_ROOM:
        raise PlanError(f"a VRAM budget of {format_size(budget)} is too small to decode {w}x{h} images: even in "
                        f"strips it needs at least {format_size(least)}")
    estimate = context + RESERVE + s.vae + int(room * STRIP_FRAGMENTATION)
    return StagePlan("decode", "strips", estimate=estimate, room=room, tile=tile_for(s, room),
                     note="exact: whole-image GroupNorm statistics, one-row halos")


def tile_for(s: Sizes, room: int) -> int:
    """The largest tile side whose tiled decode fits in `room` (for VAEs strips cannot handle)."""
    for tile in TILES:
        if _vae_activations(s, tile, tile) <= room:
            return tile
    return TILES[-1]


def format_plan(plan: Plan) -> str:
    head = ("unconstrained (no --vram-budget)" if plan.budget is None
            else f"VRAM budget {format_size(plan.budget)} (whole process, CUDA context ~{format_size(plan.context)})")
    lines = [f"plan for {head}:"]
    for st in plan.stages.values():
        how = st.placement
        if st.room:
            how += f" ({format_size(st.room)} of activations)"
        if st.placement == "streamed":
            how += f" ({st.ahead} block(s) ahead" + (f", {st.resident_blocks} kept" if st.resident_blocks else "") + ")"
        if st.stage in ("encode", "denoise"):
            how += f", batch {st.batch}"
        estimate = "on the CPU" if st.placement == "cpu" else f"~{format_size(st.estimate)} peak"
        lines.append(f"  {st.stage:<8} {how:<46} {estimate}" + (f"  [{st.note}]" if st.note else ""))
    return "\n".join(lines)
