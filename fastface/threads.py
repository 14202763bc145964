"""The CPU thread count for tiny work (tests, ``selfcheck``): one thread unless ``OMP_NUM_THREADS`` says otherwise.

Tiny-config models run many small operators: each costs less than waking a second thread, and when another
process holds a core, OpenMP threads wait on each other at every operator's barrier (measured on two cores with
one busy process: ``fastface selfcheck`` 625 s at 2 threads, 25 s at 1). One thread is never much slower for such
work and never collapses. Full-size models are left to torch's default (all cores) or ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

__all__ = ["THREADS_VARIABLE", "tiny_work", "tiny_work_threads"]

THREADS_VARIABLE = "OMP_NUM_THREADS"


def tiny_work_threads(environ: Mapping[str, str] | None = None) -> int:
    """Threads for tiny work: ``$OMP_NUM_THREADS`` when set (a positive integer), else 1."""
    env = os.environ if environ is None else environ
    raw = env.get(THREADS_VARIABLE, "").strip()
    if not raw:
        return 1
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{THREADS_VARIABLE}={raw!r} is not a positive integer; set it to e.g. 1 or 4, or unset it")
    return n


@contextmanager
def tiny_work(threads: int | None = None) -> Iterator[int]:
    """Run the block with ``threads`` intra-op threads (default :func:`tiny_work_threads`), restoring the count after."""
    n = tiny_work_threads() if threads is None else threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
