"""Shared plumbing of the samplers: argument checks, model calls, noise draws and the per-step callback."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .schedule import NoiseSchedule, sdxl_schedule

# model(x_t, t) -> epsilon (or x0 for prediction="sample"); t is a 0-dim float32 CPU tensor (host-known timestep)
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Optional[Callable[[int, float, torch.Tensor], None]]


def prepare(
    x: torch.Tensor, ts: torch.Tensor | list, schedule: NoiseSchedule | None, *, integer: bool, name: str
) -> tuple[torch.Tensor, NoiseSchedule]:
    """Check x and the timesteps; return them as a 1-D float32 CPU tensor (rounded if the sampler indexes ᾱ)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"{name}: x must be a floating-point tensor [B, ...] of standard normal noise")
    sched = schedule or sdxl_schedule()
    ts = torch.as_tensor(ts).detach().to("cpu", torch.float64)
    if ts.dim() != 1 or ts.numel() < 1:
        raise ValueError(f"{name}: timesteps must be a non-empty 1-D tensor, e.g. fastface.samplers.timesteps(4)")
    last = sched.num_train_timesteps - 1
    if not torch.isfinite(ts).all() or ts.min() < 0 or ts.max() > last:
        raise ValueError(f"{name}: timesteps must lie in 0..{last}, got {ts.tolist()}")
    if (ts[1:] > ts[:-1]).any():
        raise ValueError(f"{name}: timesteps must be in descending order (highest noise first), got {ts.tolist()}")
    # samplers that index the discrete ᾱ table round like diffusers' int64 timesteps (np.round: half to even)
    return (ts.round() if integer else ts).float(), sched


def check_unit(name: str, param: str, value: float) -> float:
    """Reject a stochasticity parameter outside [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: {param} must be a number in [0, 1], got {value!r}")
    return float(value)


def call(model: Model, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Run the model at one timestep, passed as a 0-dim float32 CPU tensor.

    The timestep stays on the host so hooks (the FastFace step context) can read it without a device sync;
    UNets broadcast it over the batch and move it to the latents' device (ours and diffusers' both do).
    """
    out = model(x_in, torch.tensor(float(t), dtype=torch.float32))
    if not isinstance(out, torch.Tensor) or out.shape != x_in.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the model must return a tensor shaped like its input {tuple(x_in.shape)}, got {got}")
    return out.to(x_in.dtype)


def noise_like(x: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise like x, drawn as diffusers' randn_tensor does (on the generator's device, then moved).

    A list of generators (one per sample, as diffusers also accepts) draws sample i from generator i, so a
    sample's noise does not depend on the other samples of the batch.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}; give one per sample")
        return torch.cat([noise_like(x[i : i + 1], g) for i, g in enumerate(generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
