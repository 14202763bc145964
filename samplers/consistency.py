"""Consistency-model samplers: LCM multistep (Luo et al. 2023, Alg. 1) and TCD strategic stochastic sampling
(Zheng et al. 2024, eq. 9), equal step for step to diffusers' ``LCMScheduler`` and ``TCDScheduler``."""

from __future__ import annotations

import torch

from ._common import Callback, FiniteGuard, Model, call, check_unit, noise_like, prepare
from .schedule import NoiseSchedule

__all__ = ["lcm", "tcd"]


@torch.no_grad()
def lcm(
    model: Model,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback = None,
    timestep_scaling: float = 10.0,
    schedule: NoiseSchedule | None = None,
) -> torch.Tensor:
    """LCM multistep sampling: denoise with the boundary condition, then re-noise to the next timestep.

    x̂ = c_out·x̂0 + c_skip·x with s = timestep_scaling·t, c_skip = σ_d²/(s²+σ_d²), c_out = s/√(s²+σ_d²), σ_d = 0.5;
    between steps x ← √ᾱ_next·x̂ + √(1-ᾱ_next)·z with fresh noise z (n-1 draws); the last step returns x̂.
    Use ``timesteps(n, "lcm")`` (LCM-LoRA, LCM-SDXL) or custom ones (Hyper-SD 1-step UNet: ``timesteps(custom=[800])``).
    """
    ts, sched = prepare(x, timesteps, schedule, integer=True, name="lcm")
    acp, n = sched.alphas_cumprod, ts.numel()
    guard = FiniteGuard("lcm", ts)
    for i, t in enumerate(ts):
        eps = call(model, x, t)
        a_t = acp[int(t)]
        s = torch.tensor(int(t)) * timestep_scaling  # float32, as diffusers scales its int64 timestep
        c_skip, c_out = 0.25 / (s**2 + 0.25), s / (s**2 + 0.25) ** 0.5
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        denoised = c_out * x0 + c_skip * x
        if i < n - 1:
            a_next = acp[int(ts[i + 1])]
            x = a_next.sqrt() * denoised + (1 - a_next).sqrt() * noise_like(x, generator)
        else:
            x = denoised
        guard.step(i, eps, x)
        if callback is not None:
            callback(i, float(t), x)
    guard.done()
    return x


@torch.no_grad()
def tcd(
    model: Model,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback = None,
    eta: float | None = None,
    gamma: float | None = None,
    schedule: NoiseSchedule | None = None,
) -> torch.Tensor:
    """TCD: jump t → s = ⌊(1-γ)·t_next⌋ along the DDIM path, then forward-diffuse s → t_next with fresh noise.

    x_s = √ᾱ_s·x̂0 + √(1-ᾱ_s)·ε; if γ > 0 and not last: x ← √(ᾱ_next/ᾱ_s)·x_s + √(1-ᾱ_next/ᾱ_s)·z, else x ← x_s.
    ``eta`` is the paper's γ (``gamma`` is an alias), default 0.3: 0.3 for TCD-SDXL, 1.0 for the Hyper-SD unified
    LoRA. The last step uses t_next = 0, so the output is the noised x_s at s = 0: √ᾱ_0·x̂0 + √(1-ᾱ_0)·ε, exactly
    as diffusers.
    """
    ts, sched = prepare(x, timesteps, schedule, integer=True, name="tcd")
    if eta is not None and gamma is not None:
        raise ValueError(f"tcd: pass either eta or its alias gamma, not both (eta={eta}, gamma={gamma})")
    eta = check_unit("tcd", "eta (gamma)", eta if eta is not None else 0.3 if gamma is None else gamma)
    acp, n = sched.alphas_cumprod, ts.numel()
    guard = FiniteGuard("tcd", ts)
    for i, t in enumerate(ts):
        eps = call(model, x, t)
        t_next = torch.tensor(int(ts[i + 1]) if i < n - 1 else 0)
        t_s = torch.floor((1 - eta) * t_next).long()  # float32 product, as diffusers
        a_t, a_next, a_s = acp[int(t)], acp[t_next], acp[t_s]
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x_s = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
        if eta > 0 and i < n - 1:
            x = (a_next / a_s).sqrt() * x_s + (1 - a_next / a_s).sqrt() * noise_like(x, generator)
        else:
            x = x_s
        guard.step(i, eps, x)
        if callback is not None:
            callback(i, float(t), x)
    guard.done()
    return x
