"""Random-weight PixArt models, written in the diffusers folder layout of the real checkpoints (PixArt-α, PixArt-Σ,
PixArt-LCM, PixArt-α DMD) and loaded through the same `from_pretrained` code path as they are.

`tiny` presets build on a CPU in about a second (tests, the offline demo); `xl` ones have exactly the real shapes
(GPU benchmarks). All share one build path: each model is constructed on the meta device, its parameters are
created on the target device and filled from a generator seeded by (seed, component, parameter name), and the
libraries' own `save_pretrained` writes it as safetensors. The weights are noise at scales that keep every
activation O(1), so outputs are finite in float32 and float16; the images are coloured noise.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .errors import ModelError, UsageError
from .files import is_temporary, write_atomic
from .models import COMPONENTS, read_json
from .presets import PRESET_HELP, PRESETS  # noqa: F401  (in a module without torch: the CLI lists them)
from .resolve import resolve_device

MARKER = "pixart_lowvram_random.json"  # written last: its presence means the folder is complete
_FORMAT = 2  # bump when the weights or layout a preset produces change
_TAG = "_pixart_lowvram_random"  # in model_index.json (written first): the folder is ours even if half-written

Progress = Callable[[int, int, str], None]

# --- tokenizer --------------------------------------------------------------------------------------------------
# No sentencepiece file can be downloaded, so the tokenizer is a small Unigram vocabulary in T5's layout:
# <pad>=0, </s>=1, <unk>=2, word pieces, then <extra_id_99> ... <extra_id_0> last. Whole words are preferred;
# anything else falls back to single characters, so English prompts never become all-unk.
_WORDS = """
a an the of in on at to by for from with without and or but not no is are was be as it its this that these those
there here into onto over under above below behind beside between near far through across around inside outside
up down out off very more most some many few all each one two three four five six seven eight nine ten
red orange yellow green blue purple violet pink brown black white gray grey gold golden silver dark light bright
pale deep vivid colorful colourful neon pastel warm cold hot soft hard big small large tiny huge giant little
long short tall old young new ancient modern futuristic beautiful cute happy sad angry calm wild quiet
man woman men women boy girl child children baby person people face eyes eye hair hand hands portrait smile
cat cats dog dogs horse bird birds fish dragon lion tiger bear wolf fox owl rabbit monkey elephant whale
astronaut robot knight king queen princess wizard warrior pirate pirates samurai soldier chef artist
ship boat sea ocean wave waves water river lake beach island sand desert mountain mountains hill forest tree
trees flower flowers garden grass leaf leaves field sky cloud clouds sun sunset sunrise moon star stars
space planet galaxy nebula cosmic universe night day morning evening rain snow storm fog winter summer
autumn spring fire smoke ice light shadow city street road bridge house castle tower building village
room window door table chair car cars train plane bicycle book cup coffee tea food cake apple fruit
painting photo photograph picture drawing sketch illustration render art artwork style oil watercolor
digital concept anime cartoon realistic photorealistic cinematic detailed highly intricate sharp focus
lighting dramatic epic fantasy science fiction sci fi steampunk cyberpunk surreal abstract minimalist
vintage retro 4k 8k hd hdr octane unreal engine trending artstation studio background foreground closeup
close view wide angle lens camera shot high quality masterpiece best resolution blurry low ugly
sitting standing walking running flying riding holding wearing looking playing dancing swimming
floating glowing burning shining trapped lost made covered full filled
""".split()
_SUFFIXES = ("s", "es", "ed", "ing", "er", "est", "ly", "y", "tion", "ness", "ful")
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()[]/&%+*=#@_~"
EXTRA_IDS = 100
MAX_TOKENS = 512  # T5's model_max_length; the pipeline itself pads and truncates to 120


def _tokenizer_vocab(pieces: int = 0) -> list[tuple[str, float]]:
    """The pieces, with `pieces` in all where more are asked for than the words give: the rest are placeholder
    pieces that no prompt contains (`<unused_N>`), as a full-size T5's 32,100 pieces fill its 32,128 rows."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -12.0)]
    seen = {piece for piece, _ in vocab}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))

    for word in _WORDS:
        add("▁" + word, -8.0)
    for word in _WORDS:
        add("▁" + word.capitalize(), -8.5)
    for suffix in _SUFFIXES:
        add(suffix, -9.0)
    for char in _CHARS:
        add("▁" + char, -10.0)
    for char in _CHARS:
        add(char, -11.0)
    for i in range(max(0, pieces - EXTRA_IDS - len(vocab))):
        add(f"<unused_{i}>", -20.0)
    for i in reversed(range(EXTRA_IDS)):
        add(f"<extra_id_{i}>", 0.0)
    return vocab


