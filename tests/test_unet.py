"""SDXL UNet: parity with diffusers' UNet2DConditionModel on the tiny config, loading formats, errors, identity slot.

Metric for parity: relative max error  max|ours - ref| / max|ref|  over the whole output.
fp32 tolerance 1e-5; bf16 tolerances are stated at the test.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from tiny import diffusers_tiny_unet

import fastface
from fastface.models.attention import IdentityAttention, attention, split_heads
from fastface.models.loading import WeightFormatError
from fastface.models.unet import UNET_CONFIGS, UNet, UNetConfig, get_unet_config
from fastface.models.unet_loading import (
    config_from_diffusers,
    diffusers_to_ldm,
    infer_unet_config,
    infer_unet_config_ldm,
    load_unet,
)

import diffusers
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FP32_TOL = 1e-5
TINY = get_unet_config("tiny")
B = 2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def unet_ref():
    """diffusers' UNet2DConditionModel with the tiny config and random weights (noise on every parameter)."""
    return diffusers_tiny_unet()


@pytest.fixture(scope="module")
def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return dict(
        x=torch.randn(B, 4, 8, 8, generator=g),
        context=torch.randn(B, 7, TINY.context_dim, generator=g),
        text_embeds=torch.randn(B, TINY.pooled_dim, generator=g),
        time_ids=torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1024, 16, 32, 1024, 768]]),
    )


def run_ours(model, inp, t, **kw):
    with torch.no_grad():
        return model(inp["x"].to(kw.pop("dtype", torch.float32)), t, inp["context"], inp["text_embeds"], inp["time_ids"], **kw)


def run_ref(model, inp, t, dtype=torch.float32, **kw):
    with torch.no_grad():
        cond = {"text_embeds": inp["text_embeds"].to(dtype), "time_ids": inp["time_ids"].to(dtype)}
        return model(inp["x"].to(dtype), t, inp["context"].to(dtype), added_cond_kwargs=cond, **kw).sample


@pytest.fixture(scope="module")
def ref_out(unet_ref, unet_inputs):
    return run_ref(unet_ref, unet_inputs, 500)


@pytest.fixture(scope="module")
def unet_files(unet_ref, tmp_path_factory):
    """The tiny reference weights written in every supported layout."""
    root = tmp_path_factory.mktemp("unet")
    unet_ref.save_pretrained(root / "pipe" / "unet")
    copy.deepcopy(unet_ref).half().save_pretrained(root / "fp16", variant="fp16")
    unet_ref.save_pretrained(root / "sharded", max_shard_size="300KB")
    sd = {k: v.contiguous() for k, v in unet_ref.state_dict().items()}
    save_file(sd, root / "bare.safetensors")
    ldm = diffusers_to_ldm(sd, TINY)
    extra = {"conditioner.embedders.0.transformer.x.weight": torch.zeros(3), "first_stage_model.decoder.conv_in.bias": torch.ones(2)}
    save_file({"model.diffusion_model." + k: v for k, v in ldm.items()} | extra, root / "single.safetensors")
    save_file(ldm, root / "comfy_unet.safetensors")
    return root


# ---------------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("where", ["pipe", "pipe/unet", "sharded"])
def test_diffusers_folder_parity(unet_files, unet_inputs, ref_out, unet_ref, where):
    if where == "sharded":
        assert len(list((unet_files / "sharded").glob("*.safetensors"))) > 1
    ours = load_unet(unet_files / where)
    assert ours.config == TINY
    out = run_ours(ours, unet_inputs, 500)
    assert rel_err(out, ref_out) <= FP32_TOL
    # per-sample timesteps
    t = torch.tensor([3, 951])
    assert rel_err(run_ours(ours, unet_inputs, t), run_ref(unet_ref, unet_inputs, t)) <= FP32_TOL


