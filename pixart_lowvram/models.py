"""All model loading in one room: find the model folder, read what it is without loading weights, load one
component at a time with the libraries' own `from_pretrained`, and say which file is at fault when that fails.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import samplers
from .errors import ModelError
from .jobs import JobDefaults

DEFAULT_MODEL = "PixArt-alpha/PixArt-XL-2-1024-MS"
SUPPORTED_PIPELINES = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
MAX_TOKENS = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}  # the reference pipelines' max_sequence_length
COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
# Only what the staged queue reads: safetensors weights, configs and tokenizer files, never pickled weights.
HUB_PATTERNS = ["model_index.json", "*/config.json", "*/*.safetensors", "*/*.safetensors.index.json",
                "scheduler/scheduler_config.json", "tokenizer/*"]
_IDENTITY_SAMPLE = 64 * 1024


@dataclass(frozen=True)
class Kind:
    """A kind of PixArt model and what its reference usage runs with when a job does not say."""

    name: str
    title: str
    steps: int
    cfg: float
    timesteps: tuple[int, ...] | None = None  # fixed timesteps passed to the pipeline instead of a step count
    note: str = ""


# The defaults of each model's reference usage: diffusers' pipelines (20 steps, guidance 4.5), PixArt-LCM's model
# card (`guidance_scale=0., num_inference_steps=4`) and PixArt-DMD's demo (`timesteps=[400], guidance_scale=1,
# num_inference_steps=1`, app/app_pixart_dmd.py in PixArt-alpha/PixArt-sigma).
KINDS = {
    "alpha": Kind("alpha", "PixArt-α", steps=20, cfg=4.5),
    "sigma": Kind("sigma", "PixArt-Σ", steps=20, cfg=4.5),
    "lcm": Kind("lcm", "PixArt-LCM", steps=4, cfg=0.0, note="latent consistency: a few steps, no guidance"),
    "dmd": Kind("dmd", "PixArt-α DMD", steps=1, cfg=1.0, timesteps=(400,),
                note="one step at timestep 400, no guidance"),
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

    @property
    def name(self) -> str:
        return self.source.rstrip("/").split("/")[-1] or self.source

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.configs["vae"]["block_out_channels"]) - 1)

    @property
    def sample_size(self) -> int:
        return int(self.configs["transformer"]["sample_size"])

    @property
    def default_size(self) -> int:
        """The reference pipeline's default width and height: transformer sample size times VAE scale."""
        return self.sample_size * self.vae_scale_factor

    @property
    def max_sequence_length(self) -> int:
        """Tokens per prompt, as the reference pipeline pads and truncates them (α 120, Σ 300)."""
        return MAX_TOKENS[self.pipeline_class]

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
        return JobDefaults(size=self.default_size, steps=kind.steps, cfg=kind.cfg, sampler=self.sampler)

    @property
    def resolution_bins(self) -> dict[str, list[float]] | None:
        """The aspect-ratio bins the reference pipeline snaps sizes to, by transformer sample size (None: the
        reference knows none for this size). diffusers' own tables: Σ adds 2048 px to α's 256, 512, 1024."""
        from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha  # noqa: PLC0415
        from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma  # noqa: PLC0415

        tables = {128: alpha.ASPECT_RATIO_1024_BIN, 64: alpha.ASPECT_RATIO_512_BIN, 32: alpha.ASPECT_RATIO_256_BIN}
        if self.pipeline_class == "PixArtSigmaPipeline":
            tables[256] = sigma.ASPECT_RATIO_2048_BIN
        return tables.get(self.sample_size)

    @property
    def latent_channels(self) -> int:
        return int(self.configs["transformer"]["in_channels"])

    @property
    def text_dim(self) -> int:
        return int(self.configs["text_encoder"]["d_model"])

    def weight_files(self, component: str) -> list[Path]:
        files = sorted((self.path / component).glob("*.safetensors"))
        if not files and self.allow_pickle:
            files = sorted((self.path / component).glob("*.bin"))
        return files

    def weight_bytes(self, component: str) -> int:
        return sum(f.stat().st_size for f in self.weight_files(component))


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


