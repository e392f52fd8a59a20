"""All model loading in one room: find the model folder, check it and read what it is without loading weights
(configs, safetensors headers, tokenizer files), load one component at a time (the libraries' own
`from_pretrained`, or built empty and streamed from its files), and say which file is at fault when that fails.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from torch import nn

from . import samplers
from .errors import ModelError
from .files import cache_dir, write_atomic
from .geometry import Geometry, patch_size, read_geometry, vae_scale_factor, with_defaults
from .jobs import JobDefaults
from .lora import LoraSet, merge
from .streaming import (BlockStreamer, Computed, CpuEmbedding, Stored, load_tensor, load_tensors, micro_batch_blocks,
                        set_parameter)

SUPPORTED_PIPELINES = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
# Only what the staged queue reads: safetensors weights, configs and tokenizer files, never pickled weights.
HUB_PATTERNS = ["model_index.json", "*/config.json", "*/*.safetensors", "*/*.safetensors.index.json",
                "*/*.safetensors.index.*.json", "scheduler/scheduler_config.json", "tokenizer/*"]


@dataclass(frozen=True)
class Kind:
    """A kind of PixArt model and what its reference usage runs with when a job does not say."""

    name: str
    title: str
    steps: int
    cfg: float
    timesteps: tuple[int, ...] | None = None  # fixed timesteps passed to the pipeline instead of a step count


# The defaults of each model's reference usage: diffusers' pipelines (20 steps, guidance 4.5), PixArt-LCM's model
# card (`guidance_scale=0., num_inference_steps=4`) and PixArt-DMD's demo (`timesteps=[400], guidance_scale=1,
# num_inference_steps=1`, app/app_pixart_dmd.py in PixArt-alpha/PixArt-sigma).
KINDS = {
    "alpha": Kind("alpha", "PixArt-α", steps=20, cfg=4.5),
    "sigma": Kind("sigma", "PixArt-Σ", steps=20, cfg=4.5),
    "lcm": Kind("lcm", "PixArt-LCM", steps=4, cfg=0.0),
    "dmd": Kind("dmd", "PixArt-α DMD", steps=1, cfg=1.0, timesteps=(400,)),
}


def detect_kind(pipeline_class: str, scheduler_class: str) -> str:
    """The kind of a model, from model_index.json alone.

    LCM checkpoints ship an LCMScheduler. The one-step DMD checkpoint (PixArt-Alpha-DMD-XL-2-512x512) is a
    PixArtAlphaPipeline that ships a DDPMScheduler, which no other PixArt checkpoint does (DDPM is a training
    scheduler): that is how it is recognised. Everything else is PixArt-α or PixArt-Σ by its pipeline class."""
    if scheduler_class == "LCMScheduler":
        return "lcm"
    if pipeline_class == "PixArtAlphaPipeline" and scheduler_class == "DDPMScheduler":
        return "dmd"
    return "sigma" if pipeline_class == "PixArtSigmaPipeline" else "alpha"


@dataclass(frozen=True)
class ModelInfo:
    """What a model is, read from its configs and safetensors headers; no weights loaded."""

    source: str  # what the user named: a hub id or a folder
    path: Path  # the local folder
    pipeline_class: str
    configs: dict[str, dict]  # component -> its config.json (scheduler: scheduler_config.json)
    identity: dict[str, str] = field(default_factory=dict)  # component -> hash of what makes its output
    allow_pickle: bool = False  # the user allowed pickled .bin weights where a component has no safetensors
    classes: dict[str, str] = field(default_factory=dict)  # component -> class name, from model_index.json
    # component -> its tensors as the safetensors headers give them (read once, when the folder is checked; for a
    # hub model planned without its weights, read from the hub)
    headers: dict[str, dict[str, Stored]] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.source.rstrip("/").split("/")[-1] or self.source

    @cached_property
    def geometry(self) -> Geometry:
        """Every number the reference pipeline derives from the configs (geometry.py)."""
        return read_geometry(self.pipeline_class, self.configs, self.path)

    @property
    def scheduler_class(self) -> str:
        return self.classes.get("scheduler") or str(self.configs["scheduler"].get("_class_name", ""))

    @property
    def kind(self) -> Kind:
        return KINDS[detect_kind(self.pipeline_class, self.scheduler_class)]

    @property
    def sampler(self) -> str:
        """The model's own scheduler, as a sampler name: what a job gets when it names none."""
        return samplers.own_sampler(self.scheduler_class)

    @property
    def defaults(self) -> JobDefaults:
        """What a job that leaves them out gets: the reference usage's size, steps, guidance and sampler."""
        kind = self.kind
        return JobDefaults(size=self.geometry.default_size, steps=kind.steps, cfg=kind.cfg, sampler=self.sampler)




    def weights(self, component: str) -> Weights:
        return find_weights(self.path / component, self.allow_pickle)

    def weight_files(self, component: str) -> list[Path]:
        return self.weights(component).files


def _looks_like_hub_id(source: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) is not None


def _fetch(source: str, allow_pickle: bool) -> Path:
    """A hub id -> its local snapshot (the Hugging Face cache), downloading only what the queue reads."""
    patterns = HUB_PATTERNS + (["*/*.bin"] if allow_pickle else [])
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415 - only for hub ids
        return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: all end the same way for the user
        raise ModelError(
            f"could not get model {source!r} from the Hugging Face hub ({type(exc).__name__}: {exc}).\n"
            "  If it is already downloaded, set HF_HUB_OFFLINE=1; or pass a local folder with --model DIR;\n"
            "  or try the offline demo: pixart-lowvram demo") from exc


