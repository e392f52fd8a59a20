"""Image-to-image: a job's init image, encoded by the VAE in a stage of its own, noised to its strength's timestep
and denoised from there, makes the image diffusers' image-to-image recipe makes from the same pieces
(StableDiffusionImg2ImgPipeline's steps with PixArt's transformer: there is no PixArt img2img pipeline), for every
sampler and kind; deterministic by seed, keyed by the image's content, checked before anything loads."""
from __future__ import annotations

import inspect
import json
import os
import types

import diffusers
import numpy as np
import pytest
import torch
from diffusers.image_processor import PixArtImageProcessor, VaeImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN, ASPECT_RATIO_512_BIN, retrieve_timesteps)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
    StableDiffusionImg2ImgPipeline, retrieve_latents)
from diffusers.utils import load_image
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from conftest import max_diff, pixels, reference_image
from pixart_lowvram import decode, denoise, encode, generate, resolve, vae_encode
from pixart_lowvram.cli import main
from pixart_lowvram.errors import QueueError
from pixart_lowvram.generate import Settings, run_queue
from pixart_lowvram.jobs import Job, parse_queue
from pixart_lowvram.random_model import make_random_model, scheduler_config
from pixart_lowvram.placement import StagePlan
from pixart_lowvram.samplers import SAMPLERS
from pixart_lowvram.vae_strips import StripEncoder
from test_foreign_configs import save_folder, small_vae
from test_streaming import override_plan

CPU32 = dict(device="cpu", dtype="float32", embed_cache=None)


