"""The PixArt family, samplers and precision: each kind of model is recognised from its folder, gets its reference
usage's defaults and makes the images its reference pipeline makes; each sampler equals the reference pipeline
with that scheduler swapped in; PixArt-Σ's VAE decodes in float32 in a float16 run; --text-encoder-8bit is
refused clearly where it cannot work, keys its embeddings apart and plans with T5's 8-bit size."""
from __future__ import annotations

import dataclasses
import inspect
import json

import diffusers
import pytest
import torch
from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as alpha_bins
from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as sigma_bins
from PIL import Image

from conftest import max_diff, pixels, reference_image
from pixart_lowvram import decode, generate, models, resolve
from pixart_lowvram.cli import main
from pixart_lowvram.errors import QueueError, UsageError
from pixart_lowvram.generate import Settings, run_queue
from pixart_lowvram.items import assign_keys, binned_size, expand
from pixart_lowvram.jobs import Job, jobs_from_options
from pixart_lowvram.models import ModelInfo, resolve_model, sizes_from_shapes, vae_dtype
from pixart_lowvram.placement import GiB, PlanError, format_plan, make_plan
from pixart_lowvram.random_model import empty_models, make_random_model, preset_config


CPU32 = dict(device="cpu", dtype="float32", embed_cache=None)
KINDS = ["tiny", "tiny-512", "tiny-sigma", "tiny-lcm", "tiny-dmd"]  # PixArt-α 1024, α 512, Σ, LCM, DMD


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_model) -> dict[str, str]:
    """Every tiny preset, built once for this module (about a second in all)."""
    root = tmp_path_factory.mktemp("family")
    built = {name: str(make_random_model(root / name, name)) for name in KINDS[1:] + ["tiny-sigma-2k"]}
    return {"tiny": tiny_model, **built}


# -- what each model is ---------------------------------------------------------------------------------------------

def reference_default(pipeline: str, argument: str):
    """A default of the reference pipeline's own __call__ (steps, guidance, token limit)."""
    return inspect.signature(getattr(diffusers, pipeline).__call__).parameters[argument].default


# preset: kind, pipeline, image size, steps, cfg, sampler, tokens, the reference's resolution bins
DETECTED = {
    "tiny": ("alpha", "PixArtAlphaPipeline", 256, 20, 4.5, "dpm-solver", 120, alpha_bins.ASPECT_RATIO_256_BIN),
    "tiny-512": ("alpha", "PixArtAlphaPipeline", 512, 20, 4.5, "dpm-solver", 120, alpha_bins.ASPECT_RATIO_512_BIN),
    "tiny-sigma": ("sigma", "PixArtSigmaPipeline", 256, 20, 4.5, "dpm-solver", 300, alpha_bins.ASPECT_RATIO_256_BIN),
    "tiny-sigma-2k": ("sigma", "PixArtSigmaPipeline", 2048, 20, 4.5, "dpm-solver", 300,
                      sigma_bins.ASPECT_RATIO_2048_BIN),
    # PixArt-LCM's model card: guidance_scale=0., num_inference_steps=4; DMD's demo: one step at t=400, cfg 1
    "tiny-lcm": ("lcm", "PixArtAlphaPipeline", 256, 4, 0.0, "lcm", 120, alpha_bins.ASPECT_RATIO_256_BIN),
    "tiny-dmd": ("dmd", "PixArtAlphaPipeline", 256, 1, 1.0, "ddpm", 120, alpha_bins.ASPECT_RATIO_256_BIN),
}


@pytest.mark.parametrize("preset", DETECTED)
def test_each_kind_is_detected_from_its_folder_with_its_reference_defaults(family, preset):
    kind, pipeline, size, steps, cfg, sampler, tokens, bins = DETECTED[preset]
    info = resolve_model(family[preset])
    assert (info.kind.name, info.pipeline_class) == (kind, pipeline)
    assert (info.defaults.size, info.defaults.steps, info.defaults.cfg, info.defaults.sampler) == (
        size, steps, cfg, sampler)
    assert info.geometry.max_sequence_length == tokens == reference_default(pipeline, "max_sequence_length")
    assert info.geometry.bins is bins
    if kind in ("alpha", "sigma"):  # the reference pipeline's own defaults, read from its signature
        assert steps == reference_default(pipeline, "num_inference_steps")
        assert cfg == reference_default(pipeline, "guidance_scale")
    assert info.kind.timesteps == ((400,) if kind == "dmd" else None)