def _weights_cached(source: str, allow_pickle: bool) -> Path | None:
    """The local snapshot of a hub model if every file the queue reads is in the Hugging Face cache already."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415 - only for hub ids

    patterns = HUB_PATTERNS + (["*/*.bin"] if allow_pickle else [])
    try:
        return Path(snapshot_download(source, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not (wholly) in the cache: then it is fetched, or planned from the hub
        return None


def _fetch_without_weights(source: str) -> tuple[Path, dict[str, dict[str, Stored]]]:
    """A hub model for a plan: its configs, tokenizer and index files in the cache, and each component's tensors
    from the safetensors headers on the hub (HTTP range requests: huggingface_hub's
    parse_safetensors_file_metadata), without downloading a weight."""
    try:
        from huggingface_hub import HfApi, snapshot_download  # noqa: PLC0415 - only for hub ids

        path = Path(snapshot_download(source, allow_patterns=[p for p in HUB_PATTERNS if p != "*/*.safetensors"]))
        api = HfApi()
        names = api.list_repo_files(source)
        headers: dict[str, dict[str, Stored]] = {}
        for component in ("text_encoder", "transformer", "vae"):
            files = _pick_weights([n.split("/", 1)[1] for n in names if n.startswith(component + "/")
                                   and n.count("/") == 1])
            tensors = headers.setdefault(component, {})
            for name in files:
                meta = api.parse_safetensors_file_metadata(source, f"{component}/{name}")
                for key, t in meta.tensors.items():
                    dtype = SAFETENSORS_DTYPES[t.dtype]
                    tensors[key] = Stored(path / component / name, t.data_offsets[0],
                                          t.data_offsets[1] - t.data_offsets[0], dtype, tuple(t.shape))
    except Exception as exc:  # noqa: BLE001 - network, auth, missing repo: all end the same way for the user
        raise ModelError(f"could not read model {source!r} from the Hugging Face hub ({type(exc).__name__}: "
                         f"{exc}).\n  Pass a local folder with --model DIR, or set HF_HUB_OFFLINE=1 if it is "
                         "already downloaded") from exc
    return path, headers


def _pick_weights(names: list[str]) -> list[str]:
    """Of a component's file names, the safetensors weights from_pretrained reads: the plain ones where there are
    some, else one variant's (as find_weights chooses among files on disk)."""
    groups: dict[str | None, list[str]] = {}
    for name in names:
        if match := _WEIGHTS_NAME.fullmatch(name):
            groups.setdefault(match["variant"], []).append(name)
    if not groups:
        return []
    return sorted(groups[min(groups, key=lambda v: (v is not None, v or ""))])


def read_json(path: Path) -> dict:
    """A JSON object from a model folder's file; a ModelError naming the file when it is missing or not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: missing") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


class FolderProblems(list):
    """Problems found in a model folder, each a message naming its file; raised together as one ModelError."""

    def check(self, fn, *args):
        """fn(*args), or None with its ModelError recorded."""
        try:
            return fn(*args)
        except ModelError as exc:
            self.append(str(exc))
            return None

    def raise_any(self) -> None:
        if len(self) == 1:
            raise ModelError(self[0])
        if self:
            raise ModelError(f"{len(self)} problems in the model folder:\n" + "\n".join(f"  - {p}" for p in self))


# -- safetensors files: the one reader of their headers -----------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on a header


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors(path: Path) -> dict[str, Stored]:
    """Every tensor of a safetensors file (name -> where it lies, dtype, shape), from its header alone, checked as
    the format defines it: a JSON object whose entries give a known dtype, a shape and data offsets that match,
    inside the file. A ModelError names the file and every entry at fault."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            size = os.fstat(f.fileno()).st_size
            if len(raw) != 8:
                raise ModelError(f"{path}: truncated (no safetensors header)")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER or 8 + length > size:
                raise ModelError(f"{path}: not a safetensors file (a header of {length} bytes in a file of {size})")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise ModelError(f"{path}: cannot be read ({exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not a safetensors file ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelError(f"{path}: not a safetensors file (its header is a JSON {type(header).__name__}, "
                         "not an object)")
    tensors, bad, end = {}, [], 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(meta.get("dtype")) if isinstance(meta, dict) else None
        shape = meta.get("shape") if isinstance(meta, dict) else None
        offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
        if dtype is None or not isinstance(shape, list) or not all(map(_is_count, shape)):
            bad.append(f"{name!r} has no valid dtype and shape ({json.dumps(meta)[:80]})")
            continue
        nbytes = math.prod(shape) * dtype.itemsize
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets))
                or offsets[1] - offsets[0] != nbytes):
            bad.append(f"{name!r} has data_offsets {offsets!r}, not a range of {nbytes} bytes")
            continue
        end = max(end, offsets[1])
        tensors[name] = Stored(path, 8 + length + offsets[0], nbytes, dtype, tuple(shape))
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ModelError(f"{path}: damaged safetensors header: {'; '.join(bad[:3])}{more}")
    if size < 8 + length + end:
        raise ModelError(f"{path}: truncated ({size} of {8 + length + end} bytes); download or copy it again")
    return tensors


def index_safetensors(files: list[Path]) -> dict[str, Stored]:
    """Every tensor of a component's weights files, by name."""
    index = {}
    for path in files:
        index.update(read_safetensors(path))
    return index


# -- a component's weights files ----------------------------------------------------------------------------------

# What diffusers' and transformers' save_pretrained write: `<base>.safetensors`, shards `<base>-00001-of-00002
# .safetensors` named by `<base>.safetensors.index.json`; a variant (hub-style "fp16") puts its name before the
# suffix (`<base>.fp16.safetensors`, shards `<base>.fp16-00001-of-00002.safetensors`) and into the index's name
# (`<base>.safetensors.index.fp16.json`).
_WEIGHTS_NAME = re.compile(r"(?P<base>[^.]+)(?:\.(?P<variant>[^.-]+))?(?:-\d+-of-\d+)?\.safetensors")
_INDEX_NAME = re.compile(r"(?P<base>[^.]+)\.safetensors\.index(?:\.(?P<variant>[^.]+))?\.json")
_PICKLED = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class Weights:
    """The weights files of one component that `from_pretrained` reads: plain ones where there are, else one
    variant's (then `variant` is what `from_pretrained(variant=...)` needs); sharded ones as their index names."""

    folder: Path
    files: list[Path]
    variant: str | None = None
    index: Path | None = None
    pickled: bool = False  # .bin files (allowed with allow_pickle, where the component has no safetensors)


