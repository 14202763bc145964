"""Attention manipulation (AM, FastFace paper Sec. 3.3 and App. E, G) as pure functions on attention maps.

Maps are the softmax maps of the identity (decoupled) cross-attention, shaped ``[B, heads, positions, tokens]``
(softmax over tokens); values and per-head outputs are ``[B, heads, tokens, head_dim]`` and
``[B, heads, positions, head_dim]``. Two transforms:

- AM1 "scale-power" (Eq. 7): ``min(s·A^p, 10)``.
- AM2 "scheduled softmask" (Eq. 8-10): an adaptive sigmoid mask around a quantile, scaled, blended with its
  AdaIN against the original map; the same AdaIN is applied to the per-head attention output.

The semantics are those of the official code (ControlGenAI/FastFace ``src/custom_dca.py``), which differs from
the paper text where noted. All functions are torch.compile friendly (no ``.item()``, no Python branching on
tensor values); coefficients may be python numbers or tensors (0-dim or ``[B]`` per sample). Python numbers are
validated; tensors are expected from a validated config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from fastface.steps import Coef, StepSchedule, check_coefficient, check_step, check_steps, named

logger = logging.getLogger(__name__)

__all__ = [
    "scale_power",
    "minmax_norm",
    "spatial_quantile",
    "softmask",
    "adain",
    "adain_maps",
    "adain_output",
    "am2_probs",
    "AM1Config",
    "AM2Config",
    "AM2Step",
    "AM_CONFIGS",
    "get_am_config",
]

UPPER_BOUND = 10.0  # the official clamp on transformed maps
ADAIN_EPS = 1e-6
QUANTILE_FLOOR = 1e-6  # the official clamp(min=1e-6) on the quantile


def _check_map(a: torch.Tensor, name: str = "attention map") -> None:
    if not isinstance(a, torch.Tensor) or a.ndim != 4:
        shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
        raise ValueError(f"{name} must be a tensor [batch, heads, positions, tokens], got {shape}")


def _coef(c: Coef, ref: torch.Tensor) -> Coef:
    """A ``[B]`` tensor becomes ``[B, 1, 1, 1]``; 0-dim tensors are cast; python numbers pass through."""
    if isinstance(c, torch.Tensor):
        c = c.to(device=ref.device, dtype=ref.dtype)
        return c.view(-1, 1, 1, 1) if c.ndim == 1 else c
    return c


def _check_groups(batch: int, groups: int) -> None:
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or batch % groups:
        raise ValueError(
            f"groups={groups!r} must be a positive integer dividing the batch size {batch} "
            "(the batch is laid out as [branch0 images..., branch1 images..., ...], index = branch*groups + image)"
        )


def scale_power(a: torch.Tensor, s: Coef, p: Coef = 1.3, clamp: float = UPPER_BOUND) -> torch.Tensor:
    """AM1 scale-power transform (paper Eq. 7, with the official clamp): ``min(s · a^p, clamp)``.

    No re-normalisation over tokens. Official defaults: p = 1.3, s = 1.45 in up blocks and 1.55 in down blocks
    (:class:`AM1Config`; the paper's App. G swaps the two scales, the code is followed here).
    """
    _check_map(a)
    check_coefficient("AM1 scale s", s)
    check_coefficient("AM1 power p", p)
    check_coefficient("clamp", clamp)
    return (_coef(s, a) * a.pow(_coef(p, a))).clamp(max=clamp)


def minmax_norm(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Min-max normalisation per token over (branches of one image, heads, positions) of a ``[B,H,N,K]`` map.

    The batch is read as ``[B // groups, groups]`` (index = branch*groups + image): min and max span the
    B // groups entries of each image. ``groups=1`` spans the whole batch, which is the official code's
    ``dims=(0, 1, 2)``. A constant slice maps to 0 instead of NaN.
    """
    _check_map(x)
    _check_groups(x.shape[0], groups)
    b, h, n, k = x.shape
    xg = x.reshape(b // groups, groups, h, n, k)
    lo = xg.amin(dim=(0, 2, 3), keepdim=True)
    hi = xg.amax(dim=(0, 2, 3), keepdim=True)
    rng = (hi - lo).clamp_min(torch.finfo(x.dtype).tiny)
    return ((xg - lo) / rng).reshape(b, h, n, k)


def spatial_quantile(x: torch.Tensor, q: Coef) -> torch.Tensor:
    """The q-quantile over positions (dim -2) per (batch, head, token), keepdim: ``[B,H,1,K]``.

    Same as ``torch.quantile(x, q, dim=-2, keepdim=True)`` (linear interpolation, ranks computed in x's dtype),
    without its input size limit, and with q a python number or a 0-dim tensor.
    """
    n = x.shape[-2]
    srt = x.transpose(-1, -2).sort(dim=-1).values  # [B,H,K,N]
    qt = torch.as_tensor(q, dtype=x.dtype, device=x.device)
    rank = qt * (n - 1)
    below = rank.floor()
    weight = rank - below
    idx_lo = below.long().clamp(0, n - 1)
    idx_hi = rank.ceil().long().clamp(0, n - 1)
    shape = (*srt.shape[:-1], 1)
    v_lo = srt.gather(-1, idx_lo.expand(shape))
    v_hi = srt.gather(-1, idx_hi.expand(shape))
    return torch.lerp(v_lo, v_hi, weight).transpose(-1, -2)


def _invert_first(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([1 - x[..., :1], x[..., 1:]], dim=-1)


def softmask(
    a: torch.Tensor,
    d: Coef,
    s: Coef,
    q: Coef = 0.65,
    invert_first: bool = True,
    groups: int = 1,
    clamp: float = UPPER_BOUND,
) -> torch.Tensor:
    """AM2 scheduled-softmask map transform (paper Eq. 8-9), official steps 1-6, applied to all tokens.

    1. token 0 inverted, ``1 − A[...,0]`` (``invert_first``; FaceID-Plus-v2's first token attends to background);
    2. ``norm``: min-max per token over (branches of one image, heads, positions), see :func:`minmax_norm`;
    3. ``Q``: the q-quantile over positions of the *un-normalised* map per (batch, head, token), floored at 1e-6;
    4. ``SM = min(s · norm(sigmoid(d · (norm(A) − Q))), clamp)`` (the paper's Eq. 9 sign is garbled; the code's
       positive sign sends values above the quantile towards 1);
    5. token 0 mapped back with ``max_positions(SM[...,0]) − SM[...,0]`` per (batch, head).

    Computed in fp32 (the official code takes the quantile in fp32 and the rest in fp16); returns a's dtype.
    """
    _check_map(a)
    check_coefficient("AM2 sharpness d", d)
    check_coefficient("AM2 scale s", s)
    check_coefficient("clamp", clamp)
    if not isinstance(q, torch.Tensor) and not (isinstance(q, (int, float)) and 0.0 < q < 1.0):
        raise ValueError(f"AM2 quantile q must lie in (0, 1), got {q!r}")
    _check_groups(a.shape[0], groups)
    x = a.float()
    if invert_first:
        x = _invert_first(x)
    quant = spatial_quantile(x, q).clamp(min=QUANTILE_FLOOR)
    mask = torch.sigmoid(_coef(d, x) * (minmax_norm(x, groups) - quant))
    y = (_coef(s, x) * minmax_norm(mask, groups)).clamp(max=clamp)
    if invert_first:
        y0 = y[..., :1]
        y = torch.cat([y0.amax(dim=-2, keepdim=True) - y0, y[..., 1:]], dim=-1)
    return y.to(a.dtype)


def adain(x_t: torch.Tensor, x: torch.Tensor, w: Coef) -> torch.Tensor:
    """AdaIN blend over the last axis: ``w·x_t + (1−w)·((x_t − μ_t)·σ/(σ_t + 1e-6) + μ)`` (paper Eq. 10).

    μ, σ (unbiased) are taken over the last dim of the original ``x``; μ_t, σ_t of the transformed ``x_t``.
    Statistics in fp32; returns x_t's dtype.
    """
    if x_t.shape != x.shape:
        raise ValueError(f"AdaIN needs equal shapes, got {tuple(x_t.shape)} and {tuple(x.shape)}")
    if x.shape[-1] < 2:
        raise ValueError(f"AdaIN needs at least 2 entries on the last axis for an unbiased std, got {x.shape[-1]}")
    check_coefficient("AdaIN weight w", w, 0.0, 1.0)
    xt, xo = x_t.float(), x.float()
    mu_t, sd_t = xt.mean(-1, keepdim=True), xt.std(-1, keepdim=True)
    mu, sd = xo.mean(-1, keepdim=True), xo.std(-1, keepdim=True)
    restyled = (xt - mu_t) * sd / (sd_t + ADAIN_EPS) + mu
    wc = _coef(w, xt)
    return (wc * xt + (1 - wc) * restyled).to(x_t.dtype)


def adain_maps(a_t: torch.Tensor, a: torch.Tensor, w: Coef = 0.7) -> torch.Tensor:
    """AM2's AdaIN on maps: statistics over the token axis per (batch, head, position), see :func:`adain`."""
    _check_map(a_t, "transformed attention map")
    _check_map(a)
    return adain(a_t, a, w)


def adain_output(
    o_t: torch.Tensor, a: torch.Tensor, v: torch.Tensor, w: Coef = 0.7, groups: int = 1
) -> torch.Tensor:
    """AM2's AdaIN on the per-head identity-attention output ``o_t`` [B,H,N,d] against ``a @ v`` (channel axis).

    ``a`` is the original map [B,H,N,K], ``v`` the values [B,H,K,d]. As in the official code, the result falls
    back to ``o_t`` when the AdaIN result holds a NaN; the official check spans the whole batch, here it spans
    each image's branches (``groups`` as in :func:`minmax_norm`; groups=1 is the official behaviour).
    """
    _check_map(a)
    if v.ndim != 4 or v.shape[:2] != a.shape[:2] or v.shape[2] != a.shape[3]:
        raise ValueError(
            f"values must be [B, heads, tokens, head_dim] matching map {tuple(a.shape)}, got {tuple(v.shape)}"
        )
    if o_t.shape != (*a.shape[:3], v.shape[3]):
        raise ValueError(f"head output must be {(*a.shape[:3], v.shape[3])}, got {tuple(o_t.shape)}")
    _check_groups(a.shape[0], groups)
    o = a @ v
    blended = adain(o_t, o, w)
    b = o_t.shape[0]
    nan = torch.isnan(blended).reshape(b // groups, groups, -1).any(dim=2).any(dim=0)  # [groups]
    nan = nan.repeat(b // groups).view(b, 1, 1, 1)
    return torch.where(nan, o_t, blended)


def am2_probs(
    a: torch.Tensor,
    d: Coef,
    s: Coef,
    q: Coef = 0.65,
    w: Coef | None = 0.7,
    invert_first: bool = True,
    groups: int = 1,
    clamp: float = UPPER_BOUND,
) -> torch.Tensor:
    """AM2 on a map (paper Eq. 10): :func:`softmask`, then :func:`adain_maps` with weight w (None = no AdaIN)."""
    a_t = softmask(a, d, s, q, invert_first, groups, clamp)
    return a_t if w is None else adain_maps(a_t, a, w)


# ----------------------------------------------------------------------------------------------------------------
# Configs


@dataclass(frozen=True)
class AM1Config:
    """AM1 scale-power settings. Defaults from the official code: p = 1.3, s_up = 1.45, s_down = 1.55.

    The paper's App. G states s_down = 1.45 and s_up = 1.55; the official configs (which produced the tables)
    have them the other way round, and that is followed here.
    """

    p: float = 1.3
    s_up: float = 1.45
    s_down: float = 1.55
    clamp: float = UPPER_BOUND

    def __post_init__(self) -> None:
        for name in ("p", "s_up", "s_down", "clamp"):
            check_coefficient(f"AM1Config.{name}", getattr(self, name))

    def scale(self, part: str) -> float:
        """The scale for a UNet part, 'up' or 'down' (the mid block is not a target)."""
        if part not in ("up", "down"):
            raise ValueError(f"AM1 targets the 'up' and 'down' parts of the UNet, got part {part!r}")
        return self.s_up if part == "up" else self.s_down

    def apply(self, a: torch.Tensor, part: str) -> torch.Tensor:
        """:func:`scale_power` with this part's scale."""
        return scale_power(a, self.scale(part), self.p, self.clamp)


@dataclass(frozen=True)
class AM2Step:
    """AM2 parameters resolved for one step: sharpness d, scale s, quantile q, AdaIN weight w (None = off)."""

    d: float
    s: float
    q: float
    w: float | None


@dataclass(frozen=True)
class AM2Config:
    """AM2 scheduled-softmask settings; defaults from the official FastFace (AM2 + DCG) config.

    4-step values: d = [7.5, 5, 5, 5], s = [1.0, 1.55, 1.55, 1.55], q = 0.65, w = 0.7, same in up and down
    blocks. Rule for any n steps: the first step gets the first value and every later step the later value
    (the paper's App. G: "d = 7.5 at first step, d = 5 at other steps", "s = 1.55 everywhere except first step").
    ``adain=False`` reproduces the official AM-only config (no AdaIN). ``invert_first`` is for FaceID-Plus-v2,
    whose first id token attends to the background (App. E).
    """

    d: StepSchedule = field(default_factory=lambda: StepSchedule.first_step(7.5, 5.0))
    s: StepSchedule = field(default_factory=lambda: StepSchedule.first_step(1.0, 1.55))
    q: StepSchedule = field(default_factory=lambda: StepSchedule.constant(0.65))
    w: StepSchedule = field(default_factory=lambda: StepSchedule.constant(0.7))
    adain: bool = True
    invert_first: bool = True
    clamp: float = UPPER_BOUND

    def __post_init__(self) -> None:
        for name in ("d", "s", "q", "w"):
            if not isinstance(getattr(self, name), StepSchedule):
                raise ValueError(f"AM2Config.{name} must be a StepSchedule, got {getattr(self, name)!r}")
        self.q.check_range("AM2 quantile q", 0.0, 1.0, lo_open=True, hi_open=True)
        self.w.check_range("AM2 AdaIN weight w", 0.0, 1.0)
        check_coefficient("AM2Config.clamp", self.clamp)

    def steps(self, n: int) -> tuple[AM2Step, ...]:
        """The resolved parameters of every step of an n-step run."""
        check_steps(n)
        d, s, q, w = (sch.resolve(n) for sch in (self.d, self.s, self.q, self.w))
        return tuple(AM2Step(d[i], s[i], q[i], w[i] if self.adain else None) for i in range(n))

    def step(self, i: int, n: int) -> AM2Step:
        """The parameters at step i of n."""
        check_step(i, n)
        return self.steps(n)[i]

    def apply(self, a: torch.Tensor, i: int, n: int, groups: int = 1) -> torch.Tensor:
        """:func:`am2_probs` at step i of n."""
        p = self.step(i, n)
        return am2_probs(a, p.d, p.s, p.q, p.w, self.invert_first, groups, self.clamp)

    def apply_output(
        self, o_t: torch.Tensor, a: torch.Tensor, v: torch.Tensor, i: int, n: int, groups: int = 1
    ) -> torch.Tensor:
        """:func:`adain_output` at step i of n (identity when AdaIN is off)."""
        p = self.step(i, n)
        return o_t if p.w is None else adain_output(o_t, a, v, p.w, groups)


AM_CONFIGS: dict[str, AM1Config | AM2Config] = {
    "am1": AM1Config(),
    "am2": AM2Config(),
    # The official AM-only softmask config runs without AdaIN.
    "am2_no_adain": AM2Config(adain=False),
}


def get_am_config(name: str) -> AM1Config | AM2Config:
    """A named AM config from :data:`AM_CONFIGS`."""
    return named(AM_CONFIGS, name, "AM config")
