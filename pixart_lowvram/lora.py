"""LoRAs: low-rank updates to the transformer's weights, read from the files users have, checked against the
transformer's safetensors headers before anything loads, and merged into the weights as they load (resident or
streamed: models.py), so that a LoRA costs no GPU memory and no time per step.

Every update is W += scale * factor * B @ A, computed in float32 on the CPU and cast once to the dtype the
transformer computes in; `factor` is what the format says (peft: lora_alpha / r, or / sqrt(r) with rsLoRA; a
flat file: alpha / rank where it stores an alpha, else 1, as ComfyUI reads them). The LoRAs of one set are merged
in a fixed order (by content hash, then scale), so a set's result and its key do not depend on the order a job
lists them in.

Formats:
- peft's adapter folder (adapter_config.json + adapter_model.safetensors), what PixArt LoRA training with peft
  writes (`get_peft_model(transformer, LoraConfig(...)).save_pretrained(DIR)`): keys
  `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`; r, lora_alpha, use_rslora, rank_pattern and
  alpha_pattern are applied as peft applies them; anything else that changes the maths (DoRA, lora_bias, ...) is
  refused.
- diffusers' LoRA files (`save_lora_weights`: keys behind `transformer.`; `save_lora_adapter`: bare) that keep
  their LoraConfig in the header's `lora_adapter_metadata`: applied with it, as diffusers loads them (peft's
  factors and patterns; ComfyUI ignores the metadata and adds such a file at 1).
- flat safetensors files in the layouts ComfyUI maps for PixArt (comfy/lora.py `model_lora_keys_unet`,
  comfy/utils.py `pixart_to_diffusers`): diffusers module names behind `transformer.`, `base_model.model.` or
  `unet.base_model.model.` (or bare, as diffusers' `save_lora_adapter` writes them); the original PixArt names (`blocks.N.attn.qkv`, whose rows are diffusers' to_q, to_k
  and to_v) as `lora_unet_blocks_N_attn_qkv` or `diffusion_model.blocks.N.attn.qkv`; and OneTrainer's
  `lora_transformer_<diffusers name, dots as underscores>` (ComfyUI_ExtraModels' PixArt LoRA loader). Each with
  the down/up pairs ComfyUI's LoRA adapter reads (`lora_down`/`lora_up`, `lora_A`/`lora_B`, `lora.down`/`lora.up`,
  `_lora.down`/`_lora.up`, `lora_linear_layer.down`/`.up`) and an optional `.alpha`.
Anything else (LoHa, LoKr, DoRA, LoCon's mid weights, text-encoder LoRAs, keys of another model) is refused,
naming the file and the keys not understood.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelError
from .streaming import Stored, load_tensor

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# The header entry where diffusers' save_lora_weights and save_lora_adapter keep the adapter's LoraConfig (r,
# lora_alpha, patterns), its keys behind the component's prefix ("transformer.r") or bare
DIFFUSERS_METADATA = "lora_adapter_metadata"

# (down, up) suffixes of one module's pair, as ComfyUI's LoRA adapter reads them (comfy/weight_adapter/lora.py)
PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"),
         (".lora.down.weight", ".lora.up.weight"), ("_lora.down.weight", "_lora.up.weight"),
         (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"))
ALPHA = ".alpha"
# "" last: bare diffusers module names, as diffusers' save_lora_adapter writes them
DIFFUSERS_PREFIXES = ("transformer.", "base_model.model.", "unet.base_model.model.", "")

# The original PixArt code's names (what ComfyUI's PixArt model holds) -> diffusers' modules, and for its fused
# projections the diffusers modules whose rows they stack, in order (comfy/utils.py `pixart_to_diffusers`).
_BLOCK = {"attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "attn.proj": ("attn1.to_out.0",),
          "cross_attn.q_linear": ("attn2.to_q",), "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
          "cross_attn.proj": ("attn2.to_out.0",), "mlp.fc1": ("ff.net.0.proj",), "mlp.fc2": ("ff.net.2",)}
_BASIC = {"x_embedder.proj": "pos_embed.proj", "y_embedder.y_proj.fc1": "caption_projection.linear_1",
          "y_embedder.y_proj.fc2": "caption_projection.linear_2",
          "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
          "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2", "t_block.1": "adaln_single.linear",
          "final_layer.linear": "proj_out",
          "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
          "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
          "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
          "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2"}

# peft config fields that do not change what a saved adapter computes at inference (or that are applied here);
# any other field set to something other than its default is refused rather than silently ignored
_PEFT_NEUTRAL = {"peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
                 "exclude_modules", "lora_dropout", "init_lora_weights", "task_type", "base_model_name_or_path",
                 "revision", "inference_mode", "auto_mapping", "peft_version", "layers_to_transform",
                 "layers_pattern", "fan_in_fan_out", "bias", "runtime_config", "loftq_config", "eva_config",
                 "corda_config", "lora_ga_config", "megatron_core", "qalora_group_size", "target_modules_to_tie",
                 "ensure_weight_tying", "arrow_config"}
_SHOWN = 5  # keys listed in a message about keys not understood


class LoraFormatError(ValueError):
    """A LoRA file that cannot be used with this transformer: the message names the file and what is wrong."""


@dataclass(frozen=True)
class Patch:
    """One low-rank update: `module`'s weight gets factor * up @ down."""

    module: str  # the diffusers module, e.g. transformer_blocks.0.attn1.to_q
    down: Stored  # A: (rank, in) or (rank, in, kh, kw)
    up: Stored  # B: (rows, rank) or (rows, rank, 1, 1)
    factor: float


