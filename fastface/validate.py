"""Value checks shared by presets, adapters and the pipeline: one rule per kind of value, one wording per error."""

from __future__ import annotations

import math

__all__ = ["check_number", "check_int", "check_bool", "check_choice", "check_scale", "known"]


def known(kind: str, names) -> str:
    """``"known <kind>: a, b, c"`` for error messages."""
    return f"known {kind}: {', '.join(sorted(names))}"


def check_number(name: str, value: object, lo: float = -math.inf, lo_open: bool = False) -> float:
    """A finite number (not a bool) ``>= lo`` (``> lo`` with ``lo_open``), as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < lo or (lo_open and value == lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    return float(value)


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


def check_scale(name: str, value: object) -> float:
    """A non-negative finite number (an identity, LoRA or shortcut weight), as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)
