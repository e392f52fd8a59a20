"""Queue files and command-line prompts -> validated jobs.

A queue is TOML, JSON or JSONL. Every problem in it is found and reported at once, as one QueueError, before
any model loads. `validate_document` is the one place where the rules live; each field has its own checker.
"""
from __future__ import annotations

import difflib
import json
import math
import numbers
import os
import re
import reprlib
import stat
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from .errors import Problem, QueueError
from .samplers import NAMES as SAMPLER_NAMES

KNOWN_FIELDS = ("prompt", "negative_prompt", "width", "height", "seed", "cfg", "steps", "sampler", "count", "name",
                "lora", "init_image", "strength")
# The reference PixArtAlphaPipeline's defaults, for hints; a job that leaves cfg, steps or sampler out gets its
# model's (JobDefaults below: 4 steps without guidance for PixArt-LCM, one step for DMD).
DEFAULT_CFG = 4.5
DEFAULT_STEPS = 20
MAX_SIDE = 4096
MAX_SEED = 2**64 - 1
MAX_COUNT = 10_000
# The scheduler has 1000 training timesteps: more steps add nothing, and a huge value would only fail after
# the models have loaded.
MAX_STEPS = 1000
MAX_NAME = 100
# Limits that keep a queue's cost bounded before anything is read or loaded (README, "Limits").
MAX_IMAGES = 100_000  # images in one queue (every job's count added up)
MAX_QUEUE_BYTES = 32 * 2**20  # a queue file; 100,000 one-line JSONL jobs take ~10 MB
# A prompt's characters. T5 reads at most 120 (PixArt-α) or 300 (Σ) tokens, ~1,500 characters of English; the
# reference pipeline's caption cleaning (`_clean_caption`) takes time that grows with the square of some
# texts' length (8,000 characters of "a." take 1.4 s, 40,000 take ~50 s), so a prompt is refused past this
# instead of being cleaned for seconds and cut by the tokenizer anyway. Every prompt within it is encoded
# exactly as the reference does.
MAX_PROMPT = 4_000
# Image-to-image: diffusers' StableDiffusionImg2ImgPipeline's default strength (how much of the schedule runs).
DEFAULT_STRENGTH = 0.8
# An init image file: read whole to hash and to decode it; a photo is a few MB, a 16k x 16k PNG a few hundred.
MAX_IMAGE_BYTES = 512 * 2**20

SUFFIXES = {".toml": "toml", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}

