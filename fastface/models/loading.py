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
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class WeightFormatError(ValueError):
    """A weight file or folder is missing, damaged, or not in a layout fastface understands."""


def _list_keys(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return shown + more


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> StateDict:
    """Read a ``.safetensors`` file (memory-mapped when on CPU) with a clear error for damaged files."""
    path = Path(path)
    if not path.is_file():
        raise WeightFormatError(f"{path}: no such file")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightFormatError(
            f"{path}: not a readable safetensors file ({exc}). The file may be truncated (an interrupted "
            "download) or in another format; download it again or convert it to safetensors."
        ) from exc


def read_torch_bin(path: str | os.PathLike) -> dict:
    """Read a PyTorch pickle (``.bin``/``.pt``/``.pth``) safely: ``torch.load(weights_only=True)`` only.

    A pickle that tries to construct arbitrary objects (and so could run code) is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightFormatError(f"{path}: no such file")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as exc:
        raise WeightFormatError(
            f"{path}: refused to load. The pickle holds objects other than plain tensors and containers "
            f"(it could run code when loaded), so fastface will not open it ({exc}). Use a .safetensors "
            "version of the file instead."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise WeightFormatError(
            f"{path}: not a readable PyTorch weight file ({exc}). The file may be truncated; download it again."
        ) from exc


def _is_zip(path: Path) -> bool:
    # torch.save's default (zip) format can be memory-mapped; legacy pickles cannot.
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def read_weights(path: str | os.PathLike) -> StateDict:
    """Read a weight file by extension: safetensors preferred, ``.bin``/``.pt``/``.pth``/``.ckpt`` via safe torch.load."""
    path = Path(path)
    if not path.exists():
        raise WeightFormatError(f"{path}: no such file or folder")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        obj = read_torch_bin(path)
        if not isinstance(obj, Mapping):
            raise WeightFormatError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
        if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        return dict(obj)
    # Unknown extension: try safetensors (cheap header check), then a safe pickle.
    try:
        return read_safetensors(path)
    except WeightFormatError:
        obj = read_torch_bin(path)
        if not isinstance(obj, Mapping):
            raise WeightFormatError(f"{path}: expected a dict of tensors, found {type(obj).__name__}") from None
        return dict(obj)


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
