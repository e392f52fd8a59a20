"""Prompt embeddings shared across runs: a queue of known prompts never loads T5, and a cached embedding is used
only when it was made by the same model, dtype and text, and is whole."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pixart_lowvram import encode, generate
from pixart_lowvram.generate import Settings, default_cache_dir, run_queue
from pixart_lowvram.jobs import parse_queue
from pixart_lowvram.models import index_safetensors, resolve_model
from pixart_lowvram.random_model import make_random_model
from pixart_lowvram.run import read_artifact

CPU32 = dict(device="cpu", dtype="float32")
QUEUE = ('[defaults]\nsteps = 2\nwidth = 256\nheight = 256\n'
         '[[jobs]]\nprompt = "a red cat"\nseed = 1\n'
         '[[jobs]]\nprompt = "a blue dog"\nnegative_prompt = "blurry"\nseed = 2\ncfg = 5\n')
TEXTS = 4  # "a red cat", "", "a blue dog", "blurry"
EMBED_SHAPE = {"embeds": (120, 32), "mask": (120,)}  # the tiny model's T5: 120 tokens of 32


def jobs():
    return parse_queue(QUEUE, "toml")


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def same_images(a, b) -> bool:
    return a.images.keys() == b.images.keys() and all(
        np.array_equal(pixels(a.images[k]), pixels(b.images[k])) for k in a.images)


def cache_files(path=None) -> list:
    folder = path or default_cache_dir() / "embeds"
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def no_text_encoder(monkeypatch):
    """Any attempt to load T5 (resident or streamed) fails the test."""
    def fail(*args, **kwargs):
        raise AssertionError("the text encoder was loaded")

    monkeypatch.setattr(encode, "load_text_encoder", fail)
    monkeypatch.setattr(encode, "load_text_encoder_streamed", fail)


def encoded_texts(monkeypatch) -> list[str]:
    """Records the texts each encode stage is given."""
    seen: list[str] = []
    real = generate.encode_texts

    def recording(info, texts, **kwargs):
        seen.extend(texts.values())
        return real(info, texts, **kwargs)

    monkeypatch.setattr(generate, "encode_texts", recording)
    return seen


def test_a_second_run_takes_every_embedding_from_the_cache(tiny_model, tmp_path, monkeypatch):
    first = run_queue(jobs(), tmp_path / "first", Settings(model=tiny_model, **CPU32))
    assert first.made["encode"] == TEXTS and first.from_cache == 0
    assert len(cache_files()) == TEXTS

    no_text_encoder(monkeypatch)
    second = run_queue(jobs(), tmp_path / "second", Settings(model=tiny_model, **CPU32))
    assert "encode" not in second.made and second.from_cache == TEXTS
    assert second.made == {"denoise": 2, "decode": 2}
    assert same_images(first, second)
    for item in first.items:  # the run folder holds the same embeddings, keyed as an encoded one would be
        for key in (item.prompt_key, item.negative_key):
            ours = read_artifact(tmp_path / "second" / "embeds" / f"{key}.safetensors", key, EMBED_SHAPE)
            theirs = load_file(tmp_path / "first" / "embeds" / f"{key}.safetensors")
            assert ours is not None and all(torch.equal(ours[n], theirs[n]) for n in theirs)


def test_a_damaged_cache_file_is_encoded_again(tiny_model, tmp_path, monkeypatch):
    first = run_queue(jobs(), tmp_path / "first", Settings(model=tiny_model, **CPU32))
    key = first.items[0].prompt_key  # "a red cat"
    cached = default_cache_dir() / "embeds" / f"{key}.safetensors"
    cached.write_bytes(cached.read_bytes()[:200])

    texts = encoded_texts(monkeypatch)
    second = run_queue(jobs(), tmp_path / "second", Settings(model=tiny_model, **CPU32))
    assert texts == ["a red cat"]
    assert second.made["encode"] == 1 and second.from_cache == TEXTS - 1
    assert same_images(first, second)
    assert read_artifact(cached, key, EMBED_SHAPE) is not None, "the encode repaired the cache"


@pytest.fixture(scope="module")
def filled_cache(tiny_model, tmp_path_factory):
    """A cache folder filled by one run of the queue, and that run's result."""
    folder = tmp_path_factory.mktemp("filled")
    result = run_queue(jobs(), folder / "run", Settings(model=tiny_model, embed_cache=str(folder / "cache"), **CPU32))
    assert result.made["encode"] == TEXTS and len(cache_files(folder / "cache")) == TEXTS
    return folder / "cache", result