def test_fp16_variant(unet_files, unet_inputs, unet_ref):
    half = load_unet(unet_files / "fp16", dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in half.parameters())
    ref_sd = unet_ref.state_dict()
    assert all(torch.equal(v, ref_sd[k].half()) for k, v in half.state_dict().items())
    # fp32 compute on the fp16-rounded weights equals diffusers on the same rounded weights
    ours = load_unet(unet_files / "fp16", dtype=torch.float32)
    ref = copy.deepcopy(unet_ref).half().float()
    assert rel_err(run_ours(ours, unet_inputs, 250), run_ref(ref, unet_inputs, 250)) <= FP32_TOL


def test_single_file_ldm(unet_files, unet_inputs, ref_out, unet_ref):
    # diffusers' own converter reads our LDM file back to exactly the reference weights: an independent check of the map
    conv = diffusers.UNet2DConditionModel.from_single_file(
        str(unet_files / "single.safetensors"), config=str(unet_files / "pipe"), subfolder="unet"
    )
    ref_sd = unet_ref.state_dict()
    assert set(conv.state_dict()) == set(ref_sd)
    assert all(torch.equal(v, ref_sd[k]) for k, v in conv.state_dict().items())
    for name in ("single.safetensors", "comfy_unet.safetensors"):
        ours = load_unet(unet_files / name, config="tiny")
        assert rel_err(run_ours(ours, unet_inputs, 500), ref_out) <= FP32_TOL


def test_bare_diffusers_file(unet_files, unet_inputs, ref_out):
    for config in ("tiny", TINY):
        ours = load_unet(unet_files / "bare.safetensors", config=config)
        assert rel_err(run_ours(ours, unet_inputs, 500), ref_out) <= FP32_TOL
    # tiny widths cannot be inferred (SDXL's 6x256 time-id split and 64-wide heads are assumed): clear error
    with pytest.raises(WeightFormatError, match="bare.safetensors.*pass config="):
        load_unet(unet_files / "bare.safetensors")


def test_bf16_parity(unet_ref, unet_inputs, ref_out):
    ours = UNet(TINY)
    ours.load_state_dict(unet_ref.state_dict())
    ours = ours.to(torch.bfloat16)
    ref16 = copy.deepcopy(unet_ref).to(torch.bfloat16)
    inp = {k: v.to(torch.bfloat16) for k, v in unet_inputs.items()}
    out = run_ours(ours, inp, 500, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    # same bf16 ops as diffusers (bit-identical on CPU, tolerance 1e-2); vs fp32 within 1e-1 (diffusers bf16: 3.8e-2)
    assert rel_err(out, run_ref(ref16, unet_inputs, 500, dtype=torch.bfloat16)) <= 1e-2
    assert rel_err(out, ref_out) <= 1e-1


def test_lcm_time_cond_proj(tmp_path, unet_inputs):
    cfg = TINY.replace(time_cond_proj_dim=16)
    torch.manual_seed(3)
    ref = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.to_diffusers_config().items() if k != "_class_name"})
    ref.save_pretrained(tmp_path / "lcm")
    ours = load_unet(tmp_path / "lcm")
    assert ours.config.time_cond_proj_dim == 16
    w = torch.randn(B, 16)
    out = run_ours(ours, unet_inputs, 700, timestep_cond=w)
    assert rel_err(out, run_ref(ref.eval(), unet_inputs, 700, timestep_cond=w)) <= FP32_TOL
    assert not torch.equal(out, run_ours(ours, unet_inputs, 700))


def test_odd_latent_size(unet_ref, unet_inputs):
    ours = UNet(TINY)
    ours.load_state_dict(unet_ref.state_dict())
    inp = dict(unet_inputs, x=torch.randn(B, 4, 9, 6))
    out = run_ours(ours, inp, 100)
    assert out.shape == (B, 4, 9, 6)
    assert rel_err(out, run_ref(unet_ref, inp, 100)) <= FP32_TOL


# ---------------------------------------------------------------------------------------------------- configs


