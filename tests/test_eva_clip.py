"""EVA02-CLIP vision tower vs timm's EVA02 (``eva02_large_patch14_clip_336`` hyperparameters, tiny widths).

timm converts the same EVA-CLIP checkpoints with its own ``checkpoint_filter_fn`` (key mapping: ``visual.`` prefix
dropped, ``mlp.w1/w2/w3/ffn_ln`` -> ``fc1_g/fc1_x/fc2/norm``, ``attn.inner_attn_ln`` -> ``attn.norm``, ``q_bias`` /
``v_bias`` -> ``q_proj.bias`` / ``v_proj.bias``, RoPE buffers dropped). The test saves random weights in the original
EVA-CLIP layout, loads them into ours with ``from_pretrained`` and into timm through that filter, and compares the
CLS projection and the kept residual streams. timm's RoPE is built independently (``RotaryEmbeddingCat`` with
``ref_feat_shape``), so agreement checks our RoPE layout (interleaved pairs, row ‖ column angles, positions
``arange(G)/G·G_pt``) and that the CLS token is not rotated. Tolerance: fp32, 1e-5 relative (max |a-b| / max |b|).

timm imports torchvision at import time, which cannot be installed next to this torch build; a minimal fake
``torchvision`` (only the names timm touches while importing) is put in ``sys.modules`` for the duration of the
import. None of its names is used by the EVA model code.
"""

from __future__ import annotations

import enum
import sys
import types

import pytest
import torch
from torch import nn

from fastface.models.eva_clip import (
    EVAVisionTower,
    apply_rope,
    eva_preprocess,
    get_eva_vision_config,
    rope_tables,
)
from fastface.models.loading import WeightFormatError

REL_TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _fake_torchvision() -> dict[str, types.ModuleType]:
    tv = types.ModuleType("torchvision")
    tv.__path__ = []
    ops = types.ModuleType("torchvision.ops")
    ops.__path__ = []
    misc = types.ModuleType("torchvision.ops.misc")

    class FrozenBatchNorm2d(nn.Module):  # only referenced, never built, by timm's EVA
        def __init__(self, *args, **kwargs):
            raise RuntimeError("fake torchvision: FrozenBatchNorm2d is not available in tests")

    misc.FrozenBatchNorm2d = FrozenBatchNorm2d
    tr = types.ModuleType("torchvision.transforms")
    tr.__path__ = []
    fn = types.ModuleType("torchvision.transforms.functional")

    class InterpolationMode(enum.Enum):
        NEAREST = "nearest"
        NEAREST_EXACT = "nearest-exact"
        BILINEAR = "bilinear"
        BICUBIC = "bicubic"
        BOX = "box"
        HAMMING = "hamming"
        LANCZOS = "lanczos"

    fn.InterpolationMode = tr.InterpolationMode = InterpolationMode
    tr.ToTensor = type("ToTensor", (), {})  # a base class in timm.data.transforms
    tr.functional = fn
    ds = types.ModuleType("torchvision.datasets")
    for name in ("CIFAR100", "CIFAR10", "MNIST", "KMNIST", "FashionMNIST", "ImageFolder"):
        setattr(ds, name, type(name, (), {}))
    tv.ops, ops.misc, tv.transforms, tv.datasets = ops, misc, tr, ds
    return {m.__name__: m for m in (tv, ops, misc, tr, fn, ds)}


@pytest.fixture(scope="module")
def timm_eva():
    """timm's ``Eva`` class and ``checkpoint_filter_fn``, imported with a fake torchvision."""
    try:
        import timm  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name == "timm":
            pytest.fail("timm is missing: run the README test command (pip install --no-deps timm==1.0.31 facexlib==0.3.0)")
        fakes = _fake_torchvision()
        saved = {k: sys.modules.get(k) for k in fakes}
        sys.modules.update(fakes)
        try:
            for k in [k for k in sys.modules if k == "timm" or k.startswith("timm.")]:
                del sys.modules[k]  # drop the half-imported package
            import timm.models.eva as eva
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
    else:
        import timm.models.eva as eva
    return eva


