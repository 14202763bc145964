"""Framework-agnostic, proven: the same fastface hooks on diffusers' UNet2DConditionModel give our UNet's results."""

from __future__ import annotations

import pytest
import torch

import fastface
from fastface.integrations import DIFFUSERS_ID_SPEC, install_diffusers_identity
from fastface.models.attention import IdentityAttention
from fastface.models.unet import UNet, get_unet_config

TS = [999.0, 749.0, 499.0, 249.0]
TOL = 1e-5  # max|a-b| / max|b|, fp32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def pair():
    from diffusers import UNet2DConditionModel

    cfg = get_unet_config("tiny")
    torch.manual_seed(0)
    ref = UNet2DConditionModel.from_config(cfg.to_diffusers_config()).eval()
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    g = torch.Generator().manual_seed(1)
    weights = {}
    for i, (name, attn) in enumerate(ours.attention_layers()):
        if not name.endswith("attn2"):
            continue
        dim = attn.heads * attn.head_dim
        k = torch.randn(dim, cfg.context_dim, generator=g) * 0.3
        v = torch.randn(dim, cfg.context_dim, generator=g) * 0.3
        attn.ip = IdentityAttention(dim, cfg.context_dim, attn.heads, attn.head_dim)
        attn.ip.to_k_ip.weight.data.copy_(k)
        attn.ip.to_v_ip.weight.data.copy_(v)
        weights[i] = (k, v)
    replaced = install_diffusers_identity(ref, weights)
    assert len(replaced) == 70
    return cfg, ours, ref


def _inputs(cfg, b: int = 2):
    g = torch.Generator().manual_seed(2)
    return dict(
        x=torch.randn(b, 4, 8, 8, generator=g),
        context=torch.randn(b, 77, cfg.context_dim, generator=g),
        text_embeds=torch.randn(b, cfg.pooled_dim, generator=g),
        time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]]).repeat(b, 1),
        id_tokens=torch.randn(b, 4, cfg.context_dim, generator=g),
        id_scale=torch.tensor([0.8, 0.5])[:b],
    )


def _ours(unet, inp, t):
    with torch.no_grad():
        return unet(inp["x"], torch.tensor(t), inp["context"], text_embeds=inp["text_embeds"],
                    time_ids=inp["time_ids"], id_tokens=inp["id_tokens"], id_scale=inp["id_scale"])


def _theirs(unet, inp, t):
    with torch.no_grad():
        return unet(inp["x"], torch.tensor(t), inp["context"],
                    added_cond_kwargs={"text_embeds": inp["text_embeds"], "time_ids": inp["time_ids"]},
                    cross_attention_kwargs={"id_tokens": inp["id_tokens"], "id_scale": inp["id_scale"]}).sample


def test_identity_processor_matches_our_attention(pair) -> None:
    cfg, ours, ref = pair
    inp = _inputs(cfg)
    assert rel(_theirs(ref, inp, 499.0), _ours(ours, inp, 499.0)) < TOL


@pytest.mark.parametrize("dcg,am", [("paper", "am1"), ("paper", "am2"), ("cfg1.5", None)])
def test_same_hooks_on_a_diffusers_unet(pair, dcg, am) -> None:
    cfg, ours, ref = pair
    inp = _inputs(cfg)
    null = torch.randn(1, 4, cfg.context_dim, generator=torch.Generator().manual_seed(3))
    outs = []
    for unet, fwd, spec in ((ours, _ours, fastface.hooks.OUR_UNET), (ref, _theirs, DIFFUSERS_ID_SPEC)):
        with fastface.attach(unet, dcg=dcg, am=am, null_id=null, timesteps=TS, spec=spec) as h:
            outs.append(torch.stack([fwd(unet, inp, t) for t in TS[1:3]]))
            evals = h.branch_evaluations
        assert evals == (6 if am == "am2" or dcg == "paper" else 4)
    assert rel(outs[1], outs[0]) < TOL
    plain = _ours(ours, inp, TS[1])
    assert rel(outs[0][0], plain) > 1e-3  # guidance changed the prediction
