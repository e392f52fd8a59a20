"""The generation queue in four steps, plain data handed from each to the next:

  resolve  (resolve.py)    settings and model folder -> Resolved; every input check, every problem at once
  expand   (items.py)      jobs -> items with their seeds fixed, each artifact keyed to what makes it
  plan     (placement.py)  component sizes + budget + items -> Plan; pure
  run      (this file)     the stages in order (encode, vae-encode for image-to-image's init images, denoise,
                           decode), each handed one StageContext

On several GPUs (launch.py starts the processes, team.py connects them) each process is one rank and runs the
same four steps: rank 0 prepares the run folder and divides what is left between the ranks (share.py), and each
rank plans and runs the same stages on its own share (`_TeamRun`). The texts and the init images still to encode
are divided apart from the images (each encoded by one rank, for whichever ranks' images need it): every rank
encodes its part of both, all wait for one another once (`_TeamRun.encoded`), and denoising reads every encoding
from the run folder.

Each stage loads its component, works through every pending item, persists what it made and releases the
component before the next stage loads anything. What is already in the run folder (and made by the same model,
dtype and parameters) is skipped, so running the same queue again resumes it. `plan_queue` is the first three
steps alone: it reads configs and safetensors headers, loads no weights and touches no GPU."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import platform
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .decode import decode_items
from .compiling import shapes_to_compile
from .denoise import calls_by_shape, denoise_items, group_key, lora_groups, steps_run
from .encode import encode_texts
from .errors import Interrupted, OutOfMemory, PixartError, RankFailed
from .files import cache_dir
from .items import (Item, assign_keys, binned_sizes, embed_shapes, expand, init_shapes, latent_shapes,
                    one_per_latent)
from .jobs import Job
from .lora import LoraFile, LoraSet, lora_set
from .memory import GpuMemoryProbe, StageMeter, StageStats, process_start, release, resolve_host_budget
from .models import COMPONENTS, ModelInfo, component_sizes
from .placement import CUDA_CONTEXT, OOM_HINT_SHARE, Plan, PlanError, Sizes, format_plan, format_size, make_plan
from .reporting import Reporter
from .resolve import Resolved, Settings, resolve
from .run import EmbeddingCache, RunFolder
from .share import Work, divide_images, divide_inits, divide_texts
from .stage import StageContext
from .team import Team, TeamReporter, devices
from .vae_encode import InitImage, encode_images, pending_images

__all__ = ["RunResult", "Settings", "TeamPlan", "plan_queue", "plan_run", "plan_team", "run_queue"]

@dataclass
class RunResult:
    folder: Path
    items: list[Item]
    images: dict[str, Path]  # item id -> PNG
    stages: list[StageStats] = field(default_factory=list)
    made: dict[str, int] = field(default_factory=dict)  # stage -> artifacts made in this run
    device: str = ""
    dtype: str = ""
    left_alone: list[Path] = field(default_factory=list)  # images of jobs no longer in the queue, kept
    plan: Plan | None = None
    from_cache: int = 0  # embeddings taken from the shared cache instead of encoded
    failures: list[NonFinite] = field(default_factory=list)  # what overflowed, by stage
    ranks: list[RankRecord] = field(default_factory=list)  # a run over several processes: each one's part
    # when each step of this process's run happened: event -> time.time() (README, "The run folder")
    timeline: dict[str, float] = field(default_factory=dict)


COMPONENT_OF = {"encode": "text_encoder", "vae-encode": "vae", "denoise": "transformer", "decode": "vae"}
STAGES = tuple(COMPONENT_OF)


@dataclass(frozen=True)
class NonFinite:
    """Items a stage could not make: its component produced values that are not finite (an overflow of its
    dtype). Nothing of theirs was written; the rest of the queue went on."""

    stage: str
    component: str  # text_encoder, transformer or vae
    dtype: str  # what the component computed in
    items: tuple[str, ...]  # the items' ids

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        names = ", ".join(self.items[:8]) + (f" and {len(self.items) - 8} more" if len(self.items) > 8 else "")
        fix = (f"--upcast {self.component}" if self.dtype != "float32"
               else "a model whose weights do not overflow (float32 overflowed too)")
        return (f"{len(self.items)} image(s) not made: the {self.component} ({self.dtype}) gave non-finite values "
                f"in {self.stage} for {names}. Fix: run the same command again with {fix}; only these are redone.")


@dataclass
class RankRecord:
    """One rank's part in a run over several processes, as rank 0 gathers it for run.json and the summary."""

    rank: int
    device: str
    host: str
    gpu: str | None = None  # the GPU's name
    texts: int = 0  # texts it was given to encode
    inits: int = 0  # init images it was given to encode
    images: int = 0  # images in its share
    stages: list[StageStats] = field(default_factory=list)
    made: dict[str, int] = field(default_factory=dict)
    failures: list[NonFinite] = field(default_factory=list)
    seconds: float = 0.0  # from its share to the end of its last stage
    waited: float = 0.0  # of it, waiting for the other ranks to finish encoding
    plan: dict | None = None  # its own plan, for its share
    missing: str | None = None  # why rank 0 has no figures of it (it died, it did not answer in time)
    timeline: dict[str, float] = field(default_factory=dict)  # when each of its steps happened, as RunResult's
    # the images it made, for rank 0 to take without reading them again (RunFolder.known_pngs); not in run.json
    pngs: dict = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        return {**{k: v for k, v in vars(self).items() if k not in ("stages", "failures", "pngs")},
                "stages": [s.to_json() for s in self.stages], "failures": [f.to_json() for f in self.failures]}


