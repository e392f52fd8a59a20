"""The budget planner: a VRAM budget, a host RAM budget and the sizes of things in, a plan out. Pure: no GPU, no
weights, no torch calls.

The VRAM budget counts the whole process as the driver (NVML) sees it, CUDA context included, because that is
what decides whether a run fits a user's card; the host budget counts the whole process's resident memory (RSS,
pinned buffers included). For each stage the plan picks a placement:
  encode   resident (T5 on the GPU) | streamed (one T5 block at a time, from the weights files) | cpu
  denoise  resident (DiT on the GPU) | streamed (its blocks prefetched on a side stream while others compute;
           held pinned in RAM, or read from the weights files at every step where RAM is short)
  decode   whole (the VAE decodes an image in one piece) | strips (exactly the same image, layer by layer in
           rows, within `room` bytes of activations; see vae_strips.py; what waits off the GPU is pinned in
           RAM, or spilled to a file where RAM is short)
  vae-encode (image-to-image's init images, before denoise) whole | strips, as decode
and its batch: a batch option lowers to 1 before it changes a placement, and encode's group (texts whose hidden
states are alive together) is the largest that fits. Each stage gets an estimate of its whole-process peak on
the GPU and of the host memory it holds. Memory figures below are estimates calibrated on PixArt-XL-2 at
1024x1024 on an H100 (BENCHMARKS.md); bench/sweep.py checks the measured peaks against them and the budgets.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import UsageError
from .vae_strips import RESNET_WHOLE_TENSORS, encoder_host_bytes
from .vae_strips import host_bytes as strip_host_bytes

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
# The denoise batch unless one is asked for. On an H200 (BENCHMARKS.md, the budget sweep) a batch of 4 at 512x512
# (1024 latent tokens an image) took 0.197 s an image against 0.530 at batch 1, and 8 no less than 4 (0.216); at
# 1024x1024 (4096 tokens) a batch of 2 saved 7% (0.337 s against 0.364) and more saved little: batching pays
# until a batch holds about 8192 tokens.
AUTO_BATCH_TOKENS = 8192
AUTO_BATCH_MAX = 4
# A whole VAE decode's convolutions need more beside torch's tensors than RESERVE covers (cuDNN's workspaces and
# the kernels it loads): at 1024x1024 the decode peaked at 3.63 GiB NVML unconstrained and 3.94 GiB at 8 GiB, the
# same 2.58 GiB of tensors (BENCHMARKS.md); the estimate without this was 3.72.
DECODE_WHOLE_EXTRA = int(0.25 * GiB)
TILES = (1024, 768, 512, 384, 256)  # tile sides for VAEs that cannot decode in strips, largest first
# Strips of many sizes fragment the allocator's pool more than whole layers do: reserved over allocated was 1.26
# to 1.45 in the strip decode of the 1.5 GiB and capped runs (BENCHMARKS.md), 1.1 elsewhere.
STRIP_FRAGMENTATION = 1.5
MIN_STRIP_ROOM = 64 * MiB  # strip decoding: a few rows of the largest layer, the image, the small layers whole
# Of what the budget leaves beside a streamed DiT, the share given to blocks kept on the GPU; the rest absorbs
# what the estimate misses. A chosen margin, checked by measurement: at 1.5 GiB three blocks were kept and the
# denoise stage peaked at 1.36 to 1.39 GiB NVML (BENCHMARKS.md).
DIT_KEEP_SHARE = 0.7
# After an out-of-memory error, the budget the message suggests: this share of the peak the run reached (or of
# the card). A chosen step: the planner's estimates sit 5 to 10% over the measured peaks (BENCHMARKS.md), so a
# fifth less makes it choose a smaller placement at once, without halving what the user gets.
OOM_HINT_SHARE = 0.8

# T5 (transformers' modeling_t5, read for 5.x): what is alive while a group of texts goes through the encoder.
# Across the whole stack, per text of the group: the token embeddings (run dtype) and the hidden states between
# blocks, which are float32 after the first block (the fp32 `wo` output is added to the residual, and the sum is
# float32); our MicroBatched wrapper holds a block's input, its micro-batches' outputs and their concatenation,
# and T5LayerNorm adds a float32 copy: four float32 copies.
T5_HIDDEN_FP32_COPIES = 4
# Inside a block, per text of a micro-batch: the gated-GELU feed-forward holds wi_0's output, GELU's temporaries,
# wi_1's output and their product at the run dtype (five copies at its peak), then the product in float32 for
# `wo`; attention holds the bias mask (position bias where the padding mask allows, batch x heads x tokens^2) and,
# on the math path, the scores: two float32-sized copies; and about 14 bytes a hidden element (q, k, v, the
# normalised input, the float32 `wo` output and residual sum).
T5_FF_COPIES = 5
T5_SCORE_COPIES = 2
T5_HIDDEN_BYTES = 14

# Host memory. The process itself (interpreter, torch, diffusers, transformers, CUDA's host side) before a stage
# holds anything: the decode stage with a whole VAE peaked at 1.95 GiB RSS on the H100 (BENCHMARKS.md, first table).
PROCESS_RSS = 2 * GiB
# What `--host-budget auto` leaves of the RAM the machine has available: for the page cache the streamers read
# the weights through (at least a shard of them, or the reads fall to disk speed), the OS and other programs. A
# chosen margin, not measured: one T5-XXL shard is ~4.7 GiB; 2 GiB keeps the current block's file pages cached.
HOST_MARGIN = 2 * GiB
# A streamed component's pinned ring in RAM: `ahead` blocks on their way to the GPU plus these (the one being read
# from the files and the one being copied), as streaming.BlockStreamer allocates it.
RING_EXTRA_SLOTS = 2


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
    text_heads: int = 64
    text_vocab: int = 32128  # rows of T5's token embedding table (held in RAM when T5 streams)
    dit_width: int = 1152
    dit_patch: int = 2
    vae_scale: int = 8
    vae_channels: tuple[int, ...] = (128, 256, 512, 512)  # the VAE's block_out_channels
    vae_layers: int = 2  # its layers_per_block (a decoder up block has one resnet more)
    dtype_bytes: int = 2
    vae_dtype_bytes: int = 0  # the VAE's, where it decodes in another dtype (Σ's SDXL VAE in float32); 0: dtype_bytes


@dataclass(frozen=True)
class StagePlan:
    stage: str
    placement: str
    estimate: int  # predicted whole-process peak on the GPU, bytes (0: the stage runs on the CPU)
    batch: int = 1
    group: int = 0  # encode: texts whose hidden states go through T5 together (each crosses the bus once a group)
    host: int = 0  # host memory the stage holds beyond the process itself (PROCESS_RSS): pinned buffers, RAM
    tile: int | None = None  # decode, VAEs that cannot decode in strips: tile side in pixels
    room: int | None = None  # decode in strips: bytes of GPU memory its activations may use
    ahead: int = 0  # streamed: blocks moved to the GPU ahead of the one computing
    resident_blocks: int = 0  # streamed DiT: blocks that stay on the GPU (the budget's room to spare)
    hold_in_ram: bool = True  # streamed DiT: blocks pinned in RAM (False: read from the files at every step)
    spill: int = 0  # decode in strips: most bytes of activations waiting in files instead of RAM at once
    pinned_limit: int | None = None  # decode in strips: pinned bytes a decode may request before it spills
    note: str = ""


@dataclass(frozen=True)
class Plan:
    budget: int | None  # bytes, whole process; None = unconstrained
    context: int
    stages: dict[str, StagePlan] = field(default_factory=dict)
    host_budget: int | None = None  # bytes of host RAM, whole process; None = unconstrained

    def __getitem__(self, stage: str) -> StagePlan:
        return self.stages[stage]


class PlanError(UsageError):
    """The budget is too small for any placement."""


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "kib": 1024, "mib": MiB, "gib": GiB, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str, option: str = "--vram-budget") -> int | str:
    """'1.5GiB', '6GB', '800MiB', '2g' -> bytes; 'auto' -> 'auto' (what the GPU or the machine has free).
    `option` names the setting in the error."""
    value = str(text).strip().lower().replace(" ", "")
    if value == "auto":
        return "auto"
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", value)
    if not match or match.group(2) not in _UNITS:
        raise UsageError(f"{option} {text!r}: not a size (examples: 1.5GiB, 6GB, 800MiB, auto)")
    size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise UsageError(f"{option} {text!r}: must be more than zero")
    if match.group(2) in ("", "b") and size < MiB:  # '--vram-budget 2': nobody means two bytes
        raise UsageError(f"{option} {text!r}: {size} bytes (a size without a unit is in bytes); "
                         f"did you mean {match.group(1)}GiB?")
    return size


def format_size(value: int | None) -> str:
    return "-" if value is None else f"{value / GiB:.2f} GiB"


def _t5_activations(s: Sizes, group: int, micro: int) -> int:
    """GPU bytes of T5's activations for `group` texts going through it in micro-batches of `micro`."""
    t, d = s.text_tokens, s.text_dim
    hidden = t * d * (s.dtype_bytes + T5_HIDDEN_FP32_COPIES * 4)
    per_text = (t * s.text_ff * (T5_FF_COPIES * s.dtype_bytes + 4) + s.text_heads * t * t * T5_SCORE_COPIES * 4
                + t * d * T5_HIDDEN_BYTES)
    return group * hidden + micro * per_text