@dataclass(frozen=True)
class LoraFile:
    """A LoRA read and checked against one transformer: its updates, where it came from, and what it is."""

    path: Path  # the file, or the peft folder
    format: str  # "peft", "diffusers", "original" or "onetrainer"
    patches: tuple[Patch, ...]
    identity: str  # a hash of the bytes that decide its updates ("" when not hashed: a plan)


@dataclass(frozen=True)
class LoraSet:
    """The LoRAs merged into one transformer, each with its scale, in the fixed order they are merged in."""

    entries: tuple[tuple[LoraFile, float], ...] = ()

    @classmethod
    def of(cls, pairs) -> LoraSet:
        """A set from (LoraFile, scale) pairs in any order; scale 0 adds nothing (W + 0 * B @ A is W) and is left
        out, so it makes the same transformer as no LoRA."""
        kept = [(lora, float(scale)) for lora, scale in pairs if scale != 0]
        return cls(tuple(sorted(kept, key=lambda e: (e[0].identity, e[1], str(e[0].path)))))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def key(self) -> list[list]:
        """What the set is, for an artifact's key: each LoRA's identity and scale, in merge order."""
        return [[lora.identity, scale] for lora, scale in self.entries]

    def by_parameter(self) -> dict[str, list[tuple[Patch, float]]]:
        """parameter name (module.weight) -> the updates to it, in merge order, each with its LoRA's scale."""
        out: dict[str, list[tuple[Patch, float]]] = {}
        for lora, scale in self.entries:
            for patch in lora.patches:
                out.setdefault(f"{patch.module}.weight", []).append((patch, scale))
        return out


def lora_set(entries: list[dict], loras: Mapping[str, LoraFile]) -> LoraSet:
    """An item's LoRAs ({"path", "scale"} entries) as the set merged for it, `loras` giving each path's file."""
    return LoraSet.of((loras[e["path"]], e["scale"]) for e in entries)


def merge(weight: torch.Tensor, patches: list[tuple[Patch, float]], dtype: torch.dtype) -> torch.Tensor:
    """`weight` (as stored, any float dtype) with `patches` added in float32 where `weight` is, cast once to
    `dtype`."""
    merged = weight.to(torch.float32, copy=True)
    for patch, scale in patches:
        down = load_tensor(patch.down, torch.float32, merged.device)
        up = load_tensor(patch.up, torch.float32, merged.device)
        delta = up.reshape(up.shape[0], up.shape[1]) @ down.reshape(down.shape[0], -1)
        merged.add_(delta.reshape(merged.shape), alpha=scale * patch.factor)
    return merged.to(dtype)