def _read_json(path: Path) -> dict:
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


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file: names, dtypes, shapes and offsets, no tensor data."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ModelError(f"{path}: truncated (no safetensors header)")
            (length,) = struct.unpack("<Q", raw)
            if length > 100 * 1024 * 1024:
                raise ModelError(f"{path}: not a safetensors file (header of {length} bytes)")
            header = json.loads(f.read(length))
    except OSError as exc:
        raise ModelError(f"{path}: cannot be read ({exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not a safetensors file ({exc})") from exc
    return header


def check_safetensors(path: Path) -> dict:
    """The header of a whole safetensors file; a ModelError naming the file if it is cut short."""
    header = safetensors_header(path)
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
    ends = [info["data_offsets"][1] for name, info in header.items()
            if name != "__metadata__" and isinstance(info, dict) and "data_offsets" in info]
    expected = 8 + length + max(ends, default=0)
    size = path.stat().st_size
    if size < expected:
        raise ModelError(f"{path}: truncated ({size} of {expected} bytes); download or copy it again")
    return header


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    """Every weights file of a component is whole, and shards named by an index are all there."""
    for index in folder.glob("*.safetensors.index.json"):
        for shard in sorted(set(_read_json(index).get("weight_map", {}).values())):
            if not (folder / shard).is_file():
                raise ModelError(f"{folder / shard}: missing (listed in {index.name})")
    weights = sorted(folder.glob("*.safetensors"))
    if weights:
        for path in weights:
            check_safetensors(path)
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled and allow_pickle:
        return
    found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
    hint = ("; pickled weights can run code when they load: convert them to safetensors, or pass "
            "--allow-pickle if you trust their source") if pickled else ""
    raise ModelError(f"{folder}: no .safetensors weights (found: {found}){hint}")


