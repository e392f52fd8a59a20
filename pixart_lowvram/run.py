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
import itertools
import json
import os
import re
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from .errors import NotARunFolder, RunFolderError, StorageError
from .files import TEMP_MARK, write_atomic
from .items import Item
from .jobs import MAX_COUNT, MAX_SEED, read_limited

MANIFEST = "run.json"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 256 * 2**20  # read at most this much of run.json (100,000 images take ~40 MB)
KEY_METADATA = "pixart_lowvram_key"
# Every temporary file this tool writes is named .<final name>.pixart-lowvram-<random>.tmp: the only files a run
# ever removes on its own are ones with this mark.
_OUR_TEMP = re.compile(r"\..+\.pixart-lowvram-[A-Za-z0-9_]+\.tmp")
_OUR_NAMES = {MANIFEST, ".lock", "embeds", "latents", "images"}
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


def _meta_in(text: dict[str, str]) -> dict:
    """The item in a PNG's `pixart_lowvram` text chunk (its key, seed, ...); {} where there is none."""
    try:
        meta = json.loads(text.get("pixart_lowvram", "{}"))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _key_of(meta: dict) -> str | None:
    """The key an item's PNG metadata carries."""
    key = meta.get("key")
    return key if isinstance(key, str) else None


@dataclass
class PreviousRun:
    """What an earlier run of this folder left: its manifest ({} if none), the drawn seeds to reuse, and, when
    run.json was damaged, what happened (for the user) and how many seeds were recovered from finished files."""

    manifest: dict = field(default_factory=dict)
    drawn_seeds: dict[str, list[int | None]] = field(default_factory=dict)
    damage: str | None = None


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
        self.check_ours()
        for folder in (self.path, self.embeds, self.latents, self.images):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except FileExistsError as exc:
                raise RunFolderError(f"{folder}: is a file, not a folder; the run folder needs it as a folder "
                                     "(move the file away)") from exc
            except OSError as exc:
                raise RunFolderError(f"{folder}: cannot create the run folder ({exc.strerror or exc})") from exc
        lock = self.path / ".lock"
        try:
            # Never through a planted link, never truncating: the file only carries the lock, not data.
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            why = ("it is a symbolic link; remove it" if exc.errno == errno.ELOOP else exc.strerror or str(exc))
            raise RunFolderError(f"{lock}: cannot open the run folder's lock ({why})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise RunFolderError(f"{self.path}: another pixart-lowvram run is using this folder") from exc
        self._lock_file = os.fdopen(fd, "rb")
        self._check_writable()
        self._remove_leftovers()
        return self

    def check_ours(self) -> None:
        """Refuse a folder that is neither empty nor a run folder of this tool (NotARunFolder, exit code 2):
        a run writes run.json, images/NAME.png and removes its own temporaries, which must never meet the
        user's files of those names. Ours: a whole manifest of ours, or (run.json damaged, or a run killed
        before writing it) the lock file beside nothing but names this tool makes."""
        if self.path.is_file():
            raise NotARunFolder(f"{self.path}: is a file, not a folder; choose another --out")
        try:
            names = sorted(os.listdir(self.path))
        except (FileNotFoundError, NotADirectoryError):
            return  # a new folder (open says so if one cannot be made there)
        except OSError as exc:
            raise RunFolderError(f"{self.path}: cannot read the run folder ({exc.strerror or exc})") from exc
        if not names or (".lock" in names and all(n in _OUR_NAMES or _OUR_TEMP.fullmatch(n) for n in names)):
            return
        if _manifest_is_ours(self.path / MANIFEST):
            return
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise NotARunFolder(f"{self.path}: not an empty folder nor a pixart-lowvram run folder (it holds {shown}); "
                            "a run would write its files among yours. Choose another --out (a new or empty "
                            "folder, or an earlier run's folder)")

    def _remove_leftovers(self) -> None:
        """Half-written temporaries of a run that was killed: never taken for artifacts, but they would pile up.
        Only files with our own mark, never through a linked subfolder (it may lead anywhere), and only with
        the lock held: no other run is writing them."""
        for folder in (self.path, self.embeds, self.latents, self.images):
            if folder != self.path and folder.is_symlink():
                continue
            for leftover in folder.glob(f".*{TEMP_MARK}*.tmp"):
                if not _OUR_TEMP.fullmatch(leftover.name) or not leftover.is_file() or leftover.is_symlink():
                    continue
                try:
                    leftover.unlink()
                except OSError:
                    pass  # removed meanwhile: harmless

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
                with tempfile.NamedTemporaryFile(dir=folder, prefix=f".probe{TEMP_MARK}", suffix=".tmp"):
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
        """`files.write_atomic`, with a failure told as the run folder's (finished work kept, what to do)."""
        try:
            write_atomic(path, write)
        except OSError as exc:
            why = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise StorageError(f"{path}: cannot write it ({why}). Finished work is kept in {self.path}; "
                               "make room (or fix the folder) and run the same command again.") from exc

    def write_tensors(self, path: Path, tensors: dict[str, torch.Tensor], key: str, **metadata: str) -> None:
        data = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        meta = {KEY_METADATA: key, **metadata}
        self._atomic(path, lambda f: f.write(save(data, metadata=meta)))

    def read_tensors(self, path: Path, key: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor] | None:
        return read_artifact(path, key, shapes)

    def read_made(self, path: Path, key: str, shapes: dict[str, tuple[int, ...]], what: str) -> dict[str, torch.Tensor]:
        """An artifact an earlier stage of this run made and checked (`what`: "the embedding", ...), for the next
        stage. Gone or unreadable by now (deleted meanwhile, or storage that lost it, or another host's rank
        that wrote it to storage this one does not see) is a RunFolderError that names it: the same command makes
        it again."""
        tensors = read_artifact(path, key, shapes)
        if tensors is None:
            raise RunFolderError(f"{path}: {what} made earlier in this run is gone or unreadable (deleted, or not on "
                                 "storage every process sees); run the same command again to make it anew")
        return tensors

    def write_png(self, path: Path, image: Image.Image, text: dict[str, str]) -> None:
        info = PngImagePlugin.PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
        self._atomic(path, lambda f: image.save(f, format="PNG", pnginfo=info))
        self._png_keys[path] = (_signature(path), _key_of(_meta_in(text)))

    def unfinished_images(self, items: list[Item]) -> list[Item]:
        """The items whose image is not finished (one listing of images/, then only the files that are there are
        looked at: a fresh queue of 100,000 images costs no stat per image)."""
        present = _listing(self.images)
        return [it for it in items
                if f"{it.id}.png" not in present or not self.png_is_done(self.images / f"{it.id}.png", it.image_key)]

    def unfinished_latents(self, items: list[Item], shapes) -> list[Item]:
        """The items whose latents are not finished; `shapes(item)` gives the latents' tensors and shapes."""
        present = _listing(self.latents)
        return [it for it in items if f"{it.latent_key}.safetensors" not in present or read_artifact(
            self.latent_path(it.latent_key), it.latent_key, shapes(it)) is None]

    def png_is_done(self, path: Path, key: str) -> bool:
        return self.png_key(path) == key

    @staticmethod
    def _read_png_key(path: Path) -> str | None:
        """The key a finished PNG carries; None for a file that is not one (truncated, damaged, not ours)."""
        meta = _read_png_meta(path)
        return None if meta is None else _key_of(meta)

    def png_key(self, path: Path, read: bool = True) -> str | None:
        """The key of the finished PNG at `path` (None: none there, or not a whole PNG of ours). `read=False`: only
        what is known of the file as it is now, never read (None where it would have to be)."""
        try:
            signature = _signature(path)
        except OSError:
            return None
        known = self._png_keys.get(path)
        if known is None or known[0] != signature:
            if not read:
                return None
            known = (signature, self._read_png_key(path))
            self._png_keys[path] = known
        return known[1]

    def known_pngs(self) -> dict[str, tuple[tuple[int, int, int], str]]:
        """The finished images this process wrote or read, by file name, with each file's signature as it saw it:
        another process working on the same folder takes them (`learn_pngs`) instead of reading each again."""
        return {path.name: known for path, known in self._png_keys.items()
                if known[1] is not None and path.parent == self.images}

    def learn_pngs(self, known: dict[str, tuple[tuple[int, int, int], str]]) -> None:
        """What another process found of the images (`known_pngs`); a file changed since (another signature) is
        read again when asked about."""
        for name, (signature, key) in known.items():
            self._png_keys[self.images / name] = (tuple(signature), key)

    # -- image names -----------------------------------------------------------------------------------------
    def claim_image_names(self, items: list[Item], previous: dict) -> list[tuple[Item, str]]:
        """Give each item an image file that holds nothing it may not replace, renaming the item (id~2, id~3...)
        where its own name is held. Replaceable: no file, a PNG of ours made with the item's own key (the same
        image), or a damaged file of ours (listed as an image by an earlier run of this folder, or a torn PNG
        that still shows our text chunk at its start: what a power cut leaves). Never
        replaced: a finished image made from other parameters (an edited job, other seeds, another model), a
        file of the user's. Returns (item, its former id) for each item renamed, for the user to be told."""
        try:
            present = {name.lower() for name in os.listdir(self.images)}
        except OSError:
            present = set()
        listed = {str(old.get("image", "")).lower() for old in previous.get("items", []) if isinstance(old, dict)}
        variants: dict[str, list[int]] = {}
        for name in present:
            found = re.fullmatch(r"(.+)~([1-9][0-9]*)\.png", name)
            if found:
                variants.setdefault(found[1], []).append(int(found[2]))
        reserved = {item.id.lower() for item in items}  # another item's own name is never taken as a new name
        taken: set[str] = set()
        renamed = []
        for item in items:
            base = item.id
            numbers = [1] + sorted(variants.get(base.lower(), []))

            def name(n: int) -> str:
                return base if n == 1 else f"{base}~{n}"

            def available(n: int) -> bool:
                return name(n).lower() not in taken and (n == 1 or name(n).lower() not in reserved)

            def free(n: int) -> bool:
                file = f"{name(n)}.png".lower()
                if not available(n):
                    return False
                if file not in present:
                    return True
                path = self.images / f"{name(n)}.png"
                key = self.png_key(path)
                return key == item.image_key or (key is None and (f"images/{file}" in listed or _torn_png_of_ours(path)))

            same = [n for n in numbers if available(n) and f"{name(n)}.png".lower() in present
                    and self.png_key(self.images / f"{name(n)}.png") == item.image_key]
            n = same[0] if same else next(k for k in itertools.count(1) if free(k))
            item.id = name(n)
            taken.add(item.id.lower())
            if n != 1:
                renamed.append((item, base))
        return renamed

    def images_left_behind(self, items: list[Item], previous: dict) -> list[Path]:
        """Images an earlier run of this folder made (or left alone) that none of `items` makes now: jobs gone from
        the queue, or edited ones whose new image has another name. Kept, never deleted; the user is told."""
        current = {f"images/{item.id}.png" for item in items}
        present = _listing(self.images)
        gone: dict[str, None] = {}
        for image in [str(old.get("image", "")) for old in previous.get("items", [])] + previous.get("left_alone", []):
            folder, _, name = image.partition("/")
            if folder == "images" and "/" not in name and image not in current and name in present:
                gone[image] = None
        return [self.path / image for image in gone if (self.path / image).is_file()]

    # -- drawn seeds -----------------------------------------------------------------------------------------
    def previous_run(self) -> PreviousRun:
        """What an earlier run left here. A damaged run.json is not trusted, but drawn seeds are part of the work:
        they are recovered from the finished images, which carry theirs, and the user is told."""
        path = self.path / MANIFEST
        try:
            data = json.loads(read_limited(path, MAX_MANIFEST_BYTES).decode("utf-8"))
        except FileNotFoundError:
            return PreviousRun()
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return self._recovered(f"it cannot be read ({why})")
        problem = manifest_problem(data)
        if problem:
            return self._recovered(problem)
        return PreviousRun(manifest=data, drawn_seeds=data.get("drawn_seeds", {}))

    def _recovered(self, why: str) -> PreviousRun:
        seeds = self.recover_drawn_seeds()
        count = sum(1 for copies in seeds.values() for s in copies if s is not None)
        return PreviousRun(drawn_seeds=seeds, damage=(
            f"{self.path / MANIFEST} was damaged: {why}. It is written anew; {count} drawn seed(s) were recovered "
            "from the finished images and latents, and no finished image is replaced (an image whose seed is lost is made "
            "again under another name)"))

    def recover_drawn_seeds(self) -> dict[str, list[int | None]]:
        """Drawn seeds as the finished files record them: each image's PNG chunk and each latent's metadata
        (drawn_seeds[slot][copy]; None for a copy found in neither). Where files disagree (seeds drawn again
        with --new-seeds), the newest file's seed is the one the last run used."""
        found: dict[str, dict[int, tuple[int, int]]] = {}

        def record(path: Path, slot: object, copy: object, seed: object) -> None:
            if (isinstance(slot, str) and slot and _is_int(copy) and 0 <= copy < MAX_COUNT and _is_int(seed)
                    and 0 <= seed <= MAX_SEED):
                try:
                    when = path.stat().st_mtime_ns
                except OSError:
                    return
                copies = found.setdefault(slot, {})
                if copy not in copies or copies[copy][0] <= when:
                    copies[copy] = (when, seed)

        for latent in _files(self.latents, ".safetensors"):
            try:
                with safe_open(str(latent), framework="pt") as f:
                    meta = f.metadata() or {}
            except (SafetensorError, OSError, RuntimeError, ValueError):
                continue
            copy, seed = meta.get("copy", ""), meta.get("seed", "")
            if meta.get("seed_slot") and re.fullmatch(r"[0-9]{1,20}", copy) and re.fullmatch(r"[0-9]{1,20}", seed):
                record(latent, meta["seed_slot"], int(copy), int(seed))
        for png in _files(self.images, ".png"):
            meta = _read_png_meta(png) or {}
            if meta.get("seed_was_drawn") is True:
                record(png, meta.get("seed_slot"), meta.get("copy"), meta.get("seed"))
        return {slot: [copies[k][1] if k in copies else None for k in range(max(copies) + 1)]
                for slot, copies in found.items()}

    # -- manifest --------------------------------------------------------------------------------------------
    def read_manifest(self) -> dict | None:
        """The manifest, if it is whole and sound; None otherwise (see previous_run for what a damaged one
        leaves)."""
        return self.previous_run().manifest or None

    def write_manifest(self, manifest: dict) -> None:
        """Indented for reading, one line per item: 100,000 images take ~40 MB, not ~70 (written after each
        stage, the whole file at once)."""
        rest = {k: v for k, v in manifest.items() if k != "items"}
        text = json.dumps(rest, indent=2)
        if "items" in manifest:
            lines = ",\n    ".join(json.dumps(item, ensure_ascii=False) for item in manifest["items"])
            body = f"[\n    {lines}\n  ]" if lines else "[]"
            text = (text[:-2] + ",\n" if rest else "{\n") + f'  "items": {body}\n}}'
        self._atomic(self.path / MANIFEST, lambda f: f.write((text + "\n").encode("utf-8")))

    def manifest_items(self, items: list[Item], read: bool = True) -> list[dict]:
        """The manifest's entry for each item: its parameters, its files (relative to the folder) and whether its
        image is finished. `read=False`: an image this process does not know yet counts as unfinished, unread (a
        1024x1024 PNG takes ~0.1 s to read)."""
        present = _listing(self.images)  # one listing, not a stat per item, for long queues
        return [{**item.to_json(), "image": f"images/{item.id}.png", "latents": f"latents/{item.latent_key}.safetensors",
                 "done": f"{item.id}.png" in present and self.png_key(self.images / f"{item.id}.png",
                                                                      read) == item.image_key}
                for item in items]



def _files(folder: Path, suffix: str) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.suffix.lower() == suffix and p.is_file()]
    except OSError:
        return []


