"""How a :class:`fastface.Pipeline` runs its parts: offloaded stages, the UNet call (eager or compiled), the decode.

* ``offload``: every part is loaded on the CPU, and each stage of a call runs inside
  :func:`fastface.offload.on_device` on the pipeline's device: the text encoders for the prompts, the adapter's
  modules (:meth:`~fastface.adapters.base.IdentityAdapter.offload_modules`) for the identity, the UNet for
  sampling, the VAE for decoding. Only the part in use holds accelerator memory. Face models an adapter loads on
  first use (PuLID's, for photos) load on the CPU and run there the first time, on the device from the next call.
* ``compile``: the UNet is called through :func:`fastface.compile_unet` (True, or a mapping of
  :func:`torch.compile` keyword arguments); the FastFace hooks are still attached to the eager UNet.
* VAE tiling: images larger than :data:`TILE_ABOVE_PX` on a side decode in tiles of that size
  (:meth:`fastface.models.vae.AutoencoderKL.decode` with ``tile=``); smaller ones decode in one piece.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from fastface.compile import compile_unet
from fastface.offload import on_device

__all__ = ["TILE_ABOVE_PX", "stage", "unet_caller", "check_vae_tile", "decode_tile"]

# Larger images decode in tiles of this many pixels per side (SDXL's native size: its VAE decodes 1024² in one go).
TILE_ABOVE_PX = 1024


@contextmanager
def stage(
    modules: Callable[[], nn.Module | Sequence[nn.Module]], device: torch.device, offload: bool
) -> Iterator[None]:
    """With ``offload``, the block runs with ``modules()`` (asked for on entry) on ``device``, and they go back to
    their CPU tensors after; without, nothing moves."""
    if not offload:
        yield
        return
    with on_device(modules(), device):
        yield


def unet_caller(unet: nn.Module, compile: bool | Mapping[str, Any]) -> nn.Module:
    """What the pipeline calls in place of ``unet``: the UNet itself, or its :func:`fastface.compile_unet` module
    (``compile``: True for the defaults, or :func:`torch.compile` keyword arguments such as ``backend``, ``mode``)."""
    if compile is False or compile is None:
        return unet
    if compile is True:
        return compile_unet(unet)
    if not isinstance(compile, Mapping) or not all(isinstance(k, str) for k in compile):
        raise ValueError(f"compile must be True, False or a dict of torch.compile arguments "
                         f"(e.g. {{'backend': 'aot_eager'}}), got {compile!r}")
    return compile_unet(unet, **compile)


def check_vae_tile(vae_tile: int | None) -> int | None:
    """``vae_tile``: None (tile only above :data:`TILE_ABOVE_PX`), 0 (never tile) or a tile size in latents."""
    if vae_tile is not None and (isinstance(vae_tile, bool) or not isinstance(vae_tile, int) or vae_tile < 0):
        raise ValueError(f"vae_tile must be a tile size in latents per side (e.g. 128 = 1024 px for SDXL), 0 to "
                         f"never tile, or None for tiles above {TILE_ABOVE_PX} px; got {vae_tile!r}")
    return vae_tile


def decode_tile(height: int, width: int, factor: int, vae_tile: int | None) -> int | None:
    """The ``tile`` (latents per side) to decode a ``height`` x ``width`` image with, None for one piece.

    ``factor``: the VAE's pixels per latent. ``vae_tile`` as in :func:`check_vae_tile`.
    """
    if vae_tile is not None:
        return vae_tile or None
    return TILE_ABOVE_PX // factor if max(height, width) > TILE_ABOVE_PX else None
