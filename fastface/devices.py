"""Checking a requested device before anything loads: ``resolve_device("cuda")`` on a machine without CUDA says so.

torch itself accepts ``torch.device("cuda")`` anywhere and fails only at the first tensor moved there (an
``AssertionError`` deep in a loader, after minutes of reading weights). :func:`resolve_device` asks the backend
first and raises :class:`DeviceError` naming the device, why it cannot be used and what to do.
"""

from __future__ import annotations

import torch

__all__ = ["DeviceError", "default_device", "resolve_device"]

_USE_CPU = "use device='cpu' (command line: --device cpu)"
_CUDA_WHEEL = "install a CUDA build of torch (see https://pytorch.org/get-started/locally/)"


class DeviceError(ValueError):
    """A device that is malformed or not usable on this machine."""


def default_device() -> torch.device:
    """The device used when none is given: ``cuda`` when CUDA is available, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | int | torch.device | None = None) -> torch.device:
    """The ``torch.device`` for ``device`` after checking that this machine can use it.

    ``None`` gives :func:`default_device`; an int ``i`` means ``cuda:i``; names are case-insensitive. Raises
    :class:`DeviceError` for a malformed name, a device type that cannot run models (``meta``, ``opengl`` ...), a
    backend that this torch build lacks or this machine cannot use (CUDA without a GPU or driver, MPS off macOS),
    and an index past the devices present.
    """
    if device is None:
        return default_device()
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise DeviceError(f"device must be a name like 'cpu', 'cuda', 'cuda:1' or 'mps', got {device!r}")
    name = f"cuda:{device}" if isinstance(device, int) else device.strip().lower() if isinstance(device, str) else device
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"unknown device {device!r}; expected 'cpu', 'cuda', 'cuda:N' (N = GPU index) or 'mps'") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise DeviceError(f"device {device!r}: 'meta' holds no data and cannot run a model; {_USE_CPU}")
    if dev.type == "cuda":
        _check_cuda(dev, device)
    elif dev.type == "mps":
        _check_mps(device)
    else:
        _check_other(dev, device)
    return dev


def _check_cuda(dev: torch.device, asked: object) -> None:
    if torch.version.cuda is None and torch.version.hip is None:
        raise DeviceError(
            f"device {asked!r}: this torch ({torch.__version__}) is a CPU-only build without CUDA support; "
            f"{_CUDA_WHEEL}, or {_USE_CPU}"
        )
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {asked!r}: CUDA is not available on this machine (no NVIDIA GPU visible, its driver is missing "
            f"or older than this torch's CUDA {torch.version.cuda or torch.version.hip}, or CUDA_VISIBLE_DEVICES "
            f"hides every GPU); check `nvidia-smi`, or {_USE_CPU}"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise DeviceError(
            f"device {asked!r}: there is no GPU {dev.index}; this machine shows {count} CUDA device(s) "
            f"(cuda:0 .. cuda:{count - 1}); pick one of those"
        )


def _check_mps(asked: object) -> None:
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_built():
        raise DeviceError(f"device {asked!r}: this torch build has no MPS (Apple GPU) support; {_USE_CPU}")
    if not mps.is_available():
        raise DeviceError(
            f"device {asked!r}: MPS is not available (it needs an Apple-silicon Mac with macOS 12.3 or later); "
            f"{_USE_CPU}"
        )


def _check_other(dev: torch.device, asked: object) -> None:
    """xpu and other backends that have a ``torch.<type>.is_available()``; other device types cannot run models."""
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available):
        raise DeviceError(f"device {asked!r}: '{dev.type}' is not a device fastface can run on; use 'cpu', 'cuda', "
                          "'cuda:N', 'mps' or 'xpu'")
    if not available():
        raise DeviceError(f"device {asked!r}: the {dev.type} backend is not available on this machine; {_USE_CPU}")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise DeviceError(f"device {asked!r}: there is no {dev.type} device {dev.index} ({count()} present)")
