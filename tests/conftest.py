"""Shared fixtures: one tiny random-weight PixArt model per test session, built in-process (no network)."""
from __future__ import annotations

import os
import tempfile

import pytest
import torch

# No test reads or writes the user's cache (shared prompt embeddings, the demo model), not even session fixtures.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="pixart-lowvram-test-cache-")

from pixart_lowvram.random_model import make_random_model


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


def reference_image(pipe, *, prompt, negative_prompt="", width, height, cfg=4.5, steps=20, seed):
    import numpy as np

    image = pipe(prompt, negative_prompt=negative_prompt, width=width, height=height, guidance_scale=cfg,
                 num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return np.asarray(image)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own shared-embedding cache, so no test sees another's (or the user's)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
