"""The SDXL noise schedule (scaled-linear betas) and the timestep rules of the few-step samplers.

Everything here is computed in float32 exactly as diffusers' schedulers compute it (``torch.linspace`` of the
square roots, squared, then ``cumprod``), so the tables are bit-identical to ``scheduler.alphas_cumprod``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

import torch

__all__ = [
    "NoiseSchedule",
    "SPACINGS",
    "alphas_cumprod",
    "karras_sigmas",
    "sdxl_schedule",
    "sigma_at",
    "sigmas",
    "timesteps",
]

Spacing = Literal["trailing", "leading", "linspace", "lcm", "karras"]
SPACINGS: tuple[str, ...] = ("trailing", "leading", "linspace", "lcm", "karras")


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete VP noise schedule: betas, cumulative alphas and k-diffusion sigmas, indexed by timestep 0..N-1.

    The tensors are float32 on the CPU and shared: treat them as read-only.
    """

    betas: torch.Tensor  # [N]
    alphas_cumprod: torch.Tensor  # [N], ᾱ_t = ∏(1 - β)
    sigmas: torch.Tensor  # [N], σ_t = √((1 - ᾱ_t) / ᾱ_t), increasing in t

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.shape[0])


def _scaled_linear(beta_start: float, beta_end: float, n: int) -> NoiseSchedule:
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    acp = torch.cumprod(1.0 - betas, dim=0)
    return NoiseSchedule(betas=betas, alphas_cumprod=acp, sigmas=((1 - acp) / acp) ** 0.5)


@lru_cache(maxsize=None)
def sdxl_schedule() -> NoiseSchedule:
    """The SDXL (and SD 1.x/2.x) schedule: scaled-linear betas from 0.00085 to 0.012 over 1000 timesteps."""
    return _scaled_linear(0.00085, 0.012, 1000)


def alphas_cumprod() -> torch.Tensor:
    """ᾱ_t of the SDXL schedule for t = 0..999 (a float32 copy)."""
    return sdxl_schedule().alphas_cumprod.clone()


def sigmas() -> torch.Tensor:
    """σ_t = √((1-ᾱ_t)/ᾱ_t) of the SDXL schedule for t = 0..999 (a float32 copy; σ_0 ≈ 0.0292, σ_999 ≈ 14.6147)."""
    return sdxl_schedule().sigmas.clone()


