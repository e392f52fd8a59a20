"""Stage 2, denoise: DiT + scheduler -> latents, through the reference pipeline with `output_type="latent"`.

Items that share size, steps, guidance and sampler share a batch; each keeps its own CPU generator, for its
starting noise and for the noise a stochastic sampler adds at each step, so its image does not depend on the
batch it lands in or on the device. Items with LoRAs are grouped by their set: the transformer is loaded once per
set, the set merged into its weights as they load (lora.py), and released before the next set's loads.
Image-to-image items (those of one strength share a batch) start from their init image's encoding, noised to the
strength's timestep (img2img.py), and the same pipeline call runs the rest."""
from __future__ import annotations

from collections.abc import Collection, Mapping
from itertools import groupby

import torch

from . import img2img
from .compiling import CompiledBlocks, compile_blocks, compile_cache, shape_limit
from .lora import LoraFile, LoraSet, lora_set
from .memory import release
from .memory import available_ram
from .models import (ModelInfo, component_sizes, load_scheduler, load_transformer, load_transformer_streamed,
                     make_pipeline)
from .items import Item, binned_sizes, embed_shapes, init_shapes
from .stage import StageContext


# The share of the RAM available when denoise starts that the DiT's pinned blocks may take: the rest stays for the
# page cache the other stages read their weights through and for other programs. A chosen margin (the planner's
# host budget decides first; this guards a machine whose free RAM fell after planning).
PINNED_DIT_RAM_SHARE = 0.8


def pinned_dit_fits_in_ram(info: ModelInfo, dtype: torch.dtype) -> bool:
    """Whether RAM can hold the DiT's blocks pinned (read from the files straight into their buffers), with room
    to spare; where it cannot, they stream from the files at every step: a run never fails for want of RAM."""
    free = available_ram()
    return free is None or component_sizes(info, dtype).transformer <= free * PINNED_DIT_RAM_SHARE


def group_key(item: Item) -> tuple:
    return (item.width, item.height, item.steps, item.cfg, item.sampler, item.strength or 0.0)


def steps_run(item: Item) -> int:
    """The steps an item's denoising runs: all of them, or an image-to-image item's share (img2img.steps_to_run)."""
    return img2img.steps_to_run(item.steps, item.strength) if item.init_image else item.steps


def batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    ordered = sorted(items, key=group_key)
    out = []
    for _, group in groupby(ordered, key=group_key):
        group = list(group)
        out += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    return out


def set_key(lora: LoraSet) -> tuple:
    """What tells the transformers of two LoRA sets apart: the LoRAs' identities and scales, and the files they are
    read from (the transformer is loaded once per key)."""
    return tuple(map(tuple, lora.key())), tuple(str(file.path) for file, _ in lora.entries)


def lora_groups(items: list[Item], loras: Mapping[str, LoraFile]) -> list[tuple[LoraSet, list[Item]]]:
    """Items by the LoRA set merged for them (the same set however a job orders it), items without one first."""
    groups: dict[tuple, tuple[LoraSet, list[Item]]] = {}
    for item in items:
        found = lora_set(item.lora, loras)
        groups.setdefault(set_key(found), (found, []))[1].append(item)
    return [groups[key] for key in sorted(groups, key=lambda k: (bool(k[0]), k))]


def call_shape(info: ModelInfo, batch: list[Item]) -> tuple:
    """What decides the shapes of a batch's transformer calls: its images, their size as denoised (after
    resolution binning) and whether guidance doubles the batch."""
    first = batch[0]
    return (len(batch), *binned_sizes(info, [first])[0], first.cfg > 1)


def denoise_batches(items: list[Item], batch_size: int,
                    loras: Mapping[str, LoraFile] | None = None) -> list[tuple[LoraSet, list[list[Item]]]]:
    """The batches the stage runs, per LoRA set, in the order it runs them."""
    return [(lora, batches(group, batch_size)) for lora, group in lora_groups(items, loras or {})]


def calls_by_shape(info: ModelInfo, items: list[Item], batch_size: int,
                   loras: Mapping[str, LoraFile] | None = None) -> dict[tuple, int]:
    """How many times denoising `items` calls the transformer (once a step and batch), by call_shape."""
    calls: dict[tuple, int] = {}
    for _, group in denoise_batches(items, batch_size, loras):
        for batch in group:
            shape = call_shape(info, batch)
            calls[shape] = calls.get(shape, 0) + steps_run(batch[0])
    return calls


def denoise_items(ctx: StageContext, items: list[Item], *, batch_size: int,
                  loras: Mapping[str, LoraFile] | None = None, compile_shapes: Collection[tuple] = ()) -> int:
    """Denoise `items`, writing latents/<key>.safetensors for each, with the LoRAs `loras` reads (path -> LoRA)
    merged where an item names them. Returns how many were made. `compile_shapes`: the call shapes (call_shape)
    whose batches run the DiT's blocks compiled (compiling.py), resident or streamed; the others run eager."""
    steps = ctx.reporter.bar("denoise", total=sum(steps_run(it) for it in items), unit="step")  # image-steps
    compiled = None
    planned = denoise_batches(items, batch_size, loras)
    if compile_shapes:
        shapes = {call_shape(ctx.info, batch) for _, group in planned for batch in group}
        which = "" if shapes <= set(compile_shapes) else (
            f" for {len(shapes & set(compile_shapes))} of its {len(shapes)} image sizes and batches (the others run "
            f"uncompiled: too few steps to repay compiling, or past torch's {shape_limit()} shapes)")
        ctx.reporter.info(f"denoise: compiling the transformer's blocks (torch.compile){which}, in its first steps: "
                          f"~10 to 20 s the first time on a machine, seconds later (cached in {compile_cache()})")
        compiled = CompiledBlocks()
    try:
        for n, (lora, group) in enumerate(planned):
            if n:  # the previous set's transformer is gone before this one loads
                release(ctx.device, ctx.meter.components if ctx.meter else None)
            _denoise_group(ctx, group, lora, steps, compiled=compiled, compile_shapes=compile_shapes)
    finally:
        steps.close()
        if compiled is not None:
            ctx.compiled(compiled)
    return ctx.made


