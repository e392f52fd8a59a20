"""Duplicate jobs: images whose latents have one key (identical jobs with a seed, copies whose seeds overlap, one
job under two names) are denoised once and decoded once, and each name gets its own PNG, in one process and over
several; a rerun finds them all made."""
from __future__ import annotations

import json
import threading

import pytest
from PIL import Image

from conftest import max_diff, pixels
from pixart_lowvram import decode, denoise, launch
from pixart_lowvram.generate import Settings, plan_team, run_queue
from pixart_lowvram.jobs import parse_queue
from pixart_lowvram.reporting import Reporter

CPU32 = dict(device="cpu", dtype="float32")
STEPS = 2

# "a cat" seeds 1, 2, 3 and 2, 3 again: three latents for five images; "a dog" under two names: one latent.
HEADER = f"""\
[defaults]
steps = {STEPS}
width = 128
height = 128
"""
CATS = """
[[jobs]]
prompt = "a cat"
seed = 1
count = 3
"""
DOG = """
[[jobs]]
name = "dog"
prompt = "a dog"
seed = 5
"""
QUEUE = HEADER + CATS + """
[[jobs]]
prompt = "a cat"
seed = 2
count = 2
""" + DOG + """
[[jobs]]
name = "same-dog"
prompt = "a dog"
seed = 5
"""
IMAGES = 7
LATENTS = 4
DISTINCT = HEADER + CATS + DOG  # the same latents, each once


def jobs(text: str = QUEUE) -> list:
    return parse_queue(text, "toml")


@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    """How many images the transformer's calls denoised (a call with guidance takes each image twice) and how many
    times the VAE decoded."""
    counts = {"denoised": 0, "decoded": 0}
    real_transformer, real_vae = denoise.load_transformer, decode.load_vae

    def load_transformer(*args, **kwargs):
        model = real_transformer(*args, **kwargs)
        model.register_forward_pre_hook(lambda module, args: counts.__setitem__(
            "denoised", counts["denoised"] + args[0].shape[0] / 2 / STEPS))
        return model

    def load_vae(*args, **kwargs):
        vae = real_vae(*args, **kwargs)
        real_decode = vae.decode

        def counting(*a, **k):
            counts["decoded"] += 1
            return real_decode(*a, **k)

        vae.decode = counting
        return vae

    monkeypatch.setattr(denoise, "load_transformer", load_transformer)
    monkeypatch.setattr(decode, "load_vae", load_vae)
    return counts


def png_meta(path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text["pixart_lowvram"])


def test_images_of_one_latent_are_denoised_and_decoded_once_and_each_name_is_written(tiny_model, tmp_path,
                                                                                     counted):
    settings = Settings(model=tiny_model, embed_cache=None, **CPU32)
    result = run_queue(jobs(), tmp_path / "run", settings)

    ids = [it.id for it in result.items]
    assert ids == ["001-a-cat-1", "001-a-cat-2", "001-a-cat-3", "002-a-cat-1", "002-a-cat-2", "dog", "same-dog"]
    assert len({it.latent_key for it in result.items}) == LATENTS
    assert counted == {"denoised": LATENTS, "decoded": LATENTS}
    assert result.made == {"encode": 3, "denoise": LATENTS, "decode": IMAGES}  # "a cat", "a dog" and ""
    assert all(path.is_file() for path in result.images.values())
    assert len(list((tmp_path / "run" / "latents").glob("*.safetensors"))) == LATENTS

    # Each name's PNG and manifest entry tell its own job; images of one key are the same pixels, and the same as a
    # queue without the duplicates makes.
    alone = run_queue(jobs(DISTINCT), tmp_path / "alone", settings)
    by_id = {it.id: it for it in result.items}
    entries = {e["id"]: e for e in json.loads((tmp_path / "run" / "run.json").read_text())["items"]}
    for item_id, twin in [("001-a-cat-1", "001-a-cat-1"), ("002-a-cat-1", "001-a-cat-2"),
                          ("002-a-cat-2", "001-a-cat-3"), ("dog", "dog"), ("same-dog", "dog")]:
        item, path = by_id[item_id], result.images[item_id]
        assert max_diff(pixels(path), pixels(alone.images[twin])) == 0, item_id
        meta = png_meta(path)
        assert (meta["id"], meta["name"], meta["job_index"], meta["copy"]) == (
            item.id, item.name, item.job_index, item.copy)
        assert meta["key"] == by_id[twin].image_key == alone.items[[i.id for i in alone.items].index(twin)].image_key
        entry = entries[item_id]
        assert entry["image"] == f"images/{item_id}.png" and entry["done"]
        assert entry["latents"] == entries[twin]["latents"]

    # A rerun finds everything made; a lost PNG of a shared latent is decoded again, alone; a lost shared latent
    # (and its images) is denoised once again.
    counted.update(denoised=0, decoded=0)
    again = run_queue(jobs(), tmp_path / "run", settings)
    assert again.made == {} and all(s.skipped for s in again.stages)
    before = pixels(result.images["same-dog"])
    result.images["same-dog"].unlink()
    again = run_queue(jobs(), tmp_path / "run", settings)
    assert again.made == {"decode": 1} and counted == {"denoised": 0, "decoded": 1}
    assert max_diff(pixels(result.images["same-dog"]), before) == 0
    (tmp_path / "run" / entries["002-a-cat-1"]["latents"]).unlink()
    for item_id in ("001-a-cat-2", "002-a-cat-1"):
        result.images[item_id].unlink()
    again = run_queue(jobs(), tmp_path / "run", settings)
    assert again.made == {"denoise": 1, "decode": 2} and counted == {"denoised": 1, "decoded": 2}
    assert all(path.is_file() for path in again.images.values())


