"""The staged queue, end to end on the tiny model on the CPU: same images as the reference pipeline, one
component in memory at a time, resume, and what the PNGs carry."""
from __future__ import annotations

import gc
import json
import weakref

import pytest
from PIL import Image

from conftest import max_diff, pixels, reference_image
from pixart_lowvram import decode, denoise, encode
from pixart_lowvram.generate import Settings, run_queue
from pixart_lowvram.jobs import Job, jobs_from_options, parse_queue

CPU32 = dict(device="cpu", dtype="float32")


CASES = [
    dict(prompt="pirate ship trapped in a cosmic maelstrom nebula", seed=1152753, cfg=5.0, steps=4,
         width=256, height=256),
    dict(prompt="a red supercar", negative_prompt="blurry, low quality", seed=7, cfg=4.0, steps=3,
         width=256, height=192),  # non-square: the reference bins the size, then resizes back
    dict(prompt="Oppenheimer sits on the beach", seed=3, cfg=1.0, steps=2, width=192, height=256),  # no CFG
]


def test_images_equal_the_reference_pipeline(tiny_model, reference_pipeline, tmp_path):
    jobs = [Job(index=i + 1, **{k: v for k, v in case.items()}) for i, case in enumerate(CASES)]
    result = run_queue(jobs, tmp_path / "run", Settings(model=tiny_model, **CPU32))

    assert [s.name for s in result.stages] == ["encode", "denoise", "decode"]
    for item, case in zip(result.items, CASES):
        ours = pixels(result.images[item.id])
        assert ours.shape == (case["height"], case["width"], 3)
        expected = reference_image(reference_pipeline, **case)
        assert max_diff(ours, expected) <= 1, item.id


def test_same_image_at_any_batch_size(tiny_model, tmp_path):
    jobs = parse_queue('[defaults]\nsteps = 3\nwidth = 256\nheight = 256\n'
                       '[[jobs]]\nprompt = "a cat"\nseed = 1\ncount = 3\n'
                       '[[jobs]]\nprompt = "a dog"\nseed = 5\n', "toml")
    one = run_queue(jobs, tmp_path / "b1", Settings(model=tiny_model, denoise_batch=1, **CPU32))
    four = run_queue(jobs, tmp_path / "b4", Settings(model=tiny_model, denoise_batch=4, encode_batch=4, **CPU32))
    for item in one.items:
        assert max_diff(pixels(one.images[item.id]), pixels(four.images[item.id])) <= 1


def test_one_component_in_memory_at_a_time(tiny_model, tmp_path, monkeypatch):
    """When a stage loads its component, nothing of the previous stage's is alive any more."""
    alive: list[tuple[str, weakref.ref]] = []
    events = []

    def tracking(module, name):
        real = getattr(module, name)

        def load(*args, **kwargs):
            gc.collect()
            events.append((name, [n for n, ref in alive if ref() is not None]))
            model = real(*args, **kwargs)
            alive.append((name, weakref.ref(model)))
            return model

        monkeypatch.setattr(module, name, load)

    tracking(encode, "load_text_encoder")
    tracking(denoise, "load_transformer")
    tracking(decode, "load_vae")
    jobs = jobs_from_options("a lighthouse", steps=2, seed=1)
    run_queue(jobs, tmp_path / "run", Settings(model=tiny_model, **CPU32))

    assert [name for name, _ in events] == ["load_text_encoder", "load_transformer", "load_vae"]
    assert all(still_alive == [] for _, still_alive in events), events
    gc.collect()
    assert [n for n, ref in alive if ref() is not None] == []


def test_equal_prompts_are_encoded_once(tiny_model, tmp_path):
    jobs = parse_queue("\n".join(['{"defaults": {"steps": 2}}'] + ['{"prompt": "supercar", "cfg": 4}'] * 3),
                       "jsonl")
    result = run_queue(jobs, tmp_path / "run", Settings(model=tiny_model, **CPU32))
    assert result.made == {"encode": 2, "denoise": 3, "decode": 3}  # "supercar" and the empty negative prompt
    seeds = [it.seed for it in result.items]
    assert len(set(seeds)) == 3, "identical jobs without a seed get different random seeds"


