"""Every component's weights stay in the memory-mapped file when its dtype matches the model's (no second copy).

The check asks the kernel (/proc/self/maps) which file backs each parameter's memory, so it holds whatever route
the loader takes (safetensors or torch.load(mmap=True), key remapping, views)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fastface.selfcheck import write_tiny_weights

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")


def file_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from ``path``."""
    real, out = os.path.realpath(path), []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == real:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


def unmapped(module: torch.nn.Module | dict, path: Path) -> list[str]:
    """Names of the parameters (or dict tensors) whose memory does not lie in a mapping of ``path``."""
    ranges = file_ranges(path)
    named = dict(module.named_parameters()) if isinstance(module, torch.nn.Module) else flat(module)
    assert named, "nothing to check"
    return [n for n, p in named.items() if not any(lo <= p.data_ptr() < hi for lo, hi in ranges)]


def flat(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    return {k: v for key, value in items for k, v in flat(value, f"{prefix}.{key}").items()}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_tiny_weights(tmp_path_factory.mktemp("w"))


def test_text_encoders_vae_and_unet(weights):
    from fastface.models.text import load_text_encoder
    from fastface.models.unet_loading import load_unet
    from fastface.models.vae_loading import load_vae

    for name in ("text_encoder", "text_encoder_2"):
        folder = weights.base / name
        enc = load_text_encoder(folder, dtype=torch.float32)
        assert unmapped(enc, folder / "model.safetensors") == [], name
    vae = load_vae(weights.base / "vae", dtype=torch.float32)
    assert unmapped(vae, weights.base / "vae" / "diffusion_pytorch_model.safetensors") == []
    unet = load_unet(weights.base / "unet", dtype=torch.float32)
    assert unmapped(unet, weights.base / "unet" / "diffusion_pytorch_model.safetensors") == []


def test_image_encoders(weights):
    from fastface.models.clip_vision import CLIPVisionEncoder
    from fastface.adapters.pulid_adapter import load_eva

    clip = CLIPVisionEncoder.from_pretrained(weights.image_encoder, dtype=torch.float32)
    assert unmapped(clip, weights.image_encoder / "model.safetensors") == []
    eva = load_eva(weights.eva)  # a torch.save zip file, read with torch.load(mmap=True)
    assert unmapped(eva, weights.eva) == []


@pytest.mark.parametrize("which", ["adapter", "adapter_bin"])
def test_ip_adapter(weights, which):
    from fastface.adapters.ip_adapter import IPAdapterFaceID

    path = getattr(weights, which)
    ad = IPAdapterFaceID.from_file(path, dtype=torch.float32)
    assert unmapped(ad.projection, path) == []
    assert unmapped(ad.ip_adapter, path) == []


def test_pulid(weights):
    from fastface.adapters.pulid import PuLID

    ad = PuLID.from_file(weights.pulid_v1, dtype=torch.float32)
    assert unmapped(ad.encoder, weights.pulid_v1) == []
    assert unmapped(ad.attn, weights.pulid_v1) == []


def test_installed_identity_branch(weights):
    """Installing the adapter puts the file's to_k_ip / to_v_ip tensors into the UNet without copying them."""
    from fastface.adapters.ip_adapter import IPAdapterFaceID
    from fastface.models.unet_loading import load_unet

    unet = load_unet(weights.base / "unet", dtype=torch.float32)
    ad = IPAdapterFaceID.from_file(weights.adapter, dtype=torch.float32)
    handle = ad.install(unet)
    ips = [attn.ip for _, attn in unet.cross_attention_layers()]
    assert ips and all(ip is not None for ip in ips)
    for ip in ips:
        assert unmapped(ip, weights.adapter) == []
    handle.remove()
