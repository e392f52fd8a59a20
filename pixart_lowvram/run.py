"""The run folder: manifest, atomic artifacts keyed to what made them, and what is left to do (resume).

    <run>/run.json                     manifest: model, settings, expanded items, per-stage figures
    <run>/embeds/<text key>.safetensors one text's embedding and mask
    <run>/latents/<latent key>.safetensors
    <run>/images/<item id>.png          generation parameters in PNG text chunks

Embeddings are stored per distinct text, so equal prompts (and the common empty negative prompt) are encoded
and stored once. Every artifact records the key of what made it (model component, dtype, parameters); one whose
key does not match, or that cannot be read, is redone, never trusted.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import tempfile
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from .errors import RunFolderError, StorageError
from .items import Item
from .jobs import MAX_SEED

MANIFEST = "run.json"
MANIFEST_VERSION = 1
KEY_METADATA = "pixart_lowvram_key"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # every whole PNG ends with this IEND chunk


def read_artifact(path: Path, key: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor] | None:
    """The tensors if the file is whole, made by `key`, and of the expected shapes; otherwise None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get(KEY_METADATA) != key:
                return None
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return None
    for name, shape in shapes.items():
        if name not in tensors or tuple(tensors[name].shape) != tuple(shape):
            return None
        if not torch.isfinite(tensors[name].float()).all():
            return None
    return tensors


