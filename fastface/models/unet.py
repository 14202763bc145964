"""The SDXL UNet (Podell et al. 2023) with diffusers' module names, built from a frozen config.

Module names equal those of diffusers' ``UNet2DConditionModel`` so diffusers-keyed state dicts load 1:1 (the LDM
layout is mapped in :mod:`fastface.models.unet_loading`). Attention runs through SDPA; cross-attention layers carry
an empty ``ip`` slot for the decoupled identity branch that the adapters install.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastface.models.attention import Attention
from fastface.models.unet_config import (  # re-exported: the config's historical home
    SDXL_DOWN_BLOCKS,
    SDXL_UP_BLOCKS,
    UNET_CONFIGS,
    UNetConfig,
    get_unet_config,
)

__all__ = ["SDXL_DOWN_BLOCKS", "SDXL_UP_BLOCKS", "UNET_CONFIGS", "UNet", "UNetConfig", "get_unet_config"]


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] with frequencies exp(-ln(10000)·i/(dim/2)) (DDPM/LDM), fp32 [N, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _mutable(x: torch.Tensor) -> bool:
    # In-place updates of fresh norm/conv outputs inside a resblock, only when autograd does not track them
    # (inference); the results are bit-identical to the out-of-place ops.
    return not x.requires_grad


def _silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=_mutable(x))


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoid: linear_1 -> SiLU -> linear_2 (diffusers ``TimestepEmbedding``), optional ``cond_proj``."""

    def __init__(self, in_dim: int, dim: int, cond_dim: int | None = None) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)
        if cond_dim is not None:
            self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False)
        else:
            self.register_module("cond_proj", None)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None and self.cond_proj is not None:
            x = x + self.cond_proj(cond)
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """ResBlock: conv1(SiLU(GN(x))) + proj(SiLU(emb)), conv2(SiLU(GN(.))), plus the (1x1-projected) input."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_shortcut = nn.Conv2d(cin, cout, 1)
        else:
            self.register_module("conv_shortcut", None)

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        # emb_act = SiLU(emb) [B, E], shared by all resblocks
        h = self.conv1(_silu(self.norm1(x)))
        t = self.time_emb_proj(emb_act)[:, :, None, None]
        h = h.add_(t) if _mutable(h) else h + t
        h = self.conv2(_silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(skip) if _mutable(h) else skip + h


class GEGLU(nn.Module):
    """GEGLU (Shazeer 2020): proj to 2·inner, split into (h, gate), return h · GELU(gate) (exact erf GELU)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """Feed-forward: GEGLU(dim -> 4·dim) then Linear(4·dim -> dim); ``net.1`` is diffusers' (no-op) dropout slot."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-LN transformer block: self-attention, cross-attention on the text, GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int) -> None:
        super().__init__()
        head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, id_tokens: torch.Tensor | None, id_scale: torch.Tensor | None
    ) -> torch.Tensor:
        # out-of-place residuals: attention outputs stay untouched for forward hooks that keep them
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context, id_tokens, id_scale) + x
        return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
    """Spatial transformer with linear projections: GN -> proj_in -> N blocks -> proj_out, plus the input."""

    def __init__(self, dim: int, heads: int, depth: int, context_dim: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(dim, heads, context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, id_tokens: torch.Tensor | None, id_scale: torch.Tensor | None
    ) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(b, hgt * wid, c)  # [B, HW, C]
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, id_tokens, id_scale)
        h = self.proj_out(h).view(b, hgt, wid, c).permute(0, 3, 1, 2)  # [B, C, H, W] (strided view)
        return x + h


class Downsample(nn.Module):
    """Conv 3x3, stride 2, padding 1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 (or to ``size`` for odd latents), then conv 3x3."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


def _transformers(n: int, cout: int, heads: int, depth: int, cfg: UNetConfig) -> nn.ModuleList | None:
    """The ``n`` transformers of a level (None for a level without attention, ``depth`` 0)."""
    if depth == 0:
        return None
    return nn.ModuleList([Transformer2DModel(cout, heads, depth, cfg.context_dim, cfg.norm_groups) for _ in range(n)])


