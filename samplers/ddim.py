"""DDIM sampler (Song et al. 2021, eq. 12), equal step for step to diffusers' ``DDIMScheduler`` with SDXL's config."""

from __future__ import annotations

import torch

from ._common import Callback, FiniteGuard, Model, call, check_unit, noise_like, prepare
from .schedule import NoiseSchedule

__all__ = ["ddim"]


@torch.no_grad()
def ddim(
    model: Model,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback = None,
    eta: float = 0.0,
    schedule: NoiseSchedule | None = None,
) -> torch.Tensor:
    """DDIM: x ← √ᾱ_prev·x̂0 + √(1-ᾱ_prev-std²)·ε + std·z, std = eta·σ_t (Hyper-SD N-step: trailing, eta 0).

    As diffusers (``set_alpha_to_one=False``, ``clip_sample=False``): the previous timestep is t - 1000//n, not the
    next entry of ``timesteps`` (n=3 trailing: 999 → 666, 666 → 333, 332 → final), and below 0 it uses
    ᾱ_prev = ᾱ_0, so the output keeps √(1-ᾱ_0)·ε. Fractional timesteps are rounded. x is used as is (σ = 1).
    With eta > 0 one noise tensor is drawn per step, the last one included.
    """
    ts, sched = prepare(x, timesteps, schedule, integer=True, name="ddim")
    eta = check_unit("ddim", "eta", eta)
    acp = sched.alphas_cumprod
    jump = sched.num_train_timesteps // ts.numel()
    guard = FiniteGuard("ddim", ts)
    for i, t in enumerate(ts):
        eps = call(model, x, t)
        a_t = acp[int(t)]
        prev = int(t) - jump
        a_prev = acp[prev] if prev >= 0 else acp[0]
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = eta * var**0.5
        x = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if eta > 0:
            x = x + std * noise_like(x, generator)
        guard.step(i, eps, x)
        if callback is not None:
            callback(i, float(t), x)
    guard.done()
    return x
