"""Test-wide settings.

- One intra-op thread (tiny models run fastest so, and parallel jobs do not oversubscribe).
- ``torch.empty`` filled with NaN (deterministic mode's ``fill_uninitialized_memory``): a tensor read before it is
  written gives NaN in every run instead of whatever the heap held, so such a bug fails here, not now and then in CI.
  ``FASTFACE_TEST_NAN_EMPTY=0`` turns it off.
"""

from __future__ import annotations

import os

import torch

torch.set_num_threads(int(os.environ.get("FASTFACE_TEST_THREADS", "1")))

if os.environ.get("FASTFACE_TEST_NAN_EMPTY", "1") != "0":
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
