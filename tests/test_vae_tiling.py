"""Tiled VAE decoding: the same tiles and blend as diffusers' tiled_decode, exact for a pointwise decoder, close to
the plain decode on a tiny VAE (the error is stated), and identical to it when the latent fits one tile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_vae import TINY, ref_vae, rel_err  # noqa: F401 (fixture)

from fastface.models.vae_loading import load_vae, load_vae_from_state_dict
from fastface.models.vae_tiling import tiled_decode

TILE = 8  # latents per tile side in these tests (the tiny VAE upsamples x2, so 16 px tiles)
# Tiling is not exact (per-tile GroupNorm statistics and mid-block attention). Measured on this tiny random VAE
# (it is far more sensitive to them than a trained one), [0, 1] images, 48x64 latents: mean |tiled - plain| =
# 0.056 with 16-latent tiles and 0.019 with 32-latent tiles (max 0.50 and 0.24).
PLAIN_MEAN_ATOL = {16: 0.07, 32: 0.03}


@pytest.fixture(scope="module")
def ours(tmp_path_factory, ref_vae):  # noqa: F811
    path = tmp_path_factory.mktemp("vae") / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in ref_vae.state_dict().items()}, str(path))
    return load_vae(path, "tiny")


def latents(h: int, w: int) -> torch.Tensor:
    return torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(0)) * 5


@pytest.mark.parametrize("shape", [(20, 28), (8, 19), (17, 8)])
def test_matches_diffusers_tiled_decode(ours, ref_vae, shape):  # noqa: F811
    z = latents(*shape)
    ref_vae.use_tiling, ref_vae.tile_latent_min_size, ref_vae.tile_sample_min_size = True, TILE, 2 * TILE
    ref_vae.tile_overlap_factor = 0.25
    try:
        with torch.no_grad():
            ref = (ref_vae.decode(z / TINY["scaling_factor"]).sample / 2 + 0.5).clamp(0, 1)
    finally:
        ref_vae.use_tiling = False
    img = ours.decode(z, tile=TILE)
    assert img.shape == ref.shape == (2, 3, 2 * shape[0], 2 * shape[1])
    assert rel_err(img, ref) < 1e-5


def test_exact_for_a_pointwise_decoder():
    """With a decoder that has no spatial context, every blend mixes equal values: tiling changes nothing."""
    w = torch.randn(3, 4, 1, 1, generator=torch.Generator().manual_seed(2))

    def decode(z):
        return F.interpolate(F.conv2d(z, w), scale_factor=8, mode="nearest")

    z = latents(45, 61)
    assert torch.allclose(tiled_decode(decode, z, tile=16), decode(z), rtol=0, atol=1e-5)
    assert torch.allclose(tiled_decode(decode, z, tile=16, overlap=0.5), decode(z), rtol=0, atol=1e-5)


def test_close_to_plain_decode_and_identical_within_one_tile(ours):
    z = latents(48, 64)[:1] / 5
    plain = ours.decode(z)
    errors = {tile: float((ours.decode(z, tile=tile) - plain).abs().mean()) for tile in PLAIN_MEAN_ATOL}
    assert all(0 < errors[t] < bound for t, bound in PLAIN_MEAN_ATOL.items()), errors
    assert errors[32] < errors[16]  # larger tiles, closer to the plain decode
    small = latents(TILE, TILE - 2)
    assert torch.equal(ours.decode(small, tile=TILE), ours.decode(small))


def test_bad_arguments():
    with pytest.raises(ValueError, match="overlap"):
        tiled_decode(lambda z: z, latents(4, 4), tile=2, overlap=1.0)


def test_fp16_overflow_fallback_is_tiled_too(ref_vae):  # noqa: F811
    """An fp16 decode that overflows is redone in fp32 tile by tile: equal to the fp32 tiled decode of the same
    (fp16-rounded) weights. The overflow is made as in test_vae: conv_in scaled so activations pass 65504."""
    sd = {k: v.clone() for k, v in ref_vae.state_dict().items()}
    sd["decoder.conv_in.weight"] *= 4000.0
    sd["decoder.conv_in.bias"] *= 4000.0
    half = load_vae_from_state_dict(sd, "tiny", dtype=torch.float16)
    z = latents(20, 28)[:1]
    img = half.decode(z, tile=TILE)
    assert half._fp16_overflows and torch.isfinite(img).all()
    want = load_vae_from_state_dict({k: v.half().float() for k, v in sd.items()}, "tiny").decode(z, tile=TILE)
    assert rel_err(img, want) < 1e-5
