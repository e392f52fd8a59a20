"""Exact VAE decoding and encoding in row strips, for budgets where a whole decode or encode does not fit on the GPU.

diffusers' tiled decoding (`vae.enable_tiling()`) normalises each tile on its own and blends the seams, so the
image changes (up to 24/255 measured at 1024x1024, BENCHMARKS.md). The SD VAE decoder is 3x3 convolutions,
GroupNorm, SiLU, nearest upsampling and one attention at latent resolution, so it can be computed exactly in
pieces instead: the latent-resolution part (conv_in, the mid block with its attention) and every layer whose
tensors fit run whole, through diffusers' own modules; a layer too big runs over horizontal strips of rows,
each read with a one-row halo for its 3x3 convolution, and its GroupNorm uses statistics gathered over the
whole image (a partial mean and sum of squares per strip, combined as Chan et al. do) -- the same numbers a
whole-image GroupNorm computes, up to float rounding. Activations too big for the GPU wait in pinned host
memory between layers, stored row-major (rows, batch, channels, width) so that a strip is one contiguous block
and crosses the bus in one copy (an NCHW strip is a strided gather per channel). Torch's GroupNorm kernel
normalises as x * a + b with a = rstd * gamma and b = beta - mean * a in float32; `_normalize` does the same, so
the results match within float16 rounding.

The walk mirrors diffusers' `Decoder.forward`, `UpDecoderBlock2D.forward`, `ResnetBlock2D.forward` and
`Upsample2D.forward` (diffusers 0.42); `supports(vae)` refuses any decoder that is built differently, and the
caller then falls back to diffusers' tiling. The encoder (image-to-image's init images) is walked the same way
(`StripEncoder`: `Encoder.forward`, `DownEncoderBlock2D.forward`, `Downsample2D.forward`, whose stride-2
convolution reads two rows a row plus one of halo); `supports_encoder(vae)` refuses any other encoder.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# GPU bytes per element of a strip, beyond its input and output: the float32 copies GroupNorm works in, the
# normalised float16 copy, the activation, the padded copy, the convolution's output (at 3.0 the strips went over
# their room on the H100; at 6.0 the 1.5 GiB run's decode allocated 0.51 GiB against 0.52 planned, BENCHMARKS.md)
WORK_FACTOR = 6.0
# A resnet runs whole on the GPU when this many tensors of its widest activation fit in the room: its input, the
# two convolutions' outputs, GroupNorm's float32 copy and SiLU's output (diffusers' ResnetBlock2D.forward keeps
# them alive together); the same count as WORK_FACTOR, which the 1.5 GiB run measured.
RESNET_WHOLE_TENSORS = 6
# An upsampler runs whole when three upsampled-size tensors fit: the interpolated copy, the convolution's output
# and its padded input (Upsample2D.forward).
UPSAMPLE_WHOLE_TENSORS = 3
# A layer that runs in strips keeps its outputs on the GPU (instead of pinned host memory) when they fit in this
# share of the room, so the other share is left to the strips' own work; a chosen split: half keeps the strips
# about as tall as when nothing is kept, and most of SD-VAE's half-resolution layers stay on the GPU at 1.5 GiB.
KEEP_SHARE = 0.5
# Tensors a strip-run resnet keeps on the GPU when KEEP_SHARE allows: its input, the middle activation, its output.
RESNET_KEPT_TENSORS = 3
UPSAMPLE_KEPT_TENSORS = 2  # an upsampler's input and output
# Where a layer's input or output waits in host memory (on a GPU), its strips come in and go out through buffers
# of their own, two each way, so that the next strip's copy runs on a side stream beside this strip's kernels
# (_Transfers): per element of a strip, two more for its input and two for its output. Made on the compute stream
# and reused, so the allocator's pool holds no more than the room says (an earlier version let the side streams
# allocate, and the decode's NVML peak rose 0.5 GiB over the budget, BENCHMARKS.md).
TRANSFER_BUFFERS = 2.0
# What a strip may always use, whatever the tensors kept on the GPU hold: a floor so that the strips never shrink
# to a row or two (a chosen floor: an eighth of the room still makes strips of tens of rows at 1.5 GiB).
MIN_STRIP_SHARE = 1 / 8
# The encoder's input convolution (3 channels in) runs whole when this many tensors of its output fit: the output and
# room for cuDNN's work on it (the input and its padded copy are small). The same count as an upsampler's.
CONV_IN_WHOLE_TENSORS = 3
# A downsampler runs whole when this many tensors of its input fit: the input, its padded copy (Downsample2D pads
# by hand) and the quarter-size output with the convolution's work.
DOWNSAMPLE_WHOLE_TENSORS = 3
DOWNSAMPLE_KEPT_TENSORS = 2  # its output, and the strips' work beside it, when the output stays on the GPU
CONV_IN_KEPT_TENSORS = 2  # the same for the encoder's input convolution


def supports(vae) -> bool:
    """Whether `vae` is a decoder this module walks exactly (the SD / SDXL AutoencoderKL layout)."""
    from diffusers.models.upsampling import Upsample2D  # noqa: PLC0415

    decoder = getattr(vae, "decoder", None)
    if decoder is None or type(decoder).__name__ != "Decoder" or not isinstance(decoder.conv_norm_out, nn.GroupNorm):
        return False
    if getattr(vae, "use_tiling", False) or getattr(vae, "use_slicing", False):
        return False
    for block in decoder.up_blocks:
        if type(block).__name__ != "UpDecoderBlock2D":
            return False
        if not all(_is_plain_resnet(resnet) for resnet in block.resnets):
            return False
        for up in block.upsamplers or []:
            if not (isinstance(up, Upsample2D) and up.norm is None and not up.use_conv_transpose and up.interpolate
                    and up.use_conv and up.name == "conv" and _is_3x3(up.conv)):
                return False
    return _is_3x3(decoder.conv_out)


def supports_encoder(vae) -> bool:
    """Whether `vae` has an encoder `StripEncoder` walks exactly (the SD / SDXL AutoencoderKL layout)."""
    from diffusers.models.downsampling import Downsample2D  # noqa: PLC0415

    encoder = getattr(vae, "encoder", None)
    if encoder is None or type(encoder).__name__ != "Encoder" or not isinstance(encoder.conv_norm_out, nn.GroupNorm):
        return False
    if getattr(vae, "use_tiling", False) or getattr(vae, "use_slicing", False) or not encoder.down_blocks:
        return False
    if not (_is_3x3(encoder.conv_in) and _is_3x3(encoder.conv_out)):
        return False
    first = encoder.down_blocks[0].resnets[0] if getattr(encoder.down_blocks[0], "resnets", None) else None
    if first is None:
        return False
    for block in encoder.down_blocks:
        if type(block).__name__ != "DownEncoderBlock2D" or not all(_is_plain_resnet(r) for r in block.resnets):
            return False
        for down in block.downsamplers or []:
            conv = getattr(down, "conv", None)
            if not (isinstance(down, Downsample2D) and down.norm is None and down.use_conv and down.padding == 0
                    and isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (2, 2)
                    and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1):
                return False
    return True


def _is_plain_resnet(resnet) -> bool:
    """A ResnetBlock2D without time embedding, up- or downsampling: GroupNorm, SiLU, two 3x3 convolutions."""
    from diffusers.models.resnet import ResnetBlock2D  # noqa: PLC0415

    return (isinstance(resnet, ResnetBlock2D) and resnet.upsample is None and resnet.downsample is None
            and resnet.time_emb_proj is None and resnet.time_embedding_norm in ("default", "group")
            and (resnet.conv_shortcut is None or resnet.conv_shortcut.kernel_size == (1, 1))
            and isinstance(resnet.norm1, nn.GroupNorm) and isinstance(resnet.norm2, nn.GroupNorm)
            and _is_3x3(resnet.conv1) and _is_3x3(resnet.conv2))


def _is_3x3(conv) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


@dataclass
class _Stats:
    """GroupNorm statistics of a whole tensor, per (batch, group), gathered strip by strip."""
    groups: int
    count: float = 0.0
    mean: torch.Tensor | None = None  # float64, (N, G)
    m2: torch.Tensor | None = None

    def add(self, strip: torch.Tensor) -> None:
        n, c = strip.shape[:2]
        flat = strip.reshape(n, self.groups, -1).float()
        var, mean = torch.var_mean(flat, dim=-1, correction=0)
        k = flat.shape[-1]
        mean, m2 = mean.double(), var.double() * k
        if self.mean is None:
            self.count, self.mean, self.m2 = float(k), mean, m2
            return
        total = self.count + k
        delta = mean - self.mean
        self.mean = self.mean + delta * (k / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * k / total)
        self.count = total


def _normalize(x: torch.Tensor, stats: _Stats, norm: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm of a strip with whole-image statistics, computed as torch's kernel does (float32, x*a+b)."""
    assert stats.groups == norm.num_groups
    rstd = torch.rsqrt(stats.m2 / stats.count + norm.eps).float()  # (N, G)
    mean = stats.mean.float()
    per_group = x.shape[1] // norm.num_groups
    a = rstd.repeat_interleave(per_group, dim=1)
    b = -mean.repeat_interleave(per_group, dim=1) * a
    if norm.weight is not None:
        a = a * norm.weight.float()
        b = b * norm.weight.float() + norm.bias.float()
    return (x.float() * a[:, :, None, None] + b[:, :, None, None]).to(x.dtype)