@pytest.fixture
def cache(filled_cache, tmp_path):
    """A copy of the filled cache of this test's own."""
    shutil.copytree(filled_cache[0], tmp_path / "cache")
    return tmp_path / "cache"


def test_a_cache_folder_of_ones_own(tiny_model, filled_cache, cache, tmp_path, monkeypatch):
    no_text_encoder(monkeypatch)
    result = run_queue(jobs(), tmp_path / "run", Settings(model=tiny_model, embed_cache=str(cache), **CPU32))
    assert result.from_cache == TEXTS and "encode" not in result.made
    assert same_images(result, filled_cache[1])
    assert not default_cache_dir().exists(), "the default cache is not touched"


def test_no_embed_cache_shares_nothing(tiny_model, tmp_path):
    first = run_queue(jobs(), tmp_path / "a", Settings(model=tiny_model, **CPU32))
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache_files()}
    assert len(before) == TEXTS
    off = run_queue(jobs(), tmp_path / "b", Settings(model=tiny_model, embed_cache=None, **CPU32))
    assert off.made["encode"] == TEXTS and off.from_cache == 0, "--no-embed-cache reads nothing"
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache_files()} == before, "... and writes nothing"
    assert same_images(first, off)


def test_another_dtype_does_not_reuse_the_cache(tiny_model, cache, tmp_path):
    other = run_queue(jobs(), tmp_path / "bf16", Settings(model=tiny_model, embed_cache=str(cache), device="cpu",
                                                          dtype="bfloat16"))
    assert other.made["encode"] == TEXTS and other.from_cache == 0
    assert len(cache_files(cache)) == 2 * TEXTS


def test_another_model_does_not_reuse_the_cache(filled_cache, cache, tmp_path):
    other_model = make_random_model(tmp_path / "other", "tiny", seed=1)
    other = run_queue(jobs(), tmp_path / "b", Settings(model=str(other_model), embed_cache=str(cache), **CPU32))
    assert other.made["encode"] == TEXTS and other.from_cache == 0
    assert not same_images(filled_cache[1], other)


def changed_copy(tiny_model, tmp_path, tensor: str):
    """The tiny model with one byte of one text-encoder weight changed (an exponent bit: a real change)."""
    copy = tmp_path / "changed"
    shutil.copytree(tiny_model, copy)
    weights = copy / "text_encoder" / "model.safetensors"
    stored = index_safetensors([weights])[tensor]
    data = bytearray(weights.read_bytes())
    data[stored.start + 3] ^= 0x01
    weights.write_bytes(bytes(data))
    return copy


@pytest.mark.parametrize("tensor", [
    "encoder.block.0.layer.0.SelfAttention.q.weight",  # near the start of the file
    "encoder.block.1.layer.1.DenseReluDense.wo.weight",  # in the middle of the file
])
def test_a_changed_weight_does_not_reuse_the_cache(tiny_model, cache, tmp_path, monkeypatch, tensor):
    changed = changed_copy(tiny_model, tmp_path, tensor)
    assert resolve_model(str(changed)).identity["text_encoder"] != resolve_model(tiny_model).identity["text_encoder"]
    texts = encoded_texts(monkeypatch)
    other = run_queue(jobs(), tmp_path / "b", Settings(model=str(changed), embed_cache=str(cache), **CPU32))
    assert other.from_cache == 0 and sorted(texts) == sorted(["a red cat", "", "a blue dog", "blurry"])
