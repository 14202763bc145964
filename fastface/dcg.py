"""Decoupled classifier-free guidance (DCG, FastFace paper Sec. 3.2 and App. D) as pure functions on tensors.

One UNet call evaluates three branches of the same latents, each with its own (text, id) conditioning, and the
predictions are combined with per-step coefficients alpha (identity guidance) and beta (text guidance)::

    DCG2 (paper Eq. 3 = Eq. 17, the default): eps(∅,∅) + α(eps(∅,id) - eps(∅,∅)) + β(eps(text,id) - eps(∅,id))
    DCG1 (Eq. 16):                            eps(∅,∅) + α(eps(text,∅) - eps(∅,∅)) + β(eps(text,id) - eps(text,∅))
    DCG3 (Eq. 18):                            eps(∅,∅) + α(eps(text,∅) - eps(∅,∅)) + β(eps(∅,id) - eps(∅,∅))

followed by the std rescale of Eq. 4-5. The official code (ControlGenAI/FastFace, ``src/dcg.py``) names these
``dcg_type`` 1 (DCG1), 3 (DCG2) and 2 (DCG3); its batch order is the branch order of :data:`VARIANT_BRANCHES`.

Everything here is torch.compile friendly: coefficients may be python numbers or tensors (0-dim, or ``[B]`` per
sample), there is no ``.item()`` and no Python branching on tensor values. Python-number arguments are validated;
tensor arguments are not (they would need a host sync) and are expected to come from a validated :class:`DCGConfig`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

import torch

from fastface.steps import (
    Coef,
    StepSchedule,
    check_coefficient,
    check_step,
    check_steps,
    constant_schedule,
    custom_schedule,
    first_step_schedule,
    named,
    paper_schedule,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Branch",
    "Variant",
    "VARIANT_BRANCHES",
    "combine",
    "rescale",
    "branch_weights",
    "needed_branches",
    "guide",
    "paper_schedule",
    "first_step_schedule",
    "constant_schedule",
    "custom_schedule",
    "StepSchedule",
    "DCGConfig",
    "DCG_CONFIGS",
    "get_dcg_config",
]


class Branch(str, Enum):
    """A UNet evaluation's conditioning: with or without the text prompt, with or without the identity."""

    UNCOND = "uncond"  # (∅, ∅)
    ID = "id"  # (∅, id)
    TEXT = "text"  # (text, ∅)
    TEXT_ID = "text_id"  # (text, id)

    @property
    def has_text(self) -> bool:
        return self in (Branch.TEXT, Branch.TEXT_ID)

    @property
    def has_id(self) -> bool:
        return self in (Branch.ID, Branch.TEXT_ID)


class Variant(str, Enum):
    """The DCG formula: paper App. D Eq. 16 (DCG1), Eq. 17 = Eq. 3 (DCG2, default), Eq. 18 (DCG3)."""

    DCG1 = "dcg1"
    DCG2 = "dcg2"
    DCG3 = "dcg3"


# Branches of each variant in batch order (branch 0, 1, 2), as the official code lays out the batch.
VARIANT_BRANCHES: dict[Variant, tuple[Branch, Branch, Branch]] = {
    Variant.DCG1: (Branch.UNCOND, Branch.TEXT, Branch.TEXT_ID),
    Variant.DCG2: (Branch.UNCOND, Branch.ID, Branch.TEXT_ID),
    Variant.DCG3: (Branch.UNCOND, Branch.TEXT, Branch.ID),
}


def _variant(variant: Variant | str) -> Variant:
    try:
        return Variant(variant)
    except ValueError:
        raise ValueError(
            f"unknown DCG variant {variant!r}; use one of {[v.value for v in Variant]} "
            "('dcg2' is the paper's Eq. 3)"
        ) from None