def write_image(path, width: int, height: int, seed: int) -> str:
    """A picture with structure (smooth gradients and a disc), not noise: resizing it means something."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rng = np.random.default_rng(seed)
    a, b, c = rng.random(3)
    disc = ((x - a * 0.6 - 0.2) ** 2 + (y - b * 0.6 - 0.2) ** 2 < 0.05).astype(float)
    rgb = np.stack([x * a + disc * 0.5, y * b, (1 - x) * c + disc * 0.3], axis=-1)
    Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def init_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("init")
    return {"a": write_image(folder / "a.png", 300, 200, 1), "b": write_image(folder / "b.jpg", 180, 260, 2)}


def reference_img2img(pipe, *, init_image: str, prompt: str, width: int, height: int, seed: int, strength: float,
                      steps: int, cfg: float = 4.5, negative_prompt: str = "", timesteps=None) -> np.ndarray:
    """The image StableDiffusionImg2ImgPipeline's recipe makes with PixArt's components, built here from diffusers'
    pieces and a loop that mirrors PixArtAlphaPipeline's: preprocess, vae.encode, retrieve_latents, get_timesteps,
    add_noise, denoise, decode, resize back from the aspect-ratio bin."""
    scheduler = pipe.scheduler
    bins = {32: ASPECT_RATIO_256_BIN, 64: ASPECT_RATIO_512_BIN}.get(pipe.transformer.config.sample_size)
    h, w = PixArtImageProcessor.classify_height_width_bin(height, width, ratios=bins) if bins else (height, width)
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.inference_mode():
        image = VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor).preprocess(
            load_image(init_image), height=h, width=w)
        init = retrieve_latents(pipe.vae.encode(image), generator=generator) * pipe.vae.config.scaling_factor
        _, steps = retrieve_timesteps(scheduler, steps, "cpu", timesteps)
        run, _ = StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=scheduler), steps,
                                                              strength, "cpu")
        noise = randn_tensor(init.shape, generator=generator, dtype=init.dtype)
        latents = scheduler.add_noise(init, noise, run[:1])
        guided = cfg > 1
        tokens = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default  # α 120, Σ 300
        embeds, mask, negative, negative_mask = pipe.encode_prompt(
            prompt, guided, negative_prompt=negative_prompt, device="cpu", clean_caption=True,
            max_sequence_length=tokens)
        if guided:
            embeds, mask = torch.cat([negative, embeds]), torch.cat([negative_mask, mask])
        extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
        for t in run:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
            out = pipe.transformer(model_input, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                                   timestep=t[None].expand(model_input.shape[0]),
                                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            if guided:
                uncond, text = out.chunk(2)
                out = uncond + cfg * (text - uncond)
            out = out.chunk(2, dim=1)[0] if pipe.transformer.config.out_channels // 2 == latents.shape[1] else out
            latents = scheduler.step(out, t, latents, **extra, return_dict=False)[1 if steps == 1 else 0]
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        if bins:
            decoded = pipe.image_processor.resize_and_crop_tensor(decoded, width, height)
        return np.asarray(pipe.image_processor.postprocess(decoded, output_type="pil")[0])


def with_sampler(reference_pipeline, name: str | None):
    pipe = diffusers.PixArtAlphaPipeline(**reference_pipeline.components)
    pipe.set_progress_bar_config(disable=True)
    if name is not None:
        sampler = SAMPLERS[name]
        pipe.scheduler = getattr(diffusers, sampler.scheduler).from_config(reference_pipeline.scheduler.config,
                                                                           **sampler.overrides)
    return pipe


def job(init_image: str, **fields) -> Job:
    return Job(**{"index": 1, "prompt": "a pirate ship", "seed": 5, "steps": 4, "width": 256, "height": 256,
                  "init_image": init_image, **fields})


# -- the reference's image ------------------------------------------------------------------------------------

# sampler (None: the model's own DPM-Solver), strength, width, height
CASES = [(None, 0.6, 256, 192),  # non-square: the image is encoded at the aspect-ratio bin, resized back after
         ("euler", 0.75, 256, 256),  # a scheduler whose starting noise is scaled (init_noise_sigma) elsewhere
         ("euler-a", 1.0, 256, 256),  # stochastic: its step noise comes after the encode's and add_noise's draws
         ("ddim", 0.5, 256, 256), ("ddpm", 0.5, 256, 256),  # schedulers without a begin index
         ("lcm", 0.5, 256, 256), ("sa-solver", 0.75, 256, 256)]


def test_each_sampler_makes_the_img2img_recipes_image(tiny_model, reference_pipeline, init_images, tmp_path):
    jobs = [job(init_images["a"], index=i, seed=5 + i, sampler=sampler, strength=strength, width=w, height=h,
                name=sampler or "own") for i, (sampler, strength, w, h) in enumerate(CASES, start=1)]
    result = run_queue(jobs, tmp_path / "run", Settings(model=tiny_model, **CPU32))
    assert [s.name for s in result.stages] == ["encode", "vae-encode", "denoise", "decode"]
    assert result.made["vae-encode"] == 2  # one image at two sizes: encoded once for each
    for item, (sampler, strength, w, h) in zip(result.items, CASES):
        expected = reference_img2img(with_sampler(reference_pipeline, sampler), init_image=init_images["a"],
                                     prompt="a pirate ship", width=w, height=h, seed=item.seed, strength=strength,
                                     steps=4)
        assert max_diff(pixels(result.images[item.id]), expected) <= 1, item.id


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("kinds")
    return {name: str(make_random_model(root / name, name)) for name in ("tiny-lcm", "tiny-dmd", "tiny-sigma")}


def test_lcm_dmd_and_sigma_make_their_recipes_image(kinds, init_images, tmp_path):
    """PixArt-LCM with its own 4 steps (the steps' later share, as diffusers' img2img pipeline with an
    LCMScheduler); PixArt-DMD's one step at timestep 400 with strength 1 (the init image noised to 400, denoised
    in one step); PixArt-Σ (300 tokens, the SDXL VAE)."""
    runs = {"tiny-lcm": dict(strength=0.5, cfg=0.0, steps=4), "tiny-dmd": dict(strength=1.0, cfg=1.0, steps=1),
            "tiny-sigma": dict(strength=0.75, steps=3)}
    for name, fields in runs.items():
        result = run_queue([job(init_images["b"], **fields)], tmp_path / name, Settings(model=kinds[name], **CPU32))
        pipe = getattr(diffusers, "PixArtSigmaPipeline" if name == "tiny-sigma" else "PixArtAlphaPipeline"
                       ).from_pretrained(kinds[name])
        usage = dict(timesteps=[400]) if name == "tiny-dmd" else {}
        expected = reference_img2img(pipe, init_image=init_images["b"], prompt="a pirate ship", width=256,
                                     height=256, seed=5, strength=fields["strength"], steps=fields["steps"],
                                     cfg=fields.get("cfg", 4.5), **usage)
        assert max_diff(pixels(result.images[result.items[0].id]), expected) <= 1, name


# -- what strength does -------------------------------------------------------------------------------------------

def latents_of(result, item, key: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(result.folder / "latents" / f"{key}.safetensors"))


def test_small_strength_stays_close_to_the_init_image_and_strength_1_does_not(tiny_model, init_images, tmp_path):
    """Measured in latents (the tiny model's random VAE cannot give a picture back): the RMS distance of the
    denoised latents from the init image's (its encoding's mean x scaling factor) grows with strength. With 20
    steps, strength 0.05 runs one step from timestep ~50 and moves them by 0.67 RMS, strength 1 runs all 20 from
    the init image noised to the first timestep and moves them by ~340: the random DiT is no denoiser, so only the
    order and the gap say something (a trained model keeps the picture at small strengths)."""
    strengths = [0.05, 0.25, 0.5, 1.0]
    jobs = [job(init_images["a"], index=i, steps=20, strength=s, name=f"s{i}") for i, s in enumerate(strengths, 1)]
    result = run_queue(jobs, tmp_path / "run", Settings(model=tiny_model, **CPU32))
    assert result.made["vae-encode"] == 1  # one image, one size: encoded once for every strength
    moments = latents_of(result, None, result.items[0].init_key)["moments"]
    init = moments[:4] * 0.18215
    distance = [float((latents_of(result, it, it.latent_key)["latents"] - init).pow(2).mean().sqrt())
                for it in result.items]
    assert distance == sorted(distance), distance
    assert distance[0] < 1 < 100 < distance[-1], distance


def test_strength_1_starts_from_the_noised_init_image_not_from_pure_noise(tiny_model, init_images, tmp_path):
    """As in diffusers' img2img pipeline, strength 1 runs every step, from the init image noised to the first
    timestep: a different init image gives a different image, and neither is the text-to-image one."""
    jobs = [job(init_images["a"], steps=2, strength=1.0, name="a"),
            job(init_images["b"], index=2, steps=2, strength=1.0, name="b"),
            Job(index=3, prompt="a pirate ship", seed=5, steps=2, width=256, height=256, name="text")]
    result = run_queue(jobs, tmp_path / "run", Settings(model=tiny_model, **CPU32))
    a, b, text = (latents_of(result, it, it.latent_key)["latents"] for it in result.items)
    assert not torch.allclose(a, b) and not torch.allclose(a, text) and not torch.allclose(b, text)


def test_same_seed_same_image_on_any_batch_and_in_any_queue(tiny_model, init_images, tmp_path):
    queue = (f'[defaults]\nsteps = 3\nwidth = 256\nheight = 256\nstrength = 0.7\nsampler = "euler-a"\n'
             f'[[jobs]]\nprompt = "a cat"\nseed = 1\ncount = 3\ninit_image = {json.dumps(init_images["a"])}\n'
             f'[[jobs]]\nprompt = "a dog"\nseed = 9\ninit_image = {json.dumps(init_images["b"])}\n')
    jobs = parse_queue(queue, "toml")
    one = run_queue(jobs, tmp_path / "b1", Settings(model=tiny_model, denoise_batch=1, **CPU32))
    four = run_queue(jobs, tmp_path / "b4", Settings(model=tiny_model, denoise_batch=4, **CPU32))
    alone = run_queue(jobs[1:], tmp_path / "alone", Settings(model=tiny_model, **CPU32))
    assert one.made["vae-encode"] == 2  # three copies of one image, one of another
    for item in one.items:  # batched matrix products round differently: within 1/255, as text-to-image
        assert max_diff(pixels(one.images[item.id]), pixels(four.images[item.id])) <= 1, item.id
    assert max_diff(pixels(one.images[one.items[-1].id]), pixels(alone.images[alone.items[0].id])) == 0
    copies = [pixels(one.images[it.id]) for it in one.items[:3]]  # seeds 1, 2, 3 of one init image
    assert max_diff(copies[0], copies[1]) > 0 and max_diff(copies[1], copies[2]) > 0


def test_the_png_says_it_was_made_from_an_image(tiny_model, init_images, tmp_path):
    result = run_queue([job(init_images["a"], strength=0.5)], tmp_path / "run", Settings(model=tiny_model, **CPU32))
    with Image.open(result.images[result.items[0].id]) as im:
        assert im.text["parameters"].endswith(", Denoising strength: 0.5")
        meta = json.loads(im.text["pixart_lowvram"])
    assert meta["init_image"] == init_images["a"] and meta["strength"] == 0.5


# -- bad input, before anything loads -----------------------------------------------------------------------------

def test_bad_init_images_and_strengths_are_queue_errors_naming_job_and_field(init_images, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "folder.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")  # would block a plain open() forever
    with open(init_images["b"], "rb") as f:
        (tmp_path / "cut.jpg").write_bytes(f.read()[:600])  # a JPEG cut short
    (tmp_path / "queue.toml").write_text(
        '[[jobs]]\nprompt = "a"\ninit_image = "missing.png"\n'
        '[[jobs]]\nprompt = "b"\ninit_image = "notes.png"\n'
        '[[jobs]]\nprompt = "c"\ninit_image = "folder.png"\n'
        '[[jobs]]\nprompt = "d"\ninit_image = "cut.jpg"\n'
        f'[[jobs]]\nprompt = "e"\ninit_image = {json.dumps(init_images["a"])}\nstrength = 0\n'
        f'[[jobs]]\nprompt = "f"\ninit_image = {json.dumps(init_images["a"])}\nstrength = 1.5\n'
        f'[[jobs]]\nprompt = "g"\ninit_image = {json.dumps(init_images["a"])}\nstrength = nan\n'
        f'[[jobs]]\nprompt = "h"\ninit_image = {json.dumps(init_images["a"])}\nstrength = "0.5"\n'
        '[[jobs]]\nprompt = "i"\nstrength = 0.5\n'
        '[[jobs]]\nprompt = "j"\ninit_image = ""\n'
        '[[jobs]]\nprompt = "k"\ninit_image = "pipe.png"\n')
    from pixart_lowvram.jobs import load_queue

    with pytest.raises(QueueError) as error:
        load_queue(tmp_path / "queue.toml")
    text = str(error.value)
    where = str(tmp_path)  # paths are relative to the queue file's folder
    assert f"job 1, field 'init_image': '{where}/missing.png' does not exist" in text
    assert f"job 2, field 'init_image': '{where}/notes.png' is not an image file PIL can read" in text
    assert f"job 3, field 'init_image': '{where}/folder.png' is a folder, not a regular file" in text
    assert f"job 4, field 'init_image': '{where}/cut.jpg' cannot be read as an image" in text
    assert "job 5, field 'strength': must be more than 0 and at most 1, not 0" in text
    assert "job 6, field 'strength': must be more than 0 and at most 1, not 1.5" in text
    assert "job 7, field 'strength': must be a finite number, not nan" in text
    assert "job 8, field 'strength': must be a number, not the text '0.5'" in text
    assert "job 9, field 'strength': is given without init_image" in text
    assert "job 10, field 'init_image': must not be empty" in text
    assert f"job 11, field 'init_image': '{where}/pipe.png' is a device, pipe or socket, not a regular file" in text
    assert len(error.value.problems) == 11


def test_a_default_strength_is_for_the_jobs_with_an_init_image(init_images):
    jobs = parse_queue(f'[defaults]\nstrength = 0.3\n[[jobs]]\nprompt = "a"\n'
                       f'[[jobs]]\nprompt = "b"\ninit_image = {json.dumps(init_images["a"])}\n', "toml")
    assert (jobs[0].init_image, jobs[0].strength) == (None, None)
    assert (jobs[1].init_image, jobs[1].strength) == (init_images["a"], 0.3)
    with pytest.raises(QueueError, match="field 'defaults.strength': is given, but no job has an init_image"):
        parse_queue('[defaults]\nstrength = 0.3\n[[jobs]]\nprompt = "a"\n', "toml")


def test_a_strength_that_leaves_no_step_is_refused_before_the_model_loads(kinds, tiny_model, init_images,
                                                                          tmp_path, monkeypatch):
    monkeypatch.setattr(generate, "encode_images", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(generate, "encode_texts", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(QueueError) as error:
        run_queue([job(init_images["a"], steps=3, strength=0.3)], tmp_path / "a", Settings(model=tiny_model, **CPU32))
    assert ("job 1, field 'strength': strength 0.3 runs no step of 3: image-to-image runs int(steps x strength) of "
            "them (use strength 0.34 or more, or more steps)") in str(error.value)
    with pytest.raises(QueueError) as error:  # DMD's one step: its default strength 0.8 leaves none
        run_queue([job(init_images["a"], steps=None, cfg=None)], tmp_path / "dmd",
                  Settings(model=kinds["tiny-dmd"], **CPU32))
    assert ("field 'strength': strength 0.8 (the default) runs no step of 1: image-to-image runs int(steps x "
            "strength) of them (PixArt-α DMD runs one step: strength 1 noises the init image to its timestep 400 "
            "and denoises it in that step)") in str(error.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "dmd").exists()


def test_the_command_line_takes_an_init_image_relative_to_where_it_runs(tiny_model, init_images, tmp_path,
                                                                       capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(init_images["a"]))
    out = tmp_path / "run"
    common = ["--model", tiny_model, "--device", "cpu", "--dtype", "float32", "--steps", "2", "--width", "256",
              "--height", "256", "--seed", "3", "--out", str(out), "-q", "--no-embed-cache"]
    assert main(["generate", "a fox", "--init-image", "a.png", "--strength", "0.5", *common]) == 0
    assert "vae-encode" in capsys.readouterr().out
    with Image.open(out / "images" / "001-a-fox.png") as im:
        assert json.loads(im.text["pixart_lowvram"])["init_image"] == "a.png"
    (tmp_path / "q.json").write_text(json.dumps([{"prompt": "a fox", "init_image": init_images["a"]}]))
    assert main(["plan", str(tmp_path / "q.json"), "--model", tiny_model, "--device", "cpu"]) == 0
    assert "vae-encode whole" in capsys.readouterr().out
    monkeypatch.setattr(resolve, "resolve_model", lambda *a, **k: pytest.fail("the model was touched"))
    assert main(["generate", "a fox", "--init-image", "nothing.png", *common]) == 2
    assert main(["generate", "a fox", "--strength", "2", *common]) == 2
    err = capsys.readouterr().err
    assert "field 'init_image': 'nothing.png' does not exist" in err
    assert "field 'strength': must be more than 0 and at most 1, not 2.0" in err
    assert "Traceback" not in err


# -- resuming -----------------------------------------------------------------------------------------------------

def test_a_changed_init_image_redoes_only_its_item(tiny_model, init_images, tmp_path):
    changing = write_image(tmp_path / "changing.png", 120, 90, 7)
    jobs = [job(init_images["a"], name="kept"), job(changing, index=2, name="changed")]
    settings = Settings(model=tiny_model, **CPU32)
    first = run_queue(jobs, tmp_path / "run", settings)
    kept = first.images["kept"].stat().st_mtime_ns
    again = run_queue(jobs, tmp_path / "run", settings)
    assert {s.name: s.skipped for s in again.stages} == {"encode": True, "vae-encode": True, "denoise": True,
                                                         "decode": True}
    write_image(changing, 120, 90, 8)  # same path, other pixels
    third = run_queue(jobs, tmp_path / "run", settings)
    assert third.made == {"vae-encode": 1, "denoise": 1, "decode": 1}
    assert first.images["kept"].stat().st_mtime_ns == kept
    # the earlier image of the changed job is kept; the new one takes the next name
    assert third.images["changed~2"].is_file() and first.images["changed"].is_file()
    assert max_diff(pixels(third.images["changed~2"]), pixels(first.images["changed"])) > 0


def test_text_to_image_items_are_keyed_and_recorded_as_before(tiny_model, init_images):
    """Image-to-image adds nothing to a text-to-image item: its keys, its seed slot and its manifest entry are
    those of a queue without init images, so run folders made before resume."""
    from pixart_lowvram.items import assign_keys, digest, expand, KEY_FORMAT
    from pixart_lowvram.models import resolve_model

    info = resolve_model(tiny_model)
    text = Job(index=1, prompt="a cat", seed=3)
    items, _ = expand([text, job(init_images["a"], index=2)], info.defaults, {})
    assign_keys(items, info, torch.float32)
    item = items[0]
    assert item.latent_key == digest("latent", KEY_FORMAT, info.identity["transformer"], info.identity["scheduler"],
                                     "torch.float32", item.prompt_key, item.negative_key, 256, 256, 20, 4.5, 3,
                                     "dpm-solver")
    assert not {"init_image", "strength", "init_key"} & set(item.to_json())
    assert items[1].to_json()["init_key"] == items[1].init_key != ""
    drawn, _ = expand([Job(index=1, prompt="a cat")], info.defaults, {})
    spec = dict(prompt="a cat", negative_prompt="", width=None, height=None, seed=None, cfg=4.5, steps=20, count=1,
                name=None, sampler="dpm-solver")
    assert drawn[0].seed_slot == f"{digest(spec)}-0"


# -- other folders, strips, memory ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["vae-3-blocks", "bins-vae-5-blocks"])
def test_folders_of_other_configs_make_their_recipes_image_whole_and_in_strips(case, init_images, tmp_path,
                                                                                monkeypatch):
    """VAEs of other scale factors (4 without resolution bins, 16 with), written by diffusers' save_pretrained; the
    init image encoded whole, and in strips as a small --vram-budget plans it."""
    transformer, vae, (w, h) = {"vae-3-blocks": ({}, small_vae(3), (64, 48)),
                                "bins-vae-5-blocks": ({"sample_size": 32}, small_vae(5), (64, 64))}[case]
    folder = save_folder(tmp_path / "model", transformer=transformer, vae=vae)
    jobs = [job(init_images["b"], width=w, height=h, steps=3, strength=0.7)]
    whole = run_queue(jobs, tmp_path / "whole", Settings(model=folder, **CPU32))
    expected = reference_img2img(diffusers.PixArtAlphaPipeline.from_pretrained(folder), init_image=init_images["b"],
                                 prompt="a pirate ship", width=w, height=h, seed=5, strength=0.7, steps=3)
    assert expected.shape == (h, w, 3) and expected.std() > 2
    assert max_diff(pixels(whole.images[whole.items[0].id]), expected) <= 1

    made = []
    real_init = StripEncoder.__init__
    monkeypatch.setattr(StripEncoder, "__init__", lambda self, *a, **k: (real_init(self, *a, **k), made.append(self))[0])
    override_plan(monkeypatch, **{"vae-encode": StagePlan("vae-encode", "strips", estimate=0, room=3_000)})
    strips = run_queue(jobs, tmp_path / "strips", Settings(model=folder, **CPU32))
    assert made and made[0].strips_used > 0
    assert max_diff(pixels(strips.images[strips.items[0].id]), expected) <= 1


# a folder whose own scheduler is another class (Euler scales its starting noise, Heun takes two model calls a
# step: order 2), or whose VAE has another scaling_factor and a shift_factor the reference pipelines ignore
OWN = {"euler-scheduler": dict(scheduler="EulerDiscreteScheduler"),
       "heun-scheduler": dict(scheduler="HeunDiscreteScheduler"),
       "vae-scaling": dict(vae={**small_vae(4), "scaling_factor": 0.3611, "shift_factor": 0.1159,
                                "force_upcast": False})}


@pytest.mark.parametrize("case", OWN)
def test_a_folders_own_scheduler_and_vae_scaling_make_the_references_images(case, init_images, tmp_path):
    """Text-to-image against the reference pipeline, image-to-image against the img2img recipe, on the folder's
    own components as diffusers' save_pretrained wrote them."""
    given = OWN[case]
    scheduler = getattr(diffusers, given["scheduler"]).from_config(scheduler_config()) if "scheduler" in given else None
    folder = save_folder(tmp_path / "model", scheduler=scheduler, vae=given.get("vae", small_vae(4)))
    prompt = dict(prompt="a pirate ship", negative_prompt="blurry", seed=5)
    jobs = [Job(index=1, steps=3, width=64, height=48, **prompt),
            Job(index=2, steps=3, width=64, height=48, init_image=init_images["a"], strength=0.7, **prompt)]
    result = run_queue(jobs, tmp_path / "run", Settings(model=folder, **CPU32))
    pipe = diffusers.PixArtAlphaPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == given.get("scheduler", "DDIMScheduler")
    text = reference_image(pipe, **prompt, width=64, height=48, steps=3, use_resolution_binning=False)
    image = reference_img2img(pipe, init_image=init_images["a"], prompt="a pirate ship", negative_prompt="blurry",
                              width=64, height=48, seed=5, strength=0.7, steps=3)
    ours = [pixels(result.images[item.id]) for item in result.items]
    assert text.std() > 2 and image.std() > 2
    assert max_diff(ours[0], text) <= 1 and max_diff(ours[1], image) <= 1


