"""Per-step schedules and the shared number/step checks of DCG, AM, presets and the pipeline.

A schedule gives one coefficient per sampling step. The rules are defined for any step count; the paper's 4-step
lists are the n=4 case. The checks raise ``ValueError`` naming the value and the accepted range, so every layer
validates numbers the same way and with the same words.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")

# A per-step coefficient: a host number, or a tensor (device tables of a step plan, per-sample values).
Coef = float | torch.Tensor

__all__ = [
    "Coef",
    "check_number",
    "check_int",
    "check_bool",
    "check_choice",
    "check_scale",
    "known",
    "named",
    "check_coefficient",
    "check_steps",
    "check_step",
    "check_schedule",
    "paper_schedule",
    "first_step_schedule",
    "constant_schedule",
    "custom_schedule",
    "StepSchedule",
]


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if math.isinf(high):
        return f"> {low}" if low_open else f">= {low}"
    if math.isinf(low):
        return f"< {high}" if high_open else f"<= {high}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_number(
    name: str,
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite python number (not a bool) in the given interval, returned as float; ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    bad = not math.isfinite(value) or value < low or value > high
    bad = bad or (low_open and value == low) or (high_open and value == high)
    if bad:
        raise ValueError(
            f"{name} must be a finite number {_interval(low, high, low_open, high_open)}, got {value}"
        )
    return float(value)


def known(kind: str, names) -> str:
    """``"known <kind>: a, b, c"`` for error messages."""
    return f"known {kind}: {', '.join(sorted(names))}"


def check_int(name: str, value: object, lo: int = 1) -> int:
    """An integer (not a bool) ``>= lo``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """True or False (not 0/1)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: object, choices) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; {known(name + 's', choices)}")
    return value  # type: ignore[return-value]


def named(registry: Mapping[str, T], name: object, kind: str, passthrough: type | None = None) -> T:
    """``registry[name]`` (a named config); an instance of ``passthrough`` is returned as given. ValueError
    ``unknown <kind> 'name'; known: [...]`` otherwise."""
    if passthrough is not None and isinstance(name, passthrough):
        return name  # type: ignore[return-value]
    try:
        return registry[name]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {kind} {name!r}; known: {sorted(registry)}") from None


def check_scale(name: str, value: object) -> float:
    """A non-negative finite number (an identity, LoRA or shortcut weight), as float."""
    return check_number(name, value, 0.0)


def check_coefficient(name: str, value: object, low: float = 0.0, high: float = math.inf) -> None:
    """Validate a DCG/AM coefficient: a python number in [low, high], or a tensor (not checked: that would sync).

    Tensor coefficients are expected to come from a validated config (for example a step plan's device tables).
    """
    if isinstance(value, torch.Tensor):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    check_number(name, value, low, high)


def check_steps(n: object, name: str = "the number of steps") -> int:
    """A positive integer step count."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive integer, got {n!r}")
    return n


def check_step(i: object, n: int, name: str = "step index") -> int:
    """A step index in [0, n)."""
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
        raise ValueError(f"{name} must be an integer in [0, {n}), got {i!r}")
    return i


