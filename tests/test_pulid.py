"""PuLID v1 / v1.1: file parsing, IDEncoder, IDFormer and the identity attention against references written here from
the formulas of reference/id-adapters.md 4.2-4.4 (float64, on the raw state dicts), and end to end on the tiny UNet.

Random weights are saved in the released layouts (``pulid_v1.bin``: flat torch pickle; ``pulid_v1.1.safetensors``;
ComfyUI's ``image_proj.*`` / ``ip_adapter.{i}.to_k_ip.weight`` conversion). Tolerance: fp32 ours vs float64 reference,
max |a - b| / max |b| <= 1e-6 (``REL_TOL``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_eva_clip import make_eva_clip_state_dict

import fastface
from fastface.adapters.pulid import (
    PULID_ENCODER_CONFIGS,
    PuLID,
    PuLIDAttention,
    PuLIDMode,
    stack_identities,
)
from fastface.models.eva_clip import EVAVisionTower, get_eva_vision_config
from fastface.models.loading import WeightFormatError
from fastface.models.unet import UNet, get_unet_config

REL_TOL = 1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ----------------------------------------------------------------------------------------------------------------
# Random weights in the released layouts
# ----------------------------------------------------------------------------------------------------------------


def _r(gen, *shape, std=None):
    return torch.randn(*shape, generator=gen) * (std if std is not None else shape[-1] ** -0.5)


def _mlp_sd(prefix: str, dims: tuple[int, int, int, int], gen) -> dict[str, torch.Tensor]:
    d_in, h1, h2, d_out = dims
    return {
        prefix + "0.weight": _r(gen, h1, d_in), prefix + "0.bias": _r(gen, h1, std=0.1),
        prefix + "1.weight": 1 + _r(gen, h1, std=0.1), prefix + "1.bias": _r(gen, h1, std=0.1),
        prefix + "3.weight": _r(gen, h2, h1), prefix + "3.bias": _r(gen, h2, std=0.1),
        prefix + "4.weight": 1 + _r(gen, h2, std=0.1), prefix + "4.bias": _r(gen, h2, std=0.1),
        prefix + "6.weight": _r(gen, d_out, h2), prefix + "6.bias": _r(gen, d_out, std=0.1),
    }  # fmt: skip


def make_id_adapter(cfg, gen) -> dict[str, torch.Tensor]:
    """``id_adapter`` keys (no prefix) of IDEncoder (v1) or IDFormer (v1.1)."""
    sd = {}
    if cfg.version == "v1":
        sd |= _mlp_sd("body.", (cfg.id_dim, *cfg.body_hidden, cfg.context_dim * cfg.num_id_tokens), gen)
        for j in range(cfg.num_vit_layers):
            sd |= _mlp_sd(f"mapping_{j}.", (cfg.vit_dim, cfg.hidden, cfg.hidden, cfg.context_dim), gen)
            sd |= _mlp_sd(f"mapping_patch_{j}.", (cfg.vit_dim, cfg.hidden, cfg.hidden, cfg.context_dim), gen)
        return sd
    d, inner = cfg.dim, cfg.heads * cfg.dim_head
    sd["latents"] = _r(gen, 1, cfg.num_queries, d, std=d**-0.5)
    sd["proj_out"] = _r(gen, d, cfg.context_dim, std=d**-0.5)
    sd |= _mlp_sd("id_embedding_mapping.", (cfg.id_dim, cfg.hidden, cfg.hidden, d * cfg.num_id_tokens), gen)
    for j in range(cfg.num_vit_layers):
        sd |= _mlp_sd(f"mapping_{j}.", (cfg.vit_dim, cfg.hidden, cfg.hidden, d), gen)
    for layer in range(cfg.depth):
        p = f"layers.{layer}."
        sd |= {
            p + "0.norm1.weight": 1 + _r(gen, d, std=0.1), p + "0.norm1.bias": _r(gen, d, std=0.1),
            p + "0.norm2.weight": 1 + _r(gen, d, std=0.1), p + "0.norm2.bias": _r(gen, d, std=0.1),
            p + "0.to_q.weight": _r(gen, inner, d), p + "0.to_kv.weight": _r(gen, 2 * inner, d),
            p + "0.to_out.weight": _r(gen, d, inner),
            p + "1.0.weight": 1 + _r(gen, d, std=0.1), p + "1.0.bias": _r(gen, d, std=0.1),
            p + "1.1.weight": _r(gen, d * cfg.ff_mult, d), p + "1.3.weight": _r(gen, d, d * cfg.ff_mult),
        }  # fmt: skip
    return sd


def make_attn_layers(unet, gen, std=None) -> dict[str, torch.Tensor]:
    """``id_adapter_attn_layers`` keys for every odd (cross-attention) index of the UNet."""
    sd = {}
    for i, (_, attn) in enumerate(unet.attention_layers()):
        if i % 2:
            inner, ctx = attn.to_k.out_features, attn.to_k.in_features
            sd[f"{i}.id_to_k.weight"] = _r(gen, inner, ctx, std=std)
            sd[f"{i}.id_to_v.weight"] = _r(gen, inner, ctx, std=std)
    return sd


def flat(id_adapter, attn) -> dict[str, torch.Tensor]:
    return {**{f"id_adapter.{k}": v for k, v in id_adapter.items()},
            **{f"id_adapter_attn_layers.{k}": v for k, v in attn.items()}}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# References from the formulas (float64, straight from the state dict)
# ----------------------------------------------------------------------------------------------------------------


def ref_mlp(sd, p, x):
    x = F.linear(x, sd[p + "0.weight"], sd[p + "0.bias"])
    x = F.leaky_relu(F.layer_norm(x, x.shape[-1:], sd[p + "1.weight"], sd[p + "1.bias"], 1e-5), 0.01)
    x = F.linear(x, sd[p + "3.weight"], sd[p + "3.bias"])
    x = F.leaky_relu(F.layer_norm(x, x.shape[-1:], sd[p + "4.weight"], sd[p + "4.bias"], 1e-5), 0.01)
    return F.linear(x, sd[p + "6.weight"], sd[p + "6.bias"])


def ref_id_encoder(sd, cfg, id_cond, hidden):
    sd = {k: v.double() for k, v in sd.items()}
    b = id_cond.shape[0]
    toks = [ref_mlp(sd, "body.", id_cond.double()).reshape(b, cfg.num_id_tokens, cfg.context_dim)]
    for j, y in enumerate(hidden):
        y = y.double()
        patches = ref_mlp(sd, f"mapping_patch_{j}.", y[:, 1:]).mean(1, keepdim=True)
        toks.append(ref_mlp(sd, f"mapping_{j}.", y[:, :1]) + patches)
    return torch.cat(toks, dim=1)


def ref_id_former(sd, cfg, id_cond, hidden):
    sd = {k: v.double() for k, v in sd.items()}
    id_cond = id_cond.double()
    b = id_cond.shape[0]
    n = id_cond.shape[1] if id_cond.ndim == 3 else 1
    x = ref_mlp(sd, "id_embedding_mapping.", id_cond).reshape(b, cfg.num_id_tokens * n, cfg.dim)
    lat = torch.cat([sd["latents"].expand(b, -1, -1), x], dim=1)
    per = cfg.depth // cfg.num_vit_layers
    h, dh = cfg.heads, cfg.dim_head
    for j, y in enumerate(hidden):
        ctx = torch.cat([x, ref_mlp(sd, f"mapping_{j}.", y.double())], dim=1)
        for layer in range(j * per, (j + 1) * per):
            p = f"layers.{layer}."
            xn = F.layer_norm(ctx, (cfg.dim,), sd[p + "0.norm1.weight"], sd[p + "0.norm1.bias"], 1e-5)
            ln = F.layer_norm(lat, (cfg.dim,), sd[p + "0.norm2.weight"], sd[p + "0.norm2.bias"], 1e-5)
            q = ln @ sd[p + "0.to_q.weight"].T
            kv = torch.cat([xn, ln], dim=1) @ sd[p + "0.to_kv.weight"].T
            k, v = kv[..., : h * dh], kv[..., h * dh :]
            q, k, v = (t.reshape(b, -1, h, dh).transpose(1, 2) for t in (q, k, v))
            o = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), -1) @ v).transpose(1, 2).reshape(b, -1, h * dh)
            lat = lat + o @ sd[p + "0.to_out.weight"].T
            f = F.layer_norm(lat, (cfg.dim,), sd[p + "1.0.weight"], sd[p + "1.0.bias"], 1e-5)
            lat = lat + F.gelu(f @ sd[p + "1.1.weight"].T) @ sd[p + "1.3.weight"].T
    return lat[:, : cfg.num_queries] @ sd["proj_out"]


def ref_attention(q, o_t, e, wk, wv, heads, num_zero, projection, scale):
    """IDAttnProcessor2_0's identity branch on head-merged tensors: q, o_t [B, N, C]; e [B, T, ctx]; scale [B]."""
    q, o_t, e, wk, wv = (t.double() for t in (q, o_t, e, wk, wv))
    b, n, c = q.shape
    d = c // heads
    e = torch.cat([e, torch.zeros(b, num_zero, e.shape[-1], dtype=e.dtype)], dim=1)
    k, v = e @ wk.T, e @ wv.T

    def hs(t):
        return t.reshape(b, -1, heads, d).transpose(1, 2)

    logits = hs(q) @ hs(k).transpose(-1, -2)
    o_id = (torch.softmax(logits / math.sqrt(d), -1) @ hs(v)).transpose(1, 2).reshape(b, n, c)
    s = scale.double().view(-1, 1, 1)
    if projection == "plain":
        return o_t + s * o_id
    proj = (o_t * o_id).sum(-2, keepdim=True) / (o_t * o_t).sum(-2, keepdim=True) * o_t
    if projection == "ortho":
        return o_t + s * (o_id - proj)
    mass = torch.softmax(logits, -1).mean(dim=1)[:, :, :5].sum(-1, keepdim=True)  # [B, N, 1]
    return o_t + s * (o_id + (mass - 1) * proj)