class _HostRows:
    """An NCHW activation held in host memory as (H, N, C, W): rows lo..hi are one contiguous block.
    Copies go on the current stream, so they are ordered with the kernels around them without waiting.

    In pinned memory by default; with `spill_dir`, in a file there, memory-mapped: the kernel writes its pages
    back and drops them when RAM runs short, so a large decode takes disk instead of RAM (copies from pageable
    memory are slower and synchronous). The file is unlinked at once: it goes when the tensor does."""

    def __init__(self, shape, dtype: torch.dtype, spill_dir: Path | None = None):
        n, c, h, w = shape
        # on the host: never the decoder's device, not even a CPU decoder's (whose spilled rows live in files)
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, None
        if spill_dir is None:
            self.data = torch.empty((h, n, c, w), dtype=dtype, pin_memory=True)
            return
        fd, name = tempfile.mkstemp(dir=spill_dir, prefix=".strips.", suffix=".tmp")
        os.close(fd)
        try:
            self.data = torch.from_file(name, shared=True, size=h * n * c * w, dtype=dtype).view(h, n, c, w)
        finally:
            os.unlink(name)

    def rows(self, lo: int, hi: int, device: torch.device) -> torch.Tensor:
        return self.data[lo:hi].to(device, non_blocking=True).permute(1, 2, 0, 3)

    def write(self, a: int, b: int, y: torch.Tensor) -> None:
        self.data[a:b].copy_(y.permute(2, 0, 1, 3).contiguous(), non_blocking=True)