def check_schedule(
    name: str,
    values: Sequence[object],
    steps: int | None = None,
    low: float = 0.0,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> tuple[float, ...]:
    """A per-step list of numbers in [low, high]; with ``steps`` it must cover that many steps (extra ignored)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a list of numbers, one per step, got {values!r}")
    out = tuple(
        check_number(f"{name} value {i}", x, low, high, low_open=low_open, high_open=high_open)
        for i, x in enumerate(values)
    )
    if not out:
        raise ValueError(f"{name} needs at least one value")
    if steps is not None:
        check_steps(steps)
        if len(out) < steps:
            raise ValueError(
                f"{name}: a custom schedule of {len(out)} values {list(out)} cannot cover {steps} steps; give at "
                f"least {steps} values or use a rule-based schedule (paper/first_step/constant) that fits any step "
                "count"
            )
        out = out[:steps]
    return out


def paper_schedule(n: int, peak: float) -> tuple[float, ...]:
    """The paper's DCG schedule for n steps: 1 at the first and last steps, ``peak`` at every step in between.

    The paper (Sec. 3.2, App. D Fig. 15) guides only the intermediate steps; its 4-step lists are the n=4 case:
    ``paper_schedule(4, 1.5) == (1, 1.5, 1.5, 1)`` and ``paper_schedule(4, 3) == (1, 3, 3, 1)``. With n=1 or n=2
    every step is a first or last step, so the schedule is all ones (no guidance): (1,) and (1, 1).
    """
    check_steps(n)
    check_coefficient("peak", peak)
    return tuple(1.0 if i in (0, n - 1) else float(peak) for i in range(n))


def first_step_schedule(n: int, first: float, rest: float) -> tuple[float, ...]:
    """A schedule with ``first`` at step 0 and ``rest`` at every later step (AM2's d and s rules)."""
    check_steps(n)
    check_coefficient("first", first)
    check_coefficient("rest", rest)
    return (float(first),) + (float(rest),) * (n - 1)


def constant_schedule(n: int, value: float) -> tuple[float, ...]:
    """The same value at every step (e.g. plain CFG with α=β=g: LCM's baseline g=1.5)."""
    check_steps(n)
    check_coefficient("value", value)
    return (float(value),) * n


def custom_schedule(n: int, values: Sequence[float]) -> tuple[float, ...]:
    """An explicit per-step list; it must cover all n steps (extra values are ignored, as in the official code)."""
    check_steps(n)
    return check_schedule("schedule", tuple(values), n)


_RULES = {"paper": 1, "first_step": 2, "constant": 1}


@dataclass(frozen=True)
class StepSchedule:
    """A per-step coefficient rule resolved for any step count: 'paper', 'first_step', 'constant' or 'custom'.

    ``values`` holds the rule's parameters: (peak,) for 'paper', (first, rest) for 'first_step', (value,) for
    'constant', and the explicit list for 'custom'. Build with the classmethods.
    """

    rule: str
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.rule not in (*_RULES, "custom"):
            raise ValueError(f"unknown schedule rule {self.rule!r}; use one of {[*_RULES, 'custom']}")
        object.__setattr__(self, "values", tuple(self.values))
        want = _RULES.get(self.rule)
        if want is not None and len(self.values) != want:
            raise ValueError(f"schedule rule {self.rule!r} takes {want} value(s), got {list(self.values)}")
        if not self.values:
            raise ValueError("a custom schedule needs at least one value")
        for i, x in enumerate(self.values):
            check_coefficient(f"{self.rule} schedule value {i}", x)
        object.__setattr__(self, "values", tuple(float(x) for x in self.values))

    @classmethod
    def paper(cls, peak: float) -> StepSchedule:
        return cls("paper", (peak,))

    @classmethod
    def first_step(cls, first: float, rest: float) -> StepSchedule:
        return cls("first_step", (first, rest))

    @classmethod
    def constant(cls, value: float) -> StepSchedule:
        return cls("constant", (value,))

    @classmethod
    def custom(cls, values: Sequence[float]) -> StepSchedule:
        return cls("custom", tuple(values))

    def resolve(self, n: int) -> tuple[float, ...]:
        """The values for steps 0..n-1."""
        if self.rule == "paper":
            return paper_schedule(n, self.values[0])
        if self.rule == "first_step":
            return first_step_schedule(n, *self.values)
        if self.rule == "constant":
            return constant_schedule(n, self.values[0])
        return custom_schedule(n, self.values)

    def check_range(self, name: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
        """Raise ValueError unless every value lies in the given interval."""
        for x in self.values:
            bad = x < lo or x > hi or (lo_open and x == lo) or (hi_open and x == hi)
            if bad:
                interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
                raise ValueError(f"{name} must lie in {interval}, got {x} in schedule {self}")
