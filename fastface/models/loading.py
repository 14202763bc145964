"""Reading weight files and assigning them to meta-built modules, with clear errors.

Every model in fastface is built on the meta device and filled with ``assign_state_dict``: the tensors read
from the file become the parameters (no second allocation, no fp32 detour for an fp16 file unless a dtype
conversion was asked for). Every format problem raises :class:`WeightFormatError` naming the file and key.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .file_kinds import identify
from .finite import checked_tensors, nonfinite_in_file, nonfinite_tensors

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

_REDOWNLOAD_HINT = "download it again"


class WeightFormatError(ValueError):
    """A weight file or folder is missing, damaged, or not in a layout fastface understands."""


def _list_keys(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return shown + more


def read_safetensors(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, check_finite: bool = True
) -> StateDict:
    """Read a ``.safetensors`` file (memory-mapped when on CPU) with a clear error for damaged or non-weight files.

    With ``check_finite`` (the default) a floating tensor holding NaN or ±Inf is refused, naming it
    (:func:`check_finite_tensors`).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightFormatError(f"{path}: no such file")
    kind = identify(path)
    if kind.kind in ("torch-zip", "pickle"):
        raise WeightFormatError(
            f"{path}: not a readable safetensors file: this is a PyTorch checkpoint (a pickle) named .safetensors. "
            "Rename it to .bin (fastface reads those with the safe torch.load(weights_only=True)) or convert it."
        )
    if not kind.is_weights:
        raise WeightFormatError(kind.message(path, "not a readable safetensors file"))
    try:
        sd = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightFormatError(
            f"{path}: not a readable safetensors file ({exc}). The file may be truncated (an interrupted "
            "download) or in another format; download it again or convert it to safetensors."
        ) from exc
    if check_finite:  # CPU: short-lived mappings, so the pages stay out until a model uses them
        named = checked_tensors(sd.items())
        cpu = torch.device(device).type == "cpu"
        _refuse_nonfinite(named, nonfinite_in_file(path, sd) if cpu else nonfinite_tensors(named), path)
    return sd


