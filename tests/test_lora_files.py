"""LoRA files: fusing kohya (diffusers and LDM naming), diffusers and PEFT LoRA files equals diffusers/peft fusion.

Reference: diffusers 0.42 ``StableDiffusionXLLoraLoaderMixin.lora_state_dict`` + ``load_lora_into_unet`` (peft
layers), then ``UNet2DConditionModel.fuse_lora(lora_scale=s)``, on the tiny UNet config with the same random base
weights. Metric: relative max error max|ours - ref| / max|ref|; per fused weight <= 1e-6, UNet output <= 1e-5 (fp32).
"""

from __future__ import annotations

import copy
import json
import logging
import os

import pytest
import torch
from safetensors.torch import save_file
from tiny import diffusers_tiny_unet

from fastface.models.loading import WeightFormatError, assign_state_dict
from fastface.models.lora_files import fuse_lora, load_lora, parse_lora
from fastface.models.unet import UNet, get_unet_config
from fastface.models.unet_loading import ldm_key_map

import diffusers
import peft
from diffusers.loaders.lora_pipeline import StableDiffusionXLLoraLoaderMixin as SDXLLoRA  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WEIGHT_TOL = 1e-6
OUTPUT_TOL = 1e-5
TINY = get_unet_config("tiny")
RANK = 4
# every kind of layer the distilled releases target (attention, ff, proj, resnet convs, shortcut, time proj,
# down/upsamplers) plus the embeddings and in/out convs; value = alpha (!= rank)
TARGETS = {
    "conv_in": 2.0,
    "time_embedding.linear_1": 8.0,
    "down_blocks.0.resnets.0.conv1": 8.0,
    "down_blocks.0.resnets.1.time_emb_proj": 2.0,
    "down_blocks.0.downsamplers.0.conv": 8.0,
    "down_blocks.1.resnets.0.conv2": 8.0,
    "down_blocks.1.resnets.0.conv_shortcut": 3.0,
    "down_blocks.1.attentions.0.proj_in": 2.0,
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 2.0,
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k": 2.0,
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v": 2.0,
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": 2.0,
    "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k": 2.0,
    "down_blocks.1.attentions.1.transformer_blocks.1.ff.net.0.proj": 2.0,
    "down_blocks.1.attentions.1.transformer_blocks.1.ff.net.2": 2.0,
    "down_blocks.1.attentions.1.proj_out": 2.0,
    "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_v": 2.0,
    "mid_block.resnets.0.conv1": 8.0,
    "mid_block.attentions.0.transformer_blocks.5.attn1.to_out.0": 2.0,
    "mid_block.resnets.1.time_emb_proj": 2.0,
    "up_blocks.0.resnets.0.conv_shortcut": 3.0,
    "up_blocks.0.attentions.2.transformer_blocks.3.ff.net.2": 2.0,
    "up_blocks.0.upsamplers.0.conv": 8.0,
    "up_blocks.1.resnets.2.conv2": 8.0,
    "up_blocks.1.attentions.2.proj_in": 2.0,
    "up_blocks.1.upsamplers.0.conv": 8.0,
    "up_blocks.2.resnets.2.conv_shortcut": 3.0,
    "conv_out": 2.0,
}
LDM_ONLY = {"add_embedding.linear_1": 2.0}  # diffusers only maps the sgm name label_emb_0_0 for this one


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def weight_of(model: torch.nn.Module, name: str) -> torch.Tensor:
    module = model.get_submodule(name)
    return getattr(module, "base_layer", module).weight.detach()


@pytest.fixture(scope="module")
def ref_base():
    """diffusers' tiny UNet2DConditionModel with random weights (the shared base)."""
    return diffusers_tiny_unet()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    return dict(
        x=torch.randn(2, 4, 8, 8, generator=g),
        context=torch.randn(2, 5, TINY.context_dim, generator=g),
        text_embeds=torch.randn(2, TINY.pooled_dim, generator=g),
        time_ids=torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1024, 16, 32, 1024, 768]]),
    )


def make_ours(ref_base) -> UNet:
    with torch.device("meta"):
        model = UNet(TINY)
    sd = {k: v.detach().clone() for k, v in ref_base.state_dict().items()}
    return assign_state_dict(model, sd, source="<diffusers tiny>").eval()


def run_ours(model, inp):
    with torch.no_grad():
        return model(inp["x"], 500, inp["context"], inp["text_embeds"], inp["time_ids"])


