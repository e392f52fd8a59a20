"""The generation queue in four steps, plain data handed from each to the next:

  resolve  (resolve.py)    settings and model folder -> Resolved; every input check, every problem at once
  expand   (items.py)      jobs -> items with their seeds fixed, each artifact keyed to what makes it
  plan     (placement.py)  component sizes + budget + items -> Plan; pure
  run      (this file)     the stages in order (encode, vae-encode for image-to-image's init images, denoise,
                           decode), each handed one StageContext

Each stage loads its component, works through every pending item, persists what it made and releases the
component before the next stage loads anything. What is already in the run folder (and made by the same model,
dtype and parameters) is skipped, so running the same queue again resumes it. `plan_queue` is the first three
steps alone: it reads configs and safetensors headers, loads no weights and touches no GPU."""
from __future__ import annotations

import dataclasses
import datetime
import platform
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .decode import decode_items
from .denoise import denoise_items
from .encode import encode_texts
from .errors import Interrupted, OutOfMemory
from .files import cache_dir
from .items import Item, assign_keys, binned_sizes, embed_shapes, expand, init_shapes, latent_shapes
from .jobs import Job
from .memory import GpuMemoryProbe, StageMeter, StageStats, release
from .models import component_sizes
from .placement import CUDA_CONTEXT, OOM_HINT_SHARE, Plan, Sizes, format_plan, format_size, make_plan
from .reporting import Reporter
from .resolve import Resolved, Settings, resolve
from .run import EmbeddingCache, RunFolder
from .stage import StageContext
from .vae_encode import InitImage, encode_images, pending_images

__all__ = ["RunResult", "Settings", "plan_queue", "plan_run", "run_queue"]

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


COMPONENT_OF = {"encode": "text_encoder", "vae-encode": "vae", "denoise": "transformer", "decode": "vae"}


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


def plan_run(resolved: Resolved, items: list[Item], texts: int, context: int = CUDA_CONTEXT) -> Plan:
    """Step three: each stage's placement for making `items`, `texts` of whose texts go through T5. Pure; the
    budget "auto" (what the GPU has free) is resolved by the run, which measures it."""
    settings = resolved.settings
    budget = resolved.budget if isinstance(resolved.budget, int) else None
    sizes = planned_sizes(resolved)
    binned = binned_sizes(resolved.info, items)
    denoise_batch = settings.denoise_batch
    if denoise_batch is None and resolved.device.type != "cuda":
        denoise_batch = 1  # the automatic batch is what paid on GPUs; on the CPU a batch is no faster
    return make_plan(budget, sizes, binned, texts=max(1, texts), encode_batch=settings.encode_batch,
                     denoise_batch=denoise_batch, context=context, encode_on_cpu=settings.encode_on_cpu,
                     text_encoder_8bit=settings.text_encoder_8bit,
                     host_budget=resolved.host_budget if resolved.device.type == "cuda" else None,
                     init_sizes=[size for it, size in zip(items, binned) if it.init_image])


def run_queue(jobs: list[Job], out: str | Path, settings: Settings | None = None,
              reporter: Reporter | None = None, stop: threading.Event | None = None) -> RunResult:
    """Make every image of `jobs` in the run folder `out`, resuming what an earlier run left there.

    Setting `stop` (from another thread or a signal handler) ends the run at the next safe point with
    `Interrupted`; everything finished by then is kept."""
    resolved = resolve(jobs, settings or Settings())
    return _Run(jobs, resolved, RunFolder(out), reporter or Reporter(), stop or threading.Event()).run()


def plan_queue(jobs: list[Job], settings: Settings | None = None, reporter: Reporter | None = None) -> Plan:
    """The plan `run_queue` would follow for all of `jobs`: configs and safetensors headers are read, nothing
    is loaded or written, and no GPU is touched. What the plan assumes is told through `reporter`."""
    resolved = resolve(jobs, settings or Settings(), hash_weights=False)
    reporter = reporter or Reporter()
    if resolved.budget == "auto":
        reporter.info("--vram-budget auto is what the GPU has free when a run starts: planned here without a limit")
    elif resolved.budget is not None and resolved.device.type != "cuda":
        reporter.info(f"planned for a GPU with this budget; on this machine the run would use the "
                      f"{resolved.device.type.upper()}, where --vram-budget does not apply")
    items, _ = expand(jobs, resolved.info.defaults, {})
    texts = {text for it in items for text in (it.prompt, it.negative_prompt)}
    return plan_run(resolved, items, len(texts))