class DownBlock(nn.Module):
    """One down level: L resblocks (each optionally followed by a spatial transformer), then a downsampler."""

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, depth: int, heads: int, downsample: bool) -> None:
        super().__init__()
        n = cfg.layers_per_block
        self.register_module("attentions", _transformers(n, cout, heads, depth, cfg))
        self.resnets = nn.ModuleList(
            [ResnetBlock(cin if i == 0 else cout, cout, cfg.time_embed_dim, cfg.norm_groups) for i in range(n)]
        )
        self.register_module("downsamplers", nn.ModuleList([Downsample(cout)]) if downsample else None)

    def forward(
        self,
        x: torch.Tensor,
        emb_act: torch.Tensor,
        context: torch.Tensor,
        id_tokens: torch.Tensor | None,
        id_scale: torch.Tensor | None,
        skips: list[torch.Tensor],
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb_act)
            if self.attentions is not None:
                x = self.attentions[i](x, context, id_tokens, id_scale)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x


class UpBlock(nn.Module):
    """One up level: L+1 resblocks on cat([x, skip]) (each optionally followed by a transformer), then an upsampler."""

    def __init__(
        self, prev: int, cout: int, skip_in: int, cfg: UNetConfig, depth: int, heads: int, upsample: bool
    ) -> None:
        super().__init__()
        n = cfg.layers_per_block + 1
        self.register_module("attentions", _transformers(n, cout, heads, depth, cfg))
        # resnet i sees the previous output (prev for i=0) plus a skip (skip_in for the last one, cout otherwise)
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(
                    (prev if i == 0 else cout) + (skip_in if i == n - 1 else cout),
                    cout,
                    cfg.time_embed_dim,
                    cfg.norm_groups,
                )
                for i in range(n)
            ]
        )
        self.register_module("upsamplers", nn.ModuleList([Upsample(cout)]) if upsample else None)

    def forward(
        self,
        x: torch.Tensor,
        emb_act: torch.Tensor,
        context: torch.Tensor,
        id_tokens: torch.Tensor | None,
        id_scale: torch.Tensor | None,
        skips: list[torch.Tensor],
        up_size: tuple[int, int] | None,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), emb_act)
            if self.attentions is not None:
                x = self.attentions[i](x, context, id_tokens, id_scale)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, up_size)
        return x