def test_running_again_resumes_and_skips_what_is_finished(tiny_model, tmp_path):
    jobs = parse_queue('[defaults]\nsteps = 2\n[[jobs]]\nprompt = "a"\nseed = 1\n'
                       '[[jobs]]\nprompt = "b"\n[[jobs]]\nprompt = "c"\nseed = 3\nname = "cee"\n', "toml")
    settings = Settings(model=tiny_model, **CPU32)
    first = run_queue(jobs, tmp_path / "run", settings)
    before = {i: pixels(p) for i, p in first.images.items()}

    again = run_queue(jobs, tmp_path / "run", settings)
    assert again.made == {} and all(s.skipped for s in again.stages)
    assert [it.seed for it in again.items] == [it.seed for it in first.items], "a drawn seed is reused"

    # A lost image is decoded again from its latents; nothing is encoded or denoised.
    again.images["cee"].unlink()
    third = run_queue(jobs, tmp_path / "run", settings)
    assert third.made == {"decode": 1}
    assert max_diff(pixels(third.images["cee"]), before["cee"]) == 0

    # A truncated latent file is not trusted: redone, and the image with it.
    item = third.items[0]
    latent = tmp_path / "run" / "latents" / f"{item.latent_key}.safetensors"
    latent.write_bytes(latent.read_bytes()[:100])
    third.images[item.id].unlink()
    fourth = run_queue(jobs, tmp_path / "run", settings)
    assert fourth.made == {"denoise": 1, "decode": 1}
    assert max_diff(pixels(fourth.images[item.id]), before[item.id]) == 0

    forced = run_queue(jobs, tmp_path / "run", Settings(model=tiny_model, force=True, **CPU32))
    assert forced.made == {"encode": 4, "denoise": 3, "decode": 3}


def test_a_drawn_seed_remakes_the_same_image_with_the_reference(tiny_model, reference_pipeline, tmp_path):
    result = run_queue(jobs_from_options("a quiet harbour", steps=2), tmp_path / "run",
                       Settings(model=tiny_model, **CPU32))
    item = result.items[0]
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["items"][0]["seed"] == item.seed and manifest["items"][0]["seed_was_drawn"]
    expected = reference_image(reference_pipeline, prompt="a quiet harbour", width=256, height=256, steps=2,
                               seed=item.seed)
    assert max_diff(pixels(result.images[item.id]), expected) <= 1


def test_png_carries_its_generation_parameters(tiny_model, tmp_path):
    jobs = jobs_from_options("a pirate ship", negative_prompt="fog", seed=42, cfg=5, steps=2, width=256,
                             height=192, name="ship")
    result = run_queue(jobs, tmp_path / "run", Settings(model=tiny_model, **CPU32))
    with Image.open(result.images["ship"]) as im:
        parameters, job = im.text["parameters"], json.loads(im.text["pixart_lowvram"])
    lines = parameters.split("\n")
    assert lines[0] == "a pirate ship"
    assert lines[1] == "Negative prompt: fog"
    assert lines[2].startswith("Steps: 2, Sampler: DPM++ 2M, CFG scale: 5, Seed: 42, Size: 256x192, ")
    assert "Model: tiny" in lines[2]
    assert job["prompt"] == "a pirate ship" and job["seed"] == 42 and job["dtype"] == "float32"


