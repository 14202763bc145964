"""A LoRA wrapper around ``nn.Linear``: ``y = base(x) + scale·up(down(x))`` (Hu et al. 2021, LoRA, eq. 3).

The low-rank update is kept unfused by default, so the output is computed exactly as the reference
implementations do (``x·Wᵀ + (x·Dᵀ)·Uᵀ``). ``scale`` is a 0-dim buffer: changing it is an in-place fill,
needs no reload and causes no recompilation. ``fuse()`` precomputes ``W + scale·U·D`` into a separate
buffer for speed (one matmul instead of three) without touching the wrapped layer, so unwrapping always
restores the original module exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Module):
    """``nn.Linear`` plus a scaled low-rank update; calls like the wrapped layer (same in/out features)."""

    def __init__(
        self, base: nn.Linear, rank: int, scale: float = 1.0, *, device: torch.device | str | None = None
    ) -> None:
        """Wrap ``base`` with new (randomly initialised) factors of ``rank`` on ``device`` (default: the base's)."""
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        weight = base.weight
        factory = {"device": weight.device if device is None else device, "dtype": weight.dtype}
        self.down = nn.Linear(base.in_features, rank, bias=False, **factory)  # D: [r, in]
        self.up = nn.Linear(rank, base.out_features, bias=False, **factory)  # U: [out, r]
        self.register_buffer("scale", torch.tensor(float(scale), device=weight.device), persistent=False)
        self.register_buffer("fused_weight", None, persistent=False)

    @classmethod
    def from_weights(
        cls, base: nn.Linear, down: torch.Tensor, up: torch.Tensor, scale: float = 1.0
    ) -> LoRALinear:
        """Wrap ``base`` with the given factors ``down`` [r, in] and ``up`` [out, r], cast to the base's dtype/device.

        The factors are assigned, not copied, when they already have the right dtype and device.
        """
        rank = down.shape[0]
        if down.ndim != 2 or up.ndim != 2 or tuple(down.shape) != (rank, base.in_features) or tuple(up.shape) != (
            base.out_features,
            rank,
        ):
            raise ValueError(
                f"LoRA factor shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not fit a Linear "
                f"{base.in_features}->{base.out_features}: expected down (r, {base.in_features}) and "
                f"up ({base.out_features}, r)"
            )
        module = cls(base, rank, scale, device="meta")
        w = base.weight
        module.down.load_state_dict({"weight": down.to(device=w.device, dtype=w.dtype)}, assign=True)
        module.up.load_state_dict({"weight": up.to(device=w.device, dtype=w.dtype)}, assign=True)
        return module

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    @property
    def is_fused(self) -> bool:
        return self.fused_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_weight is not None:
            return F.linear(x, self.fused_weight, self.base.bias)
        return self.base(x) + self.up(self.down(x)) * self.scale

    def set_scale(self, scale: float) -> None:
        """Set the LoRA strength in place (no reload); a fused weight is recomputed."""
        self.scale.fill_(float(scale))
        if self.fused_weight is not None:
            self.fuse()

    @torch.no_grad()
    def fuse(self) -> None:
        """Precompute ``W + scale·U·D`` (in fp32, stored in the layer dtype); the wrapped layer is untouched."""
        w = self.base.weight
        delta = self.up.weight.float() @ self.down.weight.float()  # [out, in]
        self.fused_weight = (w.float() + self.scale.float() * delta).to(w.dtype)

    def unfuse(self) -> None:
        """Drop the fused weight and go back to the exact unfused computation."""
        self.fused_weight = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, fused={self.is_fused}"