# ----------------------------------------------------------------------------------------------------------------
# Encoders and attention
# ----------------------------------------------------------------------------------------------------------------


def _inputs(cfg, gen, b=2, n_images=None, tokens=17):
    n = n_images or 1
    cond = torch.randn(b, n, cfg.id_dim, generator=gen) if n_images else torch.randn(b, cfg.id_dim, generator=gen)
    hidden = [torch.randn(b, n * tokens, cfg.vit_dim, generator=gen) for _ in range(cfg.num_vit_layers)]
    return cond, hidden


@pytest.mark.parametrize("name", ["v1-tiny", "v1.1-tiny"])
def test_encoder_matches_formulas(name, tmp_path):
    cfg = PULID_ENCODER_CONFIGS[name]
    gen = torch.Generator().manual_seed(0)
    enc_sd = make_id_adapter(cfg, gen)
    attn = {"1.id_to_k.weight": torch.randn(8, cfg.context_dim), "1.id_to_v.weight": torch.randn(8, cfg.context_dim)}
    path = tmp_path / ("pulid_v1.bin" if cfg.version == "v1" else "pulid_v1.1.safetensors")
    if cfg.version == "v1":
        torch.save(flat(enc_sd, attn), path)
    else:
        save_file(flat(enc_sd, attn), str(path))
    pulid = PuLID.from_file(path)
    assert pulid.version == cfg.version and pulid.config == cfg
    ref = ref_id_encoder if cfg.version == "v1" else ref_id_former
    cond, hidden = _inputs(cfg, gen)
    with torch.no_grad():
        tokens = pulid.encode(cond, hidden)
        assert tokens.shape == (2, cfg.num_tokens, cfg.context_dim)
        assert rel_err(tokens, ref(enc_sd, cfg, cond, hidden)) < REL_TOL
        null = pulid.null_tokens(batch_size=2, vit_tokens=17)
        zc, zh = torch.zeros_like(cond), [torch.zeros_like(h) for h in hidden]
        assert rel_err(null, ref(enc_sd, cfg, zc, zh)) < REL_TOL
        # several reference images
        cond3, hidden3 = _inputs(cfg, gen, b=1, n_images=3)
        if cfg.version == "v1.1":  # one pass, hidden states concatenated along tokens; still 32 (here 8) tokens
            many = pulid.encode(cond3, hidden3)
            assert many.shape == (1, cfg.num_queries, cfg.context_dim)
            assert rel_err(many, ref(enc_sd, cfg, cond3, hidden3)) < REL_TOL
            assert pulid.null_tokens(num_images=3, vit_tokens=17).shape == many.shape
            assert not torch.equal(pulid.null_tokens(vit_tokens=17), pulid.null_tokens(vit_tokens=577))
        else:  # app.py: first image 10 tokens, extras their first 5 (or 10 with id_mix)
            per = [ref(enc_sd, cfg, cond3[:, i], [h[:, 17 * i : 17 * (i + 1)] for h in hidden3]) for i in range(3)]
            for mix, want in ((False, torch.cat([per[0], per[1][:, :5], per[2][:, :5]], 1)), (True, torch.cat(per, 1))):
                assert rel_err(pulid.encode(cond3, hidden3, id_mix=mix), want) < REL_TOL
            assert pulid.null_tokens(num_images=3).shape == (1, 20, cfg.context_dim)
        # stack_identities: per-image inputs -> the stacked layout
        per_image = [[h[:, 17 * i : 17 * (i + 1)] for h in hidden3] for i in range(3)]
        sc, sh = stack_identities([cond3[:, i] for i in range(3)], per_image)
        assert torch.equal(sc, cond3) and all(torch.equal(a, b) for a, b in zip(sh, hidden3))