def test_manifest_records_stages_and_items(tiny_model, tmp_path):
    result = run_queue(jobs_from_options("x", seed=1, steps=2, count=2), tmp_path / "run",
                       Settings(model=tiny_model, **CPU32))
    manifest = json.loads((result.folder / "run.json").read_text())
    assert [s["name"] for s in manifest["stages"]] == ["encode", "denoise", "decode"]
    assert all(s["seconds"] > 0 and s["rss_peak"] > 0 for s in manifest["stages"])
    assert [i["seed"] for i in manifest["items"]] == [1, 2]
    assert all(i["done"] for i in manifest["items"])
    assert manifest["model"]["identity"]["transformer"]
    assert set(manifest["versions"]) >= {"torch", "diffusers", "transformers"}


@pytest.mark.parametrize("option, message", [(dict(device="tpu"), "--device"), (dict(dtype="int8"), "--dtype")])
def test_bad_settings_fail_before_any_model_loads(tiny_model, tmp_path, option, message):
    from pixart_lowvram.errors import UsageError

    with pytest.raises(UsageError, match=message):
        run_queue(jobs_from_options("x"), tmp_path / "run", Settings(model=tiny_model, **{**CPU32, **option}))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("how", ["stop between images", "Ctrl-C inside a step"])
def test_an_interrupted_streamed_denoise_closes_its_streamer_and_keeps_what_it_finished(tiny_model, tmp_path,
                                                                                       monkeypatch, how):
    """Whatever stops a streamed denoise, its streamer is closed (I/O threads ended, hooks removed, pinned
    buffers dropped) and the latents finished before the stop are kept for the rerun."""
    import threading

    from pixart_lowvram import generate, streaming
    from pixart_lowvram.errors import Interrupted
    from pixart_lowvram.placement import Plan, StagePlan
    from pixart_lowvram.reporting import Bar, Reporter

    real_plan = generate.plan_run
    monkeypatch.setattr(generate, "plan_run", lambda *a, **k: (lambda plan: Plan(plan.budget, plan.context, {
        **plan.stages, "denoise": StagePlan("denoise", "streamed", estimate=0, ahead=1, resident_blocks=0)}))(
        real_plan(*a, **k)))
    closed, streamers = [], []
    real_init, real_close = streaming.BlockStreamer.__init__, streaming.BlockStreamer.close
    monkeypatch.setattr(streaming.BlockStreamer, "__init__",
                        lambda self, *a, **k: (real_init(self, *a, **k), streamers.append(self))[0])
    monkeypatch.setattr(streaming.BlockStreamer, "close", lambda self: (real_close(self), closed.append(self))[0])
    stop = threading.Event()

    class StepBar(Bar):
        def __init__(self):
            self.steps = 0

        def update(self, n: int = 1) -> None:
            self.steps += 1
            if how == "stop between images" and self.steps == 3:  # the first image's last step
                stop.set()
            if how == "Ctrl-C inside a step" and self.steps == 2:
                raise KeyboardInterrupt

    class Stopper(Reporter):
        def bar(self, desc, total, unit="it", transient=False):
            return StepBar() if desc == "denoise" else Bar()

    jobs = [Job(index=1, prompt="a lighthouse", seed=1, steps=3, width=128, height=128),
            Job(index=2, prompt="a fox", seed=2, steps=3, width=128, height=128)]
    settings = Settings(model=tiny_model, embed_cache=None, **CPU32)
    with pytest.raises(Interrupted):
        run_queue(jobs, tmp_path / "run", settings, Stopper(), stop=stop)
    assert streamers and closed == streamers, "the streamer was left open"
    assert not [t for t in threading.enumerate() if t.name.startswith("weights-")], "its I/O threads live on"
    assert all(not unit._forward_pre_hooks and not unit._forward_hooks for s in streamers for unit in s.units)
    kept = len(list((tmp_path / "run" / "latents").glob("*.safetensors")))
    assert kept == (1 if how == "stop between images" else 0)
    result = run_queue(jobs, tmp_path / "run", settings)  # the rerun makes what is left
    assert result.made["denoise"] == 2 - kept and all(p.is_file() for p in result.images.values())
