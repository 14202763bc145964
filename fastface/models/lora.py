"""A LoRA wrapper around ``nn.Linear``: ``y = base(x) + scale·up(down(x))`` (Hu et al. 2021, LoRA, eq. 3).

The low-rank update is kept unfused by default, so the output is computed exactly as the reference
implementations do (``x·Wᵀ + (x·Dᵀ)·Uᵀ``). ``scale`` is a 0-dim buffer: changing it is an in-place fill,
needs no reload and causes no recompilation. ``fuse()`` precomputes ``W + scale·U·D`` for speed (one matmul
instead of three) into the wrapped layer's weight, in place, and keeps the original ``W`` on the CPU: the device the
layer runs on holds no second copy (a GPU's memory is the scarce one), and ``unfuse()`` (which an adapter's
``remove()`` calls) copies the original back, so unwrapping restores the original module exactly.
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
        self._original: torch.Tensor | None = None  # while fused: W before fusing, on the CPU (not a buffer: stays)

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
        return self._original is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._original is not None:  # the base weight holds W + scale·U·D
            return self.base(x)
        return self.base(x) + self.up(self.down(x)) * self.scale

    def set_scale(self, scale: float) -> None:
        """Set the LoRA strength in place (no reload); a fused weight is recomputed from the original."""
        self.scale.fill_(float(scale))
        if self._original is not None:
            self.fuse()

    @torch.no_grad()
    def fuse(self) -> None:
        """Write ``W + scale·U·D`` (summed in fp32, one rounding to the layer dtype) into the wrapped layer's weight.

        The first fuse keeps ``W`` on the CPU (one host copy of the weight; none on the layer's device); a later one
        (a new scale) starts again from it. The values equal an out-of-place ``F.linear`` with the fused weight.
        """
        w = self.base.weight
        original = w if self._original is None else self._original.to(w.device)
        delta = self.up.weight.float() @ self.down.weight.float()  # [out, in]
        fused = (original.float() + self.scale.float() * delta).to(w.dtype)
        if self._original is None:
            self._original = w.detach().to("cpu", copy=True)
        with torch.inference_mode():  # also valid for weights created under inference mode
            w.copy_(fused)

    @torch.no_grad()
    def unfuse(self) -> None:
        """Copy the original weight back and go back to the exact unfused computation (no-op when not fused)."""
        if self._original is None:
            return
        w = self.base.weight
        with torch.inference_mode():
            w.copy_(self._original.to(w.device))
        self._original = None

    def restore_base(self) -> None:
        """Leave the wrapped layer as it was before wrapping (called before an adapter swaps it back in)."""
        self.unfuse()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, fused={self.is_fused}"