@pytest.mark.parametrize("projection", ["plain", "ortho", "ortho_v2"])
@pytest.mark.parametrize("num_zero", [0, 8])
def test_attention_matches_formulas(projection, num_zero):
    gen = torch.Generator().manual_seed(1)
    b, heads, d, n, t, ctx = 2, 4, 16, 24, 10, 32
    att = PuLIDAttention(heads * d, ctx, heads, d, num_zero=num_zero, projection=projection)
    with torch.no_grad():
        att.to_k_ip.weight.copy_(torch.randn(heads * d, ctx, generator=gen) * 0.5)
        att.to_v_ip.weight.copy_(torch.randn(heads * d, ctx, generator=gen) * 0.5)
    q = torch.randn(b, heads, n, d, generator=gen)
    o_t = torch.randn(b, heads, n, d, generator=gen)
    e = torch.randn(b, t, ctx, generator=gen)
    scale = torch.tensor([0.8, 1.3])
    with torch.no_grad():
        out = att(q, o_t, e, scale)
    merge = lambda x: x.transpose(1, 2).reshape(b, n, heads * d)  # noqa: E731
    want = ref_attention(merge(q), merge(o_t), e, att.to_k_ip.weight, att.to_v_ip.weight, heads, num_zero, projection, scale)
    assert rel_err(merge(out), want) < REL_TOL
    if projection == "ortho_v2":  # the gate really matters: ORTHO_v2 is neither plain nor ORTHO
        wk, wv = att.to_k_ip.weight, att.to_v_ip.weight
        other = ref_attention(merge(q), merge(o_t), e, wk, wv, heads, num_zero, "ortho", scale)
        assert rel_err(want, other) > 1e-3


