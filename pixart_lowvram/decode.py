"""Stage 3, decode: VAE -> images, as the reference pipeline decodes, and PNGs that carry their parameters."""
from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from PIL import Image

from .models import ModelInfo, load_vae, make_pipeline, sampler_label
from .items import Item, by_latent, latent_shapes
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
    """Decode `items`' latents, writing images/<id>.png for each: items of one latent key (items.by_latent) are
    decoded once, and each gets its own PNG, which carries its own name. Returns how many PNGs were written."""
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
    writer = PngWriter(folder)
    # decoded (queued on the GPU), not yet handed over: the items of one latent key, and their image
    pending: list[tuple[list[Item], torch.Tensor, torch.Tensor]] = []

    def hand_over() -> None:
        """The image decoded last, to the PNG writer (waiting for the GPU to finish it), once for each of its items."""
        group, finite, pixels = pending.pop()
        if not bool(finite):
            # postprocess would clamp it to a black or grey image: none is written
            ctx.failed.extend(it.id for it in group)
            return
        array = pixels.cpu().numpy()
        for it in group:
            writer.submit(folder.image_path(it), Image.fromarray(array),
                          png_text(it, info, key=it.image_key, dtype=dtype_name))

    try:
        with reporter.bar("decode", total=len(items), unit="image") as bar, torch.inference_mode():
            for group in by_latent(items).values():
                item = group[0]
                ctx.checkpoint()
                # Read while the GPU decodes the image before this one; that one is handed over before this one
                # is queued, so a stop or a crash here leaves the same finished images as a plain loop would.
                stored = folder.read_made(folder.latent_path(item.latent_key), item.latent_key,
                                          latent_shapes(info, item), f"the latents of {item.id}")
                if pending:
                    hand_over()
                latents = stored["latents"][None].to(device, vae.dtype)
                latents = latents / vae.config.scaling_factor
                image = strips.decode(latents) if strips else vae.decode(latents, return_dict=False)[0]
                finite = torch.isfinite(image).all()
                # The reference denoises at the nearest size of its aspect-ratio bins, then resizes back.
                if info.geometry.bins is not None:
                    image = pipe.image_processor.resize_and_crop_tensor(image, item.width, item.height)
                pending.append((group, finite, to_pixels(pipe.image_processor.postprocess(image, output_type="pt"))[0]))
                bar.describe(", ".join(it.id for it in group))
                bar.update(len(group))
            if pending:
                hand_over()
    except BaseException:
        if pending:  # decoded before what stopped the stage: kept, like the images before it
            try:
                hand_over()
            except Exception:  # noqa: BLE001 - what stopped the stage is the error to report
                pass
        raise
    finally:
        writer.close()
        ctx.made = writer.succeeded()  # what a stop or a failed write left written counts too
    return writer.finish()


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (N, C, H, W) as 8-bit pixels (N, H, W, C), computed where they are: on the GPU, half the
    bytes of a float16 image cross to the host (a quarter of a float32 one) and the host does no arithmetic. The
    same numbers as diffusers' `pt_to_numpy` and `numpy_to_pil`: float32, times 255, rounded half to even (numpy's
    and torch's rounding alike)."""
    return (images.permute(0, 2, 3, 1).float() * 255).round().to(torch.uint8)


class PngWriter:
    """PNGs compressed and written on threads (PIL's zlib encoder and the file writes let go of the GIL) while the
    GPU decodes the next images: a 1024x1024 PNG takes longer to compress than to decode. At most `backlog`
    images wait, so a slow disk holds the decoding back instead of filling RAM; a failed write (disk full) stops
    the stage at the next image. `close` writes what was handed over before returning, whatever stopped the
    stage."""

    def __init__(self, folder, threads: int = PNG_WRITERS, backlog: int = 2 * PNG_WRITERS):
        self.folder, self.backlog = folder, backlog
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="png-writer")
        self.queued: list[Future] = []
        self.written = 0

    def submit(self, path, picture, text: dict[str, str]) -> None:
        self._collect(done_only=True)
        while len(self.queued) >= self.backlog:
            self._take(self.queued[0])
        self.queued.append(self.pool.submit(self.folder.write_png, path, picture, text))

    def _take(self, future: Future) -> None:
        self.queued.remove(future)
        future.result()
        self.written += 1

    def _collect(self, done_only: bool) -> None:
        for future in list(self.queued):
            if future.done() or not done_only:
                self._take(future)

    def close(self) -> None:
        """Wait until every image handed over is written (or failed)."""
        self.pool.shutdown(wait=True)

    def succeeded(self) -> int:
        """After `close`: how many images were written, a failed write or not."""
        return self.written + sum(1 for future in self.queued if future.exception() is None)

    def finish(self) -> int:
        """After `close`: raise the first failed write, if any; how many images were written."""
        self._collect(done_only=False)
        return self.written
