"""Random-weight models: `tiny` builds in a second on a CPU and runs through the reference diffusers pipeline;
`xl` has the real PixArt-XL-2-1024-MS shapes, checked on the meta device without allocating them."""
from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
import torch

from pixart_lowvram.errors import UsageError
from pixart_lowvram.presets import PRESETS
from pixart_lowvram.random_model import (
    COMPONENTS,
    MARKER,
    count_parameters,
    empty_models,
    make_random_model,
    preset_config,
)

EXPECTED_FILES = {
    "model_index.json", MARKER,
    "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
}


def files_of(folder) -> dict[str, float]:
    """Relative path -> mtime of every file in the folder."""
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_pipeline(folder, dtype=torch.float32, prompt="a pirate ship"):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe(prompt, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(0),
                      output_type="np").images


def test_tiny_builds_in_seconds_in_the_reference_layout(tmp_path):
    from diffusers import AutoencoderKL, PixArtTransformer2DModel  # noqa: F401 - time the build, not the imports
    from transformers import T5EncoderModel, T5Tokenizer  # noqa: F401

    calls = []
    start = time.perf_counter()
    folder = make_random_model(tmp_path / "tiny", "tiny", seed=0, progress=lambda *a: calls.append(a))
    seconds = time.perf_counter() - start

    assert seconds < 10, seconds
    assert set(files_of(folder)) == EXPECTED_FILES
    assert calls == [(i, len(COMPONENTS), c) for i, c in enumerate(COMPONENTS, start=1)]
    import json

    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtAlphaPipeline"
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]


def test_weights_are_safetensors_only(tiny_model):
    from pathlib import Path

    names = set(files_of(Path(tiny_model)))
    assert not {n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))}
    assert len([n for n in names if n.endswith(".safetensors")]) == 3


def test_reference_pipeline_makes_a_finite_256px_image(tiny_model):
    pipe, images = run_pipeline(tiny_model)

    assert images.shape == (1, 256, 256, 3)
    assert np.isfinite(images).all()
    assert images.std() > 0.05  # coloured noise, not a flat grey
    assert pipe.vae_scale_factor == 8
    assert pipe.transformer.config.sample_size == 32


def test_float16_pipeline_is_finite_on_cpu(tiny_model):
    pipe, images = run_pipeline(tiny_model, dtype=torch.float16)

    assert pipe.transformer.dtype == torch.float16
    assert pipe.text_encoder.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32  # as T5 does
    assert np.isfinite(images).all()
    # No closeness check against float32: a random denoiser's latents are ~1/alpha_T (~160) times a trained
    # one's, which magnifies float16 rounding into visibly different pixels.
    assert images.std() > 0.05


def test_the_prompt_changes_the_image(tiny_model):
    _, ship = run_pipeline(tiny_model, prompt="a pirate ship")
    _, cat = run_pipeline(tiny_model, prompt="a red cat sitting on a chair")
    assert np.abs(ship - cat).mean() > 0.01


def test_tokenizer_splits_english_and_loads_back(tiny_model):
    from transformers import AutoTokenizer, T5Tokenizer

    slow_path = T5Tokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    auto = AutoTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    vocab_size = preset_config("tiny").text_encoder["vocab_size"]

    ids = slow_path("a pirate ship", padding="max_length", max_length=120, truncation=True).input_ids
    assert len(ids) == 120 and max(ids) < vocab_size
    assert ids[4:] == [0] * 116 and ids[3] == 1  # three words, </s>=1, then <pad>=0
    assert slow_path.convert_ids_to_tokens(ids[:3]) == ["▁a", "▁pirate", "▁ship"]

    prompt = "Pirate ship trapped in a cosmic maelstrom nebula, 4k!"
    assert slow_path(prompt).input_ids == auto(prompt).input_ids
    assert slow_path.unk_token_id not in slow_path(prompt).input_ids  # unknown words fall back to letters
    assert max(slow_path.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(100)) < vocab_size