SDXL_DIFFUSERS_CONFIG = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
    "cross_attention_norm": None, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None,
    "time_embedding_dim": None, "time_embedding_type": "positional", "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True,
}


def test_sdxl_config_from_diffusers_and_shapes():
    sdxl = get_unet_config("sdxl")
    assert config_from_diffusers(SDXL_DIFFUSERS_CONFIG) == sdxl
    assert UNetConfig.from_diffusers_config(sdxl.to_diffusers_config()) == sdxl
    assert UNetConfig.from_diffusers_config(TINY.to_diffusers_config()) == TINY
    with torch.device("meta"):
        ours = UNet(sdxl)
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in SDXL_DIFFUSERS_CONFIG.items() if k != "_class_name"})
    sd = ours.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in sd.values()) == 2_567_463_684  # SDXL base UNet parameter count
    # config inference from shapes alone (meta tensors), diffusers- and LDM-keyed
    assert infer_unet_config(sd) == sdxl
    ldm = diffusers_to_ldm(sd, sdxl)
    assert infer_unet_config_ldm(ldm) == sdxl
    # spot checks against the reference table (sdxl-formats-samplers.md 1.2)
    assert ldm["input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"].shape == (1280, 2048)
    for key in ("input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight", "output_blocks.2.2.conv.bias",
                "output_blocks.5.2.conv.weight", "middle_block.2.out_layers.3.weight", "label_emb.0.2.bias",
                "time_embed.0.weight", "out.2.weight", "output_blocks.8.0.emb_layers.1.weight", "input_blocks.0.0.bias"):
        assert key in ldm, key
    assert not any(k.startswith(("input_blocks.9", "output_blocks.8.1", "output_blocks.8.2")) for k in ldm)


@pytest.mark.parametrize(
    "change",
    [
        {  # SD 1.5
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "block_out_channels": [320, 640, 1280, 1280], "addition_embed_type": None, "use_linear_projection": False,
        },
        {  # SDXL refiner
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [384, 768, 1536, 1536], "projection_class_embeddings_input_dim": 2560,
        },
        {"use_linear_projection": False},
        {"addition_embed_type": None},
        {"resnet_time_scale_shift": "scale_shift"},
        {"_class_name": "UNet2DModel"},
    ],
)
def test_not_sdxl_config(change):
    with pytest.raises(ValueError, match="not an SDXL UNet layout"):
        config_from_diffusers(SDXL_DIFFUSERS_CONFIG | change)


def test_unknown_config_name():
    with pytest.raises(ValueError, match="unknown UNet config 'sd15'"):
        get_unet_config("sd15")
    assert set(UNET_CONFIGS) >= {"sdxl", "tiny"}


# ---------------------------------------------------------------------------------------------------- errors


def test_error_missing_path(tmp_path):
    with pytest.raises(WeightFormatError, match="nothing_here.*no such file"):
        fastface.load_unet(tmp_path / "nothing_here")