T5_PIECES_SHORT_OF_ROWS = 28  # T5 v1.1: 32,100 pieces in a 32,128-row embedding table


def build_tokenizer(vocab_size: int | None = None):
    """The project's T5 tokenizer: a few hundred English pieces plus single characters and T5's 100 extra ids;
    for a text encoder of `vocab_size` rows far more than those, filled up to that size as T5's own is (the
    tokenizer check refuses a tokenizer much smaller than its text encoder: it would not be this model's)."""
    from transformers import T5Tokenizer  # noqa: PLC0415 - heavy import, only when building

    pieces = 0
    if vocab_size is not None and vocab_size - len(_tokenizer_vocab()) >= 128:
        pieces = vocab_size - T5_PIECES_SHORT_OF_ROWS
    return T5Tokenizer(vocab=_tokenizer_vocab(pieces), extra_ids=EXTRA_IDS, model_max_length=MAX_TOKENS)


def _tiny_vocab_size() -> int:
    size = len(_tokenizer_vocab())
    return -(-size // 128) * 128  # rounded up, as T5's 32100 pieces sit in a 32128-row embedding


# --- presets ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """Everything a preset decides: the three model configs, the on-disk dtype and shard size."""

    name: str
    text_encoder: dict  # T5Config keyword arguments
    transformer: dict  # PixArtTransformer2DModel config
    vae: dict  # AutoencoderKL config
    dtype: torch.dtype
    max_shard_size: str  # text encoder shards, like the real checkpoint's
    default_device: str | None  # None: cuda when there is one
    pipeline: str = "PixArtAlphaPipeline"
    scheduler: str = "DPMSolverMultistepScheduler"
    scheduler_config: dict = field(default_factory=lambda: scheduler_config())


# T5-v1.1-XXL, as the real text_encoder/config.json (transformers 5 reads tie_word_embeddings=False as "do not
# rescale the decoder output"; the input embeddings `shared` and `encoder.embed_tokens` stay one tensor).
_T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_decoder_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.1,
    layer_norm_epsilon=1e-6, initializer_factor=1.0, feed_forward_proj="gated-gelu", is_encoder_decoder=True,
    use_cache=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False,
    architectures=["T5EncoderModel"],
)
# diffusers' PixArtTransformer2DModel() defaults, which are the real transformer/config.json.
_DIT_XL = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, dropout=0.0,
    norm_num_groups=32, cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, upcast_attention=False,
    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=None,
    use_additional_conditions=True, caption_channels=4096, attention_type="default",
)
_VAE_BLOCKS = dict(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
# The SD VAE (stabilityai/sd-vae-ft-ema) as shipped with PixArt-XL-2-1024-MS.
_VAE_SD = dict(
    in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu",
    latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215, **_VAE_BLOCKS,
)


def preset_config(name: str) -> Preset:
    """The configuration of a preset: a base size (tiny or xl) and a kind (see PRESET_HELP)."""
    if name not in PRESET_HELP:
        raise UsageError(f"unknown random-model preset {name!r} (choose from: {', '.join(PRESETS)})")
    base, _, kind = name.partition("-")
    spec = _base_preset(base)
    return spec if not kind else _kind_variant(spec, name, kind)


# PixArt-Σ ships the SDXL VAE: the SD VAE's shapes with another latent scale, and flagged as overflowing float16.
_SDXL_VAE = dict(scaling_factor=0.13025, force_upcast=True)


def _kind_variant(spec: Preset, name: str, kind: str) -> Preset:
    """A base preset turned into another kind, as the real checkpoints' configs differ from PixArt-XL-2-1024-MS."""
    tiny = spec.name == "tiny"
    dit, vae = dict(spec.transformer), dict(spec.vae)
    changes: dict = {}
    if kind == "512":  # PixArt-XL-2-512x512: sample size 64; micro-conditions only exist at 128
        dit.update(sample_size=64, use_additional_conditions=False)
    elif kind in ("sigma", "sigma-2k"):
        # PixArt-Sigma-XL-2-1024-MS: no micro-conditions, interpolation_scale 2; the 2K one: sample size 256,
        # scale 4. Tiny Σ keeps 256 px images with the 0.5 of PixArt-Sigma-XL-2-256x256.
        size, scale = (256, 4) if kind == "sigma-2k" else ((32, 0.5) if tiny else (128, 2))
        dit.update(sample_size=size, interpolation_scale=scale, use_additional_conditions=False)
        vae.update(_SDXL_VAE, sample_size=vae["sample_size"] if tiny else 1024)
        changes["pipeline"] = "PixArtSigmaPipeline"
    elif kind == "lcm":  # PixArt-LCM-XL-2-1024-MS: the 1024 model's shapes, an LCM scheduler on PixArt's betas
        changes.update(scheduler="LCMScheduler", scheduler_config=dict(
            num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"))
    elif kind == "dmd":
        # PixArt-Alpha-DMD-XL-2-512x512: the 512 model's shapes and a DDPM scheduler on PixArt's betas, which is
        # how models.detect_kind knows it. Tiny DMD keeps 256 px images.
        if not tiny:
            dit.update(sample_size=64, use_additional_conditions=False)
        changes.update(scheduler="DDPMScheduler", scheduler_config=dict(
            num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False))
    return replace(spec, name=name, transformer=dit, vae=vae, **changes)


def _base_preset(name: str) -> Preset:
    if name == "xl":
        return Preset("xl", dict(_T5_XXL), dict(_DIT_XL), dict(_VAE_SD), torch.float16, "5GB", None)
    if name == "tiny":
        return Preset(
            "tiny",
            text_encoder={**_T5_XXL, "vocab_size": _tiny_vocab_size(), "d_model": 32, "d_kv": 8, "d_ff": 64,
                          "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4},
            # sample_size 32: the pipeline's resolution binning knows 32/64/128, and 32 x 8 = 256 px images.
            # Micro-conditions (resolution, aspect ratio) are only used at sample_size 128, as in diffusers.
            transformer={**_DIT_XL, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2,
                         "cross_attention_dim": 32, "sample_size": 32, "caption_channels": 32,
                         "use_additional_conditions": False},
            # Four blocks, so the pipeline's vae_scale_factor is 8 as with the SD VAE.
            vae={**_VAE_SD, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4,
                 "sample_size": 256},
            dtype=torch.float32, max_shard_size="5GB",
            default_device="cpu",  # same weights on every machine; a GPU would not make it faster
        )
    raise AssertionError(name)


def scheduler_config() -> dict:
    """The real checkpoint's scheduler: diffusers' DPMSolverMultistepScheduler defaults (DPM++ 2M)."""
    return dict(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
        solver_order=2, prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
        sample_max_value=1.0, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        euler_at_final=False, use_karras_sigmas=False, lambda_min_clipped=-float("inf"), variance_type=None,
        timestep_spacing="linspace", steps_offset=0,
    )


# --- models on the meta device ----------------------------------------------------------------------------------
def empty_models(spec: Preset) -> dict[str, nn.Module]:
    """The three networks of a preset on the meta device: shapes and configs, no memory.

    `torch.device("meta")` rather than accelerate's `init_empty_weights`: the latter re-registers parameters and
    so unties T5's `shared` / `encoder.embed_tokens`."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel  # noqa: PLC0415
    from transformers import T5Config, T5EncoderModel  # noqa: PLC0415

    with torch.device("meta"):
        return {
            "text_encoder": T5EncoderModel(T5Config(**spec.text_encoder)),
            "transformer": PixArtTransformer2DModel.from_config(spec.transformer),
            "vae": AutoencoderKL.from_config(spec.vae),
        }


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied tensor counts once)."""
    return sum(p.numel() for p in model.parameters())


def _tensor_seed(seed: int, component: str, name: str) -> int:
    # well mixed in its low 32 bits too: the CPU generator (mt19937) only uses those
    digest = hashlib.blake2b(f"{seed}/{component}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# A random denoiser's eps is uncorrelated with the noise, so its latents come out ~1/alpha_T (~160) times larger
# than a trained one's; damping the VAE decoder's first conv keeps its float16 activations far from overflow.
_DAMPING = {("vae", "decoder.conv_in.weight"): 1 / 64}


def _std(component: str, module: nn.Module, full_name: str, param: torch.Tensor) -> float:
    """Noise scale per parameter: fan-in scaled for linears and convs (activations stay O(1)); 1 for token
    embeddings (each layer normalises its input); 0.02 for T5's relative-position biases (added to attention
    logits); 1/sqrt(width) for the rest (e.g. PixArt's scale_shift_table)."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return param[0].numel() ** -0.5 * _DAMPING.get((component, full_name), 1.0)
    if isinstance(module, nn.Embedding):
        return 0.02 if "relative_attention_bias" in full_name else 1.0
    return param.shape[-1] ** -0.5


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


@torch.no_grad()
def materialize(model: nn.Module, component: str, *, seed: int, device: torch.device, dtype: torch.dtype) -> None:
    """Replace every meta parameter by a seeded random one on `device` in `dtype`, in place.

    Each tensor has its own generator seeded by (seed, component, name), so the weights do not depend on the
    order of construction. Tied parameters stay one tensor. Buffers that a checkpoint holds cannot be made up,
    so they are refused; non-persistent ones (e.g. the sin-cos position table) are recomputed when loading."""
    persistent = set(model.state_dict(keep_vars=True)) - {n for n, _ in model.named_parameters(remove_duplicate=False)}
    if persistent:
        raise RuntimeError(f"{component}: persistent buffers cannot be made at random: {sorted(persistent)}")
    made: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                full_name = f"{module_name}.{name}" if module_name else name
                value = torch.empty(param.shape, dtype=dtype, device=device)
                if name == "bias":
                    value.zero_()
                elif _is_norm(module):
                    value.fill_(1.0)
                else:
                    generator = torch.Generator(device=device).manual_seed(_tensor_seed(seed, component, full_name))
                    # drawn in float32 so a preset's weights are the same numbers whatever dtype stores them
                    noise = torch.randn(param.shape, generator=generator, device=device, dtype=torch.float32)
                    value.copy_(noise.mul_(_std(component, module, full_name, param)))
                    del noise
                made[id(param)] = nn.Parameter(value, requires_grad=False)
            module._parameters[name] = made[id(param)]


# --- the folder -------------------------------------------------------------------------------------------------
def _write_json_atomic(path: pathlib.Path, data: dict) -> None:
    write_atomic(path, lambda f: f.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")))


def _json_or_none(path: pathlib.Path) -> dict | None:
    """A JSON object, or None where the file is missing or is not one (a half-written folder)."""
    try:
        return read_json(path)
    except ModelError:
        return None


def _files_present(root: pathlib.Path) -> bool:
    needed = [root / "model_index.json", root / "tokenizer" / "tokenizer_config.json",
              root / "scheduler" / "scheduler_config.json"]
    needed += [root / c / "config.json" for c in ("text_encoder", "transformer", "vae")]
    return all(p.is_file() for p in needed) and all(
        any((root / c).glob("*.safetensors")) for c in ("text_encoder", "transformer", "vae"))


def _is_ours(root: pathlib.Path) -> bool:
    """A folder this module wrote, complete or not: our marker or tag, or nothing but our temporary files."""
    if (root / MARKER).exists() or _TAG in (_json_or_none(root / "model_index.json") or {}):
        return True
    return all(is_temporary(p.name) for p in root.iterdir())


def _existing(root: pathlib.Path, spec: Preset, seed: int) -> bool:
    """True when `root` already holds this very model; False when it is free to (re)build; raises otherwise."""
    if not root.exists():
        return False
    if not root.is_dir():
        raise UsageError(f"{root}: exists and is not a folder")
    if not any(root.iterdir()):
        return False
    if not _is_ours(root):
        raise UsageError(f"{root}: folder is not empty and is not a random model written by pixart-lowvram; "
                         "choose a new or empty folder")
    marker = _json_or_none(root / MARKER)
    if marker is None or marker.get("format") != _FORMAT or not _files_present(root):
        return False  # half-written, or from an older version: rebuild
    if (marker.get("preset"), marker.get("seed")) != (spec.name, seed):
        raise UsageError(f"{root}: already holds a random {marker.get('preset')!r} model with seed "
                         f"{marker.get('seed')}; delete it or choose another folder for {spec.name!r} seed {seed}")
    return True


def _clear(root: pathlib.Path) -> None:
    """Remove what an earlier, unfinished build of ours left (stale shards must not survive a rebuild)."""
    for name in (MARKER, "model_index.json"):
        (root / name).unlink(missing_ok=True)
    for component in COMPONENTS:
        if (root / component).is_dir():
            shutil.rmtree(root / component)
    for leftover in root.iterdir():
        if is_temporary(leftover.name):
            leftover.unlink(missing_ok=True)


def _model_index(spec: Preset, seed: int) -> dict:
    import diffusers  # noqa: PLC0415

    return {
        "_class_name": spec.pipeline,
        "_diffusers_version": diffusers.__version__,
        _TAG: {"preset": spec.name, "seed": seed},  # diffusers ignores keys starting with "_"
        "tokenizer": ["transformers", "T5Tokenizer"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", spec.scheduler],
    }


def _write_network(folder: pathlib.Path, model: nn.Module, component: str, spec: Preset, *, seed: int,
                   device: torch.device) -> None:
    materialize(model, component, seed=seed, device=device, dtype=spec.dtype)
    if component != "text_encoder":
        model.save_pretrained(folder, safe_serialization=True)
        return
    from transformers.utils import logging as transformers_logging  # noqa: PLC0415

    bar_was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # its "Writing model shards" bar: the library never prints
    try:
        model.save_pretrained(folder, safe_serialization=True, max_shard_size=spec.max_shard_size)
    finally:
        if bar_was_on:
            transformers_logging.enable_progress_bar()


def make_random_model(path: str | os.PathLike, preset: str = "tiny", *, seed: int = 0, device: str | None = None,
                      progress: Progress | None = None) -> pathlib.Path:
    """Write a random-weight PixArt model folder of `preset` (see PRESET_HELP) at `path` and return it.

    A folder that already holds this preset and seed is returned as it is. A half-written one of ours is
    rebuilt; any other non-empty folder is refused (UsageError). `device=None` builds tiny presets on the CPU (so
    their weights are the same everywhere) and xl ones on the GPU when there is one. `progress(done, total, component)`
    is called as each component is written."""
    spec = preset_config(preset)
    root = pathlib.Path(path).expanduser()
    if _existing(root, spec, seed):
        return root
    target = resolve_device(device or spec.default_device or "auto")

    root.mkdir(parents=True, exist_ok=True)
    _clear(root)
    _write_json_atomic(root / "model_index.json", _model_index(spec, seed))  # first: marks the folder as ours

    models = empty_models(spec)
    for done, component in enumerate(COMPONENTS, start=1):
        folder = root / component
        if component == "tokenizer":
            build_tokenizer(spec.text_encoder["vocab_size"]).save_pretrained(folder)
        elif component == "scheduler":
            import diffusers  # noqa: PLC0415

            getattr(diffusers, spec.scheduler)(**spec.scheduler_config).save_pretrained(folder)
        else:
            _write_network(folder, models.pop(component), component, spec, seed=seed, device=target)
            if target.type == "cuda":
                torch.cuda.empty_cache()
        if progress is not None:
            progress(done, len(COMPONENTS), component)

    _write_json_atomic(root / MARKER, {"format": _FORMAT, "preset": spec.name, "seed": seed,
                                       "dtype": str(spec.dtype).removeprefix("torch.")})
    return root