def preset_info(preset: str) -> ModelInfo:
    """What resolve_model would read from a preset's folder, from its configs alone (nothing is built)."""
    spec = preset_config(preset)
    return ModelInfo(source=preset, path=None, pipeline_class=spec.pipeline, classes={"scheduler": spec.scheduler},
                     configs={"text_encoder": spec.text_encoder, "transformer": spec.transformer, "vae": spec.vae,
                              "scheduler": {"_class_name": spec.scheduler, **spec.scheduler_config}})


@pytest.mark.parametrize("preset, kind, size, bins", [
    ("xl", "alpha", 1024, alpha_bins.ASPECT_RATIO_1024_BIN),
    ("xl-512", "alpha", 512, alpha_bins.ASPECT_RATIO_512_BIN),
    ("xl-sigma", "sigma", 1024, alpha_bins.ASPECT_RATIO_1024_BIN),
    ("xl-sigma-2k", "sigma", 2048, sigma_bins.ASPECT_RATIO_2048_BIN),
    ("xl-lcm", "lcm", 1024, alpha_bins.ASPECT_RATIO_1024_BIN),
    ("xl-dmd", "dmd", 512, alpha_bins.ASPECT_RATIO_512_BIN),
])
def test_full_size_presets_are_the_real_checkpoints_kinds_and_sizes(preset, kind, size, bins):
    info = preset_info(preset)
    assert (info.kind.name, info.geometry.default_size) == (kind, size)
    assert info.geometry.bins is bins
    assert info.geometry.max_sequence_length == (300 if kind == "sigma" else 120)


# -- the same images as each model's reference pipeline ------------------------------------------------------------

# What the job asks for, and how the model's reference usage calls its pipeline for the same image. Jobs leave out
# what the model decides (cfg, sampler, mostly the size; LCM's and DMD's steps), so the defaults are used too;
# α and Σ run 3 steps of their 20 to keep the test fast.
USAGE = {
    "tiny": (dict(steps=3), dict(steps=3)),
    "tiny-512": (dict(width=512, height=384, steps=2), dict(width=512, height=384, steps=2)),  # 576x416, resized
    "tiny-sigma": (dict(steps=3), dict(steps=3)),
    "tiny-lcm": (dict(), dict(cfg=0.0, steps=4)),
    "tiny-dmd": (dict(), dict(cfg=1.0, steps=1, timesteps=[400])),
}


@pytest.mark.parametrize("preset", KINDS)
def test_each_kind_makes_the_reference_pipelines_image(family, preset, tmp_path):
    job, usage = USAGE[preset]
    prompt = dict(prompt="a lighthouse at dusk, oil painting", negative_prompt="blurry", seed=1152753)
    result = run_queue([Job(index=1, **prompt, **job)], tmp_path / "run", Settings(model=family[preset], **CPU32))

    pipe = getattr(diffusers, DETECTED[preset][1]).from_pretrained(family[preset])
    pipe.set_progress_bar_config(disable=True)
    expected = reference_image(pipe, **prompt, **usage)
    ours = pixels(result.images[result.items[0].id])
    assert ours.shape == expected.shape
    assert max_diff(ours, expected) <= 1


@pytest.mark.parametrize("preset, budget", [("xl", 1.5), ("xl-512", 1.5), ("xl-sigma", 1.5), ("xl-lcm", 1.5),
                                            ("xl-dmd", 1.5), ("xl-sigma-2k", 2.5)])
def test_every_kind_at_full_size_plans_within_a_small_budget(preset, budget):
    """The real shapes (meta device, nothing allocated) at each model's default size, in float16. Σ 2K's 2048 px
    images need ~2.1 GiB: the DiT's activations alone are ~1.2 GiB there."""
    info = preset_info(preset)
    shapes = {name: {k: ("F16", list(p.shape)) for k, p in model.state_dict().items()}
              for name, model in empty_models(preset_config(preset)).items()}
    sizes = sizes_from_shapes(shapes, info.configs, torch.float16, info.geometry.max_sequence_length,
                              vae_dtype=vae_dtype(info, torch.float16))
    plan = make_plan(int(budget * GiB), sizes, [binned_size(info, info.geometry.default_size, info.geometry.default_size)],
                     texts=4)
    assert all(stage.estimate <= budget * GiB for stage in plan.stages.values()), format_plan(plan)
    if preset == "xl-sigma-2k":
        with pytest.raises(PlanError, match="too small to denoise 2048x2048"):
            make_plan(2 * GiB, sizes, [(2048, 2048)], texts=4)