def _denoise_group(ctx: StageContext, group: list[list[Item]], lora: LoraSet, steps, *,
                   compiled: CompiledBlocks | None = None, compile_shapes: Collection[tuple] = ()) -> None:
    info, folder, plan, reporter, device = ctx.info, ctx.folder, ctx.plan, ctx.reporter, ctx.device
    dtype = ctx.compute_dtype  # the DiT's; the latents are stored in it
    embed_shape = embed_shapes(info)
    streamer = None
    try:
        label = "load transformer" + (f" + {len(lora.entries)} LoRA(s)" if lora else "")
        with reporter.bar(label, total=2, unit="part", transient=True) as bar:
            scheduler = load_scheduler(info)  # replaced by each batch's own sampler, fresh
            bar.update()
            if plan.placement == "streamed":
                # Measured (BENCHMARKS.md): diffusers' group offloading ran this stage 3.3x slower than resident
                # at 1.5 GiB (18.1 s vs 5.5 s); our streamer keeps what fits on the GPU, the other blocks pinned
                # in RAM (one buffer each), and overlaps each block's copy with the compute of the ones before.
                hold = plan.hold_in_ram and pinned_dit_fits_in_ram(info, dtype)
                if plan.hold_in_ram and not hold:
                    reporter.info("not enough free RAM to hold the transformer's blocks pinned: streaming them "
                                  "from the weights files at every step instead (slower)")
                transformer, streamer = load_transformer_streamed(info.path / "transformer", dtype, device,
                                                                  ahead=plan.ahead, resident=plan.resident_blocks,
                                                                  hold_in_ram=hold, lora=lora,
                                                                  scratch=folder.path)
            else:
                transformer = load_transformer(info, dtype, device, lora=lora)
            bar.update()
        pipe = make_pipeline(info, transformer=transformer, scheduler=scheduler)
        ctx.loaded(transformer)  # each set's in its turn, so that its release is checked
        if compiled is not None:
            compile_blocks(transformer.transformer_blocks, record=compiled)
        for batch in group:
            ctx.checkpoint()
            if compiled is not None:
                compiled.eager = call_shape(info, batch) not in compile_shapes

            def embeds(key_of):
                tensors = [folder.read_made(folder.embed_path(key_of(it)), key_of(it), embed_shape, "the embedding")
                           for it in batch]
                return (torch.stack([t["embeds"] for t in tensors]).to(device, dtype),
                        torch.stack([t["mask"] for t in tensors]).to(device))

            prompt_embeds, prompt_mask = embeds(lambda it: it.prompt_key)
            negative_embeds, negative_mask = embeds(lambda it: it.negative_key)
            first = batch[0]
            steps.describe(", ".join(it.id for it in batch))
            pipe.scheduler = load_scheduler(info, first.sampler)
            generators = [torch.Generator("cpu").manual_seed(it.seed) for it in batch]
            timesteps = list(info.kind.timesteps) if info.kind.timesteps else None  # DMD: one step at t=400
            start = None  # text-to-image: the pipeline draws its own starting noise
            if first.init_image:
                moments = [folder.read_made(folder.latent_path(it.init_key), it.init_key, init_shapes(info, it),
                                            "the init image's encoding") for it in batch]
                start, pipe.scheduler = img2img.noised_latents(
                    pipe.scheduler, [m["moments"] for m in moments], generators, steps=first.steps,
                    strength=first.strength, timesteps=timesteps, scaling_factor=info.geometry.scaling_factor,
                    device=device, dtype=dtype)
            with torch.inference_mode():
                latents = pipe(
                    prompt=None, negative_prompt=None,
                    prompt_embeds=prompt_embeds, prompt_attention_mask=prompt_mask,
                    negative_prompt_embeds=negative_embeds, negative_prompt_attention_mask=negative_mask,
                    width=first.width, height=first.height, guidance_scale=first.cfg,
                    num_inference_steps=first.steps, timesteps=timesteps, generator=generators, latents=start,
                    max_sequence_length=info.geometry.max_sequence_length,
                    use_resolution_binning=info.geometry.bins is not None,  # without bins, sizes as asked
                    output_type="latent", callback=lambda *_: steps.update(len(batch)), callback_steps=1,
                ).images
            for item, latent in zip(batch, latents):
                if ctx.finite(latent, item.latent_key):  # every image of the key is lost with it
                    folder.write_tensors(folder.latent_path(item.latent_key), {"latents": latent},
                                         item.latent_key, item=item.id, **item.seed_record())
                    ctx.made += 1
    finally:
        if streamer is not None:
            streamer.close()  # its I/O threads, pinned buffers and hooks: whatever stopped the stage
