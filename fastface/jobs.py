"""Resumable, sharded jobs of many images: ranks under ``torchrun``, sharding, atomic PNG writes, a per-rank loop.

The engine under ``fastface.batch`` (prompts x identities) and the evaluation sweep (``python -m benchmarks.eval``):

* :func:`rank_info` reads ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (set by ``torchrun``; one process without them);
  :func:`rank_device` picks ``cuda:LOCAL_RANK`` when CUDA is there; :func:`join_ranks` joins the ranks (NCCL on
  CUDA, gloo otherwise; results are gathered over a gloo group, so no GPU memory is used) and closes the group.
* :func:`shard`: task ``i`` goes to rank ``i % world_size``, so every rank knows its share without talking.
* :func:`prompt_slug`: a short, unique, file-name-safe stem for a prompt.
* :func:`atomic_write` / :func:`save_png_json` / :func:`read_png_json`: a killed run never leaves a truncated file,
  and what made an image travels in its PNG text chunk, which is how a resumed run recognises finished work.
* :func:`run_each`: the per-rank loop with one progress bar per rank (``position=rank``), a count of outcomes and,
  optionally, per-task failures that are recorded instead of stopping the rank; :func:`total` adds the counts of
  all ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

logger = logging.getLogger(__name__)

__all__ = [
    "RankInfo", "rank_info", "rank_device", "Ranks", "join_ranks", "shard", "prompt_slug", "atomic_write",
    "save_png_json", "read_png_json", "RankSummary", "run_each", "total",
]

T = TypeVar("T")


class RankInfo(NamedTuple):
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer (torchrun sets it; unset it to "
                         "run a single process)") from None


def rank_info() -> RankInfo:
    """This process's rank from ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); 0 of 1
    without it."""
    info = RankInfo(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if info.world_size < 1 or not 0 <= info.rank < info.world_size or info.local_rank < 0:
        raise ValueError(f"RANK={info.rank}, WORLD_SIZE={info.world_size}, LOCAL_RANK={info.local_rank} do not "
                         "describe a valid process (0 <= RANK < WORLD_SIZE); launch with torchrun or unset them")
    return info


def rank_device(device: str | None, local_rank: int) -> str:
    """The device of a rank: ``device`` if given with an index or of another type; ``cuda:LOCAL_RANK`` for a bare
    ``cuda`` (each rank its own GPU), or when none is given and CUDA is available; else ``cpu``."""
    import torch

    if device == "cuda" or (not device and torch.cuda.is_available()):
        return f"cuda:{local_rank}"
    return device or "cpu"


class Ranks:
    """The joined ranks of a job (see :func:`join_ranks`); usable as a context manager that closes it."""

    def __init__(self, info: RankInfo, group: Any = None, joined: bool = False) -> None:
        self.info = info
        self.group = group  # the gloo group for object collectives (None: the default group)
        self._joined = joined

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on rank 0 (None on the others); ``[obj]`` for a single process."""
        if not self._joined:
            return [obj]
        import torch.distributed as dist

        gathered: list | None = [None] * self.info.world_size if self.info.rank == 0 else None
        dist.gather_object(obj, gathered, dst=0, group=self.group)
        return gathered

    def close(self, barrier: bool = True) -> None:
        """Meet at a barrier (unless ``barrier`` is False) and leave the process group."""
        if not self._joined:
            return
        import torch.distributed as dist

        self._joined = False
        try:
            if barrier:
                dist.barrier(group=self.group)
        finally:
            dist.destroy_process_group()

    def __enter__(self) -> Ranks:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close(barrier=exc_type is None)


def join_ranks(device: str, timeout_min: float = 240.0, info: RankInfo | None = None) -> Ranks:
    """Join the ranks of a ``torchrun`` job (nothing to join for a single process); :meth:`Ranks.close` leaves.

    The default group is NCCL when ``device`` is CUDA (its device set first), else gloo; objects are gathered over
    an extra gloo group so that no GPU memory is used. ``timeout_min``: how long a collective waits for the slowest
    rank (rank 0 waits for the others at the gather). ``info``: default :func:`rank_info`.
    """
    info = rank_info() if info is None else info
    if info.world_size == 1:
        return Ranks(info)
    import torch
    import torch.distributed as dist

    timeout = timedelta(minutes=timeout_min)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, timeout=timeout)
    group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    return Ranks(info, group, joined=True)


def shard(tasks: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The tasks of one rank: those whose ``index`` satisfies index % world_size == rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return [t for t in tasks if t.index % world_size == rank]


def prompt_slug(prompt: str, limit: int = 60) -> str:
    """A file-name-safe, unique stem for a prompt: its first words plus 10 hex digits of its sha256."""
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].strip("-") or "prompt"
    return f"{words}-{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:10]}"


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path`` and move it into place (all or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_png_json(image: Any, path: str | os.PathLike, key: str, meta: dict[str, Any]) -> Path:
    """Save a PIL image as PNG atomically with ``meta`` as JSON in the text chunk ``key``."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(key, json.dumps(meta, sort_keys=True))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_png_json(path: str | os.PathLike, key: str) -> dict[str, Any]:
    """The JSON in text chunk ``key`` of a PNG ({} if the file, the chunk or the JSON is missing or unreadable).

    The whole image is decoded, so a damaged file reads as {} too.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            meta = json.loads(im.text.get(key, "{}"))
    except (OSError, ValueError, SyntaxError):  # PIL reports some broken chunks as SyntaxError
        return {}
    return meta if isinstance(meta, dict) else {}


@dataclass
class RankSummary:
    """What one rank did: ``counts`` per outcome (e.g. generated, skipped, failed), ``failures`` (task, reason),
    wall ``seconds``."""

    rank: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, outcome: str) -> int:
        return self.counts.get(outcome, 0)


def run_each(
    tasks: Sequence[T],
    work: Callable[[T], str],
    *,
    desc: str = "fastface",
    position: int = 0,
    progress: bool | None = None,
    rank: int = 0,
    catch: tuple[type[BaseException], ...] = (),
    name: Callable[[T], str] = str,
) -> RankSummary:
    """Run ``work`` on each task under one progress bar; ``work`` returns the task's outcome (a word to count).

    ``progress``: True/False, or None for "only on a terminal". ``position``: the bar's line (the rank, so that the
    bars of the ranks of one machine stack). An exception of a type in ``catch`` counts the task as ``failed``
    (logged, with ``name(task)`` and the message) and the loop goes on; any other exception stops the rank.
    """
    from tqdm.auto import tqdm

    counts: Counter[str] = Counter()
    failures: list[tuple[str, str]] = []
    start = time.perf_counter()
    bar = tqdm(tasks, desc=desc, position=position, disable=(not progress) if progress is not None else None,
               dynamic_ncols=True)
    try:
        for task in bar:
            try:
                outcome = work(task)
            except catch as exc:
                outcome = "failed"
                reason = " ".join(str(exc).split()) or type(exc).__name__
                failures.append((name(task), reason))
                logger.error("%s: %s failed: %s", desc, name(task), reason)
            counts[outcome] += 1
            bar.set_postfix(dict(counts), refresh=False)
    finally:
        bar.close()
    return RankSummary(rank, dict(counts), failures, time.perf_counter() - start)


def total(summaries: Sequence[RankSummary]) -> RankSummary:
    """The counts, failures and (longest) time of all ranks together (``rank`` -1)."""
    counts: Counter[str] = Counter()
    for s in summaries:
        counts.update(s.counts)
    return RankSummary(-1, dict(counts), [f for s in summaries for f in s.failures],
                       max((s.seconds for s in summaries), default=0.0))
