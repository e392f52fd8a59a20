"""What the bench scripts share: comparing their images, and writing measured tables into BENCHMARKS.md (a whole
"## " section, or the part between two markers, so that what was written by hand around a table stays)."""
from __future__ import annotations

import re
from pathlib import Path


def queue_arguments(parser) -> None:
    """What every bench that runs a queue takes: where its results go, the model folder, the queue."""
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="/tmp/pixart-xl-random")
    parser.add_argument("--queue", default="examples/seed-queue.toml")


def event_times(fn, reps: int, warm: int = 0) -> list[float]:
    """Milliseconds of each of `reps` calls of `fn()` on the current CUDA device, by CUDA events, after `warm`
    untimed calls."""
    import torch  # noqa: PLC0415

    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def replace_section(path: Path, heading: str, text: str) -> None:
    """Replace the section `## heading` (up to the next "## " heading) with `text`, or append it."""
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda m: text + "\n", old, count=1) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new.rstrip("\n") + "\n", encoding="utf-8")


def replace_marked(path: Path, name: str, text: str) -> None:
    """Replace what lies between `<!-- name:begin -->` and `<!-- name:end -->` with `text`."""
    old = path.read_text(encoding="utf-8")
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(old):
        raise SystemExit(f"{path}: no {begin} ... {end} to write between")
    path.write_text(pattern.sub(lambda m: f"{begin}\n{text.strip()}\n{end}", old, count=1), encoding="utf-8")


def max_pixel_diff(a: Path, b: Path) -> int:
    """The largest difference of any channel of any pixel between two images, on 0-255."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    x = np.asarray(Image.open(a).convert("RGB")).astype(int)
    y = np.asarray(Image.open(b).convert("RGB")).astype(int)
    return int(np.abs(x - y).max())
