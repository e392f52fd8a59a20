"""Image-to-image: a job's init image, encoded by the VAE (the vae-encode stage), noised to the timestep its
strength gives and denoised from there by the reference pipeline.

diffusers has no PixArt image-to-image pipeline; this follows its `StableDiffusionImg2ImgPipeline` (diffusers
0.42), step by step and in the same order of random draws from each image's generator:

  image    `load_image` (EXIF orientation, RGB), `VaeImageProcessor.preprocess(image, height, width)` (resized
           with Lanczos to the size the image is denoised at, scaled to [-1, 1])
  encode   `vae.encode(image).latent_dist` (stored between stages as its parameters, the "moments")
  sample   `retrieve_latents`: a sample of that distribution (`latent_dist.sample(generator)`), the generator's
           first draw, `* scaling_factor`
  start    `get_timesteps(steps, strength)`: the last int(steps x strength) of the scheduler's timesteps,
           `scheduler.set_begin_index(t_start * order)`
  noise    `randn_tensor` (the generator's second draw), `scheduler.add_noise(init_latents, noise, first timestep)`
  denoise  the reference PixArt pipeline's own loop over the remaining timesteps (`StartedScheduler`); stochastic
           samplers go on drawing from the same generator, as in the img2img pipeline.

Strength 1 starts at the schedule's first timestep with the init image noised to it, as diffusers' img2img
does: nearly, not purely, noise (PixArt's schedule keeps sqrt(alphas_cumprod[999]) = 0.006 of the image's
latents), so it is not the text-to-image image of the same seed.
"""
from __future__ import annotations

import functools
import hashlib
import io
from pathlib import Path

import torch

from .jobs import MAX_IMAGE_BYTES, read_limited


def steps_to_run(steps: int, strength: float) -> int:
    """How many of `steps` an image-to-image job runs: `get_timesteps`'s int(steps x strength), at most steps."""
    return min(int(steps * strength), steps)


def start_step(steps: int, strength: float) -> int:
    """The index of the first of the scheduler's `steps` timesteps that runs (`get_timesteps`' t_start)."""
    return max(steps - steps_to_run(steps, strength), 0)


def image_bytes(path: str | Path) -> tuple[bytes, str]:
    """An init image's bytes and their sha256: what keys its encoding. One read, so what is hashed is what is
    encoded."""
    data = read_limited(path, MAX_IMAGE_BYTES)
    return data, hashlib.sha256(data).hexdigest()


def preprocess(data: bytes, width: int, height: int, vae_scale_factor: int) -> torch.Tensor:
    """The image as the img2img pipeline hands it to the VAE: (1, 3, height, width), float32 in [-1, 1]."""
    from diffusers.image_processor import VaeImageProcessor  # noqa: PLC0415
    from diffusers.utils import load_image  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    with Image.open(io.BytesIO(data)) as opened:
        image = load_image(opened)  # exif_transpose and RGB, as for a path (an RGBA image's alpha is dropped)
    return VaeImageProcessor(vae_scale_factor=vae_scale_factor).preprocess(image, height=height, width=width)


class StartedScheduler:
    """A scheduler as the PixArt pipeline sees it when the latents it is handed are already noised to the start
    timestep: `set_timesteps` sets the whole schedule (the scheduler's sigmas and step indices need it) and the
    pipeline's loop sees only the timesteps from `begin` on; its `set_begin_index(0)` becomes `begin`, as the
    img2img pipeline's `get_timesteps` sets it; and `init_noise_sigma` is 1, since the latents already carry the
    start timestep's noise (the img2img pipeline never scales them; the PixArt pipeline would).

    A view rather than a copy of the pipeline's loop, so that the maths stays the reference pipeline's."""

    def __init__(self, scheduler, begin: int):
        self._scheduler = scheduler
        self._begin = begin
        # inspect.signature follows __wrapped__: the pipeline's retrieve_timesteps still sees that a scheduler
        # accepts custom timesteps (PixArt-DMD's fixed one)
        @functools.wraps(scheduler.set_timesteps)
        def set_timesteps(*args, **kwargs):
            return scheduler.set_timesteps(*args, **kwargs)

        self.set_timesteps = set_timesteps
        if hasattr(scheduler, "set_begin_index"):
            self.set_begin_index = self._set_begin_index

    def _set_begin_index(self, begin_index: int = 0) -> None:
        self._scheduler.set_begin_index(self._begin + begin_index)

    @property
    def timesteps(self):
        return self._scheduler.timesteps[self._begin:]

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def __getattr__(self, name: str):
        return getattr(self._scheduler, name)


def noised_latents(scheduler, moments: list[torch.Tensor], generators: list[torch.Generator], *, steps: int,
                   strength: float, timesteps: list[int] | None, scaling_factor: float, device: torch.device,
                   dtype: torch.dtype) -> tuple[torch.Tensor, StartedScheduler]:
    """The latents a batch of image-to-image items starts from, and the scheduler that starts there.

    `moments` are each item's stored VAE encoding (2 x latent channels, h, w), `generators` each item's own,
    fresh; `timesteps` PixArt-DMD's fixed ones (None: `steps` of the scheduler's own spacing). After this, each
    generator stands where the img2img pipeline's stands when its denoising loop begins."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution  # noqa: PLC0415
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import retrieve_timesteps  # noqa: PLC0415
    from diffusers.utils.torch_utils import randn_tensor  # noqa: PLC0415

    # as the img2img pipeline: retrieve_timesteps, then get_timesteps on the number of steps it returns
    _, steps = retrieve_timesteps(scheduler, steps, device, timesteps)
    begin = start_step(steps, strength) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    latent_timestep = scheduler.timesteps[begin:begin + 1].repeat(len(moments))
    # The img2img pipeline encodes each image of a batch with its own generator (prepare_latents); a stored
    # encoding is its latent distribution, so the sample is drawn here, the generator's first draw: what its
    # retrieve_latents does (imported here, its module would load Stable Diffusion's CLIP classes too).
    init = torch.cat([DiagonalGaussianDistribution(m[None].to(device)).sample(g) for m, g in zip(moments, generators)])
    init = (scaling_factor * init).to(dtype)  # the VAE's dtype (float32 for Σ's SDXL VAE) to the DiT's
    noise = randn_tensor(init.shape, generator=generators, device=device, dtype=dtype)
    return scheduler.add_noise(init, noise, latent_timestep), StartedScheduler(scheduler, begin)