# -- reading a LoRA -------------------------------------------------------------------------------------------------

def read_lora(path: str | Path, transformer: dict[str, Stored], hash_files: bool = True) -> LoraFile:
    """A LoRA file or peft folder, checked against the transformer whose tensors `transformer` lists (from its
    safetensors headers): every key understood, every update fits a module of this transformer in its shape, A's
    and B's ranks agree, every alpha is a finite number. Reads headers and the alphas only. Raises
    LoraFormatError naming the file."""
    from .models import read_safetensors  # here: models imports this module

    path = Path(path)
    if not path.exists():
        raise LoraFormatError(f"{path}: no such file or folder")
    config = None
    if path.is_dir():
        weights, config_path = path / PEFT_WEIGHTS, path / PEFT_CONFIG
        if not config_path.is_file():
            raise LoraFormatError(f"{path}: a folder without {PEFT_CONFIG}: not a peft adapter folder (give a "
                                  f"LoRA .safetensors file or a folder that peft's save_pretrained wrote)")
        if not weights.is_file():
            pickled = path / "adapter_model.bin"
            hint = (": its adapter_model.bin is pickled (it can run code when loaded); convert it to safetensors"
                    if pickled.is_file() else "")
            raise LoraFormatError(f"{path}: no {PEFT_WEIGHTS} in the adapter folder{hint}")
    elif path.name == PEFT_WEIGHTS and (path.parent / PEFT_CONFIG).is_file():
        weights, config_path = path, path.parent / PEFT_CONFIG  # peft's file: its alpha is in the config beside it
        path = path.parent
    elif path.suffix != ".safetensors":
        raise LoraFormatError(f"{path}: not a .safetensors file (pickled .ckpt/.pt/.bin LoRAs can run code when "
                              "loaded: convert them to safetensors)")
    else:
        weights, config_path = path, None
    if config_path is not None:
        config = _peft_config(config_path)
    try:
        stored = read_safetensors(weights)
    except ModelError as exc:
        raise LoraFormatError(str(exc)) from None
    if not stored:
        raise LoraFormatError(f"{weights}: holds no tensors")
    modules = _lora_modules(transformer)
    if config is not None:
        fmt, patches = "peft", _peft_patches(weights, stored, config, modules)
    else:
        fmt, patches = _flat_patches(weights, stored, modules, transformer, _metadata_config(weights))
    identity = ""
    if hash_files:
        from .models import file_sha256

        parts = [file_sha256(weights)]
        if config_path is not None:
            parts.append(hashlib.sha256(config_path.read_bytes()).hexdigest())
        identity = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]
    return LoraFile(path=path, format=fmt, patches=tuple(patches), identity=identity)


def _lora_modules(transformer: dict[str, Stored]) -> dict[str, tuple[int, ...]]:
    """The transformer's modules a LoRA can update (a linear or convolution weight) -> that weight's shape."""
    return {name[:-len(".weight")]: s.shape for name, s in transformer.items()
            if name.endswith(".weight") and len(s.shape) in (2, 4)}


def _peft_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraFormatError(f"{path}: cannot be read as JSON ({exc})") from None
    return _checked_config(config, str(path))


def _metadata_config(weights: Path) -> dict | None:
    """The transformer's LoraConfig that diffusers keeps in a LoRA file's header (None: there is none). diffusers
    loads such a file with it (lora_alpha / r and the patterns, as peft), where ComfyUI ignores it; the file's
    author trained the adapter with those, so they apply here too."""
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(weights, framework="pt") as f:
        text = (f.metadata() or {}).get(DIFFUSERS_METADATA)
    if text is None:
        return None
    where = f"{weights} ({DIFFUSERS_METADATA})"
    try:
        packed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LoraFormatError(f"{where}: cannot be read as JSON ({exc})") from None
    if not isinstance(packed, dict):
        raise LoraFormatError(f"{where}: expected a JSON object")
    # save_lora_weights keeps each component's config behind its prefix; save_lora_adapter writes one bare
    if any(k.startswith("transformer.") for k in packed):
        packed = {k[len("transformer."):]: v for k, v in packed.items() if k.startswith("transformer.")}
    elif any("." in k for k in packed):
        return None  # another component's only (the text encoder's): its keys are refused as such
    return _checked_config(packed, where)


