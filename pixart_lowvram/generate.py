"""The generation queue, top to bottom: check inputs, open the run folder, encode, denoise, decode.

Each stage loads its component, works through every pending item, persists what it made and releases the
component before the next stage loads anything. What is already in the run folder (and made by the same model,
dtype and parameters) is skipped, so running the same queue again resumes it."""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .decode import decode_items
from .denoise import denoise_items
from .encode import encode_texts
from .errors import Interrupted, OutOfMemory, UsageError
from .jobs import Job
from .memory import GpuMemoryProbe, StageMeter, StageStats, format_bytes, release
from .items import Item, assign_keys, binned_size, expand
from .models import DEFAULT_MODEL, component_sizes, resolve_model
from .placement import CUDA_CONTEXT, Plan, format_plan, make_plan, parse_size
from .reporting import Reporter
from .resolve import check_jobs, check_text_encoder_8bit, resolve_device, resolve_dtype
from .run import EmbeddingCache, RunFolder


@dataclass
class Settings:
    model: str = DEFAULT_MODEL
    device: str = "auto"  # auto: cuda if there is one, else cpu
    dtype: str = "auto"  # auto: float16 on a GPU (as the reference), float32 on the CPU
    # Texts through T5 at once. 1 runs the reference pipeline's exact kernels (bit-identical embeddings);
    # larger batches are faster on big queues but change fp16 rounding (measured in BENCHMARKS.md).
    encode_batch: int = 1
    denoise_batch: int = 1  # images denoised at once (same size, steps and guidance)
    force: bool = False  # make every artifact again (the same ones: drawn seeds are kept)
    new_seeds: bool = False  # draw new seeds for jobs without one (earlier images are kept, new ones renamed)
    allow_pickle: bool = False  # load pickled .bin weights (they can run code when loaded) if no safetensors
    vram_budget: str | int | None = None  # whole-process GPU memory: bytes, "1.5GiB", "auto"; None: unconstrained
    encode_on_cpu: bool = False  # T5 on the CPU: no VRAM for the encoder, slow
    # T5 in 8 bits, diffusers' bitsandbytes recipe (CUDA only): ~7.4 GiB instead of ~10.7 for T5-XXL, loaded
    # shard by shard onto the GPU; embeddings deviate (BENCHMARKS.md, "Precision")
    text_encoder_8bit: bool = False
    embed_cache: str | Path | None = "default"  # prompt embeddings shared across runs; None: off


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


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pixart-lowvram"


