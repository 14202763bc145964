"""Helpers for tiny random weights in the real file layouts (selfcheck, tests, adapters' own tiny writers)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

__all__ = ["TinyAdapter", "perturb", "save_safetensors", "write_json"]


@dataclass(frozen=True)
class TinyAdapter:
    """What an adapter's tiny writer made for one of its presets: ``name`` (the preset), ``load`` (keyword
    arguments of ``Pipeline.from_pretrained``: ``adapter_file`` and load options), ``face`` (a face input),
    ``methods`` (the selfcheck runs), ``files`` (named files, exposed as attributes of the tiny weights),
    ``faces`` (optional: a face input per seed, for runs over several identities)."""

    name: str
    load: dict[str, Any]
    face: Any
    methods: tuple[str, ...] = ("baseline", "fastface-am1")
    files: dict[str, Path] = field(default_factory=dict)
    faces: Callable[[int], Any] | None = None

    def face_for(self, seed: int) -> Any:
        """A face input for identity ``seed`` (the fixed ``face`` when the writer gave no ``faces``)."""
        return self.face if self.faces is None else self.faces(seed)


def perturb(module: nn.Module, gen: torch.Generator, std: float = 0.05) -> nn.Module:
    """Add small noise to every parameter (zero-initialised layers become live)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return module


def save_safetensors(module_or_sd: nn.Module | dict, path: Path) -> None:
    """Save a module's state dict (or a dict) as ``.safetensors``, making the folder."""
    sd = module_or_sd.state_dict() if isinstance(module_or_sd, nn.Module) else module_or_sd
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(path))


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")
