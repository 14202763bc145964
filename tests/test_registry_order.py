"""The adapter registry lists the built-in adapters in one order, whichever adapter module a program imports first.

selfcheck (and the e2e fixture) draw each adapter's tiny random weights in registry order, so an order that
depended on import order changed the weights: importing ``fastface.adapters.faceid_adapter`` first used to list
the PuLID adapters before FaceID.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

FIRST_IMPORTS = ["fastface.adapters.faceid_adapter", "fastface.adapters.pulid_adapter", "fastface.adapters.registry",
                 "fastface.pipeline", "fastface.selfcheck"]


def _names_after_importing(module: str) -> list[str]:
    code = (f"import {module}\nfrom fastface.adapters.registry import adapter_names, presets\n"
            "assert list(presets) == adapter_names()\nprint(','.join(adapter_names()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip().split(",")


@pytest.mark.parametrize("module", FIRST_IMPORTS)
def test_builtin_order_does_not_depend_on_import_order(module: str) -> None:
    assert _names_after_importing(module) == ["faceid", "faceid-plusv2", "pulid", "pulid-v1.1"]
