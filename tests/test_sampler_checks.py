"""Samplers refuse repeated or non-finite timesteps and non-finite noise, and name the step where NaN/Inf appears."""

from __future__ import annotations

import pytest
import torch

from fastface.samplers import SAMPLERS, dpmpp_2m, timesteps
from fastface.samplers._common import FiniteGuard

INTEGER = {"ddim", "lcm", "tcd", "dpmpp_2m"}  # samplers that round timesteps to index the schedule


class Counting:
    """A tiny epsilon model (0.1·x) that counts its calls and can return NaN/Inf from a given call on."""

    def __init__(self, bad_from: int | None = None, value: float = float("nan")) -> None:
        self.calls, self.bad_from, self.value = 0, bad_from, value

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = 0.1 * x
        if self.bad_from is not None and self.calls >= self.bad_from:
            out = out.clone()
            out[0, 0, 0, 0] = self.value
        return out


def _noise() -> torch.Tensor:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_repeated_timestep_is_refused(name):
    model, x = Counting(), _noise()
    before = x.clone()
    with pytest.raises(ValueError, match=rf"{name}: timesteps must be strictly decreasing, but 499 repeats at "
                                         r"positions 1 and 2.*zero-length step.*fastface\.samplers\.timesteps\(n\)"):
        SAMPLERS[name](model, x, [999, 499, 499, 249])
    assert model.calls == 0 and torch.equal(x, before)


@pytest.mark.parametrize("name", sorted(INTEGER))
def test_timesteps_equal_after_rounding_are_refused(name):
    with pytest.raises(ValueError, match=rf"{name}: .* 500 repeats at positions 1 and 2 after rounding to integers"):
        SAMPLERS[name](Counting(), _noise(), [999, 500.4, 499.6])


def test_dpmpp_2m_repeated_timestep_gave_nan_before():
    """Why: with a repeated timestep the second-order step divides 0 by 0 (h = 0)."""
    lam = torch.tensor(1.0)
    h = lam - lam
    assert torch.isnan((lam - lam) / h)
    with pytest.raises(ValueError, match="repeats"):
        dpmpp_2m(Counting(), _noise(), [999, 499, 499, 249])


def test_karras_timesteps_may_repeat():
    """DPM-Solver++ with Karras σ's steps by σ; its rounded timesteps repeat for n >= 45 (as in diffusers)."""
    ts = timesteps(50, "karras")
    assert (ts[1:] == ts[:-1]).any()
    out = dpmpp_2m(Counting(), _noise(), ts, karras=True)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_timesteps_are_refused(name, bad):
    model = Counting()
    with pytest.raises(ValueError, match=rf"{name}: timesteps must be finite numbers, got \[999\.0, {bad}\]"):
        SAMPLERS[name](model, _noise(), torch.tensor([999.0, bad]))
    assert model.calls == 0


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_non_finite_noise_is_refused(name):
    model, x = Counting(), _noise()
    x[1, 2, 3, 4] = float("nan")
    x[0, 0, 0, 0] = float("-inf")
    with pytest.raises(ValueError, match=rf"{name}: the input noise x holds 1 NaN and 1 Inf value\(s\) of 512; "
                                         r"pass finite standard normal noise"):
        SAMPLERS[name](model, x, timesteps(4))
    assert model.calls == 0


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_model_nan_names_the_step_and_stops_early_on_cpu(name, value):
    model, seen = Counting(bad_from=3, value=value), []
    ts = timesteps(4, "lcm") if name in ("lcm", "tcd") else timesteps(4)
    with pytest.raises(FloatingPointError, match=rf"{name}: the model returned NaN/Inf at step 3 of 4 "
                                                 rf"\(t={int(ts[2])}\).*bf16 or fp32"):
        SAMPLERS[name](model, _noise(), ts, callback=lambda i, t, x: seen.append(i),
                       generator=torch.Generator().manual_seed(1))
    assert model.calls == 3 and seen == [0, 1]  # the failing step's callback does not run; step 4 is not computed


def test_deferred_flags_report_the_first_bad_step():
    """Off the CPU the flags are read once at the end: the first bad step is named, model output before latents."""
    guard = FiniteGuard("euler", timesteps(4))
    guard.flags = [torch.tensor([True, True]), torch.tensor([True, False]), torch.tensor([False, False])]
    with pytest.raises(FloatingPointError, match=r"euler: the latents became NaN/Inf at step 2 of 4 \(t=749\) "
                                                 r"although the model output was finite"):
        guard.done()
    guard.flags = [torch.tensor([True, True])] * 4
    guard.done()  # all finite: no error