class _Queue:
    """One run of the queue: the state shared by the three stages."""

    def __init__(self, jobs: list[Job], out: Path, settings: Settings, reporter: Reporter,
                 stop: threading.Event | None):
        self.settings = settings
        self.reporter = reporter
        self.stop = stop or threading.Event()
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        if settings.text_encoder_8bit:
            check_text_encoder_8bit(self.device, settings.encode_on_cpu)
        for label, value in (("encode batch", settings.encode_batch), ("denoise batch", settings.denoise_batch)):
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"{label} must be a positive integer, not {value!r}")
        budget = settings.vram_budget
        self.budget = parse_size(budget) if isinstance(budget, str) else budget
        self.info = resolve_model(settings.model, allow_pickle=settings.allow_pickle)
        check_jobs(jobs, self.info)
        self.folder = RunFolder(out)
        cache = settings.embed_cache
        self.cache = None if cache is None else EmbeddingCache(
            default_cache_dir() / "embeds" if cache == "default" else cache)
        self.jobs = jobs
        self.stages: list[StageStats] = []
        self.made: dict[str, int] = {}
        self.probe = None
        self.context = CUDA_CONTEXT
        if self.device.type == "cuda":
            torch.zeros(1, device=self.device)  # create the CUDA context now, so NVML sees this process
            self.probe = GpuMemoryProbe(self.device)
            measured = self.probe.read()
            if measured:
                self.context = measured
            if self.budget == "auto":
                free, _ = torch.cuda.mem_get_info(self.device)
                self.budget = free + self.context
        elif self.budget is not None:
            self.reporter.info("--vram-budget applies to GPUs; this run is on the CPU")
            self.budget = None

    # -- shapes of finished artifacts ------------------------------------------------------------------------
    def embed_shape(self) -> dict:
        length = self.info.max_sequence_length
        return {"embeds": (length, self.info.text_dim), "mask": (length,)}

    def latent_shape(self, item: Item) -> tuple[int, int, int]:
        w, h = binned_size(self.info, item.width, item.height)
        scale = self.info.vae_scale_factor
        return (self.info.latent_channels, h // scale, w // scale)

    # -- the run ---------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        earlier = self.folder.previous_run()
        if earlier.damage:
            self.reporter.info(earlier.damage)
        previous = earlier.manifest
        drawn = {} if self.settings.new_seeds else earlier.drawn_seeds
        self.items, remembered = expand(self.jobs, self.info.defaults, drawn)
        self.drawn_seeds = {**previous.get("drawn_seeds", {}), **remembered}
        self.texts = assign_keys(self.items, self.info, self.dtype, self.settings.encode_on_cpu,
                                 self.settings.text_encoder_8bit)
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
        for item, former in getattr(self, "renamed", []):
            item.id = former
        self.renamed = self.folder.claim_image_names(self.items, self.previous)
        for item, former in self.renamed:
            self.reporter.info(f"{self.folder.images / (former + '.png')} holds an image made from other "
                               f"parameters: kept; the new one is {item.id}.png")

    def checkpoint(self) -> None:
        """A safe point: everything finished so far is on disk. Stop here if the user asked to."""
        if self.stop.is_set():
            raise Interrupted("stop requested")

    def pending_images(self) -> list[Item]:
        if self.settings.force:
            return list(self.items)
        return self.folder.unfinished_images(self.items)

    def pending_latents(self, items: list[Item]) -> list[Item]:
        if self.settings.force:
            return items
        return self.folder.unfinished_latents(items, self.latent_shape)

    def pending_texts(self, items: list[Item]) -> dict[str, str]:
        needed = {}
        for it in items:
            needed[it.prompt_key] = it.prompt
            needed[it.negative_key] = it.negative_prompt
        if self.settings.force:
            return needed
        shape = self.embed_shape()
        return {k: t for k, t in needed.items()
                if self.folder.read_tensors(self.folder.embed_path(k), k, shape) is None}

    def restore_from_cache(self, texts: dict[str, str]) -> dict[str, str]:
        """Take what the shared cache holds; return the texts still to encode."""
        if self.cache is None or self.settings.force:
            return texts
        shape = self.embed_shape()
        left = {k: t for k, t in texts.items() if not self.cache.restore(k, shape, self.folder)}
        self.from_cache = len(texts) - len(left)
        if self.from_cache:
            self.reporter.info(f"encode: {self.from_cache} embedding(s) from the shared cache ({self.cache.path})")
        return left

    def make_plan(self, texts: int, items: list[Item]) -> Plan:
        from .encode import GROUP  # noqa: PLC0415

        sizes = component_sizes(self.info, self.dtype, self.settings.text_encoder_8bit)
        binned = [binned_size(self.info, it.width, it.height) for it in items] or [
            binned_size(self.info, it.width, it.height) for it in self.items]
        return make_plan(self.budget, sizes, binned, texts=max(1, min(texts, GROUP)),
                         encode_batch=self.settings.encode_batch, denoise_batch=self.settings.denoise_batch,
                         context=self.context, encode_on_cpu=self.settings.encode_on_cpu,
                         text_encoder_8bit=self.settings.text_encoder_8bit)

    def stage(self, name: str, count: int, work) -> None:
        """Run one stage under a meter, then release its component; a stage with nothing to do loads nothing."""
        meter = StageMeter(name, self.device, self.probe)
        if count == 0:
            meter.stats.skipped = True
            self.stages.append(meter.stats)
            self.reporter.info(f"{name}: nothing to do")
            return
        self.meter = meter
        try:
            self.checkpoint()
            with meter:
                made = work()
                release(self.device, meter.components)
        except torch.OutOfMemoryError as exc:
            release(self.device)
            self.stages.append(meter.stats)
            self.write_manifest()
            raise OutOfMemory(self.oom_message(name, meter.stats)) from exc
        except (KeyboardInterrupt, Interrupted) as exc:
            self.stages.append(meter.stats)
            self.write_manifest()
            raise Interrupted(f"stopped during {name}; finished work is kept in {self.folder.path}.\n"
                              "  Run the same command again to resume.") from exc
        meter.stats.items = made
        self.made[name] = made
        self.stages.append(meter.stats)
        self.write_manifest()

    def oom_message(self, stage: str, stats: StageStats) -> str:
        total = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        reached = stats.nvml_peak or stats.torch_reserved_peak
        # A budget a little under what this run reached, or under the card, makes the planner stream or tile.
        basis = min(v for v in (reached, total) if v) if (reached or total) else None
        hint = (f"--vram-budget {basis * 0.8 / 2**30:.1f}GiB" if basis else "--vram-budget SIZE")
        if self.budget not in (None, "auto") and isinstance(self.budget, int):
            hint = f"a smaller --vram-budget than {format_bytes(self.budget)} (other programs may share the GPU)"
        return (f"the GPU ran out of memory in stage {stage} (torch peak {format_bytes(stats.torch_peak)}, "
                f"whole process {format_bytes(stats.nvml_peak)}, card {format_bytes(total)}).\n"
                f"  Finished work is kept in {self.folder.path}; run the same command again to resume.\n"
                f"  To fit: try {hint}; `pixart-lowvram plan QUEUE --vram-budget SIZE` shows what it does.")

    def run(self) -> RunResult:
        with self.folder:
            self.prepare()
            todo_images = self.pending_images()
            todo_latents = self.pending_latents(todo_images)
            todo_texts = self.restore_from_cache(self.pending_texts(todo_latents))
            self.plan = self.make_plan(len(todo_texts), todo_images)
            if self.plan["encode"].placement == "cpu" and not self.settings.encode_on_cpu:
                # The planner moved T5 to the CPU (fp32 there): those embeddings are other artifacts, keyed so.
                self.texts = assign_keys(self.items, self.info, self.dtype, encode_on_cpu=True)
                self.claim_image_names()
                todo_images = self.pending_images()
                todo_latents = self.pending_latents(todo_images)
                todo_texts = self.restore_from_cache(self.pending_texts(todo_latents))
            self.reporter.info(format_plan(self.plan))
            self.reporter.info(
                f"{len(self.items)} image(s) in the queue, {len(todo_images)} to make: {len(todo_texts)} text(s) "
                f"to encode, {len(todo_latents)} latent(s) to denoise, {len(todo_images)} image(s) to decode "
                f"[{self.info.name}, {self.device}, {str(self.dtype).removeprefix('torch.')}]")
            common = dict(folder=self.folder, device=self.device, dtype=self.dtype, reporter=self.reporter,
                          checkpoint=self.checkpoint, loaded=lambda *components: self.meter.loaded(*components))
            self.stage("encode", len(todo_texts), lambda: encode_texts(
                self.info, todo_texts, batch_size=self.settings.encode_batch, plan=self.plan["encode"],
                cache=self.cache, eight_bit=self.settings.text_encoder_8bit, **common))
            self.stage("denoise", len(todo_latents), lambda: denoise_items(
                self.info, todo_latents, batch_size=self.plan["denoise"].batch, embed_shape=self.embed_shape(),
                plan=self.plan["denoise"], **common))
            self.stage("decode", len(todo_images), lambda: decode_items(
                self.info, todo_images, latent_shape=self.latent_shape, plan=self.plan["decode"], **common))
            images = {it.id: self.folder.image_path(it) for it in self.items}
        return RunResult(folder=self.folder.path, items=self.items, images=images, stages=self.stages,
                         made=self.made, device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
                         left_alone=self.left_alone, plan=self.plan, from_cache=getattr(self, "from_cache", 0))

    def write_manifest(self) -> None:
        import diffusers  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        items = self.folder.manifest_items(getattr(self, "items", []))
        self.folder.write_manifest({
            "version": 1,
            "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": {"source": self.info.source, "path": str(self.info.path),
                      "pipeline": self.info.pipeline_class, "identity": self.info.identity},
            "settings": {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                         "encode_batch": self.settings.encode_batch, "denoise_batch": self.settings.denoise_batch,
                         "max_sequence_length": self.info.max_sequence_length,
                         "text_encoder_8bit": self.settings.text_encoder_8bit},
            "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "memory_source": self.probe.source if self.probe else None,
            "vram_budget": self.budget,
            "plan": ({name: dataclasses.asdict(st) for name, st in self.plan.stages.items()}
                     if getattr(self, "plan", None) else None),
            "versions": {"pixart_lowvram": __version__, "torch": torch.__version__,
                         "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "drawn_seeds": getattr(self, "drawn_seeds", {}),
            "left_alone": [str(p.relative_to(self.folder.path)) for p in getattr(self, "left_alone", [])],
            "items": items,
            "stages": [s.to_json() for s in self.stages],
        })


def run_queue(jobs: list[Job], out: str | Path, settings: Settings | None = None,
              reporter: Reporter | None = None, stop: threading.Event | None = None) -> RunResult:
    """Make every image of `jobs` in the run folder `out`, resuming what an earlier run left there.

    Setting `stop` (from another thread or a signal handler) ends the run at the next safe point with
    `Interrupted`; everything finished by then is kept."""
    return _Queue(jobs, Path(out), settings or Settings(), reporter or Reporter(), stop).run()


def plan_queue(jobs: list[Job], settings: Settings | None = None, reporter: Reporter | None = None) -> Plan:
    """The plan `run_queue` would follow for all of `jobs` (nothing loaded, nothing written). Without a GPU, a
    --vram-budget SIZE gives the plan on a GPU with that budget (the reporter says so)."""
    settings, reporter = settings or Settings(), reporter or Reporter()
    queue = _Queue(jobs, Path("."), settings, Reporter(), None)
    if queue.device.type == "cpu" and settings.vram_budget is not None:
        queue.budget = plan_budget_without_gpu(settings.vram_budget)
        reporter.info(f"this machine's run would be on the CPU, where no budget applies: below is the plan on a "
                      f"GPU with --vram-budget {settings.vram_budget}")
    queue.items, _ = expand(jobs, queue.info.defaults, {})
    texts = {t for it in queue.items for t in (it.prompt, it.negative_prompt)}
    return queue.make_plan(len(texts), queue.items)


def plan_budget_without_gpu(budget: str | int) -> int:
    if budget == "auto":
        raise UsageError("--vram-budget auto measures what the GPU has free, and this run has no GPU: give a size "
                         "(e.g. --vram-budget 8GiB) to see the plan on such a card")
    return parse_size(budget) if isinstance(budget, str) else budget
