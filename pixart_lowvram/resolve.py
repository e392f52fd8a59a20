"""Step one of a run, before anything loads: what the settings and the model folder resolve to, and every input
check in one place. `resolve` reports every problem it finds together (settings, model folder, jobs), as
diffusers' `check_inputs` does, and touches no GPU: it creates no CUDA context and loads no weights."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .compiling import COMPILE_MODES
from .errors import InputErrors, PixartError, Problem, QueueError, UsageError
from .jobs import DEFAULT_STRENGTH, Job
from .lora import LoraFile, LoraFormatError, read_lora
from .models import ModelInfo, bitsandbytes_available, resolve_model, vae_dtype
from .memory import resolve_host_budget
from .placement import parse_size
from .presets import DEFAULT_MODEL


@dataclass
class Settings:
    """How to run a queue: what the command line's run options set."""

    model: str = DEFAULT_MODEL
    device: str = "auto"  # auto: cuda if there is one, else cpu
    dtype: str = "auto"  # auto: float16 on a GPU (as the reference), float32 on the CPU
    # Texts through T5 at once. 1 runs the reference pipeline's exact kernels (bit-identical embeddings);
    # larger batches are faster on big queues but change fp16 rounding (measured in BENCHMARKS.md).
    encode_batch: int = 1
    # images denoised at once (same size, steps and guidance); None: placement.auto_denoise_batch on a GPU, 1 on CPUs
    denoise_batch: int | None = None
    force: bool = False  # make every artifact again (the same ones: drawn seeds are kept)
    new_seeds: bool = False  # draw new seeds for jobs without one (earlier images are kept, new ones renamed)
    allow_pickle: bool = False  # load pickled .bin weights (they can run code when loaded) if no safetensors
    vram_budget: str | int | None = None  # whole-process GPU memory: bytes, "1.5GiB", "auto"; None: unconstrained
    encode_on_cpu: bool = False  # T5 on the CPU: no VRAM for the encoder, slow
    # T5 in 8 bits, diffusers' bitsandbytes recipe (CUDA only): ~7.4 GiB instead of ~10.7 for T5-XXL, loaded
    # shard by shard onto the GPU; embeddings deviate (BENCHMARKS.md, "Precision")
    text_encoder_8bit: bool = False
    embed_cache: str | Path | None = "default"  # prompt embeddings shared across runs; None: off
    # components that compute in float32 in a 16-bit run, where their 16-bit values overflow (text_encoder,
    # transformer, vae). A precision fallback, like the batch sizes: it applies to what is still to make and
    # redoes nothing finished
    upcast: tuple[str, ...] = ()
    # host RAM the whole process may hold (pinned buffers included): bytes, "16GiB", or "auto" (what the process
    # holds plus what the machine has available, less placement.HOST_MARGIN); None: unconstrained
    host_budget: str | int | None = "auto"
    # torch.compile the DiT's repeated blocks (compiling.py): "off", "on", or "auto" (on a GPU, for a denoise stage
    # long enough to pay for compiling). Not part of an artifact's key, like the batch sizes, but off unless asked:
    # compiled images were up to 3/255 from the plain pipeline's (BENCHMARKS.md, "Compiled images")
    compile: str = "off"


UPCASTABLE = ("text_encoder", "transformer", "vae")


@dataclass(frozen=True)
class Resolved:
    """What a run's settings come to on this machine, with the model read from its configs and headers."""

    settings: Settings
    info: ModelInfo
    device: torch.device
    dtype: torch.dtype
    budget: int | str | None  # whole-process GPU bytes; "auto": what the GPU has free when the run starts
    host_budget: int | None = None  # whole-process host RAM bytes; None: unconstrained (or unknown)
    loras: dict[str, LoraFile] = field(default_factory=dict)  # each LoRA path the jobs name -> what it holds

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def compute_dtype(self, component: str) -> torch.dtype:
        """What `component` computes in: float32 where asked to upcast; the VAE as `vae_dtype` decides (Σ's SDXL
        VAE in float32 in a float16 run); otherwise the run's dtype."""
        if component in self.settings.upcast:
            return torch.float32
        return vae_dtype(self.info, self.dtype) if component == "vae" else self.dtype


def resolve(jobs: list[Job], settings: Settings, *, hash_weights: bool = True) -> Resolved:
    """Resolve `settings` and the model, and check every input against them: raises the one problem found, or
    InputErrors with all of them (each keeps its own message). The options are checked first, all of them; the
    model folder only when they are sound, then the jobs against the model. Reads configs and safetensors
    headers, and (`hash_weights`, what a run keys its artifacts with) each weights file once, its hash cached."""
    problems, options = _options(settings)
    if problems:  # a run that cannot start does not fetch its model (a hub id downloads gigabytes)
        raise _together(problems)
    info = _attempt(problems, lambda: resolve_model(settings.model, settings.allow_pickle,
                                                    hash_weights=hash_weights))
    loras = None
    if info is not None:
        _attempt(problems, check_jobs, jobs, info)
        loras = _attempt(problems, check_loras, jobs, info, hash_weights)
    if problems:
        raise _together(problems)
    return Resolved(settings=settings, info=info, loras=loras, **options)