def run_ref(model, inp):
    cond = {"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]}
    with torch.no_grad():
        return model(inp["x"], 500, inp["context"], added_cond_kwargs=cond).sample


@pytest.fixture(scope="module")
def factors(ref_base):
    """Random LoRA factors per target module: (down A [r, in, k, k], up B [out, r, 1, 1], alpha)."""
    g = torch.Generator().manual_seed(2)
    out = {}
    for i, (name, alpha) in enumerate({**TARGETS, **LDM_ONLY}.items()):
        w = weight_of(ref_base, name)
        rank = 2 if i % 7 == 3 else RANK  # a few layers of another rank
        ones = (1,) * (w.ndim - 2)
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.1
        up = torch.randn(w.shape[0], rank, *ones, generator=g) * 0.1
        out[name] = (down, up, alpha)
    return out


def kohya_sd(factors, names: dict[str, str]) -> dict[str, torch.Tensor]:
    sd = {}
    for module, stem in names.items():
        down, up, alpha = factors[module]
        key = "lora_unet_" + stem.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory, factors, ref_base):
    root = tmp_path_factory.mktemp("lora")
    files = {}
    # (a) kohya, diffusers names underscored (the LCM-LoRA layout)
    files["kohya_diffusers"] = root / "kohya_diffusers.safetensors"
    save_file(kohya_sd(factors, {n: n for n in TARGETS}), files["kohya_diffusers"])
    # (b) kohya, LDM/sgm names (kohya's SDXL trainer)
    ldm = ldm_key_map(TINY)
    ldm_names = {n: ldm[f"{n}.weight"][: -len(".weight")] for n in {**TARGETS, **LDM_ONLY}}
    files["kohya_ldm"] = root / "kohya_ldm.safetensors"
    save_file(kohya_sd(factors, ldm_names), files["kohya_ldm"])
    # (c) PEFT, written by diffusers' own saver (lora_A/lora_B keys, LoraConfig in the safetensors metadata)
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    ranks = {n: f[0].shape[0] for n, f in factors.items() if n in TARGETS}
    config = LoraConfig(
        r=RANK,
        lora_alpha=2.0,
        target_modules=list(TARGETS),
        rank_pattern={f"^{n}": r for n, r in ranks.items() if r != RANK},
        alpha_pattern={f"^{n}": a for n, a in TARGETS.items() if a != 2.0},
    )
    donor = copy.deepcopy(ref_base)
    donor.add_adapter(config)
    peft_sd = get_peft_model_state_dict(donor)
    for n in TARGETS:
        down, up, _ = factors[n]
        peft_sd[f"{n}.lora_A.weight"] = down.clone()
        peft_sd[f"{n}.lora_B.weight"] = up.clone()
    SDXLLoRA.save_lora_weights(
        root / "peft", unet_lora_layers=peft_sd, unet_lora_adapter_metadata=config.to_dict(), weight_name="peft.safetensors"
    )
    files["peft"] = root / "peft" / "peft.safetensors"
    return files


def ref_fused(ref_base, path, scale):
    model = copy.deepcopy(ref_base)
    sd, alphas, metadata = SDXLLoRA.lora_state_dict(str(path), unet_config=model.config, return_lora_metadata=True)
    SDXLLoRA.load_lora_into_unet(sd, alphas, model, metadata=metadata)
    model.fuse_lora(lora_scale=scale)
    return model


def check_fused(ours, ref, ref_base, names, inputs=None):
    errs = []
    for name in names:
        w_ref, w_base = weight_of(ref, name), weight_of(ref_base, name)
        assert rel_err(w_ref, w_base) > 1e-2, f"{name}: the reference did not fuse"
        errs.append(rel_err(weight_of(ours, name), w_ref))
    assert max(errs) <= WEIGHT_TOL, f"fused weight rel err {max(errs):.2e}"
    for name, module in ours.named_modules():  # untargeted weights are untouched
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name not in names:
            assert torch.equal(module.weight, weight_of(ref_base, name)), name
    if inputs is not None:
        err = rel_err(run_ours(ours, inputs), run_ref(ref, inputs))
        assert err <= OUTPUT_TOL, f"UNet output rel err {err:.2e}"


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("kind", ["kohya_diffusers", "kohya_ldm", "peft"])
def test_fusion_matches_diffusers(kind, scale, lora_files, ref_base, inputs):
    names = list(TARGETS) + (list(LDM_ONLY) if kind == "kohya_ldm" else [])
    ref = ref_fused(ref_base, lora_files[kind], scale)
    ours = make_ours(ref_base)
    report = fuse_lora(ours, lora_files[kind], scale=scale)
    assert sorted(report.fused) == sorted(names)
    assert report.formats == (("peft",) if kind == "peft" else ("kohya",))
    assert report.naming == (("ldm",) if kind == "kohya_ldm" else ("diffusers",))
    check_fused(ours, ref, ref_base, names, inputs)


