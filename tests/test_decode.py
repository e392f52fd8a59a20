"""The decode stage's hand-over to the PNG writer: pixels computed on the device equal diffusers' own conversion, and
the writer keeps a bounded backlog and reports a failed write."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from pixart_lowvram.decode import PngWriter, to_pixels


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_pixels_equal_diffusers_conversion(dtype):
    """Every value diffusers' postprocess can meet, and the halfway points between two levels (where rounding
    decides), convert to the same 8-bit pixels as its `pt_to_numpy` and `numpy_to_pil`."""
    levels = torch.arange(0, 256, dtype=torch.float64)
    values = torch.cat([torch.rand(3 * 64 * 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                        levels / 255, (levels + 0.5) / 255, torch.tensor([0.0, 1.0])]).clamp(0, 1)
    values = torch.cat([values, values[: (-len(values)) % 3]])  # whole pixels of 3 channels
    images = values.to(dtype).reshape(1, 3, 1, -1)

    expected = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))[0]
    ours = Image.fromarray(to_pixels(images)[0].numpy())
    assert np.array_equal(np.asarray(ours), np.asarray(expected))


class SlowFolder:
    """Stands in for the run folder: each write waits for `go`, and the paths given are recorded in order."""

    def __init__(self, fail: str | None = None):
        self.go = threading.Event()
        self.written: list[str] = []
        self.fail = fail

    def write_png(self, path, picture, text) -> None:
        self.go.wait()
        if path == self.fail:
            raise OSError(28, "No space left on device")
        self.written.append(path)


def test_the_writer_holds_back_the_decoding_when_its_backlog_is_full():
    folder = SlowFolder()
    writer = PngWriter(folder, threads=1, backlog=2)
    writer.submit("a", None, {})
    writer.submit("b", None, {})
    third = threading.Thread(target=writer.submit, args=("c", None, {}))
    third.start()
    time.sleep(0.2)
    assert third.is_alive(), "a third image waits while two are queued"
    folder.go.set()
    third.join(5)
    writer.close()
    assert writer.finish() == 3 and folder.written == ["a", "b", "c"]


def test_a_failed_write_stops_the_stage():
    folder = SlowFolder(fail="b")
    folder.go.set()
    writer = PngWriter(folder, threads=1, backlog=2)
    writer.submit("a", None, {})
    writer.submit("b", None, {})
    writer.close()
    with pytest.raises(OSError, match="No space left"):
        writer.finish()
    assert folder.written == ["a"]
