"""Euler and Euler-ancestral samplers in σ space (Karras et al. 2022, Alg. 2; k-diffusion ``sample_euler(_ancestral)``).

Equal step for step to diffusers' ``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler`` (``s_churn=0``,
``final_sigmas_type="zero"``, linear σ interpolation) driven as ``StableDiffusionXLPipeline`` drives them.
"""

from __future__ import annotations

from typing import Literal

import torch

from ._common import Callback, FiniteGuard, Model, call, noise_like, prepare
from .schedule import NoiseSchedule, sigma_at

__all__ = ["euler", "euler_ancestral"]


def _sigmas(ts: torch.Tensor, sched: NoiseSchedule) -> torch.Tensor:
    """σ at each timestep plus a final 0: [n+1] float32."""
    return torch.cat([sigma_at(ts, sched), torch.zeros(1)])


def _init_scale(sig: torch.Tensor, vp_init: bool) -> torch.Tensor:
    # diffusers' init_noise_sigma: σ_max for trailing/linspace spacing, √(σ_max²+1) for leading
    return (sig.max() ** 2 + 1) ** 0.5 if vp_init else sig.max()


@torch.no_grad()
def euler(
    model: Model,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback = None,
    prediction: Literal["epsilon", "sample"] = "epsilon",
    vp_init: bool = False,
    schedule: NoiseSchedule | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dσ = (x - x̂0)/σ (SDXL-Lightning: trailing timesteps).

    x is standard normal noise, scaled here by σ(t_0) (by √(σ(t_0)²+1) with ``vp_init``, diffusers' rule for
    "leading" spacing). The model sees x/√(σ²+1) and returns ε, or x̂0 with ``prediction="sample"`` (the
    Lightning 1-step x0 UNet). Deterministic: ``generator`` is unused. The last step (σ_next = 0) returns x̂0.
    """
    ts, sched = prepare(x, timesteps, schedule, integer=False, name="euler")
    if prediction not in ("epsilon", "sample"):
        raise ValueError(f"euler: prediction must be 'epsilon' or 'sample', got {prediction!r}")
    sig = _sigmas(ts, sched)
    x = x * _init_scale(sig, vp_init)
    guard = FiniteGuard("euler", ts)
    for i, t in enumerate(ts):
        s, s_next = sig[i], sig[i + 1]
        out = call(model, x / ((s**2 + 1) ** 0.5), t)
        x0 = out if prediction == "sample" else x - s * out
        x = x0 if s_next == 0 else x + (x - x0) / s * (s_next - s)
        guard.step(i, out, x)
        if callback is not None:
            callback(i, float(t), x)
    guard.done()
    return x


@torch.no_grad()
def euler_ancestral(
    model: Model,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback = None,
    vp_init: bool = False,
    schedule: NoiseSchedule | None = None,
) -> torch.Tensor:
    """Euler-ancestral sampling (eta = 1): an Euler step down to σ_down, then fresh noise of std σ_up (SDXL-Turbo).

    σ_up = √(σ_next²(σ² - σ_next²)/σ²), σ_down = √(σ_next² - σ_up²). One noise tensor is drawn per step, the
    last step included (where σ_up = 0 and x̂0 is returned exactly), so the generator advances as in diffusers.
    """
    ts, sched = prepare(x, timesteps, schedule, integer=False, name="euler_ancestral")
    sig = _sigmas(ts, sched)
    x = x * _init_scale(sig, vp_init)
    guard = FiniteGuard("euler_ancestral", ts)
    for i, t in enumerate(ts):
        s, s_next = sig[i], sig[i + 1]
        eps = call(model, x / ((s**2 + 1) ** 0.5), t)
        x0 = x - s * eps
        s_up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
        s_down = (s_next**2 - s_up**2) ** 0.5
        z = noise_like(x, generator)
        x = x0 if s_next == 0 else x + (x - x0) / s * (s_down - s) + z * s_up
        guard.step(i, eps, x)
        if callback is not None:
            callback(i, float(t), x)
    guard.done()
    return x