def _listing(folder: Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def _is_int(value: object) -> bool:
    return type(value) is int  # JSON's true and false are not numbers here


def _read_png_meta(path: Path) -> dict | None:
    """The `pixart_lowvram` chunk of a whole PNG; None for a file that is not one (truncated, damaged)."""
    try:
        with open(path, "rb") as f:  # PIL stops reading once it has the pixels: check the file's end too
            f.seek(-len(_PNG_END), os.SEEK_END)
            if f.read() != _PNG_END:
                return None
        with Image.open(path) as im:
            im.load()  # reads every chunk: a truncated file fails here
            return _meta_in(im.text)
    except (OSError, ValueError, SyntaxError):
        return None


def _torn_png_of_ours(path: Path) -> bool:
    """A PNG that is not whole but starts like one of ours: the text chunks come before the pixels, so a file cut
    short still shows the `pixart_lowvram` chunk near its start."""
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError:
        return False
    return head.startswith(b"\x89PNG\r\n\x1a\n") and b"tEXtpixart_lowvram\x00" in head


def _manifest_is_ours(path: Path) -> bool:
    try:
        data = json.loads(read_limited(path, MAX_MANIFEST_BYTES).decode("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("version") == MANIFEST_VERSION and isinstance(data.get("items"), list)


def manifest_problem(data: object) -> str | None:
    """What is wrong with the fields a rerun reads back (None: nothing), checked as strictly as a queue: a
    manifest is a file anyone can edit, and a wrong value must not reach a model call."""
    if not isinstance(data, dict):
        return "it is not a JSON object"
    if data.get("version") != MANIFEST_VERSION:
        return f"its version is {data.get('version')!r}, not {MANIFEST_VERSION}"
    seeds, items, left = data.get("drawn_seeds", {}), data.get("items", []), data.get("left_alone", [])
    if not isinstance(seeds, dict):
        return "drawn_seeds is not an object"
    for slot, values in seeds.items():
        if not isinstance(values, list) or len(values) > MAX_COUNT or not all(
                _is_int(x) and 0 <= x <= MAX_SEED for x in values):
            return f"drawn_seeds[{slot!r}] is not a list of seeds (whole numbers from 0 to {MAX_SEED})"
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("image", ""), str)
                                              for i in items):
        return "items is not a list of objects with an image path"
    if not isinstance(left, list) or not all(isinstance(p, str) for p in left):
        return "left_alone is not a list of paths"
    return None


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
            write_atomic(self.file(key), lambda f: f.write(source.read_bytes()))
        except OSError:
            pass  # a cache that cannot be written only costs a later run an encode

    def restore(self, key: str, shapes: dict, folder: RunFolder) -> bool:
        """Copy a valid cached embedding into the run folder; False if there is none."""
        tensors = read_artifact(self.file(key), key, shapes)
        if tensors is None:
            return False
        with safe_open(str(self.file(key)), framework="pt") as f:
            text = (f.metadata() or {}).get("text", "")
        folder.write_tensors(folder.embed_path(key), tensors, key, text=text)
        return True