def test_error_not_safetensors_and_truncated(tmp_path, unet_files):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(WeightFormatError, match="garbage.safetensors.*not a readable safetensors"):
        load_unet(bad, config="tiny")
    data = (unet_files / "bare.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFormatError, match="cut.safetensors.*truncated"):
        load_unet(cut, config="tiny")


def test_error_missing_and_unexpected_keys(tmp_path, unet_ref):
    sd = {k: v.contiguous() for k, v in unet_ref.state_dict().items()}
    del sd["mid_block.resnets.1.conv2.bias"]
    sd["down_blocks.0.extra.weight"] = torch.zeros(1)
    save_file(sd, tmp_path / "keys.safetensors")
    with pytest.raises(WeightFormatError, match=r"keys.safetensors.*missing key\(s\): mid_block.resnets.1.conv2.bias.*"
                       r"unexpected key\(s\): down_blocks.0.extra.weight"):
        load_unet(tmp_path / "keys.safetensors", config="tiny")
    # the same in an LDM file: the error lists the file's own (LDM) names
    ldm = diffusers_to_ldm({k: v for k, v in unet_ref.state_dict().items()}, TINY)
    del ldm["middle_block.2.out_layers.3.bias"]
    ldm["input_blocks.1.0.bogus.weight"] = torch.zeros(1)
    save_file({"model.diffusion_model." + k: v.contiguous() for k, v in ldm.items()}, tmp_path / "ldm.safetensors")
    with pytest.raises(WeightFormatError, match=r"ldm.safetensors.*missing key\(s\): middle_block.2.out_layers.3.bias.*"
                       r"unexpected key\(s\): input_blocks.1.0.bogus.weight"):
        load_unet(tmp_path / "ldm.safetensors", config="tiny")


def test_error_shape_mismatch(tmp_path, unet_ref):
    sd = {k: v.contiguous() for k, v in unet_ref.state_dict().items()}
    sd["up_blocks.1.attentions.2.proj_out.weight"] = torch.zeros(64, 32)
    save_file(sd, tmp_path / "shape.safetensors")
    with pytest.raises(WeightFormatError, match=r"shape.safetensors.*'up_blocks.1.attentions.2.proj_out.weight'.*"
                       r"expects \(64, 64\).*has \(64, 32\)"):
        load_unet(tmp_path / "shape.safetensors", config="tiny")


def test_error_not_sdxl(tmp_path, unet_ref, unet_files):
    # a folder whose config.json is SD1.5
    folder = tmp_path / "sd15" / "unet"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(SDXL_DIFFUSERS_CONFIG | {
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "block_out_channels": [320, 640, 1280, 1280]}))
    with pytest.raises(WeightFormatError, match=r"config.json: not an SDXL UNet layout"):
        load_unet(tmp_path / "sd15")
    # weights without the text-time embedding (SD1.x/2.x style), diffusers-keyed and LDM-keyed
    sd = {k: v.contiguous() for k, v in unet_ref.state_dict().items() if not k.startswith("add_embedding.")}
    save_file(sd, tmp_path / "sd15.safetensors")
    with pytest.raises(WeightFormatError, match=r"sd15.safetensors: not an SDXL UNet layout"):
        load_unet(tmp_path / "sd15.safetensors")
    ldm = {k: v for k, v in diffusers_to_ldm(unet_ref.state_dict(), TINY).items() if not k.startswith("label_emb")}
    save_file({k: v.contiguous() for k, v in ldm.items()}, tmp_path / "sd15_ldm.safetensors")
    with pytest.raises(WeightFormatError, match=r"sd15_ldm.safetensors: not an SDXL UNet layout"):
        load_unet(tmp_path / "sd15_ldm.safetensors")
    # a config that is not SDXL's layout, given explicitly
    with pytest.raises(WeightFormatError, match=r"bare.safetensors: not an SDXL UNet layout"):
        load_unet(unet_files / "bare.safetensors", config=TINY.replace(depth=(1, 2, 10)))
    # a file holding no UNet at all
    save_file({"text_model.embeddings.weight": torch.zeros(2)}, tmp_path / "te.safetensors")
    with pytest.raises(WeightFormatError, match=r"te.safetensors: no UNet weights found"):
        load_unet(tmp_path / "te.safetensors")


def test_error_missing_conditioning(unet_ref, unet_inputs):
    ours = UNet(TINY)
    ours.load_state_dict(unet_ref.state_dict())
    with pytest.raises(ValueError, match="text_embeds"):
        ours(unet_inputs["x"], 1, unet_inputs["context"])


# ---------------------------------------------------------------------------------------------------- attention slots


