"""Stage 3, decode: VAE -> images, as the reference pipeline decodes, and PNGs that carry their parameters."""
from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .models import ModelInfo, load_vae, make_pipeline, sampler_label
from .items import Item, latent_shapes
from .stage import StageContext
from .vae_strips import StripDecoder, supports

# Threads compressing and writing PNGs while the GPU decodes. A chosen number: a 1024x1024 PNG takes longer to
# compress than to decode (~0.13 s a whole decode on the H100, in the plain pipeline), and PIL's zlib lets go of the GIL, so
# a few threads keep up with the GPU; four leave cores to the decoding thread on small machines.
PNG_WRITERS = 4

def png_text(item: Item, info: ModelInfo, *, key: str, dtype: str) -> dict[str, str]:
    """The PNG text chunks: `parameters` in the form AUTOMATIC1111, ComfyUI, InvokeAI and civitai read, and
    `pixart_lowvram` with the whole item as JSON (and the key that marks the image as finished)."""
    lines = [item.prompt]
    if item.negative_prompt:
        lines.append(f"Negative prompt: {item.negative_prompt}")
    fields = {
        "Steps": item.steps,
        "Sampler": sampler_label(info, item.sampler),
        "CFG scale": f"{item.cfg:g}",
        "Seed": item.seed,
        "Size": f"{item.width}x{item.height}",
        "Model hash": info.identity["transformer"][:10],
        "Model": info.name,
    }
    if item.init_image:  # AUTOMATIC1111's field for image-to-image
        fields["Denoising strength"] = f"{item.strength:g}"
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    job = {"key": key, "model": info.source, "dtype": dtype, **item.to_json()}
    return {"parameters": "\n".join(lines), "pixart_lowvram": json.dumps(job, sort_keys=True)}


def decode_items(ctx: StageContext, items: list[Item]) -> int:
    """Decode `items`' latents, writing images/<id>.png for each. Returns how many were made."""
    info, folder, plan, reporter, device, dtype = ctx.info, ctx.folder, ctx.plan, ctx.reporter, ctx.device, ctx.dtype
    with reporter.bar("load VAE", total=1, unit="part", transient=True) as bar:
        vae = load_vae(info, ctx.compute_dtype, device)  # float32 for Σ's SDXL VAE in a float16 run
        strips = None
        if plan.placement == "strips":
            if supports(vae):
                # Where RAM is short the plan spills what waits off the GPU to files in the run folder.
                strips = StripDecoder(vae, device, plan.room, spill_dir=folder.path if plan.spill else None,
                                      pinned_limit=plan.pinned_limit)
            else:
                # Not the SD-VAE layout the strip decoder walks: diffusers' tiled decoding (overlapping tiles,
                # blended; the image changes at the seams), with the largest tile that fits the same room.
                reporter.info(f"this VAE cannot decode in strips: decoding in {plan.tile}px tiles instead "
                              "(images differ slightly from a whole decode)")
                vae.enable_tiling()
                vae.tile_sample_min_size = plan.tile
                vae.tile_latent_min_size = plan.tile // info.geometry.vae_scale_factor
        bar.update()
    pipe = make_pipeline(info, vae=vae)
    ctx.loaded(vae)
    dtype_name = str(dtype).removeprefix("torch.")
    # PNGs are compressed and written on threads (PIL's zlib encoder and the file writes let go of the GIL)
    # while the GPU decodes the next images: a 1024x1024 PNG takes longer to compress than to decode. Whatever
    # stops the loop, the images already decoded are written first.
    writer = ThreadPoolExecutor(max_workers=PNG_WRITERS, thread_name_prefix="png-writer")
    written: list[Future] = []
    try:
        with reporter.bar("decode", total=len(items), unit="image") as bar, torch.inference_mode():
            for item in items:
                ctx.checkpoint()
                stored = folder.read_tensors(folder.latent_path(item.latent_key), item.latent_key,
                                             latent_shapes(info, item))
                if stored is None:
                    raise RuntimeError(f"the latents of {item.id} vanished between stages")
                latents = stored["latents"][None].to(device, vae.dtype)
                latents = latents / vae.config.scaling_factor
                image = strips.decode(latents) if strips else vae.decode(latents, return_dict=False)[0]
                bar.update()
                if not ctx.finite(image, item.id):
                    continue  # postprocess would clamp it to a black or grey image: none is written instead
                # The reference denoises at the nearest size of its aspect-ratio bins, then resizes back.
                if info.geometry.bins is not None:
                    image = pipe.image_processor.resize_and_crop_tensor(image, item.width, item.height)
                picture = pipe.image_processor.postprocess(image, output_type="pil")[0]
                bar.describe(item.id)
                for future in written:
                    if future.done():
                        future.result()  # a failed write (disk full) stops the stage here
                written.append(writer.submit(folder.write_png, folder.image_path(item), picture,
                                             png_text(item, info, key=item.image_key, dtype=dtype_name)))
    finally:
        writer.shutdown(wait=True)
    for future in written:
        future.result()
    return len(written)
