"""DCG and AM attached by forward hooks to our UNet (tiny config, random identity branches installed here).

References are computed in the test from the formulas (separate unhooked UNet calls per branch, Eq. 3 and the
official rescale written out), independent of fastface.dcg/fastface.am.
"""

from __future__ import annotations

import pytest
import torch

import fastface
from fastface.am import AM1Config, AM2Config
from fastface import dcg
from fastface.dcg import DCG_CONFIGS, Branch, DCGConfig, StepSchedule
from fastface.hooks import attach
from fastface.models.attention import IdentityAttention
from fastface.models.unet import UNet, get_unet_config

TS = [999.0, 749.0, 499.0, 249.0]
K = 4  # identity tokens


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def unet() -> UNet:
    torch.manual_seed(0)
    cfg = get_unet_config("tiny")
    model = UNet(cfg).eval()
    for name, attn in model.cross_attention_layers():
        ip = IdentityAttention(attn.heads * attn.head_dim, cfg.context_dim, attn.heads, attn.head_dim)
        torch.nn.init.normal_(ip.to_k_ip.weight, std=0.3)
        torch.nn.init.normal_(ip.to_v_ip.weight, std=0.3)
        attn.ip = ip
    return model


def inputs(b: int = 1, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cfg = get_unet_config("tiny")
    return dict(
        x=torch.randn(b, 4, 8, 8, generator=g),
        context=torch.randn(b, 77, cfg.context_dim, generator=g),
        text_embeds=torch.randn(b, cfg.pooled_dim, generator=g),
        time_ids=torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(b, 1),
        id_tokens=torch.randn(b, K, cfg.context_dim, generator=g),
    )


NULL_ID = torch.randn(1, K, 64, generator=torch.Generator().manual_seed(7))


def call(unet: UNet, inp: dict, t: float, **kw) -> torch.Tensor:
    with torch.no_grad():
        return unet(inp["x"], torch.tensor(t), inp["context"], text_embeds=inp["text_embeds"],
                    time_ids=inp["time_ids"], id_tokens=inp["id_tokens"], id_scale=0.8, **kw)


def branch(unet: UNet, inp: dict, t: float, text: bool, ident: bool) -> torch.Tensor:
    b = inp["x"].shape[0]
    alt = dict(inp)
    if not text:
        alt["context"] = torch.zeros_like(inp["context"])
        alt["text_embeds"] = torch.zeros_like(inp["text_embeds"])
    if not ident:
        alt["id_tokens"] = NULL_ID.expand(b, -1, -1)
    return call(unet, alt, t)


def reference_dcg(unet: UNet, inp: dict, step: int, alpha, beta, phi, t: float | None = None) -> torch.Tensor:
    """Eq. 3 + the official rescale, written out from fastface-official.md 1.2-1.3."""
    t = TS[step] if t is None else t
    e_u = branch(unet, inp, t, False, False)
    e_i = branch(unet, inp, t, False, True)
    e_ti = branch(unet, inp, t, True, True)
    a, bt = alpha[step], beta[step]
    e = e_u + a * (e_i - e_u) + bt * (e_ti - e_i)
    if phi:
        s_i = e_i.std(dim=[1, 2, 3], keepdim=True)
        s_ti = e_ti.std(dim=[1, 2, 3], keepdim=True)
        s = e.std(dim=[1, 2, 3], keepdim=True)
        r = (s_i + s_ti) / (2 * s)
        e = e * (phi * r + (1 - phi))
    return e


@pytest.mark.parametrize("step", [0, 1, 3])
def test_dcg_paper_equals_reference(unet: UNet, step: int) -> None:
    inp = inputs(2)
    ref = reference_dcg(unet, inp, step, [1, 1.5, 1.5, 1], [1, 3, 3, 1], 0.75)
    with attach(unet, dcg="paper", null_id=NULL_ID, timesteps=TS) as h:
        out = call(unet, inp, TS[step])
        assert h.branch_evaluations == (3 if step in (1, 2) else 2)
    assert rel(out, ref) < 1e-5


def test_dcg_explicit_step_and_custom_schedule(unet: UNet) -> None:
    inp = inputs(1, seed=3)
    cfg = DCGConfig(alpha=StepSchedule.custom([1.2, 2.0, 1.0]), beta=StepSchedule.custom([2.5, 4.0, 1.0]),
                    rescale=None)
    ref = reference_dcg(unet, inp, 1, [1.2, 2.0, 1.0], [2.5, 4.0, 1.0], None, t=123.0)
    with attach(unet, dcg=cfg, null_id=NULL_ID, timesteps=TS[:3]):
        out = call(unet, inp, 123.0, step=1)  # the explicit step wins over the timestep
    assert rel(out, ref) < 1e-5


def test_no_guidance_computes_one_branch_bit_exactly(unet: UNet) -> None:
    inp = inputs(2)
    plain = call(unet, inp, TS[1])
    with attach(unet, dcg="none", null_id=NULL_ID, timesteps=TS) as h:
        out = call(unet, inp, TS[1])
        assert h.branch_evaluations == 1
    assert torch.equal(out, plain)


def test_evaluation_counts_per_image(unet: UNet) -> None:
    inp = inputs(1)
    counts = {}
    for name, kw in {"paper": dict(dcg="paper"), "none": dict(dcg="none"), "cfg1.5": dict(dcg="cfg1.5"),
                     "paper+am2": dict(dcg="paper", am="am2"), "paper+am1": dict(dcg="paper", am="am1")}.items():
        with attach(unet, null_id=NULL_ID, timesteps=TS, **kw) as h:
            for t in TS:
                call(unet, inp, t)
            counts[name] = h.branch_evaluations
    # official: 12 for every method
    assert counts == {"paper": 10, "none": 4, "cfg1.5": 8, "paper+am2": 12, "paper+am1": 10}


def test_branch_skipping_equals_full_computation(unet: UNet) -> None:
    inp = inputs(2, seed=5)
    for step in range(4):
        with attach(unet, dcg="paper", null_id=NULL_ID, timesteps=TS):
            skipped = call(unet, inp, TS[step])
        h = attach(unet, dcg="paper", null_id=NULL_ID, timesteps=TS)
        h.keep_all = True  # force all three branches
        full = call(unet, inp, TS[step])
        h.remove()
        assert rel(skipped, full) < 1e-5


def test_device_gather_path_matches_host_path(unet: UNet) -> None:
    """The device coefficients (0-dim tensors gathered at a device step index) guide like the host floats."""
    inp = inputs(1)
    with attach(unet, dcg="paper", null_id=NULL_ID, timesteps=TS) as h:
        h.keep_all = True
        tab = h.plan.tables("cpu")
        for step in range(4):
            preds = {}
            for br, (tx, idn) in zip(DCG_CONFIGS["paper"].branches, [(False, False), (False, True), (True, True)]):
                h.remove()
                preds[br] = branch(unet, inp, TS[step], tx, idn)
            host = DCG_CONFIGS["paper"].guide(preds, step, 4)
            c = tab.gather(tab.step_of(torch.tensor(TS[step])))
            dev = dcg.guide(preds, c.alpha, c.beta, DCG_CONFIGS["paper"].rescale)
            assert rel(dev, host) < 1e-6
            # the union without (∅,∅) at the steps where its weight is 0 (α = 1)
            if step in (0, 3):
                sub = {b: p for b, p in preds.items() if b is not Branch.UNCOND}
                assert rel(dcg.guide(sub, c.alpha, c.beta, DCG_CONFIGS["paper"].rescale), host) < 1e-6


def test_remove_restores_bit_identical_outputs(unet: UNet) -> None:
    inp = inputs(2)
    before = call(unet, inp, TS[2])
    h = fastface.attach(unet, dcg="paper", am="am2", null_id=NULL_ID, timesteps=TS)
    during = call(unet, inp, TS[2])
    h.remove()
    after = call(unet, inp, TS[2])
    assert not torch.equal(before, during)
    assert torch.equal(before, after)


def test_am1_transforms_down_and_up_maps_only(unet: UNet) -> None:
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    names = [n for n, _ in unet.cross_attention_layers()]
    probe = {n: dict(unet.named_modules())[n + ".ip.probs"] for n in (names[0], names[30], names[-1])}
    with attach(unet, am=AM1Config()):
        # registered after AM: sees AM's output as `out`, the original map as `inp[0]`
        hs = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.__setitem__(n, (inp[0], out)))
              for n, m in probe.items()]
        call(unet, inputs(1), TS[0])
        for x in hs:
            x.remove()
    down, up, mid = names[0], names[30], names[-1]
    assert down.startswith("down_blocks") and up.startswith("up_blocks") and mid.startswith("mid_block")
    for n, s in ((down, 1.55), (up, 1.45)):
        a, out = seen[n]
        assert torch.allclose(out, torch.clamp(s * a**1.3, max=10.0), rtol=0, atol=1e-7)
    a, out = seen[mid]
    assert torch.equal(a, out)