def _dit_activations(s: Sizes, size: tuple[int, int], batch: int) -> int:
    w, h = size
    tokens = (w // s.vae_scale // s.dit_patch) * (h // s.vae_scale // s.dit_patch)
    return 2 * batch * tokens * s.dit_width * s.dtype_bytes * DIT_ACTIVATION_FACTOR  # x2: guidance


def _vae_activations(s: Sizes, side_w: int, side_h: int) -> int:
    return int(side_w * side_h * VAE_BYTES_PER_PIXEL * (s.vae_dtype_bytes or s.dtype_bytes) / 2)


def _vae_encode_activations(s: Sizes, side_w: int, side_h: int) -> int:
    """A whole encode's activations: RESNET_WHOLE_TENSORS tensors of its widest level (channels over the pixels
    of that level; SD's VAE: its 128 channels at full resolution), the count the strip walk runs a resnet whole
    with. An estimate from the encoder's shape until the GPU measures it (bench/img2img.py)."""
    widest = max(c / 4**i for i, c in enumerate(s.vae_channels))
    return int(side_w * side_h * widest * (s.vae_dtype_bytes or s.dtype_bytes) * RESNET_WHOLE_TENSORS)


def _peak(context: int, tensors: int) -> int:
    return int(context + RESERVE + tensors * FRAGMENTATION)


def make_plan(budget: int | None, sizes: Sizes, image_sizes: list[tuple[int, int]], *, texts: int = 1,
              encode_batch: int = 1, denoise_batch: int | None = 1, context: int = CUDA_CONTEXT,
              encode_on_cpu: bool = False, text_encoder_8bit: bool = False, host_budget: int | None = None,
              init_sizes: list[tuple[int, int]] | None = None) -> Plan:
    """Choose each stage's placement for `budget` bytes of GPU memory and `host_budget` bytes of host RAM (None:
    unconstrained; everything resident, as fast as it goes).

    `image_sizes` are the (width, height) the DiT and VAE work at (after resolution binning); `texts` how many
    distinct texts the queue encodes (they go through T5 in groups as large as the budget allows); `denoise_batch`
    None: `auto_denoise_batch` for the largest size, lowered to 1 silently where it does not fit. An 8-bit T5
    (`sizes` counted so) is resident or nothing: bitsandbytes' int8 layers are not streamed. `init_sizes`: the
    sizes image-to-image init images are encoded at; where there are any, the plan has a vae-encode stage."""
    biggest = max(image_sizes, key=lambda wh: wh[0] * wh[1], default=(1024, 1024))
    fits = (lambda need: True) if budget is None else (lambda need: need <= budget)
    # A stage that holds nothing beyond the process always fits: no slower placement would hold less.
    host_fits = (lambda need: True) if host_budget is None else (
        lambda need: need == 0 or PROCESS_RSS + need <= host_budget)
    stages = {"encode": _plan_encode(sizes, fits, host_fits, context, max(1, texts), encode_batch, encode_on_cpu,
                                     text_encoder_8bit, host_budget)}
    if init_sizes:
        stages["vae-encode"] = _plan_vae_encode(sizes, fits, host_fits, context,
                                                max(init_sizes, key=lambda wh: wh[0] * wh[1]), budget, host_budget)
    stages["denoise"] = _plan_denoise(sizes, fits, host_fits, context, biggest, denoise_batch, budget)
    stages["decode"] = _plan_decode(sizes, fits, host_fits, context, biggest, budget, host_budget)
    return Plan(budget=budget, context=context, stages=stages, host_budget=host_budget)


def _largest(lo: int, hi: int, ok) -> int:
    """The largest n in lo..hi with ok(n), ok being monotone (true up to some n); lo if none."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def _encode_cpu(s: Sizes, host_fits, texts: int, micro: int, host_budget: int | None, why: str) -> StagePlan:
    """T5 on the CPU, in float32: its weights and activations in RAM."""
    micro = min(micro, texts)
    weights = s.text_encoder * 4 // s.dtype_bytes  # every tensor at 4 bytes (the fp32 `wo` over-counted)
    fp32 = Sizes(**{**s.__dict__, "dtype_bytes": 4})

    def host(group: int, b: int) -> int:
        return weights + _t5_activations(fp32, group, b)

    for b in dict.fromkeys((micro, 1)):
        if host_fits(host(b, b)):
            group = _largest(b, max(b, texts), lambda g: host_fits(host(g, b)))
            note = why + (f"; --encode-batch {micro} lowered to 1 to fit in RAM" if b != micro else "")
            return StagePlan("encode", "cpu", estimate=0, batch=b, group=group, host=host(group, b), note=note)
    raise PlanError(f"T5 does not fit on the GPU ({why}) and on the CPU it needs ~{format_size(PROCESS_RSS + host(1, 1))}"
                    f" of RAM, more than the host budget of {format_size(host_budget)}: raise --host-budget or "
                    f"--vram-budget")


def _plan_encode(s: Sizes, fits, host_fits, context: int, texts: int, micro: int, on_cpu: bool,
                 eight_bit: bool, host_budget: int | None) -> StagePlan:
    asked, micro = micro, min(micro, texts)  # a micro-batch is never larger than the queue's texts
    if on_cpu:
        return _encode_cpu(s, host_fits, texts, micro, host_budget, "asked for: T5 runs on the CPU")
    if eight_bit:
        resident = _peak(context, s.text_encoder + _t5_activations(s, 1, 1))
        if not fits(resident):
            raise PlanError(f"the 8-bit text encoder needs ~{format_size(resident)} on the GPU (CUDA context "
                            f"included) and is never streamed: leave out --text-encoder-8bit, and T5 streams in "
                            f"16 bits within the budget")
    # Host bytes of a streamed T5: the pinned ring (`ahead` + RING_EXTRA_SLOTS blocks)
    # and the token embedding table, which stays in RAM.
    embedding = s.text_vocab * s.text_dim * s.dtype_bytes
    ways = [("resident", 0, s.text_encoder, 0)] + ([] if eight_bit else [
        ("streamed", ahead, s.text_encoder_other + (1 + ahead) * s.text_encoder_block,
         (ahead + RING_EXTRA_SLOTS) * s.text_encoder_block + embedding) for ahead in (1, 0)])
    least = short_of_ram = None
    for placement, ahead, weights, host in ways:
        # The placement is the one that fits one text at a time: a batch option never changes it.
        need = _peak(context, weights + _t5_activations(s, 1, 1))
        least = need
        if fits(need) and not host_fits(host):
            short_of_ram = host
        if not (fits(need) and host_fits(host)):
            continue
        batch = micro if fits(_peak(context, weights + _t5_activations(s, micro, micro))) else 1
        group = _largest(batch, max(batch, texts),
                         lambda g: fits(_peak(context, weights + _t5_activations(s, g, batch))))
        notes = ["T5 in 8 bits (bitsandbytes)"] if eight_bit else []
        if placement == "streamed":
            notes.append(f"T5 weights cross the bus once for every {group} text(s)")
        if batch != micro:
            notes.append(f"--encode-batch {asked} does not fit beside it: batch 1")
        return StagePlan("encode", placement, estimate=_peak(context, weights + _t5_activations(s, group, batch)),
                         batch=batch, group=group, ahead=ahead, host=host, note="; ".join(notes))
    if short_of_ram is not None:
        raise PlanError(f"streaming T5 needs ~{format_size(PROCESS_RSS + short_of_ram)} of host RAM (its pinned "
                        f"blocks and token embedding table, the process included), more than the host budget of "
                        f"{format_size(host_budget)}; on the CPU it would need more: raise --host-budget")
    return _encode_cpu(s, host_fits, texts, micro, host_budget,
                       f"even one T5 block at a time needs {format_size(least)}: T5 runs on the CPU")


def auto_denoise_batch(s: Sizes, size: tuple[int, int]) -> int:
    """The denoise batch used unless one is asked for: as many images as keep the batch within AUTO_BATCH_TOKENS
    latent tokens, at most AUTO_BATCH_MAX (4 at 512x512, 2 at 1024x1024, 1 from 2048x2048 on PixArt-XL)."""
    w, h = size
    tokens = (w // s.vae_scale // s.dit_patch) * (h // s.vae_scale // s.dit_patch)
    return max(1, min(AUTO_BATCH_MAX, AUTO_BATCH_TOKENS // max(1, tokens)))


def _plan_denoise(s: Sizes, fits, host_fits, context: int, size: tuple[int, int], batch: int | None,
                  budget: int | None) -> StagePlan:
    asked = batch is not None
    batch = batch if asked else auto_denoise_batch(s, size)
    one = _dit_activations(s, size, 1)
    resident = _peak(context, s.transformer + one)
    if fits(resident):
        if batch > 1 and fits(_peak(context, s.transformer + _dit_activations(s, size, batch))):
            return StagePlan("denoise", "resident", estimate=_peak(context, s.transformer + _dit_activations(
                s, size, batch)), batch=batch)
        note = f"--denoise-batch {batch} does not fit beside it: batch 1" if batch > 1 and asked else ""
        return StagePlan("denoise", "resident", estimate=resident, batch=1, note=note)
    # Two blocks copied ahead of the one computing hide the copies (bench/stream_profile.py, H100: 42.7 ms a
    # step against 41.3 resident; with one ahead, 48.9); one ahead where two do not fit. The placement is the
    # one that fits at batch 1; the batch stays as asked where it fits beside it, else 1.
    for ahead in (2, 1):
        streamed = _peak(context, s.transformer_other + (1 + ahead) * s.transformer_block + one)
        if not fits(streamed):
            continue
        b = batch
        act = _dit_activations(s, size, b)
        if not fits(_peak(context, s.transformer_other + (1 + ahead) * s.transformer_block + act)):
            b, act = 1, one
        # Blocks that fit in what is left stay on the GPU: fewer bytes cross the bus at every step.
        used = _peak(context, s.transformer_other + (1 + ahead) * s.transformer_block + act)
        spare = (budget - used) / FRAGMENTATION * DIT_KEEP_SHARE if budget is not None else 0
        keep = max(0, min(s.transformer_blocks - 1 - ahead, int(spare // max(1, s.transformer_block))))
        estimate = _peak(context, s.transformer_other + (1 + ahead + keep) * s.transformer_block + act)
        # Host: every streamed block pinned in RAM, read once; where RAM is short, a ring of `ahead` + 2 pinned
        # buffers refilled from the files at every step (slower: the page cache feeds every step).
        held = (s.transformer_blocks - keep) * s.transformer_block
        ring = (ahead + RING_EXTRA_SLOTS) * s.transformer_block
        hold = host_fits(held)
        notes = [] if hold else ["not enough RAM to hold the DiT's blocks: read from the files at every step"]
        if b != batch and asked:
            notes.append(f"--denoise-batch {batch} does not fit beside it: batch 1")
        return StagePlan("denoise", "streamed", estimate=estimate, batch=b, ahead=ahead, resident_blocks=keep,
                         hold_in_ram=hold, host=held if hold else ring, note="; ".join(notes))
    raise PlanError(f"a VRAM budget of {format_size(budget)} is too small to denoise {size[0]}x{size[1]} images: "
                    f"it needs at least {format_size(streamed)} (CUDA context {format_size(context)} included)")


def _plan_decode(s: Sizes, fits, host_fits, context: int, size: tuple[int, int], budget: int | None,
                 host_budget: int | None) -> StagePlan:
    w, h = size
    return _plan_vae("decode", s, fits, host_fits, context, size, budget, host_budget,
                     _vae_activations(s, w, h), strip_host_bytes, tile=True)


def _plan_vae_encode(s: Sizes, fits, host_fits, context: int, size: tuple[int, int], budget: int | None,
                     host_budget: int | None) -> StagePlan:
    w, h = size
    return _plan_vae("vae-encode", s, fits, host_fits, context, size, budget, host_budget,
                     _vae_encode_activations(s, w, h), encoder_host_bytes)


def _plan_vae(stage: str, s: Sizes, fits, host_fits, context: int, size: tuple[int, int], budget: int | None,
              host_budget: int | None, activations: int, walk_host_bytes, tile: bool = False) -> StagePlan:
    """The VAE's decoder or encoder: whole where it fits, else in exact strips (`walk_host_bytes`: what the strip
    walk holds on the host); `tile`: a tile side for decoders the strip walk cannot take."""
    w, h = size
    what = "decode" if stage == "decode" else "encode init images of"
    whole = _peak(context, s.vae + activations) + DECODE_WHOLE_EXTRA
    if fits(whole):
        return StagePlan(stage, "whole", estimate=whole)
    room = int((budget - context - RESERVE - s.vae) / STRIP_FRAGMENTATION)
    least = context + RESERVE + s.vae + int(MIN_STRIP_ROOM * STRIP_FRAGMENTATION)
    if room < MIN_STRIP_ROOM:
        raise PlanError(f"a VRAM budget of {format_size(budget)} is too small to {what} {w}x{h} images: even in "
                        f"strips it needs at least {format_size(least)}")
    estimate = context + RESERVE + s.vae + int(room * STRIP_FRAGMENTATION)
    item = s.vae_dtype_bytes or s.dtype_bytes
    tile_side = tile_for(s, room) if tile else None
    pinned, _ = walk_host_bytes(s.vae_channels, s.vae_layers, w, h, item, room)
    note = "exact: whole-image GroupNorm statistics, one-row halos"
    if host_fits(pinned):
        return StagePlan(stage, "strips", estimate=estimate, room=room, tile=tile_side, host=pinned, note=note)
    # Not enough RAM for all the activations that wait off the GPU: what RAM holds is pinned, the rest waits in
    # files in the run folder (memory-mapped: the kernel writes their pages back and drops them as RAM runs
    # short; their copies are slower).
    limit = max(0, host_budget - PROCESS_RSS)  # host_fits failed, so there is a host budget
    held, spilled = walk_host_bytes(s.vae_channels, s.vae_layers, w, h, item, room, pinned_limit=limit)
    return StagePlan(stage, "strips", estimate=estimate, room=room, tile=tile_side, host=held,
                     spill=spilled, pinned_limit=limit,
                     note=f"{note}; {format_size(pinned)} of activations would not fit in RAM: up to "
                          f"{format_size(spilled)} wait in files in the run folder")


def tile_for(s: Sizes, room: int) -> int:
    """The largest tile side whose tiled decode fits in `room` (for VAEs strips cannot handle)."""
    for tile in TILES:
        if _vae_activations(s, tile, tile) <= room:
            return tile
    return TILES[-1]


def format_plan(plan: Plan) -> str:
    head = ("unconstrained (no --vram-budget)" if plan.budget is None
            else f"VRAM budget {format_size(plan.budget)} (whole process, CUDA context ~{format_size(plan.context)})")
    if plan.host_budget is not None:
        head += f", host budget {format_size(plan.host_budget)} (whole process, ~{format_size(PROCESS_RSS)} of it " \
                f"the process itself)"
    width = max(8, *(len(name) for name in plan.stages))
    lines = [f"plan for {head}:", f"  {'stage':<{width}} {'placement':<60} {'GPU peak':>11}  {'host RAM':>11}"]
    for st in plan.stages.values():
        how = st.placement
        if st.room:
            how += f" ({format_size(st.room)} of activations)"
        if st.placement == "streamed":
            how += f" ({st.ahead} block(s) ahead" + (f", {st.resident_blocks} kept" if st.resident_blocks else "") + ")"
        if st.stage in ("encode", "denoise"):
            how += f", batch {st.batch}"
        if st.stage == "encode" and st.group:
            how += f", {st.group} text(s) a group"
        estimate = "on the CPU" if st.placement == "cpu" else f"~{format_size(st.estimate)}"
        host = f"~{format_size(st.host)}" + (f" (+{format_size(st.spill)} file)" if st.spill else "")
        lines.append(f"  {st.stage:<{width}} {how:<60} {estimate:>11}  {host:>11}" + (f"  [{st.note}]" if st.note else ""))
    return "\n".join(lines)
