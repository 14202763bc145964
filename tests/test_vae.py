"""Our AutoencoderKL vs diffusers' on tiny random weights, from diffusers folders and LDM single-file layouts."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from fastface.models.loading import WeightFormatError
from fastface.models.vae import VAE_CONFIGS, AutoencoderKL, images_to_uint8, vae_config
from fastface.models.vae_loading import load_vae, load_vae_from_state_dict, vae_state_dict

import diffusers

RTOL = 1e-5  # fp32, relative to the reference's max magnitude
TINY = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(16, 32),
    norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    scaling_factor=0.13025, force_upcast=True, sample_size=32,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def ref_vae():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**TINY).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + offset)
    return vae


def ldm_keys(sd: dict[str, torch.Tensor], n_up: int, prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    """The LDM layout, written independently from diffusers names (decoder up index reversed, 1x1 conv attention)."""
    out = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for key, value in sd.items():
        k = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        parts = k.split(".")
        if parts[1] == "down_blocks":
            kind = "block" if parts[3] == "resnets" else "downsample"
            k = ".".join([parts[0], "down", parts[2], kind] + ([parts[4]] if kind == "block" else []) + parts[5:])
        elif parts[1] == "up_blocks":
            b = n_up - 1 - int(parts[2])
            if parts[3] == "resnets":
                k = ".".join([parts[0], "up", str(b), "block", *parts[4:]])
            else:
                k = ".".join([parts[0], "up", str(b), "upsample", *parts[5:]])
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                k = ".".join([parts[0], "mid", f"block_{int(parts[3]) + 1}", *parts[4:]])
            else:
                name = ".".join(parts[4:-1])
                k = ".".join([parts[0], "mid", "attn_1", attn[name], parts[-1]])
                if name != "group_norm" and value.ndim == 2:
                    value = value[:, :, None, None]
        out[prefix + k] = value.contiguous()
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, ref_vae):
    root = tmp_path_factory.mktemp("vae")
    ref_vae.save_pretrained(root / "vae")
    ldm = ldm_keys(ref_vae.state_dict(), n_up=2)
    ldm["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # the rest of a full single file is ignored
    save_file(ldm, str(root / "sdxl_single.safetensors"))
    save_file({k[len("first_stage_model."):]: v for k, v in ldm.items() if k.startswith("first_stage_model.")},
              str(root / "vae_ldm.safetensors"))
    save_file({k: v.contiguous() for k, v in ref_vae.state_dict().items()}, str(root / "vae_diffusers.safetensors"))
    return root


def latents(seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(seed)).to(dtype) * 5


def ref_decode(vae, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        x = vae.decode(z / vae.config.scaling_factor).sample
    return (x / 2 + 0.5).clamp(0, 1)


def test_ldm_map_agrees_with_diffusers_converter(ref_vae):
    """The test's LDM layout is what diffusers' own single-file converter maps back to the diffusers weights."""
    import diffusers.loaders.single_file_utils as utils
    ldm = ldm_keys(ref_vae.state_dict(), n_up=2)
    theirs = utils.convert_ldm_vae_checkpoint(ldm, dict(ref_vae.config))
    ours = vae_state_dict(ldm)
    expected = ref_vae.state_dict()
    assert set(theirs) == set(ours) == set(expected)
    for k, v in expected.items():
        assert torch.equal(theirs[k], v) and torch.equal(ours[k], v), k


@pytest.mark.parametrize("source", ["vae", "sdxl_single.safetensors", "vae_ldm.safetensors", "vae_diffusers.safetensors"])
def test_decode_and_encode_match_diffusers(files, ref_vae, source):
    ours = load_vae(files / source, None if source == "vae" else "tiny")
    assert ours.config.scaling_factor == 0.13025
    z = latents()
    img = ours.decode(z)
    ref = ref_decode(ref_vae, z)
    assert img.shape == (2, 3, 16, 24) and img.dtype == torch.float32
    assert rel_err(img, ref) < RTOL
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    mean, logvar = ours.encode_moments(x)
    with torch.no_grad():
        dist = ref_vae.encode(x * 2 - 1).latent_dist
    assert rel_err(mean, dist.mean) < RTOL and rel_err(logvar, dist.logvar) < RTOL
    assert rel_err(ours.encode(x), dist.mean * 0.13025) < RTOL
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert rel_err(ours.encode(x, generator=g1, sample=True), dist.sample(generator=g2) * 0.13025) < RTOL


def test_single_file_from_state_dict_and_diffusers_from_single_file(files, ref_vae, tmp_path):
    from safetensors.torch import load_file

    sd = load_file(str(files / "sdxl_single.safetensors"))
    ours = load_vae_from_state_dict(sd, "tiny")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text((files / "vae" / "config.json").read_text())
    theirs = diffusers.AutoencoderKL.from_single_file(str(files / "vae_ldm.safetensors"), config=str(tmp_path / "cfg"),
                                                      local_files_only=True)
    z = latents(1)
    assert rel_err(ours.decode(z), ref_decode(theirs.eval(), z)) < RTOL


def test_fp16_overflow_falls_back(ref_vae, caplog):
    """Scaled-up weights overflow fp16 (inf/NaN); decode must detect it and return the fp32 result."""
    sd = {k: v.clone() for k, v in ref_vae.state_dict().items()}
    sd["decoder.conv_in.weight"] *= 4000.0  # activations ~1e5 > fp16 max 65504; GroupNorm makes the rest finite in fp32
    sd["decoder.conv_in.bias"] *= 4000.0
    vae16 = load_vae_from_state_dict(sd, "tiny", dtype=torch.float16)
    vae32 = load_vae_from_state_dict(sd, "tiny")
    z = latents(2)
    assert not torch.isfinite(vae16.decode_raw(z)).all()  # the construction really overflows
    with caplog.at_level(logging.WARNING, logger="fastface.models.vae"):
        img = vae16.decode(z)
    assert "overflowed in float16" in caplog.text and "float32" in caplog.text
    expected = vae32.decode(z)
    assert torch.isfinite(img).all() and img.dtype == torch.float32
    # the fallback uses the fp16 weights upcast exactly, so it equals the fp32 decode of those weights
    vae32_from16 = load_vae_from_state_dict({k: v.half().float() for k, v in sd.items()}, "tiny")
    assert rel_err(img, vae32_from16.decode(z)) < RTOL
    assert rel_err(img, expected) < 1e-2  # fp16 rounding of the weights only
    assert all(p.dtype == torch.float16 for p in vae16.parameters())  # the module was not changed
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastface.models.vae"):
        again = vae16.decode(z)  # goes straight to the fallback
    assert torch.equal(again, img) and caplog.text == ""


def test_fp16_no_overflow_stays_fp16(ref_vae):
    vae16 = load_vae_from_state_dict(ref_vae.state_dict(), "tiny", dtype=torch.float16)
    z = latents(4)
    img = vae16.decode(z)
    assert not vae16._fp16_overflows
    assert (img - ref_decode(ref_vae, z)).abs().max() < 5e-3


def test_uint8_helper():
    img = torch.tensor([0.0, 0.5, 1.0, 0.999, 1.5]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    out = images_to_uint8(img)
    assert out.shape == (1, 1, 5, 3) and out.dtype == torch.uint8
    assert out[0, 0, :, 0].tolist() == [0, 128, 255, 255, 255]
    with pytest.raises(ValueError, match="images must be"):
        images_to_uint8(torch.zeros(3, 4, 4))


def test_registry():
    assert vae_config("sdxl").block_out_channels == (128, 256, 512, 512) and vae_config("sdxl").scaling_factor == 0.13025
    assert set(VAE_CONFIGS) >= {"sdxl", "sdxl-fp16-fix", "tiny"}
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in AutoencoderKL("sdxl").state_dict().items()}
        ref = diffusers.AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        )
    assert ours == {k: tuple(v.shape) for k, v in ref.state_dict().items()}  # same names and shapes at SDXL size


# ---- errors ---------------------------------------------------------------------------------------------------


def test_errors(files, ref_vae, tmp_path):
    with pytest.raises(WeightFormatError, match="no such file or folder"):
        load_vae(tmp_path / "missing.safetensors")
    (tmp_path / "v").mkdir()
    with pytest.raises(WeightFormatError, match="config.json"):
        load_vae(tmp_path / "v")
    (tmp_path / "v" / "config.json").write_text(json.dumps({"layers_per_block": 2}))
    with pytest.raises(WeightFormatError, match="not a usable AutoencoderKL config"):
        load_vae(tmp_path / "v")
    with pytest.raises(WeightFormatError, match="no VAE weights found"):
        load_vae_from_state_dict({"model.diffusion_model.x": torch.zeros(1)}, "tiny")
    sd = dict(ref_vae.state_dict())
    del sd["decoder.conv_out.bias"]
    with pytest.raises(WeightFormatError, match="missing key.*decoder.conv_out.bias"):
        load_vae_from_state_dict(sd, "tiny")
    with pytest.raises(WeightFormatError, match="missing key"):
        load_vae(files / "vae_ldm.safetensors")  # tiny weights, default "sdxl" config
    wider = dataclasses.replace(vae_config("tiny"), block_out_channels=(16, 48))
    with pytest.raises(WeightFormatError, match="shape mismatch"):
        load_vae(files / "vae_ldm.safetensors", wider)
    with pytest.raises(ValueError, match="unknown VAE config"):
        vae_config("sd3")
