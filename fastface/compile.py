"""torch.compile for a UNet with FastFace hooks: ``unet_c = fastface.compile_unet(unet)``, then call ``unet_c``.

The hooks (DCG batch expansion and combination, AM on the identity attention) are traced into the UNet's graph
with no graph break. Before each compiled call the wrapper resolves the call's step on the host (the timestep the
sampler passes is a host number or CPU tensor: reading it costs no device sync) and hands the compiled graph the
branch set (guarded: one graph per distinct branch set) and the step's coefficients as tensors (graph inputs: no
recompile when they change). A 4-step run therefore compiles once per distinct branch set of its schedule.

Hooks may be attached and removed after compiling: dynamo guards on the modules' hook dictionaries, so the next
call recompiles for the new hooks (or reuses the graph cached for them). A plain ``torch.compile(unet)`` works too:
then the step is looked up inside the graph, as for an accelerator timestep (the union of the schedule's branches
is computed at every step, so DCG without AM2 evaluates more branches than the wrapper does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fastface.hooks import attached

__all__ = ["CompiledUNet", "compile_unet"]


class CompiledUNet(nn.Module):
    """A compiled UNet that resolves the FastFace step on the host before each call (see :func:`compile_unet`).

    ``.unet`` is the original (eager) module; parameters are shared, so attaching FastFace to ``.unet`` (before or
    after compiling) is what the compiled calls run.
    """

    def __init__(self, unet: nn.Module, **compile_kwargs: Any) -> None:
        super().__init__()
        self.unet = unet
        # Compiling the call (not the module) traces the module's __call__: its hooks join the forward in one graph.
        self._compiled_call = torch.compile(_call_module, **compile_kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        handle = attached(self.unet)
        if handle is not None:
            kwargs = handle.prepare_call(args, kwargs)
        layout = "" if handle is None else handle.describe()
        try:
            return self._compiled_call(self.unet, layout, *args, **kwargs)
        finally:
            if handle is not None:
                handle.end_call()  # a failed call must not leave its step to the next (eager) call


def _call_module(module: nn.Module, layout: str, *args: Any, **kwargs: Any) -> Any:
    # dynamo does not guard on module hook dictionaries (torch._dynamo.config.skip_nnmodule_hook_guards), so a graph
    # traced without hooks would be replayed after attaching them. ``layout`` names the attached FastFace settings;
    # reading it makes dynamo guard on its value: attaching, removing or changing settings recompiles (or reuses the
    # graph cached for that layout), while re-attaching the same settings reuses the graph.
    if layout == "\0":
        raise ValueError("invalid FastFace layout")
    return module(*args, **kwargs)


def compile_unet(unet: nn.Module, **compile_kwargs: Any) -> CompiledUNet:
    """``torch.compile`` a UNet for use with FastFace hooks; keyword arguments go to :func:`torch.compile`
    (``dynamic`` defaults to False).

    Call the returned module like the UNet. The FastFace handle attached to ``unet`` (now or later) is honoured on
    every call: the branches skipped per step and the evaluation counts are those of the eager UNet.
    """
    if isinstance(unet, CompiledUNet):
        raise ValueError("this UNet is already compiled with fastface.compile_unet; call it directly")
    # static shapes by default: each branch set has its own batch size, and a static graph per set is what the
    # backends (inductor, CUDA graphs) optimise best; pass dynamic=None for dynamo's automatic dynamic shapes
    compile_kwargs.setdefault("dynamic", False)
    return CompiledUNet(unet, **compile_kwargs)