def test_am2_batch_invariance(unet: UNet) -> None:
    one = inputs(1, seed=11)
    two = inputs(2, seed=12)
    batch = {k: torch.cat([one[k], two[k][:1]]) for k in one}
    with attach(unet, dcg="paper", am="am2", null_id=NULL_ID, timesteps=TS):
        alone = call(unet, one, TS[1])
        together = call(unet, batch, TS[1])
    assert rel(together[:1], alone) < 1e-5


def test_two_unets_side_by_side(unet: UNet) -> None:
    other = UNet(get_unet_config("tiny")).eval()
    other.load_state_dict(unet.state_dict())
    for (_, a), (_, b) in zip(unet.cross_attention_layers(), other.cross_attention_layers()):
        b.ip = IdentityAttention(a.heads * a.head_dim, 64, a.heads, a.head_dim)
        b.ip.load_state_dict(a.ip.state_dict())
    inp = inputs(1)
    with attach(unet, dcg="paper", null_id=NULL_ID, timesteps=TS):
        ref_a = call(unet, inp, TS[1])
    with attach(other, dcg="cfg1.5", am="am1", null_id=NULL_ID, timesteps=TS):
        ref_b = call(other, inp, TS[1])
    ha = attach(unet, dcg="paper", null_id=NULL_ID, timesteps=TS)
    hb = attach(other, dcg="cfg1.5", am="am1", null_id=NULL_ID, timesteps=TS)
    out_a, out_b = call(unet, inp, TS[1]), call(other, inp, TS[1])
    ha.remove(), hb.remove()
    assert torch.equal(out_a, ref_a) and torch.equal(out_b, ref_b)