def _per_sample(c: Coef, ref: torch.Tensor) -> Coef:
    """A ``[B]`` tensor becomes ``[B, 1, ...]`` so it scales each sample of ``ref``; other values pass through."""
    if isinstance(c, torch.Tensor) and c.ndim == 1 and ref.ndim > 1:
        return c.to(ref.dtype).view(-1, *([1] * (ref.ndim - 1)))
    if isinstance(c, torch.Tensor):
        return c.to(ref.dtype)
    return c


def _check_same(*xs: torch.Tensor) -> None:
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1:
        raise ValueError(f"DCG branch predictions must have the same shape, got {sorted(shapes)}")


def combine(
    eps_u: torch.Tensor,
    eps_1: torch.Tensor,
    eps_2: torch.Tensor,
    alpha: Coef,
    beta: Coef,
    variant: Variant | str = Variant.DCG2,
) -> torch.Tensor:
    """Decoupled CFG combination (paper Eq. 3 / Eq. 16-18) of the three branch predictions, in batch order.

    ``eps_1, eps_2`` are the variant's branches 1 and 2 (see :data:`VARIANT_BRANCHES`): for DCG2 they are
    eps(∅,id) and eps(text,id); for DCG1 eps(text,∅) and eps(text,id); for DCG3 eps(text,∅) and eps(∅,id).
    ``alpha``/``beta``: python numbers (>= 0) or tensors, 0-dim or ``[B]`` per sample.
    """
    v = _variant(variant)
    _check_same(eps_u, eps_1, eps_2)
    check_coefficient("alpha", alpha)
    check_coefficient("beta", beta)
    a, b = _per_sample(alpha, eps_u), _per_sample(beta, eps_u)
    if v is Variant.DCG3:
        return eps_u + a * (eps_1 - eps_u) + b * (eps_2 - eps_u)
    # DCG1 and DCG2 share the algebra; they differ in the conditioning of branch 1.
    return eps_u + a * (eps_1 - eps_u) + b * (eps_2 - eps_1)


def rescale(eps: torch.Tensor, eps_1: torch.Tensor, eps_2: torch.Tensor, phi: Coef = 0.75) -> torch.Tensor:
    """DCG std rescale (paper Eq. 4-5) exactly as the official code: ``eps · (φ·r + 1 − φ)``.

    ``r = (σ(eps_1) + σ(eps_2)) / (2 σ(eps))`` with σ the per-sample unbiased std over all non-batch dims (C, H, W),
    where ``eps_1, eps_2`` are the two conditional branches (for DCG2: eps(∅,id) and eps(text,id)). The statistics
    are computed in fp32; the result has the dtype of ``eps``. A combination with zero std (a constant prediction)
    is left unscaled (r = 1) instead of producing NaN.
    """
    _check_same(eps, eps_1, eps_2)
    check_coefficient("phi", phi, 0.0, 1.0)
    if eps.ndim < 2:
        raise ValueError(f"rescale needs batched predictions [B, ...], got shape {tuple(eps.shape)}")
    dims = tuple(range(1, eps.ndim))
    s1 = eps_1.float().std(dim=dims, keepdim=True)
    s2 = eps_2.float().std(dim=dims, keepdim=True)
    s = eps.float().std(dim=dims, keepdim=True)
    r = torch.where(s > 0, (s1 + s2) / (2 * s), torch.ones_like(s))
    p = _per_sample(phi, r) if isinstance(phi, torch.Tensor) else phi
    factor = p * r + (1 - p)
    return eps * factor.to(eps.dtype)


def _weights(alpha: Coef, beta: Coef, v: Variant) -> tuple[Coef, Coef, Coef]:
    if v is Variant.DCG3:
        return (1.0 - alpha - beta, alpha, beta)
    return (1.0 - alpha, alpha - beta, beta)