def make_eva_clip_state_dict(cfg, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights with the EVA-CLIP ``visual.*`` key names (plus a text key and RoPE buffers, as the file has)."""

    def r(*shape, std=None):
        return torch.randn(*shape, generator=gen) * (std if std is not None else shape[-1] ** -0.5)

    d, m = cfg.width, cfg.mlp_hidden
    sd = {
        "visual.patch_embed.proj.weight": r(d, 3, cfg.patch_size, cfg.patch_size, std=0.05),
        "visual.patch_embed.proj.bias": r(d, std=0.1),
        "visual.cls_token": r(1, 1, d, std=0.5),
        "visual.pos_embed": r(1, cfg.num_tokens, d, std=0.5),
        "visual.norm.weight": 1 + r(d, std=0.1),
        "visual.norm.bias": r(d, std=0.1),
        "visual.head.weight": r(cfg.embed_dim, d),
        "visual.head.bias": r(cfg.embed_dim, std=0.1),
        "text.token_embedding.weight": r(10, d),
        "logit_scale": torch.tensor(4.6),
    }
    cos, sin = rope_tables(cfg.head_dim, cfg.grid, cfg.rope_pt_grid)
    sd["visual.rope.freqs_cos"], sd["visual.rope.freqs_sin"] = cos, sin
    for i in range(cfg.layers):
        p = f"visual.blocks.{i}."
        sd |= {
            p + "norm1.weight": 1 + r(d, std=0.1), p + "norm1.bias": r(d, std=0.1),
            p + "norm2.weight": 1 + r(d, std=0.1), p + "norm2.bias": r(d, std=0.1),
            p + "attn.q_proj.weight": r(d, d), p + "attn.k_proj.weight": r(d, d), p + "attn.v_proj.weight": r(d, d),
            p + "attn.q_bias": r(d, std=0.1), p + "attn.v_bias": r(d, std=0.1),
            p + "attn.inner_attn_ln.weight": 1 + r(d, std=0.1), p + "attn.inner_attn_ln.bias": r(d, std=0.1),
            p + "attn.proj.weight": r(d, d), p + "attn.proj.bias": r(d, std=0.1),
            p + "attn.rope.freqs_cos": cos, p + "attn.rope.freqs_sin": sin,
            p + "mlp.w1.weight": r(m, d), p + "mlp.w1.bias": r(m, std=0.1),
            p + "mlp.w2.weight": r(m, d), p + "mlp.w2.bias": r(m, std=0.1),
            p + "mlp.ffn_ln.weight": 1 + r(m, std=0.1), p + "mlp.ffn_ln.bias": r(m, std=0.1),
            p + "mlp.w3.weight": r(d, m), p + "mlp.w3.bias": r(d, std=0.1),
        }  # fmt: skip
    return sd


def build_timm(eva, cfg, sd):
    """timm's Eva with eva02_large_patch14_clip_336's arguments at the tiny config's widths."""
    model = eva.Eva(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.layers,
        num_heads=cfg.heads, mlp_ratio=cfg.mlp_hidden / cfg.width + 1e-6, qkv_fused=False, swiglu_mlp=True,
        scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True,
        ref_feat_shape=(cfg.rope_pt_grid, cfg.rope_pt_grid), global_pool="token", num_classes=cfg.embed_dim,
    )  # fmt: skip
    model.load_state_dict(eva.checkpoint_filter_fn(sd, model), strict=True)
    return model.eval()


def timm_forward(model, x, hidden_layers):
    h = model.patch_embed(x)
    h, rope = model._pos_embed(h)
    kept = []
    for i, blk in enumerate(model.blocks):
        h = blk(h, rope=rope)
        if i + 1 in hidden_layers:
            kept.append(h)
    return model.forward_head(model.norm(h)), kept


@pytest.fixture(scope="module")
def tiny_pair(timm_eva, tmp_path_factory):
    cfg = get_eva_vision_config("tiny")
    sd = make_eva_clip_state_dict(cfg, torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("eva") / "EVA02_CLIP_tiny.pt"
    torch.save(sd, path)
    ours = EVAVisionTower.from_pretrained(path, config="tiny")
    ref = build_timm(timm_eva, cfg, sd)
    assert int(ref.blocks[0].mlp.fc1_g.out_features) == cfg.mlp_hidden
    return cfg, ours, ref


def test_matches_timm(tiny_pair):
    cfg, ours, ref = tiny_pair
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = ours(x)
        embeds, hidden = timm_forward(ref, x, cfg.hidden_layers)
    assert len(out.hidden_states) == len(hidden) == 5
    for a, b in zip(out.hidden_states, hidden):
        assert a.shape == (2, cfg.num_tokens, cfg.width)
        assert rel_err(a, b) < REL_TOL
    assert rel_err(out.image_embeds, embeds) < REL_TOL
    normed = out.normed_embeds
    assert torch.allclose(normed.norm(dim=1), torch.ones(2), atol=1e-6)


def test_rope_matters_and_cls_is_not_rotated(tiny_pair):
    """A wrong RoPE layout would be caught: permuting the table rows breaks agreement with timm."""
    cfg, ours, ref = tiny_pair
    x = torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        good = ours(x).image_embeds
        cos, sin = ours.rope_cos.clone(), ours.rope_sin.clone()
        g = cfg.grid
        perm = torch.arange(g * g).view(g, g).t().reshape(-1)  # row/column swapped
        ours.rope_cos, ours.rope_sin = cos[perm], sin[perm]
        swapped = ours(x).image_embeds
        ours.rope_cos, ours.rope_sin = cos, sin
    assert rel_err(swapped, good) > 1e-3
    # CLS untouched: rotating a vector with zero angles is the identity
    v = torch.randn(3, cfg.head_dim)
    assert torch.equal(apply_rope(v, torch.ones(cfg.head_dim), torch.zeros(cfg.head_dim)), v)


def test_real_rope_table_shape():
    cos, sin = rope_tables(64, 24, 16)
    assert cos.shape == sin.shape == (576, 64)
    # token (0, 0) has angle 0 everywhere; token (0, 1) rotates only the column half
    assert torch.equal(cos[0], torch.ones(64))
    assert torch.equal(cos[1, :32], torch.ones(32)) and not torch.equal(cos[1, 32:], torch.ones(32))


def test_full_size_shapes_on_meta():
    with torch.device("meta"):
        model = EVAVisionTower("eva02-l-14-336")
    n = sum(p.numel() for p in model.parameters())
    assert model.pos_embed.shape == (1, 577, 1024) and model.blocks[0].mlp.w1.weight.shape == (2730, 1024)
    assert 303_000_000 < n < 305_000_000  # EVA02-L visual: ~304M parameters


def test_preprocess_resize():
    img = torch.rand(1, 3, 64, 64)
    out = eva_preprocess(img, 56)
    ref = torch.nn.functional.interpolate(img, size=(56, 56), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    assert torch.allclose(out, (ref - mean) / std, atol=1e-6)
    with pytest.raises(ValueError, match="RGB"):
        eva_preprocess(torch.rand(3, 64, 64))


def test_errors(tmp_path, tiny_pair):
    cfg, ours, _ = tiny_pair
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, 3, 56, 56\]"):
        ours(torch.rand(1, 3, 64, 64))
    bad = tmp_path / "clip.safetensors"
    from safetensors.torch import save_file

    save_file({"vision_model.embeddings.class_embedding": torch.zeros(4)}, bad)
    with pytest.raises(WeightFormatError, match="transformers CLIP"):
        EVAVisionTower.from_pretrained(bad, config="tiny")
    sd = make_eva_clip_state_dict(cfg, torch.Generator().manual_seed(0))
    sd["visual.blocks.0.attn.q_bias"] = torch.zeros(cfg.width + 1)
    with pytest.raises(WeightFormatError, match="shape mismatch"):
        EVAVisionTower.from_state_dict(sd, config="tiny")
    with pytest.raises(ValueError, match="unknown EVA vision config"):
        EVAVisionTower("nope")


def test_real_rope_tables_match_timm(timm_eva):
    """EVA02-L-14-336's tables (24x24 grid, pre-training grid 16) equal timm's RotaryEmbeddingCat embedding."""
    model = timm_eva.Eva(
        img_size=336, patch_size=14, embed_dim=1024, depth=1, num_heads=16, mlp_ratio=4 * 2 / 3, qkv_fused=False,
        swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16),
        global_pool="token", num_classes=0,
    )  # fmt: skip
    sin_cos = model.rope.get_embed()  # [576, 2 * 64]: sin ‖ cos
    cos, sin = rope_tables(64, 24, 16)
    assert (sin_cos[:, :64] - sin).abs().max() < 1e-6 and (sin_cos[:, 64:] - cos).abs().max() < 1e-6
