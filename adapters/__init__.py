"""Identity adapters (installed as ``fastface.adapters``): the contract (``base``), the registry, IP-Adapter FaceID,
FaceID-Plus-v2, PuLID, face analysis.

Names are imported lazily: ``fastface.adapters.FaceAnalyzer`` loads insightface only when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IPAdapterFaceID": "fastface.adapters.ip_adapter",
    "IPAdapterHandle": "fastface.adapters.ip_adapter",
    "FaceIDProjConfig": "fastface.adapters.faceid",
    "MLPProjModel": "fastface.adapters.faceid",
    "ProjPlusModel": "fastface.adapters.faceid",
    "FaceAnalyzer": "fastface.adapters.faces",
    "FaceInfo": "fastface.adapters.faces",
    "PuLID": "fastface.adapters.pulid",
    "PuLIDHandle": "fastface.adapters.pulid",
    "PuLIDFacePreprocessor": "fastface.adapters.pulid_faces",
    "IdentityAdapter": "fastface.adapters.base",
    "AdapterPreset": "fastface.adapters.base",
    "AdapterOption": "fastface.adapters.base",
    "FacePreparer": "fastface.adapters.base",
    "InstallHandle": "fastface.adapters.base",
    "register": "fastface.adapters.registry",
    "get_entry": "fastface.adapters.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fastface.adapters' has no attribute {name!r}")