def branch_weights(alpha: float, beta: float, variant: Variant | str = Variant.DCG2) -> tuple[float, float, float]:
    """The DCG combination as linear weights on branches 0, 1, 2 (they always sum to 1)."""
    v = _variant(variant)
    check_coefficient("alpha", alpha)
    check_coefficient("beta", beta)
    if isinstance(alpha, torch.Tensor) or isinstance(beta, torch.Tensor):
        raise ValueError("branch_weights needs python-number alpha and beta (a tensor would need a host sync)")
    w0, w1, w2 = _weights(alpha, beta, v)
    return (w0, float(w1), float(w2))


def _rescale_on(phi: Coef | None) -> bool:
    return phi is not None and (isinstance(phi, torch.Tensor) or phi != 0)


def needed_branches(
    alpha: Coef, beta: Coef, phi: Coef | None = None, variant: Variant | str = Variant.DCG2
) -> tuple[Branch, ...]:
    """The branches whose predictions one DCG step actually uses, in batch order ("no wasted work").

    A branch is needed when its linear weight is non-zero, and the two conditional branches are needed whenever
    the rescale is on (phi not None/0): their stds enter Eq. 4. Examples for DCG2: α=1 drops (∅,∅);
    α=β=1 without rescale leaves only (text,id). Tensor coefficients cannot be inspected without a host sync,
    so they make every branch needed.
    """
    v = _variant(variant)
    order = VARIANT_BRANCHES[v]
    if phi is not None:
        check_coefficient("phi", phi, 0.0, 1.0)
    if isinstance(alpha, torch.Tensor) or isinstance(beta, torch.Tensor):
        return order
    w = branch_weights(alpha, beta, v)
    rescale_on = _rescale_on(phi)
    return tuple(b for i, b in enumerate(order) if w[i] != 0 or (rescale_on and i > 0))


def guide(
    preds: Mapping[Branch | str, torch.Tensor],
    alpha: Coef,
    beta: Coef,
    phi: Coef | None = 0.75,
    variant: Variant | str = Variant.DCG2,
) -> torch.Tensor:
    """One DCG step (Eq. 3 + rescale Eq. 4-5) from the branch predictions that were computed.

    ``preds`` maps :class:`Branch` (or its string value) to a prediction; it must hold at least
    :func:`needed_branches`. With all three branches it evaluates :func:`combine` literally (the official
    arithmetic); with fewer it uses the equivalent linear weights of :func:`branch_weights`, equal to the full
    computation within float rounding (and bit-exact ``eps(text,id)`` when α=β=1 without rescale).
    ``phi=None`` (or 0) switches the rescale off.

    Tensor ``alpha``/``beta`` (0-dim or ``[B]``, e.g. gathered on an accelerator at a device step index) work with
    any branch subset too; their values cannot be inspected without a host sync, so the caller guarantees that the
    missing branches have weight 0 at this step (as a step plan's branch union does).
    """
    v = _variant(variant)
    order = VARIANT_BRANCHES[v]
    try:
        got = {k if isinstance(k, Branch) else Branch(k): t for k, t in preds.items()}
    except ValueError:
        raise ValueError(
            f"unknown branch name in {sorted(map(str, preds))}; use {[b.value for b in Branch]}"
        ) from None
    extra = [b.value for b in got if b not in order]
    if extra:
        raise ValueError(
            f"branches {sorted(extra)} are not used by variant {v.value} (its branches are {[b.value for b in order]})"
        )
    if all(b in got for b in order):
        eps = combine(got[order[0]], got[order[1]], got[order[2]], alpha, beta, v)
    elif isinstance(alpha, torch.Tensor) or isinstance(beta, torch.Tensor):
        _check_same(*got.values())
        ref = next(iter(got.values()))
        w = _weights(_per_sample(alpha, ref), _per_sample(beta, ref), v)
        eps = 0
        for i, b in enumerate(order):
            if b in got:
                eps = eps + w[i] * got[b]
    else:
        need = needed_branches(alpha, beta, phi, v)
        missing = [b.value for b in need if b not in got]
        if missing:
            raise ValueError(
                f"DCG step with alpha={alpha}, beta={beta}, phi={phi} ({v.value}) needs branches "
                f"{[b.value for b in need]}; missing {missing}"
            )
        w = branch_weights(alpha, beta, v)
        _check_same(*got.values())
        eps = None
        for i, b in enumerate(order):
            if w[i] != 0:
                term = got[b] if w[i] == 1 else w[i] * got[b]
                eps = term if eps is None else eps + term
        assert eps is not None  # the weights sum to 1, so one is non-zero
    if _rescale_on(phi):
        eps = rescale(eps, got[order[1]], got[order[2]], phi)
    return eps


