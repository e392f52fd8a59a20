"""Every number the reference pipeline derives from a component's config, in one place.

diffusers' PixArt pipelines read these from the components they hold (`vae.config.block_out_channels`,
`transformer.config.sample_size`, ...). Our stages hold one component at a time, so they read them here, from the
configs alone, and any folder that diffusers itself can run gives the same numbers in every stage: the denoise
stage's pipeline (built without a VAE, where diffusers would assume a scale factor of 8), the decode stage, the
latent shapes of finished artifacts, the planner's sizes and the jobs' checks.

What the reference itself cannot run (micro-conditions the pipeline never passes, a VAE whose latents are not the
transformer's) is refused here, before any weights load, with the file to look at.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ModelError

# The reference pipelines' max_sequence_length: a default of their __call__, not of any config.
MAX_TOKENS = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}
CONFIG_FILES = {"text_encoder": "text_encoder/config.json", "transformer": "transformer/config.json",
                "vae": "vae/config.json"}


def _where(folder: Path | None, component: str) -> str:
    name = CONFIG_FILES[component]
    return str(folder / name) if folder is not None else name


def _class_default(component: str, key: str):
    """What the component's class uses for a key its config leaves out, as `from_pretrained` would."""
    import inspect  # noqa: PLC0415

    if component == "text_encoder":
        from transformers import T5Config  # noqa: PLC0415

        return getattr(T5Config(), key, None)
    from diffusers import AutoencoderKL, PixArtTransformer2DModel  # noqa: PLC0415

    cls = PixArtTransformer2DModel if component == "transformer" else AutoencoderKL
    parameter = inspect.signature(cls.__init__).parameters.get(key)
    return None if parameter is None else parameter.default


def with_defaults(component: str, config: dict, keys: tuple[str, ...]) -> dict:
    """`config` with the class's default for each of `keys` it leaves out, as `from_pretrained` builds it."""
    missing = {key: _class_default(component, key) for key in keys if key not in config}
    return {**config, **{k: list(v) if isinstance(v, tuple) else v for k, v in missing.items() if v is not None}}


def _value(configs: dict[str, dict], component: str, key: str):
    config = configs[component]
    return config[key] if key in config else _class_default(component, key)


