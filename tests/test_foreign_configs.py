"""Model folders this project did not design, each written by diffusers' and transformers' own `save_pretrained`
from configs other than our presets', make the images their reference pipeline makes (within 1/255, on the CPU
in float32): VAEs of 1 to 5 blocks (scale factors 1 to 16), transformer sample sizes with and without the
reference's resolution bins, the component configs of diffusers' own PixArt pipeline tests, a transformer config
that leaves `use_additional_conditions` null, and PixArt-Σ (300 tokens). What the reference itself cannot run is
refused before any weights load, and the test shows that the reference fails there too. The strip decoder walks
VAEs of any number of blocks."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, PixArtTransformer2DModel
from transformers import T5Config, T5EncoderModel

from conftest import max_diff, pixels, reference_image
from test_streaming import override_plan
from pixart_lowvram import generate
from pixart_lowvram.errors import ModelError, QueueError
from pixart_lowvram.generate import Settings, plan_queue, run_queue
from pixart_lowvram.jobs import Job
from pixart_lowvram.models import resolve_model
from pixart_lowvram.placement import StagePlan
from pixart_lowvram.random_model import _tiny_vocab_size, build_tokenizer, scheduler_config
from pixart_lowvram.vae_strips import StripDecoder, supports

CPU32 = dict(device="cpu", dtype="float32", embed_cache=None)
ALPHA, SIGMA = "PixArtAlphaPipeline", "PixArtSigmaPipeline"

# The transformer of diffusers' PixArt-α and PixArt-Σ fast tests (tests/pipelines/pixart_*/test_pixart.py,
# get_dummy_components), given as a config; the matrix below changes one or two values of it.
DIFFUSERS_TEST_TRANSFORMER = dict(
    sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
    in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
# Their VAE is `AutoencoderKL()`: diffusers' defaults, one block of 64 channels (scale factor 1).
DIFFUSERS_TEST_VAE: dict = {}
# Their text encoder is hf-internal-testing/tiny-random-t5, which cannot be downloaded here: a T5 of its size
# (d_model 32, as the transformer's caption_channels require; transformers' T5 test dimensions otherwise), with a
# vocabulary that covers our small tokenizer's pieces.
TINY_RANDOM_T5 = dict(d_model=32, d_kv=8, d_ff=37, num_layers=5, num_heads=4, relative_attention_num_buckets=8)


def small_vae(blocks: int, widths: tuple[int, ...] = (4, 4, 8, 8, 8)) -> dict:
    """An AutoencoderKL config of `blocks` blocks (scale factor 2 ** (blocks - 1)), a few channels wide."""
    return dict(block_out_channels=list(widths[:blocks]), layers_per_block=1, norm_num_groups=4,
                latent_channels=4, down_block_types=["DownEncoderBlock2D"] * blocks,
                up_block_types=["UpDecoderBlock2D"] * blocks)


def save_folder(path: Path, *, pipeline: str = ALPHA, transformer: dict | None = None, vae: dict | None = None,
                text_encoder: dict | None = None, scheduler=None) -> str:
    """A model folder as diffusers writes it: components built from configs with their own classes (random
    weights, torch seed 0 before each, as diffusers' tests do), saved by the pipeline's `save_pretrained`."""
    torch.manual_seed(0)
    dit = PixArtTransformer2DModel.from_config({**DIFFUSERS_TEST_TRANSFORMER, **(transformer or {})})
    torch.manual_seed(0)
    autoencoder = AutoencoderKL.from_config(DIFFUSERS_TEST_VAE if vae is None else vae)
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=_tiny_vocab_size(), **(text_encoder or TINY_RANDOM_T5)))
    pipe = getattr(diffusers, pipeline)(tokenizer=build_tokenizer(), text_encoder=t5.eval(),
                                        transformer=dit.eval(), vae=autoencoder.eval(),
                                        scheduler=scheduler or DDIMScheduler())
    pipe.save_pretrained(path)
    return str(path)


def reference(folder: str, pipeline: str):
    pipe = getattr(diffusers, pipeline).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# case: pipeline, transformer changes, VAE config, the job's size (None: the model's default), whether the
# reference has resolution bins for this sample size, and the image size that comes out.
CASES = {
    # VAEs of 1 to 5 blocks, at a sample size without bins, so the size asked is the size denoised
    "vae-1-block": (ALPHA, {}, small_vae(1), (48, 32), False, (48, 32)),
    "vae-2-blocks": (ALPHA, {}, small_vae(2), (64, 64), False, (64, 64)),
    "vae-3-blocks": (ALPHA, {}, small_vae(3), (64, 48), False, (64, 48)),
    "vae-4-blocks": (ALPHA, {}, small_vae(4), (64, 64), False, (64, 64)),
    "vae-5-blocks": (ALPHA, {}, small_vae(5), (64, 96), False, (64, 96)),
    # sample sizes the reference has no bins for; 8 and 48 at their default size (8 x 8, 48 x 1)
    "sample-8": (ALPHA, {"sample_size": 8}, small_vae(4), None, False, (64, 64)),
    "sample-16": (ALPHA, {"sample_size": 16}, small_vae(4), (96, 64), False, (96, 64)),
    "sample-48": (ALPHA, {"sample_size": 48}, small_vae(1), None, False, (48, 48)),
    # sample sizes with bins: 64 x 48 asked is denoised at the nearest bin (256 px, 512 px) and resized back
    "sample-32-bins": (ALPHA, {"sample_size": 32}, small_vae(4), (64, 48), True, (64, 48)),
    "sample-64-bins": (ALPHA, {"sample_size": 64}, small_vae(4), (48, 64), True, (48, 64)),
    # bins with a VAE whose scale factor is not 8 (16: 16 x 16 latents for the 256 px bin)
    "sample-32-bins-vae-5-blocks": (ALPHA, {"sample_size": 32}, small_vae(5), (64, 64), True, (64, 64)),
    # diffusers' own test components, at their default size (8 x 8) and at their non-square one
    "diffusers-alpha-test": (ALPHA, {}, DIFFUSERS_TEST_VAE, None, False, (8, 8)),
    "diffusers-sigma-test": (SIGMA, {}, DIFFUSERS_TEST_VAE, (48, 32), False, (48, 32)),
    # null means "at sample size 128": micro-conditions on, and PixArt-α passes them there. 1024 px bins, kept
    # cheap by a narrow VAE of 5 blocks and patches of 4 (64 x 64 latents, 256 tokens).
    "micro-conditions-null": (ALPHA, {"sample_size": 128, "use_additional_conditions": None, "patch_size": 4},
                              small_vae(5, widths=(4,) * 5), (64, 64), True, (64, 64)),
    # PixArt-Σ with bins (300 tokens), its DPM-Solver scheduler as shipped
    "sigma-32-bins": (SIGMA, {"sample_size": 32}, small_vae(4), (48, 64), True, (48, 64)),
}


@pytest.mark.parametrize("case", CASES)
def test_a_folder_diffusers_wrote_makes_the_reference_pipelines_image(case, tmp_path):
    pipeline, transformer, vae, size, binned, out_size = CASES[case]
    scheduler = diffusers.DPMSolverMultistepScheduler(**scheduler_config()) if pipeline == SIGMA else None
    folder = save_folder(tmp_path / "model", pipeline=pipeline, transformer=transformer, vae=vae,
                         scheduler=scheduler)
    info = resolve_model(folder)
    assert (info.geometry.bins is not None) == binned
    asked = dict(width=size[0], height=size[1]) if size else {}
    prompt = dict(prompt="a lighthouse at dusk, oil painting", negative_prompt="blurry", seed=1152753)

    result = run_queue([Job(index=1, steps=2, **asked, **prompt)], tmp_path / "run", Settings(model=folder, **CPU32))
    ours = pixels(result.images[result.items[0].id])

    expected = reference_image(reference(folder, pipeline), **prompt, **asked, steps=2,
                               use_resolution_binning=binned)
    assert ours.shape == expected.shape == (out_size[1], out_size[0], 3)
    assert expected.std() > 2  # an image, not a flat colour: the comparison means something
    assert max_diff(ours, expected) <= 1


@pytest.mark.parametrize("case", ["diffusers-sigma-test", "vae-3-blocks"])
def test_streamed_and_in_strips_too(case, tmp_path, monkeypatch):
    """The placements of a small --vram-budget (T5 and the DiT streamed block by block, the VAE decoding in
    strips) make the same images from these folders."""
    pipeline, transformer, vae, size, binned, out_size = CASES[case]
    folder = save_folder(tmp_path / "model", pipeline=pipeline, transformer=transformer, vae=vae)
    override_plan(monkeypatch, encode=StagePlan("encode", "streamed", estimate=0, ahead=1),
                  denoise=StagePlan("denoise", "streamed", estimate=0, ahead=1, resident_blocks=0),
                  decode=StagePlan("decode", "strips", estimate=0, room=100_000))
    prompt = dict(prompt="a red fox in the snow", negative_prompt="", seed=7)
    asked = dict(width=size[0], height=size[1]) if size else {}
    result = run_queue([Job(index=1, steps=2, **asked, **prompt)], tmp_path / "run", Settings(model=folder, **CPU32))
    assert [p.placement for p in result.plan.stages.values()] == ["streamed", "streamed", "strips"]
    expected = reference_image(reference(folder, pipeline), **prompt, **asked, steps=2,
                               use_resolution_binning=binned)
    assert max_diff(pixels(result.images[result.items[0].id]), expected) <= 1


def test_every_number_comes_from_the_configs(tmp_path):
    """Scale factor, latent shape, default size, bins and token length, as the reference pipeline derives them
    from the components it holds."""
    folder = save_folder(tmp_path / "sigma", pipeline=SIGMA, transformer={"sample_size": 16, "in_channels": 8,
                                                                           "out_channels": 16},
                         vae={**small_vae(3), "latent_channels": 8})
    geometry = resolve_model(folder).geometry
    pipe = reference(folder, SIGMA)
    assert geometry.vae_scale_factor == pipe.vae_scale_factor == 4
    assert geometry.default_size == 64 and geometry.bins is None
    assert geometry.max_sequence_length == inspect.signature(pipe.__call__).parameters["max_sequence_length"].default
    latents = pipe(prompt="a cat", num_inference_steps=1, width=32, height=48, output_type="latent",
                   use_resolution_binning=False).images
    assert geometry.latent_shape(32, 48) == tuple(latents.shape[1:]) == (8, 12, 8)


def test_a_config_that_leaves_values_out_gets_the_classes_defaults(tmp_path):
    """As `from_pretrained` does: a key missing from a config.json takes the class's default."""
    folder = save_folder(tmp_path / "model", vae=DIFFUSERS_TEST_VAE)  # the VAE's config is all defaults
    for component, keys in (("transformer", ["patch_size", "in_channels"]),
                            ("vae", ["block_out_channels", "latent_channels"])):
        path = Path(folder) / component / "config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in config.items() if k not in keys}))
    geometry = resolve_model(folder).geometry
    pipe = reference(folder, ALPHA)
    assert (geometry.vae_scale_factor, geometry.patch_size, geometry.latent_channels) == (
        pipe.vae_scale_factor, pipe.transformer.config.patch_size, pipe.transformer.config.in_channels) == (1, 2, 4)


def test_a_size_the_model_cannot_cut_into_tokens_is_a_job_problem(tmp_path, monkeypatch):
    folder = save_folder(tmp_path / "model", vae=small_vae(4))  # scale 8, patches of 2: sides of 16 px
    monkeypatch.setattr(generate, "encode_texts", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(QueueError) as error:
        run_queue([Job(index=1, prompt="a", width=64, height=64), Job(index=2, prompt="b", width=72, height=40,
                                                                       name="odd")],
                  tmp_path / "run", Settings(model=folder, **CPU32))
    text = str(error.value)
    assert "job 1" not in text
    assert "job 2 ('odd'), field 'width': must be a multiple of 16 for this model, not 72" in text
    assert "job 2 ('odd'), field 'height': must be a multiple of 16 for this model, not 40" in text
    assert "16 = VAE scale factor 8 x patch size 2" in text and "the nearest multiples of 16 are 64 and 80" in text
    assert not (tmp_path / "run").exists()


def test_sizes_without_bins_are_planned_as_asked(tmp_path):
    folder = save_folder(tmp_path / "model", vae=small_vae(2))
    plan = plan_queue([Job(index=1, prompt="a", width=64, height=32)], Settings(model=folder, **CPU32))
    assert plan["denoise"].placement == "resident"
    assert resolve_model(folder).geometry.latent_shape(64, 32) == (4, 16, 32)


# What the reference pipeline cannot run either: refused when the folder is read, naming the file.
REFUSED = {
    # PixArt-α passes resolution and aspect ratio only at sample size 128: a transformer that wants them
    # elsewhere gets None and fails in its first step
    "micro-conditions-at-8": (ALPHA, {"use_additional_conditions": True}, {},
                              "use_additional_conditions is true, but PixArtAlphaPipeline passes no resolution"),
    # PixArt-Σ never passes them: null at 128 means "wanted"
    "sigma-micro-conditions-null-at-128": (
        SIGMA, {"sample_size": 128, "use_additional_conditions": None, "patch_size": 8}, small_vae(5),
        "use_additional_conditions is null, which means true at sample_size 128, but PixArtSigmaPipeline"),
    # the VAE's latents are not the transformer's
    "latent-channels": (ALPHA, {}, {**small_vae(1), "latent_channels": 8},
                        "latent_channels 8 does not match the transformer's in_channels 4"),
    # more heads without a matching cross_attention_dim: the caption projection gives 5 x 8 = 40 features, the
    # blocks' cross-attention was built for 24 (diffusers' test value for 3 x 8)
    "cross-attention-width": (ALPHA, {"num_attention_heads": 5}, {},
                              "cross_attention_dim 24 does not match the width of the caption projection it reads, "
                              "num_attention_heads x attention_head_dim = 5 x 8 = 40"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_what_the_reference_cannot_run_is_refused_when_the_folder_is_read(case, tmp_path):
    pipeline, transformer, vae, message = REFUSED[case]
    folder = save_folder(tmp_path / "model", pipeline=pipeline, transformer=transformer, vae=vae)
    with pytest.raises(ModelError, match=message) as error:
        resolve_model(folder)
    assert str(Path(folder) / ("vae" if case == "latent-channels" else "transformer") / "config.json") in str(
        error.value)
    with pytest.raises(Exception):  # noqa: B017 - the reference's own failure: a TypeError, AttributeError...
        reference_image(reference(folder, pipeline), prompt="a", steps=1, seed=0, use_resolution_binning=False,
                        width=128 if "128" in case else None, height=128 if "128" in case else None)


@pytest.mark.parametrize("vae", [DIFFUSERS_TEST_VAE, small_vae(1), small_vae(2), small_vae(3), small_vae(5)],
                         ids=["diffusers-test-vae", "1-block", "2-blocks", "3-blocks", "5-blocks"])
def test_strip_decoding_equals_the_whole_decode_for_any_number_of_vae_blocks(vae):
    """The decode stage's strips (vae_strips.py, used under a small --vram-budget) walk any SD-layout VAE."""
    torch.manual_seed(0)
    autoencoder = AutoencoderKL.from_config(vae).eval()
    assert supports(autoencoder)
    z = torch.randn(1, 4, 9, 11, generator=torch.Generator().manual_seed(1))  # odd sizes: uneven strips
    with torch.inference_mode():
        whole = autoencoder.decode(z).sample
        decoder = StripDecoder(autoencoder, torch.device("cpu"), 4_000)  # bytes: a few rows at a time
        strips = decoder.decode(z)
    assert decoder.strips_used > 0
    assert strips.shape == whole.shape and (strips - whole).abs().max().item() < 1e-4
