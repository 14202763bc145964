"""Few-step samplers (installed as ``fastface.samplers``): the SDXL noise schedule, timestep rules and samplers.

Every sampler is a pure function with one signature, k-diffusion style::

    x0 = sampler(model, x, timesteps, *, generator=None, callback=None, **params)

``model(x_t, t)`` returns the epsilon prediction, with ``t`` the discrete timestep as a 0-dim float32 CPU
tensor (host-known, so hooks read it without a device sync; UNets broadcast it and move it to x's device); ``x`` is standard normal noise, which each sampler scales as its method needs;
``timesteps`` comes from :func:`timesteps`; ``callback(i, t, x)`` runs after each step. Each sampler equals the
matching diffusers scheduler driven by ``StableDiffusionXLPipeline`` with the same ``torch.Generator``. See
docs/samplers.md for which sampler, steps and timesteps each distilled model uses.
"""

from __future__ import annotations

from typing import Callable

from .consistency import lcm, tcd
from .ddim import ddim
from .dpm import dpmpp_2m
from .euler import euler, euler_ancestral
from .schedule import (
    SPACINGS,
    NoiseSchedule,
    alphas_cumprod,
    karras_sigmas,
    sdxl_schedule,
    sigma_at,
    sigmas,
    timesteps,
)

SAMPLERS: dict[str, Callable[..., object]] = {
    "euler": euler,
    "euler_ancestral": euler_ancestral,
    "ddim": ddim,
    "lcm": lcm,
    "tcd": tcd,
    "dpmpp_2m": dpmpp_2m,
}

__all__ = [
    "SAMPLERS",
    "SPACINGS",
    "NoiseSchedule",
    "alphas_cumprod",
    "ddim",
    "dpmpp_2m",
    "euler",
    "euler_ancestral",
    "karras_sigmas",
    "lcm",
    "sdxl_schedule",
    "sigma_at",
    "sigmas",
    "tcd",
    "timesteps",
]
