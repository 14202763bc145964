"""Refusing NaN / ±Inf weights, and doing it without making a memory-mapped file resident.

A weight file holding NaN or ±Inf makes black or noise images many steps later; the loaders refuse it at once,
naming the tensor. The check is one ``aminmax`` per floating tensor (NaN propagates into min/max, ±Inf shows as an
infinite bound): no allocation the size of a tensor.

A CPU safetensors file is memory-mapped and its tensors are used in place, so reading them through the mapping
would make every page of the file part of this process's resident memory at load, including tensors a model
never computes with (a VAE's encoder when only decoding, CLIP's last layer when the penultimate one is used).
:func:`nonfinite_in_file` checks the same bytes through short-lived mappings of at most ``chunk_bytes`` each
(mapped, checked, unmapped), so a tensor's pages stay in the process only once a model uses it, as with a plain
lazily mapped file, and the answer is the one :func:`nonfinite_tensors` gives on the mapped tensors.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

__all__ = ["CHUNK_BYTES", "checked_tensors", "nonfinite_in_file", "nonfinite_tensors", "safetensors_offsets"]

CHUNK_BYTES = 64 << 20  # the largest piece of a file mapped at once by the file check


def checked_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The tensors the check covers: floating, non-empty, not named ``*attn_mask`` (causal masks hold -inf)."""
    return [(k, t) for k, t in named if t.is_floating_point() and t.numel() and not k.endswith("attn_mask")]


def nonfinite_tensors(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the given tensors that hold NaN or ±Inf (one host sync for all, wherever the tensors are)."""
    if not named:
        return []
    bounds = [torch.stack(t.aminmax()).float() for _, t in named]  # [2] per tensor, on the tensor's device
    ok = torch.isfinite(torch.stack([b.to(bounds[0].device) for b in bounds])).all(dim=1).cpu()  # the one sync
    return [k for (k, _), good in zip(named, ok.tolist()) if not good]


def safetensors_offsets(path: str | os.PathLike) -> tuple[int, dict[str, tuple[int, int]]]:
    """(byte where the data starts, name -> (begin, end) bytes within the data) of a safetensors file.

    Layout: 8-byte little-endian header length n, n bytes of JSON header, then the data; each tensor's header
    entry has ``data_offsets`` [begin, end) relative to the data start.
    """
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    offsets = {k: (int(v["data_offsets"][0]), int(v["data_offsets"][1]))
               for k, v in header.items() if k != "__metadata__"}
    return 8 + n, offsets


def nonfinite_in_file(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *, chunk_bytes: int = CHUNK_BYTES
) -> list[str]:
    """Names of ``tensors`` (a CPU state dict just read from the safetensors file ``path``) holding NaN or ±Inf,
    checked through short-lived mappings of at most ``chunk_bytes`` of the file (the given tensors are not read).

    Each piece is mapped, checked and unmapped, so at most one piece is resident at a time and the pages leave the
    process afterwards; a tensor whose bytes do not start at a multiple of its element size is read into an aligned
    buffer instead. Only the tensors' dtypes are taken from ``tensors``; their bytes come from the header's offsets.
    """
    named = checked_tensors(tensors.items())
    if not named:
        return []
    start, offsets = safetensors_offsets(path)
    largest = max(t.element_size() for _, t in named)
    step = max(largest, chunk_bytes - chunk_bytes % largest)  # a whole number of elements of any dtype
    bad = []
    with open(Path(path), "rb", buffering=0) as f:
        for name, t in sorted(named, key=lambda kt: offsets[kt[0]][0]):  # file order: sequential reads
            begin, end = offsets[name]
            check = _mapped_piece_ok if (start + begin) % t.element_size() == 0 else _read_piece_ok
            if not all(check(f, start + at, min(step, end - at), t.dtype) for at in range(begin, end, step)):
                bad.append(name)
    order = {k: i for i, (k, _) in enumerate(named)}
    return sorted(bad, key=order.__getitem__)  # in the state dict's order, as nonfinite_tensors gives them


def _finite(values: torch.Tensor) -> bool:
    lo, hi = values.aminmax()
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _mapped_piece_ok(f: BinaryIO, at: int, n: int, dtype: torch.dtype) -> bool:
    """The ``n`` bytes at file offset ``at`` as ``dtype`` hold no NaN/Inf (mapped for the check, then unmapped)."""
    base = at - at % mmap.ALLOCATIONGRANULARITY  # a mapping starts on the allocation granularity
    try:
        m = mmap.mmap(f.fileno(), at + n - base, access=mmap.ACCESS_READ, offset=base)
    except OSError:  # a file system that cannot map: read the piece instead
        return _read_piece_ok(f, at, n, dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "not writable": the view is only read
            values = torch.frombuffer(m, dtype=dtype, count=n // dtype.itemsize, offset=at - base)
        ok = _finite(values)
        del values  # the mapping closes only once no tensor views it
    finally:
        m.close()
    return ok


def _read_piece_ok(f: BinaryIO, at: int, n: int, dtype: torch.dtype) -> bool:
    """As :func:`_mapped_piece_ok`, for bytes not aligned to their element size: read into an aligned buffer."""
    buf = bytearray(n)
    f.seek(at)
    if f.readinto(buf) != n:
        raise OSError(f"{f.name}: the file ended early while checking it (truncated while reading?)")
    return _finite(torch.frombuffer(buf, dtype=dtype))
