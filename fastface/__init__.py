"""fastface: FastFace (decoupled CFG + attention manipulation) for identity adapters on few-step SDXL.

A framework-agnostic hooking library on raw PyTorch. See README.md and DESIGN notes for the architecture.
"""

from __future__ import annotations

import logging

from fastface.compile import compile_unet
from fastface.hooks import FastFace, attach
from fastface.models.unet import UNet, UNetConfig
from fastface.models.unet_loading import load_unet

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["FastFace", "Pipeline", "UNet", "UNetConfig", "__version__", "attach", "compile_unet", "load_unet"]


def __getattr__(name: str):
    # The pipeline imports every model part and insightface's helpers: loaded on first use only.
    if name == "Pipeline":
        from fastface.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'fastface' has no attribute {name!r}")
