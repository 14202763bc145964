"""Parity of our CLIP vision encoder and preprocessing with transformers (random tiny weights, real file layout)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from fastface.models.clip_vision import (
    CLIP_VISION_CONFIGS,
    CLIPVisionConfig,
    CLIPVisionEncoder,
    clip_preprocess,
    get_clip_vision_config,
)
from fastface.models.loading import WeightFormatError

RTOL = 1e-5  # fp32: max |ours - ref| / max |ref|


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _hf_config(cfg: CLIPVisionConfig) -> transformers.CLIPVisionConfig:
    return transformers.CLIPVisionConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.projection_dim,
        hidden_act=cfg.hidden_act,
        layer_norm_eps=cfg.layer_norm_eps,
    )


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    # Default inits leave LayerNorms at identity and biases at zero; perturb everything so every path is tested.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="module", params=["gelu", "quick_gelu"])
def saved_model(request, tmp_path_factory):
    """A tiny transformers CLIPVisionModelWithProjection saved with save_pretrained, and the live reference."""
    cfg = get_clip_vision_config("tiny")
    if request.param != cfg.hidden_act:
        cfg = CLIPVisionConfig(**{**cfg.__dict__, "hidden_act": request.param})
    torch.manual_seed(0)
    ref = _randomize(transformers.CLIPVisionModelWithProjection(_hf_config(cfg)), seed=1)
    folder = tmp_path_factory.mktemp(f"image_encoder_{request.param}")
    ref.save_pretrained(folder)
    return cfg, ref, folder


def test_registry_shapes():
    h = CLIP_VISION_CONFIGS["vit-h-14"]
    assert (h.hidden_size, h.num_layers, h.num_heads, h.intermediate_size) == (1280, 32, 16, 5120)
    assert (h.patch_size, h.image_size, h.layer_norm_eps) == (14, 224, 1e-5)
    assert (h.hidden_act, h.projection_dim) == ("gelu", 1024)
    assert h.num_tokens == 257
    # Built on meta: 632,076,800 fp32 parameters = 2,528,307,200 B, which with a ~64 KB header (520 keys plus
    # position_ids) accounts for the 2,528,373,448 B of h94/IP-Adapter models/image_encoder/model.safetensors.
    with torch.device("meta"):
        full = CLIPVisionEncoder("vit-h-14")
    assert sum(p.numel() for p in full.parameters()) == 632_076_800
    with pytest.raises(ValueError, match="unknown CLIP vision config"):
        get_clip_vision_config("vit-x")
    with pytest.raises(ValueError, match="divisible"):
        CLIPVisionConfig(hidden_size=30, num_heads=4)


def test_penultimate_and_image_embeds_match_transformers(saved_model):
    cfg, ref, folder = saved_model
    ours = CLIPVisionEncoder.from_pretrained(folder)
    assert ours.config == cfg  # parsed from config.json
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = ref(pixel_values=pixels, output_hidden_states=True)
        enc = ours.encode(pixels, image_embeds=True)
        pen = ours(pixels)
        hs = ours.hidden_states(pixels)
    assert pen.shape == (2, cfg.num_tokens, cfg.hidden_size)
    assert _rel_err(pen, out.hidden_states[-2]) < RTOL
    assert torch.equal(pen, enc.penultimate)
    assert _rel_err(enc.image_embeds, out.image_embeds) < RTOL
    assert len(hs) == len(out.hidden_states) == cfg.num_layers + 1
    for a, b in zip(hs, out.hidden_states):
        assert _rel_err(a, b) < RTOL


def test_null_features_are_features_of_zero_pixels(saved_model):
    cfg, ref, folder = saved_model
    ours = CLIPVisionEncoder.from_pretrained(folder)
    pixels = torch.randn(3, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        null = ours.null_features(pixels)
        expected = ref(pixel_values=torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        assert _rel_err(null, expected) < RTOL
        assert torch.equal(ours.null_features(3), null)


def test_load_single_file_fp16_and_transformers5_bare_layout(saved_model, tmp_path):
    cfg, ref, folder = saved_model
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        expected = ref(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]

    # A weight file given directly (config.json beside it), loaded as fp16.
    half = CLIPVisionEncoder.from_pretrained(folder / "model.safetensors", dtype=torch.float16)
    assert next(half.parameters()).dtype == torch.float16
    # transformers 5 CLIPVisionModel saves bare "embeddings.*" keys and no projection.
    bare = transformers.CLIPVisionModel(_hf_config(cfg))
    prefix = "vision_model."
    bare.load_state_dict({k[len(prefix) :]: v for k, v in ref.state_dict().items() if k.startswith(prefix)})
    bare.save_pretrained(tmp_path)
    ours = CLIPVisionEncoder.from_pretrained(tmp_path)
    assert ours.visual_projection is None
    with torch.no_grad():
        assert _rel_err(ours(pixels), expected) < RTOL
        with pytest.raises(ValueError, match="no visual_projection"):
            ours.encode(pixels, image_embeds=True)


def test_load_errors(saved_model, tmp_path):
    cfg, ref, folder = saved_model
    with pytest.raises(WeightFormatError, match="no such file"):
        CLIPVisionEncoder.from_pretrained(tmp_path / "missing")
    # Right layout, wrong config: shape mismatch named.
    with pytest.raises(WeightFormatError, match="shape mismatch"):
        CLIPVisionEncoder.from_pretrained(folder, config=CLIPVisionConfig(**{**cfg.__dict__, "intermediate_size": 96}))
    # Not a CLIP vision file.
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({"foo.weight": torch.zeros(2)}, bad / "model.safetensors")
    with pytest.raises(WeightFormatError, match="not a transformers CLIP vision weight file"):
        CLIPVisionEncoder.from_pretrained(bad)
    # A config.json that is not a CLIP vision config.
    (bad / "config.json").write_text(json.dumps({"model_type": "unet"}))
    with pytest.raises(WeightFormatError, match="not a CLIP vision config"):
        CLIPVisionEncoder.from_pretrained(bad)
    (bad / "config.json").write_text("{ truncated")
    with pytest.raises(WeightFormatError, match="not valid JSON"):
        CLIPVisionEncoder.from_pretrained(bad)
    # Wrong input resolution.
    ours = CLIPVisionEncoder.from_pretrained(folder)
    with pytest.raises(ValueError, match="clip_preprocess"):
        ours(torch.zeros(1, 3, cfg.image_size + 14, cfg.image_size + 14))


def _reference_processor():
    # The PIL backend is transformers-4's CLIPImageProcessor (what diffusers/IP-Adapter used); in transformers 5
    # CLIPImageProcessor() is the torchvision backend when torchvision is installed, the PIL one otherwise.
    try:
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # transformers 4: the PIL processor is CLIPImageProcessor itself
        from transformers import CLIPImageProcessor as cls
    return cls()


PREPROCESS_ATOL = 1e-6  # same PIL bicubic resize and the same float64->float32 arithmetic: expected exact


@pytest.mark.parametrize("shape", [(224, 224), (300, 257), (180, 400), (231, 224)])
def test_preprocess_matches_clip_image_processor(shape):
    rng = np.random.default_rng(sum(shape))
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = _reference_processor()(images=img, return_tensors="pt")["pixel_values"]
    ours = clip_preprocess(img)
    assert ours.shape == expected.shape == (1, 3, 224, 224)
    assert ours.dtype == torch.float32
    assert (ours - expected).abs().max().item() <= PREPROCESS_ATOL


def test_preprocess_channel_order_batch_and_errors():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (224, 250, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (260, 224, 3), dtype=np.uint8)
    batch = clip_preprocess([a, b])
    assert batch.shape == (2, 3, 224, 224)
    assert torch.equal(batch[1:], clip_preprocess(b))
    # "bgr" reverses the channels before the (per-channel) normalisation.
    assert torch.equal(clip_preprocess(a[..., ::-1].copy(), channel_order="bgr"), clip_preprocess(a))
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        clip_preprocess(a.astype(np.float32))
    with pytest.raises(ValueError, match="uint8 H x W x 3"):
        clip_preprocess(a[..., :1])
    with pytest.raises(ValueError, match="channel_order"):
        clip_preprocess(a, channel_order="rbg")
    with pytest.raises(ValueError, match="no images"):
        clip_preprocess([])
    with pytest.raises(ValueError, match="crop_size 256 is larger"):
        clip_preprocess(a, crop_size=256)
