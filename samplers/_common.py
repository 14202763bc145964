"""Shared plumbing of the samplers: argument checks, model calls, noise draws and the per-step callback."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .schedule import NoiseSchedule, sdxl_schedule

# model(x_t, t) -> epsilon (or x0 for prediction="sample"); t is a 0-dim float32 CPU tensor (host-known timestep)
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Optional[Callable[[int, float, torch.Tensor], None]]


def prepare(
    x: torch.Tensor,
    ts: torch.Tensor | list,
    schedule: NoiseSchedule | None,
    *,
    integer: bool,
    name: str,
    distinct: bool = True,
) -> tuple[torch.Tensor, NoiseSchedule]:
    """Check x and the timesteps; return them as a 1-D float32 CPU tensor (rounded if the sampler indexes ᾱ).

    Timesteps must be finite, within the schedule and strictly decreasing (after the rounding, for samplers that
    round): a repeated timestep is a zero-length step, which divides by zero in multistep solvers (``distinct=False``
    only where the solver does not step by the timesteps, as DPM-Solver++ with Karras σ's). x must be finite: this
    is the one check that reads x's values (one host sync, before the first model call).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"{name}: x must be a floating-point tensor [B, ...] of standard normal noise")
    sched = schedule or sdxl_schedule()
    ts = torch.as_tensor(ts).detach().to("cpu", torch.float64)
    if ts.dim() != 1 or ts.numel() < 1:
        raise ValueError(f"{name}: timesteps must be a non-empty 1-D tensor, e.g. fastface.samplers.timesteps(4)")
    last = sched.num_train_timesteps - 1
    if not torch.isfinite(ts).all():
        raise ValueError(f"{name}: timesteps must be finite numbers, got {ts.tolist()}; use fastface.samplers.timesteps(n)")
    if ts.min() < 0 or ts.max() > last:
        raise ValueError(f"{name}: timesteps must lie in 0..{last}, got {ts.tolist()}")
    if (ts[1:] > ts[:-1]).any():
        raise ValueError(f"{name}: timesteps must be in descending order (highest noise first), got {ts.tolist()}")
    # samplers that index the discrete ᾱ table round like diffusers' int64 timesteps (np.round: half to even)
    used = ts.round() if integer else ts
    repeats = (used[1:] == used[:-1]).nonzero().flatten().tolist()
    if distinct and repeats:
        i = repeats[0]
        rounded = " after rounding to integers (this sampler indexes the discrete schedule)" if integer else ""
        raise ValueError(
            f"{name}: timesteps must be strictly decreasing, but {used[i].item():g} repeats at positions {i} and "
            f"{i + 1}{rounded}: {ts.tolist()}. A repeated timestep is a zero-length step; use distinct timesteps, "
            "e.g. fastface.samplers.timesteps(n)"
        )
    bad = ~torch.isfinite(x)
    if bad.any():
        raise ValueError(
            f"{name}: the input noise x holds {int(torch.isnan(x).sum())} NaN and {int(torch.isinf(x).sum())} Inf "
            f"value(s) of {x.numel()}; pass finite standard normal noise (torch.randn)"
        )
    return used.float(), sched


class FiniteGuard:
    """Finds the first step whose model output or updated latents hold NaN/Inf, and raises naming it.

    On the CPU each step is checked at once (no sync cost: a failing run stops early). On an accelerator the
    per-step flags stay on the device and are read once, in :meth:`done` (no host sync per step).
    """

    def __init__(self, name: str, ts: torch.Tensor) -> None:
        self.name, self.ts = name, ts
        self.flags: list[torch.Tensor] = []

    def step(self, i: int, model_out: torch.Tensor, x: torch.Tensor) -> None:
        """Record step ``i``: [model output finite, new latents finite] (a [2] bool tensor on x's device)."""
        flag = torch.stack([torch.isfinite(model_out).all(), torch.isfinite(x).all()])
        if flag.device.type == "cpu":
            self._raise_if_bad(i, flag)
        else:
            self.flags.append(flag)

    def done(self) -> None:
        """Read the deferred flags (one host sync) and raise for the first bad step."""
        if not self.flags:
            return
        flags = torch.stack(self.flags).cpu()
        self.flags = []
        for i, flag in enumerate(flags):
            self._raise_if_bad(i, flag)

    def _raise_if_bad(self, i: int, flag: torch.Tensor) -> None:
        out_ok, x_ok = bool(flag[0]), bool(flag[1])
        if out_ok and x_ok:
            return
        where = f"step {i + 1} of {self.ts.numel()} (t={self.ts[i].item():g})"
        if not out_ok:
            raise FloatingPointError(
                f"{self.name}: the model returned NaN/Inf at {where}. Usual causes: fp16 overflow (run in bf16 or "
                "fp32: dtype='bf16' / --dtype bf16) or weights holding NaN/Inf (load the files again)"
            )
        raise FloatingPointError(
            f"{self.name}: the latents became NaN/Inf at {where} although the model output was finite: the step "
            "itself is degenerate (check the timesteps and sampler parameters)"
        )


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
