"""The queue's items: jobs expanded into one item per image (seeds fixed, sizes resolved), and the keys that tie
each artifact to what makes it."""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass

import torch

from .jobs import MAX_SEED, Job, JobDefaults
from .models import ModelInfo, caption_cleaning


KEY_FORMAT = 2  # part of every artifact's key: a change to what keys hold makes every artifact new


def digest(*parts: object) -> str:
    """A short stable hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def slugify(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "image"


@dataclass
class Item:
    """One image to make: a job's copy with its seed fixed and its size resolved."""

    id: str  # unique in the run, safe as a file stem
    job_index: int
    copy: int  # 0-based, < job.count
    prompt: str
    negative_prompt: str
    width: int
    height: int
    seed: int
    cfg: float
    steps: int
    name: str | None
    seed_was_drawn: bool
    sampler: str = "dpm-solver"
    prompt_key: str = ""
    negative_key: str = ""
    latent_key: str = ""
    image_key: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def _job_spec(job: Job, defaults: JobDefaults) -> dict:
    """What a job asks for, independent of where it sits in the queue, with the model's defaults filled in (a job
    that names the model's own sampler asks for what one that names none does)."""
    spec = asdict(job)
    spec.pop("index")
    spec["cfg"] = float(defaults.cfg if job.cfg is None else job.cfg)
    spec["steps"] = defaults.steps if job.steps is None else job.steps
    spec["sampler"] = job.sampler or defaults.sampler
    return spec


def expand(jobs: list[Job], defaults: JobDefaults, drawn_seeds: dict[str, list[int]],
           rng: random.Random | None = None) -> tuple[list[Item], dict[str, list[int]]]:
    """Jobs -> items, with the model's `defaults` for what a job leaves out. A job's seed gives seed, seed+1, ...
    to its copies; a missing seed is drawn at random, and remembered under the job's spec in `drawn_seeds` (kept
    in the manifest), so running the same queue again finds the same seeds. Identical jobs (the article's three
    'supercar' jobs) are told apart by occurrence."""
    rng = rng or random.SystemRandom()
    seen: dict[str, int] = {}
    items: list[Item] = []
    remembered: dict[str, list[int]] = {}
    for job in jobs:
        spec = _job_spec(job, defaults)
        spec_key = digest(spec)
        occurrence = seen.get(spec_key, 0)
        seen[spec_key] = occurrence + 1
        slot = f"{spec_key}-{occurrence}"
        if job.seed is not None:
            seeds = [job.seed + k for k in range(job.count)]
        else:
            seeds = list(drawn_seeds.get(slot, []))[: job.count]
            seeds += [rng.randrange(0, 2**32) for _ in range(job.count - len(seeds))]
            remembered[slot] = seeds
        for k, seed in enumerate(seeds):
            assert 0 <= seed <= MAX_SEED
            if job.name:
                item_id = job.name if job.count == 1 else f"{job.name}-{k + 1}"
            else:
                item_id = f"{job.index:03d}-{slugify(job.prompt)}" + (f"-{k + 1}" if job.count > 1 else "")
            items.append(Item(
                id=item_id, job_index=job.index, copy=k, prompt=job.prompt, negative_prompt=job.negative_prompt,
                width=job.width or defaults.size, height=job.height or defaults.size, seed=seed,
                cfg=spec["cfg"], steps=spec["steps"], sampler=job.sampler or defaults.sampler, name=job.name,
                seed_was_drawn=job.seed is None))
    _make_ids_unique(items)
    return items, remembered


def _make_ids_unique(items: list[Item]) -> None:
    # Job names are unique (validated), but a generated id can meet a name: number the later ones.
    taken: set[str] = set()
    for item in items:
        base, n = item.id, 2
        while item.id.lower() in taken:  # case-insensitive file systems
            item.id = f"{base}~{n}"
            n += 1
        taken.add(item.id.lower())


def binned_size(info: ModelInfo, width: int, height: int) -> tuple[int, int]:
    """The size the reference pipeline actually denoises at: the nearest entry of its aspect-ratio bins, or the
    size asked where the model has none."""
    return info.geometry.denoise_size(width, height)


def assign_keys(items: list[Item], info: ModelInfo, dtype: torch.dtype, encode_on_cpu: bool = False,
                text_encoder_8bit: bool = False) -> dict[str, str]:
    """Key each artifact to everything that decides its content. Returns text key -> text for the embeddings.

    An embedding: the tokenizer, T5, the dtype it is stored in, the token length, caption cleaning, where T5 ran
    (the CPU computes in float32) and whether in 8 bits. A latent: the DiT, the scheduler config, the dtype, both
    embeddings, and the item's size, steps, guidance, seed and sampler. An image: its latent, the VAE and the
    run's dtype. Precision fallbacks (`Settings.upcast`, batch sizes) are not part of a key: they change rounding,
    not what an artifact is, and apply to what is still to make."""
    dtype_name = str(dtype)
    encoder = (KEY_FORMAT, info.identity["tokenizer"], info.identity["text_encoder"], dtype_name,
               info.max_sequence_length, caption_cleaning(), "cpu-float32" if encode_on_cpu else "device",
               "int8" if text_encoder_8bit else "16-bit")
    decoder = (KEY_FORMAT, info.identity["vae"], dtype_name)
    texts: dict[str, str] = {}
    for item in items:
        item.prompt_key = digest("embed", encoder, item.prompt)
        item.negative_key = digest("embed", encoder, item.negative_prompt)
        texts[item.prompt_key] = item.prompt
        texts[item.negative_key] = item.negative_prompt
        item.latent_key = digest("latent", KEY_FORMAT, info.identity["transformer"], info.identity["scheduler"],
                                 dtype_name, item.prompt_key, item.negative_key, item.width, item.height,
                                 item.steps, item.cfg, item.seed, item.sampler)
        item.image_key = digest("image", item.latent_key, *decoder, item.width, item.height)
    return texts


def embed_shapes(info: ModelInfo) -> dict[str, tuple[int, ...]]:
    """The tensors of a finished embedding: one text's hidden states and its attention mask."""
    length = info.max_sequence_length
    return {"embeds": (length, info.text_dim), "mask": (length,)}


def latent_shapes(info: ModelInfo, item: Item) -> dict[str, tuple[int, ...]]:
    """The tensors of a finished latent: the item's latents at the size the reference denoises at."""
    return {"latents": tuple(info.geometry.latent_shape(item.width, item.height))}