class MidBlock(nn.Module):
    """Mid block: resblock, spatial transformer, resblock."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        c = cfg.channels[-1]
        self.attentions = nn.ModuleList(
            [Transformer2DModel(c, cfg.heads[-1], cfg.mid_depth, cfg.context_dim, cfg.norm_groups)]
        )
        self.resnets = nn.ModuleList([ResnetBlock(c, c, cfg.time_embed_dim, cfg.norm_groups) for _ in range(2)])

    def forward(
        self,
        x: torch.Tensor,
        emb_act: torch.Tensor,
        context: torch.Tensor,
        id_tokens: torch.Tensor | None,
        id_scale: torch.Tensor | None,
    ) -> torch.Tensor:
        x = self.resnets[0](x, emb_act)
        x = self.attentions[0](x, context, id_tokens, id_scale)
        return self.resnets[1](x, emb_act)


class UNet(nn.Module):
    """The SDXL UNet: ``unet(x, t, context, text_embeds, time_ids) -> eps``, diffusers module names.

    Submodules are registered in the order down_blocks, up_blocks, mid_block (the order IP-Adapter checkpoints
    index attention layers in).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        cfg = config
        self.config = cfg
        ch, n = cfg.channels, len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim, cfg.time_cond_proj_dim)
        self.add_embedding = TimestepEmbedding(cfg.add_in_dim, cfg.time_embed_dim)
        self.down_blocks = nn.ModuleList(
            [
                DownBlock(ch[max(i - 1, 0)], ch[i], cfg, cfg.depth[i], cfg.heads[i], downsample=i < n - 1)
                for i in range(n)
            ]
        )
        rch, rdepth, rheads = ch[::-1], cfg.depth[::-1], cfg.heads[::-1]
        self.up_blocks = nn.ModuleList(
            [
                UpBlock(
                    rch[max(i - 1, 0)], rch[i], rch[min(i + 1, n - 1)], cfg, rdepth[i], rheads[i], upsample=i < n - 1
                )
                for i in range(n)
            ]
        )
        self.mid_block = MidBlock(cfg)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_groups, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def attention_layers(self) -> list[tuple[str, Attention]]:
        """All attention modules in checkpoint order (down, up, mid; attn1 then attn2 in each block)."""
        out = []
        for prefix, blocks in (("down_blocks", self.down_blocks), ("up_blocks", self.up_blocks)):
            for i, block in enumerate(blocks):
                if block.attentions is not None:
                    out += _block_attention(f"{prefix}.{i}", block.attentions)
        return out + _block_attention("mid_block", self.mid_block.attentions)

    def cross_attention_layers(self) -> list[tuple[str, Attention]]:
        """The cross-attention (attn2) layers in checkpoint order."""
        return [(name, m) for name, m in self.attention_layers() if name.endswith("attn2")]

    def _embed(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float | int,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        timestep_cond: torch.Tensor | None,
    ) -> torch.Tensor:
        b = x.shape[0]
        if not torch.is_tensor(t):
            t = torch.full((b,), t, dtype=torch.float32, device=x.device)
        elif t.ndim == 0:
            t = t[None].to(x.device)
        t_emb = timestep_embedding(t.expand(b), self.config.channels[0]).to(x.dtype)
        emb = self.time_embedding(t_emb, timestep_cond)
        # text-time conditioning: pooled text ‖ sinusoid of each time id, flattened per sample
        tid = timestep_embedding(time_ids.flatten(), self.config.time_id_dim).reshape(text_embeds.shape[0], -1)
        add = torch.cat([text_embeds, tid], dim=-1).to(emb.dtype)
        return emb + self.add_embedding(add)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float | int,
        context: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
        id_tokens: torch.Tensor | None = None,
        id_scale: torch.Tensor | float | None = None,
        timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict epsilon for latents x [B, C, H, W] at timestep t (number, 0-dim or [B] tensor).

        context [B, 77, context_dim]; text_embeds [B, pooled_dim]; time_ids [B, 6]; id_tokens [B, K, context_dim]
        go to every cross-attention's identity branch with id_scale (None = 1, a float, or a [B] tensor).
        """
        if text_embeds is None or time_ids is None:
            raise ValueError("the SDXL UNet needs text_embeds (pooled text embedding) and time_ids ([B, 6])")
        b = x.shape[0]
        if id_tokens is not None and id_scale is not None:
            if torch.is_tensor(id_scale):
                id_scale = id_scale.to(device=x.device, dtype=x.dtype).reshape(-1).expand(b)
            else:
                id_scale = torch.full((b,), float(id_scale), dtype=x.dtype, device=x.device)
        emb_act = F.silu(self._embed(x, t, text_embeds, time_ids, timestep_cond))  # [B, E], for every resblock

        # explicit output sizes only when the latent is not a multiple of 2^(levels-1) (diffusers' rule)
        factor = 2 ** (len(self.up_blocks) - 1)
        odd = any(s % factor for s in x.shape[-2:])

        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h = block(h, emb_act, context, id_tokens, id_scale, skips)
        h = self.mid_block(h, emb_act, context, id_tokens, id_scale)
        for block in self.up_blocks:
            n = len(block.resnets)
            up_size = tuple(skips[-n - 1].shape[-2:]) if odd and block.upsamplers is not None else None
            h = block(h, emb_act, context, id_tokens, id_scale, skips, up_size)
        return self.conv_out(_silu(self.conv_norm_out(h)))


def _block_attention(prefix: str, transformers: nn.ModuleList) -> list[tuple[str, Attention]]:
    out = []
    for j, tr in enumerate(transformers):
        for k, blk in enumerate(tr.transformer_blocks):
            base = f"{prefix}.attentions.{j}.transformer_blocks.{k}"
            out += [(f"{base}.attn1", blk.attn1), (f"{base}.attn2", blk.attn2)]
    return out