def find_weights(folder: Path, allow_pickle: bool = False) -> Weights:
    """Which files hold a component's weights; a ModelError naming the folder or index when none do, or when an
    index names shards that are not there."""
    groups: dict[str | None, list[Path]] = {}
    indexes: dict[str | None, Path] = {}
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    for path in entries:
        if (match := _WEIGHTS_NAME.fullmatch(path.name)) and path.is_file():
            groups.setdefault(match["variant"], []).append(path)
        elif match := _INDEX_NAME.fullmatch(path.name):
            indexes[match["variant"]] = path
    variants = sorted(set(groups) | set(indexes), key=lambda v: (v is not None, v or ""))
    if not variants:
        pickled = [p for p in entries if p.suffix in _PICKLED]
        if pickled and allow_pickle:
            return Weights(folder, pickled, pickled=True)
        found = ", ".join(p.name for p in entries) or "nothing"
        hint = ("; pickled weights can run code when they load: convert them to safetensors, or pass "
                "--allow-pickle if you trust their source") if pickled else ""
        raise ModelError(f"{folder}: no .safetensors weights (found: {found}){hint}")
    variant = variants[0]  # the plain files where there are, as from_pretrained reads them without a variant
    if len(variants) > 1 and variant is not None:
        raise ModelError(f"{folder}: weights of several variants ({', '.join(variants)}) and no plain ones: "
                         "keep one variant's files")
    index = indexes.get(variant)
    if index is None:
        return Weights(folder, groups[variant], variant)
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelError(f"{index}: its weight_map must be an object of tensor name -> file name")
    files = [folder / name for name in sorted(set(weight_map.values()))]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise ModelError(f"{folder / missing[0]}: missing (listed in {index.name})"
                         + (f", and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return Weights(folder, files, variant, index)


def stored_tensors(folder: Path) -> dict[str, Stored]:
    """Every tensor of a component folder's safetensors weights (the files from_pretrained reads), by name."""
    return index_safetensors(find_weights(folder).files)


# -- checking a model folder before anything loads ----------------------------------------------------------------

def _library_class(library: str, name: str):
    import diffusers  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    module = {"diffusers": diffusers, "transformers": transformers}.get(library)
    try:
        return getattr(module, name, None) if module is not None else None
    except Exception:  # noqa: BLE001 - a lazy module that fails to import a name is no class either
        return None


def _fits_pixart(component: str, cls) -> str | None:
    """Why a class cannot serve as `component` of a PixArt pipeline (None: it can). The reference pipelines take a
    T5 tokenizer and T5EncoderModel, a PixArtTransformer2DModel, an AutoencoderKL and a discrete-time scheduler of
    diffusers' KarrasDiffusionSchedulers (or one our samplers build: LCM, SA-Solver); flow-matching schedulers,
    made for other models, do not fit."""
    import diffusers  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    from diffusers.schedulers import KarrasDiffusionSchedulers  # noqa: PLC0415

    if not isinstance(cls, type):
        return "not a class"
    if component == "tokenizer":
        ok = issubclass(cls, transformers.PreTrainedTokenizerBase) or cls is transformers.AutoTokenizer
        return None if ok else "not a tokenizer"
    if component == "scheduler":
        fitting = {k.name for k in KarrasDiffusionSchedulers} | {s.scheduler for s in samplers.SAMPLERS.values()}
        if not issubclass(cls, diffusers.SchedulerMixin):
            return "not a scheduler"
        return None if cls.__name__ in fitting else "a scheduler that does not fit PixArt's discrete timesteps"
    base = _network_class(component)
    return None if issubclass(cls, base) else f"not a {base.__name__}"


def _network_class(component: str):
    """The class the reference pipelines take for a network component (its subclasses serve too)."""
    import diffusers  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    return {"text_encoder": transformers.T5EncoderModel, "transformer": diffusers.PixArtTransformer2DModel,
            "vae": diffusers.AutoencoderKL}[component]


def _check_index(path: Path, index: dict, problems: FolderProblems) -> dict[str, type]:
    """model_index.json: a PixArt pipeline, each component named as [library, class] of a class that fits."""
    classes = {}
    for component in COMPONENTS:
        entry = index.get(component)
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            problems.append(f"{path}: {component} must be given as [library, class name], not {json.dumps(entry)}")
            continue
        cls = _library_class(*entry)
        why = "no such class" if cls is None else _fits_pixart(component, cls)
        if why:
            problems.append(f"{path}: {component} is {entry[0]}.{entry[1]}: {why}")
        else:
            classes[component] = cls
    return classes


# config fields the queue reads itself, each a positive integer (the libraries check the rest when the model is
# built on the meta device)
_COUNTS = {"text_encoder": ("d_model", "d_ff", "num_layers", "vocab_size"),
           "transformer": ("sample_size", "in_channels", "num_layers", "num_attention_heads", "attention_head_dim",
                           "patch_size", "caption_channels"),
           "vae": ("latent_channels", "layers_per_block")}
# how many of each repeated block a config implies, and the tensor names that hold them: checked against the
# headers before a model is built, so that a config asking for 10**9 layers is refused without building them
_REPEATS = {"text_encoder": (("num_layers", r"encoder\.block\.(\d+)\."),),
            "transformer": (("num_layers", r"transformer_blocks\.(\d+)\."),),
            "vae": (("block_out_channels", r"encoder\.down_blocks\.(\d+)\."),
                    ("layers_per_block", r"encoder\.down_blocks\.0\.resnets\.(\d+)\."))}


def _check_config(path: Path, component: str, config: dict, problems: FolderProblems) -> bool:
    """What the queue reads of a config (its class's defaults filled in for what it leaves out) is usable."""
    ok = True
    for key in _COUNTS.get(component, ()):
        value = config.get(key)
        if not _is_count(value) or value == 0:
            problems.append(f"{path}: {key} must be a positive whole number, not {json.dumps(value)}")
            ok = False
    if component == "vae":
        blocks = config.get("block_out_channels")
        if not (isinstance(blocks, list) and blocks and all(_is_count(b) and b > 0 for b in blocks)):
            problems.append(f"{path}: block_out_channels must be a list of one or more channel counts, "
                            f"not {json.dumps(blocks)}")
            ok = False
    return ok


def _check_repeats(folder: Path, component: str, config: dict, stored: dict[str, Stored],
                   problems: FolderProblems) -> bool:
    for key, pattern in _REPEATS.get(component, ()):
        wanted = config[key] if key != "block_out_channels" else len(config[key])
        found = {m.group(1) for name in stored if (m := re.match(pattern, name))}
        if wanted != len(found):
            problems.append(f"{folder}: cannot load {component}: its weights do not fit config.json ({key} "
                            f"{json.dumps(config[key])} asks for {wanted} blocks, the weights files hold "
                            f"{len(found)}); are they another model's?")
            return False
    return True


def _empty_model(cls, config: dict) -> nn.Module:
    """The model a config describes, on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        if hasattr(cls, "config_class") and hasattr(cls.config_class, "from_dict"):  # transformers
            return cls(cls.config_class.from_dict(config))
        return cls.from_config(config)


def _check_tensors(folder: Path, component: str, cls, config: dict, stored: dict[str, Stored],
                   problems: FolderProblems) -> None:
    """The weights files hold every parameter the config implies, each in its shape (a tied parameter under any
    of its names), in a floating-point dtype."""
    try:
        model = _empty_model(cls, config)
    except Exception as exc:  # noqa: BLE001 - a config the library cannot build from, whatever it raises
        problems.append(f"{folder / 'config.json'}: {cls.__name__} cannot be built from it "
                        f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]})")
        return
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
        params[id(param)] = param
    bad = []
    for key, aliases in names.items():
        found = next((stored[a] for a in aliases if a in stored), None)
        want = tuple(params[key].shape)
        if found is None:
            bad.append(f"{aliases[0]} missing")
        elif found.shape != want:
            bad.append(f"{aliases[0]} is {list(found.shape)}, the config implies {list(want)}")
        elif not found.dtype.is_floating_point:
            bad.append(f"{aliases[0]} is stored as {found.dtype}, not floating point")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        problems.append(f"{folder}: cannot load {component}: its weights do not fit config.json "
                        f"({'; '.join(bad[:3])}{more}); are they another model's?")


def check_model_folder(path: Path, allow_pickle: bool = False, headers: dict[str, dict[str, Stored]] | None = None
                       ) -> tuple[dict, dict[str, dict], dict[str, dict[str, Stored]]]:
    """Everything that can be checked without loading a weight, all at once: model_index.json names a PixArt
    pipeline and fitting classes; each component's config has what the queue reads; its weights files are whole
    and hold every tensor its config implies, in its shape; the tokenizer covers the text encoder's vocabulary;
    the components fit one another; the scheduler builds. One ModelError lists every problem, each naming its
    file. `headers`: components' tensors read elsewhere (a hub model's, planned without its weights) instead of
    their files. Returns (model_index.json, configs, each component's tensors)."""
    problems = FolderProblems()
    tensors: dict[str, dict[str, Stored]] = {}
    index = read_json(path / "model_index.json")
    pipeline_class = index.get("_class_name")
    if pipeline_class not in SUPPORTED_PIPELINES:
        raise ModelError(f"{path / 'model_index.json'}: a {pipeline_class or 'unknown'} model, not a PixArt "
                         f"one (supported: {', '.join(SUPPORTED_PIPELINES)})")
    classes = _check_index(path / "model_index.json", index, problems)
    configs: dict[str, dict] = {}
    for component in COMPONENTS:
        folder = path / component
        if not folder.is_dir():
            problems.append(f"{folder}: component folder missing")
            continue
        if component == "tokenizer":
            continue
        config_path = folder / ("scheduler_config.json" if component == "scheduler" else "config.json")
        config = problems.check(read_json, config_path)
        if config is None:
            continue
        if component == "scheduler":
            configs[component] = config
            continue
        # what a config leaves out, from_pretrained takes from the class: so does everything here, except the
        # sample size, whose default (128) would silently give a model the 1024 px geometry it may not have
        config = with_defaults(component, config, tuple(k for k in _COUNTS[component] if k != "sample_size") + (
            ("block_out_channels",) if component == "vae" else ()))
        config_ok = _check_config(config_path, component, config, problems)
        if headers is not None and component in headers:
            stored = headers[component]
        else:
            weights = problems.check(find_weights, folder, allow_pickle)
            if weights is None:
                continue
            stored = None if weights.pickled else problems.check(index_safetensors, weights.files)
        if stored is not None:
            tensors[component] = stored
        if not config_ok:
            continue
        configs[component] = config
        if stored is None:
            continue  # no headers to compare: pickled weights (from_pretrained will say), or damaged (said)
        if _check_repeats(folder, component, config, stored, problems):
            cls = classes.get(component) or _network_class(component)
            _check_tensors(folder, component, cls, config, stored, problems)
    if all(c in configs for c in ("text_encoder", "transformer", "vae")):
        # what the pipeline derives from the configs, and whether the components fit one another (geometry.py)
        problems.check(read_geometry, pipeline_class, configs, path)
    if "scheduler" in configs and "scheduler" in classes:
        try:
            classes["scheduler"].from_config(configs["scheduler"])
        except Exception as exc:  # noqa: BLE001 - whatever diffusers objects to
            problems.append(f"{path / 'scheduler' / 'scheduler_config.json'}: {classes['scheduler'].__name__} "
                            f"cannot be built from it ({type(exc).__name__}: {exc})")
    if (path / "tokenizer").is_dir() and "text_encoder" in configs:
        problems.check(check_tokenizer, path / "tokenizer", configs["text_encoder"]["vocab_size"])
    problems.raise_any()
    return index, configs, tensors


# -- the tokenizer -------------------------------------------------------------------------------------------------

# Embedding tables are padded to a multiple of at most this many rows (T5's 32,100 pieces in 32,128 rows)
_VOCAB_PADDING = 128


def _sentencepiece_size(path: Path) -> int:
    """The number of pieces in a sentencepiece model file: field 1 (`pieces`) of its ModelProto, counted by
    walking the protobuf wire format (sentencepiece itself is not needed to run the queue)."""
    data = path.read_bytes()
    pos, count = 0, 0

    def varint() -> int:
        nonlocal pos
        shift = value = 0
        while True:
            if pos >= len(data) or shift > 63:
                raise ValueError("not a sentencepiece model")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while pos < len(data):
        key = varint()
        field_number, wire = key >> 3, key & 7
        if wire == 0:
            varint()
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length = varint()
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError("not a sentencepiece model")
        count += field_number == 1
    if pos != len(data) or count == 0:
        raise ValueError("not a sentencepiece model")
    return count


def _tokenizer_size(folder: Path) -> tuple[int, Path]:
    """How many token ids the tokenizer in `folder` gives, from its files alone, and the file it was read from."""
    config_path = folder / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else {}
    added = config.get("added_tokens_decoder") if isinstance(config.get("added_tokens_decoder"), dict) else {}
    fast = folder / "tokenizer.json"
    if fast.is_file():
        data = read_json(fast)
        model = data.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if not isinstance(vocab, (list, dict)) or not vocab:
            raise ModelError(f"{fast}: no vocabulary in it (model.vocab)")
        ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
        ids |= {t["id"] for t in data.get("added_tokens") or [] if isinstance(t, dict) and _is_count(t.get("id"))}
        return max(ids) + 1, fast
    spiece = folder / "spiece.model"
    if spiece.is_file():
        try:
            pieces = _sentencepiece_size(spiece)
        except (OSError, ValueError) as exc:
            raise ModelError(f"{spiece}: cannot be read as a sentencepiece model ({exc})") from exc
        extra = config.get("extra_ids", 100)
        ids = {int(i) for i in added if str(i).isdigit()}
        return max([pieces + (extra if _is_count(extra) else 0) - 1, *ids]) + 1, spiece
    found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    raise ModelError(f"{folder}: no tokenizer files (tokenizer.json or spiece.model; found: {found})")


def check_tokenizer(folder: Path, vocab_size: int) -> int:
    """The tokenizer in `folder` covers the text encoder's vocabulary of `vocab_size` rows: every id it gives has
    a row, and it is not a stand-in much smaller than the encoder's own (transformers builds a 104-token one from
    an empty folder, and every word becomes unknown). Returns its size; reads files only."""
    size, source = _tokenizer_size(folder)
    if size > vocab_size:
        raise ModelError(f"{source}: {size} tokens, more than the text encoder's vocab_size {vocab_size}: "
                         "not this model's tokenizer")
    if size <= vocab_size - _VOCAB_PADDING:
        raise ModelError(f"{source}: {size} tokens, the text encoder has {vocab_size}: not this model's tokenizer "
                         "(copy the model's own tokenizer folder)")
    return size


# -- what a component is: the identity hash ----------------------------------------------------------------------

_HASH_BLOCK = 16 * 2**20
# Files smaller than this are hashed at each resolve rather than cached: ~0.1 s at the ~1 GB/s sha256 runs at
HASH_CACHE_MIN = 64 * 2**20


def _hub_sha256(path: Path) -> str | None:
    """The sha256 of a file in the Hugging Face cache, where the cache names it: a snapshot's file links to
    blobs/<etag>, and the etag of a file stored with LFS (every weights file) is its sha256."""
    if not path.is_symlink():
        return None
    blob = path.resolve()
    if blob.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return blob.name
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of a whole file, read once: the result is kept in the user's cache folder under the file's
    path, size, mtime and inode, and read again while none of them changes (a file rewritten in place changes
    its mtime); files under HASH_CACHE_MIN are hashed each time. Files in the Hugging Face cache take the hub's
    own sha256 without reading."""
    if (known := _hub_sha256(path)) is not None:
        return known
    st = path.stat()
    if st.st_size < HASH_CACHE_MIN:
        return _sha256(path)
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}".encode()).hexdigest()
    entry = cache_dir() / "file-hashes" / key[:40]
    try:
        cached = entry.read_text(encoding="ascii").strip()
        if re.fullmatch(r"[0-9a-f]{64}", cached):
            return cached
    except (OSError, UnicodeDecodeError):
        pass
    value = _sha256(path)
    try:  # a cache that cannot be written only costs the next run the same read
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(entry, lambda f: f.write(value.encode("ascii")))
    except OSError:
        pass
    return value


def _component_identity(folder: Path, allow_pickle: bool = False) -> str:
    """A hash of what decides a component's output: every file of its folder (config, tokenizer, the weights
    files it loads, each whole). Weights files of another variant than the one loaded are left out."""
    loaded: set[Path] = set()
    if folder.name not in ("tokenizer", "scheduler"):
        loaded = set(find_weights(folder, allow_pickle).files)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        is_weights = path.suffix in (".safetensors", *_PICKLED)
        if is_weights and path not in loaded:
            continue
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(file_sha256(path).encode() if is_weights else hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:32]


def resolve_model(source: str, allow_pickle: bool = False, *, hash_weights: bool = True) -> ModelInfo:
    """Find the model (a local folder, or a hub id fetched to the cache), check it and read what it is, without
    loading weights (`check_model_folder`). hash_weights=False leaves `identity` empty: what a plan needs reads
    only configs and headers, while the identity reads each weights file once (file_sha256)."""
    source = str(source)
    expanded = os.path.expanduser(source)
    remote = None
    if os.path.isdir(expanded):
        path = Path(expanded).resolve()
    elif _looks_like_hub_id(source):
        path = _weights_cached(source, allow_pickle) if not hash_weights else None
        if path is None and not hash_weights:
            path, remote = _fetch_without_weights(source)  # a plan downloads no weights
        elif path is None:
            path = _fetch(source, allow_pickle)
    elif os.path.exists(expanded):
        raise ModelError(f"{source}: is a file; --model takes a model folder (with model_index.json) or a hub id")
    else:
        raise ModelError(f"{source}: no such model folder")

    index, configs, headers = check_model_folder(path, allow_pickle, remote)
    identity = {c: _component_identity(path / c, allow_pickle) for c in COMPONENTS} if hash_weights else {}
    classes = {c: index[c][1] for c in COMPONENTS}
    return ModelInfo(source=source, path=path, pipeline_class=index["_class_name"], configs=configs,
                     identity=identity, allow_pickle=allow_pickle, classes=classes, headers=headers)


def _class_of(info: ModelInfo, component: str):
    index = read_json(info.path / "model_index.json")
    library, class_name = index[component]
    cls = _library_class(library, class_name)
    if cls is None:
        raise ModelError(f"{info.path / 'model_index.json'}: unknown class {library}.{class_name} for {component}")
    return cls


def _load(info: ModelInfo, component: str, **kwargs):
    cls = _class_of(info, component)
    if "use_safetensors" in kwargs:
        weights = info.weights(component)
        if weights.pickled:
            kwargs["use_safetensors"] = None  # .bin: the user allowed them (allow_pickle)
        if weights.variant:
            kwargs["variant"] = weights.variant  # from_pretrained reads only the plain files without it
    try:
        return cls.from_pretrained(str(info.path), subfolder=component, **kwargs)
    except ModelError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        raise ModelError(f"{info.path / component}: cannot load {component} ({type(exc).__name__}: {exc})") from exc


def load_tokenizer(info: ModelInfo):
    return _load(info, "tokenizer")


def load_text_encoder(info: ModelInfo, dtype: torch.dtype, device: torch.device, eight_bit: bool = False):
    """T5 whole on `device`, every tensor what `from_pretrained(dtype=dtype)` gives (transformers keeps T5's `wo`
    layers in fp32, _keep_in_fp32_modules, as the reference pipeline does).

    Safetensors weights are built empty from the config and read onto the device through streaming.load_tensors:
    pieces read on several threads into pinned buffers and copied as they arrive. No CPU copy of T5's 9.5 GB is
    made, and on an H200 it reaches the GPU in BENCHMARKS.md's "T5 to the GPU" time against from_pretrained's
    (bench/t5_load.py). Pickled weights (allowed with allow_pickle) and the 8-bit recipe go through
    from_pretrained."""
    if eight_bit:
        return _load(info, "text_encoder", **text_encoder_8bit_kwargs(dtype, device)).eval()
    if info.weights("text_encoder").pickled:
        return _load(info, "text_encoder", dtype=dtype, use_safetensors=True,
                     device_map={"": _map_target(device)}).eval()
    folder = info.path / "text_encoder"
    model, find, keep = _empty_text_encoder(folder, info.headers.get("text_encoder"))
    owners: dict[int, list[tuple[nn.Module, str]]] = {}  # a tied parameter (T5's embedding) is set in each place
    names: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        path, _, leaf = name.rpartition(".")
        owners.setdefault(id(param), []).append((model.get_submodule(path) if path else model, leaf))
        names.setdefault(id(param), name)
    params = {id(p): p for p in model.parameters()}
    order = list(names)
    dtypes = [_target_dtype(names[i], dtype, keep) for i in order]
    try:
        tensors = load_tensors([find(names[i], params[i]) for i in order], dtypes, device)
    except OSError as exc:  # a file cut short or unreadable since the folder was checked
        raise ModelError(f"{folder}: cannot load text_encoder ({type(exc).__name__}: {exc})") from exc
    for i, tensor in zip(order, tensors):
        param = nn.Parameter(tensor, requires_grad=False)
        for owner in owners[i]:
            set_parameter(owner, param)
    _no_meta_buffers(model, folder)
    return model


def _no_meta_buffers(model: nn.Module, folder: Path) -> None:
    """Every buffer of a model built empty has a value (T5 has none; keep it honest)."""
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise ModelError(f"{folder}: buffer {name} has no stored value")


def _empty_text_encoder(folder: Path, stored: dict[str, Stored] | None = None):
    """T5EncoderModel built on the meta device from `folder`'s config, in eval mode; `find(name, param)` locates a
    parameter's tensor in the safetensors files (a tied one under any of its names); `keep`: the module names
    transformers keeps in float32."""
    from transformers import T5Config, T5EncoderModel  # noqa: PLC0415

    config = T5Config.from_pretrained(folder)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    model.eval()
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    stored = stored if stored is not None else stored_tensors(folder)
    aliases: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)

    def find(name: str, param: nn.Parameter) -> Stored:
        if name in stored:
            return stored[name]
        for alias in aliases.get(id(param), []):  # tied: stored under another of its names
            if alias in stored:
                return stored[alias]
        raise ModelError(f"{folder}: no tensor {name!r} in the weights files")

    return model, find, keep


def _map_target(device: torch.device) -> int | str:
    """`device` as from_pretrained's device_map names it: a GPU by its index, anything else by its type."""
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return device.type


def text_encoder_8bit_kwargs(dtype: torch.dtype, device: torch.device) -> dict:
    """`from_pretrained` arguments of diffusers' 8-bit T5 recipe (the PixArt-α docs, "under 8GB GPU VRAM"), in
    transformers 5's spelling: a BitsAndBytesConfig in place of `load_in_8bit=True`. The shards load straight
    onto the GPU (bitsandbytes' int8 layers cannot be moved with `.to`); every linear layer but the fp32 `wo`
    ones becomes LLM.int8 (`wo` stays fp32, as transformers keeps it), the rest is in `dtype`."""
    from transformers import BitsAndBytesConfig  # noqa: PLC0415

    return dict(dtype=dtype, use_safetensors=True, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                device_map={"": _map_target(device)})


def bitsandbytes_available() -> bool:
    import importlib.util  # noqa: PLC0415

    return importlib.util.find_spec("bitsandbytes") is not None


def load_transformer(info: ModelInfo, dtype: torch.dtype, device: torch.device, lora: LoraSet = LoraSet()):
    """The DiT as `from_pretrained(torch_dtype=dtype)` gives it, on `device`, with `lora` merged into its weights
    there (each patched weight from its stored values: lora.merge). On a GPU the merge takes milliseconds; on the
    CPU the XL DiT's 280 rank-32 updates took 11 s (BENCHMARKS.md, LoRA)."""
    model = _load(info, "transformer", torch_dtype=dtype, use_safetensors=True).to(device)
    if lora:
        stored = info.headers.get("transformer") or stored_tensors(info.path / "transformer")
        with torch.no_grad():
            for name, patches in lora.by_parameter().items():
                param = model.get_parameter(name)
                param.copy_(merge(load_tensor(stored[name], stored[name].dtype, param.device), patches, param.dtype))
    return model.eval()


# -- built empty, streamed from the files -------------------------------------------------------------------------

def _target_dtype(name: str, dtype: torch.dtype, keep_fp32: tuple[str, ...]) -> torch.dtype:
    return torch.float32 if any(m in name.split(".") for m in keep_fp32) else dtype


def _place_from_files(model: nn.Module, find, block_pattern: str, units: int, dtype: torch.dtype,
                      keep_fp32: tuple[str, ...], device: torch.device, *, first: int = 0, skip: tuple[str, ...] = (),
                      rename=lambda name: name) -> list[dict]:
    """Point the parameters of an empty (meta) model at its weights files: those of blocks `first`, `first + 1`,
    ... (matched by `block_pattern` on the name as stored) become the streamer's units, read when needed; all
    others load onto `device` now. `find(stored_name, param)` locates a tensor in the files."""
    block = re.compile(block_pattern)
    per_unit: list[dict] = [dict() for _ in range(units)]
    now: list[tuple[tuple[nn.Module, str], Stored | Computed, torch.dtype]] = []
    for name, param in list(model.named_parameters()):
        if name.startswith(skip):
            continue
        path, _, leaf = name.rpartition(".")
        owner = (model.get_submodule(path) if path else model, leaf)
        plain = rename(name)
        target = _target_dtype(plain, dtype, keep_fp32)
        match = block.match(plain)
        if match and int(match.group(1)) >= first:
            per_unit[int(match.group(1)) - first][name] = (owner, find(plain, param), target)
        else:
            now.append((owner, find(plain, param), target))
    for (owner, _, _), tensor in zip(now, load_tensors([src for _, src, _ in now], [d for _, _, d in now], device)):
        set_parameter(owner, tensor)
    return per_unit


def load_text_encoder_streamed(folder: Path, dtype: torch.dtype, device: torch.device, *, micro_batch: int = 1,
                               ahead: int = 0):
    """T5EncoderModel built empty from its config, its blocks streamed from the weights files in `folder` (plain,
    sharded or a variant's, as find_weights picks them; stored in any float dtype).

    Returns (model, streamer). Weights take the dtypes `from_pretrained(dtype=...)` gives them (transformers
    keeps the `_keep_in_fp32_modules`, T5's `wo`, in fp32); a test checks every tensor equals from_pretrained's."""
    model, find, keep = _empty_text_encoder(folder)
    embedding = model.encoder.embed_tokens
    table = load_tensor(find("encoder.embed_tokens.weight", embedding.weight), dtype, torch.device("cpu"))
    model.encoder.embed_tokens = CpuEmbedding(table)
    model.shared = model.encoder.embed_tokens  # the encoder's embedding is the model's input embedding

    units = micro_batch_blocks(model.encoder.block, micro_batch)
    # parameter names below are the wrappers' (encoder.block.N.block.*); the files name them encoder.block.N.*
    per_unit = _place_from_files(
        model, find, r"encoder\.block\.(\d+)\.", len(units), dtype, keep,
        device, skip=("encoder.embed_tokens.", "shared."),
        rename=lambda name: re.sub(r"encoder\.block\.(\d+)\.block\.", r"encoder.block.\1.", name))
    _no_meta_buffers(model, folder)
    streamer = BlockStreamer(units, per_unit, device, ahead=ahead)
    return model, streamer


def load_transformer_streamed(folder: Path, dtype: torch.dtype, device: torch.device, *, ahead: int = 2,
                              resident: int = 0, hold_in_ram: bool = True, lora: LoraSet = LoraSet(),
                              scratch: Path | None = None):
    """The DiT built empty, its first `resident` blocks and everything outside the blocks loaded onto `device`,
    the other blocks streamed, `ahead + 1` at a time (at every step the last block prefetches the first ones of
    the next step). Returns (model, streamer); the model computes what `from_pretrained(torch_dtype=dtype)` gives.

    hold_in_ram: each streamed block is read from the safetensors files once, on several threads, into one
    pinned buffer that stays in RAM (the ~1.2 GiB of PixArt-XL's blocks are needed at every step: reading them
    from the files each time would cost more). Without it (a machine whose RAM cannot hold them, see denoise.py)
    the blocks are read from the files at every step (the page cache serves them while it can) through a small
    pinned ring.

    lora: merged into each patched weight on the CPU as it is read (lora.merge): the weights outside the blocks
    now, the held blocks' when they are read into their buffers. Blocks read at every step are merged once into
    a scratch file in the folder `scratch` (removed when the streamer closes) and read from there."""
    from accelerate import init_empty_weights  # noqa: PLC0415
    from diffusers import PixArtTransformer2DModel  # noqa: PLC0415

    with init_empty_weights():  # parameters on meta; buffers (the positional embedding) computed as usual
        model = PixArtTransformer2DModel.from_config(PixArtTransformer2DModel.load_config(folder))
    model.eval()
    stored = stored_tensors(folder)
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    patches = lora.by_parameter()

    def find(name: str, param) -> Stored | Computed:
        if name not in stored:
            raise ModelError(f"{folder}: no tensor {name!r} in the weights files")
        if name not in patches:
            return stored[name]
        source, target = stored[name], _target_dtype(name, dtype, keep)
        return Computed(source.shape, target, lambda: merge(
            load_tensor(source, source.dtype, torch.device("cpu")), patches[name], target))

    blocks = len(model.transformer_blocks)
    per_unit = _place_from_files(model, find, r"transformer_blocks\.(\d+)\.", blocks - resident, dtype, keep,
                                 device, first=resident)
    spilled = None
    if not hold_in_ram and patches:
        spilled = _spill_computed(per_unit, scratch or folder)
    for module in model.modules():
        for leaf, buf in list(module._buffers.items()):
            if buf is not None:  # as computed: from_pretrained leaves them so (the positional embedding in float32)
                module._buffers[leaf] = buf.to(device)
    streamer = BlockStreamer(list(model.transformer_blocks)[resident:], per_unit, device, ahead=ahead, cyclic=True,
                             hold=hold_in_ram)
    if spilled is not None:
        streamer.on_close.append(lambda: spilled.unlink(missing_ok=True))
    return model, streamer


def _spill_computed(per_unit: list[dict], folder: Path) -> Path:
    """Make every computed tensor of the streamed units once and write them one after another to a temporary
    file in `folder` (named as this tool's temporary files are, so that a run killed meanwhile leaves nothing a
    later run keeps); each unit's entry then points at its bytes there, to be read at every step like the
    model's own files. Returns the file."""
    import tempfile  # noqa: PLC0415

    from .files import TEMP_MARK  # noqa: PLC0415

    fd, name = tempfile.mkstemp(dir=folder, prefix=f".transformer-lora{TEMP_MARK}", suffix=".tmp")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            for unit in per_unit:
                for key, (owner, src, dtype) in unit.items():
                    if isinstance(src, Computed):
                        tensor = src.make().contiguous()
                        start = f.tell()
                        f.write(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
                        unit[key] = (owner, Stored(path, start, f.tell() - start, dtype, tuple(tensor.shape)), dtype)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def vae_dtype(info: ModelInfo, dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE decodes in, for a run in `dtype`.

    PixArt-Σ ships the SDXL VAE, whose activations overflow float16 (NaN, black images); its config says so with
    `force_upcast` (the "fp16-fix" VAE says false). It decodes in float32 then, as diffusers' SDXL pipeline does,
    rather than bfloat16: float32 gives the float32 reference's pixels and runs on every GPU, where bfloat16 is
    slow or missing before Ampere (the small cards this is for); it costs twice the VAE's memory at decode.
    PixArt-α's SD VAE is safe in float16 and its reference decodes so: kept, for images equal to the reference's."""
    upcast = info.pipeline_class == "PixArtSigmaPipeline" and info.configs["vae"].get("force_upcast", True)
    return torch.float32 if dtype == torch.float16 and upcast else dtype


def load_vae(info: ModelInfo, dtype: torch.dtype, device: torch.device):
    return _load(info, "vae", torch_dtype=dtype, use_safetensors=True).to(device).eval()


def load_scheduler(info: ModelInfo, sampler: str | None = None):
    """A fresh scheduler for `sampler` (default: the model's own, as shipped), built from the model's config."""
    return samplers.make_scheduler(sampler or info.sampler, info.configs["scheduler"], info.scheduler_class)


def make_pipeline(info: ModelInfo, **components):
    """The reference pipeline class around whichever components are loaded; the others are None.

    diffusers' PixArtAlphaPipeline works with `text_encoder=None, vae=None` (prompt embeddings in, latents
    out), so every stage runs the reference's own maths."""
    cls = _class_of_pipeline(info)
    parts = {name: components.get(name) for name in COMPONENTS}
    pipe = cls(**parts)
    info.geometry.configure(pipe)  # without a VAE, diffusers would assume a scale factor of 8
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _class_of_pipeline(info: ModelInfo):
    import diffusers  # noqa: PLC0415

    return getattr(diffusers, info.pipeline_class)


def sampler_label(info: ModelInfo, sampler: str | None = None) -> str:
    """A sampler as image tools name it (the model's DPM-Solver, dpmsolver++ of order 2: 'DPM++ 2M')."""
    return samplers.label(sampler or info.sampler, info.configs["scheduler"])


def caption_cleaning() -> bool:
    """Whether the reference pipeline cleans captions here: it does when beautifulsoup4 and ftfy are installed
    (and silently falls back otherwise). Part of an embedding's key, since it changes the text encoded."""
    from diffusers.utils import is_bs4_available, is_ftfy_available  # noqa: PLC0415

    return is_bs4_available() and is_ftfy_available()


T5_FP32_MODULES = ("wo",)  # transformers keeps these T5 layers in fp32 (T5PreTrainedModel._keep_in_fp32_modules)


def tensor_shapes(info: ModelInfo, component: str) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape) for every tensor in a component's weights files."""
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    if component in info.headers:
        stored = info.headers[component]
    else:
        weights = info.weights(component)
        stored = {} if weights.pickled else index_safetensors(weights.files)
    return {name: (names[s.dtype], list(s.shape)) for name, s in stored.items()}


def _bytes_at(shapes: dict, itemsize: int, keep_fp32: tuple[str, ...] = (), int8=lambda name: False) -> dict[str, int]:
    out = {}
    for name, (_, shape) in shapes.items():
        numel = 1
        for d in shape:
            numel *= d
        if any(m in name.split(".") for m in keep_fp32):
            out[name] = numel * 4
        elif int8(name):
            out[name] = numel + shape[0] * 4  # LLM.int8: a byte per weight, a float32 scale per output row
        else:
            out[name] = numel * itemsize
    return out


_T5_INT8 = re.compile(r"encoder\.block\.\d+\.layer\.\d+\.(SelfAttention\.[qkvo]|DenseReluDense\.wi(_\d)?)\.weight")


def _blocks(sizes: dict[str, int], prefix: str) -> tuple[int, int, int]:
    """(largest block, everything outside the blocks, number of blocks) for blocks named prefix.<i>."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    per_block: dict[str, int] = {}
    other = 0
    for name, n in sizes.items():
        match = pattern.match(name)
        if match:
            per_block[match.group(1)] = per_block.get(match.group(1), 0) + n
        else:
            other += n
    return max(per_block.values(), default=0), other, len(per_block)


def component_sizes(info: ModelInfo, dtype: torch.dtype, text_encoder_8bit: bool = False):
    """The planner's input: each component's bytes at `dtype`, from the headers alone."""
    shapes = {c: tensor_shapes(info, c) for c in ("text_encoder", "transformer", "vae")}
    return sizes_from_shapes(shapes, info.configs, dtype, info.geometry.max_sequence_length, text_encoder_8bit,
                             vae_dtype=vae_dtype(info, dtype))


def sizes_from_shapes(shapes: dict[str, dict], configs: dict[str, dict], dtype: torch.dtype, max_tokens: int = 120,
                      text_encoder_8bit: bool = False, vae_dtype: torch.dtype | None = None):
    """Bytes of each component as loaded. With `text_encoder_8bit`, T5's attention and wi layers count a byte a
    weight (its fp32 `wo` layers stay fp32: T5-XXL is ~7.4 GiB so, against ~10.7 GiB in float16). The VAE counts
    at `vae_dtype` (default: `dtype`), its weights and its activations."""
    from .placement import Sizes  # noqa: PLC0415

    itemsize = torch.tensor([], dtype=dtype).element_size()
    vae_itemsize = torch.tensor([], dtype=vae_dtype or dtype).element_size()
    t5 = _bytes_at(shapes["text_encoder"], itemsize, T5_FP32_MODULES,
                   int8=_T5_INT8.fullmatch if text_encoder_8bit else (lambda name: False))
    dit = _bytes_at(shapes["transformer"], itemsize)
    vae = _bytes_at(shapes["vae"], vae_itemsize)
    t5_block, t5_other, _ = _blocks(t5, "encoder.block")
    # The token embedding is one tensor stored under one or both of its tied names.
    tied = [n for name, n in t5.items() if name in ("shared.weight", "encoder.embed_tokens.weight")]
    embedding = max(tied, default=0)
    t5_total = sum(t5.values()) - embedding * max(0, len(tied) - 1)
    t5_other -= embedding * len(tied)
    dit_block, dit_other, dit_blocks = _blocks(dit, "transformer_blocks")
    te, tr = configs["text_encoder"], configs["transformer"]
    return Sizes(
        text_encoder=t5_total, text_encoder_block=t5_block, text_encoder_other=t5_other,
        transformer=sum(dit.values()), transformer_block=dit_block, transformer_other=dit_other,
        vae=sum(vae.values()), transformer_blocks=dit_blocks, text_tokens=max_tokens, text_dim=int(te["d_model"]),
        text_ff=int(te["d_ff"]), dit_width=int(tr["num_attention_heads"]) * int(tr["attention_head_dim"]),
        dit_patch=patch_size(configs), vae_scale=vae_scale_factor(configs), dtype_bytes=itemsize,
        vae_dtype_bytes=vae_itemsize, text_heads=int(te.get("num_heads", 64)),
        text_vocab=int(te.get("vocab_size", 32128)),
        vae_channels=tuple(int(c) for c in configs["vae"]["block_out_channels"]),
        vae_layers=int(configs["vae"].get("layers_per_block", 2)))
