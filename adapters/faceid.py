"""Projection models of IP-Adapter FaceID (MLPProjModel) and FaceID-Plus/-Plus-v2 (ProjPlusModel).

Ye et al. 2023, "IP-Adapter", with the FaceID variants of the tencent-ailab/IP-Adapter repository. Parameter
names equal the keys of the original ``image_proj`` state dict, so the released files load without renaming:

* FaceID: ``proj.0`` (Linear id->2·id), ``proj.2`` (Linear 2·id->T·C), ``norm`` (LayerNorm C).
* Plus:   the same MLP, plus ``perceiver_resampler.*`` (``proj_in``, ``layers.{l}.0`` = perceiver attention with
  ``norm1``/``norm2``/``to_q``/``to_kv``/``to_out``, ``layers.{l}.1.{0,1,3}`` = LN/Linear/GELU/Linear, ``proj_out``,
  ``norm_out``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FaceIDProjConfig:
    """Shapes of a FaceID / FaceID-Plus projection model (the defaults are SDXL's)."""

    id_dim: int = 512  # insightface embedding
    id_hidden_dim: int = 1024  # proj.0 output (2 x id_dim in the releases)
    context_dim: int = 2048  # UNet cross-attention dim (token width)
    num_tokens: int = 4
    plus: bool = False
    clip_dim: int = 1280  # CLIP ViT-H/14 hidden width (Plus only)
    depth: int = 4  # perceiver layers (Plus only)
    head_dim: int = 64
    ff_mult: int = 4

    @property
    def heads(self) -> int:
        return self.context_dim // self.head_dim


FACEID_PROJ_CONFIGS: dict[str, FaceIDProjConfig] = {
    "faceid_sdxl": FaceIDProjConfig(),
    "faceid_plus_sdxl": FaceIDProjConfig(plus=True),
    "faceid_tiny": FaceIDProjConfig(id_dim=512, id_hidden_dim=1024, context_dim=64),
    "faceid_plus_tiny": FaceIDProjConfig(id_dim=512, id_hidden_dim=1024, context_dim=64, plus=True, clip_dim=48),
}


class MLPProjModel(nn.Module):
    """FaceID projection: ``LN(reshape(Linear(GELU(Linear(e)))))``: a 512-d face embedding -> T tokens of width C."""

    def __init__(self, config: FaceIDProjConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Sequential(
            nn.Linear(config.id_dim, config.id_hidden_dim),
            nn.GELU(),  # exact (erf) GELU
            nn.Linear(config.id_hidden_dim, config.num_tokens * config.context_dim),
        )
        self.norm = nn.LayerNorm(config.context_dim)

    def id_tokens(self, id_embeds: torch.Tensor) -> torch.Tensor:
        """[B, id_dim] -> [B, T, C]."""
        x = self.proj(id_embeds)
        return self.norm(x.reshape(-1, self.config.num_tokens, self.config.context_dim))

    def forward(self, id_embeds: torch.Tensor) -> torch.Tensor:
        return self.id_tokens(id_embeds)


class PerceiverAttention(nn.Module):
    """Latents attend to ``[norm1(x); norm2(latents)]`` (Perceiver / Flamingo resampler attention), bias-free."""

    def __init__(self, dim: int, head_dim: int, heads: int) -> None:
        super().__init__()
        inner = head_dim * heads
        self.head_dim, self.heads = head_dim, heads
        self.norm1 = nn.LayerNorm(dim)  # on the image features
        self.norm2 = nn.LayerNorm(dim)  # on the latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)  # rows: K then V
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, -1, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # [B,H,L,d]
        # As in the reference: d^-1/4 on both q and k, softmax in fp32 (exact for fp16 weights).
        s = 1.0 / math.sqrt(math.sqrt(self.head_dim))
        w = (q * s) @ (k * s).transpose(-2, -1)
        w = torch.softmax(w.float(), dim=-1).to(w.dtype)
        out = (w @ v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LayerNorm, bias-free Linear x mult, exact GELU, bias-free Linear (the perceivers' feed-forward)."""
    # Keys .0 (LN), .1 (Linear), .3 (Linear): the GELU at .2 has no weights.
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class FacePerceiverResampler(nn.Module):
    """Refines the ID tokens by cross-attending to projected CLIP hidden states (depth x [attn, FF], residual)."""

    def __init__(self, config: FaceIDProjConfig) -> None:
        super().__init__()
        dim = config.context_dim
        self.proj_in = nn.Linear(config.clip_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, config.head_dim, config.heads), feed_forward(dim, config.ff_mult)])
            for _ in range(config.depth)
        )
        self.proj_out = nn.Linear(dim, config.context_dim)
        self.norm_out = nn.LayerNorm(config.context_dim)

    def forward(self, latents: torch.Tensor, clip_features: torch.Tensor) -> torch.Tensor:
        """latents [B, T, C], clip_features [B, N, clip_dim] -> [B, T, C]."""
        x = self.proj_in(clip_features)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class ProjPlusModel(MLPProjModel):
    """FaceID-Plus projection: MLP id tokens refined by the perceiver; v2 shortcut ``x_id + s_scale·resampler``."""

    def __init__(self, config: FaceIDProjConfig) -> None:
        super().__init__(config)
        self.perceiver_resampler = FacePerceiverResampler(config)

    def forward(  # type: ignore[override]
        self,
        id_embeds: torch.Tensor,
        clip_features: torch.Tensor,
        shortcut: bool = True,
        s_scale: float = 1.0,
    ) -> torch.Tensor:
        """id_embeds [B, id_dim], clip_features [B, N, clip_dim] -> [B, T, C]."""
        x_id = self.id_tokens(id_embeds)
        out = self.perceiver_resampler(x_id, clip_features)
        if shortcut:
            out = x_id + s_scale * out
        return out


def build_projection(config: FaceIDProjConfig) -> MLPProjModel:
    """The projection model for ``config`` (built wherever the current default device is, e.g. meta)."""
    return ProjPlusModel(config) if config.plus else MLPProjModel(config)