@pytest.mark.parametrize("projection", ["ortho", "ortho_v2"])
def test_zero_text_output_has_no_projection(projection):
    """A zero text output (DCG's zero null-text context gives zero keys and values) projects to P = 0, not NaN."""
    att = PuLIDAttention(32, 16, 2, 16, num_zero=8, projection=projection)
    q, e = torch.randn(1, 2, 5, 16), torch.randn(1, 10, 16)
    o_t = torch.zeros(1, 2, 5, 16)
    out = att(q, o_t, e, torch.tensor([0.8]))
    att.set_mode(PuLIDMode(8, "plain"))
    assert torch.isfinite(out).all() and torch.allclose(out, att(q, o_t, e, torch.tensor([0.8])), atol=1e-7)


def test_probs_hook_sees_identity_tokens_only():
    att = PuLIDAttention(32, 16, 2, 16, num_zero=20)
    seen = []
    att.probs.register_forward_hook(lambda m, i, o: seen.append(o))
    att(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 10, 16), None)
    (a,) = seen
    assert a.shape == (1, 2, 5, 10)
    assert (a.sum(-1) < 1).all()  # the 20 zero tokens keep part of the mass


# ----------------------------------------------------------------------------------------------------------------
# File layouts and errors
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return UNet(get_unet_config("tiny")).eval()


def test_comfyui_conversion_loads_the_same(tiny_unet, tmp_path):
    cfg = PULID_ENCODER_CONFIGS["v1-tiny"]
    gen = torch.Generator().manual_seed(2)
    enc, attn = make_id_adapter(cfg, gen), make_attn_layers(tiny_unet, gen)
    torch.save(flat(enc, attn), tmp_path / "pulid_v1.bin")
    comfy = {f"image_proj.{k}": v.half() for k, v in enc.items()}
    renamed = {k.replace('id_to_k', 'to_k_ip').replace('id_to_v', 'to_v_ip'): v for k, v in attn.items()}
    comfy |= {f"ip_adapter.{k}": v.half() for k, v in renamed.items()}
    save_file(comfy, str(tmp_path / "ip-adapter_pulid_sdxl_fp16.safetensors"))
    a = PuLID.from_file(tmp_path / "pulid_v1.bin")
    b = PuLID.from_file(tmp_path / "ip-adapter_pulid_sdxl_fp16.safetensors")
    assert b.version == "v1" and sorted(a.attn) == sorted(b.attn) == list(range(1, 140, 2))
    assert torch.equal(a.attn[139][0].half(), b.attn[139][0])


