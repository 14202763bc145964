"""Test-wide settings: one intra-op thread (tiny models run fastest so, and parallel jobs do not oversubscribe)."""

from __future__ import annotations

import os

import torch

torch.set_num_threads(int(os.environ.get("FASTFACE_TEST_THREADS", "1")))