def test_an_encoder_the_strips_cannot_walk_encodes_on_the_cpu(tiny_model, init_images, reference_pipeline,
                                                               tmp_path, monkeypatch):
    from pixart_lowvram.reporting import Reporter

    class Told(Reporter):
        said: list[str] = []

        def info(self, message: str) -> None:
            self.said.append(message)

    monkeypatch.setattr(vae_encode, "supports_encoder", lambda vae: False)
    override_plan(monkeypatch, **{"vae-encode": StagePlan("vae-encode", "strips", estimate=0, room=3_000)})
    result = run_queue([job(init_images["a"], steps=2)], tmp_path / "run", Settings(model=tiny_model, **CPU32),
                       reporter=Told())
    assert "this VAE's encoder cannot run in strips: encoding the init images on the CPU" in Told.said
    expected = reference_img2img(with_sampler(reference_pipeline, None), init_image=init_images["a"],
                                 prompt="a pirate ship", width=256, height=256, seed=5, strength=0.8, steps=2)
    assert max_diff(pixels(result.images[result.items[0].id]), expected) <= 1


def test_one_component_in_memory_at_a_time_the_vae_encoder_too(tiny_model, init_images, tmp_path, monkeypatch):
    import gc
    import weakref

    alive: list[tuple[str, weakref.ref]] = []
    events = []

    def tracking(module, name, label):
        real = getattr(module, name)

        def load(*args, **kwargs):
            gc.collect()
            events.append((label, [n for n, ref in alive if ref() is not None]))
            model = real(*args, **kwargs)
            alive.append((label, weakref.ref(model)))
            return model

        monkeypatch.setattr(module, name, load)

    tracking(encode, "load_text_encoder", "T5")
    tracking(vae_encode, "load_vae", "VAE encoder")
    tracking(denoise, "load_transformer", "DiT")
    tracking(decode, "load_vae", "VAE decoder")
    run_queue([job(init_images["a"], steps=2)], tmp_path / "run", Settings(model=tiny_model, **CPU32))
    assert [label for label, _ in events] == ["T5", "VAE encoder", "DiT", "VAE decoder"]
    assert all(still_alive == [] for _, still_alive in events), events


