"""Errors of our own, with messages written for the person running the tool.

The CLI turns each into a message and an exit code; no traceback reaches the user for these.
"""
from __future__ import annotations

from dataclasses import dataclass


class PixartError(Exception):
    """Base of every error this library raises on purpose. Each kind names its exit code where it is declared:
    `class StorageError(PixartError, exit_code=1)`."""

    exit_code = 1

    def __init_subclass__(cls, exit_code: int | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if exit_code is not None:
            cls.exit_code = exit_code


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a queue: where (job and field) and what."""

    message: str
    job_index: int | None = None  # 1-based position in the queue, None for the whole document
    job_name: str | None = None
    field: str | None = None
    hint: str | None = None

    def where(self) -> str:
        parts = []
        if self.job_index is not None:
            job = f"job {self.job_index}"
            if self.job_name:
                job += f" ({self.job_name!r})"
            parts.append(job)
        if self.field:
            parts.append(f"field {self.field!r}")
        return ", ".join(parts)

    def __str__(self) -> str:
        where = self.where()
        text = f"{where}: {self.message}" if where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class QueueError(PixartError, exit_code=2):
    """The queue (a file or command-line options) is not valid. Raised before any model loads."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        count = len(self.problems)
        lines = [f"{head}{count} problem{'s' if count != 1 else ''} in the queue:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class UsageError(PixartError, exit_code=2):
    """A command-line option or API argument that cannot work (bad device, dtype, folder...)."""


class InputErrors(PixartError, exit_code=2):
    """Several inputs are wrong at once (options, model folder, queue): each is told, before anything loads."""

    def __init__(self, errors: list[PixartError]):
        self.errors = list(errors)
        super().__init__(f"{len(self.errors)} problems, nothing was loaded:\n" +
                         "\n".join(f"- {str(e).replace(chr(10), chr(10) + '  ')}" for e in self.errors))


class ModelError(PixartError, exit_code=2):
    """The model cannot be found or loaded: names the file or folder at fault."""


class RunFolderError(PixartError, exit_code=1):
    """The run folder cannot be used or written (unwritable, locked by another run, a file in its way)."""


class NotARunFolder(RunFolderError, exit_code=2):
    """--out names a file, or a folder of other files: not an empty folder nor one of our run folders."""


class StorageError(PixartError, exit_code=1):
    """Writing to the run folder failed mid-run (disk full, permissions changed); finished work is kept."""


class OutOfMemory(PixartError, exit_code=3):
    """The GPU ran out of memory; finished work is kept and the message says what to try."""


class Interrupted(PixartError, exit_code=130):
    """The user asked to stop (Ctrl-C); finished work is kept."""


class RankFailed(PixartError, exit_code=5):
    """A run over several processes (GPUs) stopped because one of them failed, died or could not be reached; the
    others stopped at their next safe point and finished work is kept. Where the process that failed said why
    (out of memory, a full disk, Ctrl-C), the run ends with that error's own exit code; 5 where it died (killed,
    crashed), hung or could not be reached."""

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
