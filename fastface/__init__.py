"""fastface: FastFace (decoupled CFG + attention manipulation) for identity adapters on few-step SDXL.

A framework-agnostic hooking library on raw PyTorch. See README.md and DESIGN notes for the architecture.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__"]