def _checked_config(config: object, path: str) -> dict:
    """A peft LoraConfig (adapter_config.json, or diffusers' metadata) that this module can apply as peft does."""
    if not isinstance(config, dict):
        raise LoraFormatError(f"{path}: expected a JSON object")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise LoraFormatError(f"{path}: a {kind} adapter; only LoRA adapters (peft_type LORA) can be merged")
    if config.get("use_dora"):
        raise LoraFormatError(f"{path}: a DoRA adapter (use_dora true): its weight-decomposed update is not "
                              "supported, only plain LoRA")
    if config.get("bias", "none") != "none":
        raise LoraFormatError(f"{path}: bias {config['bias']!r}: the adapter trains biases too, which is not "
                              "supported (only bias \"none\")")
    odd = [k for k, v in config.items() if k not in _PEFT_NEUTRAL and v not in (None, False, {}, [], "", 0)]
    if odd:
        raise LoraFormatError(f"{path}: sets {', '.join(f'{k}={json.dumps(config[k])}' for k in odd)}, which "
                              "this tool does not apply; only plain LoRA adapters (r, lora_alpha, use_rslora, "
                              "rank_pattern, alpha_pattern) can be merged")
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)  # peft's defaults
        if not _finite(value):
            raise LoraFormatError(f"{path}: {key} must be a number, not {json.dumps(value)}")
    if config.get("r", 8) <= 0:  # peft refuses such an adapter too; its factor alpha / r would divide by it
        raise LoraFormatError(f"{path}: r must be more than 0, not {json.dumps(config['r'])}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(_finite(v) for v in pattern.values()):
            raise LoraFormatError(f"{path}: {key} must map module patterns to numbers")
        for name, value in pattern.items():
            try:
                re.compile(name)
            except re.error as exc:
                raise LoraFormatError(f"{path}: {key} has {name!r}, not a pattern peft can match modules "
                                      f"with ({exc})") from None
            if key == "rank_pattern" and value <= 0:
                raise LoraFormatError(f"{path}: rank_pattern gives {name!r} rank {json.dumps(value)}; a rank "
                                      "must be more than 0")
    return config


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pattern_key(patterns, module: str) -> str:
    """The first of `patterns` that names `module` (peft's get_pattern_key: a regex matching the module's name or
    a dotted tail of it), else the module's own name."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return pattern
    return module


def _peft_factor(config: dict, module: str, pair: dict[str, str], stored: dict[str, Stored], config_name: str
                 ) -> tuple[float, str | None]:
    """A module's factor as peft scales it under `config` (lora_alpha / r, or / sqrt(r) with rsLoRA, the patterns
    applied), and a problem where its tensors' rank is not the config's."""
    rank = (config.get("rank_pattern") or {}).get(_pattern_key(config.get("rank_pattern") or {}, module),
                                                   config.get("r", 8))
    alpha = (config.get("alpha_pattern") or {}).get(_pattern_key(config.get("alpha_pattern") or {}, module),
                                                    config.get("lora_alpha", 8))
    if stored[pair["A"]].shape[0] != rank:
        return 0.0, f"{module}: its tensors have rank {stored[pair['A']].shape[0]}, {config_name} says r={rank}"
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank), None


def _peft_patches(weights: Path, stored: dict[str, Stored], config: dict, modules) -> list[Patch]:
    found: dict[str, dict[str, str]] = {}
    unknown = []
    for key in stored:
        match = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        if match:
            found.setdefault(match[1], {})[match[2]] = key
        else:
            unknown.append(key)
    _refuse_unknown(weights, unknown, "peft LoRA keys base_model.model.<module>.lora_A.weight / .lora_B.weight")
    patches, problems = [], []
    for module, pair in found.items():
        problem = _pair_problem(module, pair.get("A"), pair.get("B"), stored, modules, [module])
        if problem is None:
            factor, problem = _peft_factor(config, module, pair, stored, PEFT_CONFIG)
        if problem:
            problems.append(problem)
        else:
            patches.append(Patch(module, stored[pair["A"]], stored[pair["B"]], factor))
    _refuse_problems(weights, problems)
    return patches


def _flat_patches(weights: Path, stored: dict[str, Stored], modules, transformer, config: dict | None = None
                  ) -> tuple[str, list[Patch]]:
    """A flat file's updates, in whichever of ComfyUI's PixArt layouts it is written; `config`: the peft config
    diffusers keeps in its header, which scales each pair (None: its `.alpha`, else 1)."""
    pairs: dict[str, dict[str, str]] = {}
    unknown = []
    for key in stored:
        for down, up in PAIRS:
            if key.endswith((down, up)):
                base, end = (key[:-len(down)], "A") if key.endswith(down) else (key[:-len(up)], "B")
                pairs.setdefault(base, {})[end] = key
                break
        else:
            if key.endswith(ALPHA):
                pairs.setdefault(key[:-len(ALPHA)], {})["alpha"] = key
            else:
                unknown.append(key)
    targets_of = _target_names(transformer, modules)
    formats, patches, problems = set(), [], []
    for base, pair in pairs.items():
        found = targets_of(base)
        if found is None:
            unknown += list(pair.values())
            continue
        fmt, targets = found
        formats.add(fmt)
        problem = _pair_problem(base, pair.get("A"), pair.get("B"), stored, modules, targets)
        factor = 1.0
        if problem is None and config is not None:
            if "alpha" in pair:  # diffusers refuses alphas beside its metadata too: which would scale it?
                problem = f"{pair['alpha']}: an alpha beside the {DIFFUSERS_METADATA}, which gives lora_alpha"
            else:
                factor, problem = _peft_factor(config, targets[0], pair, stored, DIFFUSERS_METADATA)
        elif problem is None and "alpha" in pair:
            alpha = stored[pair["alpha"]]
            value = load_tensor(alpha, torch.float64, torch.device("cpu")) if alpha.numel() == 1 else None
            if value is None or not math.isfinite(float(value.reshape(()))):
                problem = f"{pair['alpha']}: an alpha must be one finite number"
            else:
                factor = float(value.reshape(())) / stored[pair["A"]].shape[0]
        if problem:
            problems.append(problem)
            continue
        down, up = stored[pair["A"]], stored[pair["B"]]
        start = 0
        for module in targets:  # a fused projection's B stacks its modules' rows; they share A
            stop = start + modules[module][0]
            patches.append(Patch(module, down, up if len(targets) == 1 else _rows(up, start, stop), factor))
            start = stop
    _refuse_unknown(weights, unknown, "LoRA keys of PixArt's transformer in a layout ComfyUI reads ("
                    "transformer.<diffusers module>.lora_A.weight, lora_unet_blocks_0_attn_qkv.lora_down.weight, "
                    "...)")
    _refuse_problems(weights, problems)
    if len(formats) > 1:
        raise LoraFormatError(f"{weights}: mixes key layouts ({', '.join(sorted(formats))}): not one LoRA file")
    return formats.pop() if config is None else "diffusers", patches


def _rows(up: Stored, start: int, stop: int) -> Stored:
    """Rows start..stop of a stored B (row-major: they lie one after another in the file)."""
    row = up.nbytes // up.shape[0]
    return Stored(up.path, up.start + start * row, (stop - start) * row, up.dtype, (stop - start, *up.shape[1:]))


def _target_names(transformer: dict[str, Stored], modules):
    """A function: a flat file's module name -> (its layout, the diffusers modules whose rows it stacks), or None
    where it names nothing of this transformer."""
    blocks = sorted({int(m[1]) for name in transformer if (m := re.match(r"transformer_blocks\.(\d+)\.", name))})
    original: dict[str, list[str]] = {}
    for i in blocks:
        for ref, parts in _BLOCK.items():
            targets = [f"transformer_blocks.{i}.{p}" for p in parts]
            if all(t in modules for t in targets):
                original[f"blocks.{i}.{ref}"] = targets
    for ref, module in _BASIC.items():
        if module in modules:
            original[ref] = [module]
    underscored_original = {"lora_unet_" + ref.replace(".", "_"): t for ref, t in original.items()}
    onetrainer = {"lora_transformer_" + m.replace(".", "_"): [m] for m in modules}

    def targets_of(base: str):
        for prefix in DIFFUSERS_PREFIXES:
            if base.startswith(prefix) and base[len(prefix):] in modules:
                return "diffusers", [base[len(prefix):]]
        if base.startswith("diffusion_model.") and base[len("diffusion_model."):] in original:
            return "original", original[base[len("diffusion_model."):]]
        if base in underscored_original:
            return "original", underscored_original[base]
        if base in onetrainer:
            return "onetrainer", onetrainer[base]
        return None

    return targets_of


def _pair_problem(name: str, down_key: str | None, up_key: str | None, stored: dict[str, Stored], modules,
                  targets: list[str]) -> str | None:
    """Why A and B of `name` cannot update `targets` (None: they can)."""
    if down_key is None or up_key is None:
        has = "B (up)" if up_key else "A (down)" if down_key else "an alpha"
        return f"{name}: has {has} but no {'A (down)' if down_key is None else 'B (up)'}"
    down, up = stored[down_key], stored[up_key]
    if not (down.dtype.is_floating_point and up.dtype.is_floating_point):
        return f"{name}: stored as {down.dtype} / {up.dtype}, not floating point"
    if len(down.shape) not in (2, 4) or len(up.shape) != len(down.shape):
        return f"{name}: A is {list(down.shape)} and B {list(up.shape)}, not a linear or convolution LoRA pair"
    if down.shape[0] != up.shape[1] or any(d != 1 for d in up.shape[2:]):
        return (f"{name}: rank mismatch: A is {list(down.shape)} (rank {down.shape[0]}), B is {list(up.shape)} "
                f"(rank {up.shape[1]})")
    if down.shape[0] == 0:
        return f"{name}: rank 0"
    if missing := [t for t in targets if t not in modules]:
        return f"{name}: this transformer has no module {missing[0]}: a LoRA for another model?"
    weight = modules[targets[0]]
    rows = sum(modules[t][0] for t in targets)
    if tuple(down.shape[1:]) != tuple(weight[1:]) or up.shape[0] != rows:
        return (f"{name}: its update is {[up.shape[0], *down.shape[1:]]}, this transformer's "
                f"{' + '.join(targets)} weight is {[rows, *weight[1:]]}: a LoRA for another model?")
    return None


def _refuse_unknown(weights: Path, unknown: list[str], expected: str) -> None:
    if not unknown:
        return
    shown = ", ".join(unknown[:_SHOWN]) + (f" (and {len(unknown) - _SHOWN} more)" if len(unknown) > _SHOWN else "")
    what = _what_they_are(unknown)
    raise LoraFormatError(f"{weights}: {len(unknown)} key(s) not understood: {shown}{what}; expected {expected}")


def _what_they_are(keys: list[str]) -> str:
    """A word on keys of a known kind this tool does not merge."""
    text = " ".join(keys)
    if "lora_te" in text or "text_encoder" in text:
        return " (LoRA weights for the text encoder, T5, which this tool does not apply: only the transformer's)"
    if "dora_scale" in text or "lora_magnitude_vector" in text:
        return " (DoRA: its weight-decomposed update is not supported, only plain LoRA)"
    if "hada_" in text or "lokr_" in text:
        return " (a LyCORIS LoHa/LoKr: only plain LoRA is supported)"
    if "lora_mid" in text:
        return " (LoCon's mid weights: only plain LoRA is supported)"
    if any(word in text for word in ("down_blocks", "input_blocks", "mid_block", "double_blocks")):
        return " (a LoRA for another model: Stable Diffusion's UNet or Flux, not PixArt's transformer)"
    return ""


def _refuse_problems(weights: Path, problems: list[str]) -> None:
    if not problems:
        return
    shown = "; ".join(problems[:_SHOWN]) + (f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else "")
    raise LoraFormatError(f"{weights}: {len(problems)} update(s) do not fit this transformer: {shown}")
