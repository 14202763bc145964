"""A new identity adapter written in this one file, registered, and used by name by the pipeline, the CLI and the
selfcheck with DCG + AM1, with no edit anywhere else in the repository.

The toy adapter: a 512-d face embedding -> 4 identity tokens through one linear map (its own ``.safetensors``
file: ``proj.weight`` [4·C, 512], ``null`` [4, C] the null identity DCG uses, and ``k.{i}`` / ``v.{i}`` per
cross-attention layer ``i``), one option ``gain`` (multiplies the tokens), face inputs as float embeddings or
``.npy`` files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from fastface.adapters.base import (
    AdapterOption,
    AdapterPreset,
    FacePreparer,
    FaceSettings,
    IdentityAdapter,
    InstallHandle,
    attention_layers_for,
)
from fastface.adapters.registry import adapter_names, register, unregister
from fastface.cli import EXIT_USAGE, main
from fastface.generation import METADATA_KEY
from fastface.models.attention import IdentityAttention
from fastface.pipeline import Pipeline
from fastface.selfcheck import run_selfcheck, write_tiny_weights
from fastface.tiny import TinyAdapter

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

TOKENS = 4
TINY = ["--height", "64", "--width", "64", "--device", "cpu", "--dtype", "fp32", "--no-progress"]


# ----------------------------------------------------------------------------------------------------------------
# The adapter: everything an adapter author writes


@dataclass(frozen=True)
class ToyPreset(AdapterPreset):
    gain: float = 1.0


class ToyPreparer(FacePreparer):
    def __init__(self) -> None:
        self.sources: dict[str, str] = {}

    def prepare(self, face: Any) -> torch.Tensor:
        if isinstance(face, (list, tuple)):
            face = face[0]
        if isinstance(face, (str, os.PathLike)):
            face = np.load(face)
        emb = torch.as_tensor(np.asarray(face, dtype=np.float32)).reshape(1, 512)
        return torch.nn.functional.normalize(emb, dim=-1)

    def save(self, path, identity: torch.Tensor) -> Path:
        np.save(path, identity.numpy())
        return Path(path)


class ToyAdapter(IdentityAdapter):
    family = "Toy"
    preset_type = ToyPreset
    options = (AdapterOption("gain", "multiplies the identity tokens", float, "gain"),)

    def __init__(self, preset, preparer, sources, weights: dict[str, torch.Tensor]) -> None:
        super().__init__(preset, preparer, sources)
        self.model = weights

    @classmethod
    def face_preparer(cls, preset, faces: FaceSettings) -> ToyPreparer:
        return ToyPreparer()

    @classmethod
    def load(cls, preset, files, *, dtype, device, faces) -> ToyAdapter:
        return cls(preset, ToyPreparer(), {}, load_file(str(files["adapter"]), device=str(device)))

    def install(self, unet: nn.Module, *, fuse: bool = True) -> InstallHandle:
        plan = []
        for i, _name, attn in attention_layers_for(unet, 1 + max(int(k[2:]) for k in self.model if k[:2] == "k."),
                                                   "toy"):
            if i % 2:
                ip = IdentityAttention(attn.to_k.out_features, attn.to_k.in_features, attn.heads, attn.head_dim)
                ip.load_state_dict({"to_k_ip.weight": self.model[f"k.{i}"], "to_v_ip.weight": self.model[f"v.{i}"]})
                plan.append((attn, ip.requires_grad_(False), {}))
        return InstallHandle(self, plan)

    def tokens(self, identity: torch.Tensor, options: Mapping[str, Any], dtype: torch.dtype):
        w = self.model["proj.weight"]
        tokens = (identity @ w.T).reshape(1, TOKENS, -1) * options["gain"]
        return tokens.to(dtype), self.model["null"][None].to(dtype)

    def describe(self, identity: torch.Tensor) -> dict[str, Any]:
        return {"source": "toy", "embedding_sha256": hashlib.sha256(identity.numpy().tobytes()).hexdigest()}

    def metadata(self, identity, options, tokens, handle) -> dict[str, Any]:
        return {"toy": {"gain": options["gain"], "tokens": int(tokens.shape[1])}}

    @classmethod
    def write_tiny(cls, root: Path, unet: nn.Module, gen: torch.Generator, seed: int) -> list:
        path = write_toy_file(root / "toy.safetensors", unet, gen)
        face = np.random.default_rng(seed).standard_normal(512).astype(np.float32)
        return [TinyAdapter("toy", {"adapter_file": path}, face, ("dcg", "am1", "fastface-am1"))]


def write_toy_file(path: Path, unet: nn.Module, gen: torch.Generator) -> Path:
    c = unet.config.context_dim
    sd = {"proj.weight": torch.randn(TOKENS * c, 512, generator=gen) * 0.3,
          "null": torch.randn(TOKENS, c, generator=gen) * 0.1}
    for i, (_, attn) in enumerate(unet.attention_layers()):
        if i % 2:
            for kv in "kv":
                sd[f"{kv}.{i}"] = torch.randn(attn.to_k.out_features, c, generator=gen) * c**-0.5
    save_file(sd, str(path))
    return path


# ----------------------------------------------------------------------------------------------------------------
# Using it by name


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    w = write_tiny_weights(root / "w")
    from fastface.models.unet import UNet, get_unet_config

    with torch.device("meta"):
        unet = UNet(get_unet_config("tiny"))
    toy_file = write_toy_file(root / "toy.safetensors", unet, torch.Generator().manual_seed(1))
    register(ToyPreset(name="toy", description="a toy adapter from one test file", weights=str(toy_file),
                       gain=1.0), ToyAdapter)
    np.save(root / "emb.npy", np.random.default_rng(3).standard_normal(512).astype(np.float32))
    yield root, w
    unregister("toy")


def test_pipeline_runs_the_registered_adapter_with_dcg_and_am1(env):
    root, w = env
    assert "toy" in adapter_names()
    pipe = Pipeline.from_pretrained("hyper", "toy", base=w.base, weights=w.lora, dtype="fp32", device="cpu")
    kw = dict(height=64, width=64, seed=0)
    face = root / "emb.npy"
    out = pipe("a photo of a person", face, method="fastface-am1", gain=0.5, **kw)
    assert out.unet_evaluations == 10 and torch.isfinite(out.pixels).all()
    assert out.settings["toy"] == {"gain": 0.5, "tokens": TOKENS} and out.settings["adapter"] == "toy"
    assert out.settings["weights"]["adapter"].endswith("toy.safetensors")
    # the option and AM1 act: each changes the image
    full = pipe("a photo of a person", face, method="fastface-am1", **kw)
    dcg_only = pipe("a photo of a person", face, method="dcg", gain=0.5, **kw)
    assert (full.latents - out.latents).abs().max() > 1e-3 and (dcg_only.latents - out.latents).abs().max() > 1e-3
    assert pipe("a photo of a person", face, method="am1", **kw).unet_evaluations == 4
    # the UNet is left as it was after a call, and the handle restores it exactly
    assert not pipe.unet._forward_pre_hooks and not pipe.unet._forward_hooks
    with pytest.raises(ValueError, match=r"gain must be a finite number >= 0\.0, got -1\.0"):
        pipe("x", face, gain=-1.0, **kw)
    with pytest.raises(ValueError, match="lora_scale is a IP-Adapter option; adapter 'toy' does not use it"):
        pipe("x", face, lora_scale=0.5, **kw)
    pipe.adapter_handle.remove()
    assert all(getattr(m, "ip", None) is None for _, m in pipe.unet.attention_layers())


def test_cli_generate_and_help_offer_the_adapter(env, monkeypatch, capsys):
    root, w = env
    monkeypatch.chdir(root)
    args = ["generate", "--adapter", "toy", "--face", "emb.npy", "-p", "a photo", "--base", str(w.base),
            "--weights", str(w.lora), "--method", "fastface-am1", "--seed", "1", *TINY]
    assert main([*args, "--adapter-option", "gain=0.25", "-o", "toy.png"]) == 0
    with Image.open(root / "toy.png") as im:
        meta = json.loads(im.text[METADATA_KEY])
    assert meta["adapter"] == "toy" and meta["toy"]["gain"] == 0.25 and "--adapter-option gain=0.25" in meta["command"]
    assert main([*args, "--gain", "0.25", "-o", "flag.png"]) == 0  # its option is a flag too
    with Image.open(root / "flag.png") as a, Image.open(root / "toy.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    capsys.readouterr()
    assert main([*args, "--adapter-option", "mode=style", "-o", "x.png"]) == EXIT_USAGE
    assert "mode is a PuLID option; adapter 'toy' does not use it" in capsys.readouterr().err
    assert main(["generate", "--help"]) == 0
    text = capsys.readouterr().out
    assert "toy (Toy): gain (float)" in " ".join(text.split()) and "--gain" in text


def test_selfcheck_runs_the_adapter(env):
    lines: list[str] = []
    assert run_selfcheck(log=lines.append)
    toy = [line for line in lines if " toy " in line]
    assert [line.split()[3] for line in toy] == ["dcg", "am1", "fastface-am1"]
    assert all(line.startswith("ok ") for line in toy)
    assert [float(line.split()[4]) for line in toy] == [10.0, 4.0, 10.0]