# -- PixArt-Σ's VAE in a float16 run ---------------------------------------------------------------------------------

def test_sigma_in_float16_decodes_in_float32_without_nan(family, tmp_path, monkeypatch):
    """The SDXL VAE overflows float16 (NaN, black images): in a float16 run it loads and decodes in float32."""
    seen = {}
    real_load = decode.load_vae

    def load_vae(info, dtype, device):
        vae = real_load(info, dtype, device)
        seen["vae"] = vae.dtype
        real_decode = vae.decode

        def checked_decode(*args, **kwargs):
            out = real_decode(*args, **kwargs)
            seen["finite"] = bool(torch.isfinite(out[0]).all())
            return out

        vae.decode = checked_decode
        return vae

    monkeypatch.setattr(decode, "load_vae", load_vae)
    result = run_queue(jobs_from_options("a red fox", seed=3, steps=2), tmp_path / "run",
                       Settings(model=family["tiny-sigma"], device="cpu", dtype="float16", embed_cache=None))
    assert seen == {"vae": torch.float32, "finite": True}
    image = pixels(result.images[result.items[0].id])
    assert image.std() > 10, "not a flat (black) image"


def test_only_an_sdxl_vae_that_needs_it_is_upcast(family):
    sigma, alpha = resolve_model(family["tiny-sigma"]), resolve_model(family["tiny"])
    assert vae_dtype(sigma, torch.float16) == torch.float32
    assert vae_dtype(sigma, torch.bfloat16) == torch.bfloat16  # bfloat16 has float32's range
    assert vae_dtype(alpha, torch.float16) == torch.float16  # the SD VAE: as the reference decodes it
    fp16_fix = dataclasses.replace(sigma, configs={**sigma.configs, "vae": {**sigma.configs["vae"],
                                                                          "force_upcast": False}})
    assert vae_dtype(fp16_fix, torch.float16) == torch.float16  # the "fp16-fix" VAE says it is safe


def test_the_planner_counts_sigmas_vae_in_float32_in_a_float16_run(family):
    sigma, alpha = resolve_model(family["tiny-sigma"]), resolve_model(family["tiny"])
    sigma16, sigma32 = models.component_sizes(sigma, torch.float16), models.component_sizes(sigma, torch.float32)
    assert sigma16.vae == sigma32.vae and sigma16.vae_dtype_bytes == 4
    assert sigma16.transformer * 2 == sigma32.transformer  # the rest stays in float16
    assert models.component_sizes(alpha, torch.float16).vae_dtype_bytes == 2
    images = [(1024, 1024)]
    assert (make_plan(None, sigma16, images)["decode"].estimate
            > make_plan(None, dataclasses.replace(sigma16, vae_dtype_bytes=2), images)["decode"].estimate)


# -- samplers --------------------------------------------------------------------------------------------------------

# Each sampler as a diffusers user swaps it in: pipe.scheduler = X.from_config(pipe.scheduler.config, ...).
REFERENCE_SCHEDULERS = {
    "dpm-solver": ("DPMSolverMultistepScheduler", {}, "DPM++ 2M"),
    "sa-solver": ("SASolverScheduler", {"algorithm_type": "data_prediction"}, "SA-Solver"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "ddim": ("DDIMScheduler", {"clip_sample": False}, "DDIM"),
    "lcm": ("LCMScheduler", {}, "LCM"),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}, "DDPM"),
}