def jobs_with_options(load: Callable[[], list[Job]], settings: Settings,
                      more: list[PixartError] | tuple = ()) -> list[Job]:
    """The jobs `load` reads (a queue file, the command line's job options), with `settings` checked beside
    them: a queue that cannot be read and options that cannot work are told together, before anything loads.
    `more`: problems found before (how the processes would start, launch.launch_problems), told with them."""
    try:
        jobs = load()
    except QueueError as exc:
        problems, _ = _options(settings)
        raise _together([exc, *more, *problems]) from None
    if more:
        raise _together(list(more))
    return jobs


def check_options(settings: Settings) -> None:
    """Every option checked, without the model: raises the problems together (a run over several processes
    checks them for its first process's device before it starts the others)."""
    problems, _ = _options(settings)
    if problems:
        raise _together(problems)


def _attempt(problems: list[PixartError], check, *args):
    try:
        return check(*args)
    except PixartError as exc:
        problems.append(exc)
        return None


def _together(problems: list[PixartError]) -> PixartError:
    return problems[0] if len(problems) == 1 else InputErrors(problems)


def _options(settings: Settings) -> tuple[list[PixartError], dict]:
    """Every option checked: the problems found, and what the options resolve to."""
    problems: list[PixartError] = []
    device = _attempt(problems, resolve_device, settings.device)
    dtype = _attempt(problems, resolve_dtype, settings.dtype, device or torch.device("cpu"))
    if settings.text_encoder_8bit and device is not None:
        _attempt(problems, check_text_encoder_8bit, device, settings.encode_on_cpu)
    _attempt(problems, check_batches, settings)
    _attempt(problems, check_upcast, settings)
    _attempt(problems, check_compile, settings)
    budget = settings.vram_budget
    if isinstance(budget, str):
        budget = _attempt(problems, parse_size, budget)
    host_budget = _attempt(problems, resolve_host_budget, settings.host_budget)
    return problems, dict(device=device, dtype=dtype, budget=budget, host_budget=host_budget)


def check_upcast(settings: Settings) -> None:
    unknown = [c for c in settings.upcast if c not in UPCASTABLE]
    if unknown:
        raise UsageError(f"--upcast {','.join(unknown)}: not a component that can compute in float32 (choose from "
                         f"{', '.join(UPCASTABLE)})")


def check_compile(settings: Settings) -> None:
    if settings.compile not in COMPILE_MODES:
        raise UsageError(f"--compile {settings.compile!r}: choose {', '.join(COMPILE_MODES)}")