def test_an_overflowing_vae_encoder_is_named_and_upcast_redoes_only_it(tiny_model, init_images, tmp_path):
    """The encoder's first convolution scaled by 1e6: its float16 output overflows, while in float32 the
    GroupNorm after it takes the scale away again. vae-encode names the VAE; the text-to-image image is made;
    --upcast vae redoes only the image-to-image one."""
    import shutil

    from diffusers import AutoencoderKL

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e6)
        vae.encoder.conv_in.bias.mul_(1e6)
    shutil.rmtree(folder / "vae")
    vae.save_pretrained(folder / "vae")
    jobs = [job(init_images["a"], steps=2, width=128, height=128, name="wild"),
            Job(index=2, prompt="a calm sea", seed=1, steps=2, width=128, height=128, name="calm")]
    half = dict(model=str(folder), device="cpu", dtype="float16", embed_cache=None)
    result = run_queue(jobs, tmp_path / "run", Settings(**half))
    assert [f.to_json() for f in result.failures] == [{"stage": "vae-encode", "component": "vae",
                                                       "dtype": "float16", "items": ("wild",)}]
    assert result.images["calm"].is_file() and not result.images["wild"].exists()
    again = run_queue(jobs, tmp_path / "run", Settings(**half, upcast=("vae",)))
    assert not again.failures and again.made == {"vae-encode": 1, "denoise": 1, "decode": 1}
    assert again.images["wild"].is_file()