def test_every_sampler_makes_the_reference_pipelines_image(tiny_model, reference_pipeline, tmp_path):
    # One queue, every sampler on the same prompt and seed, two images per batch: each sampler gets its own
    # batches and latents, and the two euler-a images (stochastic, batched together) each equal a one-image call.
    jobs = [Job(index=i, prompt="a pirate ship", seed=11, steps=2, sampler=name, name=name,
                count=2 if name == "euler-a" else 1) for i, name in enumerate(REFERENCE_SCHEDULERS, start=1)]
    result = run_queue(jobs, tmp_path / "run", Settings(model=tiny_model, denoise_batch=2, **CPU32))
    assert len({it.latent_key for it in result.items}) == len(result.items) == 8

    pipe = diffusers.PixArtAlphaPipeline(**reference_pipeline.components)  # its own scheduler slot
    pipe.set_progress_bar_config(disable=True)
    for item in result.items:
        scheduler, overrides, label = REFERENCE_SCHEDULERS[item.sampler]
        pipe.scheduler = getattr(diffusers, scheduler).from_config(reference_pipeline.scheduler.config, **overrides)
        expected = reference_image(pipe, prompt="a pirate ship", steps=2, seed=item.seed)
        assert max_diff(pixels(result.images[item.id]), expected) <= 1, item.id
        with Image.open(result.images[item.id]) as im:
            assert f", Sampler: {label}, " in im.text["parameters"]
            assert json.loads(im.text["pixart_lowvram"])["sampler"] == item.sampler


