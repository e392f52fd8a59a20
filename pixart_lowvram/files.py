"""Writing a file whole or not at all: the run folder's artifacts, the caches and the random-model builder share
this one writer, and its temporary files are named so that each of them can tell its own leftovers."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

TEMP_MARK = ".pixart-lowvram-"  # in every temporary file's name: .NAME.pixart-lowvram-RANDOM.tmp


def cache_dir() -> Path:
    """The user's cache folder for this tool ($XDG_CACHE_HOME/pixart-lowvram, else ~/.cache/pixart-lowvram): shared
    prompt embeddings, weights files' hashes, the demo model."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pixart-lowvram"


def is_temporary(name: str) -> bool:
    """Whether a file name is one of our temporary files (a write that did not finish)."""
    return name.startswith(".") and TEMP_MARK in name and name.endswith(".tmp")


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (os.umask would set it for a moment,
    under the PNG writer threads' feet)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through a temporary file in its folder, flushed to disk, then renamed over it (and the folder
    flushed): a reader, or a rerun after a crash, sees the old file or the whole new one, never half of one. The
    file gets the mode a plain open() would give it: mkstemp makes 0600, but images and run folders are meant to
    be shared and served. Whatever fails, the temporary file is removed and the error raised."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