def test_the_division_gives_each_latent_to_one_rank_with_every_image_of_it(tiny_model):
    team = plan_team(jobs(), ["cpu", "cpu"], Settings(model=tiny_model, **CPU32))
    todo = [share.todo for share in team.shares]
    latents = [it.latent_key for t in todo for it in t.latents]
    assert len(latents) == len(set(latents)) == LATENTS
    assert sorted(it.id for t in todo for it in t.images) == sorted(it.id for it in
                                                                    jobs_items(tiny_model))
    for t in todo:
        assert {it.latent_key for it in t.images} == {it.latent_key for it in t.latents}
    assert f"{LATENTS} ({' + '.join(str(len(t.latents)) for t in todo)}) latent(s) to denoise" in team.lines[-1]


def jobs_items(tiny_model) -> list:
    from pixart_lowvram.items import expand  # noqa: PLC0415
    from pixart_lowvram.models import resolve_model  # noqa: PLC0415

    return expand(jobs(), resolve_model(tiny_model, hash_weights=False).defaults, {})[0]


def test_over_two_processes_each_latent_is_made_by_one_rank(tiny_model, tmp_path):
    run = tmp_path / "run"
    one = run_queue(jobs(), tmp_path / "one", Settings(model=tiny_model, **CPU32))
    result = launch.run(jobs(), run, Settings(model=tiny_model, embed_cache=None, **CPU32), Reporter(),
                        threading.Event(), gpus="cpu:2")
    assert result.made == {"encode": 3, "denoise": LATENTS, "decode": IMAGES}
    assert sum(r.made.get("denoise", 0) for r in result.ranks) == LATENTS  # no latent made twice
    entries = json.loads((run / "run.json").read_text())["items"]
    rank_of: dict[str, set[int]] = {}
    for e in entries:
        rank_of.setdefault(e["latents"], set()).add(e["rank"])
    assert len(rank_of) == LATENTS and all(len(ranks) == 1 for ranks in rank_of.values()), rank_of
    assert all(e["done"] for e in entries)
    for item in one.items:
        assert max_diff(pixels(result.images[item.id]), pixels(one.images[item.id])) <= 1, item.id
    again = run_queue(jobs(), run, Settings(model=tiny_model, **CPU32))
    assert again.made == {}


def test_a_latent_that_overflows_loses_every_image_of_it(tiny_model, tmp_path):
    """Two names for one job whose guidance overflows float16: both are named, neither is written, and decode
    goes on with the rest."""
    queue = parse_queue(
        '[defaults]\nsteps = 3\nwidth = 128\nheight = 128\n'
        '[[jobs]]\nname = "calm"\nprompt = "a lighthouse at dusk"\nseed = 1\n'
        '[[jobs]]\nname = "wild"\nprompt = "a fox in the snow"\nseed = 2\ncfg = 1000\n'
        '[[jobs]]\nname = "wild-too"\nprompt = "a fox in the snow"\nseed = 2\ncfg = 1000\n', "toml")
    result = run_queue(queue, tmp_path / "run", Settings(model=tiny_model, device="cpu", dtype="float16",
                                                         embed_cache=None))
    assert [(f.stage, f.items) for f in result.failures] == [("denoise", ("wild", "wild-too"))]
    assert result.made == {"encode": 3, "denoise": 1, "decode": 1}
    assert result.images["calm"].is_file()
    assert not result.images["wild"].exists() and not result.images["wild-too"].exists()
