"""The strip decoder computes what the whole VAE decode computes, in any room, and the queue uses it when the
plan says so: same images as the reference pipeline."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL

from conftest import reference_image
from pixart_lowvram import generate
from pixart_lowvram.generate import Settings, run_queue
from pixart_lowvram.jobs import Job
from pixart_lowvram.vae_strips import StripDecoder, supports
from test_generate import CASES, CPU32, max_diff, pixels


@pytest.fixture(scope="module")
def vae(tiny_model):
    return AutoencoderKL.from_pretrained(f"{tiny_model}/vae").eval()


@pytest.mark.parametrize("latent_hw", [(24, 32), (13, 17)])  # odd sizes: strips never divide the image evenly
def test_strips_equal_the_whole_decode_in_any_room(vae, latent_hw):
    z = torch.randn(2, vae.config.latent_channels, *latent_hw, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = vae.decode(z).sample
    used = []
    for room in (10**9, 1_000_000, 150_000, 60_000):
        decoder = StripDecoder(vae, torch.device("cpu"), room)
        out = decoder.decode(z)
        assert out.shape == whole.shape
        assert (out - whole).abs().max().item() < 1e-4, room
        used.append(decoder.strips_used)
    assert used[0] == 0 and used[-1] > used[1] > 0, used  # the smaller the room, the more layers go in strips


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side streams and pinned rows of a GPU decode")
def test_strips_through_host_memory_on_a_gpu_equal_the_whole_decode(vae, monkeypatch):
    """On a GPU, activations too big for the room wait in pinned host memory and cross the bus on side streams
    while the strips compute: the same numbers as the whole decode (float32, TF32 off as on the CPU)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    gpu = torch.device("cuda")
    model = copy.deepcopy(vae).to(gpu)
    z = torch.randn(2, vae.config.latent_channels, 40, 56, generator=torch.Generator().manual_seed(4)).to(gpu)
    with torch.inference_mode():
        whole = model.decode(z).sample
    for room in (400_000, 150_000, 60_000):
        decoder = StripDecoder(model, gpu, room)
        out = decoder.decode(z)
        assert decoder._pinned > 0, "some activations waited in host memory"
        assert (out - whole).abs().max().item() < 1e-4, room


def test_diffusers_tiling_is_what_strips_avoid(vae):
    """The reason for the strip decoder: diffusers' tiles are normalised separately and change the image."""
    z = torch.randn(1, vae.config.latent_channels, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        whole = vae.decode(z).sample
        vae.enable_tiling(); vae.tile_sample_min_size = 128; vae.tile_latent_min_size = 16
        try:
            tiled = vae.decode(z).sample
        finally:
            vae.disable_tiling()
    strips = StripDecoder(vae, torch.device("cpu"), 60_000).decode(z)
    assert (tiled - whole).abs().max().item() > 100 * (strips - whole).abs().max().item()


def test_supports_refuses_what_it_cannot_walk_exactly(vae, tiny_model):
    assert supports(vae)
    other = AutoencoderKL.from_pretrained(f"{tiny_model}/vae").eval()
    other.decoder.conv_out = torch.nn.Conv2d(other.decoder.conv_out.in_channels, 3, 5, padding=2)
    assert not supports(other)
    with pytest.raises(ValueError, match="strips"):
        StripDecoder(other, torch.device("cpu"), 10**6)
    other = AutoencoderKL.from_pretrained(f"{tiny_model}/vae").eval()
    other.enable_tiling()
    assert not supports(other)


def test_a_strips_plan_makes_the_reference_images(tiny_model, reference_pipeline, tmp_path, monkeypatch):
    """The queue with its decode planned in strips (a small room, as under a tight GPU budget) makes the
    reference pipeline's images."""
    real = generate.plan_run
    planned = []

    def strips_plan(*args, **kwargs):
        plan = real(*args, **kwargs)
        plan.stages["decode"] = dataclasses.replace(plan["decode"], placement="strips", room=80_000, tile=128)
        planned.append(plan)
        return plan

    monkeypatch.setattr(generate, "plan_run", strips_plan)
    made = []
    real_init = StripDecoder.__init__
    monkeypatch.setattr(StripDecoder, "__init__", lambda self, *a, **k: (real_init(self, *a, **k), made.append(self))[0])
    jobs = [Job(index=i + 1, **case) for i, case in enumerate(CASES[:2])]
    result = run_queue(jobs, tmp_path / "run", Settings(model=tiny_model, **CPU32))
    assert planned and made and made[0].strips_used > 0
    for item, case in zip(result.items, CASES):
        assert max_diff(pixels(result.images[item.id]), reference_image(reference_pipeline, **case)) <= 1, item.id


def test_strips_spilled_to_files_equal_the_whole_decode(vae, tmp_path):
    """Where RAM is short, activations that do not stay on the device wait in memory-mapped files (unlinked at
    once: nothing is left behind) instead of pinned RAM; the image is the same."""
    z = torch.randn(1, vae.config.latent_channels, 24, 32, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        whole = vae.decode(z).sample
    decoder = StripDecoder(vae, torch.device("cpu"), 60_000, spill_dir=tmp_path, pinned_limit=0)
    out = decoder.decode(z)
    assert decoder.spilled > 0 and decoder.strips_used > 0
    assert (out - whole).abs().max().item() < 1e-4
    assert list(tmp_path.iterdir()) == []


# -- the encoder (image-to-image's init images) ---------------------------------------------------------------------

@pytest.mark.parametrize("image_hw", [(64, 96), (50, 70), (37, 29)])  # odd sizes: a stride-2 layer's last row
def test_strip_encoder_equals_the_whole_encode_in_any_room(vae, image_hw):
    from pixart_lowvram.vae_strips import StripEncoder

    x = torch.rand(2, 3, *image_hw, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.inference_mode():
        whole = vae.encode(x).latent_dist.parameters
    used = []
    for room in (10**9, 1_000_000, 150_000, 30_000, 5_000):
        encoder = StripEncoder(vae, torch.device("cpu"), room)
        out = encoder.encode(x)
        assert out.shape == whole.shape
        assert (out - whole).abs().max().item() < 1e-5, room
        used.append(encoder.strips_used)
    assert used[0] == 0 and used[-1] > used[2] > 0, used


def test_strip_encoder_spilled_to_files_equals_the_whole_encode(vae, tmp_path):
    from pixart_lowvram.vae_strips import StripEncoder

    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.inference_mode():
        whole = vae.encode(x).latent_dist.parameters
    encoder = StripEncoder(vae, torch.device("cpu"), 20_000, spill_dir=tmp_path, pinned_limit=0)
    out = encoder.encode(x)
    assert encoder.spilled > 0 and encoder.strips_used > 0
    assert (out - whole).abs().max().item() < 1e-5
    assert list(tmp_path.iterdir()) == []


def test_supports_encoder_refuses_what_it_cannot_walk_exactly(tiny_model):
    from pixart_lowvram.vae_strips import StripEncoder, supports_encoder

    other = AutoencoderKL.from_pretrained(f"{tiny_model}/vae").eval()
    assert supports_encoder(other)
    down = other.encoder.down_blocks[0].downsamplers[0]
    down.conv = torch.nn.Conv2d(down.conv.in_channels, down.conv.out_channels, 3, stride=2, padding=1)
    assert not supports_encoder(other)
    with pytest.raises(ValueError, match="strips"):
        StripEncoder(other, torch.device("cpu"), 10**6)