def sigma_at(t: torch.Tensor, schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """σ at (possibly fractional) timesteps, interpolated linearly like ``np.interp`` (float64, then float32)."""
    table = (schedule or sdxl_schedule()).sigmas.double()
    t64 = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    lo = t64.floor().long().clamp(0, table.shape[0] - 2)
    frac = t64 - lo
    return ((table[lo + 1] - table[lo]) * frac + table[lo]).float()


def karras_sigmas(n: int, rho: float = 7.0, schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """The n Karras et al. (2022, eq. 5) sigmas from the schedule's σ_max to σ_min, without the final 0 (float32)."""
    _check_steps(n, (schedule or sdxl_schedule()).num_train_timesteps)
    table = (schedule or sdxl_schedule()).sigmas
    s_min, s_max = float(table[0]), float(table[-1])
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_max, inv_min = s_max ** (1 / rho), s_min ** (1 / rho)
    return ((inv_max + ramp * (inv_min - inv_max)) ** rho).float()


def _sigma_to_t(sig: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Fractional timesteps whose σ equals ``sig``, by linear interpolation in log σ (float64)."""
    log_table = schedule.sigmas.log().double()  # [N], increasing
    log_sig = sig.double().clamp_min(1e-10).log()
    lo = ((log_sig[None, :] - log_table[:, None]) >= 0).long().cumsum(0).argmax(0).clamp(max=log_table.shape[0] - 2)
    w = ((log_table[lo] - log_sig) / (log_table[lo] - log_table[lo + 1])).clamp(0, 1)
    return (1 - w) * lo + w * (lo + 1)


def _check_steps(n: object, num_train: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= num_train:
        raise ValueError(f"the number of steps must be an integer in 1..{num_train}, got {n!r}")


def timesteps(
    n: int | None = None,
    spacing: Spacing = "trailing",
    *,
    custom: Sequence[float] | torch.Tensor | None = None,
    steps_offset: int = 1,
    original_steps: int = 50,
    schedule: NoiseSchedule | None = None,
) -> torch.Tensor:
    """The n discrete timesteps (descending, 1-D float32) that the diffusers scheduler family uses for ``spacing``.

    * ``"trailing"`` (Lightning, Hyper-SD, Turbo, DPM-Solver++): ``round(1000 - i·1000/n) - 1``: n=4 gives
      [999, 749, 499, 249]. Same in Euler, Euler ancestral, DDIM and DPMSolverMultistep.
    * ``"leading"`` (SDXL base default): ``i·(1000//n) + steps_offset`` reversed: n=4 gives [751, 501, 251, 1].
      Euler/DDIM values; DPMSolverMultistep's leading rule differs (it divides by n+1).
    * ``"linspace"``: ``linspace(0, 999, n)`` reversed, unrounded as EulerDiscrete uses it. ``ddim`` rounds these
      float32 values, DDIMScheduler rounds the float64 ones (they differ at n = 27, 31, 47); DPMSolverMultistep's
      linspace rule differs.
    * ``"lcm"`` (LCMScheduler and TCDScheduler): n indices, evenly spaced and floored, into the ``original_steps``
      grid {k-1, 2k-1, ..., 999}, k = 1000 // original_steps: n=4 gives [999, 759, 499, 259].
    * ``"karras"`` (DPMSolverMultistep ``use_karras_sigmas=True``): the timesteps of :func:`karras_sigmas`,
      rounded: n=4 gives [999, 687, 146, 0].

    ``custom`` (e.g. Hyper-SD 1-step's ``[800]``) is validated and returned as given; ``n``, if also passed, must
    equal its length. Diffusers' trailing rule returns n+1 values for a few n > 50 (61, 103, ...); this always
    returns n.
    """
    sched = schedule or sdxl_schedule()
    num_train = sched.num_train_timesteps
    if custom is not None:
        ts = torch.as_tensor(custom, dtype=torch.float64).reshape(-1)
        if n is not None and n != ts.numel():
            raise ValueError(f"n={n} does not match the {ts.numel()} custom timesteps; pass n=None with custom")
        _check_steps(ts.numel(), num_train)
        return _checked(ts, num_train)
    _check_steps(n, num_train)
    if spacing == "trailing":
        # np.arange(N, 0, -N/n) fills start + i·delta with delta = (start + step) - start; the rounding of that
        # float64 delta decides the half-way cases (n=48: 937.4999… rounds to 937, i.e. t = 936)
        delta = (num_train - num_train / n) - num_train
        ts = torch.round(num_train + torch.arange(n, dtype=torch.float64) * delta) - 1
    elif spacing == "leading":
        ts = (torch.arange(n, dtype=torch.float64) * (num_train // n)).flip(0) + steps_offset
    elif spacing == "linspace":
        ts = torch.linspace(0, num_train - 1, n, dtype=torch.float64).flip(0)
    elif spacing == "lcm":
        valid = isinstance(original_steps, int) and not isinstance(original_steps, bool)
        if not valid or not n <= original_steps <= num_train:
            raise ValueError(
                f"original_steps must be an integer in n..{num_train} (n={n}) for 'lcm' spacing, got {original_steps!r}"
            )
        k = num_train // original_steps
        origin = (torch.arange(1, original_steps + 1, dtype=torch.float64) * k - 1).flip(0)
        idx = [math.floor(i * (original_steps / n)) for i in range(n)]  # as np.linspace(0, S, n, endpoint=False)
        ts = origin[idx]
    elif spacing == "karras":
        ts = _sigma_to_t(karras_sigmas(n, schedule=sched), sched).round()
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")
    return _checked(ts, num_train)


def _checked(ts: torch.Tensor, num_train: int) -> torch.Tensor:
    if not torch.isfinite(ts).all() or ts.min() < 0 or ts.max() > num_train - 1:
        raise ValueError(f"timesteps must lie in 0..{num_train - 1}, got {ts.tolist()}")
    if (ts[1:] > ts[:-1]).any():
        raise ValueError(f"timesteps must be in descending order (highest noise first), got {ts.tolist()}")
    return ts.float()
