"""Resolving what a run asks for before anything loads: the device, the dtype, and what a job asks of the model
that its reference pipeline cannot do."""
from __future__ import annotations

import torch

from .errors import Problem, QueueError, UsageError
from .jobs import Job
from .models import ModelInfo, bitsandbytes_available

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
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
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


def _scheduler_refuses(info: ModelInfo, sampler: str, steps: int) -> str | None:
    """diffusers' own objection to `steps` for this sampler (e.g. LCM runs at most its original_inference_steps)."""
    from .models import load_scheduler  # noqa: PLC0415

    try:
        load_scheduler(info, sampler).set_timesteps(steps)
    except ValueError as exc:
        return str(exc)
    return None
