"""Attention for the SDXL UNet: SDPA self/text attention and the decoupled identity branch (IP-Adapter).

The identity branch follows IP-Adapter's decoupled cross-attention, ``Attn(Q, K, V) + λ·Attn(Q, K', V')``
(Ye et al. 2023, eq. 5). Its attention map is computed explicitly (a handful of identity tokens) and passes through
named :class:`HookPoint` modules so FastFace's attention manipulation can replace it with forward hooks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Scaled dot-product attention softmax(q k^T / sqrt(d)) v on [B, H, N, d] tensors (SDPA kernel)."""
    return F.scaled_dot_product_attention(q, k, v)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, H*d] -> [B, H, N, d] (a view, no copy)."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, d] -> [B, N, H*d]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def has_hooks(module: nn.Module) -> bool:
    """Whether a forward hook (or pre-hook, module-local or global) would run when ``module`` is called."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or _torch_module._global_forward_hooks
        or _torch_module._global_forward_pre_hooks
    )


class HookPoint(nn.Module):
    """A named identity module: ``forward(x, *context) -> x``.

    A forward hook registered on it sees ``inputs = (x, *context)`` and may return a replacement for ``x``.
    """

    def forward(self, x: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        return x


class IdentityAttention(nn.Module):
    """The decoupled identity branch of IP-Adapter: ``o_txt + scale · softmax(q K'^T / sqrt(d)) V'``.

    ``to_k_ip``/``to_v_ip`` project the identity tokens; ``probs`` carries the attention map [B, H, N, K] and
    ``head_out`` the per-head output [B, H, N, d] (its hooks also see the original map and the values). The map is
    computed explicitly only when a hook is registered on one of them; otherwise SDPA computes the same output.
    """

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.to_k_ip = nn.Linear(context_dim, dim, bias=False)
        self.to_v_ip = nn.Linear(context_dim, dim, bias=False)
        self.probs = HookPoint()
        self.head_out = HookPoint()

    def forward(
        self, q: torch.Tensor, o_txt: torch.Tensor, tokens: torch.Tensor, scale: torch.Tensor | None
    ) -> torch.Tensor:
        k = split_heads(self.to_k_ip(tokens), self.heads)  # [B, H, K, d]
        v = split_heads(self.to_v_ip(tokens), self.heads)  # [B, H, K, d]
        if not (has_hooks(self.probs) or has_hooks(self.head_out)):
            # nothing reads or replaces the map: the fused kernel, without materialising [B, H, N, K]
            return self.combine(o_txt, attention(q, k, v), scale)
        a = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim**-0.5, dim=-1)  # [B, H, N, K]
        a_t = self.probs(a)
        o_id = self.head_out(a_t @ v, a, v)  # [B, H, N, d]
        return self.combine(o_txt, o_id, scale)

    def combine(self, o_txt: torch.Tensor, o_id: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """Combine the text and identity outputs: ``o_txt + scale[b] · o_id`` (scale None means 1)."""
        if scale is None:
            return o_txt + o_id
        return o_txt + scale.view(-1, 1, 1, 1) * o_id


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``).

    Self-attention when ``context`` is None, cross-attention otherwise. The ``ip`` slot holds an optional
    :class:`IdentityAttention` (None by default) that is applied when ``id_tokens`` are given.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=True)])
        self.register_module("ip", None)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        id_tokens: torch.Tensor | None = None,
        id_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ctx = x if context is None else context
        q = split_heads(self.to_q(x), self.heads)  # [B, H, N, d]
        k = split_heads(self.to_k(ctx), self.heads)  # [B, H, M, d]
        v = split_heads(self.to_v(ctx), self.heads)
        o = attention(q, k, v)  # [B, H, N, d]
        if self.ip is not None and id_tokens is not None:
            o = self.ip(q, o, id_tokens, id_scale)
        return self.to_out[0](merge_heads(o))
