"""What a stage is handed: one context with the run's folder, device, dtype, its plan entry, the reporter and the
stop flag. A stage loads its component, works through what it was given, persists each result as it goes, and
closes whatever it opened in a `finally`, whatever stops it."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from .compiling import CompiledBlocks
from .errors import Interrupted
from .memory import StageMeter
from .models import ModelInfo
from .placement import StagePlan
from .reporting import Reporter
from .run import RunFolder


@dataclass
class StageContext:
    info: ModelInfo
    folder: RunFolder
    device: torch.device
    dtype: torch.dtype  # the run's dtype: embeddings are stored in it
    plan: StagePlan
    reporter: Reporter = field(default_factory=Reporter)
    meter: StageMeter | None = None  # the run's measurement of the stage; None: unmeasured
    stop: threading.Event = field(default_factory=threading.Event)
    compute_dtype: torch.dtype | None = None  # what the stage's component computes in; None: `dtype`
    # what came out non-finite (overflow): text keys (encode), init image keys (vae-encode), latent keys (denoise)
    # or item ids (decode); nothing of them is written, so a rerun makes them again
    failed: list[str] = field(default_factory=list)
    # artifacts written so far, counted as each is written: what the stage made, however it ends
    made: int = 0

    def __post_init__(self) -> None:
        if self.compute_dtype is None:
            self.compute_dtype = self.dtype

    def checkpoint(self) -> None:
        """A safe point: everything finished so far is on disk. Stop here if the user asked to."""
        if self.stop.is_set():
            raise Interrupted("stop requested")

    def finite(self, tensor: torch.Tensor, what: str) -> bool:
        """Whether `tensor` holds only finite values; where not, `what` is recorded as failed."""
        if bool(torch.isfinite(tensor).all()):
            return True
        self.failed.append(what)
        return False

    def compiled(self, record: CompiledBlocks) -> None:
        """The stage compiled its model's blocks: the time it took goes into the stage's figures, and a compiler
        that failed (the stage ran eager instead: the same images, slower) is told."""
        if self.meter is not None:
            self.meter.stats.compile_seconds = record.seconds
        if record.fallback:
            self.reporter.info(f"torch.compile failed ({record.fallback}): the blocks ran without it")

    def loaded(self, *components) -> None:
        """Loading is over; `components` are what the stage loaded, watched so that their release is checked."""
        if self.meter is not None:
            self.meter.loaded(*components)