class _Run:
    """Step four: the stages over one run folder, and the figures of each."""

    def __init__(self, jobs: list[Job], resolved: Resolved, folder: RunFolder, reporter: Reporter,
                 stop: threading.Event):
        self.jobs, self.resolved, self.folder, self.reporter, self.stop = jobs, resolved, folder, reporter, stop
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

    def start_device(self) -> None:
        """Create the CUDA context now, so that NVML sees this process, and measure it; resolve "auto"."""
        if self.device.type != "cuda":
            if self.budget is not None:
                self.reporter.info("--vram-budget applies to GPUs; this run is on the CPU")
                self.budget = None
            return
        torch.zeros(1, device=self.device)
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
            self.reporter.info(f"{name}: nothing to do")
            return []
        ctx = StageContext(info=self.info, folder=self.folder, device=self.device, dtype=self.dtype,
                           plan=self.plan[name], reporter=self.reporter, meter=meter, stop=self.stop,
                           compute_dtype=self.resolved.compute_dtype(COMPONENT_OF[name]))
        try:
            ctx.checkpoint()
            with meter:
                made = work(ctx)
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
        return ctx.failed

    def overflowed(self, stage: str, failed: list[str], items: list[Item]) -> set[str]:
        """Record the items a stage's non-finite values leave unmade (`failed`: text keys or item ids); their ids."""
        if not failed:
            return set()
        bad = set(failed)
        lost = [it.id for it in items if bad & {it.id, it.prompt_key, it.negative_key, it.init_key}]
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

    def run(self) -> RunResult:
        self.start_device()
        with self.folder:
            self.prepare()
            todo_images = self.pending_images()
            todo_latents = self.pending_latents(todo_images)
            todo_texts = self.restore_from_cache(self.pending_texts(todo_latents))
            self.plan = plan_run(dataclasses.replace(self.resolved, budget=self.budget),
                                 todo_images or self.items, len(todo_texts), self.context)
            if self.plan["encode"].placement == "cpu" and not self.settings.encode_on_cpu:
                # The planner moved T5 to the CPU (fp32 there): those embeddings are other artifacts, keyed so.
                self.texts = assign_keys(self.items, self.info, self.dtype, encode_on_cpu=True,
                                         loras=self.resolved.loras)
                self.claim_image_names()
                todo_images = self.pending_images()
                todo_latents = self.pending_latents(todo_images)
                todo_texts = self.restore_from_cache(self.pending_texts(todo_latents))
            todo_inits = self.pending_inits(todo_latents)
            self.reporter.info(format_plan(self.plan))
            inits = f"{len(todo_inits)} init image(s) to encode, " if "vae-encode" in self.plan.stages else ""
            self.reporter.info(
                f"{len(self.items)} image(s) in the queue, {len(todo_images)} to make: {len(todo_texts)} text(s) "
                f"to encode, {inits}{len(todo_latents)} latent(s) to denoise, {len(todo_images)} image(s) to decode "
                f"[{self.info.name}, {self.device}, {self.resolved.dtype_name}]")
            failed = self.stage("encode", len(todo_texts), lambda ctx: encode_texts(
                ctx, todo_texts, batch_size=self.plan["encode"].batch, cache=self.cache,
                eight_bit=self.settings.text_encoder_8bit))
            lost = self.overflowed("encode", failed, todo_images)
            if "vae-encode" in self.plan.stages:  # image-to-image: a queue without init images has no such stage
                failed = self.stage("vae-encode", len(todo_inits), lambda ctx: encode_images(ctx, todo_inits))
                lost |= self.overflowed("vae-encode", failed, todo_images)
            todo_latents = [it for it in todo_latents if it.id not in lost]
            todo_images = [it for it in todo_images if it.id not in lost]
            failed = self.stage("denoise", len(todo_latents), lambda ctx: denoise_items(
                ctx, todo_latents, batch_size=self.plan["denoise"].batch, loras=self.resolved.loras))
            lost = self.overflowed("denoise", failed, todo_latents)
            todo_images = [it for it in todo_images if it.id not in lost]
            failed = self.stage("decode", len(todo_images), lambda ctx: decode_items(ctx, todo_images))
            self.overflowed("decode", failed, todo_images)
            images = {it.id: self.folder.image_path(it) for it in self.items}
        return RunResult(folder=self.folder.path, items=self.items, images=images, stages=self.stages,
                         made=self.made, device=str(self.device), dtype=self.resolved.dtype_name,
                         left_alone=self.left_alone, plan=self.plan, from_cache=self.from_cache,
                         failures=self.failures)

    def write_manifest(self) -> None:
        import diffusers  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        items = self.folder.manifest_items(self.items)
        self.folder.write_manifest({
            "version": 1,
            "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": {"source": self.info.source, "path": str(self.info.path),
                      "pipeline": self.info.pipeline_class, "identity": self.info.identity},
            "settings": {"device": str(self.device), "dtype": self.resolved.dtype_name,
                         "encode_batch": self.settings.encode_batch, "denoise_batch": self.settings.denoise_batch,
                         "max_sequence_length": self.info.geometry.max_sequence_length,
                         "text_encoder_8bit": self.settings.text_encoder_8bit,
                         "upcast": list(self.settings.upcast)},
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
        })