def read_torch_bin(path: str | os.PathLike, *, check_finite: bool = True) -> dict:
    """Read a PyTorch pickle (``.bin``/``.pt``/``.pth``) safely: ``torch.load(weights_only=True)`` only.

    A pickle that tries to construct arbitrary objects (and so could run code) is refused. A file that is not a
    pickle (a Git LFS pointer, an HTML page, JSON, text, another archive, an empty file) is named as such; a
    safetensors file with a ``.bin`` name is read as safetensors. With ``check_finite`` a floating tensor holding
    NaN or ±Inf is refused, naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightFormatError(f"{path}: no such file")
    kind = identify(path)
    if kind.kind == "safetensors":
        logger.info("%s is a safetensors file (despite its name): reading it as such", path)
        return read_safetensors(path, check_finite=check_finite)
    if not kind.is_weights:
        raise WeightFormatError(kind.message(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=kind.kind == "torch-zip")
    except pickle.UnpicklingError as exc:
        if _is_truncation(exc):
            raise WeightFormatError(f"{path}: truncated PyTorch weight file ({exc}); {_REDOWNLOAD_HINT}") from exc
        raise WeightFormatError(
            f"{path}: refused to load. The pickle holds objects other than plain tensors and containers "
            f"(it could run code when loaded), so fastface will not open it ({exc}). Use a .safetensors "
            "version of the file instead."
        ) from exc
    except EOFError as exc:
        raise WeightFormatError(f"{path}: truncated PyTorch weight file (it ends early); {_REDOWNLOAD_HINT}") from exc
    except Exception as exc:  # a damaged pickle raises KeyError, IndexError, struct.error ... from the unpickler
        if _is_truncation(exc):
            raise WeightFormatError(f"{path}: truncated PyTorch weight file ({exc}); {_REDOWNLOAD_HINT}") from exc
        raise WeightFormatError(
            f"{path}: not a readable PyTorch weight file ({type(exc).__name__}: {exc}). The file may be truncated "
            f"or damaged; {_REDOWNLOAD_HINT}"
        ) from exc
    if check_finite:
        check_finite_tensors(obj, path)
    return obj


def _is_truncation(exc: BaseException) -> bool:
    """An unpickler error that means the data ends early (not a refused object)."""
    return re.search(r"pickle data was truncated|ran out of input|unexpected eof|\beof\b", str(exc).lower()) is not None


def check_finite_tensors(obj: object, source: str | os.PathLike) -> None:
    """Refuse weights holding NaN or ±Inf: raise :class:`WeightFormatError` naming the first such tensor.

    Walks nested dicts/lists/tuples (an IP-Adapter ``.bin`` nests ``image_proj`` and ``ip_adapter``). One
    ``aminmax`` pass per floating tensor (NaN propagates into min/max, ±Inf shows as an infinite bound): no
    allocation the size of the tensor, and one host sync per file, not per tensor, for tensors on an accelerator.
    Tensors named ``*attn_mask`` are skipped (causal masks legitimately hold -inf).
    """
    named = checked_tensors(_walk(obj, ""))
    _refuse_nonfinite(named, nonfinite_tensors(named), source)


def _refuse_nonfinite(named: list[tuple[str, torch.Tensor]], bad: list[str], source: str | os.PathLike) -> None:
    """Raise the non-finite error for ``bad`` (names among ``named``), counting NaN / Inf in the first one."""
    if not bad:
        return
    key, tensor = next((k, t) for k, t in named if k == bad[0])
    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    more = f" (and {len(bad) - 1} more tensor(s): {_list_keys(bad[1:], 5)})" if len(bad) > 1 else ""
    raise WeightFormatError(
        f"{source}: tensor '{key}' holds non-finite values ({nan} NaN, {inf} Inf of {tensor.numel()}){more}. "
        "The file is damaged or was saved from a diverged model; download it again or use another copy."
    )


def _walk(obj: object, prefix: str) -> Iterable[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) for every tensor in nested mappings and sequences."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _walk(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{prefix}.{i}" if prefix else str(i))


def read_weights(path: str | os.PathLike, *, check_finite: bool = True) -> StateDict:
    """Read a weight file: safetensors preferred, ``.bin``/``.pt``/``.pth``/``.ckpt`` via safe torch.load.

    The format is taken from the file's content when the name does not say (or says wrong: a ``.bin`` that is
    safetensors is read as such). ``check_finite``: refuse tensors holding NaN/Inf (see :func:`check_finite_tensors`).
    """
    path = Path(path)
    if not path.exists():
        raise WeightFormatError(f"{path}: no such file or folder")
    if path.is_dir():
        raise WeightFormatError(f"{path}: is a folder; expected a weight file (.safetensors or .bin) here")
    if path.suffix == ".safetensors" or (path.suffix not in _TORCH_SUFFIXES and identify(path).kind == "safetensors"):
        return read_safetensors(path, check_finite=check_finite)
    obj = read_torch_bin(path, check_finite=check_finite)
    if not isinstance(obj, Mapping):
        raise WeightFormatError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    if path.suffix in _TORCH_SUFFIXES and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    return dict(obj)


_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def find_weight_file(folder: str | os.PathLike, stem: str, variant: str | None = None) -> list[Path]:
    """Find the weight file(s) of a diffusers-style model folder.

    Looks for ``{stem}.safetensors``, the ``.{variant}`` variant (e.g. ``fp16``), sharded files listed in
    ``{stem}.safetensors.index.json``, and finally ``{stem}.bin``. Returns the list of files to read (one unless sharded).
    """
    folder = Path(folder)
    variants = [variant] if variant else []
    variants += [None, "fp16"] if variant != "fp16" else [None]
    for v in variants:
        mid = f".{v}" if v else ""
        single = folder / f"{stem}{mid}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{stem}.safetensors.index{mid}.json"
        if not index.is_file():
            index = folder / f"{stem}{mid}.safetensors.index.json"
        if index.is_file():
            return _shards_from_index(index)
    for v in variants:
        mid = f".{v}" if v else ""
        single = folder / f"{stem}{mid}.bin"
        if single.is_file():
            return [single]
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise WeightFormatError(
        f"{folder}: no weight file '{stem}.safetensors' (or .fp16 variant, sharded index, or .bin) found; "
        f"the folder holds: {present or 'nothing'}"
    )


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, OSError) as exc:
        raise WeightFormatError(f"{index}: not a valid sharded-weights index ({exc})") from exc
    files = sorted({index.parent / name for name in weight_map.values()})
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise WeightFormatError(f"{index}: shard files listed in the index are missing: {missing}")
    return files


def read_weight_files(files: list[Path]) -> StateDict:
    """Read and merge one or several (sharded) weight files."""
    out: StateDict = {}
    for f in files:
        out.update(read_weights(f))
    return out


def assign_state_dict(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str | os.PathLike,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    ignore_unexpected: Iterable[str] = (),
) -> torch.nn.Module:
    """Fill a (meta-device) module from ``state_dict`` by assignment, after checking keys and shapes.

    ``source`` names the file for error messages. Tensors are converted to ``dtype``/``device`` only when they
    differ (an fp16 file loaded as fp16 is not copied). Floating buffers and parameters follow ``dtype``;
    integer tensors keep theirs. Buffers not present in the file (non-persistent ones) are materialised by the
    caller. Raises :class:`WeightFormatError` listing missing and unexpected keys, or the first shape mismatch.
    """
    expected = module.state_dict(keep_vars=True)
    ignore = tuple(ignore_unexpected)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and not k.startswith(ignore)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_list_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_list_keys(unexpected)}")
        raise WeightFormatError(
            f"{source}: the weights do not match the model ({'; '.join(parts)}). "
            "Is this the right file for this model and config?"
        )
    converted: dict[str, torch.Tensor] = {}
    for key, ref in expected.items():
        tensor = state_dict[key]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise WeightFormatError(
                f"{source}: shape mismatch for '{key}': the model expects {tuple(ref.shape)}, "
                f"the file has {tuple(tensor.shape)}. The file belongs to a different model or config."
            )
        target_dtype = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
        converted[key] = tensor.to(device=device or tensor.device, dtype=target_dtype)
    module.load_state_dict(converted, strict=True, assign=True)
    return module