def _component_identity(folder: Path) -> str:
    """A hash of what decides a component's output: its config and tokenizer files, and for each weights file
    its header (names, shapes, dtypes), size and samples of its data. Cheap (no full read) and changes when the
    weights do, including two random-weight models of equal shapes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        digest.update(rel.encode() + b"\0")
        size = path.stat().st_size
        if path.suffix == ".safetensors":
            digest.update(json.dumps(safetensors_header(path), sort_keys=True).encode())
            with open(path, "rb") as f:
                digest.update(str(size).encode())
                digest.update(f.read(_IDENTITY_SAMPLE))
                f.seek(max(0, size - _IDENTITY_SAMPLE))
                digest.update(f.read(_IDENTITY_SAMPLE))
        elif size <= 16 * 1024 * 1024:
            digest.update(path.read_bytes())
        else:
            digest.update(str(size).encode())
    return digest.hexdigest()[:32]


def resolve_model(source: str, allow_pickle: bool = False) -> ModelInfo:
    """Find the model (a local folder, or a hub id fetched to the cache) and read what it is, without weights."""
    source = str(source)
    expanded = os.path.expanduser(source)
    if os.path.isdir(expanded):
        path = Path(expanded).resolve()
    elif _looks_like_hub_id(source):
        path = _fetch(source, allow_pickle)
    elif os.path.exists(expanded):
        raise ModelError(f"{source}: is a file; --model takes a model folder (with model_index.json) or a hub id")
    else:
        raise ModelError(f"{source}: no such model folder")

    index = _read_json(path / "model_index.json")
    pipeline_class = index.get("_class_name")
    if pipeline_class not in SUPPORTED_PIPELINES:
        raise ModelError(f"{path / 'model_index.json'}: a {pipeline_class or 'unknown'} model, not a PixArt "
                         f"one (supported: {', '.join(SUPPORTED_PIPELINES)})")
    configs = {}
    for component in COMPONENTS:
        folder = path / component
        if not folder.is_dir():
            raise ModelError(f"{folder}: component folder missing")
        if component == "tokenizer":
            continue
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        configs[component] = _read_json(folder / name)
        if component != "scheduler":
            _check_weights(folder, allow_pickle)
    identity = {c: _component_identity(path / c) for c in COMPONENTS}
    classes = {c: str(index[c][1]) for c in COMPONENTS
               if isinstance(index.get(c), list) and len(index[c]) == 2}
    return ModelInfo(source=source, path=path, pipeline_class=pipeline_class, configs=configs, identity=identity,
                     allow_pickle=allow_pickle, classes=classes)


def _class_of(info: ModelInfo, component: str):
    import diffusers  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    index = _read_json(info.path / "model_index.json")
    library, class_name = index[component]
    module = {"diffusers": diffusers, "transformers": transformers}.get(library)
    cls = getattr(module, class_name, None) if module is not None else None
    if cls is None:
        raise ModelError(f"{info.path / 'model_index.json'}: unknown class {library}.{class_name} for {component}")
    return cls


def _load(info: ModelInfo, component: str, **kwargs):
    cls = _class_of(info, component)
    if "use_safetensors" in kwargs and info.allow_pickle:
        kwargs["use_safetensors"] = None  # safetensors where there are some, .bin otherwise
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
    # transformers keeps T5's `wo` layers in fp32 (_keep_in_fp32_modules) as the reference pipeline does.
    if eight_bit:
        return _load(info, "text_encoder", **text_encoder_8bit_kwargs(dtype, device)).eval()
    return _load(info, "text_encoder", dtype=dtype, use_safetensors=True).to(device).eval()


def text_encoder_8bit_kwargs(dtype: torch.dtype, device: torch.device) -> dict:
    """`from_pretrained` arguments of diffusers' 8-bit T5 recipe (the PixArt-α docs, "under 8GB GPU VRAM"), in
    transformers 5's spelling: a BitsAndBytesConfig in place of `load_in_8bit=True`. The shards load straight
    onto the GPU (bitsandbytes' int8 layers cannot be moved with `.to`); every linear layer but the fp32 `wo`
    ones becomes LLM.int8 (`wo` stays fp32, as transformers keeps it), the rest is in `dtype`."""
    from transformers import BitsAndBytesConfig  # noqa: PLC0415

    index = device.index if device.index is not None else torch.cuda.current_device()
    return dict(dtype=dtype, use_safetensors=True, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                device_map={"": index})


def bitsandbytes_available() -> bool:
    import importlib.util  # noqa: PLC0415

    return importlib.util.find_spec("bitsandbytes") is not None


def load_transformer(info: ModelInfo, dtype: torch.dtype, device: torch.device):
    return _load(info, "transformer", torch_dtype=dtype, use_safetensors=True).to(device).eval()


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


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}
T5_FP32_MODULES = ("wo",)  # transformers keeps these T5 layers in fp32 (T5PreTrainedModel._keep_in_fp32_modules)


def tensor_shapes(info: ModelInfo, component: str) -> dict[str, tuple[str, list[int]]]:
    """name -> (safetensors dtype, shape) for every tensor in a component's weights files."""
    shapes = {}
    for path in info.weight_files(component):
        if path.suffix != ".safetensors":
            continue
        for name, meta in safetensors_header(path).items():
            if name != "__metadata__":
                shapes[name] = (meta["dtype"], meta["shape"])
    return shapes


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
    return sizes_from_shapes(shapes, info.configs, dtype, info.max_sequence_length, text_encoder_8bit,
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
        dit_patch=int(tr.get("patch_size", 2)),
        vae_scale=2 ** (len(configs["vae"]["block_out_channels"]) - 1), dtype_bytes=itemsize,
        vae_dtype_bytes=vae_itemsize)
