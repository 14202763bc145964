"""DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), equal step for step to diffusers' ``DPMSolverMultistepScheduler``
(``algorithm_type="dpmsolver++"``, ``solver_order=2``, midpoint, ``lower_order_final``, final σ = 0)."""

from __future__ import annotations

import torch

from ._common import Callback, FiniteGuard, Model, call, prepare
from .schedule import NoiseSchedule, karras_sigmas, sigma_at
from .schedule import timesteps as make_timesteps

__all__ = ["dpmpp_2m"]


def _vp(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(α_t, σ_t, λ_t) of the VP process at k-diffusion σ: α = 1/√(σ²+1), σ_t = σ·α, λ = log α - log σ_t."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_t = sigma * alpha
    return alpha, sigma_t, torch.log(alpha) - torch.log(sigma_t)


@torch.no_grad()
def dpmpp_2m(
    model: Model,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback = None,
    karras: bool = False,
    schedule: NoiseSchedule | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M): multistep second-order data-prediction solver in λ = log(α/σ) (PuLID's recommended sampler).

    Step i (h = λ_{i+1} - λ_i): x ← (σ_{i+1}/σ_i)·x - α_{i+1}(e^{-h}-1)·(D0 + ½D1), with D0 = x̂0_i and
    D1 = (h/h_{i-1})(x̂0_i - x̂0_{i-1}); the first step is first order (D1 = 0) and the last one, to σ = 0, returns x̂0
    (diffusers' ``lower_order_final``). x is used as is (σ = 1, VP space); deterministic, ``generator`` unused.
    Use ``timesteps(n, "trailing")``; with ``karras=True`` (``use_karras_sigmas=True``) pass ``timesteps(n, "karras")``:
    the model sees those rounded timesteps while the solver uses the exact Karras σ's, as diffusers does.
    """
    # with Karras σ's the solver steps by σ, not by the (rounded, possibly repeated) timesteps the model sees
    ts, sched = prepare(x, timesteps, schedule, integer=True, name="dpmpp_2m", distinct=not karras)
    n = ts.numel()
    if karras:
        expected = make_timesteps(n, "karras", schedule=sched)
        if not torch.equal(ts, expected):
            raise ValueError(
                f"dpmpp_2m(karras=True) needs timesteps(n, 'karras') = {expected.tolist()}, got {ts.tolist()}"
            )
        sig = torch.cat([karras_sigmas(n, schedule=sched), torch.zeros(1)])
    else:
        sig = torch.cat([sigma_at(ts, sched), torch.zeros(1)])
    x0_prev = None
    guard = FiniteGuard("dpmpp_2m", ts)
    for i, t in enumerate(ts):
        eps = call(model, x, t)
        alpha_s, sigma_s, lam_s = _vp(sig[i])
        x0 = (x - sigma_s * eps) / alpha_s
        if sig[i + 1] == 0:
            x = x0  # first order to σ = 0 is exactly x̂0
        else:
            alpha_t, sigma_t, lam_t = _vp(sig[i + 1])
            h = lam_t - lam_s
            coef = alpha_t * (torch.exp(-h) - 1.0)
            if x0_prev is None:
                x = (sigma_t / sigma_s) * x - coef * x0
            else:
                r = (lam_s - _vp(sig[i - 1])[2]) / h
                d1 = (1.0 / r) * (x0 - x0_prev)
                x = (sigma_t / sigma_s) * x - coef * x0 - 0.5 * coef * d1
        x0_prev = x0
        guard.step(i, eps, x)
        if callback is not None:
            callback(i, float(t), x)
    guard.done()
    return x