def test_legacy_diffusers_formats_bin(tmp_path, factors, ref_base):
    """``unet.<m>.lora.down/up.weight`` and ``...attn1.processor.to_q_lora.down.weight`` (no alpha) in a .bin file."""
    sd = {}
    for name in TARGETS:
        down, up, _ = factors[name]
        if ".attn" in name:
            stem = name.replace(".attn1.", ".attn1.processor.").replace(".attn2.", ".attn2.processor.")
            stem = stem.replace(".to_out.0", ".to_out") + "_lora"
            sd[f"unet.{stem}.down.weight"], sd[f"unet.{stem}.up.weight"] = down, up
        else:
            sd[f"unet.{name}.lora.down.weight"], sd[f"unet.{name}.lora.up.weight"] = down, up
    path = tmp_path / "pytorch_lora_weights.bin"
    torch.save(sd, path)
    ref = copy.deepcopy(ref_base)
    SDXLLoRA.load_lora_into_unet(dict(sd), None, ref)
    ref.fuse_lora(lora_scale=0.75)
    ours = make_ours(ref_base)
    report = fuse_lora(ours, path, scale=0.75)
    assert set(report.formats) == {"diffusers", "diffusers-processor"}
    check_fused(ours, ref, ref_base, list(TARGETS))


def test_fp16_and_runtime_wrapper(lora_files, ref_base):
    """fp16 weights: the fp32 sum is rounded once; a runtime LoRALinear wrapper gets the fusion in its base layer."""
    from fastface.models.lora import LoRALinear

    ref = ref_fused(ref_base, lora_files["kohya_diffusers"], 1.0)
    ours = make_ours(ref_base).half()
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    attn = ours.get_submodule(name.rsplit(".", 1)[0])
    attn.to_q = LoRALinear.from_weights(attn.to_q, torch.zeros(2, 64), torch.zeros(64, 2))
    fuse_lora(ours, lora_files["kohya_diffusers"])
    for target in TARGETS:  # the reference is fused in fp32; fp16 storage allows one rounding (2^-11 relative)
        w = ours.get_submodule(target)
        w = getattr(w, "base", w).weight
        assert w.dtype == torch.float16 and rel_err(w, weight_of(ref, target)) <= 2**-10, target


@pytest.mark.parametrize("prefix", ["", "base_model.model."])
def test_peft_prefixes_and_adapter_config(prefix, tmp_path, factors, ref_base):
    """Bare PEFT keys with no metadata (alpha = rank), and ``base_model.model.`` keys with a sibling adapter_config.json
    (PEFT's save_pretrained layout). diffusers reference: ``load_lora_adapter(sd, prefix=None, metadata=...)``."""
    sd = {}
    for name in TARGETS:
        down, up, _ = factors[name]
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = down, up
    path = tmp_path / "adapter_model.safetensors"
    save_file({prefix + k: v for k, v in sd.items()}, path)
    metadata = None
    if prefix:
        ranks = {f"^{n}": f[0].shape[0] for n, f in factors.items() if n in TARGETS and f[0].shape[0] != RANK}
        metadata = {"r": RANK, "lora_alpha": 8.0, "rank_pattern": ranks, "target_modules": list(TARGETS)}
        (tmp_path / "adapter_config.json").write_text(json.dumps(metadata))
    ref = copy.deepcopy(ref_base)
    ref.load_lora_adapter(dict(sd), prefix=None, metadata=metadata)
    ref.fuse_lora(lora_scale=1.0)
    ours = make_ours(ref_base)
    fuse_lora(ours, path)
    check_fused(ours, ref, ref_base, list(TARGETS))