# ----------------------------------------------------------------------------------------------------------------
# Config (the per-step schedules live in fastface.steps)


@dataclass(frozen=True)
class DCGConfig:
    """DCG settings: variant, α (id) and β (text) step schedules, rescale φ (None = off). Defaults = the paper.

    Paper/official defaults: DCG2, α = [1, 1.5, 1.5, 1], β = [1, 3, 3, 1] at 4 steps (any n: :func:`paper_schedule`),
    φ = 0.75 applied at every step (first and last included, where it still rescales slightly).
    """

    variant: Variant = Variant.DCG2
    alpha: StepSchedule = field(default_factory=lambda: StepSchedule.paper(1.5))
    beta: StepSchedule = field(default_factory=lambda: StepSchedule.paper(3.0))
    rescale: float | None = 0.75

    def __post_init__(self) -> None:
        object.__setattr__(self, "variant", _variant(self.variant))
        for name in ("alpha", "beta"):
            if not isinstance(getattr(self, name), StepSchedule):
                raise ValueError(f"DCGConfig.{name} must be a StepSchedule, got {getattr(self, name)!r}")
        if self.rescale is not None:
            check_coefficient("DCGConfig.rescale (phi)", self.rescale, 0.0, 1.0)

    @property
    def branches(self) -> tuple[Branch, Branch, Branch]:
        """The variant's three branches in batch order."""
        return VARIANT_BRANCHES[self.variant]

    def coefficients(self, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(α per step, β per step) for an n-step run."""
        return self.alpha.resolve(n), self.beta.resolve(n)

    def step(self, i: int, n: int) -> tuple[float, float]:
        """(α, β) at step i of n."""
        check_step(i, n)
        a, b = self.coefficients(n)
        return a[i], b[i]

    def needed(self, n: int, keep_all: bool = False) -> tuple[tuple[Branch, ...], ...]:
        """Per step, the branches to evaluate; ``keep_all`` (e.g. AM2 couples the branches) keeps all three."""
        if keep_all:
            check_steps(n)
            return (self.branches,) * n
        return tuple(needed_branches(a, b, self.rescale, self.variant) for a, b in zip(*self.coefficients(n)))

    def evaluations(self, n: int, keep_all: bool = False) -> int:
        """How many branch evaluations (UNet batch entries per image) an n-step run takes (official: 3n)."""
        return sum(len(s) for s in self.needed(n, keep_all))

    def guide(self, preds: Mapping[Branch | str, torch.Tensor], i: int, n: int) -> torch.Tensor:
        """:func:`guide` at step i of n with this config's coefficients."""
        a, b = self.step(i, n)
        return guide(preds, a, b, self.rescale, self.variant)


DCG_CONFIGS: dict[str, DCGConfig] = {
    # The paper's DCG (Eq. 3 with schedule and rescale).
    "paper": DCGConfig(),
    # Official baselines: α=β=g, no rescale. g=1 (Hyper, Lightning, Turbo) means eps(text, id) alone.
    "none": DCGConfig(alpha=StepSchedule.constant(1.0), beta=StepSchedule.constant(1.0), rescale=None),
    "cfg1.5": DCGConfig(alpha=StepSchedule.constant(1.5), beta=StepSchedule.constant(1.5), rescale=None),
}


def get_dcg_config(name: str) -> DCGConfig:
    """A named DCG config from :data:`DCG_CONFIGS`."""
    return named(DCG_CONFIGS, name, "DCG config")
