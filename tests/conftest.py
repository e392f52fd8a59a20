"""Shared fixtures: one tiny random-weight PixArt model per test session, built in-process (no network)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

# No test reads or writes the user's cache (shared prompt embeddings, the demo model), not even session fixtures;
# the session's own cache goes when the session ends.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="pixart-lowvram-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

from pixart_lowvram.random_model import make_random_model  # noqa: E402  (after the cache folder is set)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(make_random_model(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0))


@pytest.fixture(scope="session")
def reference_pipeline(tiny_model):
    """The plain diffusers pipeline on the same weights: what every image must equal."""
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(pipe, *, prompt, negative_prompt="", width=None, height=None, cfg=4.5, steps=20, seed,
                    **usage):
    """The plain pipeline's image for one seed; `usage` passes what a model's reference usage adds (timesteps)."""
    image = pipe(prompt, negative_prompt=negative_prompt, width=width, height=height, guidance_scale=cfg,
                 num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed), **usage).images[0]
    return np.asarray(image)


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own shared-embedding cache, so no test sees another's (or the user's)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