_MINIMAL = {
    "toml": 'the smallest queue is a [[jobs]] line followed by a line prompt = "a lighthouse at dusk"',
    "json": 'the smallest queue is [{"prompt": "a lighthouse at dusk"}]',
    "jsonl": 'the smallest queue is one line {"prompt": "a lighthouse at dusk"}',
}
_TABLE = {"toml": "a table", "json": "an object", "jsonl": "an object"}
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA a job names: its file or peft folder (relative paths resolved against the queue file's folder) and
    the weight its update is added with."""

    path: str
    scale: float = 1.0


@dataclass(frozen=True)
class Job:
    """One entry of the queue, defaults applied, before expansion into images."""

    index: int  # 1-based position in the queue
    prompt: str
    negative_prompt: str = ""
    width: int | None = None  # None: the model's default size (decided later, from its config)
    height: int | None = None
    seed: int | None = None  # None: drawn at random later, then recorded
    cfg: float | None = None  # None: the model's default
    steps: int | None = None  # None: the model's default
    count: int = 1
    name: str | None = None
    sampler: str | None = None  # None: the model's own scheduler
    lora: tuple[LoraSpec, ...] = ()  # merged into the transformer for this job's images (lora.py)
    init_image: str | None = None  # image-to-image: the image's path (a queue's, joined to the queue's folder)
    strength: float | None = None  # image-to-image only; None: DEFAULT_STRENGTH


@dataclass(frozen=True)
class JobDefaults:
    """What a job that leaves them out gets from its model (models.ModelInfo.defaults): the reference usage's."""

    size: int  # width and height
    steps: int = DEFAULT_STEPS
    cfg: float = DEFAULT_CFG
    sampler: str = "dpm-solver"


# ---- reading ----------------------------------------------------------------------------------------------

def load_queue(path: str | os.PathLike) -> list[Job]:
    """Read a queue file; its suffix says the format (.toml, .json, .jsonl or .ndjson)."""
    path = Path(path)
    source = str(path)
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        what = f"its suffix {path.suffix!r}" if path.suffix else "a name without a suffix"
        raise QueueError([Problem(f"cannot tell the queue's format from {what}",
                                  hint="name it .toml, .json, .jsonl or .ndjson")], source=source)
    try:
        data = read_limited(path, MAX_QUEUE_BYTES)
    except OSError as error:
        raise QueueError([Problem(f"cannot read {path}: {error.strerror or error}")], source=source) from None
    except ValueError as error:
        raise QueueError([Problem(f"{path} {error}")], source=source) from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # what Windows PowerShell 5's `>` writes
        raise QueueError([Problem(f"{path} is UTF-16 text (it starts with a UTF-16 byte order mark)",
                                  hint="save the file as UTF-8")], source=source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise QueueError([Problem(f"{path} is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line})",
                                  hint="save the file as UTF-8")], source=source) from None
    return parse_queue(text, fmt, source, base_dir=path.parent)


def read_limited(path: str | os.PathLike, limit: int) -> bytes:
    """A regular file's bytes, reading at most `limit` of them: ValueError (with a message that follows the
    file's name) for a device, a pipe or a folder (/dev/zero would never end) and for a file past the limit.
    OSError where it cannot be opened."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # a FIFO must not block us
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "a device, pipe or socket"
            raise ValueError(f"is {kind}, not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"is larger than {limit // 2**20} MiB, the most this tool reads")
    return data


def parse_queue(text: str, fmt: str, source: str = "<string>", base_dir: str | os.PathLike | None = None
                ) -> list[Job]:
    """Parse and validate a queue given as text; fmt is "toml", "json" or "jsonl". Relative paths in it (LoRA
    files, init images) are taken from `base_dir` (None: the current folder)."""
    text = text.removeprefix("\ufeff")  # editors on Windows like to start UTF-8 files with a BOM
    if fmt == "jsonl":
        return _parse_jsonl(text, source, base_dir)
    if fmt not in ("toml", "json"):
        raise QueueError([Problem(f"unknown queue format {fmt!r}", hint="use 'toml', 'json' or 'jsonl'")],
                         source=source)
    try:
        doc = tomllib.loads(text) if fmt == "toml" else _json_loads(text)
    except (ValueError, RecursionError) as error:
        raise QueueError([_syntax_problem(error, text)], source=source) from None
    return validate_document(doc, source, fmt=fmt, base_dir=base_dir)


def _parse_jsonl(text: str, source: str, base_dir: str | os.PathLike | None = None) -> list[Job]:
    problems: list[Problem] = []
    unreadable = False
    defaults_line: int | None = None
    doc: dict = {"jobs": []}
    # Only "\n" ends a line: str.splitlines would also split on characters a JSON string may hold (U+2028...).
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip(" \t\r"):
            continue
        try:
            value = _json_loads(line)
        except (ValueError, RecursionError) as error:
            problems.append(_syntax_problem(error, line, line=number))
            unreadable = True
            continue
        if isinstance(value, dict) and list(value) == ["defaults"]:
            if defaults_line is None:
                defaults_line = number
                doc["defaults"] = value["defaults"]
            else:
                problems.append(Problem(f"line {number} is a second defaults line; only one is allowed",
                                        field="defaults", hint=f"merge it into the one on line {defaults_line}"))
            continue
        doc["jobs"].append(value)
    if unreadable:
        raise QueueError(problems, source=source)
    try:
        jobs = validate_document(doc, source, fmt="jsonl", base_dir=base_dir)
    except QueueError as error:
        raise QueueError(problems + error.problems, source=source) from None
    if problems:
        raise QueueError(problems, source=source)
    return jobs


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _json_loads(text: str) -> object:
    # json.loads keeps the last of two equal keys without a word; a doubled "seed" would go unnoticed.
    return json.loads(text, object_pairs_hook=_unique_keys)


def _syntax_problem(error: Exception, text: str, line: int | None = None) -> Problem:
    """A parser's error -> one Problem naming the line (and column) it points at."""
    at = f" at line {line}" if line else ""
    if isinstance(error, json.JSONDecodeError):
        return Problem(f"syntax error at line {line or error.lineno}, column {error.colno}: {error.msg}")
    if isinstance(error, tomllib.TOMLDecodeError):
        # tomllib puts the place only in its message: "Invalid value (at line 4, column 9)".
        message = str(error)
        found = re.search(r" \(at (?:line (\d+), column (\d+)|end of document)\)$", message)
        if not found:
            return Problem(f"syntax error: {message}")
        if found[1]:
            return Problem(f"syntax error at line {found[1]}, column {found[2]}: {message[:found.start()]}")
        last_line = text.count("\n") + 1
        return Problem(f"syntax error at line {last_line} (the end of the file): {message[:found.start()]}")
    if isinstance(error, _DuplicateKey):
        return Problem(f"key {error.args[0]!r} appears twice in one object{at}",
                       hint="JSON would silently keep only the last one; remove the other")
    if isinstance(error, RecursionError):
        return Problem(f"the document is nested too deeply to read{at}")
    return Problem(f"cannot read the document{at}: {error}")  # e.g. a number of more than 4300 digits


def jobs_from_options(prompt: str | None, *, negative_prompt: str | None = None, width: int | None = None,
                      height: int | None = None, seed: int | None = None, cfg: float | None = None,
                      steps: int | None = None, count: int | None = None, name: str | None = None,
                      sampler: str | None = None, lora: list[dict] | None = None, init_image: str | None = None,
                      strength: float | None = None) -> list[Job]:
    """A one-job queue from command-line options; None means "not given". Validated like a file's job; LoRA
    and init image paths are taken from the current folder."""
    given = dict(prompt=prompt, negative_prompt=negative_prompt, width=width, height=height, seed=seed, cfg=cfg,
                 steps=steps, count=count, name=name, sampler=sampler, lora=lora or None, init_image=init_image,
                 strength=strength)
    job = {key: value for key, value in given.items() if value is not None}
    return validate_document({"jobs": [job]}, "command line")


# ---- one checker per field --------------------------------------------------------------------------------
# Each takes a value and returns None when it is fine, else (message, hint). Messages follow "field 'x': ".

Bad = tuple[str, str | None] | None

_repr = reprlib.Repr()
_repr.maxstring = 40
_repr.maxother = 40


def _show(value: object) -> str:
    """A value as the person who wrote the queue would recognise it, kept short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the text {_repr.repr(value)}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, int) and value.bit_length() > 100:
        return f"a number of {int(value.bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, (int, float)):
        return repr(value)
    return f"{type(value).__name__} {_repr.repr(value)}"


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _whole(value: object) -> Bad:
    if _is_int(value):
        return None
    hint = None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**64:
        hint = f"write {int(value)} without the decimal point"
    elif isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,30}\s*", value):
        hint = f"write {value.strip()} without quotes"
    return f"must be a whole number, not {_show(value)}", hint


def _at_least(value: int, low: int, hint: str | None = None) -> Bad:
    return None if value >= low else (f"must be {low} or more, not {_show(value)}", hint)


def _at_most(value: int, high: int, hint: str | None = None) -> Bad:
    return None if value <= high else (f"must be at most {high}, not {_show(value)}", hint)


def _check_side(value: object) -> Bad:
    bad = _whole(value) or _at_least(value, 1) or _at_most(value, MAX_SIDE)
    if bad or value % 8 == 0:
        return bad
    lower = value // 8 * 8
    nearest = f"multiples of 8 are {lower} and {lower + 8}" if lower else "multiple of 8 is 8"
    return f"must be a multiple of 8, not {value}", f"the nearest {nearest}"


def _check_seed(value: object) -> Bad:
    return _whole(value) or _at_least(value, 0) or _at_most(value, MAX_SEED, "seeds are 64-bit: 0 to 2**64-1")


def _check_steps(value: object) -> Bad:
    return _whole(value) or _at_least(value, 1) or _at_most(value, MAX_STEPS,
                                                            f"PixArt-α's default is {DEFAULT_STEPS}")


def _check_count(value: object) -> Bad:
    return _whole(value) or _at_least(value, 1) or _at_most(value, MAX_COUNT, "split it into several jobs")


def _finite_number(value: object, hint: str) -> Bad:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,30}(\.[0-9]{1,30})?\s*", value):
            hint = f"write {value.strip()} without quotes"
        return f"must be a number, not {_show(value)}", hint
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        return f"must be a finite number, not {_show(value)}", hint
    return None


def _check_cfg(value: object) -> Bad:
    bad = _finite_number(value, f"PixArt-α's default is {DEFAULT_CFG}")
    if bad is None and float(value) < 0:
        return (f"must be 0 or more, not {_show(value)}",
                f"PixArt-α's default is {DEFAULT_CFG}; 1 or less turns guidance off")
    return bad


def _check_plain_text(value: object) -> Bad:
    if not isinstance(value, str):
        return f"must be text, not {_show(value)}", None
    if "\0" in value:
        return "contains a NUL character", "remove it"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text (it holds a lone surrogate)", None
    return None


def _check_text(value: object) -> Bad:
    bad = _check_plain_text(value)
    if bad is None and len(value) > MAX_PROMPT:
        return (f"must be at most {MAX_PROMPT} characters, not {len(value)}",
                "T5 reads only the first 120 tokens (PixArt-α) or 300 (PixArt-Σ), about 500 or 1,300 characters")
    return bad


def _check_prompt(value: object) -> Bad:
    if isinstance(value, str) and not value.strip():
        return "must not be empty", "describe the image to make"
    return _check_text(value)


def _safe_name(text: str) -> str:
    """A name made safe to use as a file name: what a bad name's hint suggests."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", ascii_text).lstrip(".-")[:MAX_NAME].rstrip("-")
    return safe or "image"


def _check_name(value: object) -> Bad:
    if not isinstance(value, str):
        hint = f'write it in quotes: "{value}"' if _is_int(value) and value.bit_length() < 100 else None
        return f"must be text, not {_show(value)}", hint
    if not value:
        return "must not be empty", "leave it out to have a name made from the prompt"
    if len(value) > MAX_NAME:
        return f"must be at most {MAX_NAME} characters, not {len(value)}", f"for example {_safe_name(value)!r}"
    if not _NAME.fullmatch(value):
        return ("may hold only ASCII letters (a-z, A-Z), digits, '.', '_' and '-', and may not start with '.' "
                "or '-': it becomes a file name on any system", f"for example {_safe_name(value)!r}")
    return None


def _check_sampler(value: object) -> Bad:
    if not isinstance(value, str):
        return f"must be text, not {_show(value)}", f"one of: {', '.join(SAMPLER_NAMES)}"
    if value in SAMPLER_NAMES:
        return None
    close = _did_you_mean(value, SAMPLER_NAMES)
    return (f"unknown sampler {_repr.repr(value)} (known: {', '.join(SAMPLER_NAMES)})",
            close or "leave it out for the model's own scheduler")


def _check_strength(value: object) -> Bad:
    hint = f"0 < strength <= 1; diffusers' default is {DEFAULT_STRENGTH}"
    if bad := _finite_number(value, hint):
        return bad
    if not 0 < float(value) <= 1:
        return f"must be more than 0 and at most 1, not {_show(value)}", hint
    return None


def _check_path_text(value: object) -> Bad:
    if isinstance(value, str) and not value:
        return "must not be empty", "the path of an image file (PNG, JPEG, WebP, ...)"
    return _check_plain_text(value)


def check_init_image(path: Path) -> Bad:
    """Whether `path` is an image file PIL can read whole (missing, unreadable, not an image, damaged: why not).
    Reads the whole image once: a truncated file fails here, not after the models have loaded."""
    import io  # noqa: PLC0415

    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    hint = "the path of an image file (PNG, JPEG, WebP, ...); in a queue file, relative to its folder"
    try:
        data = read_limited(path, MAX_IMAGE_BYTES)  # never blocks on a pipe, never reads a device forever
    except FileNotFoundError:
        return f"{str(path)!r} does not exist", hint
    except PermissionError:
        return f"{str(path)!r} cannot be read (permission denied)", None
    except OSError as exc:
        return f"{str(path)!r} cannot be read ({exc.strerror or exc})", None
    except ValueError as exc:
        return f"{str(path)!r} {exc}", hint
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except UnidentifiedImageError:
        return f"{str(path)!r} is not an image file PIL can read", hint
    except Image.DecompressionBombError as exc:
        return f"{str(path)!r} is too large an image to read: {exc}", None
    except (OSError, ValueError, SyntaxError) as exc:
        return f"{str(path)!r} cannot be read as an image ({exc})", None
    return None


_LORA_EXAMPLE = 'lora = [{ path = "styles/ink.safetensors", scale = 0.8 }]'


def _check_lora(value: object) -> Bad:
    example = f"for example {_LORA_EXAMPLE}"
    if not isinstance(value, list):
        return f"must be a list of LoRAs, not {_show(value)}", example
    for n, entry in enumerate(value, start=1):
        where = f"entry {n}" if len(value) > 1 else "the entry"
        if not isinstance(entry, dict):
            return f"{where} must be a table with a path and a scale, not {_show(entry)}", example
        for key in entry:
            if key not in ("path", "scale"):
                return f"{where} has an unknown key {key!r}", _did_you_mean(key, ("path", "scale")) or example
        if "path" not in entry:
            return f"{where} has no path", example
        bad = _check_plain_text(entry["path"])
        if bad is None and not entry["path"].strip():
            bad = "must not be empty", None
        if bad:
            return f"{where}'s path {bad[0]}", bad[1]
        if "scale" in entry and (bad := _finite_number(entry["scale"], "1 adds the LoRA as trained, 0 leaves it out")):
            return f"{where}'s scale {bad[0]}", bad[1]
    return None


_CHECKS: dict[str, Callable[[object], Bad]] = {
    "prompt": _check_prompt,
    "negative_prompt": _check_text,
    "width": _check_side,
    "height": _check_side,
    "seed": _check_seed,
    "cfg": _check_cfg,
    "steps": _check_steps,
    "count": _check_count,
    "name": _check_name,
    "sampler": _check_sampler,
    "lora": _check_lora,
    "init_image": _check_path_text,  # and then the file itself (check_init_image), relative to the queue's folder
    "strength": _check_strength,
}


def _normal(field: str, value: object, base_dir: str | os.PathLike | None = None) -> object:
    """A checked value in the type Job holds (numpy integers and the like become plain Python numbers; LoRA
    paths relative to `base_dir`)."""
    if field in ("cfg", "strength"):
        return float(value)
    if field == "lora":
        def where(path: str) -> str:
            path = os.path.expanduser(path)
            return path if base_dir is None else os.path.join(base_dir, path)

        return tuple(LoraSpec(where(entry["path"]), float(entry.get("scale", 1.0))) for entry in value)
    return int(value) if _is_int(value) else value


def _seed_range(seed: int, count: int) -> Bad:
    if seed + count - 1 <= MAX_SEED:
        return None
    return (f"with count = {count} the images use seeds {seed} to {seed + count - 1}, past the largest seed "
            f"{MAX_SEED}", f"use a seed of at most {MAX_SEED - count + 1}")


def _did_you_mean(key: object, choices: tuple[str, ...] | list[str]) -> str | None:
    close = difflib.get_close_matches(str(key).lower(), choices, n=1)
    return f"did you mean {close[0]!r}?" if close else None


# ---- the document -----------------------------------------------------------------------------------------

@dataclass
class _Files:
    """The init images a queue names, found relative to `base_dir` (None: the current folder), each checked once."""

    base_dir: str | os.PathLike | None
    checked: dict[str, Bad] = field(default_factory=dict)

    def image(self, value: str) -> tuple[str, Bad]:
        """An init image's path as the run will open it, and what is wrong with the file (None: nothing)."""
        path = Path(value).expanduser()
        if self.base_dir is not None:
            path = Path(self.base_dir) / path  # an absolute path stays itself
        if str(path) not in self.checked:
            self.checked[str(path)] = check_init_image(path)
        return str(path), self.checked[str(path)]


def validate_document(doc: object, source: str, *, fmt: str = "json", base_dir: str | os.PathLike | None = None
                      ) -> list[Job]:
    """A parsed queue -> jobs, or a QueueError holding every problem found. `fmt` only shapes the hints; relative
    paths are taken from `base_dir` (None: the current folder).

    doc is a list of job tables, or a table {"defaults": {...}, "jobs": [...]}.
    """
    problems: list[Problem] = []
    files = _Files(base_dir)
    defaults_doc, jobs_doc = _split(doc, fmt, problems)
    defaults, broken = _check_defaults(defaults_doc, fmt, problems, base_dir)
    _check_files(defaults, broken, files, problems)
    jobs: list[Job] = []
    names: dict[str, tuple[int, str]] = {}
    for index, entry in enumerate(jobs_doc or [], start=1):
        job = _check_job(index, entry, defaults, broken, names, fmt, problems, base_dir, files)
        if job is not None:
            jobs.append(job)
    if "strength" in defaults and "init_image" not in defaults and "init_image" not in broken and not any(
            job.init_image for job in jobs):
        problems.append(Problem("is given, but no job has an init_image", field="defaults.strength",
                                hint="strength is for image-to-image jobs: give them init_image, or leave it out"))
    if jobs_doc == []:
        problems.append(Problem("the queue has no jobs", hint=_MINIMAL.get(fmt, _MINIMAL["json"])))
    problems += _image_name_clashes(jobs)
    total = sum(job.count for job in jobs)
    if total > MAX_IMAGES:
        problems.append(Problem(f"the queue asks for {total} images; one queue makes at most {MAX_IMAGES}",
                                hint="split it into several queues, each with its own run folder"))
    if problems:
        raise QueueError(problems, source=source)
    return jobs


def _image_name_clashes(jobs: list[Job]) -> list[Problem]:
    """A named job with a count makes NAME-1, NAME-2, ...: one of those may be another job's own name. Both are
    names the user gave, so neither may silently yield: the queue is refused, naming both jobs."""
    named = {job.name.lower(): job for job in jobs if job.name}
    problems = []
    for other in jobs:
        found = re.fullmatch(r"(.+)-([1-9][0-9]*)", other.name or "")
        job = named.get(found[1].lower()) if found else None
        k = int(found[2]) if found else 0
        if job is not None and job is not other and job.count > 1 and k <= job.count:
            problems.append(Problem(
                f"name {other.name!r} is also the file name of image {k} of job {job.index} "
                f"({job.name!r}, count {job.count})", job_index=other.index, job_name=other.name, field="name",
                hint=f"rename one of them: job {job.index}'s images are named {job.name}-1 to "
                     f"{job.name}-{job.count}"))
    return problems


def _split(doc: object, fmt: str, problems: list[Problem]) -> tuple[object, list | None]:
    """The document -> (its defaults, its list of jobs); None for a list that is not there or not a list."""
    if isinstance(doc, list):
        return None, doc
    if not isinstance(doc, dict):
        problems.append(Problem(f"the queue must be a list of jobs or {_TABLE.get(fmt, 'a table')} with 'jobs', "
                                f"not {_show(doc)}", hint=_MINIMAL.get(fmt, _MINIMAL["json"])))
        return None, None
    for key in doc:
        if key not in ("defaults", "jobs"):
            problems.append(Problem(f"unknown top-level key {key!r}: only 'defaults' and 'jobs' are allowed",
                                    field=str(key), hint=_did_you_mean(key, ("defaults", "jobs"))))
    jobs = doc.get("jobs", [])
    if not isinstance(jobs, list):
        hint = "write each job as its own [[jobs]] table" if fmt == "toml" else 'write "jobs": [{...}, ...]'
        problems.append(Problem(f"'jobs' must be a list of jobs, not {_show(jobs)}", field="jobs", hint=hint))
        jobs = None
    return doc.get("defaults"), jobs


def _check_defaults(raw: object, fmt: str, problems: list[Problem], base_dir: str | os.PathLike | None = None
                    ) -> tuple[dict, set[str]]:
    """The defaults table -> (its valid values, the fields whose default was bad)."""
    if raw is None:
        return {}, set()
    if not isinstance(raw, dict):
        problems.append(Problem(f"'defaults' must be {_TABLE.get(fmt, 'a table')} of fields, not {_show(raw)}",
                                field="defaults"))
        return {}, set()
    values: dict = {}
    broken: set[str] = set()
    for key, value in raw.items():
        field = f"defaults.{key}"
        if key == "name":
            problems.append(Problem("a default name would give every job the same name", field=field,
                                    hint="give each job its own name"))
        elif key not in _CHECKS:
            choices = [f for f in KNOWN_FIELDS if f != "name"]
            problems.append(Problem(f"unknown field {key!r}", field=field, hint=_did_you_mean(key, choices)))
        elif bad := _CHECKS[key](value):
            problems.append(Problem(bad[0], field=field, hint=bad[1]))
            broken.add(key)
        else:
            values[key] = _normal(key, value, base_dir)
    if "seed" in values and "count" in values and (bad := _seed_range(values["seed"], values["count"])):
        problems.append(Problem(bad[0], field="defaults.seed", hint=bad[1]))
        broken.add("seed")
        del values["seed"]
    return values, broken


def _check_files(values: dict, broken: set[str], files: _Files, problems: list[Problem], job_index: int | None = None,
                 job_name: str | None = None) -> None:
    """The files `values` name (a job's own, or the defaults'), checked; their paths as the run opens them."""
    if "init_image" in values:
        values["init_image"], bad = files.image(values["init_image"])
        if bad:
            where = "init_image" if job_index else "defaults.init_image"
            problems.append(Problem(bad[0], job_index=job_index, job_name=job_name, field=where, hint=bad[1]))
            broken.add("init_image")
            del values["init_image"]


def _check_job(index: int, entry: object, defaults: dict, broken: set[str], names: dict[str, tuple[int, str]],
               fmt: str, problems: list[Problem], base_dir: str | os.PathLike | None = None,
               files: _Files | None = None) -> Job | None:
    """One job's table -> a Job with defaults applied, or None after adding its problems to `problems`."""
    if not isinstance(entry, dict):
        hint = "write each job as its own [[jobs]] table" if fmt == "toml" else 'for example {"prompt": "..."}'
        problems.append(Problem(f"must be {_TABLE.get(fmt, 'a table')} of fields, not {_show(entry)}",
                                job_index=index, hint=hint))
        return None
    name = entry.get("name")
    job_name = name if isinstance(name, str) and _check_name(name) is None else None
    found = len(problems)

    def report(field: str, bad: tuple[str, str | None]) -> None:
        problems.append(Problem(bad[0], job_index=index, job_name=job_name, field=field, hint=bad[1]))

    values = dict(defaults)
    bad_fields: set[str] = set()
    for key, value in entry.items():
        if key not in _CHECKS:
            hint = _did_you_mean(key, KNOWN_FIELDS)
            if key == "defaults":
                hint = ('defaults go on a line of their own: {"defaults": {...}}' if fmt == "jsonl" else
                        "defaults go next to the jobs, not inside one")
            report(str(key), (f"unknown field {key!r}", hint))
        elif bad := _CHECKS[key](value):
            report(key, bad)
            bad_fields.add(key)
        else:
            values[key] = _normal(key, value, base_dir)
    if "prompt" not in entry and "prompt" not in defaults and "prompt" not in broken:
        report("prompt", ("is missing", "every job needs a prompt (or give one in the defaults)"))
    own_files = {key: values[key] for key in ("init_image",) if key in entry and key in values}
    _check_files(own_files, bad_fields, files or _Files(None), problems, index, job_name)
    values.update(own_files)
    if "init_image" in bad_fields:
        values.pop("init_image", None)
    elif "strength" in entry and "init_image" not in values and "init_image" not in broken | bad_fields:
        report("strength", ("is given without init_image", "strength says how much of an init image to change: "
                                                            "give init_image, or leave strength out"))
    if "init_image" not in values:
        values.pop("strength", None)  # a default strength is for the jobs with an init image
    own = {"seed", "count"} & entry.keys()
    if own and not own & bad_fields and "seed" in values:
        if bad := _seed_range(values["seed"], values.get("count", 1)):
            report("seed", bad)
    if job_name is not None:
        # Compared ignoring case: on macOS and Windows 'Ship.png' and 'ship.png' are the same file.
        earlier, earlier_name = names.setdefault(job_name.lower(), (index, job_name))
        if earlier != index:
            report("name", (f"name {job_name!r} is already used by job {earlier} ({earlier_name!r})",
                            "names must be unique, ignoring case: each becomes a file name"))
    if len(problems) > found or "prompt" not in values:  # no prompt: its default was bad, reported already
        return None
    return Job(index=index, **values)
