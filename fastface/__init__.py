"""fastface: FastFace (decoupled CFG + attention manipulation) for identity adapters on few-step SDXL.

A framework-agnostic hooking library on raw PyTorch. See README.md for the architecture.
"""

from __future__ import annotations

import logging

from fastface.compile import compile_unet
from fastface.hooks import FastFace, attach
from fastface.models.unet import UNet, UNetConfig
from fastface.models.unet_loading import load_unet

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

# Loaded on first use only (the pipeline imports every model part and insightface's helpers).
_LAZY = {
    "Pipeline": "fastface.pipeline",
    "load_face_file": "fastface.face_files",
    "save_face_file": "fastface.face_files",
    "register_adapter": "fastface.adapters.registry",
    "adapter_names": "fastface.adapters.registry",
}

__all__ = ["FastFace", "UNet", "UNetConfig", "__version__", "attach", "compile_unet", "load_unet", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        return getattr(module, "register" if name == "register_adapter" else name)
    raise AttributeError(f"module 'fastface' has no attribute {name!r}")
