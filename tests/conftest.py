"""Test-wide settings.

- One intra-op thread (:func:`fastface.threads.tiny_work_threads`: tiny models run fastest so, and a busy
  machine does not make OpenMP threads wait on each other), also for the subprocesses the tests start (the CLI,
  torchrun): ``OMP_NUM_THREADS`` is set to 1 unless already set. ``FASTFACE_TEST_THREADS`` overrides the count
  in this process.
- ``torch.empty`` filled with NaN (deterministic mode's ``fill_uninitialized_memory``): a tensor read before it is
  written gives NaN in every run instead of whatever the heap held, so such a bug fails here, not now and then in CI.
  ``FASTFACE_TEST_NAN_EMPTY=0`` turns it off.
- Temporary files: pyproject's ``tmp_path_retention_policy = "failed"`` deletes them after a passing run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pool; inherited by subprocesses
os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

import torch  # noqa: E402

from fastface.threads import tiny_work_threads  # noqa: E402

torch.set_num_threads(int(os.environ.get("FASTFACE_TEST_THREADS", tiny_work_threads())))

if os.environ.get("FASTFACE_TEST_NAN_EMPTY", "1") != "0":
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