def test_text_encoder_keeps_shared_and_embed_tokens_one_tensor(tiny_model):
    from transformers import T5EncoderModel

    model = T5EncoderModel.from_pretrained(tiny_model, subfolder="text_encoder")
    assert model.shared.weight is model.encoder.embed_tokens.weight
    assert model.config.feed_forward_proj == "gated-gelu"


def test_same_seed_same_weights_other_seed_other_weights(tiny_model, tmp_path):
    from pathlib import Path

    again = make_random_model(tmp_path / "again", "tiny", seed=0)
    other = make_random_model(tmp_path / "other", "tiny", seed=1)
    for part in ("text_encoder/model.safetensors", "transformer/diffusion_pytorch_model.safetensors"):
        assert digest(again / part) == digest(Path(tiny_model) / part)
        assert digest(other / part) != digest(Path(tiny_model) / part)


def test_second_call_returns_the_folder_without_rebuilding(tmp_path):
    folder = make_random_model(tmp_path / "m", "tiny")
    before = files_of(folder)
    calls = []

    assert make_random_model(tmp_path / "m", "tiny", progress=lambda *a: calls.append(a)) == folder
    assert files_of(folder) == before
    assert calls == []


def test_half_written_folder_is_rebuilt(tmp_path):
    folder = make_random_model(tmp_path / "m", "tiny")
    (folder / MARKER).unlink()  # as if the build had stopped before its last step
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"truncated")

    make_random_model(folder, "tiny")

    assert (folder / MARKER).is_file()
    assert set(files_of(folder)) == EXPECTED_FILES
    run_pipeline(folder)


def test_unrelated_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        make_random_model(tmp_path, "tiny")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_different_model_of_ours_is_not_overwritten(tmp_path):
    folder = make_random_model(tmp_path / "m", "tiny", seed=0)
    with pytest.raises(UsageError, match="seed 0"):
        make_random_model(folder, "tiny", seed=1)
    with pytest.raises(UsageError, match="unknown random-model preset"):
        make_random_model(tmp_path / "n", "huge")


def test_xl_has_the_real_shapes_on_the_meta_device():
    models = empty_models(preset_config("xl"))  # no memory: every tensor is on the meta device

    assert all(p.is_meta for m in models.values() for p in m.parameters())
    counts = {name: count_parameters(model) for name, model in models.items()}
    assert counts == {"text_encoder": 4_762_310_656, "transformer": 611_349_152, "vae": 83_653_863}

    t5 = models["text_encoder"]
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # one tensor, as in the real checkpoint
    assert (t5.config.d_model, t5.config.d_ff, t5.config.num_layers, t5.config.num_heads) == (4096, 10240, 24, 64)
    dit = models["transformer"].config
    assert (dit.sample_size, dit.num_layers, dit.caption_channels, dit.cross_attention_dim) == (128, 28, 4096, 1152)
    assert models["transformer"].use_additional_conditions
    assert models["vae"].config.block_out_channels == (128, 256, 512, 512) or \
        list(models["vae"].config.block_out_channels) == [128, 256, 512, 512]
    assert preset_config("xl").dtype == torch.float16


@pytest.mark.parametrize("preset", PRESETS)
def test_every_presets_tokenizer_covers_its_text_encoders_vocabulary(preset, tmp_path):
    """The tokenizer each preset writes passes the check every model folder gets (a full-size T5's table of
    32,128 rows gets a tokenizer of 32,100 pieces, as the real checkpoint's), and tokenizes words as the small one."""
    from pixart_lowvram.models import check_tokenizer
    from pixart_lowvram.random_model import build_tokenizer, preset_config

    vocab_size = preset_config(preset).text_encoder["vocab_size"]
    tokenizer = build_tokenizer(vocab_size)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    size = check_tokenizer(tmp_path / "tokenizer", vocab_size)
    assert vocab_size - 128 < size <= vocab_size
    words = "a lighthouse on a cliff at dusk, oil painting"
    assert tokenizer(words).input_ids == build_tokenizer()(words).input_ids