def test_an_init_image_and_a_lora_together_make_the_recipes_image_with_peft(tiny_model, init_images, tmp_path):
    """A job with both: the LoRA merged into the transformer (lora.py), the init image encoded and noised; equal
    to the img2img recipe on the plain pipeline whose transformer peft wraps with the same adapter, unmerged."""
    from peft import PeftModel

    from pixart_lowvram.jobs import LoraSpec
    from test_lora import make_adapter

    adapter = make_adapter(tiny_model, tmp_path / "ink", r=4, alpha=6)
    result = run_queue([job(init_images["a"], steps=3, strength=0.7, lora=(LoraSpec(str(adapter), 0.7),))],
                       tmp_path / "run", Settings(model=tiny_model, **CPU32))
    pipe = diffusers.PixArtAlphaPipeline.from_pretrained(tiny_model)
    wrapped = PeftModel.from_pretrained(pipe.transformer, adapter)
    from peft.tuners.lora import LoraLayer

    for module in wrapped.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", 0.7)
    expected = reference_img2img(pipe, init_image=init_images["a"], prompt="a pirate ship", width=256, height=256,
                                 seed=5, strength=0.7, steps=3)
    without = reference_img2img(diffusers.PixArtAlphaPipeline.from_pretrained(tiny_model), init_image=init_images["a"],
                                prompt="a pirate ship", width=256, height=256, seed=5, strength=0.7, steps=3)
    ours = pixels(result.images[result.items[0].id])
    assert max_diff(ours, expected) <= 1 < max_diff(ours, without)