def test_text_encoder_layers(tmp_path, factors, ref_base, caplog):
    """lora_te1_/lora_te2_ keys are kept apart: an error by default, skipped with a warning on request."""
    sd = kohya_sd(factors, {n: n for n in list(TARGETS)[:3]})
    te = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": torch.randn(2, 8),
        "lora_te2_text_model_encoder_layers_1_mlp_fc1": torch.randn(2, 8),
    }
    for stem, down in te.items():
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = down, torch.randn(8, 2)
        sd[f"{stem}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "with_te.safetensors"
    save_file(sd, path)
    lora = load_lora(path)
    assert sorted(lora.text_encoder) == sorted(te) and len(lora.unet) == 3
    ours = make_ours(ref_base)
    before = weight_of(ours, "conv_in").clone()
    with pytest.raises(ValueError, match="text-encoder layer.*ignore_text_encoder=True"):
        fuse_lora(ours, lora)
    assert torch.equal(weight_of(ours, "conv_in"), before)
    with caplog.at_level(logging.WARNING, logger="fastface.models.lora_files"):
        report = fuse_lora(ours, lora, ignore_text_encoder=True)
    assert "ignoring 2 text-encoder" in caplog.text
    assert sorted(report.skipped_text_encoder) == sorted(te) and len(report.fused) == 3
    down, up, alpha = factors["conv_in"]
    expected = before + (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(before.shape)
    assert rel_err(weight_of(ours, "conv_in"), expected) <= WEIGHT_TOL


def test_locon_mid_and_rslora(factors):
    """LoCon (Tucker) lora_mid equals running down (1x1) -> mid (3x3) -> up (1x1) convs; rsLoRA factor alpha/sqrt(r)."""
    g = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1)
    down, mid, up = (torch.randn(s, generator=g) for s in [(3, 6, 1, 1), (3, 3, 3, 3), (5, 3, 1, 1)])
    sd = {"lora_unet_x.lora_down.weight": down, "lora_unet_x.lora_mid.weight": mid, "lora_unet_x.lora_up.weight": up}
    layer = parse_lora({**sd, "lora_unet_x.alpha": torch.tensor(6.0)}).unet["lora_unet_x"]
    x = torch.randn(2, 6, 7, 7, generator=g)
    fused = torch.nn.functional.conv2d(x, conv.weight.detach() + layer.delta(conv.weight.shape, 0.5), conv.bias, padding=1)
    chained = conv(x) + 0.5 * (6.0 / 3) * torch.nn.functional.conv2d(
        torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down), mid, padding=1), up
    )
    assert rel_err(fused, chained.detach()) <= 1e-5
    peft_sd = {"m.lora_A.weight": torch.randn(4, 8), "m.lora_B.weight": torch.randn(8, 4)}
    layer = parse_lora(peft_sd, peft_configs={"": {"lora_alpha": 8, "use_rslora": True}}).unet["m"]
    assert layer.factor == pytest.approx(8 / 2)


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_unknown_modules_are_listed(tmp_path, factors, ref_base):
    sd = kohya_sd(factors, {n: n for n in list(TARGETS)[:2]})
    for bad in ("lora_unet_down_blocks_3_attentions_0_proj_in", "lora_unet_input_blocks_11_1_proj_out"):
        sd[f"{bad}.lora_down.weight"], sd[f"{bad}.lora_up.weight"] = torch.randn(4, 8), torch.randn(8, 4)
    path = tmp_path / "sd15.safetensors"
    save_file(sd, path)
    ours = make_ours(ref_base)
    with pytest.raises(WeightFormatError) as info:
        fuse_lora(ours, path)
    msg = str(info.value)
    assert str(path) in msg and "2 LoRA layer(s) match no module" in msg
    assert "lora_unet_down_blocks_3_attentions_0_proj_in" in msg and "lora_unet_input_blocks_11_1_proj_out" in msg


def test_duplicate_layers(factors):
    names = {"conv_in": "conv_in"}
    sd = {**kohya_sd(factors, names), **kohya_sd(factors, {"conv_in": "input_blocks.0.0"})}
    with pytest.raises(WeightFormatError, match="'lora_unet_conv_in' and 'lora_unet_input_blocks_0_0' both target"):
        fuse_lora(UNet(TINY), parse_lora(sd, "dup.safetensors"))


def test_shape_mismatch_changes_nothing(tmp_path, factors, ref_base):
    sd = kohya_sd(factors, {n: n for n in TARGETS})
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight"
    sd[key] = torch.randn(RANK, 48)
    path = tmp_path / "bad_shape.safetensors"
    save_file(sd, path)
    ours = make_ours(ref_base)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(WeightFormatError, match=rf"{key}.*expected \(4, 64\), found \(4, 48\)"):
        fuse_lora(ours, path)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


def test_bad_files(tmp_path):
    good = {"lora_unet_conv_in.lora_down.weight": torch.randn(4, 4, 3, 3), "lora_unet_conv_in.lora_up.weight": torch.randn(32, 4, 1, 1)}
    path = tmp_path / "lora.safetensors"
    save_file(good, path)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:200])
    with pytest.raises(WeightFormatError, match="damaged.safetensors.*truncated"):
        load_lora(damaged)
    with pytest.raises(WeightFormatError, match="no such file"):
        load_lora(tmp_path / "missing.safetensors")
    with pytest.raises(WeightFormatError, match=r"1 key\(s\) in no known LoRA format: conv_in.weight"):
        parse_lora({**good, "conv_in.weight": torch.randn(2)})
    with pytest.raises(WeightFormatError, match="incomplete LoRA layer 'lora_unet_conv_in'.*lora_down"):
        parse_lora({"lora_unet_conv_in.lora_down.weight": good["lora_unet_conv_in.lora_down.weight"]})
    with pytest.raises(WeightFormatError, match="DoRA"):
        parse_lora({**good, "lora_unet_conv_in.dora_scale": torch.ones(32, 1, 1, 1)})
    with pytest.raises(WeightFormatError, match="alpha.*scalar"):
        parse_lora({**good, "lora_unet_conv_in.alpha": torch.ones(2)})