def _rows(x, lo: int, hi: int, device: torch.device) -> torch.Tensor:
    return x.rows(lo, hi, device) if isinstance(x, _HostRows) else x[:, :, lo:hi].to(device)


def _write(out, a: int, b: int, y: torch.Tensor) -> None:
    if isinstance(out, _HostRows):
        out.write(a, b, y)
    else:
        out[:, :, a:b].copy_(y)


class _Transfers:
    """Strips of activations that wait in host memory cross the bus on side streams while the GPU computes: the
    next strip comes in on one while this one computes, finished strips go out on another. Each direction has two
    buffers, made on the compute stream and reused, ordered with events; the streams never allocate. Elsewhere (a
    CPU, or an activation on the device) strips are read and written in line, as `_rows` and `_write` do."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.copy_in = torch.cuda.Stream(device) if self.cuda else None
        self.copy_out = torch.cuda.Stream(device) if self.cuda else None

    def crossing(self, *tensors) -> bool:
        """Whether strips of these tensors go through the transfer buffers (counted in a strip's rows)."""
        return self.cuda and any(isinstance(t, _HostRows) for t in tensors)

    def strips(self, x, ranges: list[tuple[int, int]]):
        """Rows lo..hi of `x` on the device, NCHW, for each (lo, hi) of `ranges` in turn."""
        if not (self.cuda and isinstance(x, _HostRows)):
            for lo, hi in ranges:
                yield _rows(x, lo, hi, self.device)
            return
        main = torch.cuda.current_stream(self.device)
        n, c, _, w = x.shape
        most = max(hi - lo for lo, hi in ranges)
        buffers = [torch.empty((most, n, c, w), dtype=x.dtype, device=self.device) for _ in range(2)]
        used: list[torch.cuda.Event | None] = [None, None]  # the compute's last use of each buffer
        # The buffers' memory may have been another tensor's, still read by kernels queued before; and the rows
        # an earlier layer sent out must have landed before they are read back.
        self.copy_in.wait_stream(main)
        self.copy_in.wait_stream(self.copy_out)

        def fetch(k: int):
            lo, hi = ranges[k]
            buffer = buffers[k % 2][:hi - lo]
            if used[k % 2] is not None:
                self.copy_in.wait_event(used[k % 2])
            with torch.cuda.stream(self.copy_in):
                buffer.copy_(x.data[lo:hi], non_blocking=True)
                arrived = torch.cuda.Event()
                arrived.record(self.copy_in)
            return buffer, arrived

        coming = fetch(0)
        try:
            for k in range(len(ranges)):
                buffer, arrived = coming
                if k + 1 < len(ranges):
                    coming = fetch(k + 1)
                main.wait_event(arrived)
                yield buffer.permute(1, 2, 0, 3)
                done = torch.cuda.Event()
                done.record(main)
                used[k % 2] = done
        finally:
            main.wait_stream(self.copy_in)  # no copy writes into the buffers once their memory is free again

    def writer(self, out, rows: int) -> _StripWriter:
        return _StripWriter(self, out, rows)


class _StripWriter:
    """Writes a layer's output strip by strip into `out`; into host memory, through two buffers on the copy-out
    stream (`close` then orders the compute after the last copies, so the buffers' memory is free again)."""

    def __init__(self, transfers: _Transfers, out, rows: int):
        self.t, self.out = transfers, out
        self.host = transfers.cuda and isinstance(out, _HostRows)
        if self.host:
            n, c, _, w = out.shape
            self.buffers = [torch.empty((rows, n, c, w), dtype=out.dtype, device=transfers.device) for _ in range(2)]
            self.sent: list[torch.cuda.Event | None] = [None, None]
            self.count = 0

    def write(self, a: int, b: int, y: torch.Tensor) -> None:
        if not self.host:
            _write(self.out, a, b, y)
            return
        main = torch.cuda.current_stream(self.t.device)
        k = self.count % 2
        self.count += 1
        if self.sent[k] is not None:
            main.wait_event(self.sent[k])  # the copy that read this buffer before is out
        buffer = self.buffers[k][:b - a]
        buffer.copy_(y.permute(2, 0, 1, 3))
        ready = torch.cuda.Event()
        ready.record(main)
        self.t.copy_out.wait_event(ready)
        with torch.cuda.stream(self.t.copy_out):
            self.out.data[a:b].copy_(buffer, non_blocking=True)
            sent = torch.cuda.Event()
            sent.record(self.t.copy_out)
        self.sent[k] = sent

    def close(self) -> None:
        if self.host:
            torch.cuda.current_stream(self.t.device).wait_stream(self.t.copy_out)


class _StripWalk:
    """What the strip decoder and encoder share: where activations wait, and resnets run in strips within `room`
    bytes of GPU memory for activations (weights not counted)."""

    def __init__(self, vae, device: torch.device, room: int, spill_dir: str | os.PathLike | None = None,
                 pinned_limit: int | None = None):
        self.vae = vae
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # tensors name their GPU's index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.room = int(room)
        # Activations that wait off the GPU are pinned in RAM, up to `pinned_limit` bytes a decode (counted as
        # torch's allocator rounds them) where `spill_dir` is given; past it they wait in files there.
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self.pinned_limit = pinned_limit if spill_dir is not None else None
        self._pinned = 0  # pinned bytes requested in this decode
        self.spilled = 0  # activations that waited in files in the last decode (tensors)
        self.strips_used = 0  # layers that ran in strips (for tests and the report)
        self.transfers = _Transfers(self.device)

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        self._pinned = self.spilled = 0
        return x.to(self.device)

    # -- storage ---------------------------------------------------------------------------------------------
    def _empty(self, shape, dtype, *, on_gpu: bool):
        on_cpu = self.device.type == "cpu"
        if on_gpu or (on_cpu and self.spill_dir is None):
            return torch.empty(shape, dtype=dtype, device=self.device)
        rounded = _pinned_size(self._bytes(shape, dtype))
        if self.spill_dir is not None and (on_cpu or self.pinned_limit is None
                                           or self._pinned + rounded > self.pinned_limit):
            self.spilled += 1
            return _HostRows(shape, dtype, self.spill_dir)
        self._pinned += rounded
        return _HostRows(shape, dtype)

    @staticmethod
    def _bytes(shape, dtype) -> int:
        n = 1
        for s in shape:
            n *= s
        return n * torch.empty((), dtype=dtype).element_size()

    def _rows(self, width: int, c_in: int, c_out: int, dtype, spare: int, crossing: bool = False) -> int:
        """Rows per strip: as many as fit in what is left of the room (`crossing`: with the transfer buffers)."""
        item = torch.empty((), dtype=dtype).element_size()
        per_row = width * (c_in + c_out) * item * (1 + WORK_FACTOR + (TRANSFER_BUFFERS if crossing else 0))
        return max(1, int(spare // per_row))

    def _settle(self) -> None:
        """Wait for the GPU to finish the layer just queued, once pinned blocks are in use. Torch's host allocator
        hands a freed pinned block out again only after the copies that read it have completed; the CPU runs layers
        ahead of the GPU, so without this wait every layer would pin new blocks instead of reusing the ones the
        previous layers released (`host_bytes` counts reuse; Σ 2K's decode measured ~4 GiB over it without the
        wait, BENCHMARKS.md). One wait per layer that ran in strips: tens per image."""
        if self._pinned and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    # -- the layers both walks share ---------------------------------------------------------------------------
    def _whole_fits(self, x: torch.Tensor, c_out: int, factor: float) -> bool:
        n, c, h, w = x.shape
        return self._bytes((n, max(c, c_out), h, w), x.dtype) * factor <= self.room

    def _resnet(self, resnet, x: torch.Tensor, stats: _Stats | None):
        c_out = resnet.conv2.out_channels
        if x.device == self.device and self._whole_fits(x, c_out, RESNET_WHOLE_TENSORS):
            return resnet(x, None), None
        self.strips_used += 1
        n, _, h, w = x.shape
        keep = RESNET_KEPT_TENSORS * self._bytes((n, max(x.shape[1], c_out), h, w), x.dtype) <= self.room * KEEP_SHARE
        if stats is None or stats.groups != resnet.norm1.num_groups:
            stats = self._gather(x, resnet.norm1.num_groups)
        mid, mid_stats = self._norm_act_conv(x, stats, resnet.norm1, resnet.nonlinearity, resnet.conv1, on_gpu=keep,
                                             next_groups=resnet.norm2.num_groups)
        out, out_stats = self._norm_act_conv(mid, mid_stats, resnet.norm2, resnet.nonlinearity, resnet.conv2,
                                             on_gpu=keep, next_groups=resnet.norm1.num_groups, residual=(resnet, x))
        return out, out_stats

    def _gather(self, x: torch.Tensor, groups: int) -> _Stats:
        stats = _Stats(groups)
        n, c, h, w = x.shape
        rows = self._rows(w, c, 0, x.dtype, self.room, self.transfers.crossing(x))
        for strip in self.transfers.strips(x, [(a, min(a + rows, h)) for a in range(0, h, rows)]):
            stats.add(strip)
        return stats

    def _spare(self, x: torch.Tensor, on_gpu: bool, c_out: int) -> int:
        n, c, h, w = x.shape
        held = self._bytes(x.shape, x.dtype) if x.device == self.device else 0
        held += self._bytes((n, c_out, h, w), x.dtype) if on_gpu else 0
        return max(self.room - held, int(self.room * MIN_STRIP_SHARE))

    def _norm_act_conv(self, x, stats, norm, act, conv, *, on_gpu: bool, next_groups: int | None = None,
                       residual=None):
        """conv(act(norm(x))) over strips of rows (conv(x) where `norm` is None); with `residual=(resnet, input)`
        also adds the resnet's shortcut and divides by its output scale. Returns the output and its GroupNorm
        statistics."""
        n, c, h, w = x.shape
        c_out = conv.out_channels
        if stats is None and norm is not None:
            stats = self._gather(x, norm.num_groups)
        out = self._empty((n, c_out, h, w), x.dtype, on_gpu=on_gpu)
        out_stats = _Stats(next_groups) if next_groups else None
        rows = self._rows(w, c + (residual[1].shape[1] if residual else 0), c_out, x.dtype,
                          self._spare(x, on_gpu, c_out),
                          self.transfers.crossing(x, out, *([residual[1]] if residual else [])))
        owned = [(a, min(a + rows, h)) for a in range(0, h, rows)]
        halo = [(max(a - 1, 0), min(b + 1, h)) for a, b in owned]  # the rows a 3x3 convolution reads
        shortcuts = self.transfers.strips(residual[1], owned) if residual is not None else None
        writer = self.transfers.writer(out, rows)
        for (a, b), strip in zip(owned, self.transfers.strips(x, halo)):
            if norm is not None:
                strip = act(_normalize(strip, stats, norm))
            y = _conv_rows(conv, strip, top=(a == 0), bottom=(b == h))
            if residual is not None:
                resnet = residual[0]
                shortcut = next(shortcuts)
                if resnet.conv_shortcut is not None:
                    shortcut = resnet.conv_shortcut(shortcut)
                y = (shortcut + y) / resnet.output_scale_factor
            if out_stats is not None:
                out_stats.add(y)
            writer.write(a, b, y)
        writer.close()
        return out, out_stats


class StripDecoder(_StripWalk):
    """Decodes latents exactly within `room` bytes of GPU memory for activations (weights not counted)."""

    def __init__(self, vae, device: torch.device, room: int, spill_dir: str | os.PathLike | None = None,
                 pinned_limit: int | None = None):
        if not supports(vae):
            raise ValueError(f"{type(vae).__name__}: not a decoder that can be decoded in strips")
        super().__init__(vae, device, room, spill_dir, pinned_limit)
        self.decoder = vae.decoder

    @torch.inference_mode()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """What `vae.decode(z).sample` computes (z already divided by the scaling factor)."""
        z = self._start(z)
        vae, dec = self.vae, self.decoder
        if vae.post_quant_conv is not None:
            z = vae.post_quant_conv(z)
        x = dec.mid_block(dec.conv_in(z), None)  # latent resolution: small, attention needs it whole
        stats = None
        for block in dec.up_blocks:
            for resnet in block.resnets:
                x, stats = self._resnet(resnet, x, stats)
                self._settle()
            for up in block.upsamplers or []:
                x, stats = self._upsample(up, x)
                self._settle()
        out, _ = self._norm_act_conv(x, stats, dec.conv_norm_out, dec.conv_act, dec.conv_out, on_gpu=True)
        return out

    def _upsample(self, up, x: torch.Tensor):
        n, c, h, w = x.shape
        if x.device == self.device and UPSAMPLE_WHOLE_TENSORS * self._bytes((n, c, 2 * h, 2 * w), x.dtype) <= self.room:
            return up(x), None
        self.strips_used += 1
        H, W = 2 * h, 2 * w
        keep = UPSAMPLE_KEPT_TENSORS * self._bytes((n, c, H, W), x.dtype) <= self.room * KEEP_SHARE
        out = self._empty((n, c, H, W), x.dtype, on_gpu=keep)
        rows = self._rows(W, c, c, x.dtype, self._spare(x, keep, 4 * c), self.transfers.crossing(x, out))
        rows += rows % 2
        owned = [(a, min(a + rows, H)) for a in range(0, H, rows)]
        halo = [(max(a - 1, 0), min(b + 1, H)) for a, b in owned]  # rows of the upsampled image the conv reads
        writer = self.transfers.writer(out, rows)
        sources = self.transfers.strips(x, [(lo // 2, (hi + 1) // 2) for lo, hi in halo])
        for (a, b), (lo, hi), src in zip(owned, halo, sources):
            big = F.interpolate(src, scale_factor=2.0, mode="nearest")[:, :, lo - 2 * (lo // 2):][:, :, :hi - lo]
            writer.write(a, b, _conv_rows(up.conv, big, top=(a == 0), bottom=(b == H)))
        writer.close()
        return out, None


class StripEncoder(_StripWalk):
    """Encodes images exactly within `room` bytes of GPU memory for activations (weights not counted): what
    `vae.encode(x).latent_dist.parameters` holds, the latent distribution's mean and log-variance."""

    def __init__(self, vae, device: torch.device, room: int, spill_dir: str | os.PathLike | None = None,
                 pinned_limit: int | None = None):
        if not supports_encoder(vae):
            raise ValueError(f"{type(vae).__name__}: not an encoder that can run in strips")
        super().__init__(vae, device, room, spill_dir, pinned_limit)
        self.encoder = vae.encoder

    @torch.inference_mode()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The moments `vae.encode(x)` computes for the images `x` (N, 3, H, W), as `AutoencoderKL._encode`."""
        x = self._start(x)
        enc = self.encoder
        x, stats = self._conv_in(enc.conv_in, x, enc.down_blocks[0].resnets[0].norm1.num_groups)
        self._settle()
        for block in enc.down_blocks:
            for resnet in block.resnets:
                x, stats = self._resnet(resnet, x, stats)
                self._settle()
            for down in block.downsamplers or []:
                x, stats = self._downsample(down, x)
                self._settle()
        if isinstance(x, _HostRows):  # latent resolution: small, and the mid block's attention needs it whole
            x = x.rows(0, x.shape[2], self.device).contiguous()
        x = enc.conv_out(enc.conv_act(enc.conv_norm_out(enc.mid_block(x))))
        return self.vae.quant_conv(x) if self.vae.quant_conv is not None else x

    def _conv_in(self, conv, x: torch.Tensor, next_groups: int):
        n, _, h, w = x.shape
        out_bytes = self._bytes((n, conv.out_channels, h, w), x.dtype)
        if CONV_IN_WHOLE_TENSORS * out_bytes <= self.room:
            return conv(x), None
        self.strips_used += 1
        keep = CONV_IN_KEPT_TENSORS * out_bytes <= self.room * KEEP_SHARE
        return self._norm_act_conv(x, None, None, None, conv, on_gpu=keep, next_groups=next_groups)

    def _downsample(self, down, x):
        """Downsample2D with padding 0: pad one zero column on the right and one row at the bottom, then a 3x3
        convolution of stride 2. Output row r reads input rows 2r to 2r+2."""
        n, c, h, w = x.shape
        conv = down.conv
        H, W = (h - 2) // 2 + 1, (w - 2) // 2 + 1  # the padded (h+1, w+1) under a 3x3 kernel of stride 2
        if x.device == self.device and DOWNSAMPLE_WHOLE_TENSORS * self._bytes(x.shape, x.dtype) <= self.room:
            return down(x), None
        self.strips_used += 1
        out_shape = (n, conv.out_channels, H, W)
        keep = DOWNSAMPLE_KEPT_TENSORS * self._bytes(out_shape, x.dtype) <= self.room * KEEP_SHARE
        out = self._empty(out_shape, x.dtype, on_gpu=keep)
        rows = self._rows(W, 4 * c, conv.out_channels, x.dtype, self._spare(x, keep, conv.out_channels // 4))
        for a in range(0, H, rows):
            b = min(a + rows, H)
            src = _rows(x, 2 * a, min(2 * b + 1, h), self.device)
            missing = 2 * (b - a) + 1 - src.shape[2]  # rows past the image: the bottom row of zero padding
            src = F.pad(src, (0, 1, 0, missing))
            _write(out, a, b, F.conv2d(src, conv.weight, conv.bias, stride=2))
        return out, None


def _pinned_size(size: int) -> int:
    """What torch's caching host allocator takes for a pinned block of `size` bytes: the next power of two."""
    return 1 << max(0, (size - 1).bit_length())


class _HostPool:
    """Host bytes as torch's caching host allocator holds them: each pinned block rounded up to a power of two,
    freed blocks kept for reuse by a request of the same rounded size (never returned within the stage). Blocks
    past `pinned_limit` (counted as the decoder counts them, every pinned request of one decode) go to a file."""

    def __init__(self, pinned_limit: int | None):
        self.limit = pinned_limit
        self.free: list[int] = []
        self.counted = self.held = self.in_files = self.peak_in_files = 0

    def alloc(self, size: int) -> tuple[int, bool]:
        rounded = _pinned_size(size)
        if self.limit is not None and self.counted + rounded > self.limit:
            self.in_files += size
            self.peak_in_files = max(self.peak_in_files, self.in_files)
            return size, False
        self.counted += rounded
        if rounded in self.free:
            self.free.remove(rounded)
        else:
            self.held += rounded
        return rounded, True

    def release(self, block: tuple[int, bool] | None) -> None:
        if block is not None:
            size, pinned = block
            if pinned:
                self.free.append(size)
            else:
                self.in_files -= size


def host_bytes(channels: list[int] | tuple[int, ...], layers: int, width: int, height: int, itemsize: int,
               room: int, pinned_limit: int | None = None) -> tuple[int, int]:
    """Host bytes a `StripDecoder` with `room` (and `pinned_limit`) holds to decode one `width` x `height` image
    of a VAE with these `block_out_channels` and `layers_per_block`: (pinned RAM as torch's allocator holds it,
    the most bytes alive at once in spill files). Pure arithmetic: the walk of `decode` with the same rules for
    what runs whole, what stays on the GPU and what waits on the host."""
    pool = _HostPool(pinned_limit)
    order = list(reversed(channels))
    h, w = height >> (len(order) - 1), width >> (len(order) - 1)
    c = order[0]
    on_host = None  # the current activation's block where it waits on the host

    def size(ch: int, rows: int, cols: int) -> int:
        return ch * rows * cols * itemsize

    for i, c_out in enumerate(order):
        for _ in range(layers + 1):
            on_host = _host_resnet(pool, on_host, size(max(c, c_out), h, w), size(c_out, h, w), room)
            c = c_out
        if i < len(order) - 1:  # every up block but the last ends in an upsampler
            h, w = 2 * h, 2 * w
            on_host = _host_layer(pool, on_host, whole=UPSAMPLE_WHOLE_TENSORS * size(c, h, w) <= room,
                                  kept=UPSAMPLE_KEPT_TENSORS * size(c, h, w) <= room * KEEP_SHARE,
                                  outputs=[size(c, h, w)])
    return pool.held, pool.peak_in_files


def encoder_host_bytes(channels: list[int] | tuple[int, ...], layers: int, width: int, height: int, itemsize: int,
                       room: int, pinned_limit: int | None = None) -> tuple[int, int]:
    """`host_bytes` for a `StripEncoder` encoding one `width` x `height` image: the walk of `encode` with its
    rules, in the same arithmetic."""
    pool = _HostPool(pinned_limit)
    h, w, c = height, width, channels[0]

    def size(ch: int, rows: int, cols: int) -> int:
        return ch * rows * cols * itemsize

    first = size(c, h, w)  # conv_in's output: the input is on the GPU, so only the output may wait on the host
    on_host = _host_layer(pool, None, whole=CONV_IN_WHOLE_TENSORS * first <= room,
                          kept=CONV_IN_KEPT_TENSORS * first <= room * KEEP_SHARE, outputs=[first])
    for i, c_out in enumerate(channels):
        for _ in range(layers):
            on_host = _host_resnet(pool, on_host, size(max(c, c_out), h, w), size(c_out, h, w), room)
            c = c_out
        if i < len(channels) - 1:  # every down block but the last ends in a downsampler
            H, W = (h - 2) // 2 + 1, (w - 2) // 2 + 1
            on_host = _host_layer(pool, on_host, whole=DOWNSAMPLE_WHOLE_TENSORS * size(c, h, w) <= room,
                                  kept=DOWNSAMPLE_KEPT_TENSORS * size(c, H, W) <= room * KEEP_SHARE,
                                  outputs=[size(c, H, W)])
            h, w = H, W
    return pool.held, pool.peak_in_files


def _host_resnet(pool: _HostPool, on_host, widest: int, out: int, room: int):
    """A resnet of a strip walk, in host blocks: whole where its widest activation fits RESNET_WHOLE_TENSORS
    times; else in strips, its middle activation and output kept on the GPU or waiting on the host."""
    return _host_layer(pool, on_host, whole=widest * RESNET_WHOLE_TENSORS <= room,
                       kept=RESNET_KEPT_TENSORS * widest <= room * KEEP_SHARE, outputs=[out, out])


def _host_layer(pool: _HostPool, on_host, *, whole: bool, kept: bool, outputs: list[int]):
    """One layer of a strip walk in host blocks: `on_host` is the block its input waits in (None: on the GPU);
    returns the block its output waits in. A layer runs whole when its input is on the GPU and `whole` says it
    fits; in strips, its `outputs` (the last is what it returns) stay on the GPU where `kept`, else wait on the
    host, the earlier ones freed once the last is made."""
    if on_host is None and whole:
        return None
    if kept:
        pool.release(on_host)
        return None
    blocks = [pool.alloc(n) for n in outputs]
    for block in blocks[:-1] + [on_host]:
        pool.release(block)
    return blocks[-1]


def _conv_rows(conv: nn.Conv2d, strip: torch.Tensor, *, top: bool, bottom: bool) -> torch.Tensor:
    """A 3x3 convolution (padding 1) of the rows a strip owns: the strip carries a one-row halo on each side
    except at the image's edges, where the zero padding the whole-image convolution sees is added instead."""
    if top or bottom:
        strip = F.pad(strip, (0, 0, int(top), int(bottom)))
    return F.conv2d(strip, conv.weight, conv.bias, stride=1, padding=(0, 1))