def test_file_errors(tiny_unet, tmp_path):
    cfg = PULID_ENCODER_CONFIGS["v1-tiny"]
    gen = torch.Generator().manual_seed(3)
    enc, attn = make_id_adapter(cfg, gen), make_attn_layers(tiny_unet, gen)
    with pytest.raises(WeightFormatError, match="IP-Adapter file"):
        ip = {"image_proj.proj.0.weight": torch.zeros(2, 2), "ip_adapter.1.to_k_ip.weight": torch.zeros(2, 2)}
        PuLID.from_state_dict({**ip, "x": torch.zeros(1)})
    with pytest.raises(WeightFormatError, match="not a PuLID file"):
        PuLID.from_state_dict({"model.diffusion_model.x": torch.zeros(1)})
    broken = dict(attn)
    del broken["5.id_to_v.weight"]
    with pytest.raises(WeightFormatError, match=r"layer\(s\) \[5\]"):
        PuLID.from_state_dict(flat(enc, broken))
    with pytest.raises(WeightFormatError, match="unexpected attention key"):
        PuLID.from_state_dict(flat(enc, {**attn, "3.to_q_lora.down.weight": torch.zeros(1, 1)}))
    with pytest.raises(WeightFormatError, match="neither PuLID v1"):
        PuLID.from_state_dict(flat({"foo.weight": torch.zeros(1)}, attn))
    bad_enc = dict(enc)
    bad_enc["mapping_2.3.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightFormatError, match="shape mismatch"):
        PuLID.from_state_dict(flat(bad_enc, attn))
    # a UNet with another layer count, or other widths
    few = {k: v for k, v in attn.items() if int(k.split(".")[0]) < 100}
    with pytest.raises(WeightFormatError, match="100 attention layers but the UNet has 140"):
        PuLID.from_state_dict(flat(enc, few)).install(tiny_unet)
    wide = {k: (torch.zeros(v.shape[0] + 1, v.shape[1]) if k.startswith("9.") else v) for k, v in attn.items()}
    with pytest.raises(WeightFormatError, match="id_to_k.weight' has shape"):
        PuLID.from_state_dict(flat(enc, wide)).install(tiny_unet)
    pulid = PuLID.from_state_dict(flat(enc, attn))
    with pytest.raises(ValueError, match="unknown PuLID mode"):
        pulid.install(tiny_unet, mode="fast")
    with pytest.raises(ValueError, match="projection must be one of"):
        pulid.install(tiny_unet, projection="ortho_v3")
    with pytest.raises(ValueError, match="num_zero must be"):
        PuLIDMode(-1)
    with pulid.install(tiny_unet):
        with pytest.raises(ValueError, match="already has an identity branch"):
            pulid.install(tiny_unet)
    cond, hidden = _inputs(cfg, gen)
    with pytest.raises(ValueError, match="id_cond must be"):
        pulid.encode(cond[:, :100], hidden)
    with pytest.raises(ValueError, match="need 5 EVA hidden states"):
        pulid.encode(cond, hidden[:4])
    with pytest.raises(ValueError, match="EVA hidden state 0 must be"):
        pulid.encode(cond, [hidden[0][:1]] + hidden[1:])
    with pytest.raises(ValueError, match="one EVA hidden-state list per id_cond"):
        stack_identities([cond], [])


# ----------------------------------------------------------------------------------------------------------------
# End to end on the tiny UNet
# ----------------------------------------------------------------------------------------------------------------


def _unet_inputs(cfg, gen):
    return dict(
        context=torch.randn(1, 77, cfg.context_dim, generator=gen),
        text_embeds=torch.randn(1, cfg.pooled_dim, generator=gen),
        time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]]),
    )


