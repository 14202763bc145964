"""Keep a model on the accelerator only while it is in use (model offloading).

``with on_device(module, "cuda"):`` moves ``module`` to the device for the block and back afterwards. Going back
costs no copy: the module's original (CPU, often memory-mapped) tensors are kept aside while it is away and put
back on exit, so a zero-copy model stays zero-copy and the device copies are freed. The weights are therefore
assumed unchanged while the module is on the device (inference); a parameter *replaced* by another object in the
meantime is copied back instead.

A pipeline loads everything on the CPU and wraps each stage::

    with on_device([text.encoder_1, text.encoder_2], "cuda"):   # prompt encoding
        ...
    with on_device(image_encoder, "cuda"):   # identity encoding
        ...
    with on_device(unet, "cuda"):            # sampling
        ...
    with on_device(vae, "cuda"):             # decoding
        ...
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["on_device", "module_device"]


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU for a module without tensors)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


@contextmanager
def on_device(
    module: nn.Module | Sequence[nn.Module],
    device: str | torch.device,
    dtype: torch.dtype | None = None,
    non_blocking: bool = False,
) -> Iterator[nn.Module | Sequence[nn.Module]]:
    """Context manager: ``module`` lives on ``device`` inside the block and returns to its own tensors after.

    Yields ``module``, which may also be a sequence of modules moved together (e.g. both text encoders). ``dtype`` optionally casts floating tensors for the block too (``module.to(device, dtype)``;
    e.g. an fp32 VAE decode). Nothing moves when the module is already there (and in that dtype). Parameters keep their identity (``p.data`` is
    swapped), so optimisers, hooks and references to the parameters stay valid. On exit the device copies are
    dropped and the original tensors restored, even when the block raises.
    """
    given = module
    if not isinstance(module, nn.Module):
        module = nn.ModuleList(list(module))  # a view for the walk below; the modules themselves are not changed
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError("on_device: 'meta' holds no data; pass the accelerator to run the module on (e.g. 'cuda')")
    home = module_device(module)
    if _same_device(home, device) and (dtype is None or all(p.dtype == dtype for p in _floating(module))):
        yield given
        return
    # originals: (owner module, name, tensor object registered there, its data) for every parameter and buffer
    saved = []
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                saved.append((mod, name, True, p, p.data))
        for name, b in mod._buffers.items():
            if b is not None:
                saved.append((mod, name, False, b, b))
    module.to(device, dtype, non_blocking=non_blocking)
    try:
        yield given
    finally:
        for mod, name, is_param, obj, data in saved:
            if is_param:
                cur = mod._parameters.get(name)
                if cur is obj:
                    cur.data = data  # the same Parameter object points at its original storage again
                elif cur is not None:  # replaced while on the device: bring the new one home
                    mod._parameters[name] = nn.Parameter(cur.data.to(data.device), cur.requires_grad)
            else:
                cur = mod._buffers.get(name)
                if cur is not None:  # a buffer ``module.to`` moved, or one the block assigned anew (copied home)
                    mod._buffers[name] = data if cur.shape == data.shape else cur.to(data.device)


def _floating(module: nn.Module) -> Iterator[torch.Tensor]:
    return (t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point())


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type == "cuda":
        current = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index or a.index is None or b.index is None