def combined(name: str, stats: list[StageStats]) -> StageStats:
    """One stage over several ranks: what they made and how many loads they took together, the slowest one's time,
    the highest peaks (a budget is per GPU: each rank's own is in its record)."""
    ran = [s for s in stats if not s.skipped]
    if not ran:
        return StageStats(name, skipped=True)

    def most(attr: str):
        values = [getattr(s, attr) for s in ran if getattr(s, attr) is not None]
        return max(values) if values else None

    return StageStats(name, seconds=max(s.seconds for s in ran), load_seconds=most("load_seconds"),
                      items=sum(s.items for s in ran), loads=sum(s.loads for s in ran), torch_peak=most("torch_peak"),
                      torch_reserved_peak=most("torch_reserved_peak"), nvml_peak=most("nvml_peak"),
                      rss_peak=most("rss_peak"), ram_peak=most("ram_peak"), vram_budget=ran[0].vram_budget,
                      host_budget=ran[0].host_budget)


def merged(failures: list[NonFinite]) -> list[NonFinite]:
    """The ranks' non-finite records, one per stage, component and dtype."""
    items: dict[tuple[str, str, str], dict[str, None]] = {}
    for f in failures:
        items.setdefault((f.stage, f.component, f.dtype), {}).update(dict.fromkeys(f.items))
    return [NonFinite(*where, tuple(ids)) for where, ids in items.items()]


default_cache_dir = cache_dir  # the name the CLI and API users know


def planned_sizes(resolved: Resolved) -> Sizes:
    """The planner's sizes, each component counted in the dtype it computes in (`--upcast`: float32)."""
    settings = resolved.settings
    sizes = component_sizes(resolved.info, resolved.dtype, settings.text_encoder_8bit)
    if not settings.upcast:
        return sizes
    wide = component_sizes(resolved.info, torch.float32)
    fields = {"text_encoder": ("text_encoder", "text_encoder_block", "text_encoder_other"),
              "transformer": ("transformer", "transformer_block", "transformer_other"), "vae": ("vae",)}
    changes = {name: getattr(wide, name) for c in settings.upcast for name in fields[c]}
    if "vae" in settings.upcast:
        changes["vae_dtype_bytes"] = 4
    if {"text_encoder", "transformer"} & set(settings.upcast):
        changes["dtype_bytes"] = 4  # their activations: counted wide for both, which errs on the safe side
    return dataclasses.replace(sizes, **changes)


def plan_run(resolved: Resolved, items: list[Item], texts: int, context: int = CUDA_CONTEXT,
             inits: list[InitImage] | None = None) -> Plan:
    """Step three: each stage's placement for making `items`, `texts` of whose texts go through T5, and the init
    images of its image-to-image items through the VAE's encoder, or `inits` where given (a rank's share of a run
    over several processes: the init images it encodes may be for other ranks' items). Pure; the budget "auto"
    (what the GPU has free) is resolved by the run, which measures it."""
    settings = resolved.settings
    budget = resolved.budget if isinstance(resolved.budget, int) else None
    sizes = planned_sizes(resolved)
    binned = binned_sizes(resolved.info, items)
    denoise_batch = settings.denoise_batch
    if denoise_batch is None and resolved.device.type != "cuda":
        denoise_batch = 1  # the automatic batch is what paid on GPUs; on the CPU a batch is no faster
    init_sizes = ([size for it, size in zip(items, binned) if it.init_image] if inits is None
                  else [resolved.info.geometry.denoise_size(init.width, init.height) for init in inits])
    return make_plan(budget, sizes, binned, texts=max(1, texts), encode_batch=settings.encode_batch,
                     denoise_batch=denoise_batch, context=context, encode_on_cpu=settings.encode_on_cpu,
                     text_encoder_8bit=settings.text_encoder_8bit,
                     host_budget=resolved.host_budget if resolved.device.type == "cuda" else None,
                     init_sizes=init_sizes)


def image_work(item: Item, size: tuple[int, int], loras: Mapping[str, LoraFile], denoise: bool) -> Work:
    """An image to make, as share.py divides it: its size (binned), the steps left, and what loads a transformer
    and what shares a batch, as denoise.py tells them apart (an image to decode only needs neither). A LoRA set is
    named by its files and scales, which tell sets apart as denoise.set_key does (a file is one identity), without
    the files' hashes: `plan --gpus`, which hashes nothing, divides as the run will."""
    pixels = size[0] * size[1]
    if not denoise:
        return Work(item.image_key, pixels, 0)
    files = sorted((str(file.path), scale) for file, scale in lora_set(item.lora, loras).entries)
    return Work(item.image_key, pixels, steps_run(item), lora=repr(files), group=repr(group_key(item)))


def run_queue(jobs: list[Job], out: str | Path, settings: Settings | None = None,
              reporter: Reporter | None = None, stop: threading.Event | None = None,
              team: Team | None = None) -> RunResult:
    """Make every image of `jobs` in the run folder `out`, resuming what an earlier run left there.

    Setting `stop` (from another thread or a signal handler) ends the run at the next safe point with
    `Interrupted`; everything finished by then is kept. With `team` this process is one rank of a run over several
    (launch.py starts them; every rank calls this with the same jobs and settings, its own device): it makes its
    share, and rank 0's result holds every rank's part; the other ranks' results, only their own."""
    # Wall-clock times (time.time()) compare between the processes of a host: a run over several shows where each
    # one's time went, from the moment the process started.
    timeline = {"process start": process_start(), **(team.marks if team else {}), "run entered": time.time()}
    timeline = {event: at for event, at in timeline.items() if at is not None}
    settings, reporter, stop = settings or Settings(), reporter or Reporter(), stop or threading.Event()
    if team is None:
        resolved = resolve(jobs, settings)
        timeline["resolved"] = time.time()
        return _Run(jobs, resolved, RunFolder(out), reporter, stop, timeline).run()
    settings = shared_host_budget(settings, team.local_size)
    resolved = team.together(lambda: resolve(jobs, settings))
    timeline["resolved"] = time.time()
    return _TeamRun(jobs, resolved, RunFolder(out), reporter, stop, team, timeline).run()


