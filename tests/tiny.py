"""Shared tiny reference models for the parity tests (diffusers is a test-only dependency)."""

from __future__ import annotations

import torch

from fastface.models.unet import get_unet_config


def diffusers_tiny_unet(seed: int = 0, noise: float = 0.05):
    """diffusers' UNet2DConditionModel with our "tiny" config; random weights with noise on every parameter."""
    import diffusers

    torch.manual_seed(seed)
    cfg = {k: v for k, v in get_unet_config("tiny").to_diffusers_config().items() if k != "_class_name"}
    model = diffusers.UNet2DConditionModel(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model
