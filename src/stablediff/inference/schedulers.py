"""Samplers by the names users know (A1111 / ComfyUI), each one of diffusers' schedulers.

Every scheduler is built `from_config` of the model's own scheduler config, so
the training noise schedule (betas, prediction type, timestep offset) carries
over; the overrides below set only what makes the named sampler that sampler,
and reset the flags another sampler may have left in a saved config (a model
exported with `dpmpp_2m_karras` must not make `dpmpp_2m` use Karras sigmas).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stablediff.errors import GenerationError

DEFAULT_SAMPLER = "dpmpp_2m"


@dataclass(frozen=True)
class Sampler:
    name: str
    class_name: str  # a diffusers scheduler class
    description: str
    overrides: dict = field(default_factory=dict)
    requires: str | None = None  # an extra Python package the scheduler imports


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("ddpm", "DDPMScheduler", "DDPM, ancestral; the training process run backwards (needs ~1000 steps)",
            {"variance_type": "fixed_small", "clip_sample": False}),
    Sampler("ddim", "DDIMScheduler", "DDIM, deterministic; good at 20-50 steps", {"set_alpha_to_one": False, "clip_sample": False}),
    Sampler("pndm", "PNDMScheduler", "PNDM / PLMS, the original Stable Diffusion default",
            {"skip_prk_steps": True, "set_alpha_to_one": False}),
    Sampler("euler", "EulerDiscreteScheduler", "Euler (Karras et al. 2022), deterministic",
            {"use_karras_sigmas": False}),
    Sampler("euler_a", "EulerAncestralDiscreteScheduler", "Euler ancestral: adds fresh noise each step", {}),
    Sampler("heun", "HeunDiscreteScheduler", "Heun, 2nd order: two model calls per step",
            {"use_karras_sigmas": False}),
    Sampler("lms", "LMSDiscreteScheduler", "LMS, linear multistep (k-diffusion)", {"use_karras_sigmas": False}),
    Sampler("dpmpp_2m", "DPMSolverMultistepScheduler", "DPM-Solver++ (2M), fast and deterministic",
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    Sampler("dpmpp_2m_karras", "DPMSolverMultistepScheduler", "DPM-Solver++ (2M) with Karras sigmas",
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    Sampler("dpmpp_sde", "DPMSolverSDEScheduler", "DPM++ SDE, stochastic, two model calls per step",
            {"use_karras_sigmas": False}, requires="torchsde"),
    Sampler("unipc", "UniPCMultistepScheduler", "UniPC, a fast predictor-corrector (few steps)",
            {"use_karras_sigmas": False}),
)}


# A1111's display names, so its images' infotext ("Sampler: DPM++ 2M Karras") reads back.
A1111_NAMES = {"DDPM": "ddpm", "DDIM": "ddim", "PLMS": "pndm", "Euler": "euler", "Euler a": "euler_a",
               "Heun": "heun", "LMS": "lms", "DPM++ 2M": "dpmpp_2m", "DPM++ 2M Karras": "dpmpp_2m_karras",
               "DPM++ SDE": "dpmpp_sde", "UniPC": "unipc"}


def sampler_from_infotext(sampler: str, schedule_type: str | None = None) -> str:
    """Our name for an infotext's `Sampler` (and A1111 1.9+'s separate `Schedule type`)."""
    if schedule_type == "Karras" and sampler == "DPM++ 2M":
        sampler = "DPM++ 2M Karras"
    return A1111_NAMES.get(sampler, sampler)


def get_sampler(name: str) -> Sampler:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise GenerationError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)} "
                              "(`stablediff generate --list-samplers` says what each is)") from None


def fit_steps_offset(config: dict, steps: int | None) -> dict:
    """SD's `steps_offset: 1` with "leading" spacing puts the last of `steps` timesteps at
    offset + (T // steps) * (steps - 1), which is T, one past the schedule's end, when steps = T
    (e.g. ddpm at 1000 steps). There the offset is dropped: the timesteps are then exactly 0..T-1."""
    total = int(config.get("num_train_timesteps", 1000))
    offset = int(config.get("steps_offset", 0))
    if steps and config.get("timestep_spacing", "leading") == "leading" and \
            offset + (total // steps) * (steps - 1) > total - 1:
        return {**config, "steps_offset": 0}
    return config


def make_scheduler(name: str, model_scheduler_config: dict, steps: int | None = None):
    """A fresh diffusers scheduler for sampler `name`, on the model's noise schedule (`steps`: the
    number of sampling steps it will run, when known)."""
    import diffusers

    sampler = get_sampler(name)
    if sampler.requires:
        try:
            __import__(sampler.requires)
        except ImportError:
            raise GenerationError(f"sampler {name!r} needs the Python package {sampler.requires!r}, which is not "
                                  f"installed; run `pip install {sampler.requires}` or choose another sampler") from None
    scheduler_class = getattr(diffusers, sampler.class_name)
    if sampler.class_name == "DPMSolverSDEScheduler":  # its noise from each image's seed, on the CPU
        from stablediff.inference.seeded_sde import SeededDPMSolverSDEScheduler as scheduler_class
    # Keys the model's config has that this class does not know are ignored by from_config;
    # dropping the class bookkeeping keeps diffusers from logging about them.
    config = fit_steps_offset({k: v for k, v in dict(model_scheduler_config).items() if not k.startswith("_")},
                              steps)
    return scheduler_class.from_config(config, **sampler.overrides)