def test_attention_layer_order(unet_ref):
    ours = UNet(TINY)
    names = [n for n, _ in ours.attention_layers()]
    assert len(names) == 140
    assert names == [k.removesuffix(".processor") for k in unet_ref.attn_processors]
    assert all(n.endswith("attn2") == (i % 2 == 1) for i, n in enumerate(names))
    modules = dict(ours.named_modules())
    assert all(modules[n] is m for n, m in ours.attention_layers())
    cross = ours.cross_attention_layers()
    assert [n for n, _ in cross] == names[1::2] and len(cross) == 70
    assert all(m.ip is None for _, m in ours.attention_layers())
    # registration order: down, up, mid
    assert [n for n, _ in ours.named_children() if n.endswith(("blocks", "block"))] == ["down_blocks", "up_blocks", "mid_block"]


def _install_ip(model: UNet, seed: int = 5) -> None:
    torch.manual_seed(seed)
    for _, attn in model.cross_attention_layers():
        attn.ip = IdentityAttention(attn.to_q.in_features, TINY.context_dim, attn.heads, attn.head_dim)


def test_identity_slot_zero_scale_and_removal(unet_ref, unet_inputs):
    ours = UNet(TINY)
    ours.load_state_dict(unet_ref.state_dict())
    base = run_ours(ours, unet_inputs, 400)
    tokens = torch.randn(B, 4, TINY.context_dim)
    _install_ip(ours)
    assert torch.equal(run_ours(ours, unet_inputs, 400, id_tokens=tokens, id_scale=0.0), base)
    assert torch.equal(run_ours(ours, unet_inputs, 400, id_tokens=tokens, id_scale=torch.zeros(B)), base)
    assert torch.equal(run_ours(ours, unet_inputs, 400), base)  # installed but no tokens
    with_id = run_ours(ours, unet_inputs, 400, id_tokens=tokens, id_scale=torch.tensor([0.0, 1.0]))
    assert torch.equal(with_id[0], base[0]) and not torch.allclose(with_id[1], base[1])
    for _, attn in ours.cross_attention_layers():
        attn.ip = None
    assert torch.equal(run_ours(ours, unet_inputs, 400), base)


def test_identity_attention_math_and_hooks():
    torch.manual_seed(7)
    ip = IdentityAttention(dim=32, context_dim=24, heads=2, head_dim=16)
    q = torch.randn(3, 2, 10, 16)
    o_txt = torch.randn(3, 2, 10, 16)
    tokens = torch.randn(3, 4, 24)
    scale = torch.tensor([0.5, 1.0, 2.0])
    k, v = split_heads(ip.to_k_ip(tokens), 2), split_heads(ip.to_v_ip(tokens), 2)
    want = o_txt + scale.view(-1, 1, 1, 1) * attention(q, k, v)  # SDPA as the independent reference
    assert rel_err(ip(q, o_txt, tokens, scale), want) <= FP32_TOL
    seen = {}

    def zero_map(module, inputs, out):
        seen["map"] = inputs[0].shape
        return torch.zeros_like(out)

    handle = ip.probs.register_forward_hook(zero_map)
    assert torch.equal(ip(q, o_txt, tokens, scale), o_txt)
    assert seen["map"] == (3, 2, 10, 4)
    handle.remove()
    assert rel_err(ip(q, o_txt, tokens, scale), want) <= FP32_TOL


def test_public_exports():
    assert fastface.load_unet is load_unet
    assert fastface.UNet is UNet and fastface.UNetConfig is UNetConfig


def test_fp16_file_to_fp16_model_is_not_copied(unet_files, monkeypatch):
    """An fp16 file loaded as fp16: the parameters are the very tensors read from the file (no copy, no fp32)."""
    import fastface.models.unet_loading as ul

    read = {}
    real = ul.read_weight_files

    def spy(files):
        read.update(real(files))
        return read

    monkeypatch.setattr(ul, "read_weight_files", spy)
    model = load_unet(unet_files / "fp16", dtype=torch.float16)
    params = dict(model.named_parameters())
    assert len(read) == len(params)
    assert all(params[k].data_ptr() == v.data_ptr() and v.dtype == torch.float16 for k, v in read.items())
