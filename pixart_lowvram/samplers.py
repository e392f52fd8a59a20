"""Samplers: the names a job gives diffusers' schedulers, and how each is built from a model's scheduler config.

A job's `sampler` picks one; without one, a job gets the model's own scheduler, as shipped. Any other sampler is
built `from_config` of the model's scheduler config (its betas, timestep count and prediction type), the way
diffusers swaps schedulers: `pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)`.
Stochastic samplers draw their noise from each image's own CPU generator, so an image is reproducible from its
seed and does not depend on the batch it lands in.

Nothing here imports diffusers until a scheduler is built: queue validation only needs the names.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampler:
    name: str  # what a job writes
    scheduler: str  # the diffusers class
    label: str  # as AUTOMATIC1111, ComfyUI and civitai name it (the PNG's "Sampler" field)
    # step() also returns the predicted clean sample, which PixArtAlphaPipeline takes when it runs one step
    # (the DMD recipe); a sampler without it fails there.
    returns_denoised: bool
    overrides: dict = field(default_factory=dict)  # set when built from another scheduler's config


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("dpm-solver", "DPMSolverMultistepScheduler", "DPM++ 2M", False),
    # as PixArt-XL-2's model card builds it: SASolverScheduler.from_config(..., algorithm_type="data_prediction")
    # (DPM-Solver's "dpmsolver++" is not an SA-Solver algorithm)
    Sampler("sa-solver", "SASolverScheduler", "SA-Solver", False, {"algorithm_type": "data_prediction"}),
    Sampler("euler", "EulerDiscreteScheduler", "Euler", True),
    Sampler("euler-a", "EulerAncestralDiscreteScheduler", "Euler a", True),
    # diffusers' DDIM and DDPM clip the predicted sample to [-1, 1] by default, meant for pixels: latents are not
    # bounded so, and Stable Diffusion's own DDIM configs turn it off too.
    Sampler("ddim", "DDIMScheduler", "DDIM", True, {"clip_sample": False}),
    Sampler("lcm", "LCMScheduler", "LCM", True),
    Sampler("ddpm", "DDPMScheduler", "DDPM", True, {"clip_sample": False}),  # the DMD checkpoint's own
)}
NAMES = tuple(SAMPLERS)


def own_sampler(scheduler_class: str) -> str:
    """The name of a model's own scheduler: one of ours, or its class name for a scheduler we do not name (a job
    cannot ask for it, but gets it by default)."""
    for sampler in SAMPLERS.values():
        if sampler.scheduler == scheduler_class:
            return sampler.name
    return scheduler_class


def make_scheduler(name: str, own_config: dict, own_class: str):
    """A fresh scheduler for sampler `name`: the model's own as shipped, or another built from its config."""
    import diffusers  # noqa: PLC0415

    if name == own_sampler(own_class):
        return getattr(diffusers, own_class).from_config(own_config)
    sampler = SAMPLERS[name]
    return getattr(diffusers, sampler.scheduler).from_config(own_config, **sampler.overrides)


def takes_timesteps(name: str, own_class: str) -> bool:
    """Whether the scheduler accepts a custom list of timesteps (diffusers' own test in `retrieve_timesteps`)."""
    import diffusers  # noqa: PLC0415

    cls = getattr(diffusers, SAMPLERS[name].scheduler if name in SAMPLERS else own_class)
    return "timesteps" in inspect.signature(cls.set_timesteps).parameters


def label(name: str, config: dict) -> str:
    """The sampler as image tools name it. DPM-Solver from the config: dpmsolver++ of order 2 is 'DPM++ 2M'."""
    if name == "dpm-solver" and config.get("_class_name") == "DPMSolverMultistepScheduler":
        order = config.get("solver_order", 2)
        text = "DPM++ " + ("2M" if order == 2 else f"{order}M") if "++" in config.get(
            "algorithm_type", "dpmsolver++") else f"DPM {order}M"
        return text + (" Karras" if config.get("use_karras_sigmas") else "")
    if name in SAMPLERS:
        return SAMPLERS[name].label
    return name.removesuffix("Scheduler")
