"""The shared step schedules and number checks (fastface.steps)."""

from __future__ import annotations

import math

import pytest
import torch

from fastface import am, dcg, steps
from fastface.steps import StepSchedule, check_coefficient, check_number, check_schedule, check_step, check_steps


def test_check_number_accepts_and_converts() -> None:
    assert check_number("x", 3) == 3.0 and isinstance(check_number("x", 3), float)
    assert check_number("x", 0.0, 0.0, 1.0) == 0.0
    assert check_number("x", 1.0, 0.0, 1.0) == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(value=True), "must be a number, got bool"),
        (dict(value="1"), "must be a number, got str"),
        (dict(value=math.nan), "finite"),
        (dict(value=math.inf), "finite"),
        (dict(value=-1.0, low=0.0), r"x must be a finite number >= 0.0, got -1.0"),
        (dict(value=0.0, low=0.0, low_open=True), r"> 0.0"),
        (dict(value=2.0, low=0.0, high=1.0), r"in \[0.0, 1.0\], got 2.0"),
        (dict(value=1.0, low=0.0, high=1.0, high_open=True), r"in \[0.0, 1.0\)"),
        (dict(value=5.0, high=1.0), r"<= 1.0"),
    ],
)
def test_check_number_rejects(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        check_number("x", **kwargs)


def test_check_coefficient_passes_tensors_unchecked() -> None:
    check_coefficient("alpha", torch.tensor(-1.0))  # a tensor would need a host sync to check
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0.0"):
        check_coefficient("alpha", -1.0)
    with pytest.raises(ValueError, match="must be a number or a tensor"):
        check_coefficient("alpha", None)


def test_steps_and_schedules() -> None:
    assert check_steps(4) == 4 and check_step(3, 4) == 3
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="positive integer"):
            check_steps(bad)
    with pytest.raises(ValueError, match=r"step index must be an integer in \[0, 4\), got 4"):
        check_step(4, 4)
    assert check_schedule("alpha", [1, 1.5, 1.5, 1, 9], steps=4) == (1.0, 1.5, 1.5, 1.0)
    with pytest.raises(ValueError, match="alpha: a custom schedule of 2 values .* cannot cover 4 steps"):
        check_schedule("alpha", [1, 2], steps=4)
    with pytest.raises(ValueError, match="alpha value 1 must be a finite number >= 0.0"):
        check_schedule("alpha", [1, -2])
    with pytest.raises(ValueError, match="q value 0 must be a finite number in \\(0.0, 1.0\\)"):
        check_schedule("q", [1.0], low=0.0, high=1.0, low_open=True, high_open=True)
    with pytest.raises(ValueError, match="list of numbers"):
        check_schedule("alpha", "1,2")
    assert StepSchedule.paper(1.5).resolve(4) == steps.paper_schedule(4, 1.5) == (1.0, 1.5, 1.5, 1.0)
    assert StepSchedule.first_step(7.5, 5).resolve(3) == (7.5, 5.0, 5.0)


def test_dcg_and_am_share_the_schedules() -> None:
    """One implementation: dcg re-exports the schedules (public names unchanged), am uses the same class."""
    assert dcg.StepSchedule is steps.StepSchedule is am.StepSchedule
    assert dcg.paper_schedule is steps.paper_schedule and dcg.custom_schedule is steps.custom_schedule