@pytest.mark.parametrize("name", ["v1-tiny", "v1.1-tiny"])
def test_end_to_end_tiny_unet(name, tiny_unet, tmp_path):
    unet, ucfg = tiny_unet, tiny_unet.config
    cfg = PULID_ENCODER_CONFIGS[name]
    gen = torch.Generator().manual_seed(4)
    enc = make_id_adapter(cfg, gen)
    attn = make_attn_layers(unet, gen, std=0.5)
    if cfg.version == "v1":
        path = tmp_path / "pulid_v1.bin"
        torch.save(flat(enc, attn), path)
    else:
        path = tmp_path / "pulid_v1.1.safetensors"
        save_file({k: v.half() for k, v in flat(enc, attn).items()}, str(path))  # released v1.1 is fp16
    pulid = PuLID.from_file(path)

    # identity inputs from our tiny EVA tower (random weights) and a raw 512-d embedding
    eva = EVAVisionTower.from_state_dict(make_eva_clip_state_dict(get_eva_vision_config("tiny"), gen), config="tiny")
    with torch.no_grad():
        out = eva(torch.randn(1, 3, 56, 56, generator=gen))
        id_cond = torch.cat([torch.randn(1, 512, generator=gen) * 20, out.normed_embeds], dim=-1)
        tokens = pulid.encode(id_cond, out.hidden_states)
        null = pulid.null_tokens(vit_tokens=out.hidden_states[0].shape[1])
    x = torch.randn(1, 4, 8, 8, generator=gen)
    cond = _unet_inputs(ucfg, gen)

    def call(**kw):
        with torch.no_grad():
            return unet(x, 500, cond["context"], text_embeds=cond["text_embeds"], time_ids=cond["time_ids"], **kw)

    before = call()
    handle = pulid.install(unet)  # v1: fidelity (8, ORTHO_v2); v1.1: (20, ORTHO_v2)
    assert handle.mode == (PuLIDMode(8, "ortho_v2") if cfg.version == "v1" else PuLIDMode(20, "ortho_v2"))

    # one installed layer against the formula reference (text attention + identity branch + to_out)
    name2, layer = unet.cross_attention_layers()[7]
    seen = {}
    hook = layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0], ctx=i[1], out=o))
    base = call(id_tokens=tokens, id_scale=0.8)
    hook.remove()
    hs = lambda t: t.reshape(1, -1, layer.heads, layer.head_dim).transpose(1, 2)  # noqa: E731
    with torch.no_grad():
        q = layer.to_q(seen["x"])
        o_t = F.scaled_dot_product_attention(hs(q), hs(layer.to_k(seen["ctx"])), hs(layer.to_v(seen["ctx"])))
        o_t = o_t.transpose(1, 2).reshape(q.shape)
        i = 2 * [n for n, _ in unet.attention_layers()].index(name2) // 2
        wk, wv = pulid.attn[i + 1 if i % 2 == 0 else i]
        want = ref_attention(q, o_t, tokens, wk, wv, layer.heads, handle.mode.num_zero, "ortho_v2", torch.tensor([0.8]))
        want = F.linear(want, layer.to_out[0].weight.double(), layer.to_out[0].bias.double())
    assert rel_err(seen["out"], want) < 1e-5
    assert rel_err(base, before) > 1e-3  # the identity branch changes the prediction

    # DCG + AM1 through fastface.attach (null identity = encoder of zeros), 2 steps, deterministic
    ts = [999.0, 499.0]

    def run(method):
        dcg, am = ("paper", "am1") if method == "fastface-am1" else ("none", None)
        with fastface.attach(unet, dcg=dcg, am=am, null_id=null, timesteps=ts) as h:
            with torch.no_grad():
                outs = [unet(x, t, cond["context"], text_embeds=cond["text_embeds"], time_ids=cond["time_ids"],
                             id_tokens=tokens, id_scale=0.8) for t in ts]
            return torch.stack(outs), h.branch_evaluations

    ff, evals = run("fastface-am1")
    ff2, _ = run("fastface-am1")
    plain, plain_evals = run("baseline")
    assert torch.isfinite(ff).all() and torch.equal(ff, ff2)
    assert (evals, plain_evals) == (4, 2)  # DCG "paper" at 2 steps: branches (∅,∅)+(text,id), then 1 branch
    assert rel_err(ff, plain) > 1e-3
    handle.set_mode("style")
    assert all(ip.num_zero == 16 and ip.projection == "ortho" for ip in handle.layers)
    assert not torch.equal(call(id_tokens=tokens, id_scale=0.8), base)
    handle.remove()
    handle.remove()
    assert torch.equal(call(), before)
    assert torch.equal(call(id_tokens=tokens, id_scale=0.8), before)  # no branch left to use the tokens