def plan_queue(jobs: list[Job], settings: Settings | None = None, reporter: Reporter | None = None) -> Plan:
    """The plan `run_queue` would follow for all of `jobs`: configs and safetensors headers are read, nothing
    is loaded or written, and no GPU is touched. What the plan assumes is told through `reporter`."""
    resolved = _resolve_for_plan(jobs, settings or Settings(), reporter or Reporter())
    items, _ = expand(jobs, resolved.info.defaults, {})
    texts = {text for it in items for text in (it.prompt, it.negative_prompt)}
    return plan_run(resolved, items, len(texts))


@dataclass
class TeamPlan:
    """What a run over several processes would do with a whole queue, as `plan --gpus` shows it."""

    plans: list[Plan]  # each rank's, for its share
    shares: list[Share]
    lines: list[str]  # what the run says at its start (division_lines)


def plan_team(jobs: list[Job], devices_used: list[str], settings: Settings | None = None,
              reporter: Reporter | None = None) -> TeamPlan:
    """How a run over `devices_used` (each rank's device, rank 0 first, from `--gpus`) would divide all of `jobs`
    and place each rank's share, as a fresh run: rank 0's steps (expand, keys, its plan for all, the division)
    and each rank's plan, with rank 0's settings. Loads, hashes and writes nothing, starts no process and touches
    no GPU. The keys it divides by stand in for the run's (the weights are not hashed): they tell the same items
    and texts apart, which is all the counts depend on."""
    settings = shared_host_budget(settings or Settings(), len(devices_used))
    resolved = _resolve_for_plan(jobs, settings, reporter or Reporter())
    info = dataclasses.replace(resolved.info, identity={c: resolved.info.identity.get(c, "") for c in COMPONENTS})
    items, _ = expand(jobs, info.defaults, {})

    def pending(encode_on_cpu: bool) -> Pending:
        texts = assign_keys(items, info, resolved.dtype, encode_on_cpu, settings.text_encoder_8bit,
                            loras=resolved.loras)
        latents = one_per_latent(items)
        return Pending(texts, latents, items, pending_images(latents))

    todo = pending(settings.encode_on_cpu)
    whole = plan_run(resolved, items, len(todo.texts))
    on_cpu = whole["encode"].placement == "cpu"
    if on_cpu and not settings.encode_on_cpu:
        todo = pending(True)  # the run keys its embeddings so, and looks at what is left again
    shares = divide(todo, items, info, resolved.loras, len(devices_used), encode_on_cpu=on_cpu)
    labels = [f"rank {r} ({device})" for r, device in enumerate(devices_used)]
    plans = [plan_share(resolved, share, label=label) for share, label in zip(shares, labels)]
    return TeamPlan(plans, shares, division_lines(plans, shares, labels, devices_used, len(items), resolved,
                                                  kept=""))


