"""Test-only helpers for the evaluation harness: a cheap fake generator and tiny metric models in real formats.

The fake generator draws 320x320 images that the tiny ONNX face detector (tests/onnx_face_models.py) reads: a
bright-red 16 px "face" on a dark noisy background at a seed-dependent place (about 1 in 5 seeds: no face), with
a colour that depends on the method and the ip scale, so the metrics vary across configurations.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZE = 320
PATCH = 16
METHOD_SHIFT = {"baseline": 0, "dcg": 10, "am1": 20, "am2": 30, "fastface-am1": 40, "fastface-am2": 50}


def fake_image(seed: int, ip_scale: float = 0.8, method: str = "baseline") -> Image.Image:
    """A deterministic function of (seed, ip_scale, method); the face position and presence depend on the seed only."""
    rng = np.random.default_rng(seed % 2**32)
    img = rng.integers(0, 30, (SIZE, SIZE, 3), dtype=np.uint8)
    if rng.random() < 0.2:
        return Image.fromarray(img)
    x, y = (PATCH * int(v) for v in rng.integers(2, SIZE // PATCH - 2, 2))
    img[y : y + PATCH, x : x + PATCH, 0] = rng.integers(230, 256, (PATCH, PATCH))
    green = rng.integers(40, 120, (PATCH, PATCH)) + int(100 * ip_scale) + METHOD_SHIFT.get(method, 0)
    img[y : y + PATCH, x : x + PATCH, 1] = np.clip(green, 0, 255)
    img[y : y + PATCH, x : x + PATCH, 2] = rng.integers(0, 60, (PATCH, PATCH))
    return Image.fromarray(img)


class FakeGenerator:
    """``Request -> PIL image`` from :func:`fake_image`; counts its calls."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls = 0
        self.fail_at = fail_at

    def __call__(self, req) -> Image.Image:
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        return fake_image(req.seed, req.config.ip_scale, req.config.method)


def factory(options) -> FakeGenerator:
    """The ``--generator eval_fakes:factory`` entry point."""
    return FakeGenerator()


def write_identities(folder: Path, names: list[str]) -> list[Path]:
    """Reference photos with one detectable face each."""
    from onnx_face_models import face_image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, name in enumerate(names):
        path = folder / f"{name}.png"
        Image.fromarray(face_image(SIZE, patches=((64 + 32 * i, 96, PATCH),), seed=100 + i)).save(path)
        out.append(path)
    return out


def write_diversebench(root: Path, identities: list[str], realistic: list[str], stylistic: list[str]) -> Path:
    """A DiverseBench-layout folder (prompts written mixed-case with spaces, as a user might)."""
    write_identities(root / "id_photos", identities)
    (root / "prompts_nostyle.txt").write_text("\n".join(f"  {p.upper()} " for p in realistic) + "\n\n")
    (root / "prompts_style.txt").write_text("\n".join(stylistic) + "\n")
    return root


def write_tiny_clip(folder: Path, projection_dim: int = 16, image_size: int = 32, seed: int = 0):
    """A random transformers ``CLIPModel`` saved in its real folder layout; returns the model (eval mode)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=projection_dim,
    )
    model = CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    return model


def aesthetic_sequential(dim: int, seed: int = 0) -> torch.nn.Sequential:
    """LAION's predictor layout, built independently of fastface (random weights)."""
    torch.manual_seed(seed)
    n = torch.nn
    seq = n.Sequential(n.Linear(dim, 1024), n.Dropout(0.2), n.Linear(1024, 128), n.Dropout(0.2),
                       n.Linear(128, 64), n.Dropout(0.1), n.Linear(64, 16), n.Linear(16, 1))
    return seq.eval()


def write_aesthetic(path: Path, dim: int, seed: int = 0) -> torch.nn.Sequential:
    """Save it as LAION does (``torch.save`` of the Lightning module's state dict, keys ``layers.*``)."""
    seq = aesthetic_sequential(dim, seed)
    torch.save({f"layers.{k}": v for k, v in seq.state_dict().items()}, path)
    return seq