def test_two_processes_make_the_one_process_images(tiny_model, init_images, tmp_path):
    """Over several processes (CPU ranks here) each init image is encoded by one rank, whichever ranks' images need
    it, before any rank denoises, and every image is the one-process run's."""
    queue = tmp_path / "queue.json"
    queue.write_text(json.dumps({"defaults": {"steps": 2, "width": 128, "height": 128, "strength": 0.6}, "jobs": [
        {"name": "a", "prompt": "a red kite", "seed": 1, "init_image": init_images["a"], "count": 2},
        {"name": "b", "prompt": "a blue boat", "seed": 2, "init_image": init_images["b"], "strength": 1.0},
        {"name": "text", "prompt": "a green field", "seed": 3}]}))
    from pixart_lowvram.jobs import load_queue

    one = run_queue(load_queue(queue), tmp_path / "one", Settings(model=tiny_model, device="cpu", dtype="float32"))
    run = tmp_path / "two"
    assert main(["run", str(queue), "--model", tiny_model, "--out", str(run), "--gpus", "cpu:2", "-q"]) == 0
    for item in one.items:
        assert max_diff(pixels(run / "images" / f"{item.id}.png"), pixels(one.images[item.id])) <= 1, item.id
    data = json.loads((run / "run.json").read_text())
    stages = {s["name"]: s for s in data["stages"]}
    assert list(stages) == ["encode", "vae-encode", "denoise", "decode"]
    assert stages["vae-encode"]["items"] == 2 and stages["denoise"]["items"] == 4