def shared_host_budget(settings: Settings, processes: int) -> Settings:
    """Each process's settings where `processes` of a run share this machine: --host-budget auto is what the machine
    has, shared between them (a size given is each process's)."""
    if settings.host_budget == "auto" and processes > 1:
        whole = resolve_host_budget("auto")
        if whole is not None:
            return dataclasses.replace(settings, host_budget=whole // processes)
    return settings


def _resolve_for_plan(jobs: list[Job], settings: Settings, reporter: Reporter) -> Resolved:
    """Step one without hashing the weights, and what the plan assumes told through `reporter`."""
    resolved = resolve(jobs, settings, hash_weights=False)
    if resolved.budget == "auto":
        reporter.info("--vram-budget auto is what the GPU has free when a run starts: planned here without a limit")
    elif resolved.budget is not None and resolved.device.type != "cuda":
        reporter.info(f"planned for a GPU with this budget; on this machine the run would use the "
                      f"{resolved.device.type.upper()}, where --vram-budget does not apply")
    return resolved


@dataclass
class Pending:
    """What is left to make: texts to encode (key -> text), items to denoise, items to decode, and init images to
    encode (those the image-to-image items among the latents need)."""

    texts: dict[str, str]
    latents: list[Item]
    images: list[Item]
    inits: list[InitImage] = field(default_factory=list)


@dataclass
class Share:
    """One rank's part of what is left, as rank 0 divides it."""

    todo: Pending  # its inits: init images it encodes, which other ranks' images may need
    encode_on_cpu: bool  # where T5 runs, the same on every rank: an embedding's key says where it was made
    largest: Item  # what a rank with no images plans for: the largest image of the queue
    # the call shapes every rank compiles: those one process would compile for all that is left, so that the images
    # do not depend on the number of GPUs (compiled and eager ones differ by float16 rounding)
    compile_shapes: frozenset = frozenset()


def divide(todo: Pending, queue: list[Item], info: ModelInfo, loras: Mapping[str, LoraFile], ranks: int, *,
           encode_on_cpu: bool, compile_shapes: frozenset = frozenset()) -> list[Share]:
    """What is left (`todo`, of the items `queue`) divided between `ranks` processes (share.py): the images by cost,
    with their latents to make where `todo` has them, the texts by count, the init images by pixels. Pure: a run's
    rank 0 and `plan --gpus` both divide with it. `encode_on_cpu`: where rank 0's plan for all of it puts T5."""
    # One piece of work per latent key: the images that share it go to one rank, which makes it once.
    denoise = {it.latent_key for it in todo.latents}
    firsts = one_per_latent(todo.images)
    work = [image_work(it, size, loras, it.latent_key in denoise)
            for it, size in zip(firsts, binned_sizes(info, firsts))]
    image_shares = divide_images(work, ranks)
    text_shares = divide_texts(list(todo.texts), ranks)
    init_pixels = [(init.key, w * h) for init in todo.inits
                   for w, h in [info.geometry.denoise_size(init.width, init.height)]]
    init_shares = divide_inits(init_pixels, [len(texts) for texts in text_shares])
    everything = todo.images or queue
    largest = max(zip(binned_sizes(info, everything), everything), key=lambda s: s[0][0] * s[0][1])[1]
    shares = []
    for images, texts, inits in zip(image_shares, text_shares, init_shares):
        keys = {firsts[i].latent_key for i in images}
        shares.append(Share(Pending({k: todo.texts[k] for k in texts}, [it for it in todo.latents if it.latent_key in keys],
                                    [it for it in todo.images if it.latent_key in keys],
                                    [todo.inits[i] for i in inits]), encode_on_cpu, largest, compile_shapes))
    return shares


def plan_share(resolved: Resolved, share: Share, context: int = CUDA_CONTEXT, label: str = "a rank") -> Plan:
    """A rank's plan for its share, within its own budget (`resolved.budget`). A PlanError where the budget would
    move T5 to the CPU while rank 0's plan keeps it on the GPU: every rank must encode alike."""
    resolved = dataclasses.replace(resolved, settings=dataclasses.replace(resolved.settings,
                                                                          encode_on_cpu=share.encode_on_cpu))
    plan = plan_run(resolved, share.todo.images or [share.largest], len(share.todo.texts), context,
                    inits=share.todo.inits)
    if plan["encode"].placement == "cpu" and not share.encode_on_cpu:
        raise PlanError(f"{label}: its budget leaves no room for T5 on its GPU, where rank 0's does; every rank must "
                        "encode alike (an embedding's key says where it was made): give every GPU the same room "
                        "(--vram-budget), or --text-encoder-on-cpu")
    return plan


def _placements(plan: Plan) -> list[tuple]:
    """A plan less its figures, which follow each share's size."""
    return [(st.placement, st.batch, st.ahead, st.resident_blocks, st.hold_in_ram, st.room, st.tile, bool(st.spill))
            for st in plan.stages.values()]


def division_lines(plans: list[Plan], shares: list[Share], labels: list[str], devices_used: list[str], queue: int,
                   resolved: Resolved, kept: str = " (each rank's plan for its share is in run.json)") -> list[str]:
    """What a run over several processes says at its start, and `plan --gpus` before it: rank 0's plan, and any
    other rank's that places a component otherwise (`kept`: where the others' are to be read); what each rank
    makes; with LoRAs, the sets each rank's transformer is loaded with."""
    lines = [f"{labels[0]}: {format_plan(plans[0])}"]
    same = [r for r in range(1, len(plans)) if _placements(plans[r]) == _placements(plans[0])]
    if same:
        lines.append(f"{', '.join(labels[r] for r in same)}: the same placements{kept}")
    lines += [f"{labels[r]}: {format_plan(plans[r])}" for r in range(1, len(plans)) if r not in same]

    def each(counts: list[int]) -> str:
        return f"{sum(counts)} ({' + '.join(map(str, counts))})"

    todo = [s.todo for s in shares]
    inits = f"{each([len(t.inits) for t in todo])} init image(s) to encode, " if any(t.inits for t in todo) else ""
    lines.append(
        f"{queue} image(s) in the queue, {sum(len(t.images) for t in todo)} to make over {len(shares)} processes: "
        f"{each([len(t.texts) for t in todo])} text(s) to encode, {inits}{each([len(t.latents) for t in todo])} "
        f"latent(s) to denoise, {each([len(t.images) for t in todo])} image(s) to decode "
        f"[{resolved.info.name}, {devices(devices_used)}, {resolved.dtype_name}]")
    if resolved.loras:
        for label, t in zip(labels, todo):
            sets = [lora_name(lora) for lora, _ in lora_groups(t.latents, resolved.loras)]
            lines.append(f"{label}: {len(sets)} transformer load(s), one per LoRA set{': ' if sets else ''}"
                         f"{'; '.join(sets)}")
    return lines


def lora_name(lora: LoraSet) -> str:
    """A LoRA set as a line shows it: each file's name and scale, or "no LoRA"."""
    return " + ".join(f"{Path(file.path).name} x{scale:g}" for file, scale in lora.entries) or "no LoRA"


class _Run:
    """Step four: the stages over one run folder, and the figures of each."""

    def __init__(self, jobs: list[Job], resolved: Resolved, folder: RunFolder, reporter: Reporter,
                 stop: threading.Event, timeline: dict[str, float] | None = None):
        self.jobs, self.resolved, self.folder, self.reporter, self.stop = jobs, resolved, folder, reporter, stop
        self.timeline = {} if timeline is None else timeline
        self.info, self.device, self.dtype, self.settings = (resolved.info, resolved.device, resolved.dtype,
                                                              resolved.settings)
        cache = self.settings.embed_cache
        self.cache = None if cache is None else EmbeddingCache(
            default_cache_dir() / "embeds" if cache == "default" else cache)
        self.items: list[Item] = []
        self.texts: dict[str, str] = {}
        self.drawn_seeds: dict[str, list[int]] = {}
        self.left_alone: list[Path] = []
        self.previous: dict = {}  # the earlier run's manifest ({} if none)
        self.renamed: list[tuple[Item, str]] = []  # items whose image took another name, and the one they had
        self.plan: Plan | None = None
        self.stages: list[StageStats] = []
        self.made: dict[str, int] = {}
        self.from_cache = 0
        self.failures: list[NonFinite] = []
        self.probe: GpuMemoryProbe | None = None
        self.context = CUDA_CONTEXT
        self.budget = resolved.budget
        self.read_pngs = True  # whether run.json's "done" may read an image this process does not know yet

    def mark(self, event: str) -> None:
        """`event` happens now, in this run's timeline."""
        self.timeline[event] = time.time()

    def start_device(self) -> None:
        """Create the CUDA context now, so that NVML sees this process, and measure it; resolve "auto"."""
        if self.device.type != "cuda":
            if self.budget is not None:
                self.reporter.info("--vram-budget applies to GPUs; this run is on the CPU")
                self.budget = None
            return
        torch.zeros(1, device=self.device)
        self.mark("device started")
        self.probe = GpuMemoryProbe(self.device)
        measured = self.probe.read()
        if measured:
            self.context = measured
        if self.budget == "auto":
            free, _ = torch.cuda.mem_get_info(self.device)
            self.budget = free + self.context

    # -- what is left to do ----------------------------------------------------------------------------------
    def prepare(self) -> None:
        earlier = self.folder.previous_run()
        if earlier.damage:
            self.reporter.info(earlier.damage)
        previous = earlier.manifest
        drawn = {} if self.settings.new_seeds else earlier.drawn_seeds
        self.items, remembered = expand(self.jobs, self.info.defaults, drawn)
        self.drawn_seeds = {**previous.get("drawn_seeds", {}), **remembered}
        self.texts = assign_keys(self.items, self.info, self.dtype, self.settings.encode_on_cpu,
                                 self.settings.text_encoder_8bit, loras=self.resolved.loras)
        self.previous = previous
        self.claim_image_names()
        self.left_alone = self.folder.images_left_behind(self.items, previous)
        if self.left_alone:
            names = ", ".join(p.name for p in self.left_alone[:5]) + (", ..." if len(self.left_alone) > 5 else "")
            self.reporter.info(f"{len(self.left_alone)} image(s) of jobs no longer in the queue are left in place "
                               f"({names})")
        self.write_manifest()

    def claim_image_names(self) -> None:
        """Image files for the items' current keys: a finished image from other parameters is never replaced."""
        for item, former in self.renamed:
            item.id = former
        self.renamed = self.folder.claim_image_names(self.items, self.previous)
        for item, former in self.renamed:
            self.reporter.info(f"{self.folder.images / (former + '.png')} holds an image made from other "
                               f"parameters: kept; the new one is {item.id}.png")

    def pending_images(self) -> list[Item]:
        if self.settings.force:
            return list(self.items)
        return self.folder.unfinished_images(self.items)

    def pending_latents(self, items: list[Item]) -> list[Item]:
        """The latents `items` need that are not made yet, one item for each (items.by_latent)."""
        items = one_per_latent(items)
        if self.settings.force:
            return items
        return self.folder.unfinished_latents(items, lambda it: latent_shapes(self.info, it))

    def pending_texts(self, items: list[Item]) -> dict[str, str]:
        needed = {}
        for it in items:
            needed[it.prompt_key] = it.prompt
            needed[it.negative_key] = it.negative_prompt
        if self.settings.force:
            return needed
        shape = embed_shapes(self.info)
        return {k: t for k, t in needed.items()
                if self.folder.read_tensors(self.folder.embed_path(k), k, shape) is None}

    def pending_inits(self, items: list[Item]) -> list[InitImage]:
        """The init image encodings the image-to-image items among `items` (latents to make) still need."""
        wanted = [it for it in items if it.init_key]
        if not self.settings.force:
            wanted = [it for it in wanted if self.folder.read_tensors(
                self.folder.latent_path(it.init_key), it.init_key, init_shapes(self.info, it)) is None]
        return pending_images(wanted)

    def restore_from_cache(self, texts: dict[str, str]) -> dict[str, str]:
        """Take what the shared cache holds; return the texts still to encode."""
        if self.cache is None or self.settings.force:
            return texts
        shape = embed_shapes(self.info)
        left = {k: t for k, t in texts.items() if not self.cache.restore(k, shape, self.folder)}
        self.from_cache = len(texts) - len(left)
        if self.from_cache:
            self.reporter.info(f"encode: {self.from_cache} embedding(s) from the shared cache ({self.cache.path})")
        return left

    # -- the stages ------------------------------------------------------------------------------------------
    def stage(self, name: str, count: int, work) -> list[str]:
        """Run one stage under a meter, then release its component; a stage with nothing to do loads nothing.
        `work(ctx)` does the stage's work and returns how many artifacts it made. Returns what came out
        non-finite (text keys for encode, item ids after)."""
        meter = StageMeter(name, self.device, self.probe, host_budget=self.resolved.host_budget,
                           vram_budget=self.budget if isinstance(self.budget, int) else None)
        if count == 0:
            meter.stats.skipped = True
            self.stages.append(meter.stats)
            self.idle(name)
            return []
        ctx = StageContext(info=self.info, folder=self.folder, device=self.device, dtype=self.dtype,
                           plan=self.plan[name], reporter=self.reporter, meter=meter, stop=self.stop,
                           compute_dtype=self.resolved.compute_dtype(COMPONENT_OF[name]))
        started = time.time()
        self.timeline[f"{name} start"] = started
        try:
            ctx.checkpoint()
            with meter:
                made = work(ctx)
                release(self.device, meter.components)
        except torch.OutOfMemoryError as exc:
            release(self.device)
            self.stopped(name, ctx, meter.stats, started)
            raise OutOfMemory(self.oom_message(name, meter.stats)) from exc
        except (KeyboardInterrupt, Interrupted) as exc:
            self.stopped(name, ctx, meter.stats, started)
            raise Interrupted(f"stopped during {name}; finished work is kept in {self.folder.path}.\n"
                              "  Run the same command again to resume.") from exc
        meter.stats.items = made
        self.made[name] = made
        self.ended(meter.stats, started)
        return ctx.failed

    def stopped(self, name: str, ctx: StageContext, stats: StageStats, started: float) -> None:
        """A stage stopped part way (out of memory, a stop asked for, another rank gone): what it wrote by then is
        what it made."""
        stats.items = self.made[name] = ctx.made
        self.ended(stats, started)

    def ended(self, stats: StageStats, started: float) -> None:
        """A stage is over (done, or stopped): its figures, its moments, run.json."""
        if stats.load_seconds is not None:
            self.timeline[f"{stats.name} loaded"] = started + stats.load_seconds
        self.mark(f"{stats.name} end")
        self.stages.append(stats)
        self.write_manifest()

    def idle(self, stage: str) -> None:
        self.reporter.info(f"{stage}: nothing to do")

    def overflowed(self, stage: str, failed: list[str], items: list[Item]) -> set[str]:
        """Record the items a stage's non-finite values leave unmade (`failed`: the keys or item ids its context
        recorded); their ids."""
        bad = set(failed)
        lost = [it.id for it in items if bad & {it.id, it.prompt_key, it.negative_key, it.init_key, it.latent_key}]
        if not lost:
            return set()
        component = COMPONENT_OF[stage]
        failure = NonFinite(stage, component, str(self.resolved.compute_dtype(component)).removeprefix("torch."),
                            tuple(lost))
        self.failures.append(failure)
        self.reporter.info(str(failure))
        self.write_manifest()
        return set(lost)

    def oom_message(self, stage: str, stats: StageStats) -> str:
        total = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        reached = stats.nvml_peak or stats.torch_reserved_peak
        # A budget a little under what this run reached, or under the card, makes the planner stream or tile.
        basis = min(v for v in (reached, total) if v) if (reached or total) else None
        hint = (f"--vram-budget {basis * OOM_HINT_SHARE / 2**30:.1f}GiB" if basis else "--vram-budget SIZE")
        if isinstance(self.budget, int):
            hint = f"a smaller --vram-budget than {format_size(self.budget)} (other programs may share the GPU)"
        return (f"the GPU ran out of memory in stage {stage} (torch peak {format_size(stats.torch_peak)}, "
                f"whole process {format_size(stats.nvml_peak)}, card {format_size(total)}).\n"
                f"  Finished work is kept in {self.folder.path}; run the same command again to resume.\n"
                f"  To fit: try {hint}; `pixart-lowvram plan QUEUE --vram-budget SIZE` shows what it does.")

    def pending(self) -> Pending:
        """What is left to make, and (`self.plan`) the plan for making it. Where the plan moves T5 to the CPU
        (fp32 there), its embeddings are other artifacts, keyed so: what is left is looked at again."""
        todo = self.left()
        self.plan = plan_run(dataclasses.replace(self.resolved, budget=self.budget), todo.images or self.items,
                             len(todo.texts), self.context)
        if self.plan["encode"].placement == "cpu" and not self.settings.encode_on_cpu:
            self.texts = assign_keys(self.items, self.info, self.dtype, encode_on_cpu=True,
                                     loras=self.resolved.loras)
            self.claim_image_names()
            todo = self.left()
        return todo

    def left(self) -> Pending:
        images = self.pending_images()
        latents = self.pending_latents(images)
        return Pending(self.restore_from_cache(self.pending_texts(latents)), latents, images,
                       self.pending_inits(latents))

    def run_stages(self, todo: Pending) -> None:
        """The stages over what is left: the texts, then the init images (vae-encode, where the plan has it); what
        these could not make (non-finite) denoise leaves out, and what denoise could not make, decode."""
        failed = self.stage("encode", len(todo.texts), lambda ctx: encode_texts(
            ctx, todo.texts, batch_size=self.plan["encode"].batch, cache=self.cache,
            eight_bit=self.settings.text_encoder_8bit))
        unencoded: list[str] = []
        if "vae-encode" in self.plan.stages:  # image-to-image: a queue without init images has no such stage
            unencoded = self.stage("vae-encode", len(todo.inits), lambda ctx: encode_images(ctx, todo.inits))
        failed, unencoded = self.encoded(failed, unencoded)
        lost = self.overflowed("encode", failed, todo.images)
        lost |= self.overflowed("vae-encode", unencoded, todo.images)
        latents = [it for it in todo.latents if it.id not in lost]
        images = [it for it in todo.images if it.id not in lost]
        batch = self.plan["denoise"].batch
        compile_shapes = self.compile_shapes(latents, batch)
        failed = self.stage("denoise", len(latents), lambda ctx: denoise_items(
            ctx, latents, batch_size=batch, loras=self.resolved.loras, compile_shapes=compile_shapes))
        lost = self.overflowed("denoise", failed, images)  # every image of a latent key that failed
        images = [it for it in images if it.id not in lost]
        failed = self.stage("decode", len(images), lambda ctx: decode_items(ctx, images))
        self.overflowed("decode", failed, images)

    def compile_shapes(self, latents: list[Item], batch: int) -> set:
        """The call shapes the denoise stage compiles (compiling.shapes_to_compile) for `latents` in batches of
        `batch`."""
        return shapes_to_compile(self.settings.compile, self.device,
                                 calls_by_shape(self.info, latents, batch, self.resolved.loras))

    def encoded(self, texts: list[str], inits: list[str]) -> tuple[list[str], list[str]]:
        """Once the texts and init images are encoded, the keys of those that came out non-finite (a rank of
        several waits for every rank's)."""
        return texts, inits

    def run(self) -> RunResult:
        self.start_device()
        with self.folder:
            self.prepare()
            todo = self.pending()
            self.mark("planned")
            self.reporter.info(format_plan(self.plan))
            self.reporter.info(
                f"{len(self.items)} image(s) in the queue, {len(todo.images)} to make: {len(todo.texts)} text(s) "
                f"to encode, {len(todo.latents)} latent(s) to denoise, {len(todo.images)} image(s) to decode "
                f"[{self.info.name}, {self.device}, {self.resolved.dtype_name}]")
            self.run_stages(todo)
        return self.result()

    def result(self) -> RunResult:
        images = {it.id: self.folder.image_path(it) for it in self.items}
        return RunResult(folder=self.folder.path, items=self.items, images=images, stages=self.stages,
                         made=self.made, device=str(self.device), dtype=self.resolved.dtype_name,
                         left_alone=self.left_alone, plan=self.plan, from_cache=self.from_cache,
                         failures=self.failures, timeline=self.timeline)

    def write_manifest(self) -> None:
        self.folder.write_manifest(self.manifest())

    def manifest(self) -> dict:
        import diffusers  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        items = self.folder.manifest_items(self.items, self.read_pngs)
        return {
            "version": 1,
            "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": {"source": self.info.source, "path": str(self.info.path),
                      "pipeline": self.info.pipeline_class, "identity": self.info.identity},
            "settings": {"device": str(self.device), "dtype": self.resolved.dtype_name,
                         "encode_batch": self.settings.encode_batch, "denoise_batch": self.settings.denoise_batch,
                         "max_sequence_length": self.info.geometry.max_sequence_length,
                         "text_encoder_8bit": self.settings.text_encoder_8bit,
                         "upcast": list(self.settings.upcast), "compile": self.settings.compile},
            "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "memory_source": self.probe.source if self.probe else None,
            "vram_budget": self.budget,
            "host_budget": self.resolved.host_budget,
            "plan": {name: dataclasses.asdict(st) for name, st in self.plan.stages.items()} if self.plan else None,
            "versions": {"pixart_lowvram": __version__, "torch": torch.__version__,
                         "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "drawn_seeds": self.drawn_seeds,
            "left_alone": [str(p.relative_to(self.folder.path)) for p in self.left_alone],
            "items": items,
            "stages": [s.to_json() for s in self.stages],
            "non_finite": [f.to_json() for f in self.failures],
            "timeline": self.timeline,
        }


class _TeamRun(_Run):
    """Step four on one rank of several (team.py). Rank 0 opens the run folder (its lock stands for the whole run),
    prepares it as one process would and divides what is left (share.py); every rank plans its own share within
    its own GPU's budget and runs the same stages on it. Each text and each init image is encoded by one rank,
    and every rank waits for all of them before it denoises; a rank then decodes what it denoised. Rank 0 gathers
    every rank's figures into run.json and the result. A rank that fails stops the others at their next safe
    point."""

    def __init__(self, jobs: list[Job], resolved: Resolved, folder: RunFolder, reporter: Reporter,
                 stop: threading.Event, team: Team, timeline: dict[str, float] | None = None):
        super().__init__(jobs, resolved, folder, TeamReporter(team, reporter), stop, timeline)
        self.team, self.console = team, reporter
        self.share: Share | None = None
        self.shares: list[Share] = []  # rank 0: every rank's
        # what run.json says of each rank until rank 0 has its record
        self.records = [RankRecord(m.rank, m.device, m.host, missing="at work") for m in team.members]
        self.seconds = self.waited = 0.0
        self.img2img = False  # rank 0: whether the run has a vae-encode stage, on any rank or none

    def run(self) -> RunResult:
        team = self.team
        try:
            self.start_device()
            # A failure from here to the plans is every rank's at once: each raises it, nobody waits for another.
            self.share = team.scatter(self.divide)
            self.mark("share received")
            # From here rank 0 writes run.json after each of its stages while the others make images: theirs are told
            # in their records at the end (read only where a record did not come: the rank died), not read meanwhile.
            self.read_pngs = False
            if team.rank != 0:
                self.items = self.share.todo.images
            self.plan = team.together(self.plan_share)
            plans = team.gather(self.plan)
            self.mark("plans gathered")
            return self.work(plans)
        finally:
            self.folder.close()

    # -- rank 0: what is left, divided -----------------------------------------------------------------------
    def divide(self) -> list[Share]:
        self.folder.open()
        self.prepare()
        todo = self.pending()  # rank 0's plan for all of it says where T5 runs, for every rank
        self.img2img = "vae-encode" in self.plan.stages
        compiled = frozenset(self.compile_shapes(todo.latents, self.plan["denoise"].batch))
        self.shares = divide(todo, self.items, self.info, self.resolved.loras or {}, self.team.size,
                             encode_on_cpu=self.plan["encode"].placement == "cpu", compile_shapes=compiled)
        return self.shares

    def compile_shapes(self, latents: list[Item], batch: int) -> set:
        if self.share is None:  # rank 0, deciding for all
            return super().compile_shapes(latents, batch)
        return set(self.share.compile_shapes)

    def plan_share(self) -> Plan:
        return plan_share(dataclasses.replace(self.resolved, budget=self.budget), self.share, self.context,
                          self.team.label(self.team.rank))

    def announce(self, plans: list[Plan]) -> None:
        """Rank 0: what `division_lines` says of the run (`plan --gpus` says the same); then the bars, summed over the
        ranks."""
        team = self.team
        for line in division_lines(plans, self.shares, [team.label(r) for r in range(team.size)],
                                   [m.device for m in team.members], len(self.items), self.resolved):
            self.console.info(line)
        todo = [s.todo for s in self.shares]
        totals = {"encode": sum(len(t.texts) for t in todo), "vae-encode": sum(len(t.inits) for t in todo),
                  "denoise": sum(steps_run(it) for t in todo for it in t.latents),  # image-steps, as the stage counts
                  "decode": sum(len(t.images) for t in todo)}
        team.show(self.console, {stage: n for stage, n in totals.items() if n})

    # -- every rank: its share -------------------------------------------------------------------------------
    def work(self, plans: list[Plan]) -> RunResult:
        team = self.team
        team.watch(self.stop)
        if team.rank == 0:
            self.announce(plans)
        error: PixartError | None = None
        start = time.perf_counter()
        try:
            self.run_stages(self.share.todo)
        except KeyboardInterrupt:
            error = Interrupted(f"stopped; finished work is kept in {self.folder.path}.\n"
                                "  Run the same command again to resume.")
        except PixartError as exc:
            error = exc
        except BaseException:
            with contextlib.suppress(RankFailed):  # the store is gone: nobody left to tell
                team.stop_all()  # whatever went wrong here, the others are not to go on for nothing
            raise
        self.seconds = time.perf_counter() - start
        self.mark("work end")
        return self.finish(error)

    def stage(self, name: str, count: int, work) -> list[str]:
        if count:
            self.team.enter(name)  # before its component loads: a rank that dies loading it is named in this stage
        return super().stage(name, count, work)

    def encoded(self, texts: list[str], inits: list[str]) -> tuple[list[str], list[str]]:
        """Wait for every rank to have encoded its texts and init images; what came out non-finite on any of them
        (every rank leaves out its own images that need one, as one process would)."""
        self.team.enter("the wait for the others after encoding")
        start = time.perf_counter()
        try:
            everyone = self.team.exchange("encoded", (texts, inits), self.stop)
        except Interrupted as exc:
            raise Interrupted(f"stopped after encoding; finished work is kept in {self.folder.path}.\n"
                              "  Run the same command again to resume.") from exc
        finally:
            self.waited = time.perf_counter() - start
        self.mark("encoded")  # by every rank
        return (sorted({key for keys, _ in everyone for key in keys}),
                sorted({key for _, keys in everyone for key in keys}))

    def idle(self, stage: str) -> None:
        pass  # rank 0 told what each rank has to do

    def finish(self, error: PixartError | None) -> RunResult:
        """Tell the others why this rank stopped (where it is the cause), hand rank 0 this rank's record; rank 0
        gathers them all into run.json and the result, or raises the error that stopped the team."""
        team = self.team
        following = team.stopped_by is not None and team.stopped_by != team.rank
        if error is not None and not following and not team.lost:
            with contextlib.suppress(RankFailed):  # the store is gone: nobody left to tell
                team.stop_all(error)
        m = team.members[team.rank]
        record = RankRecord(team.rank, m.device, m.host, gpu=torch.cuda.get_device_name(self.device)
                            if self.device.type == "cuda" else None, texts=len(self.share.todo.texts),
                            inits=len(self.share.todo.inits), images=len(self.share.todo.images),
                            stages=list(self.stages), made=dict(self.made),
                            failures=list(self.failures), seconds=self.seconds, waited=self.waited,
                            plan={name: dataclasses.asdict(st) for name, st in self.plan.stages.items()},
                            timeline=self.timeline, pngs=self.folder.known_pngs() if team.rank else {})
        if team.rank != 0:
            team.quiet()  # its last progress counted before rank 0 sees it is done
            if team.lost and isinstance(error, Interrupted):  # stopped because rank 0 went, not asked to
                error = team.lost_contact()
            if not team.lost:
                try:
                    self.mark("record posted")  # as it goes: the record carries it
                    team.post(record)
                except RankFailed as exc:
                    error = exc
            if error is not None:
                raise error
            return self.result()
        records = team.collect(record, self.stop)
        self.mark("records collected")
        team.quiet()  # the bars drawn to their end before anything else is printed
        for r, m in enumerate(team.members):
            self.records[r] = records.get(r) or RankRecord(r, m.device, m.host, missing=(
                "it ended unexpectedly" if r in team.dead else "it did not answer in time"))
            self.folder.learn_pngs(self.records[r].pngs)
        self.read_pngs = True
        present = [r for r in self.records if r.missing is None]
        # vae-encode where the queue's images to make have init images, as one process has it (a rank, only where
        # it was given some to encode)
        listed = {s.name for r in present for s in r.stages} | ({"vae-encode"} if self.img2img else set())
        self.stages = [combined(name, [s for r in present for s in r.stages if s.name == name]) for name in STAGES
                       if name != "vae-encode" or name in listed]
        self.made = {name: sum(r.made.get(name, 0) for r in present) for name in STAGES
                     if any(name in r.made for r in present)}
        self.failures = merged([f for r in present for f in r.failures])
        self.mark("run.json written")  # as it is written, which takes milliseconds: the file carries it
        self.write_manifest()
        gone = [r for r in team.dead if r != 0]
        if isinstance(error, Interrupted) and gone and not following:
            raise team.ended(gone[0])  # asked to stop (torchrun does so when a rank dies) while one had gone: it
        if error is not None and not following:
            raise error
        if team.stopper() not in (None, 0):
            raise team.cause() or error or RankFailed("another process of the run failed")
        if error is not None:
            raise error
        return self.result()

    def result(self) -> RunResult:
        result = super().result()
        result.ranks = self.records if self.team.rank == 0 else []
        return result

    def write_manifest(self) -> None:
        if self.team.rank == 0:
            super().write_manifest()

    def manifest(self) -> dict:
        data = super().manifest()
        made_by = {it.id: rank for rank, share in enumerate(self.shares) for it in share.todo.images}
        for entry in data["items"]:
            if entry["id"] in made_by:
                entry["rank"] = made_by[entry["id"]]  # the rank this run gave the image to
        return {**data, "ranks": [r.to_json() for r in self.records]}

