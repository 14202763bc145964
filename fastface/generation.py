"""The result of a pipeline call (:class:`Generation`) and the PNG metadata it writes (``fastface`` text chunk)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

__all__ = ["Generation", "METADATA_KEY", "jsonable"]

METADATA_KEY = "fastface"  # the PNG text chunk holding the JSON settings


def jsonable(value: Any) -> Any:
    """``value`` as JSON-ready data (dataclasses as dicts, tuples as lists, paths as strings)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value.value if hasattr(value, "value") else value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


@dataclass
class Generation:
    """The result of one pipeline call: PIL ``images``, final ``latents`` [B, 4, h, w] and decoded ``pixels``
    [B, 3, H, W] in [0, 1] (float32, CPU), the per-image ``seeds``, the ``settings`` shared by the images and the
    UNet evaluations per image. Iterating or indexing it gives the images."""

    images: list[Image.Image]
    latents: torch.Tensor
    pixels: torch.Tensor
    seeds: list[int]
    prompts: list[str]
    settings: dict[str, Any]
    unet_evaluations: float

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[Image.Image]:
        return iter(self.images)

    def __getitem__(self, i: int) -> Image.Image:
        return self.images[i]

    def metadata(self, i: int) -> dict[str, Any]:
        """Everything needed to reproduce image ``i`` (its own seed and prompt, with num_images 1)."""
        return {**self.settings, "prompt": self.prompts[i], "seed": self.seeds[i], "num_images": 1}

    def save(self, i: int, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
        """Save image ``i`` as PNG with its settings as JSON in the ``fastface`` text chunk (and a readable
        ``parameters`` chunk); ``extra`` entries are added to the JSON."""
        meta = {**self.metadata(i), **(dict(extra) if extra else {})}
        info = PngInfo()
        info.add_text(METADATA_KEY, json.dumps(jsonable(meta), sort_keys=True))
        info.add_text("parameters", f"{meta['prompt']}\nSteps: {meta['steps']}, Sampler: {meta['sampler']}, "
                                    f"Seed: {meta['seed']}, Method: {meta['method']}, Model: {meta['preset']}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.images[i].save(path, format="PNG", pnginfo=info)
        return path