def _signature(path: Path) -> tuple[int, int, int]:
    """What changes when a file is replaced or rewritten (OSError where there is none, or not a regular file)."""
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise IsADirectoryError(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _key_in(text: dict[str, str]) -> str | None:
    """The key in a PNG's `pixart_lowvram` text chunk."""
    meta = json.loads(text.get("pixart_lowvram", "{}"))
    return meta.get("key") if isinstance(meta, dict) else None


class RunFolder:
    """One run's folder. Holds an exclusive lock while open, so two runs never write the same folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.embeds = self.path / "embeds"
        self.latents = self.path / "latents"
        self.images = self.path / "images"
        self._lock_file = None
        # PNG -> (its stat signature, the key it carries or None): what png_is_done found or write_png wrote, so
        # an unchanged file is not decoded again (a 1024x1024 PNG takes ~0.1 s) each time the manifest is written
        self._png_keys: dict[Path, tuple[tuple[int, int, int], str | None]] = {}

    # -- opening ---------------------------------------------------------------------------------------------
    def open(self) -> RunFolder:
        try:
            for folder in (self.path, self.embeds, self.latents, self.images):
                folder.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.path / ".lock", "w")  # noqa: SIM115 - held for the run's life
        except OSError as exc:
            raise RunFolderError(f"{self.path}: cannot create the run folder ({exc.strerror or exc})") from exc
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock_file.close()
            self._lock_file = None
            raise RunFolderError(f"{self.path}: another pixart-lowvram run is using this folder") from exc
        self._check_writable()
        self._remove_leftovers()
        return self

    def _remove_leftovers(self) -> None:
        """Half-written temporaries of a run that was killed (`_atomic` names them .NAME.RANDOM.tmp): never taken
        for artifacts, but they would pile up. Only with the lock held: no other run is writing them."""
        for folder in (self.path, self.embeds, self.latents, self.images):
            for leftover in folder.glob(".*.tmp"):
                try:
                    leftover.unlink()
                except OSError:
                    pass  # removed meanwhile, or not ours to remove: harmless either way

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> RunFolder:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_writable(self) -> None:
        for folder in (self.path, self.embeds, self.latents, self.images):
            try:
                with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
                    pass
            except OSError as exc:
                raise RunFolderError(f"{folder}: not writable ({exc.strerror or exc})") from exc

    # -- paths -----------------------------------------------------------------------------------------------
    def embed_path(self, key: str) -> Path:
        return self.embeds / f"{key}.safetensors"

    def latent_path(self, key: str) -> Path:
        return self.latents / f"{key}.safetensors"

    def image_path(self, item: Item) -> Path:
        return self.images / f"{item.id}.png"

    # -- atomic writes ---------------------------------------------------------------------------------------
    def _atomic(self, path: Path, write) -> None:
        """Write through a temporary file in the same folder, flush it to disk, then rename over `path`:
        a reader (or a rerun after a crash) sees the old file or the whole new one, never half of one."""
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            if isinstance(exc, OSError):
                why = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
                raise StorageError(f"{path}: cannot write it ({why}). Finished work is kept in {self.path}; "
                                   "make room (or fix the folder) and run the same command again.") from exc
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def write_tensors(self, path: Path, tensors: dict[str, torch.Tensor], key: str, **metadata: str) -> None:
        data = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        meta = {KEY_METADATA: key, **metadata}
        self._atomic(path, lambda f: f.write(save(data, metadata=meta)))

    def read_tensors(self, path: Path, key: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor] | None:
        return read_artifact(path, key, shapes)

    def write_png(self, path: Path, image: Image.Image, text: dict[str, str]) -> None:
        info = PngImagePlugin.PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
        self._atomic(path, lambda f: image.save(f, format="PNG", pnginfo=info))
        self._png_keys[path] = (_signature(path), _key_in(text))

    def png_is_done(self, path: Path, key: str) -> bool:
        try:
            signature = _signature(path)
        except OSError:
            return False
        known = self._png_keys.get(path)
        if known is None or known[0] != signature:
            known = (signature, self._read_png_key(path))
            self._png_keys[path] = known
        return known[1] == key

    @staticmethod
    def _read_png_key(path: Path) -> str | None:
        """The key a finished PNG carries; None for a file that is not one (truncated, damaged, not ours)."""
        try:
            with open(path, "rb") as f:  # PIL stops reading once it has the pixels: check the file's end too
                f.seek(-len(_PNG_END), os.SEEK_END)
                if f.read() != _PNG_END:
                    return None
            with Image.open(path) as im:
                im.load()  # reads every chunk: a truncated file fails here
                return _key_in(im.text)
        except (OSError, ValueError, SyntaxError):
            return None

    # -- manifest --------------------------------------------------------------------------------------------
    def read_manifest(self) -> dict | None:
        path = self.path / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # a damaged manifest is rebuilt; the artifacts carry their own keys
        return data if _manifest_is_sound(data) else None

    def write_manifest(self, manifest: dict) -> None:
        text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
        self._atomic(self.path / MANIFEST, lambda f: f.write(text.encode("utf-8")))



def _manifest_is_sound(data: object) -> bool:
    """The fields a rerun reads back have the shapes it expects; anything else is rebuilt, never trusted."""
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION:
        return False
    seeds, items, left = data.get("drawn_seeds", {}), data.get("items", []), data.get("left_alone", [])
    return (isinstance(seeds, dict)
            and all(isinstance(v, list) and all(isinstance(x, int) and 0 <= x <= MAX_SEED for x in v)
                    for v in seeds.values())
            and isinstance(items, list) and all(isinstance(i, dict) and isinstance(i.get("image", ""), str)
                                                for i in items)
            and isinstance(left, list) and all(isinstance(p, str) for p in left))


class EmbeddingCache:
    """Prompt embeddings shared across runs (same model, dtype, text and token limit: the same key), so a queue
    of known prompts never loads T5 at all. Files are keyed exactly like a run folder's and checked the same way."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def file(self, key: str) -> Path:
        return self.path / f"{key}.safetensors"

    def store(self, key: str, source: Path) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{key}.", suffix=".tmp")
        except OSError:
            return  # a cache that cannot be written only costs a later run an encode
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(source.read_bytes())
            os.replace(tmp, self.file(key))
        except OSError:
            try:
                os.unlink(tmp)  # a full disk, say: leave no partial file behind
            except OSError:
                pass

    def restore(self, key: str, shapes: dict, folder: RunFolder) -> bool:
        """Copy a valid cached embedding into the run folder; False if there is none."""
        tensors = read_artifact(self.file(key), key, shapes)
        if tensors is None:
            return False
        with safe_open(str(self.file(key)), framework="pt") as f:
            text = (f.metadata() or {}).get("text", "")
        folder.write_tensors(folder.embed_path(key), tensors, key, text=text)
        return True