def check_batches(settings: Settings) -> None:
    for label, value in (("encode batch", settings.encode_batch), ("denoise batch", settings.denoise_batch)):
        if value is None and label == "denoise batch":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UsageError(f"{label} must be a positive integer, not {value!r}")

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def resolve_device(name: str) -> torch.device:
    """The device, with its index where it is a GPU ("cuda" -> "cuda:0"): tensors report theirs so, and a
    comparison with an index-less device would never be equal."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"--device {name!r}: not a device (try cpu, cuda or cuda:1)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name!r}: this torch sees no CUDA GPU (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name!r}: there are {torch.cuda.device_count()} CUDA GPU(s)")
        if device.index is None:  # the current device, without starting CUDA where nothing has yet
            device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
    elif device.type != "cpu":
        raise UsageError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UsageError(f"--dtype {name!r}: choose float16, bfloat16 or float32")
    return DTYPES[name]


def check_text_encoder_8bit(device: torch.device, encode_on_cpu: bool) -> None:
    """--text-encoder-8bit can work here: a CUDA GPU, bitsandbytes installed, T5 not asked onto the CPU."""
    if device.type != "cuda":
        raise UsageError(f"--text-encoder-8bit needs a CUDA GPU (bitsandbytes' 8-bit layers run only there); this "
                         f"run is on the {device.type.upper()}, where T5 runs in float32 without it")
    if encode_on_cpu:
        raise UsageError("--text-encoder-8bit and --text-encoder-on-cpu exclude each other: choose one")
    if not bitsandbytes_available():
        raise UsageError("--text-encoder-8bit needs bitsandbytes: pip install 'pixart-lowvram[8bit]'")


def check_jobs(jobs: list[Job], info: ModelInfo) -> None:
    """What a job asks of this model that its reference pipeline cannot do, found before any weights load: a
    QueueError listing every problem. Reads only the scheduler config (diffusers' own checks in set_timesteps)."""
    from .samplers import NAMES, SAMPLERS, takes_timesteps  # noqa: PLC0415

    kind, defaults = info.kind, info.defaults
    tried: dict[tuple[str, int], str | None] = {}
    problems = []
    for job in jobs:
        sampler = job.sampler or defaults.sampler
        steps = defaults.steps if job.steps is None else job.steps
        where = dict(job_index=job.index, job_name=job.name)
        for name, side in (("width", job.width), ("height", job.height)):
            wrong = info.geometry.side_problem(side or defaults.size)
            if wrong:
                message, hint = wrong
                default = "" if side else " (the model's default size)"
                problems.append(Problem(f"{message}{default}", field=name, hint=hint, **where))
        if job.init_image is not None:
            problems += _img2img_problems(job, kind, len(kind.timesteps) if kind.timesteps else steps, where)
        if sampler not in NAMES and sampler != info.sampler:
            problems.append(Problem(f"unknown sampler {sampler!r} (known: {', '.join(NAMES)})", field="sampler",
                                    **where))
            continue
        one_step_ok = SAMPLERS[sampler].returns_denoised if sampler in SAMPLERS else False
        if kind.timesteps:
            if steps != len(kind.timesteps):
                problems.append(Problem(f"{kind.title} runs exactly {len(kind.timesteps)} step(s) (at timestep "
                                        f"{', '.join(map(str, kind.timesteps))}), not {steps}", field="steps",
                                        hint="leave steps out", **where))
            if not (takes_timesteps(sampler, info.scheduler_class) and one_step_ok):  # both, where both are wrong
                fits = [n for n in NAMES if SAMPLERS[n].returns_denoised and takes_timesteps(n, info.scheduler_class)]
                problems.append(Problem(f"{kind.title} needs a sampler that starts at its fixed timestep and returns "
                                        f"the denoised sample, not {sampler!r}", field="sampler",
                                        hint=f"one of: {', '.join(fits)}", **where))
            continue
        if steps == 1 and info.pipeline_class == "PixArtAlphaPipeline" and not one_step_ok:
            # PixArtAlphaPipeline takes step()[1], the denoised sample, for a single step: these have none
            fits = [n for n in NAMES if SAMPLERS[n].returns_denoised]
            problems.append(Problem(f"one step with sampler {sampler!r} cannot run in {info.pipeline_class}",
                                    field="steps", hint=f"use 2 steps or more, or one of: {', '.join(fits)}",
                                    **where))
            continue
        if (sampler, steps) not in tried:
            tried[(sampler, steps)] = _scheduler_refuses(info, sampler, steps)
        if tried[(sampler, steps)]:
            problems.append(Problem(f"sampler {sampler!r} cannot run {steps} steps: {tried[(sampler, steps)]}",
                                    field="steps", **where))
    if problems:
        raise QueueError(problems, source=f"{info.name} ({info.kind.title})")


def _img2img_problems(job: Job, kind, steps: int, where: dict) -> list[Problem]:
    """An image-to-image job runs int(steps x strength) of its steps, as diffusers' img2img pipelines do: none is
    an error (the reference would fail on an empty schedule)."""
    from .img2img import steps_to_run  # noqa: PLC0415

    strength = DEFAULT_STRENGTH if job.strength is None else job.strength
    if steps_to_run(steps, strength) >= 1:
        return []
    if kind.timesteps:
        hint = (f"{kind.title} runs one step: strength 1 noises the init image to its timestep "
                f"{kind.timesteps[0]} and denoises it in that step")
    else:
        hint = f"use strength {math.ceil(100 / steps) / 100:g} or more, or more steps"
    given = "" if job.strength is not None else " (the default)"
    return [Problem(f"strength {strength:g}{given} runs no step of {steps}: image-to-image runs int(steps x "
                    f"strength) of them", field="strength", hint=hint, **where)]


def check_loras(jobs: list[Job], info: ModelInfo, hash_files: bool = True) -> dict[str, LoraFile]:
    """Every LoRA the jobs name, read once and checked against the transformer's safetensors headers (lora.py): a
    QueueError naming, for each one that cannot be merged, the first job that names it and why. Returns path ->
    LoRA. `hash_files`: each LoRA's identity is hashed from its bytes (what the latents' keys hold)."""
    users: dict[str, list[Job]] = {}
    for job in jobs:
        for entry in job.lora:
            users.setdefault(entry.path, []).append(job)
    if not users:
        return {}
    transformer = info.headers.get("transformer")
    found, problems = {}, []
    for path, named_by in users.items():
        try:
            if transformer is None:
                raise LoraFormatError(f"{path}: a LoRA is merged into the transformer's safetensors weights, and "
                                      f"{info.path / 'transformer'} has none (pickled weights)")
            found[path] = read_lora(path, transformer, hash_files=hash_files)
        except LoraFormatError as exc:
            others = sorted({job.index for job in named_by[1:]} - {named_by[0].index})
            also = f"jobs {', '.join(map(str, others[:10]))}{' ...' if len(others) > 10 else ''} name it too"
            problems.append(Problem(str(exc), job_index=named_by[0].index, job_name=named_by[0].name, field="lora",
                                    hint=also if others else None))
    if problems:
        raise QueueError(problems, source=f"{info.name} ({info.kind.title})")
    return found


def _scheduler_refuses(info: ModelInfo, sampler: str, steps: int) -> str | None:
    """diffusers' own objection to `steps` for this sampler (e.g. LCM runs at most its original_inference_steps)."""
    from .models import load_scheduler  # noqa: PLC0415

    try:
        load_scheduler(info, sampler).set_timesteps(steps)
    except ValueError as exc:
        return str(exc)
    return None