def test_an_unknown_sampler_is_a_validation_error_listing_the_known_ones(tmp_path, capsys, monkeypatch):
    with pytest.raises(QueueError) as error:
        jobs_from_options("a fox", sampler="heun")
    assert "unknown sampler 'heun' (known: dpm-solver, sa-solver, euler, euler-a, ddim, lcm, ddpm)" in str(error.value)

    monkeypatch.setattr(resolve, "resolve_model", lambda *a, **k: pytest.fail("the model was touched"))
    code = main(["generate", "a fox", "--sampler", "euler_a", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "known: dpm-solver, sa-solver, euler, euler-a" in err and "did you mean 'euler-a'?" in err
    assert "Traceback" not in err


def test_what_a_model_cannot_run_is_refused_before_its_weights_load(family, tmp_path, monkeypatch):
    monkeypatch.setattr(generate, "denoise_items", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(generate, "encode_texts", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(QueueError) as error:
        run_queue([Job(index=1, prompt="a", sampler="dpm-solver"), Job(index=2, prompt="b", steps=4),
                   Job(index=3, prompt="c", steps=4, sampler="dpm-solver")],
                  tmp_path / "dmd", Settings(model=family["tiny-dmd"], **CPU32))
    text = str(error.value)
    assert "job 1, field 'sampler': PixArt-α DMD needs a sampler that starts at its fixed timestep" in text
    assert "job 2, field 'steps': PixArt-α DMD runs exactly 1 step(s)" in text
    # every problem of a job at once, not the first one only
    assert "job 3, field 'steps'" in text and "job 3, field 'sampler'" in text
    with pytest.raises(QueueError, match="sampler 'lcm' cannot run 60 steps"):
        run_queue([Job(index=1, prompt="a", steps=60)], tmp_path / "lcm", Settings(model=family["tiny-lcm"], **CPU32))
    assert not (tmp_path / "dmd").exists() and not (tmp_path / "lcm").exists()


def test_a_sampler_is_part_of_the_latents_key_but_the_models_own_is_not(tiny_model):
    info = resolve_model(tiny_model)
    jobs = [Job(index=1, prompt="a", seed=1), Job(index=2, prompt="a", seed=1, sampler="dpm-solver"),
            Job(index=3, prompt="a", seed=1, sampler="euler")]
    items, _ = expand(jobs, info.defaults, {})
    assign_keys(items, info, torch.float32)
    own, named, euler = items
    assert own.latent_key == named.latent_key != euler.latent_key
    assert own.prompt_key == euler.prompt_key  # the embeddings do not depend on the sampler


# -- --text-encoder-8bit ---------------------------------------------------------------------------------------------

def test_8bit_on_the_cpu_is_refused_before_anything_loads(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(resolve, "resolve_model", lambda *a, **k: pytest.fail("the model was touched"))
    with pytest.raises(UsageError, match="--text-encoder-8bit needs a CUDA GPU"):
        run_queue(jobs_from_options("x"), tmp_path / "run",
                  Settings(model=tiny_model, device="cpu", text_encoder_8bit=True))
    code = main(["generate", "x", "--model", tiny_model, "--device", "cpu", "--text-encoder-8bit",
                 "--out", str(tmp_path / "run")])
    assert code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_8bit_without_bitsandbytes_says_what_to_install(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(resolve, "resolve_device", lambda name: torch.device("cuda"))  # as if on a GPU
    monkeypatch.setattr(resolve, "bitsandbytes_available", lambda: False)
    monkeypatch.setattr(resolve, "resolve_model", lambda *a, **k: pytest.fail("the model was touched"))
    with pytest.raises(UsageError, match=r"needs bitsandbytes: pip install 'pixart-lowvram\[8bit\]'"):
        run_queue(jobs_from_options("x"), tmp_path / "run", Settings(model=tiny_model, text_encoder_8bit=True))
    monkeypatch.setattr(resolve, "bitsandbytes_available", lambda: True)
    with pytest.raises(UsageError, match="exclude each other"):
        run_queue(jobs_from_options("x"), tmp_path / "run",
                  Settings(model=tiny_model, text_encoder_8bit=True, encode_on_cpu=True))


def test_8bit_loads_t5_with_the_diffusers_recipe(tiny_model, monkeypatch):
    """BitsAndBytesConfig(load_in_8bit=True) straight onto the GPU, never `.to()` (int8 layers cannot move)."""
    from transformers import T5EncoderModel

    calls = []
    monkeypatch.setattr(T5EncoderModel, "from_pretrained", classmethod(
        lambda cls, *args, **kwargs: calls.append(kwargs) or torch.nn.Linear(1, 1)))
    models.load_text_encoder(resolve_model(tiny_model), torch.float16, torch.device("cuda", 1), eight_bit=True)
    (kwargs,) = calls
    assert kwargs["quantization_config"].load_in_8bit and kwargs["device_map"] == {"": 1}
    assert kwargs["dtype"] == torch.float16


def test_8bit_embeddings_are_other_artifacts(tiny_model):
    info = resolve_model(tiny_model)
    items, _ = expand(jobs_from_options("a fox", seed=1), info.defaults, {})
    assign_keys(items, info, torch.float16)
    keys16 = (items[0].prompt_key, items[0].latent_key, items[0].image_key)
    assign_keys(items, info, torch.float16, text_encoder_8bit=True)
    keys8 = (items[0].prompt_key, items[0].latent_key, items[0].image_key)
    assert all(a != b for a, b in zip(keys16, keys8))


@pytest.fixture(scope="module")
def xl_shapes():
    """PixArt-XL-2's tensor shapes, from the networks on the meta device (nothing allocated)."""
    spec = preset_config("xl")
    shapes = {name: {k: ("F16", list(p.shape)) for k, p in model.state_dict().items()}
              for name, model in empty_models(spec).items()}
    return shapes, {"text_encoder": spec.text_encoder, "transformer": spec.transformer, "vae": spec.vae}


def test_8bit_t5_is_planned_at_its_8bit_size_and_kept_resident(xl_shapes):
    shapes, configs = xl_shapes
    fp16 = sizes_from_shapes(shapes, configs, torch.float16)
    int8 = sizes_from_shapes(shapes, configs, torch.float16, text_encoder_8bit=True)
    # q, k, v, o, wi_0, wi_1 of the 24 blocks at a byte a weight (plus a float32 scale per row); the fp32 `wo`
    # layers, the embedding and the norms as before: ~7.4 GiB, as measured for the diffusers recipe (BENCHMARKS.md)
    d, ff, blocks = 4096, 10240, 24
    int8_weights = blocks * (4 * d * d + 2 * ff * d)
    assert fp16.text_encoder - int8.text_encoder == int8_weights - blocks * 4 * (4 * d + 2 * ff)
    assert 7.3 * GiB < int8.text_encoder < 7.5 * GiB and fp16.text_encoder > 10.7 * GiB
    assert int8.transformer == fp16.transformer and int8.vae == fp16.vae

    images = [(1024, 1024)]
    at_10 = make_plan(10 * GiB, int8, images, texts=4, text_encoder_8bit=True)
    assert at_10["encode"].placement == "resident" and at_10["encode"].estimate <= 10 * GiB
    assert make_plan(10 * GiB, fp16, images, texts=4)["encode"].placement == "streamed"  # 16 bits: too big
    with pytest.raises(PlanError, match="never streamed: leave out --text-encoder-8bit"):
        make_plan(4 * GiB, int8, images, texts=4, text_encoder_8bit=True)
