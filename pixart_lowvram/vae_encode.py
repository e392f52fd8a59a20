"""Stage vae-encode (image-to-image only): init images -> the VAE's latent distribution of each, before denoise.

Each distinct init image and size is encoded once, as diffusers' StableDiffusionImg2ImgPipeline prepares it
(img2img.py): the image read, resized and normalised by `VaeImageProcessor`, then `vae.encode`. What is stored is
the distribution (its `parameters`, "moments"), not a sample: the sample is the item's generator's first draw, so
the denoise stage draws it, for each seed in turn. Where the plan says so the encoder runs in exact row strips
(vae_strips.StripEncoder); a VAE whose encoder cannot run so encodes on the CPU in float32."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UsageError
from .img2img import image_bytes, preprocess
from .items import Item, init_image_key
from .models import load_vae
from .stage import StageContext
from .vae_strips import StripEncoder, supports_encoder


@dataclass(frozen=True)
class InitImage:
    """One encoding to make: an init image at the size an item asks for (it is encoded at the size the item is
    denoised at: its aspect-ratio bin)."""

    path: str
    width: int
    height: int
    key: str  # items.init_image_key: the image's content, the size, the VAE, the dtype


def pending_images(items: list[Item]) -> list[InitImage]:
    """The distinct encodings `items` need (an image used by several items, or copies, is encoded once)."""
    found = {it.init_key: InitImage(it.init_image, it.width, it.height, it.init_key) for it in items if it.init_key}
    return list(found.values())


def encode_images(ctx: StageContext, images: list[InitImage]) -> int:
    """Encode `images`, writing latents/<key>.safetensors ("moments") for each. Returns how many were made."""
    info, folder, plan, reporter = ctx.info, ctx.folder, ctx.plan, ctx.reporter
    device, dtype = ctx.device, ctx.compute_dtype  # the VAE's: float32 for Σ's SDXL VAE in a float16 run
    with reporter.bar("load VAE", total=1, unit="part", transient=True) as bar:
        vae = load_vae(info, dtype, device)
        strips = None
        if plan.placement == "strips":
            if supports_encoder(vae):
                strips = StripEncoder(vae, device, plan.room, spill_dir=folder.path if plan.spill else None,
                                      pinned_limit=plan.pinned_limit)
            else:
                # Not the SD-VAE layout the strip walk knows, and diffusers' tiled encoding would change the
                # latents: the whole encode, on the CPU, where memory is no object (slower; float32 there).
                reporter.info("this VAE's encoder cannot run in strips: encoding the init images on the CPU")
                device, dtype = torch.device("cpu"), torch.float32
                vae = vae.to(device, dtype)
        bar.update()
    ctx.loaded(vae)
    with reporter.bar("vae-encode", total=len(images), unit="image") as bar, torch.inference_mode():
        for init in images:
            ctx.checkpoint()
            bar.describe(init.path)
            data, sha256 = image_bytes(init.path)
            if init_image_key(info, ctx.dtype, sha256, init.width, init.height) != init.key:
                raise UsageError(f"{init.path} changed while the run was starting (its content is not the one its "
                                 "items were keyed with): run the same command again")
            width, height = info.geometry.denoise_size(init.width, init.height)
            image = preprocess(data, width, height, info.geometry.vae_scale_factor).to(device, vae.dtype)
            moments = strips.encode(image) if strips else vae.encode(image).latent_dist.parameters
            bar.update()
            if not ctx.finite(moments, init.key):
                continue
            folder.write_tensors(folder.latent_path(init.key), {"moments": moments[0].to(ctx.compute_dtype)},
                                 init.key, init_image=init.path)
            ctx.made += 1
    return ctx.made