def _positive_int(configs: dict[str, dict], component: str, key: str, folder: Path | None) -> int:
    value = _value(configs, component, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{_where(folder, component)}: {key} must be a positive whole number, not {value!r}")
    return value


def vae_scale_factor(configs: dict[str, dict], folder: Path | None = None) -> int:
    """Image pixels per latent pixel: the VAE halves the size in every block but the last, as diffusers computes
    it (`2 ** (len(vae.config.block_out_channels) - 1)`)."""
    blocks = _value(configs, "vae", "block_out_channels")
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise ModelError(f"{_where(folder, 'vae')}: block_out_channels must be a non-empty list, not {blocks!r}")
    return 2 ** (len(blocks) - 1)


def patch_size(configs: dict[str, dict], folder: Path | None = None) -> int:
    """Latent pixels per transformer token side."""
    return _positive_int(configs, "transformer", "patch_size", folder)


def resolution_bins(pipeline_class: str, sample_size: int) -> dict[str, list[float]] | None:
    """The aspect-ratio bins the reference pipeline snaps sizes to, by transformer sample size; None where it
    knows none (it raises "Invalid sample size" there unless called with `use_resolution_binning=False`).
    diffusers' own tables: Σ adds 2048 px to α's 256, 512 and 1024."""
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha  # noqa: PLC0415
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma  # noqa: PLC0415

    tables = {128: alpha.ASPECT_RATIO_1024_BIN, 64: alpha.ASPECT_RATIO_512_BIN, 32: alpha.ASPECT_RATIO_256_BIN}
    if pipeline_class == "PixArtSigmaPipeline":
        tables[256] = sigma.ASPECT_RATIO_2048_BIN
    return tables.get(sample_size)


@dataclass(frozen=True)
class Geometry:
    """The numbers of one model folder that decide shapes and sizes, as its reference pipeline derives them."""

    pipeline_class: str
    vae_scale_factor: int  # image pixels per latent pixel
    latent_channels: int  # the transformer's in_channels: the pipeline's latents have these
    sample_size: int  # the transformer's, in latent pixels
    patch_size: int  # latent pixels per token side
    max_sequence_length: int  # tokens per prompt (α 120, Σ 300)
    text_dim: int  # T5's d_model: the width of an embedding
    bins: dict[str, list[float]] | None  # aspect-ratio bins; None: sizes are used as asked
    scaling_factor: float = 0.18215  # the VAE's latents over its encoder's (image-to-image scales by it)

    @property
    def default_size(self) -> int:
        """The reference pipeline's default width and height: sample size times VAE scale factor."""
        return self.sample_size * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides the transformer can cut into whole tokens are multiples of this."""
        return self.vae_scale_factor * self.patch_size

    def denoise_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) the reference denoises at: the nearest size of its bins (it resizes the image
        back after decoding), or the size asked where the model has no bins."""
        if self.bins is None:
            return width, height
        from diffusers.image_processor import PixArtImageProcessor  # noqa: PLC0415

        h, w = PixArtImageProcessor.classify_height_width_bin(height, width, ratios=self.bins)
        return w, h

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """(channels, height, width) of one image's latents, as the pipeline's prepare_latents makes them."""
        w, h = self.denoise_size(width, height)
        return self.latent_channels, h // self.vae_scale_factor, w // self.vae_scale_factor

    def side_problem(self, side: int) -> tuple[str, str] | None:
        """Why the reference cannot make an image side of `side` pixels, and the nearest sides it can; None if
        it can. Only where there are no bins: binned sizes are the reference's own."""
        step = self.size_multiple
        if self.bins is not None or side % step == 0:
            return None
        lower = side // step * step
        nearest = f"multiples of {step} are {lower} and {lower + step}" if lower else f"multiple of {step} is {step}"
        return (f"must be a multiple of {step} for this model, not {side}: without resolution bins (transformer "
                f"sample_size {self.sample_size}) a size is used as asked, and {step} = VAE scale factor "
                f"{self.vae_scale_factor} x patch size {self.patch_size}", f"the nearest {nearest}")

    def configure(self, pipe) -> None:
        """Give a reference pipeline built without its VAE the VAE's scale factor (diffusers assumes 8 then)."""
        from diffusers.image_processor import PixArtImageProcessor  # noqa: PLC0415

        pipe.vae_scale_factor = self.vae_scale_factor
        pipe.image_processor = PixArtImageProcessor(vae_scale_factor=self.vae_scale_factor)


def read_geometry(pipeline_class: str, configs: dict[str, dict], folder: Path | None = None) -> Geometry:
    """A model's geometry from its component configs (`folder` names the files in errors). Raises ModelError
    for a folder the reference pipeline cannot run, before anything loads."""
    transformer = configs["transformer"]
    scale = vae_scale_factor(configs, folder)
    sample_size = _positive_int(configs, "transformer", "sample_size", folder)
    in_channels = _positive_int(configs, "transformer", "in_channels", folder)
    out_channels = _value(configs, "transformer", "out_channels") or in_channels
    vae_latents = _positive_int(configs, "vae", "latent_channels", folder)
    text_dim = _positive_int(configs, "text_encoder", "d_model", folder)
    caption = transformer.get("caption_channels")
    if vae_latents != in_channels:
        raise ModelError(f"{_where(folder, 'vae')}: latent_channels {vae_latents} does not match the "
                         f"transformer's in_channels {in_channels} ({_where(folder, 'transformer')}): the VAE "
                         "cannot decode this transformer's latents")
    if out_channels not in (in_channels, 2 * in_channels):
        raise ModelError(f"{_where(folder, 'transformer')}: out_channels {out_channels!r} must be in_channels "
                         f"({in_channels}) or twice it (a learned variance), as the reference pipeline reads it")
    if caption is not None and caption != text_dim:
        raise ModelError(f"{_where(folder, 'transformer')}: caption_channels {caption!r} does not match the text "
                         f"encoder's d_model {text_dim} ({_where(folder, 'text_encoder')})")
    # The blocks' cross-attention reads the caption projection's output, heads x head size wide (models.py
    # requires caption_channels); built for another width, the reference fails in its first step.
    cross = transformer.get("cross_attention_dim")
    heads, head_dim = transformer.get("num_attention_heads"), transformer.get("attention_head_dim")
    if cross is not None and cross != heads * head_dim:
        raise ModelError(f"{_where(folder, 'transformer')}: cross_attention_dim {cross!r} does not match the "
                         f"width of the caption projection it reads, num_attention_heads x attention_head_dim = "
                         f"{heads} x {head_dim} = {heads * head_dim} (diffusers' own pipeline fails on this folder "
                         "too)")
    # The pipeline passes resolution and aspect ratio only where PixArt-α's sample size is 128 (Σ never does);
    # the transformer wants them where its config says so (null: at sample size 128). Where it wants them and
    # gets none, the reference itself fails inside the transformer's first step.
    wanted = transformer.get("use_additional_conditions")
    if wanted is None:
        wanted = sample_size == 128
    passed = pipeline_class == "PixArtAlphaPipeline" and sample_size == 128
    if wanted and not passed:
        setting = ("true" if transformer.get("use_additional_conditions") is not None
                   else f"null, which means true at sample_size {sample_size}")
        raise ModelError(
            f"{_where(folder, 'transformer')}: use_additional_conditions is {setting}, but {pipeline_class} "
            f"passes no resolution or aspect-ratio conditions to a transformer of sample_size {sample_size} "
            f"(diffusers' own pipeline fails on this folder too); set use_additional_conditions to false if the "
            f"weights were trained without them")
    return Geometry(pipeline_class=pipeline_class, vae_scale_factor=scale, latent_channels=in_channels,
                    sample_size=sample_size, patch_size=patch_size(configs, folder),
                    max_sequence_length=MAX_TOKENS[pipeline_class], text_dim=text_dim,
                    bins=resolution_bins(pipeline_class, sample_size),
                    scaling_factor=_scaling_factor(configs, folder))


def _scaling_factor(configs: dict[str, dict], folder: Path | None) -> float:
    value = _value(configs, "vae", "scaling_factor")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise ModelError(f"{_where(folder, 'vae')}: scaling_factor must be a positive number, not {value!r}")
    return float(value)
