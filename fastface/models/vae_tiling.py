"""Tiled VAE decoding: decode overlapping latent tiles one at a time and blend the seams linearly.

The layout is diffusers' ``AutoencoderKL.tiled_decode`` (same tiles, same blend), so the two agree to float
rounding; memory differs: only one row of decoded tiles is held besides the output. Peak activation memory is
that of one tile, independent of the image size.

Tiling is not exact: every tile normalises with its own GroupNorm statistics and the mid-block attention sees
only its tile, so colours and contrast drift slightly between tiles; the linear blend over the overlap hides
the seams. With the default 128-latent tiles (1024 px), images up to 1024² decode in one tile (exactly the plain
decode).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["tiled_decode"]


def _blend_rows(above: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
    """In place: the first ``extent`` rows of ``tile`` fade in from the last rows of ``above`` (weights y/extent)."""
    e = min(above.shape[2], tile.shape[2], extent)
    if e <= 0:
        return
    w = (torch.arange(e, dtype=torch.float64) / e).to(tile.dtype).to(tile.device).view(1, 1, e, 1)
    w_above = (1 - torch.arange(e, dtype=torch.float64) / e).to(tile.dtype).to(tile.device).view(1, 1, e, 1)
    tile[:, :, :e] = above[:, :, -e:] * w_above + tile[:, :, :e] * w


def _blend_cols(left: torch.Tensor, tile: torch.Tensor, extent: int) -> None:
    """In place: the first ``extent`` columns of ``tile`` fade in from the last columns of ``left``."""
    _blend_rows(left.transpose(2, 3), tile.transpose(2, 3), extent)


def tiled_decode(
    decode: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    tile: int = 128,
    overlap: float = 0.25,
    scale: int = 8,
) -> torch.Tensor:
    """Decode ``latents`` [B, C, h, w] tile by tile with ``decode`` (latent tile -> image tile [B, 3, s·h', s·w']).

    Tiles are ``tile`` latents wide and start every ``int(tile · (1 - overlap))`` latents; neighbours are blended
    linearly over ``int(tile · scale · overlap)`` pixels, and each tile keeps its first ``tile·scale - blend``
    pixels (diffusers' layout). ``scale`` is the decoder's upsampling factor (8 for SDXL). Returns [B, 3, s·h, s·w].
    A latent no larger than one tile is decoded in one call (identical to ``decode(latents)``).
    """
    if tile < 1 or not 0.0 <= overlap < 1.0 or scale < 1:
        raise ValueError(f"tiled_decode: need tile >= 1, 0 <= overlap < 1 and scale >= 1 (got {tile}, {overlap}, {scale})")
    h, w = latents.shape[-2:]
    if h <= tile and w <= tile:
        return decode(latents)
    stride = max(int(tile * (1 - overlap)), 1)
    blend = int(tile * scale * overlap)
    keep = tile * scale - blend
    rows, above = [], None
    for i in range(0, h, stride):
        row = []
        for j in range(0, w, stride):
            t = decode(latents[:, :, i : i + tile, j : j + tile])
            if above is not None:
                _blend_rows(above[len(row)], t, blend)
            if row:
                _blend_cols(row[-1], t, blend)
            row.append(t)
        rows.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
        above = row  # fully blended tiles of this row, for the next one
    return torch.cat(rows, dim=2)
