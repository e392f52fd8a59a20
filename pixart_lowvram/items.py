"""The queue's items: jobs expanded into one item per image (seeds fixed, sizes resolved), and the keys that tie
each artifact to what makes it."""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch

from .img2img import image_bytes
from .jobs import DEFAULT_STRENGTH, MAX_SEED, Job, JobDefaults
from .lora import LoraFile, lora_set
from .models import ModelInfo, caption_cleaning


KEY_FORMAT = 2  # part of every artifact's key: a change to what keys hold makes every artifact new
# What json.dumps(parts, sort_keys=True, default=str) builds on every call, built once: a long queue hashes
# a few keys per image.
_ENCODER = json.JSONEncoder(sort_keys=True, default=str)


def digest(*parts: object) -> str:
    """A short stable hash of JSON-able parts."""
    return hashlib.sha256(_ENCODER.encode(parts).encode()).hexdigest()[:24]


def slugify(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "image"


def prompt_folder_name(prompt: str, limit: int = 40) -> str:
    """`generate`'s default run folder for a prompt: its slug where that stands for the whole prompt, else the
    slug and a short hash of the prompt, so prompts that share their first 40 characters, or have no letters
    or digits at all (emoji), get folders of their own."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    if slug and len(slug) <= limit:
        return slug
    short = slug[:limit].rstrip("-") or "prompt"
    return f"{short}-{hashlib.sha256(prompt.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


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
    # LoRAs merged into the transformer for this image, as the job lists them: {"path", "scale"}; scale 0 left out
    lora: list[dict] = field(default_factory=list)
    # Where a drawn seed is remembered: the manifest's drawn_seeds[seed_slot][copy]. The PNG carries it too, so
    # a damaged manifest loses no drawn seed (RunFolder.recover_drawn_seeds). Empty for a seed the job gave.
    seed_slot: str = ""
    prompt_key: str = ""
    negative_key: str = ""
    latent_key: str = ""
    image_key: str = ""
    # Image-to-image: the init image's path, the strength, and the key of its encoding by the VAE (the
    # vae-encode stage's artifact); empty for a text-to-image item
    init_image: str = ""
    strength: float | None = None
    init_key: str = ""

    def to_json(self) -> dict:
        data = dict(vars(self))  # every field is a plain value: no deep copy (asdict) needed
        if not self.init_image:  # a text-to-image item is recorded as it always was
            for name in IMG2IMG_FIELDS:
                del data[name]
        return data

    def seed_record(self) -> dict[str, str]:
        """Where a drawn seed came from, as text metadata for the item's latents (its PNG has the whole item):
        what RunFolder.recover_drawn_seeds reads back when run.json is damaged. Empty for a seed the job gave."""
        if not self.seed_was_drawn:
            return {}
        return {"seed_slot": self.seed_slot, "copy": str(self.copy), "seed": str(self.seed)}


IMG2IMG_FIELDS = ("init_image", "strength", "init_key")


def _job_spec(job: Job, defaults: JobDefaults) -> dict:
    """What a job asks for, independent of where it sits in the queue, with the model's defaults filled in (a job
    that names the model's own sampler asks for what one that names none does). A job without LoRAs or an init
    image has the spec it had before either existed: the seeds drawn for it are found again."""
    spec = asdict(job)
    spec.pop("index")
    if not job.lora:
        del spec["lora"]
    if job.init_image is None:
        del spec["init_image"], spec["strength"]
    else:
        spec["strength"] = DEFAULT_STRENGTH if job.strength is None else job.strength
    spec["cfg"] = float(defaults.cfg if job.cfg is None else job.cfg)
    spec["steps"] = defaults.steps if job.steps is None else job.steps
    spec["sampler"] = job.sampler or defaults.sampler
    return spec


def expand(jobs: list[Job], defaults: JobDefaults, drawn_seeds: dict[str, list[int | None]],
           rng: random.Random | None = None) -> tuple[list[Item], dict[str, list[int]]]:
    """Jobs -> items, with the model's `defaults` for what a job leaves out. A job's seed gives seed, seed+1, ...
    to its copies; a missing seed is drawn at random, and remembered under the job's spec in `drawn_seeds` (kept
    in the manifest), so running the same queue again finds the same seeds; a None there (a copy whose seed could
    not be recovered) is drawn again. Identical jobs (the article's three 'supercar' jobs) are told apart by
    occurrence."""
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
            known = list(drawn_seeds.get(slot, []))[: job.count]
            known += [None] * (job.count - len(known))
            seeds = [rng.randrange(0, 2**32) if seed is None else seed for seed in known]
            remembered[slot] = seeds
        stem = job.name or f"{job.index:03d}-{slugify(job.prompt)}"
        for k, seed in enumerate(seeds):
            assert 0 <= seed <= MAX_SEED
            item_id = stem if job.count == 1 else f"{stem}-{k + 1}"
            items.append(Item(
                id=item_id, job_index=job.index, copy=k, prompt=job.prompt, negative_prompt=job.negative_prompt,
                width=job.width or defaults.size, height=job.height or defaults.size, seed=seed,
                cfg=spec["cfg"], steps=spec["steps"], sampler=job.sampler or defaults.sampler, name=job.name,
                lora=[{"path": e.path, "scale": e.scale} for e in job.lora if e.scale != 0],
                seed_was_drawn=job.seed is None, seed_slot="" if job.seed is not None else slot,
                init_image=job.init_image or "", strength=spec.get("strength")))
    _make_ids_unique(items)
    return items, remembered


def _make_ids_unique(items: list[Item]) -> None:
    """A name the user gave is theirs: named items keep their ids (unique, checked with the queue), and an id
    made from a prompt that meets one of them, or another made id, is numbered instead (001-cat~2).
    Compared ignoring case, for case-insensitive file systems."""
    taken = {item.id.lower() for item in items if item.name}
    for item in items:
        if item.name:
            continue
        base, n = item.id, 2
        while item.id.lower() in taken:
            item.id = f"{base}~{n}"
            n += 1
        taken.add(item.id.lower())


def binned_size(info: ModelInfo, width: int, height: int) -> tuple[int, int]:
    """The size the reference pipeline actually denoises at: the nearest entry of its aspect-ratio bins, or the
    size asked where the model has none."""
    return info.geometry.denoise_size(width, height)


def binned_sizes(info: ModelInfo, items: list[Item]) -> list[tuple[int, int]]:
    """binned_size of each item, each distinct size worked out once (a long queue asks for few sizes)."""
    known: dict[tuple[int, int], tuple[int, int]] = {}
    for item in items:
        if (item.width, item.height) not in known:
            known[(item.width, item.height)] = binned_size(info, item.width, item.height)
    return [known[(item.width, item.height)] for item in items]


def assign_keys(items: list[Item], info: ModelInfo, dtype: torch.dtype, encode_on_cpu: bool = False,
                text_encoder_8bit: bool = False, loras: Mapping[str, LoraFile] | None = None) -> dict[str, str]:
    """Key each artifact to everything that decides its content. Returns text key -> text for the embeddings.

    An embedding: the tokenizer, T5, the dtype it is stored in, the token length, caption cleaning, where T5 ran
    (the CPU computes in float32) and whether in 8 bits. A latent: the DiT, the scheduler config, the dtype, both
    embeddings, and the item's size, steps, guidance, seed and sampler, and its LoRAs' identities and scales
    (`loras`: path -> the LoRA read from it; in merge order, so the order a job lists them in does not count); for
    image-to-image also its strength and the init image's encoding: that image's content (sha256), the size it is
    encoded at, the VAE and the dtype. An image: its latent, the VAE and the run's dtype. Precision fallbacks
    (`Settings.upcast`, batch sizes) are not part of a key: they change rounding, not what an artifact is, and
    apply to what is still to make. Reads each init image once (its hash)."""
    dtype_name = str(dtype)
    encoder = (KEY_FORMAT, info.identity["tokenizer"], info.identity["text_encoder"], dtype_name,
               info.geometry.max_sequence_length, caption_cleaning(), "cpu-float32" if encode_on_cpu else "device",
               "int8" if text_encoder_8bit else "16-bit")
    decoder = (KEY_FORMAT, info.identity["vae"], dtype_name)
    texts: dict[str, str] = {}
    text_keys: dict[str, str] = {}  # text -> its key, each text hashed once (a job's copies share their texts)
    lora_keys: dict[tuple, list] = {}  # a job's LoRAs -> their part of the key, worked out once per job
    image_hashes: dict[str, str] = {}  # init image path -> sha256 of its content
    for item in items:
        for text in (item.prompt, item.negative_prompt):
            if text not in text_keys:
                text_keys[text] = digest("embed", encoder, text)
                texts[text_keys[text]] = text
        item.prompt_key = text_keys[item.prompt]
        item.negative_key = text_keys[item.negative_prompt]
        latent = ("latent", KEY_FORMAT, info.identity["transformer"], info.identity["scheduler"], dtype_name,
                  item.prompt_key, item.negative_key, item.width, item.height, item.steps, item.cfg, item.seed,
                  item.sampler)
        if item.lora:  # without LoRAs the key is what it always was: finished latents stay valid
            listed = tuple((e["path"], e["scale"]) for e in item.lora)
            if listed not in lora_keys:
                lora_keys[listed] = lora_set(item.lora, loras or {}).key()
            latent += ("lora", lora_keys[listed])
        if item.init_image:
            if item.init_image not in image_hashes:
                image_hashes[item.init_image] = image_bytes(item.init_image)[1]
            item.init_key = init_image_key(info, dtype, image_hashes[item.init_image], item.width, item.height)
            latent += ("img2img", item.init_key, item.strength)
        item.latent_key = digest(*latent)
        item.image_key = digest("image", item.latent_key, *decoder, item.width, item.height)
    return texts


def by_latent(items: list[Item]) -> dict[str, list[Item]]:
    """Items by their latent key, in queue order. Items of one key (identical jobs with a seed, copies whose seeds
    overlap, one job under two names) have the same latents and the same image: they are denoised and decoded once,
    and each name gets its own PNG."""
    groups: dict[str, list[Item]] = {}
    for item in items:
        groups.setdefault(item.latent_key, []).append(item)
    return groups


def one_per_latent(items: list[Item]) -> list[Item]:
    """The first item of each latent key among `items` (by_latent): what denoising them makes."""
    return [group[0] for group in by_latent(items).values()]


def init_image_key(info: ModelInfo, dtype: torch.dtype, sha256: str, width: int, height: int) -> str:
    """The key of an init image's encoding: the image's content, the size it is denoised (and so encoded) at, the
    VAE and the run's dtype."""
    return digest("init-image", KEY_FORMAT, info.identity["vae"], str(dtype), sha256,
                  *info.geometry.denoise_size(width, height))


def embed_shapes(info: ModelInfo) -> dict[str, tuple[int, ...]]:
    """The tensors of a finished embedding: one text's hidden states and its attention mask."""
    length = info.geometry.max_sequence_length
    return {"embeds": (length, info.geometry.text_dim), "mask": (length,)}


def latent_shapes(info: ModelInfo, item: Item) -> dict[str, tuple[int, ...]]:
    """The tensors of a finished latent: the item's latents at the size the reference denoises at."""
    return {"latents": tuple(info.geometry.latent_shape(item.width, item.height))}


def init_shapes(info: ModelInfo, item: Item) -> dict[str, tuple[int, ...]]:
    """The tensors of a finished init image encoding: the VAE's latent distribution (its mean and log-variance,
    `DiagonalGaussianDistribution.parameters`) at the size the item is denoised at."""
    channels, height, width = info.geometry.latent_shape(item.width, item.height)
    return {"moments": (2 * channels, height, width)}