def wild_images(folder) -> dict[str, str]:
    """One picture saved as other tools save pictures: modes PIL converts (grey, palette with transparency, alpha,
    16-bit grey, CMYK JPEG), an EXIF-rotated JPEG, WebP, an animated GIF, a single pixel."""
    base = Image.open(write_image(folder / "base.png", 120, 90, 4))
    made = {"grey.png": base.convert("L"), "palette.png": base.convert("P"), "alpha.png": base.convert("RGBA"),
            "grey16.png": Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257),
            "cmyk.jpg": base.convert("CMYK"), "photo.webp": base, "dot.png": Image.new("RGB", (1, 1), (200, 30, 40))}
    made["alpha.png"].putalpha(Image.linear_gradient("L").resize(base.size))
    for name, image in made.items():
        image.save(folder / name, **({"transparency": 0} if name == "palette.png" else {}))
    exif = base.getexif()
    exif[0x0112] = 6  # orientation: rotated 90 degrees, as a phone saves a portrait photo
    base.save(folder / "rotated.jpg", exif=exif.tobytes())
    frames = [base.rotate(angle).convert("P") for angle in (180, 90, 0)]
    frames[0].save(folder / "moving.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {name: str(folder / name) for name in [*made, "rotated.jpg", "moving.gif"]}


def test_pictures_as_other_tools_save_them_are_read_as_diffusers_reads_them(tiny_model, reference_pipeline, tmp_path):
    """Each is encoded from what diffusers' load_image and VaeImageProcessor make of it (EXIF orientation applied,
    RGB, an animation's first frame), and the encodings differ: the picture, not a fallback, was read."""
    images = wild_images(tmp_path)
    jobs = [job(path, index=n, name=name.replace(".", "-"), steps=2) for n, (name, path) in
            enumerate(images.items(), start=1)]
    result = run_queue(jobs, tmp_path / "run", Settings(model=tiny_model, **CPU32))
    processor = VaeImageProcessor(vae_scale_factor=reference_pipeline.vae_scale_factor)
    seen = []
    for item, path in zip(result.items, images.values()):
        moments = latents_of(result, None, item.init_key)["moments"]
        with torch.inference_mode():
            pixels_in = processor.preprocess(load_image(path), height=256, width=256)
            expected = reference_pipeline.vae.encode(pixels_in).latent_dist.parameters[0]
        torch.testing.assert_close(moments, expected, rtol=0, atol=1e-5, msg=path)
        assert not any(torch.equal(moments, other) for other in seen), path
        seen.append(moments)