def test_errors(unet: UNet) -> None:
    bare = UNet(get_unet_config("tiny")).eval()
    with pytest.raises(ValueError, match="identity adapter"):
        attach(bare, am="am1")
    with pytest.raises(ValueError, match="null identity"):
        attach(unet, dcg="paper")
    with pytest.raises(ValueError, match="unknown DCG"):
        attach(unet, dcg="nope", null_id=NULL_ID)
    with attach(unet, dcg="paper", null_id=NULL_ID):
        with pytest.raises(ValueError, match="set_timesteps"):
            call(unet, inputs(1), TS[0])
    with attach(unet, dcg="paper", null_id=NULL_ID, timesteps=TS):
        with pytest.raises(ValueError, match="not in the announced schedule"):
            call(unet, inputs(1), 500.0)
        with pytest.raises(ValueError, match="step must be an integer"):
            call(unet, inputs(1), TS[0], step=9)
    with pytest.raises(ValueError, match="shorter|steps|schedule"):
        attach(unet, dcg=DCGConfig(alpha=StepSchedule.custom([1.0, 2.0])), null_id=NULL_ID, timesteps=TS)


def test_attach_refuses_a_unet_that_has_a_handle(unet: UNet) -> None:
    with attach(unet, dcg="paper", null_id=NULL_ID, timesteps=TS) as h:
        with pytest.raises(ValueError, match=r"already has FastFace attached \(dcg=DCGConfig\(.*steps=4\); call "
                                             r"\.remove\(\)"):
            attach(unet, am="am1")
        assert fastface.hooks.attached(unet) is h
    assert fastface.hooks.attached(unet) is None
    attach(unet, am="am1").remove()  # free again after removal


def test_am_hook_outside_a_unet_call_raises(unet: UNet) -> None:
    """The AM hooks take their step from the UNet call in flight; called alone they raise, never guess step 0."""
    name, attn = unet.cross_attention_layers()[0]
    tokens = torch.randn(1, 16, attn.heads * attn.head_dim)
    inp = inputs(1)
    for am in ("am1", "am2"):
        with attach(unet, dcg="paper", am=am, null_id=NULL_ID, timesteps=TS):
            call(unet, inp, TS[1])  # a UNet call works, and leaves no call in flight behind
            with pytest.raises(RuntimeError, match="outside a UNet call"), torch.no_grad():
                attn(tokens, inp["context"], id_tokens=inp["id_tokens"])


def test_step_plan_is_resolved_once_per_schedule(unet: UNet, monkeypatch) -> None:
    """Schedules are resolved when the timesteps are announced, not per UNet call or per hook call."""
    calls = {"dcg": 0, "am": 0}
    for cls, key, meth in ((DCGConfig, "dcg", "coefficients"), (AM2Config, "am", "steps")):
        orig = getattr(cls, meth)

        def counted(self, n, *a, _orig=orig, _key=key):
            calls[_key] += 1
            return _orig(self, n, *a)

        monkeypatch.setattr(cls, meth, counted)
    with attach(unet, dcg="paper", am="am2", null_id=NULL_ID, timesteps=TS) as h:
        resolved = dict(calls)
        for t in TS:
            call(unet, inputs(1), t)
        assert calls == resolved  # no schedule resolved during the 4 calls
        h.set_timesteps(TS[:2])
        assert calls["am"] == resolved["am"] + 1
