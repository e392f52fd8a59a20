"""The offline demo: the seed article's queue on a tiny random-weight model built in the cache folder."""
from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

from .jobs import Job, parse_queue
from .reporting import Reporter

SEED_QUEUE = "seed-queue.toml"


def seed_queue_text() -> str:
    """The article's queue, shipped inside the package (examples/seed-queue.toml in the repository)."""
    return resources.files("pixart_lowvram").joinpath("examples", SEED_QUEUE).read_text(encoding="utf-8")


def demo_jobs() -> list[Job]:
    """The article's queue at the model's own (small) size: the pirate ship asks for 1024x1024."""
    jobs = parse_queue(seed_queue_text(), "toml", source=SEED_QUEUE)
    return [dataclasses.replace(job, width=None, height=None) for job in jobs]


def demo_model(cache_dir: Path, reporter: Reporter) -> Path:
    """The demo's tiny model in the cache folder, built on first use. The cache is ours: a copy found damaged
    (a truncated or missing weights file, say) is built again, with a word to the user, never reported as a
    model to download again."""
    from .errors import ModelError  # noqa: PLC0415
    from .models import resolve_model  # noqa: PLC0415
    from .random_model import MARKER  # noqa: PLC0415

    path = cache_dir / "tiny-random"
    model = _build(path, reporter)
    try:
        resolve_model(str(model))
    except ModelError as exc:
        reporter.info(f"the demo model in {model} is damaged ({exc}); building it again")
        (model / MARKER).unlink(missing_ok=True)  # without its marker the folder counts as half-written
        model = _build(path, reporter)
    return model


def _build(path: Path, reporter: Reporter) -> Path:
    from .random_model import make_random_model  # noqa: PLC0415

    with reporter.bar("tiny model", total=None, unit="part", transient=True) as bar:
        return make_random_model(path, "tiny", seed=0, progress=lambda done, total, what: bar.update())
